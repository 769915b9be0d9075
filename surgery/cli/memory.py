"""Out-of-memory during a CLI stage is a problem with the sizes asked for, not a bug in surgery.

torch reports a failed CPU allocation as ``RuntimeError: ... DefaultCPUAllocator: can't
allocate memory: you tried to allocate N bytes`` (and CUDA as ``torch.OutOfMemoryError``,
also a ``RuntimeError``), Python as ``MemoryError``. :func:`memory_guard` turns them into
a one-line :class:`InputError` (exit 2) that names the options deciding the sizes.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from surgery.errors import InputError, SurgeryError

_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory")
_REQUEST = re.compile(r"tried to allocate (\d+) bytes")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation (``MemoryError`` or torch's allocator ``RuntimeError``)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _MARKERS)


def describe(exc: BaseException) -> str:
    """``" (tried to allocate 17.5 TiB)"`` when the allocator said how much, else ``""``."""
    m = _REQUEST.search(str(exc))
    if not m:
        return ""
    size = float(m.group(1))
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    for unit in units:
        if size < 1024 or unit == units[-1]:
            break
        size /= 1024
    return f" (tried to allocate {size:,.1f} {unit})"


@contextmanager
def memory_guard(what: str, fix: str) -> Iterator[None]:
    """Raise :class:`InputError` ``"not enough memory <what> (...)"`` with ``fix`` when the block runs out of memory."""
    try:
        yield
    except SurgeryError:
        raise
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise InputError(f"not enough memory {what}{describe(exc)}", fix) from exc


__all__ = ["describe", "is_out_of_memory", "memory_guard"]
