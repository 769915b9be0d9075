"""``surgery.apply``: a function from (model, rule) to a new, rewritten model."""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import GraftError, OrderError
from .lora.order import peft_owner
from .matching.matcher import Match
from .module import SurgeryState, rewritten_class
from .rewriting.specialise import add_modules, finish, match, prune_resolved, trace_base
from .rule import GraftContext, Rule
from .tracing.guards import Guard
from .tracing.twin import share_tree


@dataclass(frozen=True)
class Grafted:
    """A module surgery added: its name, parameter count and parameter shapes."""

    name: str
    params: int
    shapes: dict[str, tuple]


@dataclass
class ApplyResult:
    """What :func:`apply` returns. ``module`` is the input model itself after a dry run.

    ``base_graph`` (the traced graph before the rule's actions, for reports and diffs) is
    rebuilt from ``graph`` on first access, so surgery itself never copies a graph.
    """

    module: nn.Module
    rule: Rule
    model_name: str
    matches: list[Match]
    grafted: list[Grafted]
    guards: list[Guard]
    graph: fx.Graph | None
    base_graph_source: Callable[[], fx.Graph] = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    leaf_calls: dict[str, list[str]] = field(default_factory=dict)
    dry_run: bool = False
    _base_graph: fx.Graph | None = field(default=None, repr=False)

    @property
    def base_graph(self) -> fx.Graph:
        if self._base_graph is None:
            self._base_graph = self.base_graph_source()
        return self._base_graph


def check_order(model: nn.Module, rule: Rule) -> None:
    """Refuse models that already carry this rule's grafts or LoRA layers (Base -> VACE -> LoRA)."""
    order = "surgery runs in the order Base -> VACE -> LoRA"
    if "_surgery" in model.__dict__:
        raise OrderError(f"the model was already rewritten by rule '{model.__dict__['_surgery'].rule.name}'",
                         f"apply rules to the original base model; {order}")
    owner = peft_owner(model)
    if owner is not None:
        raise OrderError(f"the model is already LoRA-wrapped ({owner[0]} is {owner[1]}); {order}",
                         "apply surgery to the base model first, then wrap the result with PEFT")
    prefixes = tuple(rule.weight_prefixes)
    carried = [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]
    if carried:
        raise OrderError(f"the model already carries {rule.name} modules ({carried[0]}, ...)",
                         f"start from the base model without {rule.name}; {order}")


def _stream_source(view_stream: fx.Node, inputs: dict[str, fx.Node]) -> tuple[str | None, str | None]:
    """The input and the leaf module that embed the residual stream (e.g. a patch embedding)."""
    seen, stack = set(), [view_stream]
    embedder = None
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and embedder is None:
            embedder = node.target
        stack.extend(node.all_input_nodes)
    names = {node: name for name, node in inputs.items()}
    for node in seen:
        if node in names and isinstance(node.meta.get("example_value"), torch.Tensor):
            return names[node], embedder
    return None, embedder


def apply(model: nn.Module, rule: Rule, *, example_inputs: tuple[tuple, dict], dry_run: bool = False,
          graft_init: str = "zeros") -> ApplyResult:
    """Rewrite ``model`` by ``rule`` and return a new model; the input is never modified.

    Args:
        model: the base model (not LoRA-wrapped, not already rewritten).
        rule: the rule, e.g. ``rules.vace.rule()``.
        example_inputs: ``(args, kwargs)`` of a typical call of ``model`` (its caches
            included); used for tracing on a meta-device twin, never executed for real.
        dry_run: trace and match only; report the matches without building anything.
        graft_init: ``"zeros"`` (fast; weights are loaded afterwards) or ``"default"``.

    Returns:
        An :class:`ApplyResult` whose ``module`` shares every base parameter with ``model``.
    """
    with _collector_paused():
        return _apply(model, rule, example_inputs, dry_run, graft_init)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    # Tracing allocates nodes and proxies by the thousand; with a large model resident,
    # each cyclic-GC pass walks every live object (6% of an apply at 1.3B). Nothing
    # surgery builds needs collecting before it returns.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _apply(model: nn.Module, rule: Rule, example_inputs: tuple[tuple, dict], dry_run: bool,
           graft_init: str) -> ApplyResult:
    started = time.perf_counter()
    check_order(model, rule)
    args, kwargs = example_inputs
    new = share_tree(model)
    state = SurgeryState(rule=rule, base_cls=type(model), latent_input=None)
    new.__dict__["_surgery"] = state
    new.__class__ = rewritten_class(type(model))
    inputs, rule_inputs, positional = state.split(tuple(args), dict(kwargs))
    latent_name = _latent_name(inputs)
    latent = inputs.get(latent_name) if latent_name else None
    inputs.update(rule.check_call(_example_inputs(rule, latent, new, rule_inputs), inputs, latent, new)
                  if not dry_run else {name: None for name in rule.inputs})

    t0 = time.perf_counter()
    tracer, trace, twin = trace_base(new, type(model), rule, inputs,
                                     [n for n in inputs if n not in rule.inputs], positional)
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = match(trace, twin, rule, new)
    match_s = time.perf_counter() - t0
    latent_name, embedder_path = _stream_source(result.views[0].stream_in, trace.inputs)
    state.latent_input = latent_name
    timings = {"trace_s": trace_s, "match_s": match_s}
    if dry_run:
        prune_resolved(trace.graph)  # nothing rewrites it: it is the base graph
        timings["apply_s"] = time.perf_counter() - started
        return ApplyResult(model, rule, type(model).__name__, result.matches, [], list(trace.notes), None,
                           lambda: trace.graph, timings, dict(trace.leaf_calls), dry_run=True)

    t0 = time.perf_counter()
    grafted, modules = _graft(new, rule, result.matches, embedder_path, graft_init)
    add_modules(tracer, twin, modules)
    timings["graft_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = finish(new, tracer, trace, result, rule, twin, inputs, trace_s)
    state.add(spec)
    state.reasons.append("apply")
    timings["rewrite_s"] = time.perf_counter() - t0
    timings["apply_s"] = time.perf_counter() - started
    return ApplyResult(new, rule, type(model).__name__, spec.matches, grafted, list(spec.guards.notes), spec.graph,
                       spec.base_graph, timings, spec.leaf_calls)


def _latent_name(inputs: dict[str, Any]) -> str | None:
    """The first positional tensor: the latent the residual stream is embedded from."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            return name
    return None


def _example_inputs(rule: Rule, latent: Any, model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    if rule.example is None or any(given.get(n, d) is not d for n, d in rule.inputs.items()):
        return given
    return rule.example(latent, model)


def _graft(new: nn.Module, rule: Rule, matches: list[Match], embedder_path: str | None,
           init: str) -> tuple[list[Grafted], dict[str, nn.Module]]:
    context = GraftContext(
        model=new,
        matches=matches,
        matched_modules=[new.get_submodule(m.name) for m in matches],
        stream_embedder=new.get_submodule(embedder_path) if embedder_path else None,
        root_attributes={k: v for k, v in vars(new).items() if not k.startswith("_")},
        init=init,
    )
    modules = rule.grafts(context)
    grafted = []
    for name, module in modules.items():
        if hasattr(new, name):
            raise GraftError(f"the model already has an attribute '{name}'", "rename the graft in the rule")
        new.add_module(name, module)
        parts = list(module.named_children()) if isinstance(module, nn.ModuleList) else [("", module)]
        for suffix, part in parts:
            params = dict(part.named_parameters(prefix=f"{name}.{suffix}" if suffix else name))
            grafted.append(Grafted(f"{name}.{suffix}" if suffix else name, sum(p.numel() for p in params.values()),
                                   {k: tuple(v.shape) for k, v in params.items()}))
    return grafted, modules
