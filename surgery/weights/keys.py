"""Key handling: prefix stripping, data-driven key maps, filtering to a rule's grafted modules.

A rule's weight prefix (``Rule.weight_prefixes``) is a plain prefix (e.g. ``vace_blocks.``) or a
pattern in which a ``*`` part stands for any one dotted name part (``blocks.*.ffn_adapter.``:
an adapter grafted inside every block); :func:`under_prefixes` is the one place that matches them.

A key map is plain data: an ordered sequence of ``(pattern, replacement)`` pairs applied
to every key in turn, each rule seeing the previous rule's output (the same semantics
as diffusers' conversion tables). A pattern is a substring unless it starts with
``"re:"``, in which case the rest is a regular expression and the replacement may use
group references (``\\1``). Compiled ``re.Pattern`` objects are accepted as well.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from surgery.dotted import starts_with
from surgery.errors import RuleError, WeightsError

KeyRule = tuple["str | re.Pattern[str]", str]
KeyMap = Sequence[KeyRule]
REGEX_PREFIX = "re:"


def under_prefixes(key: str, prefixes: Sequence[str]) -> bool:
    """Whether ``key`` starts with one of ``prefixes`` (:func:`surgery.dotted.starts_with`: a ``*``
    part matches any one dotted name part, so ``blocks.*.ffn_adapter.`` holds ``blocks.3.ffn_adapter.up.weight``)."""
    return any(starts_with(key, prefix) for prefix in prefixes)


def compile_key_map(key_map: KeyMap | None) -> list[Callable[[str], str]]:
    """Validate a key map and turn each rule into a ``str -> str`` function."""
    if key_map is None:
        return []
    if isinstance(key_map, (str, bytes)) or not isinstance(key_map, Iterable):
        raise RuleError(
            f"key_map must be a sequence of (pattern, replacement) pairs, got {type(key_map).__name__}",
            "pass a sequence of (pattern, replacement) pairs, such as one of the rule's key_maps",
        )
    compiled: list[Callable[[str], str]] = []
    for i, rule in enumerate(key_map):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], str)):
            raise RuleError(f"key_map rule {i} is {rule!r}, not a (pattern, replacement) pair", "fix the key map data")
        pattern, replacement = rule
        if isinstance(pattern, re.Pattern) or (isinstance(pattern, str) and pattern.startswith(REGEX_PREFIX)):
            try:
                regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as exc:
                raise RuleError(f"key_map rule {i} has a bad regex {pattern!r}: {exc}", "fix the key map data") from exc
            compiled.append(lambda key, _r=regex, _s=replacement: _r.sub(_s, key))
        elif isinstance(pattern, str) and pattern:
            compiled.append(lambda key, _p=pattern, _s=replacement: key.replace(_p, _s))
        else:
            raise RuleError(f"key_map rule {i} has an empty or non-string pattern {pattern!r}", "fix the key map data")
    return compiled


def apply_key_map(key: str, compiled: Sequence[Callable[[str], str]]) -> str:
    """Run a key through every compiled rule in order."""
    for rule in compiled:
        key = rule(key)
    return key


def strip_prefix(key: str, prefixes: Sequence[str]) -> str:
    """Remove the first matching prefix (list longer prefixes first)."""
    for prefix in prefixes:
        if prefix and key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass(frozen=True)
class KeySelection:
    """Result of mapping stored names onto model keys."""

    selected: dict[str, str]  # model key -> stored name
    dropped: int  # stored tensors outside the kept prefixes (e.g. base-model weights)


def select_keys(
    names: Iterable[str],
    *,
    strip_prefixes: Sequence[str],
    key_map: KeyMap | None,
    keep_prefixes: Sequence[str],
) -> KeySelection:
    """Strip prefixes, apply the key map, keep keys under ``keep_prefixes`` (``*`` parts: :func:`under_prefixes`).

    Two stored tensors that map to the same model key are an error: loading one of them
    silently would depend on file order.
    """
    compiled = compile_key_map(key_map)
    selected: dict[str, str] = {}
    dropped = 0
    for name in names:
        key = apply_key_map(strip_prefix(name, strip_prefixes), compiled)
        if not under_prefixes(key, keep_prefixes):
            dropped += 1
            continue
        if key in selected:
            raise WeightsError(
                f"stored tensors {selected[key]!r} and {name!r} both map to {key!r}",
                "the checkpoint mixes layouts or the key map is ambiguous; fix the key map or the file",
            )
        selected[key] = name
    return KeySelection(selected, dropped)
