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

from ..errors import TraceError
from ..matching.matcher import Match, MatchResult, expect_count, find_chain
from ..matching.pattern import CallView
from ..rule import Rule, Site, Where
from ..tracing.guards import GuardSet, evaluate, resolve_path, snapshot_state, tensor_kind
from ..tracing.recheck import ShapeRecheck
from ..tracing.tracer import ConcreteProxy, ExampleTracer, ModuleCall, Trace, tensor_names
from ..tracing.twin import fake_inputs, fake_mode_of, fake_twin, new_fake_mode
from .outline import find_instances, outlined_graph, template_function


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

    def base_graph(self) -> fx.Graph:
        """The graph as traced, before the rule's actions (see :func:`without_rule`)."""
        return without_rule(self.graph, self.replaced)

    def __call__(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return self.fn(model, model, *[inputs[name] for name in self.input_names])


def trace_base(model: nn.Module, base_cls: type, rule: Rule, inputs: dict[str, Any],
               base_names: list[str], positional: int, entry: str = "forward"
               ) -> tuple[ExampleTracer, Trace, nn.Module]:
    """Trace ``base_cls.<entry>`` (``forward``, or a method it dispatches to) on a fake twin of
    ``model`` with example ``inputs``."""
    mode = new_fake_mode()
    twin = fake_twin(model, mode)
    twin.__class__ = base_cls
    tracer = ExampleTracer(rule.trace_policy)

    def call(root_proxy: ConcreteProxy, proxies: dict[str, Any]) -> Any:
        names = [f"arg{i}" for i in range(positional)]
        kwargs = {name: proxies[name] for name in base_names if name not in names}  # a keyword may be called ``args``
        return getattr(base_cls, entry)(twin, *[proxies[name] for name in names], **kwargs)

    trace = tracer.trace_call(twin, fake_inputs(inputs, mode), call)
    return tracer, trace, twin


def match(trace: Trace, twin: nn.Module, rule: Rule, model: nn.Module) -> MatchResult:
    result = find_chain(trace, twin, rule.pattern)
    expected = rule.expected(model) if rule.expected is not None else None
    if expected is not None:
        expect_count(result, rule.pattern, expected, rule.name)
    elif not result.matches:
        expect_count(result, rule.pattern, 1, rule.name)
    count = len(result.matches)
    result.matches = [Match(m.name, m.cls, m.position, rule.assign(m.position, count)) for m in result.matches]
    return result


def _site(view: CallView, match_: Match, stream: Any, tracer: ExampleTracer, rule: Rule,
          twin: nn.Module, scratch: dict) -> Site:
    signature = inspect.signature(type(view.call.module).forward)
    bound = signature.bind(view.call.module, *view.call.args, **view.call.kwargs)
    arguments = dict(list(bound.arguments.items())[1:])
    params = list(signature.parameters.values())[1:]
    required = {p.name: arguments[p.name] for p in params[1:]
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name in arguments}
    rule_inputs = {name: tracer.input_proxies.get(name) for name in rule.inputs}
    return Site(match_, stream, arguments, required, rule_inputs, twin, scratch)


def rewrite(tracer: ExampleTracer, trace: Trace, result: MatchResult, rule: Rule,
            twin: nn.Module) -> dict[fx.Node, fx.Node]:
    """Apply the rule's actions to the traced graph, in place; returns replacement -> replaced."""
    graph = trace.graph
    scratch: dict[str, Any] = {}
    replaced: dict[fx.Node, fx.Node] = {}
    for where, action in rule.actions:
        if where is Where.BEFORE_FIRST:
            view, match_ = result.views[0], result.matches[0]
            stream = view.call.args[0]
            with tracer.patched(action), graph.inserting_before(view.nodes[0]):
                tracer.run(action, _site(view, match_, stream, tracer, rule, twin, scratch))
        elif where is Where.AFTER_EACH:
            for view, match_ in zip(result.views, result.matches):
                out = view.call.output
                stream = out[0] if isinstance(out, (tuple, list)) else out
                before = set(graph.nodes)
                with tracer.patched(action), graph.inserting_before(view.stream_out.next):
                    replacement = tracer.run(action, _site(view, match_, stream, tracer, rule, twin, scratch))
                if replacement is None:
                    continue
                created = set(graph.nodes) - before
                for node in created:
                    node.meta.setdefault("surgery", {"rule": rule.name, "role": "inject", "index": match_.hint_index})
                view.stream_out.replace_all_uses_with(replacement.node, delete_user_cb=lambda user: user not in created)
                replaced[replacement.node] = view.stream_out
        else:  # pragma: no cover - enum is closed
            raise TraceError(f"unknown action position {where}")
    graph.lint()
    return replaced


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


def prune_resolved(graph: fx.Graph) -> int:
    """Drop pure nodes nobody uses: values the tracer only computed to resolve Python
    control flow (device checks, asserts, lengths), now replaced by guards."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method", "get_attr"):
            continue
        if node.op == "call_method" and (node.target.endswith("_") or "opaque_helper" in node.meta):
            continue
        if node.op == "call_function" and node.target is operator.setitem:
            continue
        graph.erase_node(node)
        removed += 1
    return removed


def compile_graph(graph: fx.Graph, calls: Sequence[ModuleCall] = ()) -> tuple[str, Callable[..., Any]]:
    """Generate Python for ``graph`` whose ``self`` is the live model (PEFT-visible).

    With the trace's module ``calls``, blocks replayed from one template share one
    generated function (see :mod:`.outline`); the source returned lists those first.
    """
    groups = find_instances(graph, calls)
    templates = [template_function(members[0], f"surgery_template_{i}", compile_graph)
                 for i, members in enumerate(groups)]
    if groups:
        graph = outlined_graph(graph, groups, [fn for _, fn in templates])
    for node in graph.nodes:
        # fx marks autowrapped calls so that a retrace re-wraps them; this code is never retraced.
        node.meta.pop("is_wrapped", None)
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<surgery-specialisation>", "exec"), namespace)
    return "".join(source for source, _ in templates) + code.src, namespace["forward"]


def specialise(model: nn.Module, base_cls: type, rule: Rule, inputs: dict[str, Any], positional: int,
               entry: str = "forward") -> tuple[Specialisation, Trace, MatchResult]:
    """Build the specialisation for ``inputs`` of a call of ``entry`` (real values; nothing real is executed)."""
    base_names = [n for n in inputs if n not in rule.inputs]
    started = time.perf_counter()
    tracer, trace, twin = trace_base(model, base_cls, rule, inputs, base_names, positional, entry)
    trace_s = time.perf_counter() - started
    result = match(trace, twin, rule, model)
    spec = finish(model, tracer, trace, result, rule, twin, inputs, trace_s)
    spec.entry = entry
    return spec, trace, result


def finish(model: nn.Module, tracer: ExampleTracer, trace: Trace, result: MatchResult, rule: Rule,
           twin: nn.Module, inputs: dict[str, Any], trace_s: float) -> Specialisation:
    """Apply the rule's actions to a traced, matched graph, compile it and record its guards."""
    started = time.perf_counter()
    before = set(trace.graph.nodes)
    replaced = rewrite(tracer, trace, result, rule, twin)
    for node in trace.graph.nodes:
        if node not in before and "surgery" not in node.meta:
            node.meta["surgery"] = {"rule": rule.name, "role": "branch", "index": None}
    # Before pruning: the nodes that only fed Python decisions are what a recheck evaluates.
    recheck = ShapeRecheck(trace.graph, tracer.concretised, tracer.calls, twin) \
        if tracer.shape_specific is None else None
    prune_resolved(trace.graph)
    code, fn = compile_graph(trace.graph, tracer.calls)
    rewrite_s = time.perf_counter() - started
    shaped = dict.fromkeys(dep[1] for dep in tracer.deps if dep[0] == "input" and dep[2] == "meta"
                           and isinstance(resolve_path(inputs, dep[1]), torch.Tensor))
    guards = GuardSet(
        signature=call_signature(inputs),
        deps={dep: evaluate(dep, inputs, model) for dep in tracer.deps},
        state=snapshot_state(model, [""] + tracer.traced_modules),
        notes=list(tracer.notes),
        shapes={path: tuple(resolve_path(inputs, path).shape) for path in shaped},
        recheck=recheck,
        shape_specific=tracer.shape_specific,
    )
    return Specialisation(guards, trace.graph, code, fn, list(trace.inputs), result.matches, trace_s, rewrite_s,
                          dict(tracer.leaf_calls), replaced)


def add_modules(tracer: ExampleTracer, twin: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Make freshly grafted modules visible to an ongoing trace (as fake twins)."""
    mode = fake_mode_of(twin)
    for name, module in modules.items():
        twin.add_module(name, fake_twin(module, mode))
    tracer.submodule_paths = {mod: name for name, mod in twin.named_modules()}
    tracer._param_names = tensor_names(twin)
