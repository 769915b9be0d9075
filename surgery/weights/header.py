"""Validate a safetensors header without reading tensor data.

The file is checked byte by byte (8-byte header length, JSON header, dtype/shape/offset
consistency, file length) so that truncated or corrupted files fail with a clear
:class:`WeightsError` instead of a Rust panic or a silently short tensor. Only regular
files are opened (see :mod:`surgery.weights.paths`).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from surgery.errors import WeightsError
from surgery.weights.paths import FileStamp, open_regular

# safetensors dtype codes -> torch dtype attribute names; resolved lazily with getattr
# so that a torch build without float8 types still imports this module.
_DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
_TORCH_DTYPES: dict[str, torch.dtype | None] = {code: getattr(torch, name, None) for code, name in _DTYPE_NAMES.items()}
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
# The safetensors reference implementation refuses headers above 100 MB; a larger value
# here can only come from garbage bytes (e.g. a pickle renamed to .safetensors).
_MAX_HEADER_BYTES = 100_000_000


class TensorEntry(NamedTuple):
    """One tensor as described by a safetensors header (no data read).

    ``offset`` is the absolute byte offset of the tensor's data in ``file``; ``stamp``
    identifies the version of the file the header was read from. (A named tuple: a
    checkpoint has hundreds of entries and this is read on every load.)
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int
    offset: int = 0
    stamp: FileStamp | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype, self.file)

    @property
    def dtype_name(self) -> str:
        """``'int64'``, ``'bfloat16'``, ... (the torch name of the stored dtype)."""
        return _DTYPE_NAMES.get(self.dtype, self.dtype)


def torch_dtype(code: str, file: Path | str = "?") -> torch.dtype:
    """Map a safetensors dtype code (``"BF16"``) to a torch dtype."""
    dtype = _TORCH_DTYPES.get(code)
    if dtype is None:
        raise WeightsError(
            f"{file}: tensor dtype {code!r} is not supported by this torch build",
            "convert the checkpoint to float16, bfloat16 or float32",
        )
    return dtype


def invalid_file(path: Path, why: str) -> WeightsError:
    """The error for a file that is not (or no longer) a valid safetensors file."""
    return WeightsError(
        f"{path} is not a valid safetensors file ({why})",
        "re-download or re-export the file; truncated downloads are the usual cause",
    )


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Validate a safetensors file's header and return its tensors by stored name.

    Checks everything that can be checked without reading tensor data: that the path is
    a regular file, header length, JSON syntax, dtype codes, shape/offset agreement and
    that every tensor lies inside the file (which catches truncation).
    """
    fd, st = open_regular(path, "weights file")
    size = st.st_size
    try:
        with os.fdopen(fd, "rb", buffering=0) as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise invalid_file(path, f"only {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
                guess = ""
                if head[:2] == b"PK" or head[:1] == b"\x80":
                    guess = "; it looks like a torch.save pickle/zip renamed to .safetensors"
                raise invalid_file(path, f"header length {header_len} does not fit a {size}-byte file{guess}")
            raw = fh.read(header_len)
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}", "check the path and permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid_file(path, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise invalid_file(path, "header is not a JSON object")

    data_start = 8 + header_len
    data_size = size - data_start
    stamp = FileStamp.of(st)
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(map(int, info["shape"]))
            begin, end = map(int, info["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise invalid_file(path, f"malformed header entry for {name!r}") from exc
        if dtype not in _ITEMSIZE:
            raise invalid_file(path, f"unknown dtype {dtype!r} for {name!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if not 0 <= begin <= end or end - begin != nbytes or any(d < 0 for d in shape):
            raise invalid_file(path, f"offsets of {name!r} do not match its shape {list(shape)} and dtype {dtype}")
        if end > data_size:
            raise invalid_file(path, f"truncated: {name!r} ends at data byte {end} but the file holds {data_size}")
        entries[name] = TensorEntry(name, dtype, shape, path, nbytes, data_start + begin, stamp)
    return entries
