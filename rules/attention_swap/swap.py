"""The swap itself: a unit's ``forward`` run with its attention functions bound to the kernel.

The self-attention units of streaming models are stateful leaves: they run eagerly as one
call and own their cache writes, so the graph cannot reach the attention call inside them.
What the rule changes instead is the function the unit's code looks up: the unit's class
in the rewritten model (never in the user's) becomes a subclass whose ``forward`` is the
same code object with its own globals, in which each target name (and every alias of that
function object in the module) is a :class:`~rules.attention_swap.kernels.KernelCall`.
Everything else in the forward, cache writes included, is the original code. Other users
of the module (the base model, cross-attention classes) keep the original functions: no
module global is ever written, and the module's other globals are read live.

Limits: only calls the unit's own ``forward`` makes by global name (nested functions
included) are swapped; a kernel reached through an attribute (``F.scaled_dot_product_attention``)
or through another function is not.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Iterator, Mapping

import torch.nn as nn

from .kernels import KernelCall


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_names(const)


def swapped_names(forward: Any, targets: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Global names ``forward`` reads that hold a target function: name -> (target, layout).

    A target counts when ``forward`` names it; every global name bound to the same object
    (an alias) is swapped with it.
    """
    scope = forward.__globals__
    named = set(_code_names(forward.__code__))
    objects = {id(scope[name]): (name, layout) for name, layout in targets.items()
               if name in named and callable(scope.get(name))}
    return {name: objects[id(value)] for name, value in scope.items() if id(value) in objects}


class _Globals(dict):
    """The swapped names, over the module's own globals read live (a later rebinding of any
    other global, a flag or a helper, is seen as by the original forward)."""

    def __init__(self, module_globals: dict, swapped: Mapping[str, Any]) -> None:
        super().__init__(swapped)
        self.module_globals = module_globals

    def __missing__(self, name: str) -> Any:
        return self.module_globals[name]  # a KeyError here makes Python look in builtins


_CLASSES: dict[tuple, type] = {}


def swapped_class(cls: type, calls: tuple[KernelCall, ...], names: Mapping[str, str]) -> type:
    """A subclass of ``cls`` (same name) whose ``forward`` finds ``calls`` (keyed by ``names``: global -> target) under its
    target names; one class per (class, swap), so identical blocks stay identical."""
    key = (cls, calls, tuple(sorted(names.items())))
    if key not in _CLASSES:
        forward = cls.forward
        by_target = {call.name: call for call in calls}
        scope = _Globals(forward.__globals__, {name: by_target[target] for name, target in names.items()})
        code = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__, forward.__closure__)
        code.__kwdefaults__ = forward.__kwdefaults__
        code.__qualname__ = forward.__qualname__
        body = {"forward": code, "__module__": cls.__module__, "__reduce_ex__": _reduce,
                "_attention_swap": (cls, calls, dict(names))}
        # The original's name: reports and validation's graph comparison label a call by its
        # class name, and the unit is the same module with another kernel inside.
        swapped = type(cls.__name__, (cls,), body)
        swapped.__qualname__ = cls.__qualname__
        _CLASSES[key] = swapped
    return _CLASSES[key]


def original_class(module: nn.Module) -> type:
    """The class a swapped unit had before the swap (its own class when not swapped)."""
    swap = type(module).__dict__.get("_attention_swap")
    return swap[0] if swap is not None else type(module)


def _reduce(self: nn.Module, protocol: Any) -> tuple:
    # The class is made at run time: pickle the original class and the swap, rebuild on load.
    cls, calls, names = type(self)._attention_swap
    return (_restore, (cls, calls, names), dict(self.__getstate__()))


def _restore(cls: type, calls: tuple[KernelCall, ...], names: dict[str, str]) -> nn.Module:
    return object.__new__(swapped_class(cls, calls, names))


__all__ = ["original_class", "swapped_class", "swapped_names"]
