"""Parse LoRA tensor names into (target module, role) pairs.

Recognised per-target suffixes (after prefix stripping and the optional key map):

* ``<target>.lora_A.weight`` / ``<target>.lora_B.weight``            (PEFT, diffusers)
* ``<target>.lora_A.<adapter>.weight`` / ``lora_B.<adapter>.weight`` (PEFT state with the adapter name inside)
* ``<target>.lora_down.weight`` / ``<target>.lora_up.weight``         (kohya/ComfyUI: down = A, up = B)
* ``<target>.alpha``                                                  (optional scalar; scaling = alpha / rank)

A rule may name the targets in its grafted modules its own way: it gives
:class:`TargetScheme` objects (``Rule.lora_schemes``), each renaming the targets it recognises
(e.g. VACE's ``blocks.N.vace.*``, :mod:`rules.vace.lora_keys`).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from surgery.errors import WeightsError
from surgery.weights.keys import KeyMap, apply_key_map, compile_key_map, strip_prefix

DEFAULT_LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")

_SUFFIX_RE = re.compile(
    r"^(?P<target>.+?)\.(?:"
    r"(?P<peft>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|(?P<kohya>lora_(?:up|down))\.weight"
    r"|(?P<alpha>alpha))$"
)
_ROLE = {"lora_A": "A", "lora_B": "B", "lora_down": "A", "lora_up": "B"}


@dataclass(frozen=True)
class TargetScheme:
    """A rule's own naming of LoRA targets.

    ``rename(target, name)`` returns the model's module path for a stored ``target`` in this
    scheme, or ``None`` when ``target`` is not in it; a target of the scheme that does not fit
    the model raises :class:`~surgery.errors.WeightsError` (``name``: the stored tensor name,
    for the message). ``label`` names the scheme in load reports.
    """

    label: str
    rename: Callable[[str, str], "str | None"]


@dataclass
class LoraTarget:
    """Stored names of one target's tensors."""

    target: str
    names: dict[str, str] = field(default_factory=dict)  # role ("A", "B", "alpha") -> stored name


@dataclass
class ParsedLora:
    targets: dict[str, LoraTarget]
    schemes: set[str]
    unrecognized: list[str]


def parse_lora_keys(
    names: Iterable[str],
    *,
    strip_prefixes: Sequence[str] = DEFAULT_LORA_PREFIXES,
    key_map: KeyMap | None = None,
    schemes: Sequence[TargetScheme] = (),
) -> ParsedLora:
    """Group stored LoRA tensor names by target module (module-relative, native names);
    ``schemes`` rename the targets of a rule's own naming (the first that recognises one wins)."""
    compiled = compile_key_map(key_map)
    targets: dict[str, LoraTarget] = {}
    seen: set[str] = set()
    unrecognized: list[str] = []
    adapters_seen: dict[str, str] = {}
    for name in names:
        key = apply_key_map(strip_prefix(name, strip_prefixes), compiled)
        m = _SUFFIX_RE.match(key)
        if not m:
            unrecognized.append(name)
            continue
        target = m["target"]
        for scheme in schemes:
            renamed = scheme.rename(target, name)
            if renamed is not None:
                target = renamed
                seen.add(scheme.label)
                break
        if m["alpha"]:
            role = "alpha"
        else:
            kind = m["peft"] or m["kohya"]
            role = _ROLE[kind]
            seen.add("lora_up/lora_down" if m["kohya"] else "lora_A/lora_B")
            if m["adapter"]:
                seen.add("adapter name in keys")
                adapters_seen.setdefault(target, m["adapter"])
                if adapters_seen[target] != m["adapter"]:
                    raise WeightsError(
                        f"the LoRA file holds several adapters for {target!r} "
                        f"({adapters_seen[target]!r}, {m['adapter']!r})",
                        "save one adapter per file",
                    )
        entry = targets.setdefault(target, LoraTarget(target))
        if role in entry.names:
            raise WeightsError(
                f"LoRA tensors {entry.names[role]!r} and {name!r} both give {role} of {target!r}",
                "the file mixes key schemes for one layer; keep one",
            )
        entry.names[role] = name
    return ParsedLora(targets, seen, unrecognized)
