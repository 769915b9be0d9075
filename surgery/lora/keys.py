"""Parse LoRA tensor names into (target module, role) pairs.

Recognised per-target suffixes (after prefix stripping and the optional key map):

* ``<target>.lora_A.weight`` / ``<target>.lora_B.weight``            (PEFT, diffusers)
* ``<target>.lora_A.<adapter>.weight`` / ``lora_B.<adapter>.weight`` (PEFT state with the adapter name inside)
* ``<target>.lora_down.weight`` / ``<target>.lora_up.weight``         (kohya/ComfyUI: down = A, up = B)
* ``<target>.alpha``                                                  (optional scalar; scaling = alpha / rank)

Targets of the Wan2GP "Ditto" scheme, ``blocks.N.vace.<sub>`` with ``N`` the *main-layer*
index, become ``vace_blocks.K.<sub>`` with ``K = vace_layers.index(N)``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
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
_DITTO_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.vace\.(?P<rest>.+)$")
_ROLE = {"lora_A": "A", "lora_B": "B", "lora_down": "A", "lora_up": "B"}


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


def _ditto_target(target: str, vace_layers: Sequence[int] | None, name: str) -> str | None:
    m = _DITTO_RE.match(target)
    if not m:
        return None
    layer = int(m["layer"])
    if vace_layers is None:
        raise WeightsError(
            f"LoRA key {name!r} uses the blocks.N.vace.* scheme, which needs the model's vace_layers to find "
            "the VACE block",
            "pass vace_layers=[...] (the main-layer index of each VACE block) to load_lora_file",
        )
    layers = list(vace_layers)
    if layer not in layers:
        raise WeightsError(
            f"LoRA key {name!r} targets the VACE block at main layer {layer}, but vace_layers is {layers}",
            "use the LoRA made for this model's vace_layers, or pass the vace_layers it was trained with",
        )
    return f"vace_blocks.{layers.index(layer)}.{m['rest']}"


def parse_lora_keys(
    names: Iterable[str],
    *,
    strip_prefixes: Sequence[str] = DEFAULT_LORA_PREFIXES,
    key_map: KeyMap | None = None,
    vace_layers: Sequence[int] | None = None,
) -> ParsedLora:
    """Group stored LoRA tensor names by target module (module-relative, native names)."""
    compiled = compile_key_map(key_map)
    targets: dict[str, LoraTarget] = {}
    schemes: set[str] = set()
    unrecognized: list[str] = []
    adapters_seen: dict[str, str] = {}
    for name in names:
        key = apply_key_map(strip_prefix(name, strip_prefixes), compiled)
        m = _SUFFIX_RE.match(key)
        if not m:
            unrecognized.append(name)
            continue
        target = m["target"]
        ditto = _ditto_target(target, vace_layers, name)
        if ditto is not None:
            target = ditto
            schemes.add("blocks.N.vace (Ditto)")
        if m["alpha"]:
            role = "alpha"
        else:
            kind = m["peft"] or m["kohya"]
            role = _ROLE[kind]
            schemes.add("lora_up/lora_down" if m["kohya"] else "lora_A/lora_B")
            if m["adapter"]:
                schemes.add("adapter name in keys")
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
    return ParsedLora(targets, schemes, unrecognized)
