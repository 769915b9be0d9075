"""Tracing the hand-written reference with the engine's own tracer.

The reference is traced like the base model is traced by ``surgery.apply``: an
:class:`~surgery.tracing.tracer.ExampleTracer` with the rule's trace policy runs its forward
on a fake-tensor twin, with the example inputs as placeholders named the engine's way
(``arg0``, ..., then the keywords sorted) and the rule's example control input. Two
adaptations, both because the reference is ordinary wrapper Python, not a traced model:

* rule inputs that are not tensors (a scale) are passed as constants: the wrapper
  normalises them with ``isinstance`` checks a proxy cannot pass;
* list/tuple inputs (per-layer caches) are passed as Python lists of element proxies, for
  the same reason; each element read is a ``getitem`` node either way.

One fix over the engine's tracer (reported upstream): a wrapper that registers the same
blocks under two paths (e.g. ``causal_wan_model.blocks`` and the alias ``blocks``) would get
modules named by their first path and parameters by their last, so a block replayed from
another block's template would read the template's parameters. Here both use the first.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..rule import Rule
from ..tracing.tracer import ConcreteProxy, ExampleTracer, Trace
from ..tracing.twin import fake_inputs, fake_twin, new_fake_mode


class ConsistentNamesTracer(ExampleTracer):
    """The engine's tracer, with one parameter name per tensor when a module has two paths.

    A wrapper may register the same submodule twice (e.g. ``causal_wan_model.blocks`` and the
    alias ``blocks``). ``ExampleTracer`` names modules by their first path and parameters by
    their last, so a replayed block would read its template's parameters; here both use the
    first path, as ``named_modules`` does.
    """

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        root = getattr(self, "root", None)
        if root is not None and getattr(self, "_names_fixed_for", None) is not root:
            first: dict[int, str] = {}
            for name, tensor in list(root.named_parameters(remove_duplicate=False)) + list(
                    root.named_buffers(remove_duplicate=False)):
                first.setdefault(id(tensor), name)
            self._param_names.update(first)
            self._names_fixed_for = root
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _unpack(proxy: Any) -> Any:
    """A container input as a Python list/tuple of element proxies (one level).

    Wrapper code dispatches on ``isinstance(value, list)`` (per-layer cache lists), which a
    proxy never satisfies; element reads are ``getitem`` nodes either way.
    """
    if isinstance(proxy, ConcreteProxy) and isinstance(proxy.concrete, (list, tuple)):
        items = [proxy[i] for i in range(len(proxy.concrete))]
        return items if isinstance(proxy.concrete, list) else tuple(items)
    return proxy


def trace_reference(reference: nn.Module, rule: Rule, args: tuple, kwargs: dict[str, Any],
                    rule_inputs: dict[str, Any]) -> Trace:
    """Trace ``reference(*args, **kwargs, **rule_inputs)`` on a fake twin with the engine's tracer.

    Tensors and containers become placeholders named like the engine's (``arg0``, then the
    keywords sorted); rule inputs that are not tensors (a scale) are passed as constants,
    because the reference normalises them in Python.
    """
    inputs: dict[str, Any] = {f"arg{i}": value for i, value in enumerate(args)}
    inputs.update(sorted(kwargs.items()))
    constants = {}
    for name, value in rule_inputs.items():
        if isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple)) and value
                                               and all(isinstance(v, torch.Tensor) for v in value)):
            inputs[name] = value
        else:
            constants[name] = value
    mode = new_fake_mode()
    twin = fake_twin(reference, mode)
    tracer = ConsistentNamesTracer(rule.trace_policy)
    positional = len(args)

    def call(root: ConcreteProxy, proxies: dict[str, Any]) -> Any:
        call_args = [_unpack(proxies[f"arg{i}"]) for i in range(positional)]
        call_kwargs = {k: _unpack(v) for k, v in proxies.items() if not k.startswith("arg")}
        call_kwargs.update(constants)
        return type(twin).forward(twin, *call_args, **call_kwargs)

    return tracer.trace_call(twin, fake_inputs(inputs, mode), call)


__all__ = ["ConsistentNamesTracer", "trace_reference"]
