"""Walking and rebuilding the containers a model's inputs come in.

Caches arrive as dicts, lists, tuples, ``namedtuple``s, dataclasses and plain objects
(with ``__dict__`` or ``__slots__``), nested in any order. The tracer needs the objects
they hold (to recognise a cache by identity wherever it is passed) and copies of them
(so that running the model on the example never writes to the caller's objects).
"""
from __future__ import annotations

import copy as _copy
import enum
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def is_record(value: Any) -> bool:
    """An object that holds state in attributes: a dataclass instance or a plain object."""
    if isinstance(value, (_SCALARS, torch.Tensor, nn.Module, type)) or callable(value):
        return False
    return hasattr(value, "__dict__") or bool(_slots(type(value)))


def _slots(cls: type) -> tuple[str, ...]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return tuple(n for n in names if n not in ("__dict__", "__weakref__"))


def _attributes(value: Any) -> dict[str, Any]:
    found = dict(vars(value)) if hasattr(value, "__dict__") else {}
    for name in _slots(type(value)):
        if hasattr(value, name):
            found[name] = getattr(value, name)
    return found


def children(value: Any) -> Iterator[Any]:
    """The values directly inside a container, record or object (nothing for leaves)."""
    if isinstance(value, dict):
        yield from value.values()
    elif isinstance(value, (list, tuple)):
        yield from value
    elif is_record(value):
        yield from _attributes(value).values()


def reachable(value: Any) -> Iterator[Any]:
    """``value`` and everything inside it, each object once."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _SCALARS):
            continue
        seen.add(id(item))
        yield item
        stack.extend(children(item))


def holds_tensor(value: Any) -> bool:
    return any(isinstance(item, torch.Tensor) for item in reachable(value))


def map_tensors(value: Any, convert: Callable[[torch.Tensor, bool], Any]) -> Any:
    """A copy of ``value`` with each tensor ``t`` replaced by ``convert(t, inside_container)``.

    Dicts, lists and the model's own records (dataclasses, plain objects) are always copied,
    even empty ones, because an empty cache is what a model fills in (objects are copied
    without running ``__init__``); tuples and namedtuples are rebuilt when an item changed;
    torch's own objects only when they hold a tensor. An object met twice is copied once,
    so aliasing inside the inputs survives.
    """
    memo: dict[int, Any] = {}

    def copy(item: Any, inside: bool) -> Any:
        if id(item) in memo:
            return memo[id(item)]
        if isinstance(item, torch.Tensor):
            new: Any = convert(item, inside)
        elif isinstance(item, (dict, list)):
            new = _copy.copy(item)  # keeps a subclass and its extras (a defaultdict's factory)
            memo[id(item)] = new
            for key in (list(item) if isinstance(item, dict) else range(len(item))):
                new[key] = copy(item[key], True)
        elif isinstance(item, tuple):
            items = [copy(entry, True) for entry in item]
            same = all(a is b for a, b in zip(items, item))
            new = item if same else (type(item)(*items) if is_namedtuple(item) else type(item)(items))
        elif is_record(item) and not isinstance(item, enum.Enum) and (
                not type(item).__module__.startswith("torch") or holds_tensor(item)):
            new = object.__new__(type(item))
            memo[id(item)] = new
            for name, entry in _attributes(item).items():
                object.__setattr__(new, name, copy(entry, True))
        else:
            return item
        memo[id(item)] = new
        return new

    return copy(value, False)
