"""Every path and device option checked before any work starts (loading, tracing, validation).

A bad path costs the user nothing but a one-line error (exit 2): a missing or special
``--weights``/``--lora`` file, a ``--save`` or ``--report`` target that exists as something
that must not be replaced (a device node, a FIFO, a directory where a file goes), or a place
that cannot be written. The same checks run again when the files are finally written. A
``--device`` must name a device torch knows and this machine has.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgery.errors import InputError, WeightsError
from surgery.reports.files import check_writable, path_kind
from surgery.reports.report import REPORT_JSON, REPORT_MD
from surgery.weights.files import resolve_checkpoint


def check_weights(path: str, what: str = "weights") -> None:
    """``--weights`` (or ``--lora``, ``what="LoRA"``): an existing regular file or directory whose
    safetensors headers are valid.

    Only headers are read (no tensor data); a FIFO, device or socket is refused from
    ``os.stat`` alone, because opening it could block or never end.
    """
    kind = path_kind(path)
    if kind is None:
        raise WeightsError(f"{what} file {path} does not exist", "check the path")
    if kind not in ("a regular file", "a directory"):
        raise WeightsError(f"{what} path {path} is {kind}, not a safetensors file or a directory",
                           "pass the checkpoint file, its .safetensors.index.json, or the directory holding it")
    resolve_checkpoint(path)


def torch_dtype(name: str) -> torch.dtype:
    """``--dtype NAME`` as a torch dtype (``float32``, ``bfloat16``, ``float16``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"unknown dtype {name!r}", "use float32, bfloat16 or float16")
    return dtype


def _backend(kind: str) -> Any:
    """The torch module of an accelerator type (``torch.cuda``, ``torch.xpu``, ...), or ``None``."""
    if kind == "mps":
        return getattr(torch.backends, "mps", None)
    return getattr(torch, kind, None)


def check_device(text: str, *, allow_meta: bool = False) -> torch.device:
    """``--device``: a device torch can parse and this machine has (``meta`` only if ``allow_meta``).

    ``cuda`` without an index means the current CUDA device; ``cuda:N`` needs ``N`` below
    the device count.
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"unknown device {text!r}", "use cpu, cuda, cuda:N, mps or another device type torch knows") from exc
    if device.type == "meta" and not allow_meta:
        raise InputError("--device meta holds no values, and the command line runs the model (example inputs, "
                         "validation, weights)", "use cpu or cuda; --size 1.3B/14B are traced on meta already when "
                         "no values are needed")
    if device.type in ("cpu", "meta"):
        return device
    backend = _backend(device.type)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise InputError(f"--device {text}: torch {torch.__version__} sees no {device.type} device on this machine",
                         "use --device cpu, or run where torch sees that device")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise InputError(f"--device {text}: this machine has {count()} {device.type} device(s)",
                         f"use an index from 0 to {count() - 1}")
    return device


def check_report(directory: str) -> None:
    """``--report DIR``: a directory (existing or creatable) where ``report.json``/``report.md`` can be written."""
    root = Path(directory)
    check_writable([root / REPORT_JSON, root / REPORT_MD], "report directory")


def check_output_file(path: str) -> None:
    """``--save PATH`` or ``diff --update``'s golden: a regular file (or nothing yet) in a writable directory."""
    check_writable([path])


__all__ = ["check_device", "check_output_file", "check_report", "check_weights", "torch_dtype"]
