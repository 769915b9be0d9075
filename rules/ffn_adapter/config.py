"""The options of the ``ffn-adapter`` rule, as one documented, validated dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from surgery.errors import RuleError

from ..positions import checked_positions

#: ``activation`` values and the layer each builds.
ACTIVATIONS: dict[str, type[nn.Module] | tuple[type[nn.Module], dict]] = {
    "gelu": nn.GELU,
    "gelu_tanh": (nn.GELU, {"approximate": "tanh"}),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class FfnAdapterConfig:
    """A bottleneck adapter after feed-forward units (Houlsby-style, as PEFT configures adapters).

    Each adapted FFN's output ``y`` becomes ``y + up(act(down(y)))``, with ``down: dim ->
    bottleneck_dim`` and ``up: bottleneck_dim -> dim``. ``up`` starts at zero, so a fresh
    adapter is an exact identity.

    Attributes:
        bottleneck_dim: width of the bottleneck (``down``'s output features), at least 1.
        activation: the nonlinearity between the projections: one of :data:`ACTIVATIONS`.
        layers: which FFNs get an adapter, as positions in execution order (0 = the first
            FFN the model runs); ``None``: every FFN. Sorted, unique, non-negative; any
            sequence is accepted and kept as a tuple.
        num_ffns: the number of FFNs the model must have (a check: a different count is an
            error naming the nearest candidates); ``None``: any number, at least one.
    """

    bottleneck_dim: int = 16
    activation: str = "gelu"
    layers: Optional[tuple[int, ...]] = None
    num_ffns: Optional[int] = None

    def __post_init__(self) -> None:
        if not _positive(self.bottleneck_dim):
            raise RuleError(f"bottleneck_dim must be a positive integer, got {self.bottleneck_dim!r}",
                            "e.g. bottleneck_dim=16")
        if self.activation not in ACTIVATIONS:
            raise RuleError(f"unknown activation {self.activation!r}", f"use one of {', '.join(ACTIVATIONS)}")
        if self.num_ffns is not None and not _positive(self.num_ffns):
            raise RuleError(f"num_ffns must be a positive integer, got {self.num_ffns!r}",
                            "omit it to accept any number of FFNs")
        if self.layers is not None:
            object.__setattr__(self, "layers", checked_positions(self.layers, "FFN"))
            self.check_range(self.num_ffns)

    def check_range(self, count: Optional[int]) -> None:
        """Refuse ``layers`` beyond ``count`` FFNs (a known count: the option, or the matches)."""
        if count is not None and self.layers and self.layers[-1] >= count:
            raise RuleError(f"layers {list(self.layers)} is out of range for {count} FFNs",
                            f"use positions 0..{count - 1}")

    def chosen(self, count: int) -> tuple[int, ...]:
        """The positions of the adapted FFNs among ``count`` matched ones."""
        self.check_range(count)
        return tuple(range(count)) if self.layers is None else self.layers

    def activation_layer(self) -> nn.Module:
        spec = ACTIVATIONS[self.activation]
        cls, kwargs = spec if isinstance(spec, tuple) else (spec, {})
        return cls(**kwargs)


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


__all__ = ["ACTIVATIONS", "FfnAdapterConfig"]
