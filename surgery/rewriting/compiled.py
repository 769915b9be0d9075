"""Modules compiled with ``module.compile()``: kept compiled through surgery, never traced compiled.

``nn.Module.compile()`` stores ``torch.compile(self._call_impl)`` as the module's
``_compiled_call_impl``, which ``module(...)`` then calls instead of its forward. Three
places must know about it:

* the **new model** of ``surgery.apply`` is a structural copy, and a copied compiled call is
  still bound to the *input's* module (it would run the input's forward, with the input's
  layers, bypassing the rewritten model and any later LoRA): each is compiled again for its
  new module, with the same compile settings (:func:`retarget_compiled`);
* the **fake twin** the tracer runs must trace each module's own forward, not a compiled
  wrapper of a real module (:func:`strip_compiled`);
* the **generated code** must call a compiled module as a module, so its compiled call runs,
  instead of inlining the module's traced body (:func:`compiled_paths`, used by
  :func:`surgery.rewriting.specialise.compile_graph`; whether a module is compiled is part of
  a specialisation's guards (``GuardSet.compiled``), so ``block.compile()`` after surgery
  re-specialises once).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch.fx as fx
import torch.nn as nn

from ..errors import GraftError
from ..tracing.guards import compiled_call
from ..tracing.tracer import ExampleTracer, ModuleCall
from .outline import ModuleCallSite, module_call_sites

_ATTR = "_compiled_call_impl"


def strip_compiled(root: nn.Module) -> None:
    """Drop every compiled call of ``root``'s tree (a twin made for tracing, never the user's model)."""
    for module in root.modules():
        module.__dict__.pop(_ATTR, None)


def _compile_context(compiled: Any) -> Any:
    """The ``torch.compile`` context that made ``compiled`` (its backend, mode and options)."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    return None


def retarget_compiled(root: nn.Module) -> None:
    """Re-compile, for the module that holds it, each compiled call bound to another module.

    Raises:
        GraftError: a compiled call whose compile settings cannot be recovered.
    """
    for name, module in root.named_modules(remove_duplicate=False):
        compiled = compiled_call(module)
        if compiled is None:
            continue
        bound = getattr(getattr(compiled, "_torchdynamo_orig_callable", None), "__self__", None)
        if bound is module:
            continue
        context = _compile_context(compiled)
        if context is None:
            shown = name or "the model"
            raise GraftError(f"{shown} was compiled with .compile() in a way surgery cannot repeat on the new model",
                             "apply surgery to the uncompiled model, then call .compile() on result.module's modules")
        module.__dict__[_ATTR] = context(module._call_impl)


def argument_nodes(calls: Iterable[ModuleCall], compiled: set[str]) -> set[fx.Node]:
    """The graph values the ``compiled`` modules' calls are handed: a module call needs every
    one of them, even those its traced body only read in Python (kept from pruning)."""
    found: set[fx.Node] = set()
    for call in calls:
        if call.qualname in compiled:
            fx.node.map_aggregate((call.args, call.kwargs),
                                  lambda value: found.add(value.node) if isinstance(value, fx.Proxy) else None)
    return found


def call_sites(graph: fx.Graph, tracer: ExampleTracer, compiled: set[str], replaced: dict[fx.Node, fx.Node],
               rule: str) -> list[ModuleCallSite]:
    """Where generated code calls the ``compiled`` modules (see :func:`.outline.module_call_sites`)."""
    if not compiled:
        return []
    tensors = {id(tensor): path for tensor, path in tracer.tensor_attrs.items()}
    objects = tracer._object_attrs

    def attribute_path(value: Any) -> str | None:
        return tensors.get(id(value)) or objects.get(id(value))

    return module_call_sites(graph, tracer.calls, compiled, attribute_path, replaced, rule)
