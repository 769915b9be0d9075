"""Option checks shared by rules that act on some of their units, chosen by position."""
from __future__ import annotations

from collections.abc import Sequence

from surgery.errors import RuleError


def checked_positions(layers: object, unit: str) -> tuple[int, ...]:
    """``layers`` as a sorted tuple of unit positions (0 = the first ``unit`` the model runs).

    Raises:
        RuleError: not a sequence of non-negative integers, empty, or not sorted and unique.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise RuleError(f"layers must be a list of {unit} positions, got {layers!r}", "e.g. layers=[0, 2]")
    values = list(layers)
    if not values:
        raise RuleError("layers is empty", f"give at least one position, or None for every {unit}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise RuleError(f"layers must hold non-negative integers, got {values!r}", "e.g. layers=[0, 2]")
    if values != sorted(set(values)):
        raise RuleError(f"layers {values} is not sorted and unique", f"use {sorted(set(values))}")
    return tuple(values)


__all__ = ["checked_positions"]
