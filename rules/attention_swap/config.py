"""The options of the ``attention-swap`` rule, as one documented, validated dataclass."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from surgery.errors import RuleError

from ..positions import checked_positions

from .kernels import KERNELS, LAYOUTS

#: The attention functions swapped by default, by the name the model's code calls them, and
#: the layout of that call (flash-attention style ``attention``/``flash_attention`` take ``[B, L, heads, d]``,
#: ``flex_attention`` ``[B, heads, L, d]``).
DEFAULT_TARGETS: dict[str, str] = {"attention": "BLHD", "flash_attention": "BLHD", "flex_attention": "BHLD"}


@dataclass(frozen=True)
class AttentionSwapConfig:
    """Another kernel for the core attention of self-attention units (SDPA, sage, flash...).

    Inside each swapped unit, every call of a target function (by the name the unit's
    ``forward`` uses, and every other name of the module bound to the same function object)
    goes to ``kernel`` instead, through a layout adapter; the unit's other code (projections,
    RoPE, cache writes) runs unchanged.

    Attributes:
        kernel: the attention kernel, called like ``scaled_dot_product_attention``:
            ``kernel(q, k, v, *, scale=..., is_causal=..., dropout_p=..., attn_mask=...)`` on
            ``[batch, heads, tokens, head_dim]`` (only the keywords the model passes are
            given); or the name of one in :data:`~rules.attention_swap.kernels.KERNELS`
            (``"sdpa"``, the default; ``"sdpa-float64"``, SDPA in float64 rounded back).
        targets: the functions to swap: the name the unit's code calls each by, and the
            layout of that call (``"BLHD"``: ``[B, L, heads, d]``; ``"BHLD"``: ``[B, heads, L,
            d]``). Default :data:`DEFAULT_TARGETS`. A ``flex_attention`` call's ``block_mask`` and
            (additive) ``score_mod`` reach the kernel as a dense ``attn_mask``
            (:func:`~rules.attention_swap.kernels.dense_mask`).
        layers: which self-attention units are swapped, as block positions in execution
            order (0 = the first block); ``None``: every one. Sorted, unique, non-negative.
    """

    kernel: Union[str, Callable[..., Any]] = "sdpa"
    targets: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TARGETS))
    layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not callable(self.kernel) and self.kernel not in KERNELS:
            raise RuleError(f"unknown kernel {self.kernel!r}",
                            f"pass a callable or one of {', '.join(map(repr, KERNELS))}")
        if not isinstance(self.targets, Mapping) or not self.targets:
            raise RuleError(f"targets must map function names to layouts, got {self.targets!r}",
                            "e.g. targets={'attention': 'BLHD'}")
        for name, layout in self.targets.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise RuleError(f"target {name!r} is not a function name", "e.g. targets={'attention': 'BLHD'}")
            if layout not in LAYOUTS:
                raise RuleError(f"target {name!r} has layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")
        object.__setattr__(self, "targets", dict(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", checked_positions(self.layers, "block"))

    def chosen(self, count: int) -> tuple[int, ...]:
        """The positions of the swapped units among ``count`` matched blocks."""
        if self.layers and self.layers[-1] >= count:
            raise RuleError(f"layers {list(self.layers)} is out of range for {count} blocks",
                            f"use positions 0..{count - 1}")
        return tuple(range(count)) if self.layers is None else self.layers


__all__ = ["DEFAULT_TARGETS", "AttentionSwapConfig"]
