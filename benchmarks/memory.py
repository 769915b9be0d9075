"""Peak memory of a call: the kernel's high-water mark (or sampling) on the host, the allocator's peak on CUDA."""
from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from benchmarks.subject import BenchSubject
from benchmarks.timing import sync
from surgery.errors import InputError

__all__ = ["PeakMemory", "apply_once", "grafted_bytes", "measure_peak", "new_params", "param_bytes", "release_memory"]

def release_memory() -> None:
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
        sync(self.device)
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
        sync(self.device)
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


def param_bytes(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def new_params(model: nn.Module, old_ids: set[int]) -> list[torch.Tensor]:
    return [p for p in model.parameters() if id(p) not in old_ids]


def grafted_bytes(result: Any, dtype: torch.dtype) -> int:
    """Bytes of the parameters ``surgery.apply`` grafted (from their shapes; works on meta)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * size for g in result.grafted for shape in g.shapes.values())


def apply_once(subject: BenchSubject, base: nn.Module, inputs: tuple[tuple, dict], rule: Any = None) -> Any:
    import surgery

    return surgery.apply(base, subject.rule() if rule is None else rule, example_inputs=inputs)


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
    release_memory()
    with PeakMemory(subject.device) as probe:
        if which == "apply":
            result = apply_once(subject, base, inputs, rule)
        else:
            assert subject.build_reference is not None
            result = subject.build_reference(base)
    out = probe.as_dict()
    if which == "apply":
        out["param_bytes"] = grafted_bytes(result, subject.dtype)
    else:
        out["param_bytes"] = param_bytes(new_params(result, old_ids))
    out["extra_bytes"] = out["device_peak_extra_bytes"] if subject.device.type == "cuda" else out["host_peak_extra_bytes"]
    return out
