"""The rewritten graph against a traced graph of the reference, compared as tensor dataflow.

Both graphs come from the same tracer (:class:`~surgery.tracing.tracer.ExampleTracer` with
the rule's trace policy, on the same example inputs with the rule's example control input),
so their nodes speak the same language. They are then reduced to their *tensor dataflow*
and compared with networkx.

What is compared: a ``networkx.DiGraph`` per side whose nodes are

* input placeholders holding a tensor or a container of tensors (labelled by input name),
* ``get_attr`` of a tensor (labelled by its native name through the key map),
* every ``call_module`` (labelled by module class and native module path),
* ``call_function``/``call_method`` nodes whose value is a tensor or holds tensors
  (labelled by function or method name; ``getitem`` on a container also by its key),
* the ``output`` node,

and whose edges are argument slots (positional index or keyword name, and the position
inside a nested list/tuple/dict argument). ``add`` and ``mul`` compare their operands as a
multiset (commutative), and so do opaque cache helpers (a wrapper may pass the same caches
under other argument names).

What is ignored, exactly:

1. nodes whose value holds no tensor (sizes, shapes, dtypes, Python numbers and flags,
   module owners of opaque calls, attribute objects such as block masks): shape logic
   differs between a wrapper and the model it wraps, and a wrong shape fails the numbers;
2. *pure views that only select a range*: ``getitem`` whose index is made of slices,
   ``None`` and ``Ellipsis`` only (``x[:, :n]``), because a wrapper may pad to a maximum
   length and cut later where the model cuts at once; and ``to``/``type``/``type_as``/
   ``float``/``contiguous`` when the result has the input's shape, dtype and device (a
   no-op cast). Edges run through these nodes, so their producers and consumers still
   connect;
3. dead nodes: nothing that reaches the output, a ``call_module``, an opaque helper or an
   in-place op.

Everything else counts: an op added to one side, a removed op, a parameter read under
another native name or an input wired to another slot is reported node by node, with the
fx node name, the op, its target and the module it sits in.

Matching: every node gets a forward hash (its label plus its inputs' hashes per slot, a
Merkle hash of everything upstream) and a reverse hash (its label plus its consumers'
reverse hashes). Equal forward hashes pair nodes; pairs are checked edge by edge, and
when both graphs are small enough the pairing is confirmed with networkx' ``DiGraphMatcher``.
A node without a forward partner but with a reverse partner on the other side is
*changed* (same place, different inputs); a node with neither is *only on one side*.
"""
from __future__ import annotations

import hashlib
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import SurgeryError
from ..rule import Rule
from ..tracing.tracer import ConcreteProxy, ExampleTracer, Trace
from ..tracing.twin import meta_inputs, meta_twin

NameMap = Callable[[str], "str | None"]

_CAST_METHODS = frozenset({"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous"})
_COMMUTATIVE = frozenset({"add", "mul", "iadd", "imul"})
# Above this many compared nodes, VF2 is not run on top of the hash matching.
VF2_LIMIT = 400


@dataclass(frozen=True)
class GraphDifference:
    """One node that has no structural partner on the other side.

    ``side`` is ``"rewritten"`` or ``"reference"``; ``kind`` is ``"only"`` (no op like it at
    that place on the other side) or ``"changed"`` (the same op at the same place, with
    inputs that differ); ``partner`` names the node it was compared with, if any.
    """

    side: str
    kind: str
    node: str
    op: str
    target: str
    where: str
    partner: str | None = None
    detail: str = ""

    def describe(self) -> str:
        place = f" in {self.where}" if self.where else ""
        if self.kind == "changed":
            return (f"{self.node} ({self.op} {self.target}){place} is wired differently from reference "
                    f"{self.partner}" + (f": {self.detail}" if self.detail else ""))
        return f"{self.side} only: {self.node} ({self.op} {self.target}){place}" + (
            f" ({self.detail})" if self.detail else "")


@dataclass
class GraphComparison:
    """The result of :func:`compare_graphs`."""

    rewritten_nodes: int
    reference_nodes: int
    matched: int
    differences: list[GraphDifference]
    downstream: int  # unmatched nodes that only follow from the listed differences
    isomorphic: bool | None  # DiGraphMatcher's verdict, None when the graphs were too large
    ignored: list[str] = field(default_factory=list)  # nodes left out by rule 4 of the module doc

    @property
    def equal(self) -> bool:
        return not self.differences


# ----------------------------------------------------------------------------------------
# Tracing the reference
# ----------------------------------------------------------------------------------------

class _ConsistentNames(ExampleTracer):
    """The engine's tracer, with one parameter name per tensor when a module has two paths.

    A wrapper may register the same submodule twice (``causal_wan_model.blocks`` and the
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
    """Trace ``reference(*args, **kwargs, **rule_inputs)`` on a meta twin with the engine's tracer.

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
    twin = meta_twin(reference)
    tracer = _ConsistentNames(rule.trace_policy)
    positional = len(args)

    def call(root: ConcreteProxy, proxies: dict[str, Any]) -> Any:
        call_args = [_unpack(proxies[f"arg{i}"]) for i in range(positional)]
        call_kwargs = {k: _unpack(v) for k, v in proxies.items() if not k.startswith("arg")}
        call_kwargs.update(constants)
        return type(twin).forward(twin, *call_args, **call_kwargs)

    return tracer.trace_call(twin, meta_inputs(inputs), call)


# ----------------------------------------------------------------------------------------
# Tensor dataflow
# ----------------------------------------------------------------------------------------

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
    """``name`` through the key map; ``<wrapper>.name`` when it has no native name.

    Key maps work on state_dict keys (prefix rules), so a module path is mapped with a
    trailing dot.
    """
    try:
        mapped = names(name + "." if module else name)
    except SurgeryError:
        mapped = None
    if mapped is None:
        return f"<wrapper>.{name}"
    return mapped[:-1] if module and mapped.endswith(".") else mapped


def _owner(node: fx.Node, names: NameMap) -> str:
    """Native path of the module an opaque helper is called on (the graph's root is ``""``)."""
    owner = node.args[0] if node.args else None
    if not isinstance(owner, fx.Node):
        return ""
    path = "" if owner.op == "placeholder" else str(owner.target)
    return native_name(names, path, module=True) if path else native_name(names, "", module=True)


def _label(node: fx.Node, module: nn.Module, names: NameMap) -> tuple | None:
    """The node's comparison label, or None when the node is bookkeeping (see module doc)."""
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
            cls = type(module.get_submodule(str(node.target)))
            kind = next((c.__name__ for c in cls.__mro__ if not c.__module__.startswith(("surgery.",)) and
                         "Rewritten" not in c.__name__), cls.__name__)
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
    _prune_dead(g)
    return g


def _slot_key(slot: tuple) -> str:
    return ".".join(str(s) for s in slot)


def _target_str(node: fx.Node) -> str:
    return _fn_name(node.target) if node.op == "call_function" else str(node.target)


def _prune_dead(g: nx.DiGraph) -> None:
    roots = [n for n, d in g.nodes(data=True)
             if d["label"][0] in ("output", "call_module", "helper") or _is_mutation_label(d["label"])]
    live: set[str] = set(roots)
    for root in roots:
        live |= nx.ancestors(g, root)
    g.remove_nodes_from([n for n in list(g.nodes) if n not in live])


def _is_mutation_label(label: tuple) -> bool:
    name = label[-1] if label else ""
    return isinstance(name, str) and ((name.endswith("_") and not name.endswith("__")) or name == "setitem")


# ----------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------

def _digest(*parts: Any) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()


def _unordered(label: tuple) -> bool:
    return label[0] == "helper" or (label[0] in ("call_function", "call_method") and label[1] in _COMMUTATIVE)


def _in_slots(g: nx.DiGraph, n: str) -> list[tuple[str, str]]:
    """``(slot, producer)`` pairs of ``n``; slots are blanked for commutative ops and helpers."""
    blank = _unordered(g.nodes[n]["label"])
    pairs = [("" if blank else slot, p) for p in g.predecessors(n) for slot in g.edges[p, n]["slots"]]
    return sorted(set(pairs)) if blank else sorted(pairs)


def _out_slots(g: nx.DiGraph, n: str) -> list[tuple[str, str]]:
    """``(slot, consumer)`` pairs of ``n``, slots blanked where the consumer is unordered."""
    pairs = []
    for s in g.successors(n):
        blank = _unordered(g.nodes[s]["label"])
        for slot in g.edges[n, s]["slots"]:
            pairs.append(("" if blank else slot, s))
    return sorted(set(pairs))


def forward_hashes(g: nx.DiGraph) -> dict[str, str]:
    """Per node: a hash of its label and, per argument slot, of everything upstream."""
    out: dict[str, str] = {}
    for n in nx.topological_sort(g):
        out[n] = _digest(g.nodes[n]["label"], tuple(sorted((slot, out[p]) for slot, p in _in_slots(g, n))))
    return out


def reverse_hashes(g: nx.DiGraph) -> dict[str, str]:
    """Per node: a hash of its label and of everything downstream (by consumer slot)."""
    out: dict[str, str] = {}
    for n in reversed(list(nx.topological_sort(g))):
        out[n] = _digest(g.nodes[n]["label"], tuple(sorted((slot, out[s]) for slot, s in _out_slots(g, n))))
    return out


def _pair_by(a: Iterable[str], b: Iterable[str], key_a: Callable[[str], Any], key_b: Callable[[str], Any]
             ) -> dict[str, str]:
    """Pair nodes with equal keys (``None`` never pairs), first come first served."""
    groups: dict[Any, list[str]] = defaultdict(list)
    for n in b:
        key = key_b(n)
        if key is not None:
            groups[key].append(n)
    pairs = {}
    for n in a:
        key = key_a(n)
        bucket = groups.get(key) if key is not None else None
        if bucket:
            pairs[n] = bucket.pop(0)
    return pairs


def _exact_pairs(ours: nx.DiGraph, theirs: nx.DiGraph, order_a: list[str], order_b: list[str]) -> dict[str, str]:
    fa, fb = forward_hashes(ours), forward_hashes(theirs)
    ra, rb = reverse_hashes(ours), reverse_hashes(theirs)
    # Forward+reverse first (it separates look-alikes by their consumers), then forward only.
    pairs = _pair_by(order_a, order_b, lambda n: (fa[n], ra[n]), lambda n: (fb[n], rb[n]))
    taken = set(pairs.values())
    pairs.update(_pair_by([n for n in order_a if n not in pairs], [n for n in order_b if n not in taken],
                          fa.__getitem__, fb.__getitem__))
    # Hash pairs must also agree edge by edge (look-alikes may have been crossed).
    changed = True
    while changed:
        changed = False
        for a, b in list(pairs.items()):
            if sorted((slot, pairs.get(p) or "") for slot, p in _in_slots(ours, a)) != _in_slots(theirs, b):
                del pairs[a]
                changed = True
    return pairs


def _align(ours: nx.DiGraph, theirs: nx.DiGraph, pairs: dict[str, str], order_a: list[str],
           order_b: list[str]) -> dict[str, str]:
    """Extend the exact ``pairs`` to nodes at the same place whose surroundings differ.

    Three passes, repeated while they pair anything: nodes whose inputs are paired with
    each other's (forward, local), nodes with equal reverse hashes (everything downstream
    alike), nodes whose consumers are paired with each other's (reverse, local).
    """
    ra, rb = reverse_hashes(ours), reverse_hashes(theirs)

    def free_a(reverse: bool = False) -> list[str]:
        return [n for n in (reversed(order_a) if reverse else order_a) if n not in pairs]

    def free_b(reverse: bool = False) -> list[str]:
        taken = set(pairs.values())
        return [n for n in (reversed(order_b) if reverse else order_b) if n not in taken]

    def forward_a(n: str) -> Any:
        slots = _in_slots(ours, n)
        if any(p not in pairs for _, p in slots):
            return None
        return ours.nodes[n]["label"], tuple(sorted((slot, pairs[p]) for slot, p in slots))

    def forward_b(n: str) -> Any:
        return theirs.nodes[n]["label"], tuple(_in_slots(theirs, n))

    def reverse_a(n: str) -> Any:
        slots = _out_slots(ours, n)
        if not slots or any(c not in pairs for _, c in slots):
            return None
        return ours.nodes[n]["label"], tuple(sorted((slot, pairs[c]) for slot, c in slots))

    def reverse_b(n: str) -> Any:
        return theirs.nodes[n]["label"], tuple(_out_slots(theirs, n))

    progress = True
    while progress:
        progress = False
        for key_a, key_b, reverse in ((forward_a, forward_b, False),
                                      (lambda n: (ours.nodes[n]["label"], ra[n]),
                                       lambda n: (theirs.nodes[n]["label"], rb[n]), True),
                                      (reverse_a, reverse_b, True)):
            while True:
                new = _pair_by(free_a(reverse), free_b(reverse), key_a, key_b)
                if not new:
                    break
                pairs.update(new)
                progress = True
    return pairs


def compare_dataflow(ours: nx.DiGraph, theirs: nx.DiGraph, *, vf2_limit: int = VF2_LIMIT) -> GraphComparison:
    """Compare two dataflow graphs (``ours`` = rewritten, ``theirs`` = reference)."""
    order_a = list(nx.topological_sort(ours))
    order_b = list(nx.topological_sort(theirs))
    ignored = _resolve_wrapper_helpers(ours, theirs, _exact_pairs(ours, theirs, order_a, order_b))
    order_b = list(nx.topological_sort(theirs))
    exact = _exact_pairs(ours, theirs, order_a, order_b)
    pairs = _align(ours, theirs, dict(exact), order_a, order_b)
    back = {b: a for a, b in pairs.items()}
    differences: list[GraphDifference] = []
    for n in order_a:
        if n not in pairs:
            differences.append(_only("rewritten", ours, n))
    for n in order_b:
        if n not in back:
            differences.append(_only("reference", theirs, n))
    downstream = 0
    for a in order_a:
        if a not in pairs or a in exact:
            continue
        b = pairs[a]
        slots = _in_slots(ours, a)
        if all(p in pairs for _, p in slots) and sorted((slot, pairs[p]) for slot, p in slots) != _in_slots(theirs, b):
            # Same op at the same place, reading other (matched) values: rewired.
            data = ours.nodes[a]
            differences.append(GraphDifference("rewritten", "changed", a, data["op"], data["target"], data["where"],
                                               b, _slot_detail(slots, _in_slots(theirs, b), pairs)))
        else:
            downstream += 1
    isomorphic = None
    if not differences and max(len(ours), len(theirs)) <= vf2_limit:
        matcher = nx.algorithms.isomorphism.DiGraphMatcher(
            ours, theirs, node_match=lambda x, y: x["label"] == y["label"],
            edge_match=lambda x, y: x["slots"] == y["slots"])
        isomorphic = matcher.is_isomorphic()
        if not isomorphic:
            differences.append(GraphDifference("rewritten", "only", "<graph>", "", "", "",
                                               detail="every node was paired but networkx finds no isomorphism"))
    return GraphComparison(len(ours), len(theirs), len(exact), differences, downstream, isomorphic, ignored)


def _resolve_wrapper_helpers(ours: nx.DiGraph, theirs: nx.DiGraph, exact: dict[str, str]) -> list[str]:
    """Rule 4 of the module docstring: give each wrapper helper the label it stands for, or drop it.

    A wrapper helper (an opaque call on the reference's wrapper, which has no native name)
    forwards to a helper of the wrapped model inside opaque code. It takes the label of the
    unmatched rewritten helper call that reads exactly the same tensors; without one it is
    removed with the nodes that only fed it. Returns notes for the report.
    """
    back = {b: a for a, b in exact.items()}
    free = [n for n, d in ours.nodes(data=True) if d["label"][0] == "helper" and n not in exact]
    notes: list[str] = []
    drop: list[str] = []

    def inputs(g: nx.DiGraph, n: str) -> set[str]:
        return {p for p in g.predecessors(n) if g.nodes[p]["label"][0] == "input"}

    for w in sorted(n for n, d in theirs.nodes(data=True) if d.get("wrapper_helper") and n not in back):
        reads = set(theirs.predecessors(w))
        # Same input containers (caches), then the most inputs in common.
        candidates = [h for h in free if {exact.get(p) for p in inputs(ours, h)} == inputs(theirs, w)
                      and inputs(theirs, w)]
        if candidates:
            h = max(candidates, key=lambda c: len({exact.get(p) for p in ours.predecessors(c)} & reads))
            notes.append(f"reference {w} (wrapper helper {theirs.nodes[w]['target']}) stands for "
                         f"rewritten {h} ({ours.nodes[h]['target']})")
            theirs.nodes[w]["label"] = ours.nodes[h]["label"]
            free.remove(h)
        else:
            drop.append(w)
    if drop:
        targets = {w: theirs.nodes[w]["target"] for w in drop}
        before = set(theirs.nodes)
        theirs.remove_nodes_from(drop)
        _prune_dead(theirs)
        fed = sorted(before - set(theirs.nodes) - set(drop))
        notes += [f"reference {w} (wrapper helper {targets[w]}) has no counterpart call: dropped" for w in drop]
        notes += [f"reference {n} only fed a dropped wrapper helper" for n in fed]
    return notes


def _only(side: str, g: nx.DiGraph, n: str) -> GraphDifference:
    data = g.nodes[n]
    inputs = [p for _, p in _in_slots(g, n)]
    users = sorted(g.successors(n))
    parts = []
    if inputs:
        parts.append("reads " + ", ".join(inputs[:4]) + (" ..." if len(inputs) > 4 else ""))
    if users:
        parts.append("feeds " + ", ".join(users[:4]) + (" ..." if len(users) > 4 else ""))
    return GraphDifference(side, "only", n, data["op"], data["target"], data["where"], detail="; ".join(parts))


def _slot_detail(ours: list[tuple[str, str]], theirs: list[tuple[str, str]], pairs: dict[str, str]) -> str:
    """Which argument slots read other values, in the reference's node names."""
    mine: dict[str, list[str]] = defaultdict(list)
    for slot, p in ours:
        mine[slot].append(pairs[p])
    other: dict[str, list[str]] = defaultdict(list)
    for slot, p in theirs:
        other[slot].append(p)
    parts = []
    for slot in sorted(set(mine) | set(other)):
        left, right = sorted(mine.get(slot, [])), sorted(other.get(slot, []))
        if left != right:
            name = f"argument {slot}" if slot else "operands"
            parts.append(f"{name} read the counterparts of {', '.join(left) or '-'}, "
                         f"the reference reads {', '.join(right) or '-'}")
    return "; ".join(parts[:3])


def compare_graphs(rewritten: fx.Graph, rewritten_module: nn.Module, reference: fx.Graph,
                   reference_module: nn.Module, to_native: NameMap) -> GraphComparison:
    """Compare the rewritten graph with the reference graph as tensor dataflow.

    ``to_native`` maps a reference module path or state_dict key to its native name
    (``None`` for modules that only the wrapper has); the rewritten model's names are native.
    """
    ours = dataflow(rewritten, rewritten_module, lambda name: name)
    theirs = dataflow(reference, reference_module, to_native)
    return compare_dataflow(ours, theirs)


__all__ = ["GraphComparison", "GraphDifference", "compare_dataflow", "compare_graphs", "dataflow",
           "forward_hashes", "reverse_hashes", "trace_reference"]
