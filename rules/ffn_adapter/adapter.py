"""The grafted module: a bottleneck adapter computing the residual branch ``up(act(down(y)))``."""
from __future__ import annotations

import torch
import torch.nn as nn

from surgery.grafting.build import allocate, skipped_init


class BottleneckAdapter(nn.Module):
    """``up(act(down(y)))``: the branch an adapted FFN's output ``y`` gets added to it.

    State dict keys: ``down.weight``, ``down.bias``, ``up.weight``, ``up.bias``.
    """

    def __init__(self, dim: int, bottleneck_dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck_dim)
        self.act = activation
        self.up = nn.Linear(bottleneck_dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(y)))


def build_adapter(dim: int, bottleneck_dim: int, activation: nn.Module, *, like: torch.Tensor,
                  init: str) -> BottleneckAdapter:
    """An adapter on ``like``'s device and dtype whose ``up`` projection is zero.

    ``init="zeros"``: every tensor zero (weights are loaded afterwards); ``"default"``: ``down``
    gets ``nn.Linear``'s own init, so the adapter can be trained from its identity start. On the
    meta device (a model planned, not built) nothing is allocated.
    """
    with torch.device("meta"), skipped_init():
        adapter = BottleneckAdapter(dim, bottleneck_dim, activation)
    if like.device.type == "meta":
        return adapter
    allocate(adapter, device=like.device, dtype=like.dtype, init=init)
    if init != "zeros":  # "zeros" already left every tensor zero
        with torch.no_grad():
            adapter.up.weight.zero_()
            adapter.up.bias.zero_()
    return adapter


__all__ = ["BottleneckAdapter", "build_adapter"]
