"""Undo for in-place PEFT injection: all or nothing.

``peft.inject_adapter_in_model`` changes a module tree in place and, when it fails half-way,
leaves the layers it reached wrapped (a retry then finds the adapter "already loaded").
PEFT keeps all of that state in module attributes: children in ``_modules``, adapter
dicts (``lora_A``, ``r``, ``scaling``, ``_active_adapter``) on existing LoRA layers, and
``peft_config`` on the root. So a shallow copy of every module's ``__dict__``, plus the
contents of the containers in it, is enough to put the tree back exactly: the same
module and parameter objects, in the same order, with the same flags. Tensor *values*
are not copied; injection never writes into existing tensors.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

_CONTAINERS = (dict, list, set)


def _refill(container: Any, saved: Any) -> None:
    """Put ``saved``'s items back into ``container`` without replacing the object."""
    if isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


class ModuleSnapshot:
    """The attribute state of every module under ``root`` and every parameter's ``requires_grad``."""

    def __init__(self, root: nn.Module) -> None:
        self._modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        for module in root.modules():
            attrs = dict(vars(module))
            contents = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, _CONTAINERS)}
            self._modules.append((module, attrs, contents))
        self._flags = [(p, p.requires_grad) for p in root.parameters()]

    def restore(self) -> None:
        """Put every module attribute, child, container item and flag back as it was at the snapshot."""
        for module, attrs, contents in self._modules:
            current = vars(module)
            for name in [n for n in current if n not in attrs]:
                del current[name]
            current.update(attrs)
            for name, saved in contents.items():
                _refill(attrs[name], saved)
        for param, flag in self._flags:
            param.requires_grad_(flag)


__all__ = ["ModuleSnapshot"]
