"""Structural copies of a module tree that never copy tensor storage.

``share_tree`` gives surgery its "returns a new model" semantics: every module object,
parameter, buffer and plain tensor attribute is a new object (so PEFT injection, ``.half()``,
``.to()`` or ``requires_grad_`` on the result leave the input alone), while each of them views
the very same storage as the input's (zero copy, same ``data_ptr``). Tied tensors stay tied.

``fake_twin`` gives the tracer a model to execute example calls on: the same structure
with every tensor replaced by a ``FakeTensor`` (torch's own tracing tensors, as used by
``torch.export``), so tracing costs no FLOPs or memory at any model size and cannot touch
the user's weights or caches. A fake tensor keeps its real device: code that checks
devices (flex attention refuses ``meta``; ``if x.device.type == "cuda"``; a real integer
input beside a float weight) behaves as it does on real tensors, which a ``meta`` twin
could not promise.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .containers import map_tensors

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
    # A fake twin keeps plain fake tensors in ``_parameters``: wrapping each in a Parameter
    # dispatches an op per tensor, which dominated building a 1.3B twin.
    if data is original or isinstance(data, (nn.Parameter, FakeTensor)):
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


def new_fake_mode() -> FakeTensorMode:
    """One fake-tensor world per trace. Real tensors that meet fake ones (a real cache index
    beside a fake weight) are converted on the fly, as they are on a real device."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(value: Any) -> bool:
    return isinstance(value, FakeTensor)


def fake_mode_of(module: nn.Module) -> FakeTensorMode | None:
    """The fake mode of a twin (``None`` for a module without fake tensors)."""
    known = module.__dict__.get("_fake_mode")
    if known is not None:
        return known
    for tensor in module.parameters():
        if isinstance(tensor, FakeTensor):
            return tensor.fake_mode
    for tensor in module.buffers():
        if isinstance(tensor, FakeTensor):
            return tensor.fake_mode
    return None


def _faker(mode: FakeTensorMode) -> TensorFn:
    def to_fake(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor) and t.fake_mode is mode:
            return t
        if t.layout is not torch.strided or type(t) not in (torch.Tensor, nn.Parameter):
            return mode.from_tensor(t, static_shapes=True)
        # A fake tensor is a meta tensor plus the device it stands for. Built directly it
        # costs a tenth of ``from_tensor`` (which also models storage sharing, needless for
        # example values): a 1.3B twin in 0.05 s instead of 0.5 s. A model built on meta (to
        # plan a 14B surgery) has no device yet: it is traced as the CPU model it describes,
        # since kernels such as flex attention refuse meta.
        meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return FakeTensor(mode, meta, torch.device("cpu") if t.device.type == "meta" else t.device)
    return to_fake


def fake_twin(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """The same tree with every tensor fake (parameters, buffers, plain tensor attributes)."""
    to_fake = _faker(mode)
    twin = _clone_module(module, to_fake, to_fake, {})
    # Example values need no autograd, and kernels without a CPU backward (flex attention)
    # refuse inputs that would record one.
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    twin.__dict__["_fake_mode"] = mode
    return twin


def fake_inputs(value: Any, mode: FakeTensorMode, *, inside_container: bool = False) -> Any:
    """Example inputs for the fake twin.

    Floating-point tensors become fake. Integer tensors inside containers stay real copies:
    they are cache indices that attention code reads with ``.item()``, and they are small.
    Containers (dicts, lists, tuples, namedtuples, dataclasses, plain objects) are rebuilt
    so the twin's writes never reach the caller.
    """
    to_fake = _faker(mode)

    def convert(tensor: torch.Tensor, inside: bool) -> torch.Tensor:
        # A meta index (a model planned on meta) has no value to keep: it becomes fake too.
        if (inside or inside_container) and not (tensor.is_floating_point() or tensor.is_complex()) \
                and not is_fake(tensor) and tensor.device.type != "meta":
            return tensor.detach().clone()
        return to_fake(tensor)

    return map_tensors(value, convert)


#: Tensor factories the tracer records (``torch.<name>``), so the graph recreates them per call.
FACTORY_NAMES = ("tensor", "as_tensor", "arange", "zeros", "ones", "empty", "full", "linspace", "eye")
#: Integer factory results up to this size stay real: Python may read their values (indices).
_REAL_INDEX_NUMEL = 4096


def run_factory(mode: FakeTensorMode | None, factory: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A factory's example value: fake when it is large or floating point, so a trace that
    builds a ``[1, 32760, 5120]`` pad allocates nothing; real when it is a small index tensor."""
    if mode is None:
        return factory(*args, **kwargs)
    with mode:
        value = factory(*args, **kwargs)
    if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()) \
            and value.numel() <= _REAL_INDEX_NUMEL and not any(is_fake(a) for a in (*args, *kwargs.values())):
        return factory(*args, **kwargs)
    return value


@contextmanager
def compiled_code_runs_eagerly() -> Iterator[None]:
    """Run ``torch.compile``d code (the pipelines' compiled flex attention) eagerly while
    computing example values: dynamo would otherwise compile it afresh for every trace's
    fake mode, for the same output metadata that eager execution gives."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    with warnings.catch_warnings():
        # Eager flex attention warns that it is unfused; on example values that is the point.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        if set_stance is None:
            yield
            return
        with set_stance("force_eager"):
            yield


def is_compiled_function(value: Any) -> bool:
    """Whether ``value`` is a function wrapped by ``torch.compile`` (not a disabled one)."""
    return inspect.isfunction(value) and "_torchdynamo_orig_callable" in value.__dict__ \
        and not value.__dict__.get("_torchdynamo_disable", False)


@lru_cache(maxsize=None)
def compiled_call(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """The graph target for calls of a ``torch.compile``d function: it calls ``compiled``.

    fx would write a target that copies a torch function's ``__module__`` and ``__name__``
    (``torch.compile(flex_attention)``) as that torch function, uncompiled; this one is
    referenced as itself, so generated code calls the compiled function as the model does.
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        return compiled(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"compiled_{getattr(compiled, '__name__', 'function')}"
    return call
