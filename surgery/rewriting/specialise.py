"""One specialisation: trace a call, match the rule's pattern, apply its actions, compile.

A specialised graph is valid only for calls that satisfy its :class:`GuardSet`. The
model's own Python runs once per specialisation (on a fake twin); afterwards calls run
the generated code directly.
"""
from __future__ import annotations

import inspect
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import RuleError, TraceError
from ..matching.matcher import Match, MatchResult, expect_count, find_units
from ..matching.pattern import CallView
from ..rule import Rule, Site, Where, as_rules, combined_inputs, combined_policy
from ..tracing.guards import GuardSet, evaluate, resolve_path, snapshot_compiled, snapshot_state, tensor_kind
from ..tracing.recheck import ShapeRecheck
from ..tracing.tracer import ConcreteProxy, ExampleTracer, ModuleCall, Trace, tensor_names
from ..tracing.twin import fake_inputs, fake_mode_of, fake_twin, new_fake_mode
from .compiled import argument_nodes, call_sites, strip_compiled
from .hoist import hoist_rule_code
from .outline import ModuleCallSite, _pure, find_instances, outlined_graph, template_functions


def input_kind(value: Any) -> tuple:
    if value is None:
        return ("none",)
    if isinstance(value, torch.Tensor):
        return ("tensor",) + tensor_kind(value)  # sizes: see GuardSet.shapes
    return (type(value).__name__,)


def call_signature(inputs: dict[str, Any]) -> tuple:
    return tuple((name, input_kind(value)) for name, value in inputs.items())


@dataclass
class Specialisation:
    """A compiled graph plus the guards under which it is valid."""

    guards: GuardSet
    graph: fx.Graph
    code: str
    fn: Callable[..., Any]
    input_names: list[str]
    matches: list[Match]
    trace_s: float
    rewrite_s: float
    leaf_calls: dict[str, list[str]] = field(default_factory=dict)
    replaced: dict[fx.Node, fx.Node] = field(default_factory=dict)  # injected value -> the value it replaced
    entry: str = "forward"  # the base method the graph was traced from
    base: fx.Graph | None = None  # the base graph, kept only where the rule dropped nodes (Where.REPLACE)

    def base_graph(self) -> fx.Graph:
        """The graph as traced, before the rule's actions (see :func:`without_rule`)."""
        return self.base_graph_source()()

    def base_graph_source(self) -> Callable[[], fx.Graph]:
        """:meth:`base_graph` for later, holding the graphs but not this specialisation, so an
        evicted specialisation is freed while an ``ApplyResult`` still offers its base graph."""
        base, graph, replaced = self.base, self.graph, self.replaced
        return lambda: base if base is not None else without_rule(graph, replaced)

    def __call__(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return self.fn(model, model, *[inputs[name] for name in self.input_names])


def trace_base(model: nn.Module, base_cls: type, rule: Rule | Sequence[Rule], inputs: dict[str, Any],
               base_names: list[str], positional: int, entry: str = "forward"
               ) -> tuple[ExampleTracer, Trace, nn.Module]:
    """Trace ``base_cls.<entry>`` (``forward``, or a method it dispatches to) on a fake twin of
    ``model`` with example ``inputs`` (once for several composed rules, under all their policies)."""
    mode = new_fake_mode()
    twin = fake_twin(model, mode)
    twin.__class__ = base_cls
    strip_compiled(twin)  # trace each module's own forward, not a compiled call of the real one
    tracer = ExampleTracer(combined_policy(rule))

    def call(root_proxy: ConcreteProxy, proxies: dict[str, Any]) -> Any:
        names = [f"arg{i}" for i in range(positional)]
        kwargs = {name: proxies[name] for name in base_names if name not in names}  # a keyword may be called ``args``
        return getattr(base_cls, entry)(twin, *[proxies[name] for name in names], **kwargs)

    trace = tracer.trace_call(twin, fake_inputs(inputs, mode), call)
    return tracer, trace, twin


def match(trace: Trace, twin: nn.Module, rule: Rule, model: nn.Module) -> MatchResult:
    result = find_units(trace, twin, rule.pattern)
    expected = rule.expected(model) if rule.expected is not None else None
    if expected is not None:
        expect_count(result, rule.pattern, expected, rule.name, rule.count_option)
    elif not result.matches:
        expect_count(result, rule.pattern, 1, rule.name, rule.count_option)
    count = len(result.matches)
    result.matches = [Match(m.name, m.cls, m.position, rule.assign(m.position, count)) for m in result.matches]
    return result


def _site(view: CallView, match_: Match, stream: Any, tracer: ExampleTracer, rule: Rule,
          twin: nn.Module, scratch: dict, output: Any = None) -> Site:
    signature = inspect.signature(type(view.call.module).forward)
    bound = signature.bind(view.call.module, *view.call.args, **view.call.kwargs)
    arguments = dict(list(bound.arguments.items())[1:])
    params = list(signature.parameters.values())[1:]
    required = {p.name: arguments[p.name] for p in params[1:]
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name in arguments}
    rule_inputs = {name: tracer.input_proxies.get(name) for name in rule.inputs}
    return Site(match_, stream, arguments, required, rule_inputs, twin, scratch, output)


def rewrite(tracer: ExampleTracer, trace: Trace, result: MatchResult, rule: Rule,
            twin: nn.Module, latest: dict[Any, Any] | None = None,
            replaced: dict[fx.Node, fx.Node] | None = None) -> dict[fx.Node, fx.Node]:
    """Apply the rule's actions to the traced graph, in place; returns replacement -> replaced.

    ``latest`` (shared by composed rules) holds the value an earlier action put in place of a
    unit's stream: an action after or before the same unit reads that value, so actions at one
    site run in order (the first rule's first).
    """
    graph = trace.graph
    scratch: dict[str, Any] = {}
    replaced = {} if replaced is None else replaced
    latest = {} if latest is None else latest
    for where, action in rule.actions:
        if where is Where.BEFORE_FIRST:
            view, match_ = result.views[0], result.matches[0]
            stream = view.call.args[0]
            with tracer.patched(action), graph.inserting_before(view.nodes[0]):
                tracer.run(action, _site(view, match_, stream, tracer, rule, twin, scratch))
            continue
        for view, match_ in zip(result.views, result.matches):
            site = _Placed(graph, view, match_, rule, tracer, action)
            if where is Where.AFTER_EACH:
                out = view.call.output
                stream = latest.get(view.stream_out, out[0] if isinstance(out, (tuple, list)) else out)
                anchor = stream.node if view.stream_out in latest else view.stream_out
                replacement = site.run(anchor.next, _site(view, match_, stream, tracer, rule, twin, scratch, out))
                if replacement is not None:
                    site.reroute(anchor, replacement, replaced)
                    latest[view.stream_out] = replacement
            elif where is Where.BEFORE_EACH:
                key = (site.stream_input(), view.nodes[0])
                stream = latest.get(key, view.call.args[0])
                stream_in = stream.node if key in latest else key[0]
                replacement = site.run(site.unit_nodes()[0], _site(view, match_, stream, tracer, rule, twin, scratch))
                if replacement is not None:
                    site.reroute(stream_in, replacement, replaced, only=set(view.nodes))
                    latest[key] = replacement
            elif where is Where.REPLACE:
                site.stream_input()
                replacement = site.run(site.unit_nodes()[-1].next, _site(view, match_, view.call.args[0], tracer,
                                                                         rule, twin, scratch, view.call.output))
                if replacement is not None:
                    for old, new in site.output_pairs(replacement):
                        site.reroute(old, new, replaced, keep=set(view.nodes))
                    _drop_unused(graph, site.unit_nodes(), twin)
            else:  # pragma: no cover - enum is closed
                raise TraceError(f"unknown action position {where}")
    graph.lint()
    return replaced


@dataclass
class _Placed:
    """One action at one matched unit: runs it at a place in the graph and rewires its result."""

    graph: fx.Graph
    view: CallView
    match: Match
    rule: Rule
    tracer: ExampleTracer
    action: Callable[[Site], Any]
    created: set[fx.Node] = field(default_factory=set)

    def unit_nodes(self) -> list[fx.Node]:
        """The unit's nodes still in the graph, in graph order."""
        nodes = [n for n in self.view.nodes if not n._erased]
        if not nodes:
            raise TraceError(f"rule '{self.rule.name}' acts inside {self.match.name}, whose call left no operations "
                             "in the graph", "act after the unit (Where.AFTER_EACH) instead")
        return nodes

    def stream_input(self) -> fx.Node:
        if self.view.stream_in is None:
            raise TraceError(f"rule '{self.rule.name}' needs the input stream of {self.match.name}, whose first "
                             "argument is not a traced value", "match units whose first argument is a tensor")
        return self.view.stream_in

    def run(self, before: fx.Node, site: Site) -> Any:
        """The action's result, its code inserted before ``before`` (marked as injected when
        it returns a value; otherwise :func:`finish` marks it as the rule's branch)."""
        start, after = len(self.tracer.created_nodes), before.prev
        with self.tracer.patched(self.action), self.graph.inserting_before(before):
            result = self.tracer.run(self.action, site)
        # What the tracer created and what landed at the insertion point, rather than a set of
        # the whole graph before and after each site (thirty sites of 7,000 nodes at 1.3B).
        self.created = {n for n in self.tracer.created_nodes[start:] if not n._erased}
        node = after.next
        while node is not before:
            self.created.add(node)
            node = node.next
        if result is not None:
            for node in self.created:
                node.meta.setdefault("surgery", {"rule": self.rule.name, "role": "inject",
                                                 "index": self.match.index})
        return result

    def reroute(self, old: fx.Node, new: Any, replaced: dict[fx.Node, fx.Node], only: set | None = None,
                keep: set = frozenset()) -> None:
        """Readers of ``old`` read ``new`` instead: all but the action's own and ``keep``, or ``only`` those."""
        if not isinstance(new, fx.Proxy):
            raise RuleError(f"rule '{self.rule.name}' returned {type(new).__name__} at {self.match.name} where a "
                            "traced value was replaced", "return a tensor computed from the site's values, or None")
        if only is not None:
            old.replace_all_uses_with(new.node, delete_user_cb=lambda user: user in only)
        else:
            old.replace_all_uses_with(new.node, delete_user_cb=lambda user: user not in self.created
                                      and user not in keep)
        replaced[new.node] = old

    def output_pairs(self, replacement: Any) -> list[tuple[fx.Node, Any]]:
        """(old output node, its replacement) for a result shaped like the unit's output."""
        old_leaves, old_spec = pytree.tree_flatten(self.view.call.output)
        new_leaves, new_spec = pytree.tree_flatten(replacement)
        if old_spec != new_spec:
            raise RuleError(f"rule '{self.rule.name}' replaced the output of {self.match.name} with a value of "
                            f"another structure ({new_spec.num_leaves} values for {old_spec.num_leaves})",
                            "return a value shaped like site.output")
        pairs = []
        for old, new in zip(old_leaves, new_leaves):
            if isinstance(old, ConcreteProxy):
                if not (isinstance(new, fx.Proxy) and new.node is old.node):  # kept as it was
                    pairs.append((old.node, new))
            elif new is not old:
                raise RuleError(f"rule '{self.rule.name}' changed the constant {old!r} in the output of "
                                f"{self.match.name}", "keep the values of site.output that are not tensors")
        return pairs


def _drop_unused(graph: fx.Graph, nodes: list[fx.Node], root: nn.Module) -> None:
    """Erase the replaced unit's nodes that nothing reads and that have no side effects."""
    for node in reversed(nodes):
        if node.users:
            continue
        if node.op == "call_module":
            # Built-in layers are pure; a model's own leaf may write a cache.
            if not type(root.get_submodule(node.target)).__module__.startswith("torch.nn."):
                continue
        elif not _pure(node):
            continue
        graph.erase_node(node)


def without_rule(graph: fx.Graph, replaced: dict[fx.Node, fx.Node]) -> fx.Graph:
    """A copy of ``graph`` without the nodes a rule added, every injected value's uses given
    back to the value it replaced: the base graph, rebuilt only when a report asks for it."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in replaced:
            env[node] = env[replaced[node]]
        elif "surgery" not in node.meta:
            env[node] = copy.node_copy(node, env.__getitem__)
    prune_resolved(copy)  # values only the rule's nodes read
    return copy


def base_copy(graph: fx.Graph) -> fx.Graph:
    """A pruned copy of the traced graph, for a rule whose actions erase base nodes (which
    :func:`without_rule` cannot give back)."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    prune_resolved(copy)
    return copy


def prune_resolved(graph: fx.Graph, keep: set[fx.Node] = frozenset()) -> int:  # type: ignore[assignment]
    """Drop pure nodes nobody uses (but ``keep``): values the tracer only computed to resolve
    Python control flow (device checks, asserts, lengths), now replaced by guards."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method", "get_attr") or node in keep:
            continue
        if node.op == "call_method" and (node.target.endswith("_") or "opaque_helper" in node.meta):
            continue
        if node.op == "call_function" and node.target is operator.setitem:
            continue
        graph.erase_node(node)
        removed += 1
    return removed


def compile_graph(graph: fx.Graph, calls: Sequence[ModuleCall] = (),
                  module_calls: Sequence[ModuleCallSite] = ()) -> tuple[str, Callable[..., Any]]:
    """Generate Python for ``graph`` whose ``self`` is the live model (PEFT-visible).

    With the trace's module ``calls``, blocks replayed from one template share one
    generated function (see :mod:`.outline`); the source returned lists those first.
    Compiled modules (``module_calls``) are called as modules, so their compiled call runs.
    """
    taken = {node for site in module_calls for node in site.instance.body}
    groups = find_instances(graph, calls, taken)
    templates = template_functions(groups, compile_graph)
    if groups or module_calls:
        graph = outlined_graph(graph, groups, [fn for _, fn in templates], module_calls)
    for node in graph.nodes:
        # fx marks autowrapped calls so that a retrace re-wraps them; this code is never retraced.
        node.meta.pop("is_wrapped", None)
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<surgery-specialisation>", "exec"), namespace)
    return "".join(source for source, _ in templates) + code.src, namespace["forward"]


def specialise(model: nn.Module, base_cls: type, rule: Rule | Sequence[Rule], inputs: dict[str, Any],
               positional: int, entry: str = "forward") -> tuple[Specialisation, Trace, MatchResult]:
    """Build the specialisation for ``inputs`` of a call of ``entry`` (real values; nothing real is executed).

    Several rules (a composed model, in application order) share one trace of the base code;
    each rule's pattern is matched on that base graph, so no rule matches another's grafts.
    The match result returned is the last rule's.
    """
    rules = as_rules(rule)
    rule_inputs = combined_inputs(rules)
    base_names = [n for n in inputs if n not in rule_inputs]
    started = time.perf_counter()
    tracer, trace, twin = trace_base(model, base_cls, rules, inputs, base_names, positional, entry)
    trace_s = time.perf_counter() - started
    results = [match(trace, twin, r, model) for r in rules]
    spec = finish(model, tracer, trace, results, rules, twin, inputs, trace_s)
    spec.entry = entry
    return spec, trace, results[-1]


def finish(model: nn.Module, tracer: ExampleTracer, trace: Trace, result: MatchResult | Sequence[MatchResult],
           rule: Rule | Sequence[Rule], twin: nn.Module, inputs: dict[str, Any], trace_s: float) -> Specialisation:
    """Apply the rules' actions (several: in order, each with its own match result) to a traced,
    matched graph, compile it and record its guards."""
    started = time.perf_counter()
    rules = as_rules(rule)
    results = [result] if isinstance(result, MatchResult) else list(result)
    base = base_copy(trace.graph) if any(where is Where.REPLACE for r in rules for where, _ in r.actions) else None
    replaced: dict[fx.Node, fx.Node] = {}
    latest: dict[Any, Any] = {}
    for each, matched in zip(rules, results):
        before = set(trace.graph.nodes)
        rewrite(tracer, trace, matched, each, twin, latest, replaced)
        for node in trace.graph.nodes:
            if node not in before and "surgery" not in node.meta:
                node.meta["surgery"] = {"rule": each.name, "role": "branch", "index": None}
    hoist_rule_code(trace.graph, tracer.calls, twin)  # above opaque calls it does not need (a graph break less)
    # Before pruning: the nodes that only fed Python decisions are what a recheck evaluates.
    recheck = ShapeRecheck(trace.graph, tracer.concretised, tracer.calls, twin)
    compiled = snapshot_compiled(model, tracer.traced_modules)
    as_modules = {path for path, call in compiled.items() if call is not None}
    prune_resolved(trace.graph, keep=argument_nodes(tracer.calls, as_modules))
    code, fn = compile_graph(trace.graph, tracer.calls, call_sites(trace.graph, tracer, as_modules, replaced,
                                                                    " + ".join(r.name for r in rules)))
    rewrite_s = time.perf_counter() - started
    shaped = dict.fromkeys(dep[1] for dep in tracer.deps if dep[0] == "input" and dep[2] == "meta"
                           and isinstance(resolve_path(inputs, dep[1]), torch.Tensor))
    guards = GuardSet(
        signature=call_signature(inputs),
        deps={dep: evaluate(dep, inputs, model) for dep in tracer.deps},
        state=snapshot_state(model, [""] + tracer.traced_modules, tracer.attributes_read),
        notes=list(tracer.notes),
        shapes={path: tuple(resolve_path(inputs, path).shape) for path in shaped},
        recheck=recheck,
        compiled=compiled,
    )
    return Specialisation(guards, trace.graph, code, fn, list(trace.inputs), results[-1].matches, trace_s, rewrite_s,
                          dict(tracer.leaf_calls), replaced, base=base)


def add_modules(tracer: ExampleTracer, twin: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Make freshly grafted modules visible to an ongoing trace (as fake twins)."""
    mode = fake_mode_of(twin)
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")  # a graft may live inside a block
        twin.get_submodule(parent).add_module(leaf, fake_twin(module, mode))
    tracer.submodule_paths = {mod: name for name, mod in twin.named_modules()}
    tracer._param_names = tensor_names(twin)
