"""``attention-swap`` written by hand: hooks on each swapped unit rebind its module's attention
functions for the duration of its call.

This is how the swap is written without surgery (``module.attention = my_kernel`` around the
call), so it shares neither the rule's mechanism (a per-class forward with its own globals) nor
its layout adapter. Validation (``surgery validate MODEL --rule attention-swap``) compares the
rewritten model with it; the hooks add no modules, so every name is the model's. It writes
module globals while it runs, so it is for validation only: a base model of the same module running at the same time would see the kernel too.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from surgery.matching.matcher import Match
from surgery.rule import Reference


def by_hand(kernel: Callable[..., torch.Tensor], layout: str) -> Callable[..., torch.Tensor]:
    """``kernel`` called the way the model calls a function of ``layout``: ``q, k, v`` (named
    ``query, key, value`` too) and a flex ``score_mod`` (an additive bias) and ``block_mask``,
    evaluated per element with ``vmap`` as flex evaluates them; other arguments are not expected."""
    def call(q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
             query: Optional[torch.Tensor] = None, key: Optional[torch.Tensor] = None,
             value: Optional[torch.Tensor] = None, score_mod: Any = None, block_mask: Any = None,
             kernel_options: Any = None) -> torch.Tensor:
        q, k, v = (a if a is not None else b for a, b in ((q, query), (k, key), (v, value)))
        if layout == "BLHD":
            q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        options = {}
        if score_mod is not None or block_mask is not None:
            bias = _per_element(score_mod or (lambda s, b, h, i, j: s), q, k)
            if block_mask is not None:
                allowed = _per_element(lambda s, b, h, i, j: block_mask.mask_mod(b, h, i, j), q, k)
                bias = bias.masked_fill(~allowed, float("-inf"))
            options["attn_mask"] = bias.to(q.dtype)
        out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), **options)
        return (out if layout == "BHLD" else out.permute(0, 2, 1, 3).contiguous()).to(q.dtype)
    return call


def _per_element(mod: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``mod(0, b, h, i, j)`` for every element of [B, H, Lq, Lk]."""
    sizes = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    fn = lambda b, h, i, j: mod(torch.zeros((), dtype=q.dtype), b, h, i, j)  # noqa: E731
    for dim in (3, 2, 1, 0):  # innermost index first, so the result is [B, H, Lq, Lk]
        fn = torch.vmap(fn, in_dims=tuple(None if d != dim else 0 for d in range(4)))
    return fn(*(torch.arange(n) for n in sizes))


class KernelSwapped:
    """Forward hooks that make ``replacements`` the module-level functions of a unit while it runs.

    ``KernelSwapped(replacements).install(unit)`` adds them (a pre-hook rebinds, a hook
    restores); the unit keeps its path, class and code, so the reference's names are the
    model's. One instance serves all units with the same hook objects, so identical blocks
    stay identical to the tracer.
    """

    def __init__(self, replacements: Mapping[str, Callable[..., Any]]) -> None:
        self.replacements = dict(replacements)
        self.saved: list[dict[str, Any]] = []
        self.rebind_hook, self.restore_hook = self.rebind, self.restore  # one bound object each

    def install(self, unit: nn.Module) -> nn.Module:
        unit.register_forward_pre_hook(self.rebind_hook)
        unit.register_forward_hook(self.restore_hook)
        return unit

    def rebind(self, module: nn.Module, args: Any) -> None:
        scope = type(module).forward.__globals__
        self.saved.append({name: scope[name] for name in self.replacements})
        scope.update(self.replacements)

    def restore(self, module: nn.Module, args: Any, output: Any) -> None:
        type(module).forward.__globals__.update(self.saved.pop())


def reference(kernel: Callable[..., torch.Tensor], targets: Mapping[str, str],
              units: Callable[[Sequence[Match]], dict[str, str]]) -> Reference:
    """The hand-written rule for :class:`~surgery.rule.Rule.reference`; ``units(matches)`` gives
    the swapped units' paths (matched block -> its self-attention module)."""

    def build(base: nn.Module, matches: Sequence[Match]) -> nn.Module:
        hooks: dict[type, KernelSwapped] = {}
        for path in units(matches).values():
            unit = base.get_submodule(path)
            if type(unit) not in hooks:
                scope = type(unit).forward.__globals__
                hooks[type(unit)] = KernelSwapped({alias: by_hand(kernel, layout) for target, layout in targets.items()
                                                   if callable(scope.get(target))
                                                   for alias, value in scope.items() if value is scope[target]})
            hooks[type(unit)].install(unit)
        return base

    def to_native(name: str, matches: Sequence[Match]) -> Optional[str]:
        return name  # the hooks add no modules: the reference's names are the model's

    return Reference(build, to_native)


__all__ = ["KernelSwapped", "by_hand", "reference"]
