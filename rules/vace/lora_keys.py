"""VACE's own LoRA naming: the Wan2GP "Ditto" scheme, ``blocks.N.vace.<sub>``.

``N`` is the *main-layer* index the VACE block feeds, so the target becomes
``vace_blocks.K.<sub>`` with ``K = vace_layers.index(N)``. The rule hands this scheme to
:func:`surgery.lora.load_lora_file` (``Rule.lora_schemes``); the layers come from the
rewritten model's matches, or from a model's ``vace_layers`` attribute (the hand-written
reference), or are given (``lora_schemes([0, 2])``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from surgery.errors import WeightsError
from surgery.lora.keys import TargetScheme

LABEL = "blocks.N.vace (Ditto)"
_DITTO_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.vace\.(?P<rest>.+)$")


def check_vace_layers(vace_layers: Any) -> tuple[int, ...] | None:
    """``vace_layers`` as a tuple of non-negative ints (``None`` stays ``None``)."""
    if vace_layers is None:
        return None
    items = list(vace_layers) if isinstance(vace_layers, Sequence) and not isinstance(vace_layers, str) else None
    if items is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise WeightsError(f"vace_layers must be a sequence of non-negative ints, got {vace_layers!r}",
                           "pass the main-layer index of each VACE block, e.g. vace_layers=[0, 2]")
    return tuple(items)


def lora_schemes(vace_layers: Sequence[int] | None, blocks: str = "vace_blocks") -> tuple[TargetScheme, ...]:
    """The Ditto scheme for VACE blocks fed by main layers ``vace_layers`` (``None``: unknown,
    so a Ditto key is refused), grafted under ``blocks``."""
    layers = check_vace_layers(vace_layers)

    def rename(target: str, name: str) -> str | None:
        m = _DITTO_RE.match(target)
        if not m:
            return None
        layer = int(m["layer"])
        if layers is None:
            raise WeightsError(
                f"LoRA key {name!r} uses the blocks.N.vace.* scheme, which needs the model's vace_layers to find "
                "the VACE block",
                "pass schemes=rules.vace.lora_schemes([...]) (the main-layer index of each VACE block) to "
                "load_lora_file",
            )
        if layer not in layers:
            raise WeightsError(
                f"LoRA key {name!r} targets the VACE block at main layer {layer}, but vace_layers is {list(layers)}",
                "use the LoRA made for this model's vace_layers, or pass the vace_layers it was trained with",
            )
        return f"{blocks}.{layers.index(layer)}.{m['rest']}"

    return (TargetScheme(LABEL, rename),)


def model_layers(model: nn.Module) -> tuple[int, ...] | None:
    """The main layers that feed VACE blocks in ``model``: its ``vace_layers`` attribute, else the
    positions of the rewritten model's acted-on matches (in index order); ``None`` if neither."""
    declared = getattr(model, "vace_layers", None)
    if declared is not None:
        return check_vace_layers(declared)
    for module in model.modules():  # a PEFT wrapper holds the rewritten model inside
        state = module.__dict__.get("_surgery")
        for spec in state.specialisations.values() if state is not None else ():
            acted = sorted((m for m in spec.matches if m.index is not None), key=lambda m: m.index)
            return tuple(m.position for m in acted)
    return None


__all__ = ["LABEL", "check_vace_layers", "lora_schemes", "model_layers"]
