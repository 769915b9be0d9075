"""Every path option checked before any work starts (loading, tracing, validation).

A bad path costs the user nothing but a one-line error (exit 2): a missing or special
``--weights`` file, a ``--save`` or ``--report`` target that exists as something that
must not be replaced (a device node, a FIFO, a directory where a file goes), or a place
that cannot be written. The same checks run again when the files are finally written.
"""
from __future__ import annotations

from pathlib import Path

from surgery.errors import WeightsError
from surgery.reports.files import check_writable, path_kind
from surgery.reports.report import REPORT_JSON, REPORT_MD
from surgery.weights.files import resolve_checkpoint


def check_weights(path: str) -> None:
    """``--weights``: an existing regular file or directory whose safetensors headers are valid.

    Only headers are read (no tensor data); a FIFO, device or socket is refused from
    ``os.stat`` alone, because opening it could block or never end.
    """
    kind = path_kind(path)
    if kind is None:
        raise WeightsError(f"weights file {path} does not exist", "check the path")
    if kind not in ("a regular file", "a directory"):
        raise WeightsError(f"weights path {path} is {kind}, not a safetensors file or a directory",
                           "pass the checkpoint file, its .safetensors.index.json, or the directory holding it")
    resolve_checkpoint(path)


def check_report(directory: str) -> None:
    """``--report DIR``: a directory (existing or creatable) where ``report.json``/``report.md`` can be written."""
    root = Path(directory)
    check_writable([root / REPORT_JSON, root / REPORT_MD], "report directory")


def check_output_file(path: str) -> None:
    """``--save PATH`` or ``diff --update``'s golden: a regular file (or nothing yet) in a writable directory."""
    check_writable([path])


__all__ = ["check_output_file", "check_report", "check_weights"]
