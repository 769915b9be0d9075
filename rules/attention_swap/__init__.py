"""The ``attention-swap`` rule: another kernel (SDPA, sage, flash...) for the core attention of
every self-attention unit, with the unit's cache writes untouched.

* :mod:`.config`: the options (:class:`AttentionSwapConfig`);
* :mod:`.kernels`: kernels by name and the layout adapter (:class:`KernelCall`);
* :mod:`.swap`: how a unit's forward is given the kernel (a per-class forward with its own globals);
* :mod:`.rule`: the rule itself (:func:`rule`), registered as ``attention-swap`` in ``rules.RULES``;
* :mod:`.reference`: the rule written by hand (:class:`KernelSwapped`), which validation compares with.
"""
from __future__ import annotations

from .config import DEFAULT_TARGETS, AttentionSwapConfig
from .kernels import KERNELS, LAYOUTS, KernelCall, resolve_kernel
from .reference import KernelSwapped
from .rule import NAME, rule
from .swap import original_class, swapped_class, swapped_names

__all__ = ["DEFAULT_TARGETS", "KERNELS", "LAYOUTS", "NAME", "AttentionSwapConfig", "KernelCall", "KernelSwapped",
           "original_class", "resolve_kernel", "rule", "swapped_class", "swapped_names"]
