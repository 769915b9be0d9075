"""``surgery bench``: what surgery costs, measured side by side with a hand-written wrapper.

One process measures, interleaved, the rewritten model against a hand-written reference of
the same graft on an identical base model, and writes ``bench.json`` (atomically) plus a
table. Everything model-specific (how to build the base model, its example call, the
reference wrapper, a streaming chunk) comes from a *provider*: a function
``provider(model, *, size, device, dtype, tokens, steps, seed) -> BenchSubject``; the
built-in examples' provider is :data:`DEFAULT_PROVIDER`. This module only measures.

Metrics (medians over ``--repeats`` runs, with min and max, in ``stats``):

* ``apply_s``: wall time of ``surgery.apply`` (trace, match, graft, rewrite); a fresh base
  model per run, built outside the timed region. ``reference_build_s``: building the
  reference wrapper on an identical fresh base. The two alternate (A B, B A, ...).
* ``apply_extra_bytes`` / ``reference_extra_bytes``: peak memory added by the call, each in
  a fresh subprocess (see :func:`measure_peak`) against ``vace_param_bytes``, the bytes of
  the grafted parameters.
* ``forward_ratio_on``: median over ``--pairs`` paired runs of (rewritten, VACE on) / (reference) over a
  streaming chunk (several denoising calls at the same ``current_start``);
  ``forward_ratio_off``: (rewritten, no VACE context) / (base model). The two chunks of a
  pair are interleaved call by call, the order flipping every call, so load from other
  processes hits both sides alike; process-CPU-time ratios and the ratio of the fastest
  chunks are kept beside the wall-time medians.
* ``respecialise_s``: the dispatcher's recorded time to make a call at a new resolution
  runnable (guard checks plus either re-deriving the graph's decisions for the new sizes
  or tracing a new specialisation; ``respecialise.outcome`` says which), on the rewritten
  model built on the meta device (same layers and shapes; exists at every size). Beside
  it: what a fresh specialisation for the same call costs (``respecialise.trace_s`` +
  ``rewrite_s``), first call minus steady call (``wall_s``), and the real model's figure in
  ``forward.respecialise``. See :func:`measure_respecialise`.
"""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import importlib
import io
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from .errors import InputError, SurgeryError
from .reports.files import atomic_write_many

__all__ = [
    "BENCH_FILE",
    "DEFAULT_PROVIDER",
    "BenchConfig",
    "BenchSubject",
    "ForwardSuite",
    "PeakMemory",
    "TARGETS",
    "evaluate_targets",
    "machine_info",
    "main",
    "measure_peak",
    "run_bench",
    "summarise",
]

BENCH_FILE = "bench.json"
PROFILE_FILE = "apply_profile.txt"
SCHEMA = 1
#: The built-in examples' provider (``module:function``).
DEFAULT_PROVIDER = "examples.bench_models:bench_subject"
DEVICES = ("cpu", "cuda", "meta")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: A base model whose parameters need more than this share of the free memory is measured
#: on the meta device (apply only): tracing and matching never read weight values.
MEMORY_HEADROOM = 0.8
#: Steady-state calls used as the baseline of ``respecialise_s``.
STEADY_CALLS = 3


# --------------------------------------------------------------------------------------------
# What a provider hands the benchmark
# --------------------------------------------------------------------------------------------

class ForwardSuite(Protocol):
    """Model-specific forward runs: a base with real values, shared weights, streaming chunks."""

    def build_base(self) -> nn.Module:
        """A base model with non-trivial values (outputs must differ from zeros)."""

    def share_weights(self, rewritten: nn.Module, reference: nn.Module) -> dict[str, Any]:
        """Give both models the same seeded random graft weights; returns what was done."""

    def runner(self, model: nn.Module, *, vace: bool, alternate: bool = False, prefill: bool = True,
               calls: Optional[int] = None) -> list[Callable[[], torch.Tensor]]:
        """Prepare caches (and a prefill chunk) for ``model``; return one streaming chunk.

        The chunk is a list of denoising calls (at the same ``current_start``), each a
        function returning that call's output; running them in order is one chunk, and
        every run of the list repeats the same chunk. ``alternate`` uses the second
        geometry (a new input signature); ``calls`` keeps only the first ``calls`` calls.
        """


@dataclass
class BenchSubject:
    """A model to benchmark, as a provider describes it.

    ``build_base()`` returns a fresh base model on ``device`` (zeros or meta at real sizes:
    values do not matter for apply); ``example_inputs(base)`` its example call;
    ``build_reference(base)`` wraps ``base`` (in place) in the hand-written reference;
    ``warmup()`` runs apply and the reference once on a small model (one-time imports and
    lazy initialisation out of the memory measurements); ``call_inputs(model, alternate)``
    is one call with a VACE context at the example geometry or (``alternate``) a new one,
    used on the meta device to time re-specialisation. ``settings`` is recorded as is.
    """

    name: str
    size: str
    device: torch.device
    dtype: torch.dtype
    rule: Callable[[], Any]
    build_base: Callable[[], nn.Module]
    example_inputs: Callable[[nn.Module], tuple[tuple, dict]]
    base_param_bytes: int
    build_reference: Optional[Callable[[nn.Module], nn.Module]] = None
    forward: Optional[ForwardSuite] = None
    warmup: Optional[Callable[[], None]] = None
    call_inputs: Optional[Callable[[nn.Module, bool], tuple[tuple, dict]]] = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchConfig:
    """Parsed ``surgery bench`` options."""

    model: str
    size: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    report: str = "."
    repeats: int = 5
    pairs: Optional[int] = None  # forward pairs; None: ``repeats``
    tokens: Optional[int] = None
    steps: Optional[int] = None
    seed: int = 0
    provider: str = DEFAULT_PROVIDER
    memory: bool = True
    forward: bool = True
    profile: int = 0
    strict: bool = False


# --------------------------------------------------------------------------------------------
# Small measuring tools
# --------------------------------------------------------------------------------------------

_STARTED = time.perf_counter()


def _log(message: str) -> None:
    """Progress on stderr (a 1.3B run takes minutes); stdout keeps the table."""
    print(f"[bench {time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "values"}`` of a list of measurements."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - start, value


def _release_memory() -> None:
    """Collect garbage and hand glibc's free heap back to the kernel (so RSS is honest)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # a memory subprocess needs what this process only caches
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory of this process over a ``with`` block, and device memory on CUDA.

    Host: the kernel's own high-water mark ``VmHWM``, reset at entry by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0): exact, no sampling. Where that reset is not
    allowed, a thread samples ``/proc/self/statm`` every millisecond (can miss short peaks).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (what the
    caching allocator handed out, not what it reserved).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.before = 0
        self.peak = 0
        self.after = 0
        self.device_before = 0
        self.device_peak = 0
        self.device_after = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _reset_hwm(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            return False
        hwm = _status_kib("VmHWM")
        return hwm is not None and hwm * 1024 <= _rss_bytes() + (1 << 20)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "PeakMemory":
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_before = torch.cuda.memory_allocated(self.device)
        self.before = _rss_bytes()
        if self._reset_hwm():
            self.method = "VmHWM reset through /proc/self/clear_refs"
        else:
            self.method = "/proc/self/statm sampled every 1 ms"
            self.peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        _sync(self.device)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = (_status_kib("VmHWM") or 0) * 1024
        self.after = _rss_bytes()
        self.peak = max(self.peak, self.after)
        if self.device.type == "cuda":
            self.device_peak = torch.cuda.max_memory_allocated(self.device)
            self.device_after = torch.cuda.memory_allocated(self.device)

    def as_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "host_before_bytes": self.before,
               "host_peak_extra_bytes": self.peak - self.before, "host_retained_bytes": self.after - self.before}
        if self.device.type == "cuda":
            out.update(device_method="torch.cuda.max_memory_allocated after reset_peak_memory_stats",
                       device_peak_extra_bytes=self.device_peak - self.device_before,
                       device_retained_bytes=self.device_after - self.device_before)
        return out


def _param_bytes(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _new_params(model: nn.Module, old_ids: set[int]) -> list[torch.Tensor]:
    return [p for p in model.parameters() if id(p) not in old_ids]


def grafted_bytes(result: Any, dtype: torch.dtype) -> int:
    """Bytes of the parameters ``surgery.apply`` grafted (from their shapes; works on meta)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * size for g in result.grafted for shape in g.shapes.values())


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, load, torch/python versions and the accelerator, if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    meminfo: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    meminfo[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": meminfo.get("MemTotal"),
        "memory_available_bytes": meminfo.get("MemAvailable"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def source_info() -> Optional[dict[str, Any]]:
    """The git commit of the measured code and whether engine files differ from it (best effort)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "surgery", "rules", "examples"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "modified": [line[3:] for line in dirty.stdout.splitlines()]}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def _apply(subject: BenchSubject, base: nn.Module, inputs: tuple[tuple, dict], rule: Any = None) -> Any:
    import surgery

    return surgery.apply(base, subject.rule() if rule is None else rule, example_inputs=inputs)


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
            _release_memory()
            _log(f"round {round_index + 1}/{repeats}: {side}")
            if side == "apply":
                seconds, result = _timed(lambda: _apply(subject, base, inputs, rule), subject.device)
                apply_runs.append(seconds)
                for key, value in result.timings.items():
                    phases.setdefault(key, []).append(value)
                grafted = grafted_bytes(result, subject.dtype)
            else:
                assert subject.build_reference is not None
                seconds, result = _timed(lambda: subject.build_reference(base), subject.device)
                reference_runs.append(seconds)
                reference_bytes = _param_bytes(_new_params(result, old_ids))
            del result, base, inputs
            _release_memory()
    return {
        "apply": summarise(apply_runs),
        "reference": summarise(reference_runs),
        "phases": {key: summarise(values)["median"] for key, values in phases.items()},
        "vace_param_bytes": grafted,
        "reference_vace_param_bytes": reference_bytes if reference_runs else None,
    }


def measure_peak(subject: BenchSubject, which: str) -> dict[str, Any]:
    """Peak memory added by ``apply`` or by building the reference (call in a fresh process).

    The base model and example inputs exist before the measured block; ``subject.warmup``
    runs first so one-time imports and lazy initialisation are not counted.
    """
    if which not in ("apply", "reference"):
        raise ValueError(f"unknown memory measurement {which!r}")
    if which == "reference" and subject.build_reference is None:
        raise InputError(f"{subject.name} has no reference at this setting", "measure apply only")
    if subject.warmup is not None:
        subject.warmup()
    base = subject.build_base()
    inputs = subject.example_inputs(base)
    old_ids = {id(p) for p in base.parameters()}
    rule = subject.rule()
    _release_memory()
    with PeakMemory(subject.device) as probe:
        if which == "apply":
            result = _apply(subject, base, inputs, rule)
        else:
            assert subject.build_reference is not None
            result = subject.build_reference(base)
    out = probe.as_dict()
    if which == "apply":
        out["param_bytes"] = grafted_bytes(result, subject.dtype)
    else:
        out["param_bytes"] = _param_bytes(_new_params(result, old_ids))
    out["extra_bytes"] = out["device_peak_extra_bytes"] if subject.device.type == "cuda" else out["host_peak_extra_bytes"]
    return out


def _child_argv(config: BenchConfig, device: str, which: str) -> list[str]:
    argv = [sys.executable, "-m", "surgery.bench", config.model, "--size", config.size, "--device", device,
            "--dtype", config.dtype, "--seed", str(config.seed), "--provider", config.provider,
            "--child-memory", which]
    if config.tokens is not None:
        argv += ["--tokens", str(config.tokens)]
    if config.steps is not None:
        argv += ["--steps", str(config.steps)]
    return argv


def measure_memory_subprocess(config: BenchConfig, device: str, which: str) -> dict[str, Any]:
    """Run :func:`measure_peak` in a fresh interpreter (no freed memory to reuse, no old peak)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    proc = subprocess.run(_child_argv(config, device, which), capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"error": f"memory subprocess for {which} exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if torch.equal(a, b):
        return 0.0
    return float((a.double() - b.double()).abs().nan_to_num(nan=math.inf).max())


def _timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall and process CPU time (all threads) of one call."""
    _sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, value


def _run_chunk(calls: Sequence[Callable[[], torch.Tensor]]) -> torch.Tensor:
    out = None
    for call in calls:
        out = call()
    assert out is not None, "a chunk needs at least one call"
    return out


def _paired(a: Sequence[Callable[[], torch.Tensor]], b: Sequence[Callable[[], torch.Tensor]], repeats: int,
            device: torch.device) -> dict[str, Any]:
    """``repeats`` paired chunks of ``a`` and ``b``; ratio of chunk times a/b per pair.

    The two chunks are interleaved call by call (a1 b1 b2 a2 a3 b3 ..., the order flipping
    every call and every pair), so a burst of load from other processes slows both sides
    of a pair alike instead of one whole chunk. Each side keeps its own caches, so the
    interleaving does not change what either computes. Process CPU time is kept beside
    the wall time: it does not count time spent descheduled.
    """
    if len(a) != len(b):
        raise ValueError(f"chunks differ in length ({len(a)} and {len(b)} calls)")
    wall = {"a": [], "b": []}
    cpu = {"a": [], "b": []}
    diff = 0.0
    for index in range(repeats):
        total = {"a": [0.0, 0.0], "b": [0.0, 0.0]}
        out: dict[str, torch.Tensor] = {}
        for k in range(len(a)):
            order = ("a", "b") if (index + k) % 2 == 0 else ("b", "a")
            for side in order:
                seconds, cpu_s, out[side] = _timed_cpu((a if side == "a" else b)[k], device)
                total[side][0] += seconds
                total[side][1] += cpu_s
        for side in ("a", "b"):
            wall[side].append(total[side][0])
            cpu[side].append(total[side][1])
        diff = max(diff, _max_abs_diff(out["a"], out["b"]))
    return {
        "ratio": summarise([x / y for x, y in zip(wall["a"], wall["b"])]),
        "cpu_ratio": summarise([x / y for x, y in zip(cpu["a"], cpu["b"])]),
        "ratio_of_min": min(wall["a"]) / min(wall["b"]),
        "rewritten_s": summarise(wall["a"]),
        "baseline_s": summarise(wall["b"]),
        "rewritten_cpu_s": summarise(cpu["a"]),
        "baseline_cpu_s": summarise(cpu["b"]),
        "max_abs_diff": diff,
    }


def measure_forward(subject: BenchSubject, repeats: int) -> dict[str, Any]:
    """Forward ratios (VACE on vs the reference, off vs the base) and the re-specialisation cost."""
    import surgery
    from .tracing.twin import share_tree

    suite = subject.forward
    assert suite is not None and subject.build_reference is not None
    _log("forward: building the base model, the rewritten model and the reference")
    base = suite.build_base()
    result = surgery.apply(base, subject.rule(), example_inputs=subject.example_inputs(base))
    rewritten = result.module
    # A structural copy sharing every base tensor: the reference replaces blocks in place,
    # and the base model must stay the plain model for the VACE-off comparison.
    reference = subject.build_reference(share_tree(base))
    weights = suite.share_weights(rewritten, reference)
    _release_memory()

    on_a = suite.runner(rewritten, vace=True)
    on_b = suite.runner(reference, vace=True)
    off_a = suite.runner(rewritten, vace=False)
    off_b = suite.runner(base, vace=False)
    _log("forward: warm-up chunks")
    for warm in (on_a, on_b, off_a, off_b):
        _run_chunk(warm)
    _log(f"forward: {repeats} pairs with VACE on")
    on = _paired(on_a, on_b, repeats, subject.device)
    _log(f"forward: {repeats} pairs with VACE off")
    off = _paired(off_a, off_b, repeats, subject.device)
    _log("forward: a call at a new resolution")

    # The same new signature on the real model, once: the engine's own timing of that
    # specialisation cross-checks the meta measurement (see measure_respecialise).
    state = rewritten.surgery_state
    built = state.built
    alternate = suite.runner(rewritten, vace=True, alternate=True, prefill=False, calls=1)
    first, _ = _timed(alternate[0], subject.device)
    outcome, seconds = state.last_dispatch
    respecialise = {
        "first_call_s": first,
        "seconds": seconds,
        "outcome": outcome,
        "new_specialisations": state.built - built,
    }
    return {"on": on, "off": off, "weights": weights, "respecialise": respecialise}


def _call_timed(model: nn.Module, inputs: tuple[tuple, dict], device: torch.device) -> float:
    args, kwargs = inputs
    with torch.no_grad():
        return _timed(lambda: model(*args, **kwargs), device)[0]


def _dispatch_timed(model: nn.Module, inputs: tuple[tuple, dict], device: torch.device) -> float:
    # Only the dispatch (guards, recheck, a new trace): a meta model cannot run its forward,
    # because flex attention, like other real kernels, refuses meta tensors.
    args, kwargs = inputs
    with torch.no_grad():
        return _timed(lambda: model.surgery_state.dispatch(model, args, kwargs), device)[0]


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
    from .rewriting.specialise import specialise

    assert subject.call_inputs is not None
    base = subject.build_base()
    inputs = subject.example_inputs(base)
    rule = subject.rule()
    apply_s, result = _timed(lambda: _apply(subject, base, inputs, rule), subject.device)
    model = result.module
    state = model.surgery_state
    for _ in range(2):  # the initial resolution, warm
        _dispatch_timed(model, subject.call_inputs(model, False), subject.device)
    built = state.built
    inputs = subject.call_inputs(model, True)
    first = _dispatch_timed(model, inputs, subject.device)
    outcome, seconds = state.last_dispatch
    steady = [_dispatch_timed(model, inputs, subject.device) for _ in range(steady_calls)]
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
    _release_memory()
    profiler = cProfile.Profile()
    profiler.enable()
    result = _apply(subject, base, inputs, rule)
    _sync(subject.device)
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


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """``metric <= factor x against`` (or ``< limit``), checked where ``scope`` holds."""

    name: str
    text: str
    scope: str
    applies: Callable[[dict[str, Any]], bool]
    value: Callable[[dict[str, Any]], Optional[float]]
    limit: Callable[[dict[str, Any]], Optional[float]]
    strict: bool = False  # "<" rather than "<="


def _at_13b_cpu_f32(r: dict[str, Any]) -> bool:
    return r["size"] == "1.3B" and r["device"] == "cpu" and r["dtype"] == "float32"


def _scaled(key: str, factor: float) -> Callable[[dict[str, Any]], Optional[float]]:
    return lambda r: None if r.get(key) is None else factor * r[key]


TARGETS: tuple[Target, ...] = (
    Target("apply_vs_reference", "apply_s <= 0.1 x reference_build_s", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("apply_s"), _scaled("reference_build_s", 0.1)),
    Target("apply_memory", "apply_extra_bytes <= 1.02 x vace_param_bytes", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("apply_extra_bytes"), _scaled("vace_param_bytes", 1.02)),
    Target("forward_on", "forward_ratio_on <= 1.00", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("forward_ratio_on"), lambda r: 1.00),
    Target("forward_off", "forward_ratio_off <= 1.01", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("forward_ratio_off"), lambda r: 1.01),
    Target("apply_14b", "apply_s < 2 s (14B shapes, any device incl. meta)", "14B",
           lambda r: r["size"] == "14B", lambda r: r.get("apply_s"), lambda r: 2.0, strict=True),
    Target("respecialise", "respecialise_s < 0.25 x apply_s", "any",
           lambda r: True, lambda r: r.get("respecialise_s"), _scaled("apply_s", 0.25), strict=True),
)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value, limit, pass/fail (None when not measured)."""
    rows = []
    for target in TARGETS:
        value, limit = target.value(results), target.limit(results)
        passed = None
        if value is not None and limit is not None:
            passed = bool(value < limit) if target.strict else bool(value <= limit)
        rows.append({"name": target.name, "target": target.text, "scope": target.scope,
                     "applies": bool(target.applies(results)), "value": value, "limit": limit, "pass": passed})
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value / 2**20:,.1f} MiB"
    if unit == "s":
        return f"{value:.4f} s" if abs(value) < 10 else f"{value:.2f} s"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_table(results: dict[str, Any]) -> Any:
    """A rich table of the headline numbers and the targets."""
    from rich.table import Table

    stats = results["stats"]
    title = (f"surgery bench {results['model']} {results['size']} {results['device']} {results['dtype']}"
             + (f" (asked for {results['requested_device']})" if results["requested_device"] != results["device"] else ""))
    table = Table(title=title, title_justify="left")
    for col in ("metric", "median", "min", "max", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")

    def row(name: str, key: str, unit: str) -> None:
        s = stats.get(key)
        if s is None:
            table.add_row(name, _fmt(results.get(key), unit), "-", "-", "-" if results.get(key) is None else "1")
        else:
            table.add_row(name, _fmt(s["median"], unit), _fmt(s["min"], unit), _fmt(s["max"], unit), str(s["n"]))

    row("apply_s", "apply_s", "s")
    row("reference_build_s", "reference_build_s", "s")
    row("apply_extra_bytes", "apply_extra_bytes", "B")
    row("reference_extra_bytes", "reference_extra_bytes", "B")
    row("vace_param_bytes", "vace_param_bytes", "B")
    row("forward_ratio_on", "forward_ratio_on", "")
    row("forward_ratio_off", "forward_ratio_off", "")
    forward = results.get("forward") or {}
    for side in ("on", "off"):
        if side in forward:
            s = forward[side]["cpu_ratio"]
            table.add_row(f"  cpu-time ratio {side}", _fmt(s["median"]), _fmt(s["min"]), _fmt(s["max"]), str(s["n"]))
    row("respecialise_s", "respecialise_s", "s")

    targets = Table(title="Targets", title_justify="left")
    for col in ("target", "scope", "value", "limit", "result"):
        targets.add_column(col)
    for t in results["targets"]:
        unit = "B" if "bytes" in t["target"] else ("s" if t["target"].split()[0].endswith("_s") else "")
        verdict = "-" if t["pass"] is None else ("[green]pass[/]" if t["pass"] else "[red]fail[/]")
        if not t["applies"] and t["pass"] is not None:
            verdict += " (other setting)"
        targets.add_row(t["target"], t["scope"], _fmt(t["value"], unit), _fmt(t["limit"], unit), verdict)
    return table, targets


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def load_provider(spec: str) -> Callable[..., BenchSubject]:
    """Import ``module:function``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"bad provider {spec!r}", "write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import benchmark provider {module_name!r}: {exc}",
                         "run from the repository root (PYTHONPATH=.) or pass --provider") from exc
    provider = getattr(module, attr, None)
    if not callable(provider):
        raise InputError(f"{module_name!r} has no function {attr!r}", "pass --provider package.module:function")
    return provider


def _subject(config: BenchConfig, device: str) -> BenchSubject:
    provider = load_provider(config.provider)
    return provider(config.model, size=config.size, device=torch.device(device), dtype=DTYPES[config.dtype],
                    tokens=config.tokens, steps=config.steps, seed=config.seed)


def _free_bytes(device: str) -> Optional[int]:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return machine_info(torch.device("cpu")).get("memory_available_bytes")


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Measure everything ``config`` asks for; returns the ``bench.json`` content."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was given but torch sees no CUDA device", "run on a GPU machine or use --device cpu")
    requested = config.device
    device = requested
    subject = _subject(config, device)
    notes: list[str] = []
    free = _free_bytes(device)
    if free is not None and subject.base_param_bytes > MEMORY_HEADROOM * free:
        notes.append(f"the {config.size} base model needs {subject.base_param_bytes / 2**30:.1f} GiB of parameters, "
                     f"more than {MEMORY_HEADROOM:.0%} of the {free / 2**30:.1f} GiB free on {requested}: apply_s is "
                     "measured on the meta device (trace, match, rewrite, graft without storage; apply_extra_bytes is then "
                     "the host memory apply itself needs); the reference build and the forward runs need real weights "
                     "and are skipped")
        device = "meta"
        subject = _subject(config, device)
    machine = machine_info(subject.device)
    load_before = machine.get("loadavg")
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "model": config.model,
        "size": config.size,
        "device": device,
        "requested_device": requested,
        "dtype": config.dtype,
        "note": " ".join(notes) or None,
        "machine": machine,
        "torch": torch.__version__,
        "source": source_info(),
        "settings": {"repeats": config.repeats, "pairs": config.pairs or config.repeats, "seed": config.seed,
                     **subject.settings},
        "skipped": {},
    }

    builds = measure_build_times(subject, config.repeats)
    results.update(apply_s=builds["apply"]["median"], apply_first_s=(builds["apply"]["values"] or [None])[0],
                   reference_build_s=builds["reference"]["median"], apply_phases_s=builds["phases"],
                   vace_param_bytes=builds["vace_param_bytes"],
                   reference_vace_param_bytes=builds["reference_vace_param_bytes"])
    stats: dict[str, Any] = {"apply_s": builds["apply"], "reference_build_s": builds["reference"]}
    if subject.build_reference is None:
        results["skipped"]["reference_build_s"] = "no reference at this setting"

    memory: dict[str, Any] = {}
    if config.memory:
        for which in ("apply", "reference"):
            if which == "reference" and subject.build_reference is None:
                results["skipped"]["reference_extra_bytes"] = "no reference at this setting"
                continue
            _log(f"memory: {which} in a fresh subprocess")
            memory[which] = measure_memory_subprocess(config, device, which)
        memory["method"] = ("one fresh subprocess per measurement: build the base model and example inputs, "
                            "warm up on a small model, gc + malloc_trim, then peak over the call minus the "
                            "resident size before it")
    else:
        results["skipped"]["memory"] = "--no-memory"
    results["memory"] = memory
    results["apply_extra_bytes"] = memory.get("apply", {}).get("extra_bytes")
    results["reference_extra_bytes"] = memory.get("reference", {}).get("extra_bytes")

    results.update(respecialise_s=None, respecialise=None)
    meta_subject = subject if device == "meta" else _subject(config, "meta")
    if meta_subject.call_inputs is None:
        results["skipped"]["respecialise_s"] = "the provider gives no call_inputs"
    else:
        _log("respecialise: a new resolution on the meta device")
        results["respecialise"] = measure_respecialise(meta_subject)
        results["respecialise_s"] = results["respecialise"]["seconds"]

    results.update(forward_ratio_on=None, forward_ratio_off=None, forward=None)
    if not config.forward:
        results["skipped"]["forward"] = "--no-forward"
    elif subject.forward is None or subject.build_reference is None:
        results["skipped"]["forward"] = f"no forward runs on {device}"
    else:
        forward = measure_forward(subject, config.pairs or config.repeats)
        results.update(forward_ratio_on=forward["on"]["ratio"]["median"],
                       forward_ratio_off=forward["off"]["ratio"]["median"], forward=forward)
        stats.update(forward_ratio_on=forward["on"]["ratio"], forward_ratio_off=forward["off"]["ratio"])

    if config.profile:
        _log("profiling one apply")
        text, entries = profile_apply(subject, config.profile)
        results["profile"] = {"top_by_tottime": entries}
        results["_profile_text"] = text
    results["stats"] = stats
    results["load"] = {"before": load_before, "after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    results["targets"] = evaluate_targets(results)
    return results


def write_results(directory: str | os.PathLike[str], results: dict[str, Any]) -> list[Path]:
    """``bench.json`` (and ``apply_profile.txt`` when profiled), written atomically together."""
    directory = Path(directory)
    results = dict(results)
    profile_text = results.pop("_profile_text", None)
    files: dict[Path, str] = {directory / BENCH_FILE: json.dumps(results, indent=2, default=str) + "\n"}
    if profile_text:
        files[directory / PROFILE_FILE] = profile_text
    return atomic_write_many(files)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgery bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="built-in model name (or what --provider understands)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "1.3B", "14B"))
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--report", default=".", metavar="DIR", help="where bench.json goes (default: .)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="runs per measurement (default 5)")
    parser.add_argument("--pairs", type=int, default=None, metavar="N",
                        help="paired forward chunks per ratio (default: --repeats); a ratio near 1 on a "
                             "shared machine needs many")
    parser.add_argument("--tokens", type=int, default=None, metavar="N",
                        help="tokens per streaming chunk for the forward runs (default: provider's)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="denoising calls per chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--provider", default=DEFAULT_PROVIDER, metavar="MODULE:FUNCTION")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the forward runs")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one extra apply; keep the top N entries (apply_profile.txt)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target of this setting fails")
    parser.add_argument("--child-memory", choices=("apply", "reference"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``surgery bench``: run the benchmark, print a table, write ``bench.json``; the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.repeats < 1:
        raise InputError(f"--repeats {args.repeats} is not positive", "pass --repeats 1 or more")
    if args.pairs is not None and args.pairs < 1:
        raise InputError(f"--pairs {args.pairs} is not positive", "pass --pairs 1 or more")
    if args.tokens is not None and args.tokens < 1:
        raise InputError(f"--tokens {args.tokens} is not positive", "pass a positive token count")
    config = BenchConfig(model=args.model, size=args.size, device=args.device, dtype=args.dtype, report=args.report,
                         repeats=args.repeats, pairs=args.pairs, tokens=args.tokens, steps=args.steps, seed=args.seed,
                         provider=args.provider, memory=args.memory, forward=args.forward, profile=args.profile,
                         strict=args.strict)
    if args.child_memory:
        print(json.dumps(measure_peak(_subject(config, config.device), args.child_memory)))
        return 0

    from .cli import render

    results = run_bench(config)
    paths = write_results(config.report, results)
    out = render.console()
    for table in render_table(results):
        out.print(table)
    if results.get("note"):
        out.print(f"note: {results['note']}")
    for key, reason in results["skipped"].items():
        out.print(f"skipped {key}: {reason}")
    out.print(f"wrote {', '.join(str(p) for p in paths)}")
    failed = [t for t in results["targets"] if t["applies"] and t["pass"] is False]
    return 1 if config.strict and failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SurgeryError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
