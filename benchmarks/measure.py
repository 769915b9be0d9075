"""The benchmark's measurements: apply against the reference build, forward ratios, re-specialisation, a profile."""
from __future__ import annotations

import cProfile
import io
import math
import pstats
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from benchmarks.memory import apply_once, grafted_bytes, new_params, param_bytes, release_memory
from benchmarks.subject import BenchSubject
from benchmarks.timing import log, summarise, sync, timed, timed_cpu

__all__ = ["STEADY_CALLS", "WARMUP_CHUNKS", "measure_build_times", "measure_forward", "measure_respecialise",
           "profile_apply"]

#: Steady-state calls used as the baseline of ``respecialise_s``.
STEADY_CALLS = 3
#: Warm-up runs of the measured chunk before the pairs (see ``measure_forward``).
WARMUP_CHUNKS = 2


def measure_build_times(subject: BenchSubject, repeats: int) -> dict[str, Any]:
    """``apply_s`` and ``reference_build_s``, alternating which goes first in each round."""
    apply_runs: list[float] = []
    reference_runs: list[float] = []
    phases: dict[str, list[float]] = {}
    grafted = 0
    reference_bytes = 0
    sides = ["apply"] + (["reference"] if subject.build_reference is not None else [])
    for round_index in range(repeats):
        order = sides if round_index % 2 == 0 else sides[::-1]
        for side in order:
            base = subject.build_base()
            inputs = subject.example_inputs(base)
            old_ids = {id(p) for p in base.parameters()}
            rule = subject.rule()
            release_memory()
            log(f"round {round_index + 1}/{repeats}: {side}")
            if side == "apply":
                seconds, result = timed(lambda: apply_once(subject, base, inputs, rule), subject.device)
                apply_runs.append(seconds)
                for key, value in result.timings.items():
                    phases.setdefault(key, []).append(value)
                grafted = grafted_bytes(result, subject.dtype)
            else:
                assert subject.build_reference is not None
                seconds, result = timed(lambda: subject.build_reference(base), subject.device)
                reference_runs.append(seconds)
                reference_bytes = param_bytes(new_params(result, old_ids))
            del result, base, inputs
            release_memory()
    return {
        "apply": summarise(apply_runs),
        "reference": summarise(reference_runs),
        "phases": {key: summarise(values)["median"] for key, values in phases.items()},
        "vace_param_bytes": grafted,
        "reference_vace_param_bytes": reference_bytes if reference_runs else None,
    }


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if torch.equal(a, b):
        return 0.0
    return float((a.double() - b.double()).abs().nan_to_num(nan=math.inf).max())


def _run_chunk(calls: Sequence[Callable[[], torch.Tensor]]) -> torch.Tensor:
    out = None
    for call in calls:
        out = call()
    assert out is not None, "a chunk needs at least one call"
    return out


def _interleaved(chunks: dict[str, Sequence[Callable[[], torch.Tensor]]], repeats: int,
                 device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """``repeats`` rounds of one chunk per side; per side, the chunk wall and CPU times.

    The chunks are interleaved call by call (with two sides a1 b1 b2 a2 a3 b3 ...: the order
    rotates every call and every round), so a burst of load from other processes slows
    every side of a round alike instead of one whole chunk. Each side keeps its own caches,
    so the interleaving does not change what any computes. Process CPU time is kept beside
    the wall time: it does not count time spent descheduled. The third result is, per side
    after the first, the largest max abs diff between its last output and the first side's.
    """
    names = list(chunks)
    lengths = sorted({len(chunk) for chunk in chunks.values()})
    if len(lengths) != 1:
        raise ValueError(f"chunks differ in length ({lengths} calls)")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    diff = {name: 0.0 for name in names[1:]}
    for index in range(repeats):
        total = {name: [0.0, 0.0] for name in names}
        out: dict[str, torch.Tensor] = {}
        for k in range(lengths[0]):
            shift = (index + k) % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, cpu_s, out[name] = timed_cpu(chunks[name][k], device)
                total[name][0] += seconds
                total[name][1] += cpu_s
        for name in names:
            wall[name].append(total[name][0])
            cpu[name].append(total[name][1])
        for name in names[1:]:
            diff[name] = max(diff[name], _max_abs_diff(out[names[0]], out[name]))
    return wall, cpu, diff


def _ratios(wall: dict[str, list[float]], cpu: dict[str, list[float]], diff: dict[str, float], a: str,
            b: str) -> dict[str, Any]:
    """Side ``a`` against side ``b``: per-round ratios of chunk times, a/b."""
    return {
        "ratio": summarise([x / y for x, y in zip(wall[a], wall[b])]),
        "cpu_ratio": summarise([x / y for x, y in zip(cpu[a], cpu[b])]),
        "ratio_of_min": min(wall[a]) / min(wall[b]),
        "rewritten_s": summarise(wall[a]),
        "baseline_s": summarise(wall[b]),
        "rewritten_cpu_s": summarise(cpu[a]),
        "baseline_cpu_s": summarise(cpu[b]),
        "max_abs_diff": diff[b],
    }


def _compile(models: Sequence[nn.Module], backend: str, blocks: bool) -> None:
    """Each model compiled in place: whole (``module.compile``) or each main block (``block.compile``)."""
    for model in models:
        for module in (model.blocks if blocks else (model,)):
            module.compile(backend=backend)


def measure_forward(subject: BenchSubject, repeats: int, backend: str | None = None,
                    blocks: bool = False) -> dict[str, Any]:
    """Forward ratios (VACE on vs the reference and vs the lean graft, off vs the base) and the re-specialisation cost.

    The three VACE-on sides (rewritten, reference, lean) run interleaved in the same rounds,
    so both VACE-on ratios share the rewritten model's chunks. With ``backend``, the models
    are compiled in place first, whole (``module.compile(backend=...)``) or, with ``blocks``,
    each main block (``block.compile(backend=...)``; the lean graft's VACE branch, which a
    hook on block 0 runs, then stays eager as the others' VACE blocks do): the ratios
    compare compiled models, ``compile`` records each side's first chunk (setup, prefill
    and the ``WARMUP_CHUNKS`` warm-up runs of the chunk: where compiling happens) and the
    graphs compiled during the pairs (0: no recompiles).
    """
    import surgery
    from surgery.tracing.twin import share_tree

    suite = subject.forward
    assert suite is not None and subject.build_reference is not None
    log("forward: building the base model, the rewritten model, the reference and the lean graft")
    base = suite.build_base()
    result = surgery.apply(base, subject.rule(), example_inputs=subject.example_inputs(base))
    rewritten = result.module
    # Structural copies sharing every base tensor: the reference replaces blocks in place and
    # the lean graft hooks them, and the base model must stay the plain model for VACE off.
    reference = subject.build_reference(share_tree(base))
    lean = None if subject.build_lean is None else subject.build_lean(share_tree(base), backend is not None and blocks)
    weights = suite.share_weights(rewritten, reference, lean)
    release_memory()
    if backend is not None:
        _compile([m for m in (rewritten, reference, lean, base) if m is not None], backend, blocks)

    first: dict[str, float] = {}

    def prepared(name: str, model: nn.Module, vace: bool) -> list[Callable[[], torch.Tensor]]:
        # Two warm-up runs: the chunk's first call sees the caches as the prefill left them,
        # every later call as a call of this chunk leaves them (other cache indices, which a
        # compiled model guards on): with one call per chunk, the first pair would compile.
        seconds, chunk = timed(lambda: suite.runner(model, vace=vace), subject.device)
        warm_s, _ = timed(lambda: [_run_chunk(chunk) for _ in range(WARMUP_CHUNKS)], subject.device)
        first[name] = seconds + warm_s
        return chunk

    log("forward: setup and warm-up chunks" + (f" (compiling {'each block ' if blocks else ''}with {backend})"
                                               if backend else ""))
    on = {"rewritten": prepared("rewritten_on", rewritten, True), "reference": prepared("reference_on", reference, True)}
    if lean is not None:
        on["lean"] = prepared("lean_on", lean, True)
    off = {"rewritten": prepared("rewritten_off", rewritten, False), "base": prepared("base_off", base, False)}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    log(f"forward: {repeats} rounds with VACE on ({', '.join(on)})")
    on_runs = _interleaved(on, repeats, subject.device)
    log(f"forward: {repeats} pairs with VACE off")
    off_runs = _interleaved(off, repeats, subject.device)
    compiled = None if backend is None else {
        "backend": backend, "mode": "blocks" if blocks else "model", "first_chunk_s": first,
        "graphs_during_pairs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs}
    log("forward: a call at a new resolution")

    # The same new signature on the real model, once: the engine's own timing of that
    # specialisation cross-checks the meta measurement (see measure_respecialise).
    state = rewritten.surgery_state
    built = state.built
    alternate = suite.runner(rewritten, vace=True, alternate=True, prefill=False, calls=1)
    first_call, _ = timed(alternate[0], subject.device)
    outcome, seconds = state.last_dispatch
    respecialise = {
        "first_call_s": first_call,
        "seconds": seconds,
        "outcome": outcome,
        "new_specialisations": state.built - built,
    }
    return {"on": _ratios(*on_runs, "rewritten", "reference"),
            "on_lean": None if lean is None else _ratios(*on_runs, "rewritten", "lean"),
            "off": _ratios(*off_runs, "rewritten", "base"),
            "weights": weights, "respecialise": respecialise, "compile": compiled}


def _dispatchtimed(model: nn.Module, inputs: tuple[tuple, dict], device: torch.device) -> float:
    # Only the dispatch (guards, recheck, a new trace): a meta model cannot run its forward,
    # because flex attention, like other real kernels, refuses meta tensors.
    args, kwargs = inputs
    with torch.no_grad():
        return timed(lambda: model.surgery_state.dispatch(model, args, kwargs), device)[0]


def measure_respecialise(subject: BenchSubject, steady_calls: int = STEADY_CALLS) -> dict[str, Any]:
    """Cost of a call with a new input signature (a new resolution) on the rewritten model.

    ``seconds``: the dispatcher's own record for that call (``SurgeryState.last_dispatch``):
    from entry to a runnable graph, whether it re-derived the cached graph's decisions for
    the new sizes (``outcome == "rechecked"``) or traced a new one (``"specialised"``).
    ``trace_s``/``rewrite_s``: a fresh specialisation for the same call, built beside it,
    which is what the call would cost without the recheck. ``wall_s``: first call minus the
    median steady-state dispatch, a cross-check (calls are dispatched, not run: a meta model
    cannot run its forward, since flex attention refuses meta tensors).
    Measured on ``subject`` built on the meta device (same layers and shapes; the engine
    traces on a fake twin whatever the device), so it exists at every size.
    """
    from surgery.rewriting.specialise import specialise

    assert subject.call_inputs is not None
    base = subject.build_base()
    inputs = subject.example_inputs(base)
    rule = subject.rule()
    apply_s, result = timed(lambda: apply_once(subject, base, inputs, rule), subject.device)
    model = result.module
    state = model.surgery_state
    for _ in range(2):  # the initial resolution, warm
        _dispatchtimed(model, subject.call_inputs(model, False), subject.device)
    built = state.built
    inputs = subject.call_inputs(model, True)
    first = _dispatchtimed(model, inputs, subject.device)
    outcome, seconds = state.last_dispatch
    steady = [_dispatchtimed(model, inputs, subject.device) for _ in range(steady_calls)]
    prepared, positional = state.prepare(model, *inputs)
    fresh, _, _ = specialise(model, state.base_cls, state.rule, prepared, positional)
    return {
        "device": str(subject.device),
        "apply_s": apply_s,
        "first_call_s": first,
        "steady_call_s": summarise(steady),
        "seconds": seconds,
        "outcome": outcome,
        "trace_s": fresh.trace_s,
        "rewrite_s": fresh.rewrite_s,
        "fresh_specialisation_s": fresh.trace_s + fresh.rewrite_s,
        "wall_s": first - statistics.median(steady),
        "new_specialisations": state.built - built,
        "specialisations_total": len(state.specialisations),
        "reason": state.reasons[-1] if state.reasons else None,
    }


def profile_apply(subject: BenchSubject, top: int) -> tuple[str, list[dict[str, Any]]]:
    """One ``surgery.apply`` under cProfile; the report text and the top entries by own time."""
    base = subject.build_base()
    inputs = subject.example_inputs(base)
    rule = subject.rule()
    release_memory()
    profiler = cProfile.Profile()
    profiler.enable()
    result = apply_once(subject, base, inputs, rule)
    sync(subject.device)
    profiler.disable()
    del result
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    entries = []
    for (filename, line, name), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append({"function": f"{Path(filename).name}:{line}({name})", "ncalls": nc, "tottime_s": tt,
                        "cumtime_s": ct})
    entries.sort(key=lambda e: e["tottime_s"], reverse=True)
    return text.getvalue(), entries[:top]
