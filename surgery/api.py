"""``surgery.apply``: a function from (model, rule) to a new, rewritten model."""
from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from .entry import CallChecks, EntryPoint, LatentCheck, model_on_meta, parameter_of
from .errors import ArgumentError, CallError, GraftError, OrderError
from .lora.order import build_order, check_sequence, peft_owner
from .matching.matcher import Match
from .module import SurgeryState, rewritten_class
from .rewriting.compiled import retarget_compiled
from .rewriting.specialise import add_modules, finish, match, prune_resolved, trace_base
from .rule import GraftContext, Rule, combined_inputs
from .tracing.guards import Guard
from .tracing.twin import share_tree
from .weights.keys import under_prefixes

#: ``graft_init`` values: zeros (weights are loaded afterwards) or each module's own init.
GRAFT_INITS = ("zeros", "default")


@dataclass(frozen=True)
class Grafted:
    """A module surgery added: its name, parameter count and parameter shapes."""

    name: str
    params: int
    shapes: dict[str, tuple]


@dataclass(frozen=True)
class AppliedRule:
    """One rule a rewritten model carries and the units it matched."""

    rule: Rule
    matches: list[Match]


@dataclass
class ApplyResult:
    """What :func:`apply` returns. ``module`` is the input model itself after a dry run.

    ``rule`` and ``matches`` are those of the rule this call applied; ``rules`` lists every
    rule the model carries with its matches, in application order (the last is ``rule``),
    when :func:`apply` composed it onto an already rewritten model; empty otherwise.

    ``base_graph`` (the traced graph before the rules' actions, for reports and diffs) is
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
    rules: tuple[AppliedRule, ...] = ()

    @property
    def applied(self) -> tuple[AppliedRule, ...]:
        """Every rule with its matches, in application order (one for a single rule)."""
        return self.rules or (AppliedRule(self.rule, self.matches),)

    @property
    def base_graph(self) -> fx.Graph:
        if self._base_graph is None:
            self._base_graph = self.base_graph_source()
        return self._base_graph


def check_order(model: nn.Module, rule: Rule) -> None:
    """Refuse models that are LoRA-wrapped (Base -> rules -> LoRA), already carry this rule (by
    name or by its grafts), or carry a rule whose declared order forbids ``rule`` after it."""
    state = model.__dict__.get("_surgery")
    earlier = state.rules if state is not None else ()
    names = [r.name for r in earlier]
    owner = peft_owner(model)
    if owner is not None:
        asked = [*names, rule.name] if rule.name not in names else names
        order = f"surgery runs in the order {build_order(*asked)}"
        raise OrderError(f"the model is already LoRA-wrapped ({owner[0]} is {owner[1]}); {order}",
                         "apply surgery to the base model first, then wrap the result with PEFT")
    order = f"surgery runs in the order {build_order(*(names or [rule.name]))}"
    if rule.name in names:
        raise OrderError(f"the model was already rewritten by rule '{rule.name}'",
                         f"apply each rule once, starting from the original base model; {order}")
    check_sequence(earlier, rule)
    carried = [n for n, _ in model.named_parameters() if under_prefixes(n, rule.weight_prefixes)]
    if carried:
        raise OrderError(f"the model already carries {rule.name} modules ({carried[0]}, ...)",
                         f"start from the base model without {rule.name}; {order}")


def _stream_source(view_stream: fx.Node, inputs: dict[str, fx.Node]) -> tuple[str | None, str | None]:
    """The call input the residual stream comes from, and the nearest leaf module call that produced it
    (e.g. a patch embedding)."""
    seen, stack = set(), [view_stream]
    source = None
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and source is None:
            source = node.target
        stack.extend(node.all_input_nodes)
    for name, node in inputs.items():  # in call order: the latent before the conditioning
        if node in seen and isinstance(node.meta.get("example_value"), torch.Tensor):
            return name, source
    return None, source


def apply(model: nn.Module, rule: Rule, *, example_inputs: tuple[tuple, dict], dry_run: bool = False,
          graft_init: str = "zeros") -> ApplyResult:
    """Rewrite ``model`` by ``rule`` and return a new model; the input is never modified.

    Args:
        model: the base model (not LoRA-wrapped), or a model :func:`apply` returned: then the
            new model carries the earlier rules and ``rule`` after them (composition; see the
            README's "Composing rules"), as far as the rules' declared order allows.
        rule: the rule, e.g. ``rules.vace.rule()``.
        example_inputs: ``(args, kwargs)`` of a typical call of ``model`` (its caches
            included); used for tracing on a meta-device twin, never executed for real.
        dry_run: trace and match only; report the matches without building anything.
        graft_init: ``"zeros"`` (fast; weights are loaded afterwards) or ``"default"``.

    Returns:
        An :class:`ApplyResult` whose ``module`` shares every base parameter's storage with
        ``model`` (its own Parameter objects: converting it never converts ``model``).

    Raises:
        ArgumentError: malformed arguments (checked before anything else).
        SurgeryError: the subclass names the stage (order, trace, match, graft, call inputs).
    """
    check_arguments(model, rule, example_inputs, dry_run, graft_init)
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


def check_arguments(model: Any, rule: Any, example_inputs: Any, dry_run: Any, graft_init: Any) -> None:
    """Refuse malformed :func:`apply` arguments with one line each, before anything runs."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}",
                            "pass the base model itself (not its state_dict, class or path)")
    if not isinstance(rule, Rule):
        if isinstance(rule, str):
            raise ArgumentError(f"rule must be a surgery.Rule, got the name {rule!r}",
                                f"build it first: rules.RULES[{rule!r}]()")
        if callable(rule):
            name = f"{getattr(rule, '__module__', None) or '?'}.{getattr(rule, '__qualname__', type(rule).__name__)}"
            raise ArgumentError(f"rule must be a surgery.Rule, got the uncalled factory {name}",
                                f"call it: {name}(...) with the rule's options (see `surgery rules`)")
        raise ArgumentError(f"rule must be a surgery.Rule, got {type(rule).__name__}",
                            "build one with a rule factory: rules.RULES[NAME](...)")
    example = "example_inputs=(args, kwargs) of a typical call, e.g. examples.driver.example_call(model, pipeline)"
    if not (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2):
        shown = "None" if example_inputs is None else type(example_inputs).__name__
        raise ArgumentError(f"example_inputs must be a pair (args, kwargs), got {shown}", f"pass {example}")
    args, kwargs = example_inputs
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, Mapping):
        raise ArgumentError(f"example_inputs must be (args tuple, kwargs dict), got "
                            f"({type(args).__name__}, {type(kwargs).__name__})", f"pass {example}")
    if not all(isinstance(k, str) for k in kwargs):
        raise ArgumentError("example_inputs' kwargs must have string keys", f"pass {example}")
    if not isinstance(dry_run, bool):
        raise ArgumentError(f"dry_run must be True or False, got {dry_run!r}", "pass dry_run=True or dry_run=False")
    if not isinstance(graft_init, str) or graft_init not in GRAFT_INITS:
        raise ArgumentError(f"graft_init must be one of {', '.join(map(repr, GRAFT_INITS))}, got {graft_init!r}",
                            "use 'zeros' (weights are loaded afterwards) or 'default' (each module's own init)")
    if model_on_meta(model) is False:
        where = _first_meta_tensor(tuple(args), "args") or _first_meta_tensor(dict(kwargs), "kwargs")
        if where is not None:
            raise ArgumentError(f"example_inputs {where} is on the meta device but the model's weights are on "
                                f"{next(model.parameters()).device}",
                                "build the example call on the model's device (meta tensors hold no values)")


def _first_meta_tensor(value: Any, path: str) -> str | None:
    """The path of the first ``meta`` tensor in nested example inputs."""
    if isinstance(value, torch.Tensor):
        return path if value.is_meta else None
    items = value.items() if isinstance(value, Mapping) else enumerate(value) \
        if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_meta_tensor(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def _apply(model: nn.Module, rule: Rule, example_inputs: tuple[tuple, dict], dry_run: bool,
           graft_init: str) -> ApplyResult:
    started = time.perf_counter()
    if rule.bind is not None:
        rule = rule.bind(rule, model)
    check_order(model, rule)
    previous = model.__dict__.get("_surgery")  # composing onto a rewritten model: keep its rules
    earlier = previous.rules if previous is not None else ()
    base_cls = previous.base_cls if previous is not None else type(model)
    rules = (*earlier, rule)
    all_inputs = combined_inputs(rules)
    args, kwargs = example_inputs
    entry = EntryPoint.of(base_cls)
    state = SurgeryState(rule=rule, base_cls=base_cls, latent_input=None, earlier=earlier)
    inputs, rule_inputs, positional = state.split(tuple(args), dict(kwargs))
    keywords = tuple(inputs)[positional:]
    try:
        entry.form(positional, keywords, tuple(all_inputs))
    except CallError as error:
        raise ArgumentError(f"example_inputs do not fit the model: {error.problem}", error.fix) from None
    new = share_tree(model)
    retarget_compiled(new)  # a copied .compile() call would still run the input's module
    new.__dict__["_surgery"] = state
    new.__class__ = rewritten_class(base_cls, all_inputs)
    latent_name = _latent_name(inputs)
    latent = inputs.get(latent_name) if latent_name else None
    for each in rules:
        own = {name: rule_inputs[name] for name in each.inputs}
        inputs.update(each.check_call(_example_inputs(each, latent, new, own), inputs, latent, new)
                      if not dry_run else dict.fromkeys(each.inputs))

    t0 = time.perf_counter()
    tracer, trace, twin = trace_base(new, base_cls, rules, inputs, [n for n in inputs if n not in all_inputs],
                                     positional)
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [match(trace, twin, each, new) for each in rules]  # all on the base graph
    match_s = time.perf_counter() - t0
    latent_name, source_path = _stream_source(results[0].views[0].stream_in, trace.inputs)
    state.latent_input = latent_name
    state.checks = CallChecks(entry, tuple(all_inputs), parameter_of(entry, positional, keywords, latent_name),
                              LatentCheck.of(source_path, new.get_submodule(source_path) if source_path else None,
                                             inputs.get(latent_name) if latent_name else None))
    timings = {"trace_s": trace_s, "match_s": match_s}
    applied = tuple(AppliedRule(each, found.matches) for each, found in zip(rules, results)) if earlier else ()
    if dry_run:
        prune_resolved(trace.graph)  # nothing rewrites it: it is the base graph
        timings["apply_s"] = time.perf_counter() - started
        return ApplyResult(model, rule, base_cls.__name__, results[-1].matches, [], list(trace.notes), None,
                           lambda: trace.graph, timings, dict(trace.leaf_calls), dry_run=True, rules=applied)

    t0 = time.perf_counter()
    own_stream = results[-1].views[0].stream_in
    own_source = source_path if not earlier else _stream_source(own_stream, trace.inputs)[1] if own_stream else None
    grafted, modules = _graft(new, rule, results[-1].matches, own_source, graft_init)
    add_modules(tracer, twin, modules)
    timings["graft_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = finish(new, tracer, trace, results, rules, twin, inputs, trace_s)
    state.add(spec)
    state.reasons.append("apply")
    timings["rewrite_s"] = time.perf_counter() - t0
    timings["apply_s"] = time.perf_counter() - started
    return ApplyResult(new, rule, base_cls.__name__, spec.matches, grafted, list(spec.guards.notes), spec.graph,
                       spec.base_graph_source(), timings, spec.leaf_calls, rules=applied)


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


def _graft(new: nn.Module, rule: Rule, matches: list[Match], source_path: str | None,
           init: str) -> tuple[list[Grafted], dict[str, nn.Module]]:
    context = GraftContext(
        model=new,
        matches=matches,
        matched_modules=[new.get_submodule(m.name) for m in matches],
        stream_source=new.get_submodule(source_path) if source_path else None,
        root_attributes={k: v for k, v in vars(new).items() if not k.startswith("_")},
        init=init,
    )
    modules = rule.grafts(context)
    grafted = []
    for name, module in modules.items():
        _graft_parent(new, name, rule).add_module(name.rpartition(".")[2], module)
        parts = list(module.named_children()) if isinstance(module, nn.ModuleList) else [("", module)]
        for suffix, part in parts:
            params = dict(part.named_parameters(prefix=f"{name}.{suffix}" if suffix else name))
            grafted.append(Grafted(f"{name}.{suffix}" if suffix else name, sum(p.numel() for p in params.values()),
                                   {k: tuple(v.shape) for k, v in params.items()}))
    return grafted, modules


def _graft_parent(model: nn.Module, path: str, rule: Rule) -> nn.Module:
    """The module a graft at dotted ``path`` is added to (the model itself for a plain name)."""
    parent_path, _, name = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else ():
        parent = parent._modules.get(part) if isinstance(parent, nn.Module) else None
        if parent is None:
            raise GraftError(f"rule '{rule.name}' grafts '{path}', but the model has no module '{parent_path}'",
                             "graft under a module the model has (a matched unit's path or its parent)")
    if isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        # Their forward (or the model's loop over them) would run the graft as one more layer.
        raise GraftError(f"rule '{rule.name}' grafts '{path}' into the container '{parent_path}' "
                         f"({type(parent).__name__}), which would run it as one more layer",
                         "graft beside the container, under a module that calls its children by name")
    if not name:
        raise GraftError(f"rule '{rule.name}' grafts a module at the path {path!r}, which ends without a name",
                         "key each graft by its dotted path, e.g. 'blocks.3.adapter'")
    if hasattr(parent, name):
        where = f"'{parent_path}'" if parent_path else "the model"
        raise GraftError(f"rule '{rule.name}' grafts '{path}', but {where} already has an attribute '{name}'",
                         "start from the base model, or rename the graft in the rule")
    return parent
