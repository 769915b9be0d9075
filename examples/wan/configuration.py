"""Minimal stand-ins for diffusers' ``ModelMixin``, ``ConfigMixin`` and ``register_to_config``.

Only what the causal models and the VACE wrapper read is provided: ``model.config`` with
attribute access (e.g. ``config.sink_size``) holding the constructor arguments, minus the
class's ``ignore_for_config`` names, as diffusers records them.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["ConfigMixin", "FrozenConfig", "ModelMixin", "register_to_config"]


class FrozenConfig(dict):
    """A read-only dict with attribute access, like diffusers' ``FrozenDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("the model config is frozen; change the constructor arguments instead")

    def __reduce__(self) -> tuple:
        # Rebuilt through the constructor: pickle and deepcopy would otherwise refill it item by
        # item through __setitem__ (diffusers' FrozenDict pickles and copies too).
        return (type(self), (dict(self),))


class ConfigMixin:
    """Holds the registered constructor arguments as ``self.config``."""

    config_name = "config.json"
    ignore_for_config: list[str] = []

    def register_to_config(self, **kwargs: Any) -> None:
        # object.__setattr__: called before nn.Module.__init__ has set up its dicts.
        object.__setattr__(self, "_internal_dict", FrozenConfig(kwargs))

    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict


class ModelMixin(nn.Module):
    """``nn.Module`` with the ``dtype``/``device`` conveniences diffusers adds."""

    _supports_gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def register_to_config(init: Callable) -> Callable:
    """Decorator for ``__init__``: record every argument (with defaults) except ignored ones."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def inner_init(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        ignore = set(getattr(self, "ignore_for_config", []))
        values = {k: v for k, v in list(bound.arguments.items())[1:] if k not in ignore}
        self.register_to_config(**values)
        init(self, *args, **kwargs)

    return inner_init
