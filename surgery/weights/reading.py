"""Read tensor data from safetensors files into storage of our own (or, opted in, map it).

By default every tensor is *copied* out of the file with ``read`` calls on the descriptor
that was checked to be the regular file whose header was validated. A copy never changes
when the file is rewritten or replaced later, and a file truncated while it is being read
gives a short read (a :class:`WeightsError`), never a ``SIGBUS``.

The copy is made in chunks of :data:`CHUNK_BYTES`; :meth:`TensorFile.fill` yields each
chunk right after it has been read (and converted), while it is still in the CPU cache,
so value checks on it cost almost nothing extra.

``mmap=True`` (opt-in) maps the file instead (copy-on-write, from the same descriptor): no
copy, but the tensors are the file's pages, so rewriting the file in place changes them
and truncating it makes the next access to them crash the process with ``SIGBUS``.
"""
from __future__ import annotations

import ctypes
import io
import math
import mmap as mmap_module
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from surgery.errors import WeightsError
from surgery.weights.header import TensorEntry, invalid_file
from surgery.weights.paths import FileStamp, open_regular

CHUNK_BYTES = 4 << 20
# Tensors at least this large get an anonymous mapping committed in one MAP_POPULATE call,
# about twice as fast as faulting its pages in one by one while copying into them.
_POPULATE_MIN_BYTES = 1 << 20
_CHANGED_FIX = "do not modify weights files while they are being loaded; load again"


def fresh_cpu(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised contiguous CPU storage of its own, committed up front (every byte gets written)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    populate = getattr(mmap_module, "MAP_POPULATE", 0)
    if nbytes < _POPULATE_MIN_BYTES or not populate:
        return torch.empty(tuple(shape), dtype=dtype)
    flags = mmap_module.MAP_PRIVATE | mmap_module.MAP_ANONYMOUS | populate
    buffer = mmap_module.mmap(-1, nbytes, flags=flags)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(tuple(shape))


def _writable_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable buffer (the caller keeps ``t`` alive)."""
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


class TensorFile:
    """One weights file, opened once; every read comes from the descriptor that was checked."""

    def __init__(self, path: Path, *, mmap: bool = False) -> None:
        self.path = path
        fd, st = open_regular(path, "weights file")
        self.stamp = FileStamp.of(st)
        self._raw = io.FileIO(fd, "rb", closefd=True)
        self._scratch: tuple[torch.Tensor, memoryview] | None = None
        self._mapped = self._map() if mmap else None

    def _map(self) -> mmap_module.mmap:
        """The whole file, copy-on-write, from this descriptor (the path is never opened again)."""
        try:
            return mmap_module.mmap(self._raw.fileno(), 0, access=mmap_module.ACCESS_COPY)
        except (OSError, ValueError) as exc:  # ValueError: the file became empty
            self.close()
            raise invalid_file(self.path, f"cannot be mapped: {exc}") from exc

    @property
    def mmap(self) -> bool:
        return self._mapped is not None

    def close(self) -> None:
        self._raw.close()

    def require_same_version(self) -> None:
        """Refuse if the open file was modified (size or mtime) since it was opened."""
        if FileStamp.of(os.fstat(self._raw.fileno())) != self.stamp:
            raise WeightsError(f"{self.path} changed while it was being read", _CHANGED_FIX)

    def _require_header_version(self, entry: TensorEntry) -> None:
        if entry.stamp != self.stamp and entry.stamp is not None:
            raise WeightsError(f"{self.path} changed after its header was read", _CHANGED_FIX)

    def mapped(self, entry: TensorEntry) -> torch.Tensor:
        """The stored tensor as a view of the file's pages (``mmap=True`` only)."""
        self._require_header_version(entry)
        dtype = entry.torch_dtype
        if not entry.nbytes or entry.offset % dtype.itemsize:
            # Nothing to map, or data not aligned to its element size (safetensors writers
            # align, but the format does not promise it): a copy is always safe.
            return self.copy(entry)
        count = entry.nbytes // dtype.itemsize
        return torch.frombuffer(self._mapped, dtype=dtype, count=count, offset=entry.offset).view(entry.shape)

    def copy(self, entry: TensorEntry) -> torch.Tensor:
        """The stored tensor, read into fresh storage of its own."""
        out = fresh_cpu(entry.shape, entry.torch_dtype)
        for _ in self.fill(entry, out):
            pass
        return out

    def fill(self, entry: TensorEntry, out: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Read ``entry`` into ``out`` (contiguous, CPU, same shape), converting to ``out.dtype``.

        Yields ``(converted, stored)`` per chunk, flat views of ``out`` and of the stored
        values, as soon as the chunk is in ``out``; ``stored`` is only valid until the next
        chunk is read.
        """
        self._require_header_version(entry)
        stored = entry.torch_dtype
        flat = out.view(-1)
        numel, item = flat.numel(), stored.itemsize
        step = CHUNK_BYTES // item
        direct = out.dtype == stored
        target = _writable_bytes(flat) if direct and numel else None
        for start in range(0, numel, step):
            stop = min(numel, start + step)
            if target is not None:
                self._read(entry, target[start * item:stop * item], start * item)
                chunk = flat[start:stop]
                yield chunk, chunk
            else:
                scratch, scratch_bytes = self._scratch_buffer()
                n = (stop - start) * item
                self._read(entry, scratch_bytes[:n], start * item)
                source = scratch[:n].view(stored)
                chunk = flat[start:stop]
                chunk.copy_(source)
                yield chunk, source

    def _scratch_buffer(self) -> tuple[torch.Tensor, memoryview]:
        """One reused chunk of raw bytes for tensors that are converted on the way in."""
        if self._scratch is None:
            scratch = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
            self._scratch = (scratch, _writable_bytes(scratch))
        return self._scratch

    def _read(self, entry: TensorEntry, view: memoryview, skip: int) -> None:
        self._raw.seek(entry.offset + skip)
        done = 0
        while done < len(view):
            got = self._raw.readinto(view[done:])
            if not got:
                raise invalid_file(
                    entry.file, f"truncated while being read: {entry.name!r} stops after {skip + done} of its "
                    f"{entry.nbytes} bytes",
                )
            done += got


@contextmanager
def open_tensors(files: Iterable[Path], *, mmap: bool = False) -> Iterator[Mapping[Path, TensorFile]]:
    """Open each file once for the duration of the block (``mmap=True`` also maps it).

    On a normal exit every file is checked to be the version that was opened (same size
    and modification time), so a file rewritten during the load is an error, not a mix.
    """
    with ExitStack() as stack:
        handles: dict[Path, TensorFile] = {}
        for file in sorted(set(files)):
            handles[file] = TensorFile(file, mmap=mmap)
            stack.callback(handles[file].close)
        yield handles
        for handle in handles.values():
            handle.require_same_version()


def read_tensor(handles: Mapping[Path, TensorFile], entry: TensorEntry) -> torch.Tensor:
    """One stored tensor: a private copy, or a view of the file's pages if it was opened with ``mmap``."""
    file = handles[entry.file]
    return file.mapped(entry) if file.mmap else file.copy(entry)
