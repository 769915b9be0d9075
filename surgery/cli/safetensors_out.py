"""Safetensors files written tensor by tensor, straight from each tensor's memory.

``safetensors.torch.save`` builds the whole file as one ``bytes`` object (and ``save_file``
turns every tensor into ``bytes`` first), and writing those bytes atomically copied them once
more: saving a grafted branch of 2.9 GB (e.g. the VACE branch of a 1.3B model) held two or
three extra copies of it in memory. Here the header is computed from shapes and dtypes alone, and each tensor's bytes go
to the file from a zero-copy view of its storage (a tensor on another device is copied to
the CPU one at a time). Untouched zero pages of a freshly grafted branch are read as the
kernel's shared zero page, so saving them commits no memory either. The file is staged next
to its target and renamed over it only when complete (:func:`atomic_write_stream`).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import torch

from surgery.errors import InputError
from surgery.reports.files import atomic_write_stream

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_CODES.update({dtype: code for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                                              ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"))
               if isinstance(dtype := getattr(torch, name, None), torch.dtype)})


def _code(name: str, tensor: torch.Tensor) -> str:
    code = _CODES.get(tensor.dtype)
    if code is None:
        raise InputError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store",
                         "convert it to a float or integer dtype before saving")
    return code


def header_bytes(layout: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``layout``'s tensors in its order.

    Only shapes and dtypes are read, so ``layout`` may hold ``meta`` tensors. The JSON is padded
    with spaces to a multiple of 8 bytes, so that the data starts aligned, as safetensors does.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in layout.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _code(name, tensor), "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _raw(name: str, tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` as stored (little-endian), without a copy for a contiguous CPU tensor."""
    tensor = tensor.detach()
    if tensor.device.type == "meta":
        raise InputError(f"cannot save {name!r}: it is on the meta device, which holds no values",
                         "build the model on a real device (cpu or cuda) before saving")
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str | Path, layout: Mapping[str, torch.Tensor], *,
                      values: Callable[[str], torch.Tensor] | None = None,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically, one tensor at a time; return its path.

    ``layout`` names the tensors in file order and gives their shapes and dtypes; their data
    comes from ``values(name)`` when given (called once per tensor, in order, so values can be
    made on the fly), else from ``layout`` itself. A value whose shape or dtype differs from
    its layout entry is an :class:`InputError`, since the header already promised otherwise.
    Raises :class:`~surgery.errors.ReportError` when the file cannot be written (nothing is
    left behind).
    """
    if sys.byteorder != "little":  # safetensors is little-endian and the bytes are written as held
        raise InputError("safetensors files are little-endian and this machine is not",
                         "save the model's state_dict with safetensors.torch.save_file instead")
    get = values or layout.__getitem__

    def write(handle: BinaryIO) -> None:
        handle.write(header_bytes(layout, metadata))
        for name, promised in layout.items():
            tensor = get(name)
            if tensor.shape != promised.shape or tensor.dtype != promised.dtype:
                raise InputError(f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)} but its header entry "
                                 f"says {promised.dtype} {list(promised.shape)}", "give values the layout's shapes and dtypes")
            handle.write(_raw(name, tensor))

    return atomic_write_stream(path, write)


__all__ = ["header_bytes", "write_safetensors"]
