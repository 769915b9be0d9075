"""Clocks of the benchmark: wall and process CPU time around a call, synchronised on CUDA, and summaries."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

__all__ = ["log", "summarise", "sync", "timed", "timed_cpu"]

_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr (a 1.3B run takes minutes); stdout keeps the table."""
    print(f"[bench {time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "values"}`` of a list of measurements."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall and process CPU time (all threads) of one call."""
    sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, value
