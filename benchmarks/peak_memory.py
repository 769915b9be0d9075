"""Benchmark: peak memory (RSS) of the command line at real sizes, against the checkpoint's bytes.

Target: ``surgery apply MODEL --size 1.3B --weights FULL --save OUT`` peaks at no more than
1.3 x the bytes of FULL, a full checkpoint (every base key and every VACE key of the model).

The script writes such a checkpoint with random values in ``--dtype`` into a temporary
directory (streamed tensor by tensor, so writing it costs little memory; about 4.4 GB in
bfloat16 and 8.8 GB in float32 for longlive at 1.3B: 1.42 B base and 0.77 B VACE parameters),
runs each case's command line in a child process and reads the child's peak resident set
size (``ru_maxrss`` of ``RUSAGE_CHILDREN``, read by a small wrapper process so that every
run is measured alone), and deletes the files afterwards. Cases:

* ``full``: ``--weights FULL --save OUT`` (the target);
* ``split``: ``--base-weights BASE --weights VACE --save OUT``, the base and the VACE branch
  in two files (written only for this case);
* ``save``: ``--save OUT`` without weights (the VACE branch is zero pages);
* ``dry-run``: ``--dry-run``, the process's fixed cost (Python, torch, tracing).

``--cli-root DIR`` runs the command line of another checkout (e.g. ``git archive`` of an
older commit) for a before/after comparison, and ``--cli-arg`` adds arguments to every case.

    PYTHONPATH=. python benchmarks/peak_memory.py                                     # longlive, 1.3B, bfloat16
    PYTHONPATH=. python benchmarks/peak_memory.py --dtype float32 --cases full
    PYTHONPATH=. python benchmarks/peak_memory.py --out benchmarks/results/peak_memory-longlive-1.3B-bfloat16.json
    PYTHONPATH=. python benchmarks/peak_memory.py --size tiny --cases full,save        # a quick check

Exit 0 when the target holds (or was not measured), 1 when it failed, 2 on bad options.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3
CASES = ("full", "split", "save", "dry-run")
VACE_PREFIXES = ("vace_blocks.", "vace_patch_embedding.")
# Runs a command with its output in a log file, then prints the peak RSS of that command alone.
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
with open(sys.argv[1], "wb") as log:
    rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - start}))
"""


def layout(model: str, size: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every key of the rewritten model at ``size`` (base and VACE), as meta tensors in ``dtype``."""
    import surgery
    from surgery.cli.loading import build_rule, load_model

    loaded = load_model(model, size=size, need_values=False)
    result = surgery.apply(loaded.model, build_rule("vace", [], loaded), example_inputs=loaded.example_inputs)
    return {k: torch.empty(v.shape, dtype=dtype, device="meta") for k, v in result.module.state_dict().items()}


def random_values(key: str, like: torch.Tensor) -> torch.Tensor:
    """Small uniform values, the same for every run (seeded by the key); never all zero."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.empty(like.shape, dtype=torch.float32).uniform_(-0.02, 0.02, generator=g).to(like.dtype)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Stream ``tensors``' keys with random values into ``path``; its size in bytes."""
    from surgery.cli.safetensors_out import write_safetensors

    write_safetensors(path, tensors, values=lambda key: random_values(key, tensors[key]))
    return path.stat().st_size


def measure(argv: list[str], log: Path, cli_root: Path) -> dict[str, Any]:
    """Peak RSS, wall time and exit code of ``python -m surgery ARGV`` run from ``cli_root``."""
    env = dict(os.environ, PYTHONPATH=str(cli_root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "surgery", *argv]
    done = subprocess.run([sys.executable, "-c", _WRAPPER, str(log), *command], cwd=cli_root, env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        result["log_tail"] = log.read_text(errors="replace").strip().splitlines()[-3:]
    return result


def case_argv(case: str, model: str, size: str, files: dict[str, Path], out: Path, extra: list[str]) -> list[str]:
    common = ["apply", model, "--size", size, "--no-validate", *extra]
    return {
        "full": [*common, "--weights", str(files["full"]), "--save", str(out)],
        "split": [*common, "--base-weights", str(files.get("base", "")), "--weights", str(files.get("vace", "")),
                  "--save", str(out)],
        "save": [*common, "--save", str(out)],
        "dry-run": ["apply", model, "--size", size, "--dry-run", *extra],
    }[case]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.machine import machine_info, source_info

    dtype = getattr(torch, args.dtype)
    tensors = layout(args.model, args.size, dtype)
    nbytes = {part: sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(VACE_PREFIXES) == vace)
              for part, vace in (("base", False), ("vace", True))}
    workdir = Path(tempfile.mkdtemp(prefix="peak_memory-", dir=args.tmp))
    results: dict[str, Any] = {
        "model": args.model, "size": args.size, "dtype": args.dtype, "cli_root": str(args.cli_root),
        "cli_args": args.cli_arg, "base_param_bytes": nbytes["base"], "vace_param_bytes": nbytes["vace"],
        "machine": machine_info(torch.device("cpu")), "source": source_info(), "cases": {},
    }
    try:
        files = {"full": workdir / "full.safetensors"}
        start = time.perf_counter()
        results["checkpoint_bytes"] = write_checkpoint(files["full"], tensors)
        results["write_s"] = time.perf_counter() - start
        if "split" in args.cases:
            for part, vace in (("base", False), ("vace", True)):
                files[part] = workdir / f"{part}.safetensors"
                write_checkpoint(files[part], {k: t for k, t in tensors.items() if k.startswith(VACE_PREFIXES) == vace})
        for case in args.cases:
            out = workdir / f"{case}.out.safetensors"
            argv = case_argv(case, args.model, args.size, files, out, args.cli_arg)
            measured = measure(argv, workdir / f"{case}.log", args.cli_root)
            measured["argv"] = ["surgery", *argv]
            measured["ratio_to_checkpoint"] = measured["peak_rss_bytes"] / results["checkpoint_bytes"]
            results["cases"][case] = measured
            out.unlink(missing_ok=True)
            print(f"{case:8s} peak {measured['peak_rss_bytes'] / 2**30:6.2f} GiB = "
                  f"{measured['ratio_to_checkpoint']:.3f} x checkpoint ({results['checkpoint_bytes'] / 2**30:.2f} GiB), "
                  f"{measured['wall_s']:.1f} s, exit {measured['rc']}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    full = results["cases"].get("full")
    results["target"] = {
        "what": f"full: peak RSS <= {TARGET} x checkpoint_bytes",
        "result": "not measured" if full is None else "pass" if full["rc"] == 0 and full["ratio_to_checkpoint"] <= TARGET
        else "fail",
    }
    return results


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peak_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="longlive", help="built-in model (default: longlive)")
    parser.add_argument("--size", default="1.3B", choices=("tiny", "1.3B", "14B"), help="model size (default: 1.3B)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the generated checkpoint (default: bfloat16)")
    parser.add_argument("--cases", default="full,save,dry-run",
                        help=f"comma-separated cases out of {', '.join(CASES)} (default: full,save,dry-run)")
    parser.add_argument("--cli-root", type=Path, default=ROOT, help="checkout whose command line is measured")
    parser.add_argument("--cli-arg", action="append", default=[], metavar="ARG",
                        help="an argument added to every case's command line (repeatable), e.g. --cli-arg=--dtype=bfloat16")
    parser.add_argument("--tmp", default=None, help="where the checkpoint is written (default: the system's temp dir)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none given)'}: use {', '.join(CASES)}")
    if not (args.cli_root / "surgery" / "__main__.py").is_file():
        parser.error(f"--cli-root {args.cli_root} holds no surgery package")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"target {results['target']['what']}: {results['target']['result']}")
    return 1 if results["target"]["result"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
