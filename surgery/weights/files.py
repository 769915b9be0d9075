"""Locate checkpoint files and validate safetensors headers without reading tensor data.

Nothing here ever unpickles: pickle-based formats are refused by their suffix before
the file is opened, and a ``.safetensors`` file is checked byte by byte (8-byte header
length, JSON header, dtype/shape/offset consistency, file length) so that truncated or
corrupted files fail with a clear :class:`WeightsError` instead of a Rust panic or a
silently short tensor.
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from surgery.errors import WeightsError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")

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
# The safetensors reference implementation refuses headers above 100 MB; a larger value
# here can only come from garbage bytes (e.g. a pickle renamed to .safetensors).
_MAX_HEADER_BYTES = 100_000_000
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d+)-of-(?P<total>\d+)\.safetensors$")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as described by a safetensors header (no data read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype, self.file)


def torch_dtype(code: str, file: Path | str = "?") -> torch.dtype:
    """Map a safetensors dtype code (``"BF16"``) to a torch dtype."""
    name = _DTYPE_NAMES.get(code)
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise WeightsError(
            f"{file}: tensor dtype {code!r} is not supported by this torch build",
            "convert the checkpoint to float16, bfloat16 or float32",
        )
    return dtype


def pickle_refusal(path: Path) -> WeightsError:
    """The error for a pickle-based checkpoint; the file is never opened."""
    safe = path.with_suffix(".safetensors").name
    return WeightsError(
        f"{path} is a pickle-based checkpoint ({path.suffix}); pickles can run arbitrary code and are never loaded",
        "convert it once in a trusted environment: python -c \"import torch, safetensors.torch as s; "
        f"s.save_file(torch.load('{path.name}', weights_only=True), '{safe}')\"",
    )


def _invalid(path: Path, why: str) -> WeightsError:
    return WeightsError(
        f"{path} is not a valid safetensors file ({why})",
        "re-download or re-export the file; truncated downloads are the usual cause",
    )


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Validate a safetensors file's header and return its tensors by stored name.

    Checks everything that can be checked without reading tensor data: header length,
    JSON syntax, dtype codes, shape/offset agreement and that every tensor lies inside
    the file (which catches truncation).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _invalid(path, f"only {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
                hint = ""
                if head[:2] == b"PK" or head[:1] == b"\x80":
                    hint = "; it looks like a torch.save pickle/zip renamed to .safetensors"
                raise _invalid(path, f"header length {header_len} does not fit a {size}-byte file{hint}")
            raw = fh.read(header_len)
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}", "check the path and permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(path, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _invalid(path, "header is not a JSON object")

    data_size = size - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise _invalid(path, f"malformed header entry for {name!r}") from exc
        if dtype not in _ITEMSIZE:
            raise _invalid(path, f"unknown dtype {dtype!r} for {name!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if not 0 <= begin <= end or end - begin != nbytes or any(d < 0 for d in shape):
            raise _invalid(path, f"offsets of {name!r} do not match its shape {list(shape)} and dtype {dtype}")
        if end > data_size:
            raise _invalid(path, f"truncated: {name!r} ends at data byte {end} but the file holds {data_size}")
        entries[name] = TensorEntry(name, dtype, shape, path, nbytes)
    return entries


def _index_files(index: Path) -> dict[str, Path]:
    """Parse a ``*.safetensors.index.json``: stored tensor name -> shard path."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"{index} is not a valid safetensors index ({exc})",
            "the index must be JSON with a 'weight_map' object {tensor name: shard file}",
        ) from exc
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        shard = (index.parent / str(file)).resolve()
        if shard.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(shard)
        shards[name] = shard
    missing = sorted({str(p) for p in shards.values() if not p.is_file()})
    if missing:
        raise WeightsError(
            f"{index} names shard files that do not exist: {', '.join(missing)}",
            "download every shard listed in the index next to it",
        )
    return shards


def _directory_checkpoint(directory: Path) -> Path | list[Path]:
    """Pick the checkpoint inside a directory: an index, one file, or a complete shard set."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise WeightsError(
            f"{directory} holds several safetensors indexes: {', '.join(p.name for p in indexes)}",
            "pass the index file you mean instead of the directory",
        )
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_refusal(pickles[0])
        raise WeightsError(f"{directory} contains no .safetensors file", "pass the checkpoint file itself")
    shard = [_SHARD_RE.match(p.name) for p in files]
    if all(shard):
        groups = {(m["stem"], m["total"]) for m in shard if m}
        if len(groups) == 1:
            stem, total = groups.pop()
            want = {f"{stem}-{i:0{len(total)}d}-of-{total}.safetensors" for i in range(1, int(total) + 1)}
            have = {p.name for p in files}
            if want == have:
                return files
            raise WeightsError(
                f"{directory} has an incomplete shard set: missing {', '.join(sorted(want - have))}",
                "download the missing shards",
            )
    raise WeightsError(
        f"{directory} holds several unrelated .safetensors files: {', '.join(p.name for p in files)}",
        "pass the checkpoint file (or its .safetensors.index.json) instead of the directory",
    )


def resolve_checkpoint(path: str | Path) -> dict[str, TensorEntry]:
    """Turn a checkpoint path into validated header entries keyed by stored tensor name.

    ``path`` may be a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory
    holding one index, one file, or one complete ``-0000i-of-0000n`` shard set. Pickle
    formats are refused by suffix before anything is opened.
    """
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist", "check the path")
    target: Path | list[Path] = _directory_checkpoint(path) if path.is_dir() else path
    if isinstance(target, list):
        return _merge({p: read_header(p) for p in target})
    if target.name.endswith(".index.json"):
        shards = _index_files(target)
        headers = {p: read_header(p) for p in sorted(set(shards.values()))}
        entries = _merge(headers)
        wrong = sorted(n for n, p in shards.items() if n not in entries or entries[n].file != p)
        if wrong:
            raise WeightsError(
                f"{target} maps {len(wrong)} tensors to shards that do not hold them (e.g. {wrong[0]!r})",
                "the index does not belong to these shards; re-download the index",
            )
        return entries
    if target.suffix != ".safetensors":
        raise WeightsError(
            f"{target} has an unknown weights format ({target.suffix or 'no suffix'})",
            "only .safetensors files, *.safetensors.index.json indexes or directories of them are accepted",
        )
    return read_header(target)


def _merge(headers: Mapping[Path, dict[str, TensorEntry]]) -> dict[str, TensorEntry]:
    merged: dict[str, TensorEntry] = {}
    for entries in headers.values():
        for name, entry in entries.items():
            if name in merged:
                raise WeightsError(
                    f"tensor {name!r} appears in both {merged[name].file} and {entry.file}",
                    "the shards overlap; pass a single consistent checkpoint",
                )
            merged[name] = entry
    return merged


@contextmanager
def open_tensors(files: set[Path]) -> Iterator[Mapping[Path, object]]:
    """Open each file with ``safe_open`` (memory-mapped, CPU) for the duration of the block."""
    with ExitStack() as stack:
        handles = {}
        for file in sorted(files):
            try:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as exc:  # the Rust binding raises its own error types
                raise _invalid(file, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        yield handles


def read_tensor(handles: Mapping[Path, object], entry: TensorEntry) -> torch.Tensor:
    """Read one tensor (a view of the memory map; no copy on CPU)."""
    try:
        return handles[entry.file].get_tensor(entry.name)  # type: ignore[attr-defined]
    except Exception as exc:
        raise _invalid(entry.file, f"cannot read {entry.name!r}: {exc}") from exc
