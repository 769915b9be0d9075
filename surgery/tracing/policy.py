"""What the tracer keeps opaque.

Symbolic tracing fails inside attention kernels and cache bookkeeping (``.item()`` on
cache indices, in-place slice writes, dict entry replacement). Those parts must also run
exactly as in eager mode, because they mutate the caller's caches. The policy names them
by *role*, never by class name.

**Caches are recognised by value.** An input of the example call is a cache when it is a
mutable container holding tensors that is not plain data: a dict, a dataclass, a
``namedtuple`` or another object holding tensors, or a list or tuple of those (a list of
latents is data). The rule's profile may name more cache arguments (``cache_arguments``,
for caches such as lists of tensors that look like data). Every object inside a cache is a
*cache value*, wherever the model passes it on and under whatever name.

* a **stateful leaf** is the innermost module called with a cache value, or whose
  ``forward`` has a cache argument: it is recorded as one ``call_module`` node and runs
  eagerly. Innermost means no child module could be handed the cache: every child is a
  built-in layer or takes a single argument. A call that passes ``None`` for every cache
  argument, each the name of one of the call's caches, runs the module's cache-free path
  (a grafted copy of a block run without caches): ordinary code, traced through;
* a **cache helper** is a method, other than ``forward``, called with a cache value (or
  with a named cache argument): it is recorded as one ``call_method`` node and runs
  eagerly, unless it is part of the model's computation: a method that calls the
  module's children *and* is handed a tensor that is not cache state (``forward``
  dispatching to ``_forward_inference(x, ...)``, a ``_run_blocks(x, caches)``) is traced
  through.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from ..dotted import names
from .containers import holds_tensor, is_namedtuple, is_record, reachable


@lru_cache(maxsize=None)
def _parameters(fn: object) -> tuple[inspect.Parameter, ...]:
    try:
        return tuple(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ()


def _parameter_names(fn: object) -> frozenset[str]:
    return frozenset(p.name for p in _parameters(fn))


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


def is_cache_value(value: Any) -> bool:
    """Whether an input value is cache state rather than data (see the module docstring)."""
    if isinstance(value, torch.Tensor) or value is None:
        return False
    if isinstance(value, (list, tuple)) and not is_namedtuple(value):
        return any(is_cache_value(item) for item in value)
    return (isinstance(value, dict) or is_namedtuple(value) or is_record(value)) and holds_tensor(value)


def _takes_many(module: nn.Module) -> bool:
    """Whether a child's ``forward`` could be handed a cache besides its input."""
    params = _parameters(type(module).forward)[1:]
    return len(params) > 1 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _code_names(code: Any) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_names(const)


@lru_cache(maxsize=None)
def _names_used(fn: Any) -> frozenset[str]:
    code = getattr(fn, "__code__", None)
    return frozenset(_code_names(code)) if code is not None else frozenset()


class CacheValues:
    """The objects inside an example call's caches, recognised by identity."""

    def __init__(self, caches: Iterable[Any] = ()) -> None:
        self._ids: set[int] = set()
        self._keep: list[Any] = []  # keeps ids valid for the trace's lifetime
        for cache in caches:
            self.add(cache)

    def add(self, cache: Any) -> None:
        for item in reachable(cache):
            self._ids.add(id(item))
            self._keep.append(item)

    def __contains__(self, value: Any) -> bool:
        return id(value) in self._ids

    def within(self, values: Iterable[Any], deep: bool = True) -> bool:
        """Whether any of ``values`` is cache state; ``deep``: or an item of a plain list,
        tuple or dict among them (``layer(x, (self_cache, cross_cache))``)."""
        for value in values:
            if id(value) in self._ids:
                return True
            if deep and isinstance(value, (list, tuple, dict)) and not is_namedtuple(value) and \
                    any(id(item) in self._ids for item in (value.values() if isinstance(value, dict) else value)):
                return True
        return False


@dataclass(frozen=True)
class TracePolicy:
    """Which modules and methods the tracer records as opaque calls.

    Args:
        cache_arguments: parameter names that carry mutable cache state, in addition to the
            inputs recognised as caches by value (see the module docstring).
        extra_leaves: qualified module names that must be leaves regardless of role; ``*``
            matches one name part, so ``blocks.*.cross_attn`` names that module in every block.
    """

    cache_arguments: frozenset[str] = field(default_factory=frozenset)
    extra_leaves: frozenset[str] = field(default_factory=frozenset)

    def with_leaves(self, *qualnames: str) -> "TracePolicy":
        """This policy with ``qualnames`` as extra leaves (what a TraceError's fix asks for)."""
        return replace(self, extra_leaves=self.extra_leaves | frozenset(qualnames))

    def for_example(self, inputs: Mapping[str, Any]) -> "TracePolicy":
        """This policy with the example's cache inputs added to ``cache_arguments`` by name."""
        found = frozenset(name for name, value in inputs.items() if is_cache_value(value))
        return self if found <= self.cache_arguments else replace(self, cache_arguments=self.cache_arguments | found)

    def cache_inputs(self, inputs: Mapping[str, Any]) -> list[Any]:
        """The example's caches: inputs named as cache arguments or recognised by value."""
        return [value for name, value in inputs.items()
                if value is not None and (name in self.cache_arguments or is_cache_value(value))]

    def takes_cache(self, fn: object) -> bool:
        return bool(self.cache_arguments & _parameter_names(fn))

    def is_leaf(self, module: nn.Module, qualname: str, receives_cache: bool = False,
                cache_free: bool = False) -> bool:
        """Whether ``module`` is recorded as one opaque call; ``receives_cache``: this call hands it
        cache state; ``cache_free``: this call runs its cache-free path (see :meth:`cache_free`)."""
        if _is_torch_builtin(module) or _is_peft_layer(module) or self.named_leaf(qualname):
            return True
        if not (receives_cache or self.takes_cache(type(module).forward)) or (cache_free and not receives_cache):
            return False
        # Innermost: no child could be handed the cache, so the block around it stays visible.
        return not any(self._may_take_cache(child) for child in module.children())

    def cache_free(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any], caches: Iterable[str]) -> bool:
        """Whether a call passes ``None`` (given or by default) for every cache argument of
        ``module.forward``, each of them the name of a cache of the example call (``caches``).

        Such a call hands the module no state: it runs the module's cache-free path (a copy of
        a block run without caches), which is ordinary code, traced through so that its Python
        decisions become guards. A name no cache of the call goes by (``attention_mask`` named
        to keep attention opaque) keeps its taker a leaf by signature.
        """
        fn = type(module).forward
        names = self.cache_arguments & _parameter_names(fn)
        if not names or not names <= frozenset(caches):
            return False
        try:
            bound = inspect.signature(fn).bind(module, *args, **kwargs)
        except TypeError:
            return False
        bound.apply_defaults()
        return all(bound.arguments.get(name) is None for name in names)

    def named_leaf(self, qualname: str) -> bool:
        """Whether ``extra_leaves`` names ``qualname`` (exactly or through a ``*`` pattern)."""
        return qualname in self.extra_leaves or any(names(qualname, pattern) for pattern in self.extra_leaves)

    def _may_take_cache(self, module: nn.Module) -> bool:
        if _is_torch_builtin(module) or _is_peft_layer(module):
            return False
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # Containers hand over nothing of their own: what matters is what they hold.
            return any(self._may_take_cache(child) for child in module.children())
        return self.takes_cache(type(module).forward) or _takes_many(module)

    def helper_candidates(self, module: nn.Module, root: bool) -> list[str]:
        """Methods of ``module`` to watch as cache helpers: on the root, every method of the
        model's own classes (caches are recognised when called); elsewhere those with a
        cache argument (patching more would give identical blocks different code)."""
        return list(_methods(type(module), self.cache_arguments, root))

    def traced_through(self, module: nn.Module, method: str, args: tuple, kwargs: Mapping[str, Any],
                       caches: CacheValues) -> bool | None:
        """How a call of ``module.<method>`` is recorded: ``None`` for ordinary code (no
        cache involved), ``True`` when it is part of the model's computation, ``False`` for
        an opaque cache helper."""
        fn = inspect.getattr_static(type(module), method)
        named = self.takes_cache(fn) and any(
            value is not None for name, value in _bind(fn, module, args, kwargs) if name in self.cache_arguments)
        # Only direct arguments count: wrapper code passes dicts of call kwargs around.
        if not named and not caches.within((*args, *kwargs.values()), deep=False):
            return None
        runs_children = _runs_children(type(module), fn, frozenset(module._modules), set())
        given = [*args, *kwargs.values()]
        given += [item for v in given if isinstance(v, (list, tuple)) and not is_namedtuple(v) for item in v]
        data = any(isinstance(v, torch.Tensor) and v not in caches for v in given)  # a latent, a list of latents
        return runs_children and data


def _runs_children(cls: type, fn: Any, children: frozenset[str], seen: set[int]) -> bool:
    """Whether ``fn`` calls one of the module's children, itself or through the class's other
    methods it names (``self._run_blocks(...)``, ``super().infer(...)``)."""
    seen.add(id(fn))
    names = _names_used(fn)
    if names & children:
        return True
    for name in names:
        for klass in cls.__mro__:
            other = klass.__dict__.get(name)
            if inspect.isfunction(other) and id(other) not in seen and not other.__module__.startswith("torch.") \
                    and _runs_children(cls, other, children, seen):
                return True
    return False


def _bind(fn: Any, module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    try:
        return list(inspect.signature(fn).bind(module, *args, **kwargs).arguments.items())
    except TypeError:
        return []


@lru_cache(maxsize=None)
def _methods(cls: type, cache_arguments: frozenset[str], every: bool) -> tuple[str, ...]:
    # Per class, not per module: a 40-block model would otherwise inspect every block.
    found = []
    for name in dir(cls):
        if name == "forward" or name.startswith("__"):
            continue
        fn = inspect.getattr_static(cls, name, None)
        if not inspect.isfunction(fn) or fn.__module__.startswith("torch."):
            continue
        if every or cache_arguments & _parameter_names(fn):
            found.append(name)
    return tuple(found)
