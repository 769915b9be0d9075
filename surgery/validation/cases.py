"""The named validation cases: structure, graph and numbers against the reference.

Case names (``<rule>`` is the rule's name, e.g. ``vace``):

* ``structure``: module tree, parameters and state_dict by native name (:mod:`.structure`);
* ``graph``: the rewritten graph against a trace of the reference (:mod:`.graphs`);
* ``<rule>-off``: without the control input the rewritten model equals the *base* model;
* ``<rule>-on``: with a control input per chunk it equals the reference, over a stream of
  at least three chunks at two resolutions (and the control input must change the output,
  or the comparison could not see a broken branch);
* ``scales``: the same at other control scales (0, and one value per layer the rule acts on);
* ``multi-context``: two control inputs at once (e.g. ComfyUI's stacked VACE inputs), the first
  at scale 1 and the second at one value per acted-on layer; the second must change the output;
* ``lora``: PEFT LoRA after surgery: the same ``LoraConfig`` applied to the rewritten model
  and to the reference, identical adapter weights copied by native name, compared over a
  stream (and the adapters must change the output).

A rule without call inputs (an adapter after every FFN) acts on every call: its cases are
``structure``, ``graph``, ``<rule>-on`` (no control input; the grafted modules must change
the output against the base model) and ``lora``.

Every case compares outputs *and* cache snapshots after every call. Models are never
driven in place: each run gets a structural copy (shared weights, own attributes and
specialisation cache), so validation leaves the rewritten model and the base model as they
were. The reference receives the rewritten model's weights by native name; if the grafted
weights are all zero (a fresh graft), both sides run with the same seeded random grafted
weights instead (put into the rewritten model only for the duration of a run).
"""
from __future__ import annotations

import copy
import math
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..errors import InputError, SurgeryError
from ..tracing.twin import share_tree
from ..weights.keys import under_prefixes
from .graphs import GraphComparison, compare_graphs
from .reference_trace import trace_reference
from .rule_reference import applied_rules, control_matches, validated_rule
from .harness import CallDiffs, Harness, Scenario
from .structure import StructureRow, compare_structure, map_name
from .tolerances import model_tolerance

LORA_RANK = 4
LORA_SEED = 1234


@dataclass
class CaseResult:
    """What one case found. ``max_abs_diff``/``tolerance`` are None for non-numeric cases."""

    name: str
    max_abs_diff: float | None
    passed: bool
    tolerance: float | None
    detail: str = ""
    error: str | None = None


@dataclass
class Case:
    """A named, runnable check (what ``surgery apply --validate`` runs one by one).

    ``session`` holds what the cases share, including the structure rows and the graph
    comparison once those cases have run.
    """

    name: str
    tolerance: float
    _run: Callable[[], CaseResult]
    session: "Session | None" = None

    def run(self) -> CaseResult:
        """Run the check; an engine error while driving a model is a failed case, not a crash."""
        try:
            return self._run()
        except SurgeryError as error:
            return CaseResult(self.name, None, False, self.tolerance, "", f"{type(error).__name__}: {error}")


def clone_state(state: Any) -> Any:
    """A copy of a rewritten model's surgery state with its own specialisation cache."""
    clone = copy.copy(state)
    clone.specialisations = OrderedDict(state.specialisations)
    clone.reasons = list(state.reasons)
    clone.last_misses = []
    return clone


def detached(module: nn.Module, state: Any = None) -> nn.Module:
    """A structural copy to drive: shared tensors, own attributes and specialisation cache.

    ``state`` replaces the copy's surgery state (copies that share one reuse each other's
    specialisations); by default a rewritten model's copy gets a fresh clone of its state.
    """
    new = share_tree(module)
    if "_surgery" in module.__dict__:
        new.__dict__["_surgery"] = state if state is not None else clone_state(module.__dict__["_surgery"])
    return new


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Non-zero values of order one that depend only on ``(seed, key, shape)``.

    Matrices and kernels ~ N(0, 1/fan_in); 1-d ``*.weight`` (norm scales) ~ 1 + N(0, 0.01);
    other vectors ~ N(0, 0.01).
    """
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if len(shape) >= 2:
            value = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        out[key] = value.to(dtype=dtype, device=device)
    return out


def _frozen(scale: Any) -> Any:
    """Lists as tuples, nested too: scenarios key the memo of runs."""
    return tuple(_frozen(s) for s in scale) if isinstance(scale, (list, tuple)) else scale


def _worst(diffs: CallDiffs) -> tuple[float, str]:
    worst, where = 0.0, ""
    for label, diff in diffs:
        if math.isnan(diff) or diff > worst:
            worst, where = (math.inf if math.isnan(diff) else diff), label
    return worst, where


class Session:
    """Shared state of one validation: the reference, the weights, and memoised runs."""

    def __init__(self, result: Any, model: nn.Module, harness: Harness,
                 example_inputs: tuple[tuple, dict] | None) -> None:
        if getattr(result, "dry_run", False) or getattr(result, "graph", None) is None:
            raise InputError("a dry run built no rewritten model to validate", "run apply without dry_run")
        if len(harness.resolutions) < 2 or harness.chunks < 3:
            raise InputError(f"validation needs two resolutions and three chunks, the harness gives "
                             f"{len(harness.resolutions)} and {harness.chunks}", "give the harness more")
        self.result, self.model, self.harness = result, model, harness
        self.example_inputs = example_inputs
        self.rule = validated_rule(result)  # a composed model's rules as one
        self.tolerance, self.dtype, self.device = model_tolerance(result.module)
        # Two references: one to drive (it gets weights), one snapshot of the base model's
        # state at apply time, to trace (runs reconfigure models for other resolutions).
        self.reference = harness.reference_factory(model)
        self.trace_reference = harness.reference_factory(model)
        self.swap = self._grafted_swap()
        self._load_reference()
        self.records: dict[tuple[str, Scenario], Any] = {}
        # One specialisation cache for every copy of the rewritten model that validation
        # drives (not the model's own: validating must not change what it reports).
        self.state = clone_state(result.module.surgery_state)
        self.structure_rows: list[StructureRow] = []
        self.graph_comparison: GraphComparison | None = None

    # ----- weights ---------------------------------------------------------------------
    def _grafted(self) -> dict[str, torch.Tensor]:
        state = self.result.module.state_dict(keep_vars=True)
        if len(applied_rules(self.result)) > 1:  # every rule's grafts: what the base model lacks
            base = self.model.state_dict(keep_vars=True)
            return {k: v for k, v in state.items() if k not in base}
        prefixes = tuple(self.rule.weight_prefixes) or tuple(f"{g.name}." for g in self.result.grafted)
        return {k: v for k, v in state.items() if under_prefixes(k, prefixes)}

    def _grafted_swap(self) -> dict[str, torch.Tensor]:
        """Seeded weights to use instead of all-zero grafted ones ({} if they are trained)."""
        grafted = self._grafted()
        if not grafted or any(bool(t.detach().any()) for t in grafted.values() if t.is_floating_point()):
            return {}
        values = dict(self.harness.random_weights(self.result.module)) if self.harness.random_weights else {}
        if not values or len(applied_rules(self.result)) > 1:  # composed: the other rules' grafts too
            values.update(seeded_weights({k: tuple(v.shape) for k, v in grafted.items() if k not in values}))
        return {k: values[k].to(device=grafted[k].device, dtype=grafted[k].dtype) for k in grafted if k in values}

    def _load_reference(self) -> None:
        source = dict(self.result.module.state_dict(keep_vars=True))
        source.update(self.swap)
        with torch.no_grad():
            for key, tensor in self.reference.state_dict(keep_vars=True).items():
                native = map_name(self.harness.to_native, key)
                value = source.get(native) if native is not None else None
                if value is None or value is tensor or tuple(value.shape) != tuple(tensor.shape):
                    continue  # the structure case reports missing or misshapen keys
                if value.data_ptr() != tensor.data_ptr():
                    tensor.copy_(value)

    @contextmanager
    def _swapped(self) -> Iterator[None]:
        """Put the seeded grafted weights into the rewritten model for one run."""
        if not self.swap:
            yield
            return
        live = self._grafted()
        saved = {k: live[k].detach().clone() for k in self.swap}
        with torch.no_grad():
            for k, v in self.swap.items():
                live[k].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    live[k].copy_(v)

    # ----- runs ------------------------------------------------------------------------
    def run(self, side: str, scenario: Scenario) -> Any:
        """The record of ``side`` ("rewritten", "reference", "base") on ``scenario`` (memoised)."""
        key = (side, scenario)
        if key not in self.records:
            source = {"rewritten": self.result.module, "reference": self.reference, "base": self.model}[side]
            self.records[key] = self.drive(detached(source, self.state if side == "rewritten" else None), scenario)
        return self.records[key]

    def drive(self, model: nn.Module, scenario: Scenario) -> Any:
        with self._swapped():
            return self.harness.drive(model, scenario)

    def scenario(self, index: int, *, control: bool, scale: Any = 1.0, contexts: int = 1) -> Scenario:
        return Scenario(tuple(self.harness.resolutions[index]), control=control, scale=_frozen(scale),
                        contexts=contexts)

    def acted_on_layers(self) -> int:
        """How many matches the rule numbers (``Match.index``): the layers a per-layer scale covers."""
        return len({m.index for m in control_matches(self.result) if m.index is not None})

    # ----- numeric verdicts -------------------------------------------------------------
    def numeric(self, name: str, pairs: list[tuple[Scenario, Any, Any]], extra: str = "",
                error: str | None = None) -> CaseResult:
        worst, lines, failure = 0.0, [], None
        for scenario, ours, theirs in pairs:
            diffs = self.harness.compare(ours, theirs)
            diff, where = _worst(diffs)
            lines.append(f"{scenario.describe()}: {diff:.3g} over {len(diffs)} calls")
            if diff > self.tolerance and failure is None:
                failure = f"{scenario.describe()}, {where}: {diff:.3g} > {self.tolerance:g}"
            worst = max(worst, diff)
        detail = "; ".join(lines) + (f"; {extra}" if extra else "")
        passed = failure is None and error is None
        return CaseResult(name, worst, passed, self.tolerance, detail, failure or error)

    def effect(self, a: Any, b: Any) -> float:
        return _worst(self.harness.compare(a, b))[0]


# ---- the cases --------------------------------------------------------------------------

def structure_case(session: Session) -> CaseResult:
    rows = compare_structure(session.result.module, session.reference, session.harness.to_native)
    session.structure_rows = rows
    bad = [r for r in rows if not r.ok]
    counts = {s: sum(r.section == s for r in rows) for s in ("module", "parameter", "state_dict")}
    detail = ", ".join(f"{n} {s} rows" for s, n in counts.items()) + f", {len(bad)} differ"
    error = None
    if bad:
        error = f"{len(bad)} differences: " + "; ".join(r.describe() for r in bad[:3]) + (" ..." if len(bad) > 3 else "")
    return CaseResult("structure", None, not bad, 0.0, detail, error)


def _reference_call(session: Session) -> tuple[tuple, dict, dict]:
    """The example call split into base inputs and the rule's inputs, as ``apply`` traced it."""
    if session.example_inputs is None:
        raise InputError("the graph comparison needs the example inputs apply was given",
                              "pass example_inputs= to validation_cases")
    args, kwargs = session.example_inputs
    kwargs = dict(kwargs)
    given = {name: kwargs.pop(name) for name in list(kwargs) if name in session.rule.inputs}
    if any(v is not session.rule.inputs[n] for n, v in given.items()) or session.rule.example is None:
        return tuple(args), kwargs, given
    state = session.result.module.surgery_state
    inputs = {f"arg{i}": v for i, v in enumerate(args)}
    inputs.update(kwargs)
    latent = inputs.get(state.latent_input) if state.latent_input else None
    return tuple(args), kwargs, dict(session.rule.example(latent, session.result.module))


def graph_case(session: Session) -> CaseResult:
    args, kwargs, rule_inputs = _reference_call(session)
    trace = trace_reference(session.trace_reference, session.rule, args, kwargs, rule_inputs)
    comparison = compare_graphs(session.result.graph, session.result.module, trace.graph,
                                session.trace_reference, session.harness.to_native)
    session.graph_comparison = comparison
    detail = (f"{comparison.rewritten_nodes} vs {comparison.reference_nodes} dataflow nodes, "
              f"{comparison.matched} identical, {len(comparison.differences)} differences, "
              f"{comparison.downstream} downstream of them"
              + ("" if comparison.isomorphic is None else f", networkx isomorphic: {comparison.isomorphic}")
              + (f", {len(comparison.ignored)} wrapper-only nodes ignored" if comparison.ignored else ""))
    error = None
    if comparison.differences:
        shown = comparison.differences[:3]
        error = "; ".join(d.describe() for d in shown) + (" ..." if len(comparison.differences) > 3 else "")
    return CaseResult("graph", None, comparison.equal, 0.0, detail, error)


def off_case(session: Session, name: str) -> CaseResult:
    # Inputs off switch off every rule that takes one; a composed rule without inputs still acts.
    other = "base" if all(rule.inputs for rule, _ in applied_rules(session.result)) else "reference"
    pairs = []
    for i in range(len(session.harness.resolutions)):
        sc = session.scenario(i, control=False)
        pairs.append((sc, session.run("rewritten", sc), session.run(other, sc)))
    return session.numeric(name, pairs)


def on_case(session: Session, name: str) -> CaseResult:
    control = bool(session.rule.inputs)
    pairs = []
    for i in range(len(session.harness.resolutions)):
        sc = session.scenario(i, control=control)
        pairs.append((sc, session.run("rewritten", sc), session.run("reference", sc)))
    first = session.scenario(0, control=control)
    # Without a control input to switch off, the grafts are measured against the base model.
    effect = session.effect(session.run("rewritten", first),
                            session.run("rewritten" if control else "base", session.scenario(0, control=False)))
    what = "the control input" if control else "the rule"
    error = None if effect > 0 or not session.rule.effect_required else \
        f"{what} changed nothing, so a broken branch would go unseen"
    extra = f"{'control' if control else 'graft'} effect {effect:.3g}" + (", seeded grafted weights"
                                                                          if session.swap else "")
    return session.numeric(name, pairs, extra, error)


def default_scales(layers: int) -> list[Any]:
    """0 (branch silenced) and one value per acted-on layer: 0.5, 0 (that layer silenced), 0.75, 1.0, ...

    A plain 1.0 is already the ``<rule>-on`` case; with a single acted-on layer the second
    scale is 0.5.
    """
    per_layer = tuple(0.5 if k == 0 else 0.0 if k == 1 else 0.25 * (k + 1) for k in range(layers))
    return [0.0, per_layer] if layers > 1 else [0.0, 0.5]


def scales_case(session: Session) -> CaseResult:
    layers = session.acted_on_layers()
    scales = session.harness.scales(layers) if session.harness.scales else default_scales(layers)
    pairs = []
    for scale in scales:
        sc = session.scenario(0, control=True, scale=scale)
        pairs.append((sc, session.run("rewritten", sc), session.run("reference", sc)))
    return session.numeric("scales", pairs)


def multi_context_case(session: Session) -> CaseResult:
    """Two control inputs in one call, each with its own scale, against the reference; the
    second must move the output away from the one-context run, or a dropped one would pass."""
    second = tuple(0.5 * (k + 1) for k in range(session.acted_on_layers()))
    sc = session.scenario(0, control=True, scale=(1.0, second), contexts=2)
    ours = session.run("rewritten", sc)
    effect = session.effect(ours, session.run("rewritten", session.scenario(0, control=True)))
    error = None if effect > 0 else "the second control input changed nothing, so a dropped context would go unseen"
    return session.numeric("multi-context", [(sc, ours, session.run("reference", sc))],
                           f"second-context effect {effect:.3g}", error)


def lora_case(session: Session) -> CaseResult:
    import peft

    module = session.result.module
    to_native = session.harness.to_native
    targets = (session.harness.lora_targets(module) if session.harness.lora_targets
               else [n for n, m in module.named_modules() if isinstance(m, nn.Linear)])
    ours, theirs = detached(module), share_tree(session.reference)
    paths: dict[str, str] = {}
    for name, _ in theirs.named_modules():
        native = map_name(to_native, name, module=True)
        if native is not None:
            paths.setdefault(native, name)
    missing = [t for t in targets if t not in paths]
    if missing:
        return CaseResult("lora", None, False, session.tolerance, "",
                          f"{len(missing)} LoRA targets have no reference module, e.g. {missing[0]}")
    params = {id(p): (p, p.requires_grad) for m in (ours, theirs) for p in m.parameters()}
    try:
        for model, names in ((ours, targets), (theirs, [paths[t] for t in targets])):
            config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                     target_modules=names, init_lora_weights=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(LORA_SEED)
                peft.get_peft_model(model, config)
        with torch.no_grad():
            for target in targets:
                a, b = ours.get_submodule(target), theirs.get_submodule(paths[target])
                for adapter in ("lora_A", "lora_B"):
                    getattr(b, adapter)["default"].weight.copy_(getattr(a, adapter)["default"].weight)
    finally:
        # PEFT freezes every non-adapter parameter; those are the user's, shared.
        for p, flag in params.values():
            p.requires_grad_(flag)
    sc = session.scenario(0, control=bool(session.rule.inputs))
    mine, reference = session.drive(ours, sc), session.drive(theirs, sc)
    effect = session.effect(mine, session.run("rewritten", sc))
    error = None if effect > 0 else "the LoRA adapters changed nothing, so PEFT-invisible modules would go unseen"
    return session.numeric("lora", [(sc, mine, reference)],
                           f"{len(targets)} Linear targets, rank {LORA_RANK}, adapter effect {effect:.3g}", error)


def build_cases(session: Session) -> list[Case]:
    """The cases in the order they are meant to run."""
    rule = session.rule.name
    tol = session.tolerance
    on = Case(f"{rule}-on", tol, lambda: on_case(session, f"{rule}-on"), session)
    controlled = [
        Case(f"{rule}-off", tol, lambda: off_case(session, f"{rule}-off"), session),
        on,
        Case("scales", tol, lambda: scales_case(session), session),
        Case("multi-context", tol, lambda: multi_context_case(session), session),
    ] if session.rule.inputs else [on]  # nothing to switch off or scale without a control input
    return [
        Case("structure", 0.0, lambda: structure_case(session), session),
        Case("graph", 0.0, lambda: graph_case(session), session),
        *controlled,
        Case("lora", tol, lambda: lora_case(session), session),
    ]


__all__ = ["Case", "CaseResult", "Session", "build_cases", "clone_state", "default_scales", "detached",
           "seeded_weights"]
