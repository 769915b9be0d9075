"""``ffn-adapter`` written by hand: each adapted FFN wrapped in a module that adds its adapter.

Validation (``surgery validate MODEL --rule ffn-adapter``) compares the rewritten model with
this reference: the same module tree, with ``<ffn>`` replaced by ``AdaptedFFN(unit=<ffn>,
adapter=...)``, so its names map to the rewritten model's (``<ffn>.unit.*`` -> ``<ffn>.*``,
``<ffn>.adapter.*`` -> ``<ffn>_adapter.*``; the wrapper itself has no counterpart).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from surgery.matching.matcher import Match
from surgery.rule import Reference

from .adapter import build_adapter
from .config import FfnAdapterConfig

#: Suffix of an adapter's path after its FFN's (``blocks.3.ffn`` -> ``blocks.3.ffn_adapter``).
SUFFIX = "_adapter"


def adapter_path(ffn_path: str) -> str:
    """Where the rewritten model keeps the adapter of the FFN at ``ffn_path``."""
    return ffn_path + SUFFIX


class AdaptedFFN(nn.Module):
    """An FFN followed by its adapter, as a residual: ``y = unit(x); y + adapter(y)``."""

    def __init__(self, unit: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.unit = unit
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.unit(*args, **kwargs)
        return y + self.adapter(y)


def first_linear(ffn: nn.Module) -> Optional[nn.Linear]:
    """The FFN's input projection (its first ``nn.Linear``), which sizes the adapter."""
    return next((m for m in ffn.modules() if isinstance(m, nn.Linear)), None)


def reference(config: FfnAdapterConfig) -> Reference:
    """The hand-written rule for :class:`~surgery.rule.Rule.reference`."""

    def build(base: nn.Module, matches: Sequence[Match]) -> nn.Module:
        for match in matches:
            if match.index is None:
                continue
            parent, _, name = match.name.rpartition(".")
            owner = base.get_submodule(parent)
            ffn = getattr(owner, name)
            linear = first_linear(ffn)
            adapter = build_adapter(linear.in_features, config.bottleneck_dim, config.activation_layer(),
                                    like=linear.weight, init="zeros")
            setattr(owner, name, AdaptedFFN(ffn, adapter))
        return base

    def to_native(name: str, matches: Sequence[Match]) -> Optional[str]:
        for match in matches:
            if match.index is None:
                continue
            path = match.name + "."
            if name == path:
                return None  # the wrapper: only the reference has it
            for child, native in (("unit.", path), ("adapter.", adapter_path(match.name) + ".")):
                if name.startswith(path + child):
                    return native + name[len(path + child):]
        return name

    return Reference(build, to_native)


__all__ = ["SUFFIX", "AdaptedFFN", "adapter_path", "first_linear", "reference"]
