"""The VACE rule's options: their descriptions (``surgery rules``) and the ``vace_layers`` check."""
from __future__ import annotations

from typing import Sequence

from surgery.errors import RuleError

from .profiles import PROFILES

OPTIONS = {
    "vace_in_dim": "channels of the control context (96: 32 latent + 64 mask channels)",
    "vace_layers": "main blocks that receive a hint; must contain 0 (default: every second block)",
    "num_layers": "number of main blocks to expect (default: the count the model declares, else the match count)",
    "profile": f"model family: {', '.join(PROFILES)} or a rules.vace.VaceProfile (default: detected)",
}


def check_layers(layers: Sequence[int] | None, num_layers: int | None) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise RuleError(f"vace_layers must be a list of block indices, got {layers!r}", "e.g. vace_layers=[0, 2, 4]")
    values = list(layers)
    if not values:
        raise RuleError("vace_layers is empty", "give at least [0], or None for every second block")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RuleError(f"vace_layers must hold integers, got {values!r}", "e.g. vace_layers=[0, 2, 4]")
    if 0 not in values:
        raise RuleError(f"vace_layers {values} does not contain 0", "VACE block 0 must feed main block 0; add 0")
    if min(values) < 0:
        raise RuleError(f"vace_layers {values} has a negative index", "use indices 0..num_layers-1")
    if values != sorted(values):
        raise RuleError(f"vace_layers {values} is not sorted", f"use {sorted(set(values))}")
    if len(set(values)) != len(values):
        raise RuleError(f"vace_layers {values} has duplicates", f"use {sorted(set(values))}")
    if num_layers is not None and values[-1] >= num_layers:
        raise RuleError(f"vace_layers {values} is out of range for {num_layers} blocks",
                        f"use indices 0..{num_layers - 1}")
    return tuple(values)


__all__ = ["OPTIONS", "check_layers"]
