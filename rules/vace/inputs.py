"""The VACE rule's call inputs: what a caller may pass, checked and normalised before any graph runs.

Names come from the model family's profile (``vace_context`` / ``vace_context_scale``, or
diffusers' ``control_hidden_states`` / ``control_hidden_states_scale``), so every message
names the inputs the caller actually typed.

**One context** is a ``[B, C, F, H, W]`` tensor, or a list (or tuple) of ``B`` tensors
``[C, F, H, W]``, one per batch element. Its scale is a number (every VACE layer), or one
value per VACE layer (a list, tuple or 1-D tensor).

**Several contexts** (ComfyUI's and kijai's stacked VACE inputs: a depth clip and a
reference image, each with its own strength) are a list (or tuple) whose items are each one
context: a ``[B, C, F, H, W]`` tensor or a list of ``B`` ``[C, F, H, W]`` tensors. A list is
read as several contexts exactly when its **first item** is a 5-D tensor or a list/tuple;
otherwise it is one context's batch elements, and an item of the other kind in the same list
is refused as ambiguous. With several contexts the scale is a number (every context, every
layer) or a list (or tuple) with **one entry per context**, each a number or one value per
VACE layer; a tensor there is refused, because a tensor reads as one value per layer.

Normalised forms (what the rule's actions see): without a context both inputs are ``None``;
one context keeps its value and gets a tuple of per-layer floats (a one-item list of contexts
becomes exactly that, so it costs what one context costs); several contexts become a tuple
of ``(context, per-layer floats)`` pairs, and the scale input becomes ``None``. A ``None``
input has its own entry in a specialisation's call signature, so the branch's decision
"one context or several" is guarded without tracing anything.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn

from surgery.entry import model_on_meta
from surgery.errors import CallError

from .profiles import FALLBACK, VaceProfile

_FLOAT_MAX = sys.float_info.max
_BATCH_ITEM = "[C, F, H, W]"
_CONTEXT = "[B, C, F, H, W]"


def several_contexts(context: Any) -> bool:
    """Whether ``context`` is a list of contexts (its first item a 5-D tensor or a list)."""
    if not isinstance(context, (list, tuple)) or not context:
        return False
    first = context[0]
    return isinstance(first, (list, tuple)) or (isinstance(first, torch.Tensor) and first.dim() == 5)


def check_inputs(inputs: dict[str, Any], latent: Any, model: nn.Module, family: VaceProfile, vace_in_dim: int,
                 count: int | None) -> dict[str, Any]:
    """The family's two inputs, checked against the latent and the model and normalised.

    ``count`` is the number of VACE layers, ``None`` before the blocks are matched on a model
    that declares no block count (``surgery.apply`` checks its example call then).

    Raises:
        CallError: one line naming the input and the fix.
    """
    context_name, scale_name = family.context_input, family.scale_input
    context, scale = inputs.get(context_name), inputs.get(scale_name, 1.0)
    dtype = _branch_dtype(model, latent, family)
    if not several_contexts(context):
        # Checked even without a context, so a bad scale fails on the first call, not later.
        scales = _layer_scales(scale, count, dtype, scale_name, model)
        if context is None:
            return {context_name: None, scale_name: None}
        check_context(context, context_name, latent, vace_in_dim, model, top_level=True)
        return {context_name: context, scale_name: scales}
    items = list(context)
    for j, item in enumerate(items):
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            raise CallError(f"{context_name}[{j}] has shape {tuple(item.shape)} but {context_name}[0] is a whole "
                            f"context: a list holds several contexts ({_CONTEXT} tensors or lists of "
                            f"{_BATCH_ITEM} tensors) or one context's batch elements ({_BATCH_ITEM} tensors), "
                            f"not both", f"give every context its batch dimension ({context_name}[{j}].unsqueeze(0))")
        check_context(item, f"{context_name}[{j}]", latent, vace_in_dim, model, top_level=False)
    scales = _context_scales(scale, len(items), count, dtype, family, model)
    if len(items) == 1:
        return {context_name: items[0], scale_name: scales[0]}
    return {context_name: tuple(zip(items, scales)), scale_name: None}


def check_context(context: Any, name: str, latent: Any, vace_in_dim: int, model: nn.Module, *,
                  top_level: bool) -> None:
    """One context (a 5-D tensor or a list of 4-D ones) against the latent.

    ``top_level``: ``context`` is the input itself, so a 5-D item in its list may be a
    context of several, and is refused as ambiguous rather than as misshapen.
    """
    latent_5d = isinstance(latent, torch.Tensor) and latent.dim() == 5
    if isinstance(context, torch.Tensor) and context.dim() != 5:
        want = f"[{latent.shape[0]}, {vace_in_dim}, F, {latent.shape[3]}, {latent.shape[4]}]" \
            if latent_5d else f"[B, {vace_in_dim}, F, H, W]"
        raise CallError(f"{name} has shape {tuple(context.shape)}, expected a batched {want} tensor "
                        f"for the latent of shape {tuple(latent.shape) if isinstance(latent, torch.Tensor) else '?'}",
                        f"add the batch dimension ({name}.unsqueeze(0)) or pass a list of {_BATCH_ITEM} tensors")
    if not isinstance(context, (list, tuple, torch.Tensor)):
        raise CallError(f"{name} must be a tensor or a list of tensors, got {type(context).__name__}",
                        f"pass a {_CONTEXT} tensor")
    items = list(context)
    if not items:
        raise CallError(f"{name} is empty", f"pass a {_CONTEXT} tensor or one {_BATCH_ITEM} tensor per batch "
                        f"element" + (f", or {name}=None to run without VACE" if top_level else ""))
    for i, item in enumerate(items):
        if top_level and i > 0 and (isinstance(item, (list, tuple))
                                    or isinstance(item, torch.Tensor) and item.dim() == 5):
            shown = tuple(item.shape) if isinstance(item, torch.Tensor) else f"a {type(item).__name__}"
            raise CallError(f"{name}[{i}] is {shown} but {name}[0] is one batch element {_BATCH_ITEM}: a list holds "
                            f"one context's batch elements or several contexts ({_CONTEXT} each), not both",
                            f"pass {_BATCH_ITEM} tensors only, or several contexts as a list of {_CONTEXT} tensors")
        _check_batch_item(item, f"{name}[{i}]", latent, vace_in_dim, model)
    if latent_5d and len(items) != latent.shape[0]:
        raise CallError(f"{name} has {len(items)} entries for a batch of {latent.shape[0]}",
                        "give one context per batch element")


def _check_batch_item(item: Any, name: str, latent: Any, vace_in_dim: int, model: nn.Module) -> None:
    if not isinstance(item, torch.Tensor) or item.dim() != 4:
        shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
        raise CallError(f"{name} has shape {shape}, expected [channels, frames, height, width]",
                        f"pass a {_CONTEXT} tensor or a list of {_BATCH_ITEM} tensors")
    if not item.is_floating_point():
        raise CallError(f"{name} has dtype {item.dtype}, expected a floating-point tensor",
                        "pass the encoded control latents and masks as floats (they are cast to the model's dtype)")
    if item.is_meta and model_on_meta(model) is False:
        raise CallError(f"{name} is on the meta device but the model's weights are on "
                        f"{next(model.parameters()).device}",
                        "pass real tensors on the model's device (meta tensors hold no values)")
    if item.shape[1] == 0:
        raise CallError(f"{name} of shape {tuple(item.shape)} has 0 frames",
                        "give at least one control frame (a shorter context is zero-padded)")
    if isinstance(latent, torch.Tensor) and latent.dim() == 5:
        want = (vace_in_dim, latent.shape[3], latent.shape[4])
        got = (item.shape[0], item.shape[2], item.shape[3])
        if got != want:
            raise CallError(
                f"{name} of shape {tuple(item.shape)} does not fit the latent of shape {tuple(latent.shape)}: "
                f"expected {vace_in_dim} channels and a {latent.shape[3]}x{latent.shape[4]} grid",
                "encode the control frames at the latent's resolution with vace_in_dim channels")


def _context_scales(scale: Any, contexts: int, count: int | None, dtype: torch.dtype | None,
                    family: VaceProfile, model: nn.Module) -> list[tuple[float, ...]]:
    """One tuple of per-layer floats per context."""
    name, context_name = family.scale_input, family.context_input
    per_layer = f"{count} per-layer values" if count is not None else "per-layer values"
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise CallError(f"{name} is a tensor of shape {tuple(scale.shape)} but {context_name} holds {contexts} "
                            f"contexts: a tensor reads as one value per VACE layer, not one entry per context",
                            f"pass a float or a list with one entry per context, each a float or {per_layer}")
        scale = scale.item()
    if scale is None or isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return [_layer_scales(scale, count, dtype, name, model)] * contexts
    if not isinstance(scale, (list, tuple)):
        raise CallError(f"{name} must be a number or a list with one entry per context, got {type(scale).__name__}",
                        f"pass a float or {contexts} entries, each a float or {per_layer}")
    if len(scale) != contexts:
        raise CallError(f"{name} has {len(scale)} entries for the {contexts} contexts in {context_name}",
                        f"pass a float, or exactly {contexts} entries (one per context), each a float or {per_layer}")
    return [_layer_scales(value, count, dtype, f"{name}[{j}]", model) for j, value in enumerate(scale)]


def _layer_scales(scale: Any, count: int | None, dtype: torch.dtype | None, name: str,
                  model: nn.Module) -> tuple[float, ...]:
    if count is not None:
        return normalise_scale(scale, count, dtype, name=name)
    # Before the blocks are matched the number of VACE layers is unknown. The traced graph
    # reads the scale by layer index, and each layer belongs to a distinct module, so a
    # number repeated once per module covers every index; a per-layer list cannot be checked.
    if isinstance(scale, (list, tuple)) or isinstance(scale, torch.Tensor) and scale.dim() > 0:
        raise CallError(f"{name} gives per-layer values, but the model declares no block count, so the number "
                        f"of VACE layers is not known until its blocks are matched",
                        "pass a float in the example call, or num_layers=... or vace_layers=[...] to the VACE rule")
    return normalise_scale(scale, sum(1 for _ in model.modules()), dtype, name=name)


def normalise_scale(scale: Any, count: int, dtype: torch.dtype | None = None, *,
                    name: str = FALLBACK.scale_input) -> tuple[float, ...]:
    """A float (``None`` = 1.0) or one value per VACE layer, all finite (in ``dtype`` when given:
    the hints are scaled in the model's dtype, where 1e300 is inf for float32). ``name`` is
    the input's name in errors."""
    if scale is None:
        scale = 1.0
    if isinstance(scale, torch.Tensor):
        scale = scale.tolist()
    values = [scale] * count if isinstance(scale, (int, float)) and not isinstance(scale, bool) else list(scale) \
        if isinstance(scale, (list, tuple)) else None
    if values is None:
        raise CallError(f"{name} must be a number or a sequence, got {type(scale).__name__}",
                        "pass a float or one float per VACE layer")
    if len(values) != count:
        raise CallError(f"{name} has {len(values)} values for {count} VACE layers",
                        f"pass a float or exactly {count} values")
    # A comparison, not math.isfinite: that raises OverflowError on an int such as 10**400.
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _FLOAT_MAX for v in values):
        raise CallError(f"{name} {values} is not all finite numbers", "use finite floats")
    if dtype is not None and dtype.is_floating_point:
        largest = torch.finfo(dtype).max
        if any(abs(v) > largest for v in values):
            raise CallError(f"{name} {values} is not all finite numbers in the model's dtype {dtype} "
                            f"(largest {largest:.6g})", f"use floats of magnitude at most {largest:.6g}")
    return tuple(float(v) for v in values)


def _branch_dtype(model: nn.Module, latent: Any, family: VaceProfile) -> torch.dtype | None:
    """The dtype the hints are scaled in: the grafted branch's (the latent's before grafting)."""
    weight = getattr(getattr(model, family.patch_embedding, None), "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    return latent.dtype if isinstance(latent, torch.Tensor) and latent.is_floating_point() else None


__all__ = ["check_context", "check_inputs", "normalise_scale", "several_contexts"]
