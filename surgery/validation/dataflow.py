"""An fx graph reduced to its tensor dataflow, as a labelled networkx DiGraph.

Nodes kept (one DiGraph node per fx node, keyed by the fx node's name):

* placeholders holding a tensor or a container of tensors, labelled ``("input", name)``;
* ``get_attr`` of a tensor, labelled by its *native* name through the key map;
* every ``call_module``: module class and native module path;
* opaque cache helpers (``call_method`` recorded by the tracer's policy): ``("helper", name)``;
* casts (``to``/``type``/``type_as``/``float``/...) that change the dtype: ``("cast", dtype)``,
  whatever their spelling;
* other ``call_function``/``call_method`` nodes whose value holds a tensor: function or
  method name; a ``getitem`` on a container (a cache dict, a tuple of outputs) is a
  ``("select", key)``;
* the ``output`` node.

Edges carry the consumer's argument slots (positional index or keyword, then the position
inside a nested list/tuple/dict argument). A Python list that re-lists *every* element of a
container input in order (``[c[0], ..., c[n-1]]``) counts as the container itself.

Ignored, exactly:

1. nodes whose value holds no tensor (sizes, shapes, dtypes, Python numbers and flags, the
   module owners of opaque calls, attribute objects such as block masks): shape logic
   differs between a wrapper and the model it wraps, and a wrong shape fails the numbers;
2. pure range views and no-op casts, which pass their first tensor input through: a
   ``getitem`` whose index holds only slices, ``None`` and ``Ellipsis`` (``x[:, :n]``), since
   a wrapper may pad to a maximum length and cut later where the model cuts at once; and a
   cast or ``contiguous`` whose result has its input's shape, dtype and device;
3. dead nodes: whatever reaches no output, ``call_module``, opaque helper or in-place op.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from .structure import map_name

NameMap = Callable[[str], "str | None"]

_CAST_METHODS = frozenset({"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous"})


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)


def _slots(node: fx.Node) -> Iterator[tuple[tuple, fx.Node]]:
    """``(slot, input node)`` for every node argument, nested positions included."""

    def walk(value: Any, path: tuple) -> Iterator[tuple[tuple, fx.Node]]:
        if isinstance(value, fx.Node):
            yield path, value
        elif isinstance(value, (list, tuple)) and _whole_container(value) is not None:
            yield path, _whole_container(value)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(item, path + (i,))
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, path + (str(key),))
        elif isinstance(value, slice):
            yield from walk((value.start, value.stop, value.step), path)

    for i, arg in enumerate(node.args):
        yield from walk(arg, (i,))
    for key, arg in node.kwargs.items():
        yield from walk(arg, (key,))


def _whole_container(items: Any) -> fx.Node | None:
    """The container node when ``items`` is ``[c[0], c[1], ..., c[n-1]]`` of all of ``c``."""
    if not items or not all(isinstance(i, fx.Node) and i.op == "call_function" and i.target is operator.getitem
                            for i in items):
        return None
    source = items[0].args[0]
    value = source.meta.get("example_value") if isinstance(source, fx.Node) else None
    if not isinstance(value, (list, tuple)) or len(value) != len(items):
        return None
    if all(i.args[0] is source and i.args[1] == k for k, i in enumerate(items)):
        return source
    return None


def _is_range_view(node: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    return isinstance(node.args[0], fx.Node) and isinstance(node.args[0].meta.get("example_value"), torch.Tensor) \
        and all(isinstance(i, slice) or i is None or i is Ellipsis for i in items)


def _is_noop_cast(node: fx.Node) -> bool:
    if node.op != "call_method" or node.target not in _CAST_METHODS or not node.args:
        return False
    source, value = node.args[0], node.meta.get("example_value")
    before = source.meta.get("example_value") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(before, torch.Tensor):
        return False
    return (value.shape, value.dtype, value.device) == (before.shape, before.dtype, before.device)


def _module_of(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return next(reversed(stack))
    inserted = node.meta.get("surgery")
    if isinstance(inserted, dict):
        return f"{inserted.get('rule')} {inserted.get('role')} {inserted.get('index')}"
    return ""


def native_name(names: NameMap, name: str, module: bool = False) -> str:
    """``name`` through the key map, or ``<wrapper>.name`` when the map has no native name."""
    mapped = map_name(names, name, module=module)
    return f"<wrapper>.{name}" if mapped is None else mapped


def _owner(node: fx.Node, names: NameMap) -> str:
    """Native path of the module an opaque helper is called on (the graph's root is ``""``)."""
    owner = node.args[0] if node.args else None
    if not isinstance(owner, fx.Node):
        return ""
    return native_name(names, "" if owner.op == "placeholder" else str(owner.target), module=True)


def _label(node: fx.Node, module: nn.Module, names: NameMap) -> tuple | None:
    """The node's comparison label, or None when it is not compared (module docstring, rule 1)."""
    value = node.meta.get("example_value")
    if node.op == "output":
        return ("output",)
    if node.op == "placeholder":
        return ("input", str(node.target)) if _holds_tensor(value) else None
    if node.op == "get_attr":
        if not isinstance(value, torch.Tensor):
            return None
        return ("get_attr", native_name(names, str(node.target)))
    if node.op == "call_module":
        try:
            kind = type(module.get_submodule(str(node.target))).__name__
        except AttributeError:
            kind = "?"
        return ("call_module", kind, native_name(names, str(node.target), module=True))
    opaque = node.meta.get("opaque_helper")
    if opaque is not None:
        return ("helper", str(node.target))
    if not _holds_tensor(value) and not _mutates(node):
        return None
    if node.op == "call_method" and node.target in _CAST_METHODS and isinstance(value, torch.Tensor):
        # Any spelling of a cast to one dtype is the same op.
        return ("cast", str(value.dtype), value.device.type)
    if node.op == "call_function":
        name = _fn_name(node.target)
        if node.target is operator.getitem and not isinstance(node.args[0].meta.get("example_value"), torch.Tensor):
            return ("select", repr(node.args[1]))
        return ("call_function", name)
    return ("call_method", str(node.target))


def _mutates(node: fx.Node) -> bool:
    target = node.target if node.op == "call_method" else _fn_name(node.target) if node.op == "call_function" else ""
    return isinstance(target, str) and ((target.endswith("_") and not target.endswith("__")) or target == "setitem")


def dataflow(graph: fx.Graph, module: nn.Module, names: NameMap) -> nx.DiGraph:
    """The tensor dataflow of ``graph`` as a labelled DiGraph (see the module docstring).

    Node keys are fx node names; node attributes ``label``, ``op``, ``target``, ``where``;
    edge attribute ``slots``: the consumer's argument slots the producer feeds.
    """
    kept: dict[fx.Node, tuple] = {}
    inputs_of: dict[fx.Node, list[tuple[tuple, fx.Node]]] = {}
    through: dict[fx.Node, list[fx.Node]] = {}  # passthrough node -> kept producers
    for node in graph.nodes:
        label = None if (_is_range_view(node) or _is_noop_cast(node)) else _label(node, module, names)
        producers: list[tuple[tuple, fx.Node]] = []
        for slot, source in _slots(node):
            if source in kept:
                producers.append((slot, source))
            else:
                producers.extend((slot, s) for s in through.get(source, []))
        if label is None:
            if _is_range_view(node) or _is_noop_cast(node) or _holds_tensor(node.meta.get("example_value")):
                # A view or no-op cast passes its (first) tensor input through.
                first = [s for slot, s in producers if slot[:1] == (0,)]
                through[node] = first or [s for _, s in producers]
            continue
        kept[node] = label
        inputs_of[node] = producers
    g = nx.DiGraph()
    for node, label in kept.items():
        g.add_node(node.name, label=label, op=node.op, target=_target_str(node), where=_module_of(node),
                   wrapper_helper=label[0] == "helper" and _owner(node, names).startswith("<wrapper>"))
    for node in kept:
        for slot, source in inputs_of[node]:
            if g.has_edge(source.name, node.name):
                g.edges[source.name, node.name]["slots"] = tuple(sorted(g.edges[source.name, node.name]["slots"]
                                                                        + (_slot_key(slot),)))
            else:
                g.add_edge(source.name, node.name, slots=(_slot_key(slot),))
    prune_dead(g)
    return g


def _slot_key(slot: tuple) -> str:
    return ".".join(str(s) for s in slot)


def _target_str(node: fx.Node) -> str:
    return _fn_name(node.target) if node.op == "call_function" else str(node.target)


def prune_dead(g: nx.DiGraph) -> None:
    """Remove nodes that reach no output, ``call_module``, opaque helper or in-place op (rule 3)."""
    roots = [n for n, d in g.nodes(data=True)
             if d["label"][0] in ("output", "call_module", "helper") or _is_mutation_label(d["label"])]
    live: set[str] = set(roots)
    for root in roots:
        live |= nx.ancestors(g, root)
    g.remove_nodes_from([n for n in list(g.nodes) if n not in live])


def _is_mutation_label(label: tuple) -> bool:
    name = label[-1] if label else ""
    return isinstance(name, str) and ((name.endswith("_") and not name.endswith("__")) or name == "setitem")


__all__ = ["NameMap", "dataflow", "native_name", "prune_dead"]
