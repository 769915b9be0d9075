"""``python benchmarks/bench.py``: what surgery costs, measured side by side with a hand-written wrapper.

One process measures, interleaved, the rewritten model against a hand-written reference of
the same graft on an identical base model, and writes ``bench.json`` (atomically) plus a
table. Everything model-specific (how to build the base model, its example call, the
reference wrapper, a streaming chunk) comes from a *provider*: a function
``provider(model, *, size, device, dtype, tokens, steps, seed) -> BenchSubject``; the
built-in examples' provider is :data:`DEFAULT_PROVIDER` (:mod:`benchmarks.bench_models`). The
measuring code is :mod:`benchmarks.measure` and :mod:`benchmarks.memory`; the targets are
:mod:`benchmarks.targets`.

Metrics (medians over ``--repeats`` runs, with min and max, in ``stats``):

* ``apply_s``: wall time of ``surgery.apply`` (trace, match, graft, rewrite); a fresh base
  model per run, built outside the timed region. ``reference_build_s``: building the
  reference wrapper on an identical fresh base. The two alternate (A B, B A, ...).
* ``apply_extra_bytes`` / ``reference_extra_bytes``: peak memory added by the call, each in
  a fresh subprocess (see :func:`measure_peak`) against ``vace_param_bytes``, the bytes of
  the grafted parameters.
* ``forward_ratio_on``: median over ``--pairs`` paired runs of (rewritten, VACE on) / (reference) over a
  streaming chunk (several denoising calls at the same ``current_start``);
  ``forward_ratio_on_lean``: the same against a lean hand-written graft (hooks on the base
  model, the context padded only to the chunk: :mod:`benchmarks.lean_vace`), from the same
  rounds (the three VACE-on sides interleave);
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

Exit codes: 0 every target that applies to the run's setting and was measured passed (or
none applies); 1 an applicable target failed (targets of other settings are ``n/a`` and
never count); 2 bad usage or input (one line on stderr, before any work); 3 an internal
error (one line; ``--debug`` for the traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script (python benchmarks/bench.py): import from the repository root,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # not from benchmarks/ (its module names are generic)

import torch  # noqa: E402

from benchmarks.machine import machine_info, source_info  # noqa: E402
from benchmarks.measure import measure_build_times, measure_forward, measure_respecialise, profile_apply  # noqa: E402
from benchmarks.memory import measure_peak  # noqa: E402
from benchmarks.subject import BenchSubject  # noqa: E402
from benchmarks.targets import evaluate_targets, failed, verdict  # noqa: E402
from benchmarks.timing import log  # noqa: E402
from surgery.cli.main import (  # noqa: E402
    DTYPE_NAMES,
    EXIT_FAILED,
    EXIT_OK,
    OneLineParser,
    guarded,
    interruptible,
    parse_seed,
)
from surgery.cli.preflight import check_device, torch_dtype  # noqa: E402
from surgery.errors import InputError  # noqa: E402
from surgery.reports.files import atomic_write_many, check_writable  # noqa: E402

__all__ = ["BENCH_FILE", "DEFAULT_PROVIDER", "PROFILE_FILE", "BenchConfig", "build_parser", "check_config",
           "load_provider", "main", "render_table", "run_bench", "write_results"]

BENCH_FILE = "bench.json"
PROFILE_FILE = "apply_profile.txt"
SCHEMA = 1
#: The built-in examples' provider (``module:function``).
DEFAULT_PROVIDER = "benchmarks.bench_models:bench_subject"
SIZES = ("tiny", "1.3B", "14B")
#: A base model whose parameters need more than this share of the free memory is measured
#: on the meta device (apply only): tracing and matching never read weight values.
MEMORY_HEADROOM = 0.8


@dataclass
class BenchConfig:
    """Parsed command-line options of the harness."""

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
    compile: Optional[str] = None  # a torch.compile backend for the forward runs (whole models)
    compile_blocks: Optional[str] = None  # a torch.compile backend for each main block of the forward runs


# --------------------------------------------------------------------------------------------
# Checks before any work
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


def check_config(config: BenchConfig) -> None:
    """Everything that can be checked before measuring: device, dtype, provider, output directory."""
    check_device(config.device, allow_meta=True)
    torch_dtype(config.dtype)
    load_provider(config.provider)
    if config.compile is not None and config.compile_blocks is not None:
        raise InputError("--compile and --compile-blocks were both given",
                         "pass one: --compile compiles whole models, --compile-blocks each main block")
    for flag, backend in (("--compile", config.compile), ("--compile-blocks", config.compile_blocks)):
        if backend is not None and backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise InputError(f"unknown torch.compile backend {backend!r} for {flag}",
                             "use eager, aot_eager or inductor (torch._dynamo.list_backends() lists all)")
    check_writable([Path(config.report) / BENCH_FILE, Path(config.report) / PROFILE_FILE], "report directory")


def _subject(config: BenchConfig, device: str) -> BenchSubject:
    provider = load_provider(config.provider)
    return provider(config.model, size=config.size, device=torch.device(device), dtype=torch_dtype(config.dtype),
                    tokens=config.tokens, steps=config.steps, seed=config.seed)


def _free_bytes(device: str) -> Optional[int]:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return machine_info(torch.device("cpu")).get("memory_available_bytes")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _child_argv(config: BenchConfig, device: str, which: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), config.model, "--size", config.size, "--device", device,
            "--dtype", config.dtype, "--seed", str(config.seed), "--provider", config.provider,
            "--child-memory", which]
    if config.tokens is not None:
        argv += ["--tokens", str(config.tokens)]
    if config.steps is not None:
        argv += ["--steps", str(config.steps)]
    return argv


def _memory_subprocess(config: BenchConfig, device: str, which: str) -> dict[str, Any]:
    """Run :func:`measure_peak` in a fresh interpreter (no freed memory to reuse, no old peak)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    proc = subprocess.run(_child_argv(config, device, which), capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"error": f"memory subprocess for {which} exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Measure everything ``config`` asks for; returns the ``bench.json`` content."""
    check_config(config)
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
                     "compile": config.compile, "compile_blocks": config.compile_blocks, **subject.settings},
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
            log(f"memory: {which} in a fresh subprocess")
            memory[which] = _memory_subprocess(config, device, which)
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
        log("respecialise: a new resolution on the meta device")
        results["respecialise"] = measure_respecialise(meta_subject)
        results["respecialise_s"] = results["respecialise"]["seconds"]

    results.update(forward_ratio_on=None, forward_ratio_on_lean=None, forward_ratio_off=None, forward=None)
    if not config.forward:
        results["skipped"]["forward"] = "--no-forward"
    elif subject.forward is None or subject.build_reference is None:
        results["skipped"]["forward"] = f"no forward runs on {device}"
    else:
        forward = measure_forward(subject, config.pairs or config.repeats, backend=config.compile or config.compile_blocks,
                                  blocks=config.compile_blocks is not None)
        results.update(forward_ratio_on=forward["on"]["ratio"]["median"],
                       forward_ratio_off=forward["off"]["ratio"]["median"], forward=forward)
        stats.update(forward_ratio_on=forward["on"]["ratio"], forward_ratio_off=forward["off"]["ratio"])
        if forward["on_lean"] is None:
            results["skipped"]["forward_ratio_on_lean"] = "the provider gives no lean graft (build_lean)"
        else:
            results["forward_ratio_on_lean"] = forward["on_lean"]["ratio"]["median"]
            stats["forward_ratio_on_lean"] = forward["on_lean"]["ratio"]

    if config.profile:
        log("profiling one apply")
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
    title = (f"bench {results['model']} {results['size']} {results['device']} {results['dtype']}"
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
    row("forward_ratio_on_lean", "forward_ratio_on_lean", "")
    row("forward_ratio_off", "forward_ratio_off", "")
    forward = results.get("forward") or {}
    for side in ("on", "on_lean", "off"):
        if forward.get(side):
            s = forward[side]["cpu_ratio"]
            table.add_row(f"  cpu-time ratio {side}", _fmt(s["median"]), _fmt(s["min"]), _fmt(s["max"]), str(s["n"]))
    row("respecialise_s", "respecialise_s", "s")

    targets = Table(title="Targets", title_justify="left")
    for col in ("target", "scope", "value", "limit", "result"):
        targets.add_column(col)
    colours = {"pass": "green", "fail": "red"}
    for t in results["targets"]:
        unit = "B" if "bytes" in t["target"] else ("s" if t["target"].split()[0].endswith("_s") else "")
        result = verdict(t)
        shown = f"[{colours[result]}]{result}[/]" if result in colours else result
        targets.add_row(t["target"], t["scope"], _fmt(t["value"], unit), _fmt(t["limit"], unit), shown)
    return table, targets


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: use 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The harness's argument parser (every flag has a help text)."""
    parser = OneLineParser(
        prog="bench", description="What surgery costs, measured side by side with a hand-written wrapper "
                                  "(benchmarks/README.md explains every measurement).",
        epilog="exit codes: 0 every applicable target passed; 1 an applicable target failed (targets of "
               "other settings are n/a); 2 bad usage or input; 3 internal error; 130 interrupted")
    parser.add_argument("model", metavar="MODEL", help="built-in model name (or what --provider understands)")
    parser.add_argument("--size", default="tiny", choices=SIZES, help="model size (default: tiny)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="cpu, cuda, cuda:N or meta (apply and re-specialisation only) (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="model dtype (default: float32)")
    parser.add_argument("--report", default=".", metavar="DIR",
                        help="where bench.json (and apply_profile.txt) go (default: .)")
    parser.add_argument("--repeats", type=_positive, default=5, metavar="N", help="runs per measurement (default: 5)")
    parser.add_argument("--pairs", type=_positive, default=None, metavar="N",
                        help="paired forward chunks per ratio (default: --repeats); a ratio near 1 on a "
                             "shared machine needs many")
    parser.add_argument("--tokens", type=_positive, default=None, metavar="N",
                        help="tokens per streaming chunk for the forward runs (default: the provider's)")
    parser.add_argument("--steps", type=_positive, default=None, metavar="N",
                        help="denoising calls per chunk (default: the pipeline's steps)")
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed of the models and inputs (default: 0)")
    parser.add_argument("--provider", default=DEFAULT_PROVIDER, metavar="MODULE:FUNCTION",
                        help=f"what builds the models to measure (default: {DEFAULT_PROVIDER})")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the memory measurements (fresh subprocesses)")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the forward runs")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="compile the models of the forward runs whole (module.compile) with this torch.compile "
                             "backend (eager, aot_eager, inductor) first; their ratios then compare compiled models")
    parser.add_argument("--compile-blocks", default=None, metavar="BACKEND",
                        help="compile each main block of the models of the forward runs (block.compile, as scope does "
                             "for Krea) with this backend instead; not with --compile")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one extra apply; keep the top N entries (apply_profile.txt)")
    parser.add_argument("--child-memory", choices=("apply", "reference"),
                        help="internal: measure one peak in this process and print it as JSON (what the "
                             "memory subprocesses run)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    return parser


def _config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(model=args.model, size=args.size, device=args.device, dtype=args.dtype, report=args.report,
                       repeats=args.repeats, pairs=args.pairs, tokens=args.tokens, steps=args.steps, seed=args.seed,
                       provider=args.provider, memory=args.memory, forward=args.forward, profile=args.profile,
                       compile=args.compile, compile_blocks=args.compile_blocks)


def _bench(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.child_memory:
        print(json.dumps(measure_peak(_subject(config, config.device), args.child_memory)))
        return EXIT_OK
    from surgery.cli import render

    results = run_bench(config)
    paths = write_results(config.report, results)
    out = render.console()
    for table in render_table(results):
        out.print(table)
    if results.get("note"):
        out.print(f"note: {results['note']}")
    for key, reason in results["skipped"].items():
        out.print(f"skipped {key}: {reason}")
    compiled = (results.get("forward") or {}).get("compile")
    if compiled:
        firsts = ", ".join(f"{side} {seconds:.1f} s" for side, seconds in compiled["first_chunk_s"].items())
        what = "each main block" if compiled.get("mode") == "blocks" else "whole models"
        out.print(f"compiled ({what}) with {compiled['backend']}: first chunks {firsts}; graphs compiled during the "
                  f"pairs: {compiled['graphs_during_pairs']}")
    out.print(f"wrote {', '.join(str(p) for p in paths)}")
    failures = failed(results["targets"])
    if failures:
        out.print(f"failed targets of this setting: {', '.join(failures)} (exit {EXIT_FAILED})")
    return EXIT_FAILED if failures else EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    return guarded("bench", lambda: _bench(args), debug=args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print its tables, write ``bench.json``; the exit code (see the module docstring)."""
    return interruptible("bench", lambda: _run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
