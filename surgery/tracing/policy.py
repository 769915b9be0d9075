"""What the tracer keeps opaque.

Symbolic tracing fails inside attention kernels and cache bookkeeping (``.item()`` on
cache indices, in-place slice writes, dict entry replacement). Those parts must also run
exactly as in eager mode, because they mutate the caller's caches. The policy names them
by *role*, never by class name:

* a **stateful leaf** is the innermost module whose ``forward`` takes a cache argument
  (self-attention and cross-attention in the Wan family): it is recorded as one
  ``call_module`` node and runs eagerly;
* a **cache helper** is a method other than ``forward`` that takes a cache argument
  (deferred cache updates, bank pre-passes): it is recorded as one ``call_method`` node.
  The first cache-taking method that the root's ``forward`` calls is the implementation
  it dispatches to, and is traced through.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import lru_cache

import torch.nn as nn


@lru_cache(maxsize=None)
def _parameter_names(fn: object) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return frozenset()


def _is_torch_builtin(module: nn.Module) -> bool:
    # Built-in layers (Linear, Conv3d, GELU, ...) stay call_module nodes so that PEFT can
    # wrap them after surgery; containers are traced through.
    kind = type(module)
    return kind.__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


def _is_peft_layer(module: nn.Module) -> bool:
    # PEFT's LoRA layers branch on Python state in forward; they wrap a built-in layer
    # and must stay leaves like it.
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft")
               for c in type(module).__mro__)


@dataclass(frozen=True)
class TracePolicy:
    """Which modules and methods the tracer records as opaque calls.

    Args:
        cache_arguments: parameter names that carry mutable cache state.
        extra_leaves: qualified module names that must be leaves regardless of role.
    """

    cache_arguments: frozenset[str] = field(default_factory=frozenset)
    extra_leaves: frozenset[str] = field(default_factory=frozenset)

    def takes_cache(self, fn: object) -> bool:
        return bool(self.cache_arguments & _parameter_names(fn))

    def is_leaf(self, module: nn.Module, qualname: str) -> bool:
        if _is_torch_builtin(module) or _is_peft_layer(module) or qualname in self.extra_leaves:
            return True
        if not self.takes_cache(type(module).forward):
            return False
        # Innermost: no child also takes a cache, so the block around it stays visible.
        return not any(self.takes_cache(type(child).forward) for child in module.children())

    def cache_helpers(self, module: nn.Module) -> list[str]:
        """Names of methods of ``module`` (other than ``forward``) that take a cache."""
        return list(_cache_helpers(type(module), self.cache_arguments))


@lru_cache(maxsize=None)
def _cache_helpers(cls: type, cache_arguments: frozenset[str]) -> tuple[str, ...]:
    # Per class, not per module: a 40-block model would otherwise inspect every block.
    return tuple(name for name, fn in inspect.getmembers(cls, inspect.isfunction)
                 if name != "forward" and not name.startswith("__") and cache_arguments & _parameter_names(fn))
