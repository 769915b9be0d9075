"""Benchmark: ``load_vace_weights`` versus plain ``safetensors.torch.load_file``.

Writes a VACE-module-sized bf16 file (Wan 1.3B dims: dim 1536, ffn 8960, 15 VACE blocks,
about 735 M parameters, 1.47 GB; ``--scale`` shrinks dim and ffn), then measures each
method in fresh subprocesses (``--repeat``, median reported): wall time, peak extra RSS over the process with the model
already built, and the RSS left afterwards (anonymous vs file-backed pages). Prints JSON.

    PYTHONPATH=. python benchmarks/weights_load.py            # full size (~6 GB RAM peak)
    PYTHONPATH=. python benchmarks/weights_load.py --scale 0.1

Methods (each in its own process, page cache warmed first so disk speed does not count):
* ``load_file``: ``safetensors.torch.load_file`` and read every byte of every tensor.
  (``load_file`` memory-maps too, so its tensors are file-backed pages, not copies.)
* ``load_file + load_state_dict``: the usual path, copying into the existing parameters.
* ``load_vace_weights``: this project's loader (validates keys, shapes, NaN/Inf; assigns).
* ``load_vace_weights mmap=False``: same, one private copy per tensor.
* ``load_vace_weights (meta module)``: the model built on ``meta``, so no old weights exist.
Each runs for a bf16 model (file dtype, no conversion) and a float32 model (conversion).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    "load_file",
    "load_file + load_state_dict",
    "load_vace_weights",
    "load_vace_weights mmap=False",
    "load_vace_weights (meta module)",
)


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


def build(dim: int, ffn: int, blocks: int, dtype: torch.dtype, meta: bool) -> nn.Module:
    """Build on meta (fast, no memory); materialise and fill unless ``meta`` is kept."""
    with torch.device("meta"):
        model = VaceBranch(dim, ffn, blocks).to(dtype)
    if not meta:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.01)  # touch every page, as a real initialised model would
    return model


def write_file(path: Path, dim: int, ffn: int, blocks: int) -> int:
    from safetensors.torch import save_file

    model = build(dim, ffn, blocks, torch.bfloat16, meta=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        for k, v in model.state_dict().items()
    }
    save_file(tensors, str(path))
    return sum(t.numel() for t in tensors.values())


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class PeakRss:
    """Peak RSS during a block: kernel high-water mark reset via clear_refs, plus sampling."""

    def __enter__(self) -> "PeakRss":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.sampled, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status()["VmRSS"])
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.sampled, _status()["VmHWM"] if self.hwm_reset else 0)


def child(method: str, file: str, dim: int, ffn: int, blocks: int, dtype_name: str) -> dict:
    from safetensors.torch import load_file

    from surgery.weights import load_vace_weights

    dtype = getattr(torch, dtype_name)
    model = build(dim, ffn, blocks, dtype, meta=method.endswith("(meta module)"))
    before = _status()
    start = time.perf_counter()
    with PeakRss() as peak:
        if method == "load_file":
            sd = load_file(file)
            for t in sd.values():
                t.view(-1).view(torch.uint8).max()  # read every byte
        elif method == "load_file + load_state_dict":
            sd = load_file(file)
            model.load_state_dict(sd, strict=True)
            del sd
        else:
            report = load_vace_weights(model, file, mmap=not method.endswith("mmap=False"))
    seconds = time.perf_counter() - start
    after = _status()
    mib = 2**20
    result = {
        "method": method,
        "model_dtype": dtype_name,
        "seconds": round(seconds, 3),
        "peak_extra_rss_mib": round((peak.peak - before["VmRSS"]) / mib, 1),
        "final_extra_rss_mib": round((after["VmRSS"] - before["VmRSS"]) / mib, 1),
        "final_extra_anon_mib": round((after["RssAnon"] - before["RssAnon"]) / mib, 1),
        "final_extra_file_mib": round((after["RssFile"] - before["RssFile"]) / mib, 1),
        "model_rss_before_mib": round(before["VmRSS"] / mib, 1),
    }
    if method.startswith("load_vace_weights"):
        result.update(shared=report.shared, converted=report.converted, copied=report.copied)
    if method != "load_file":
        w = model.vace_blocks[blocks - 1].ffn[0].weight
        result["checksum"] = float(w.float().sum())  # same value for every method that loads
    return result


def _summarise(runs: list[dict]) -> dict:
    """Median seconds (and the spread) over repeated runs; memory figures from the median run."""
    if "error" in runs[0]:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r["seconds"])
    result = dict(ordered[len(ordered) // 2])
    result["seconds_all"] = [r["seconds"] for r in runs]
    result["peak_extra_rss_mib_max"] = max(r["peak_extra_rss_mib"] for r in runs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink dim and ffn_dim by this factor")
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="model dtypes to measure")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per method (median reported)")
    parser.add_argument("--child", nargs=6, metavar=("METHOD", "FILE", "DIM", "FFN", "BLOCKS", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, file, dim, ffn, blocks, dtype = args.child
        print(json.dumps(child(method, file, int(dim), int(ffn), int(blocks), dtype)))
        return

    dim, ffn = dims(args.scale)
    workdir = Path(tempfile.mkdtemp(prefix="vace_bench_", dir=args.dir))
    path = workdir / "vace_module_bf16.safetensors"
    t0 = time.perf_counter()
    params = write_file(path, dim, ffn, args.blocks)
    write_s = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results = []
    try:
        for dtype in args.dtypes.split(","):
            for method in METHODS:
                runs = []
                for _ in range(args.repeat):
                    with path.open("rb") as fh:  # warm the page cache so every method reads from memory
                        while fh.read(1 << 24):
                            pass
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", method, str(path), str(dim), str(ffn),
                         str(args.blocks), dtype],
                        env=env, capture_output=True, text=True, check=False,
                    )
                    if out.returncode != 0:
                        runs = [{"method": method, "model_dtype": dtype, "error": out.stderr.strip()[-2000:]}]
                        break
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                results.append(_summarise(runs))
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            workdir.rmdir()
    print(json.dumps({
        "file": str(path) if args.keep else None,
        "dims": {"dim": dim, "ffn_dim": ffn, "vace_blocks": args.blocks, "vace_in_dim": 96},
        "params": params,
        "file_bytes": params * 2,
        "write_seconds": round(write_s, 1),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
