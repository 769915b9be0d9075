"""Benchmark: ``load_vace_weights`` against plain ``safetensors`` loading, target ratio <= 1.1.

Writes a VACE-branch-sized checkpoint twice, in bfloat16 and in float32 (Wan 1.3B dims:
dim 1536, ffn 8960, 15 VACE blocks, about 735 M parameters, 1.47 GB in bf16; ``--scale``
shrinks dim and ffn), then times pairs of methods, each run in a fresh process on a
model built the way surgery grafts it (``surgery.grafting.build.allocate``: zero pages
that cost nothing until written), with the page cache warmed first so disk speed does
not count. The two sides of a pair alternate (ABBA) so that the machine's load hits both
alike; a ratio is the median over the pairs of candidate / baseline, for wall time and for
the process's CPU time (user + system, page faults included). The target is judged on CPU
time: on a shared machine, wall time also counts the time a process waits for a core.

    PYTHONPATH=. python benchmarks/weights_load.py --pairs 7            # full size (~9 GB RAM)
    PYTHONPATH=. python benchmarks/weights_load.py --scale 0.25 --pairs 3
    PYTHONPATH=. python benchmarks/weights_load.py --out benchmarks/results/weights_load.json

Comparisons (candidate vs baseline, same file, same model):
* ``copy bf16->bf16``: the default (every tensor copied, checked) vs ``load_file`` +
  ``load_state_dict`` (copying into the model's parameters): the target pair.
* ``convert f32->bf16``: the default with conversion vs ``load_file`` + ``load_state_dict``
  (which converts in ``copy_``): the target pair.
* ``mmap bf16->bf16``: ``mmap=True`` (parameters become the file's mapped tensors, checked)
  vs plain ``load_file`` reading every byte of its mapped tensors: a target pair.
* ``mmap bf16->bf16, both into the model``: the same against ``load_file`` +
  ``load_state_dict(assign=True)`` reading every byte: the same end state (the model's
  parameters are the file's mapped tensors), without the checks: a target pair.
* ``copy vs mapped load_file``: the default vs plain ``load_file`` reading every byte; for
  information only: a copy into fresh memory cannot cost what mapping page-cache pages costs.
``--populated`` also measures the ``load_state_dict`` pairs on a model whose pages were
written before (a second load), where ``load_state_dict`` copies into memory that exists
while the transactional loader still builds fresh storage.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.1
# name -> (file dtype, model dtype, candidate method, baseline method, counts toward the target)
COMPARISONS: dict[str, tuple[str, str, str, str, bool]] = {
    "copy bf16->bf16": ("bfloat16", "bfloat16", "load_vace_weights", "load_file + load_state_dict", True),
    "convert f32->bf16": ("float32", "bfloat16", "load_vace_weights", "load_file + load_state_dict", True),
    "mmap bf16->bf16": ("bfloat16", "bfloat16", "load_vace_weights mmap=True", "load_file, every byte read", True),
    "mmap bf16->bf16, both into the model": ("bfloat16", "bfloat16", "load_vace_weights mmap=True",
                                             "load_file + load_state_dict(assign=True), every byte read", True),
    "copy vs mapped load_file": ("bfloat16", "bfloat16", "load_vace_weights", "load_file, every byte read", False),
}
POPULATED = {
    "copy bf16->bf16, populated model": ("bfloat16", "bfloat16", "load_vace_weights", "load_file + load_state_dict",
                                         False),
    "convert f32->bf16, populated model": ("float32", "bfloat16", "load_vace_weights", "load_file + load_state_dict",
                                           False),
}


class Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim), nn.RMSNorm(dim)


class VaceBlock(nn.Module):
    def __init__(self, dim: int, ffn: int, index: int) -> None:
        super().__init__()
        self.self_attn, self.cross_attn = Attn(dim), Attn(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        if index == 0:
            self.before_proj = nn.Linear(dim, dim)
        self.after_proj = nn.Linear(dim, dim)


class VaceBranch(nn.Module):
    """Only the VACE part of a grafted model, with its native keys."""

    def __init__(self, dim: int, ffn: int, blocks: int, vace_in: int = 96) -> None:
        super().__init__()
        self.vace_patch_embedding = nn.Conv3d(vace_in, dim, (1, 2, 2), (1, 2, 2))
        self.vace_blocks = nn.ModuleList(VaceBlock(dim, ffn, k) for k in range(blocks))


def dims(scale: float) -> tuple[int, int]:
    return max(64, round(1536 * scale / 64) * 64), max(64, round(8960 * scale / 64) * 64)


def build(dim: int, ffn: int, blocks: int, dtype: torch.dtype, populated: bool) -> nn.Module:
    """The branch as surgery grafts it: built on meta, given lazily-zero storage."""
    from surgery.grafting.build import allocate

    with torch.device("meta"):
        model = VaceBranch(dim, ffn, blocks)
    allocate(model, device=torch.device("cpu"), dtype=dtype)
    if populated:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.01)  # a model whose weights were loaded once already
    return model


def write_files(directory: Path, dim: int, ffn: int, blocks: int) -> tuple[dict[str, Path], int]:
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VaceBranch(dim, ffn, blocks).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    values = {k: torch.randn(shape, generator=g).to(torch.bfloat16) for k, shape in shapes.items()}
    paths = {"bfloat16": directory / "vace_bf16.safetensors", "float32": directory / "vace_f32.safetensors"}
    save_file(values, str(paths["bfloat16"]))
    save_file({k: v.float() for k, v in values.items()}, str(paths["float32"]))
    return paths, sum(v.numel() for v in values.values())


def child(method: str, file: str, dim: int, ffn: int, blocks: int, dtype_name: str, populated: bool) -> dict:
    from safetensors.torch import load_file

    from rules.vace import load_vace_weights

    model = build(dim, ffn, blocks, getattr(torch, dtype_name), populated)
    # Start both sides of a pair from the same collector state: importing torch and building
    # the model leave a full collection due, which would land on whichever side allocates more.
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    if method == "load_file, every byte read":
        loaded = load_file(file)
        for t in loaded.values():
            t.view(-1).view(torch.uint8).max()  # its tensors are lazily mapped: make it read them
    elif method == "load_file + load_state_dict":
        model.load_state_dict(load_file(file), strict=True)
    elif method == "load_file + load_state_dict(assign=True), every byte read":
        loaded = load_file(file)
        model.load_state_dict(loaded, strict=True, assign=True)  # the parameters become the mapped tensors
        for t in loaded.values():
            t.view(-1).view(torch.uint8).max()
    else:
        load_vace_weights(model, file, mmap=method.endswith("mmap=True"))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    w = model.vace_blocks[blocks - 1].ffn[0].weight
    # Same value for every method that loads, so a pair cannot time a load that did nothing.
    checksum = None if method.startswith("load_file,") else float(w.float().sum())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "checksum": checksum}


def _warm(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(1 << 24):
            pass


def _run(method: str, path: Path, dim: int, ffn: int, blocks: int, dtype: str, populated: bool) -> dict:
    _warm(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(path), str(dim), str(ffn), str(blocks), dtype,
         str(int(populated))],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{method} on {path.name} failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(name: str, spec: tuple[str, str, str, str, bool], paths: dict[str, Path], dim: int, ffn: int,
            blocks: int, pairs: int) -> dict:
    file_dtype, model_dtype, candidate, baseline, target = spec
    populated = name.endswith("populated model")
    wall: dict[str, list[float]] = {candidate: [], baseline: []}
    cpu: dict[str, list[float]] = {candidate: [], baseline: []}
    checksums = set()
    for i in range(pairs):
        order = (candidate, baseline) if i % 2 == 0 else (baseline, candidate)
        for method in order:
            r = _run(method, paths[file_dtype], dim, ffn, blocks, model_dtype, populated)
            wall[method].append(r["seconds"])
            cpu[method].append(r["cpu_seconds"])
            if r["checksum"] is not None:
                checksums.add(r["checksum"])
    if len(checksums) > 1:
        raise RuntimeError(f"{name}: the two methods loaded different weights ({checksums})")
    ratios = [c / b for c, b in zip(wall[candidate], wall[baseline])]
    cpu_ratios = [c / b for c, b in zip(cpu[candidate], cpu[baseline])]
    cpu_ratio = statistics.median(cpu_ratios)
    return {
        "comparison": name,
        "file_dtype": file_dtype,
        "model_dtype": model_dtype,
        "candidate": candidate,
        "baseline": baseline,
        "candidate_s": round(statistics.median(wall[candidate]), 3),
        "baseline_s": round(statistics.median(wall[baseline]), 3),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "candidate_cpu_s": round(statistics.median(cpu[candidate]), 3),
        "baseline_cpu_s": round(statistics.median(cpu[baseline]), 3),
        "cpu_ratio": round(cpu_ratio, 3),
        "cpu_ratios": [round(r, 3) for r in cpu_ratios],
        "target": TARGET if target else None,
        "meets_target": (cpu_ratio <= TARGET) if target else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink dim and ffn_dim by this factor")
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=7, help="interleaved candidate/baseline pairs per comparison")
    parser.add_argument("--populated", action="store_true", help="also time loads into a model loaded before")
    parser.add_argument("--only", default="", help="run only the comparisons whose name contains this")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, file, dim, ffn, blocks, dtype, populated = args.child
        print(json.dumps(child(method, file, int(dim), int(ffn), int(blocks), dtype, populated == "1")))
        return

    dim, ffn = dims(args.scale)
    workdir = Path(tempfile.mkdtemp(prefix="vace_bench_", dir=args.dir))
    try:
        paths, params = write_files(workdir, dim, ffn, args.blocks)
        comparisons = {name: spec for name, spec in {**COMPARISONS, **(POPULATED if args.populated else {})}.items()
                       if args.only in name}
        results = []
        for name, spec in comparisons.items():
            results.append(compare(name, spec, paths, dim, ffn, args.blocks, args.pairs))
            r = results[-1]
            verdict = "" if r["target"] is None else ("  meets <= 1.1" if r["meets_target"] else "  MISSES <= 1.1")
            print(f"{name:36s} wall {r['candidate_s']:6.3f} s vs {r['baseline_s']:6.3f} s = {r['ratio']:.3f}   "
                  f"cpu {r['candidate_cpu_s']:6.3f} s vs {r['baseline_cpu_s']:6.3f} s = {r['cpu_ratio']:.3f}{verdict}",
                  file=sys.stderr)
    finally:
        for path in workdir.glob("*.safetensors"):
            path.unlink()
        workdir.rmdir()
    report = {
        "dims": {"dim": dim, "ffn_dim": ffn, "vace_blocks": args.blocks, "vace_in_dim": 96},
        "params": params,
        "file_bytes": {"bfloat16": params * 2, "float32": params * 4},
        "pairs": args.pairs,
        "target_ratio": TARGET,
        "all_targets_met": all(r["meets_target"] for r in results if r["target"] is not None),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
