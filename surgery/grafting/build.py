"""Building new modules that look like existing ones, without copying their weights.

A grafted unit must be "the model's own block structure with new parameters". Deep-copying
a matched block would also copy run-time state that does not belong to a fresh block (for
example fused projections created after loading), so the builder constructs a new instance
of the block's class, with constructor arguments read back from the block, its config or its
structure (:mod:`.settings`; never a silent default), and allocates its parameters without
random init.
"""
from __future__ import annotations

import contextlib
import math
import mmap
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import GraftError
from .settings import SOURCES, constructor_arguments


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """``torch.nn.init`` does nothing inside: meta-built modules have no values to initialise.

    Random init on meta tensors still runs its Python decompositions (a third of a 1.3B
    graft's time). Process-wide while it lasts, like ``accelerate``'s ``init_empty_weights``.
    """
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}
    try:
        for name in saved:
            setattr(init, name, _keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


#: Below this size a plain ``torch.zeros`` is cheaper than a mapping of its own.
LAZY_ZEROS_MIN_BYTES = 1 << 20


def zeros(shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose CPU pages cost nothing until first written.

    Grafted weights are almost always overwritten by a checkpoint right after surgery, so
    filling gigabytes with zeros first is wasted work (63% of a 1.3B apply). A private
    anonymous mapping is zero by the kernel's guarantee and commits a page only when it is
    touched; the tensor keeps the mapping alive. Other devices memset at memory bandwidth.
    """
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype, device="meta").element_size()
    if torch.device(device).type != "cpu" or nbytes < LAZY_ZEROS_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    # MAP_PRIVATE: an untouched page reads as the kernel's zero page; Python's default, MAP_SHARED,
    # commits a shared-memory page on the first *read* (saving a fresh branch cost its full size).
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype, count=numel).view(shape)


def allocate(module: nn.Module, *, device: torch.device, dtype: torch.dtype, init: str = "zeros") -> nn.Module:
    """Give a meta-built module real storage.

    ``zeros`` costs no random init and, on CPU, no memset (see :func:`zeros`); ``default`` runs
    each submodule's ``reset_parameters`` for a randomly initialised branch.
    """
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is None:
                continue
            target = dtype if param.is_floating_point() else param.dtype
            owner._parameters[name] = nn.Parameter(
                zeros(param.shape, dtype=target, device=device), requires_grad=param.requires_grad)
        for name, buf in list(owner._buffers.items()):
            if buf is not None:
                owner._buffers[name] = zeros(buf.shape, dtype=buf.dtype, device=device)
        for attr, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor) and not attr.startswith("_") and value.device.type == "meta":
                raise GraftError(f"{type(owner).__name__}.{attr} is a plain tensor built in __init__",
                                 "build the graft on a real device, or make it a buffer")
    if init == "default":
        with torch.no_grad():
            for owner in module.modules():
                reset = getattr(owner, "reset_parameters", None)
                if callable(reset):
                    reset()
    elif init != "zeros":
        raise GraftError(f"unknown graft init '{init}'", "use 'zeros' or 'default'")
    return module


def rebuild_like(module: nn.Module, *, root: nn.Module | None = None,
                 overrides: Mapping[str, Any] | None = None, init: str = "zeros",
                 sources: Sequence[str] = SOURCES) -> nn.Module:
    """A fresh instance of ``module``'s class with the same configuration and new parameters.

    Constructor arguments come from ``overrides``, then from ``sources`` (see
    :func:`~surgery.grafting.settings.constructor_arguments`); one that none yields is a
    :class:`GraftError` naming it, never a default.
    """
    reference = next(module.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    kwargs = constructor_arguments(module, root, overrides, sources, build=lambda kw: _on_meta(type(module), kw))
    try:
        fresh = _on_meta(type(module), kwargs)
    except Exception as error:  # the constructor's own validation
        raise GraftError(f"cannot rebuild {type(module).__name__}({kwargs}): {error}",
                         "pass the missing constructor arguments as rule overrides") from error
    if device.type == "meta":
        return fresh
    fresh = allocate(fresh, device=device, dtype=dtype, init=init)
    fresh.train(module.training)
    return fresh


def _on_meta(cls: type, kwargs: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"), skipped_init():
        return cls(**kwargs)


def zero_linear(features: int, *, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """A ``Linear(features, features)`` whose weight and bias are zero (an exact no-op branch)."""
    layer = _on_meta(nn.Linear, {"in_features": features, "out_features": features})
    if device.type == "meta":
        return layer
    return allocate(layer, device=device, dtype=dtype)
