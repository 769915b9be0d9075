"""VACE written by hand with forward hooks, the way a user adds it to a model they own.

The maths is examples/reference.py's (vace.md 2.1-2.5): ``vace_patch_embedding`` on each
``vace_context`` item, zero-padded or cut to the chunk's tokens; VACE block 0 adds
``before_proj(c)`` to the patch-embedded latent ``x0`` (block 0's input); each VACE block
runs without caches and gives ``after_proj(c)`` as a hint; main block ``vace_layers[k]``
returns ``x + hint_k * scale_k`` (only ``x`` when the block returns a tuple). Each corpus
model says by hand how its block runs without caches (``vace_block_call``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

BlockCall = Callable[[nn.Module, torch.Tensor, tuple, dict], Any]


class HookedVace(nn.Module):
    """``base`` with a VACE branch attached through hooks on its own blocks."""

    def __init__(self, base: nn.Module, blocks: Sequence[nn.Module], patch_embedding: nn.Conv3d,
                 make_block: Callable[[], nn.Module], block_call: BlockCall, vace_in_dim: int,
                 vace_layers: Sequence[int], projections: tuple[str, str] = ("before_proj", "after_proj")) -> None:
        super().__init__()
        self.base = base
        dim = patch_embedding.out_channels
        self.vace_patch_embedding = nn.Conv3d(vace_in_dim, dim, kernel_size=patch_embedding.kernel_size,
                                              stride=patch_embedding.stride)
        self.vace_blocks = nn.ModuleList()
        self._before, self._after = projections  # checkpoint names differ between model families
        for k in range(len(vace_layers)):
            block = make_block()
            if k == 0:
                block.add_module(self._before, nn.Linear(dim, dim))
            block.add_module(self._after, nn.Linear(dim, dim))
            self.vace_blocks.append(block)
        self._block_call = block_call
        self._context: Any = None
        self._scale: tuple[float, ...] = ()
        self._hints: list[torch.Tensor] | None = None
        blocks[0].register_forward_pre_hook(self._compute_hints, with_kwargs=True)
        for k, layer in enumerate(vace_layers):
            blocks[layer].register_forward_hook(self._injector(k))

    def forward(self, *args: Any, vace_context: Any = None, vace_context_scale: Any = 1.0, **kwargs: Any) -> Any:
        count = len(self.vace_blocks)
        scale = vace_context_scale if isinstance(vace_context_scale, (list, tuple)) else [vace_context_scale] * count
        self._context, self._scale, self._hints = vace_context, tuple(float(s) for s in scale), None
        try:
            return self.base(*args, **kwargs)
        finally:
            self._context, self._hints = None, None

    def _compute_hints(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._context is None:
            return None
        x0 = args[0]
        tokens = x0.size(1)
        pieces = []
        for item in self._context:
            c = self.vace_patch_embedding(item.unsqueeze(0)).flatten(2).transpose(1, 2)
            if c.size(1) < tokens:
                c = torch.cat([c, c.new_zeros(1, tokens - c.size(1), c.size(2))], dim=1)
            pieces.append(c[:, :tokens])
        c = torch.cat(pieces)
        hints = []
        for k, vace_block in enumerate(self.vace_blocks):
            if k == 0:
                c = getattr(vace_block, self._before)(c) + x0
            out = self._block_call(vace_block, c, args, kwargs)
            c = out[0] if isinstance(out, (tuple, list)) else out
            hints.append(getattr(vace_block, self._after)(c))
        self._hints = hints
        return None

    def _injector(self, k: int) -> Callable[..., Any]:
        def inject(block: nn.Module, args: tuple, output: Any) -> Any:
            if self._hints is None:
                return None
            x = output[0] if isinstance(output, tuple) else output
            x = x + self._hints[k][:, : x.size(1)] * self._scale[k]
            return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x
        return inject


def random_vace_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Non-zero values for every ``vace_*`` tensor of ``model`` (small, so activations stay finite)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(tensor.shape, generator=generator) * 0.2
            for name, tensor in model.state_dict().items() if name.startswith("vace_")}
