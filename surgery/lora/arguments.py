"""Checks of :func:`surgery.lora.load_lora_file`'s arguments, made before the file is read.

Each check returns the normalised value or raises a one-line :class:`WeightsError`, so a
wrong argument never surfaces as a ``TypeError`` from PEFT half-way through an injection.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.errors import WeightsError


def check_path(path: Any) -> Path:
    """``path`` as a :class:`Path`; it must be a ``str`` or ``os.PathLike``."""
    if not isinstance(path, (str, os.PathLike)):
        raise WeightsError(f"the LoRA path must be a str or os.PathLike, got {type(path).__name__}",
                           "pass the path of a LoRA .safetensors file")
    return Path(path)


def check_adapter_name(name: Any) -> str:
    """A PEFT adapter name: a non-empty string without dots (it becomes a ModuleDict key)."""
    if not isinstance(name, str) or not name or "." in name or name != name.strip():
        raise WeightsError(f"adapter_name {name!r} is not a usable adapter name",
                           "pass a non-empty string without dots or surrounding spaces, e.g. 'style'")
    return name


def check_scale(scale: Any) -> float:
    """``scale`` as a finite float; strings, booleans, NaN, infinities and out-of-range numbers are refused."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise WeightsError(f"scale must be a real number, got {type(scale).__name__} {scale!r}",
                           "pass a finite float, e.g. scale=1.0")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise WeightsError(f"scale {scale!r} is not a finite number", "pass a finite float, e.g. scale=1.0")
    return value


def check_strip_prefixes(prefixes: Any) -> tuple[str, ...]:
    """``strip_prefixes`` as a tuple of strings (a bare string would be read character by character)."""
    if isinstance(prefixes, str) or not isinstance(prefixes, Sequence) or not all(isinstance(p, str) for p in prefixes):
        raise WeightsError(f"strip_prefixes must be a sequence of strings, got {prefixes!r}",
                           "pass e.g. strip_prefixes=('diffusion_model.',)")
    return tuple(prefixes)


__all__ = ["check_adapter_name", "check_path", "check_scale", "check_strip_prefixes"]
