"""A lean hand-written VACE for the benchmark: forward hooks on the base model, nothing else.

The hand-written reference (``examples.reference.CausalVaceWanModel``) follows upstream and
pads the VACE context to ``seq_len`` on every call (32,760 tokens at 1.3B) before block 0
cuts it back to the chunk; that pad alone makes the rewritten model look faster than it is.
This version does what a careful user would write by hand, so the benchmark can also say
what surgery costs against the leanest equivalent:

* a forward pre-hook on the model takes ``vace_context`` and ``vace_context_scale`` out of the
  call (the base model does not accept them);
* a forward pre-hook on block 0 embeds the context, pads it only to the chunk's tokens and runs
  the VACE blocks on ``x0`` and block 0's own keyword arguments, giving one hint per VACE layer;
* a forward hook on each main block that receives a hint adds ``hint * scale`` to its output.

The VACE blocks are those of the reference (``create_vace_attention_block_class``, built
with the reference's duck-typed constructor arguments), registered on the base model as
``vace_blocks`` and ``vace_patch_embedding``, so its state dict has the native checkpoint
names. No wrapper class, no surgery; the library never imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from examples.reference import CausalVaceWanModel, create_vace_attention_block_class
from surgery.errors import CallError, GraftError, RuleError

__all__ = ["LeanVace", "attach_lean_vace"]

#: Block keyword arguments the VACE branch reads from block 0's call (the cache-free block inputs).
BRANCH_INPUTS = ("e", "seq_lens", "grid_sizes", "freqs", "context", "context_lens", "block_mask")


@dataclass
class LeanVace:
    """What :func:`attach_lean_vace` added: the hooks' handles and the per-call state they share."""

    layers: tuple[int, ...]
    handles: list[Any] = field(default_factory=list)
    context: Any = None  # this call's vace_context (None: VACE off)
    scale: Any = 1.0
    hints: Optional[list[torch.Tensor]] = None

    def remove(self) -> None:
        """Detach every hook (the VACE modules stay registered)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _layer_scale(scale: Any, k: int) -> Any:
    return scale[k] if isinstance(scale, (list, tuple)) else scale


def attach_lean_vace(model: nn.Module, vace_in_dim: int = 96, vace_layers: Sequence[int] | None = None,
                     *, eager_branch: bool = False) -> LeanVace:
    """Add VACE to ``model`` in place with hooks; returns the handle.

    ``vace_layers`` as in the reference (default every second block; VACE block ``k`` feeds
    main block ``vace_layers[k]``). The VACE weights start at zero (load them with
    ``model.load_state_dict(..., strict=False)``). ``eager_branch`` runs the VACE branch
    outside ``torch.compile`` (``torch.compiler.disable``): block 0's pre-hook runs inside
    block 0's compiled call when the blocks are compiled one by one, and the branch would then
    be compiled while the rewritten model's and the reference's VACE blocks run eagerly.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise GraftError(f"{type(model).__name__} has no non-empty ModuleList 'blocks'", "pass a causal Wan model")
    layers = tuple(range(0, len(blocks), 2)) if vace_layers is None else tuple(int(i) for i in vace_layers)
    if 0 not in layers or len(set(layers)) != len(layers) or not all(0 <= i < len(blocks) for i in layers):
        raise RuleError(f"vace_layers={list(layers)} is invalid for a {len(blocks)}-layer model",
                        f"pass distinct indices in [0, {len(blocks)}) that include 0")
    orig_cls = type(blocks[0])
    vace_cls = create_vace_attention_block_class(orig_cls)
    # The reference's constructor arguments, read from the model by duck typing (the same code).
    init_kwargs = CausalVaceWanModel._block_init_kwargs(SimpleNamespace(causal_wan_model=model), orig_cls,
                                                        "t2v_cross_attn")
    anchor = model.patch_embedding.weight
    with torch.device(anchor.device):
        vace_blocks = nn.ModuleList(vace_cls(**init_kwargs, block_id=k) for k in range(len(layers)))
        patch = tuple(model.patch_size)
        embedding = nn.Conv3d(vace_in_dim, model.dim, kernel_size=patch, stride=patch)
    for module in (vace_blocks, embedding):
        module.to(device=anchor.device, dtype=anchor.dtype).requires_grad_(anchor.requires_grad)
    model.add_module("vace_blocks", vace_blocks)
    model.add_module("vace_patch_embedding", embedding)
    state = LeanVace(layers)

    def take_context(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state.context = kwargs.pop("vace_context", None)
        state.scale = kwargs.pop("vace_context_scale", 1.0)
        state.hints = None
        return args, kwargs

    def branch(x0: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        context = state.context
        if isinstance(context, torch.Tensor):
            context = list(context)
        if len(context) != x0.size(0):
            raise CallError(f"vace_context holds {len(context)} items for a batch of {x0.size(0)}",
                            "pass one [C, F, H, W] context per batch element")
        tokens = x0.size(1)
        weight = embedding.weight
        pieces = []
        for u in context:
            c = embedding(u.to(device=weight.device, dtype=weight.dtype).unsqueeze(0)).flatten(2).transpose(1, 2)
            # Pad to the chunk only. The cat runs even with nothing to pad: it also lays the
            # transposed tokens out contiguously, and a matmul on the strided view rounds
            # differently at real sizes (2e-6 at 1.3B), so the outputs would no longer be equal.
            c = torch.cat([c, c.new_zeros(1, max(0, tokens - c.size(1)), c.size(2))], dim=1)
            pieces.append(c[:, :tokens])
        c = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        inputs = [kwargs[name] for name in BRANCH_INPUTS]
        hints = []
        for block in vace_blocks:
            hint, c = block.forward_vace(c, x0, *inputs)
            hints.append(hint)
        return hints

    run_branch = torch.compiler.disable(branch) if eager_branch else branch

    def compute_hints(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if state.context is not None:
            state.hints = run_branch(args[0], kwargs)

    def inject(k: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if state.hints is None:
                return None
            out, info = output if isinstance(output, tuple) else (output, None)
            out = out + state.hints[k] * _layer_scale(state.scale, k)
            return (out, info) if isinstance(output, tuple) else out

        return hook

    def forget(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state.context, state.hints = None, None  # hold no tensors between calls

    state.handles.append(model.register_forward_pre_hook(take_context, with_kwargs=True))
    state.handles.append(blocks[0].register_forward_pre_hook(compute_hints, with_kwargs=True))
    state.handles.extend(blocks[i].register_forward_hook(inject(k)) for k, i in enumerate(layers))
    state.handles.append(model.register_forward_hook(forget, with_kwargs=True))
    return state
