"""Structural copies of a module tree that never copy tensor storage.

``share_tree`` gives surgery its "returns a new model" semantics: every module object,
parameter, buffer and plain tensor attribute is a new object (so PEFT injection, ``.half()``,
``.to()`` or ``requires_grad_`` on the result leave the input alone), while each of them views
the very same storage as the input's (zero copy, same ``data_ptr``). Tied tensors stay tied.

``meta_twin`` gives the tracer a model to execute example calls on: the same structure
with every floating-point tensor on the ``meta`` device, so tracing costs no FLOPs at any
model size and cannot touch the user's weights or caches.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def _clone_module(module: nn.Module, tensor_fn: TensorFn, plain_fn: TensorFn,
                  memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # shared submodules stay shared
        return memo[id(module)]
    # object.__new__ + a dict copy: copy.copy goes through __reduce_ex__, ten times slower.
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = dict(module.__dict__)
    state["_parameters"] = {k: (None if p is None else _param(tensor_fn(p), p)) for k, p in module._parameters.items()}
    state["_buffers"] = {k: (None if b is None else tensor_fn(b)) for k, b in module._buffers.items()}
    state["_modules"] = {k: (None if m is None else _clone_module(m, tensor_fn, plain_fn, memo))
                         for k, m in module._modules.items()}
    for key, value in module.__dict__.items():
        if key.endswith("_hooks") or key.endswith("_hooks_with_kwargs") or key == "_forward_hooks_always_called":
            # dict.copy is C-level; copy.copy would go through __reduce_ex__ for each of them.
            state[key] = value.copy() if isinstance(value, dict) else copy.copy(value)
        elif not key.startswith("_") and isinstance(value, torch.Tensor):
            state[key] = plain_fn(value)
    new.__dict__ = state
    return new


def _param(data: torch.Tensor, original: nn.Parameter) -> nn.Parameter:
    if data is original or isinstance(data, nn.Parameter):
        return data
    return nn.Parameter(data, requires_grad=original.requires_grad)


def _aliases() -> TensorFn:
    """New tensor objects on the same storage, one per original (so ties stay ties)."""
    memo: dict[int, torch.Tensor] = {}

    def alias(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            if isinstance(t, nn.Parameter):
                # What nn.Parameter.__new__ does, for Parameter subclasses too; their extra
                # attributes (quantisation state, loader flags) are carried over.
                new = torch.Tensor._make_subclass(type(t), t.detach(), t.requires_grad)
                new.__dict__.update(t.__dict__)
            else:
                new = t.detach().requires_grad_(t.requires_grad) if t.is_leaf else t.detach()
            memo[id(t)] = new
        return memo[id(t)]

    return alias


def share_tree(module: nn.Module) -> nn.Module:
    """A new module tree whose tensors are new objects on the input's storage (see above).

    A conversion of the copy (``.half()``, ``.to(device)``, ``requires_grad_``) rebinds only
    the copy's tensors; an in-place write to tensor *values* is seen by both, as with any view.
    """
    alias = _aliases()
    return _clone_module(module, alias, alias, {})


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta":
        return t
    return torch.empty_like(t, device="meta")


def meta_twin(module: nn.Module) -> nn.Module:
    """The same tree with every tensor on ``meta`` (parameters, buffers, plain attributes)."""
    return _clone_module(module, _to_meta, _to_meta, {})


def meta_inputs(value: Any, *, inside_container: bool = False) -> Any:
    """Example inputs for the meta twin.

    Floating-point tensors go to ``meta``. Integer tensors inside containers stay real
    copies: they are cache indices that attention code reads with ``.item()``, and they
    are small. Containers are rebuilt so the twin's writes never reach the caller.
    """
    if isinstance(value, torch.Tensor):
        if inside_container and not (value.is_floating_point() or value.is_complex()):
            return value.detach().clone()
        return _to_meta(value)
    if isinstance(value, dict):
        return {k: meta_inputs(v, inside_container=True) for k, v in value.items()}
    if isinstance(value, list):
        return [meta_inputs(v, inside_container=True) for v in value]
    if isinstance(value, tuple):
        return tuple(meta_inputs(v, inside_container=True) for v in value)
    return value
