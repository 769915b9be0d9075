"""Exact value checks on loaded tensors, cheap enough to run on every chunk of every load."""
from __future__ import annotations

import math

import torch

# Dtypes summed directly, with the accumulator dtype to use: float16 sums in float32 so
# that ordinary weights (a 5120-vector of ones already sums past 65504) do not take the
# slow path below.
_SUM_DTYPE: dict[torch.dtype, torch.dtype | None] = {
    torch.float32: None,
    torch.float64: None,
    torch.bfloat16: None,
    torch.float16: torch.float32,
}


def all_finite(t: torch.Tensor) -> bool:
    """True if no element of the floating-point tensor ``t`` is NaN, +Inf or -Inf. Exact.

    A sum is finite only if every addend is: Inf and NaN survive every IEEE addition
    (``inf + x = inf``, ``inf + -inf = nan``, ``nan + x = nan``), in any order of
    summation. ``sum`` reads the data once without allocating: about 0.11 ms per 4 MiB
    of bfloat16 on this project's CPU, against 0.24 ms for ``aminmax`` and 10 ms for
    ``isfinite(t).all()``. Finite addends can still overflow the sum, so a non-finite sum
    is decided again with ``isfinite`` (slow, but only for a tensor that is then either
    refused or holds values near the dtype's maximum).
    """
    if t.numel() == 0:
        return True
    if t.dtype in _SUM_DTYPE:
        if math.isfinite(float(t.sum(dtype=_SUM_DTYPE[t.dtype]))):
            return True
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.float()).all())  # float8 has no sum kernel


def all_zero(t: torch.Tensor) -> bool:
    """True if every element of ``t`` is zero (``-0.0`` included).

    One ``aminmax`` pass (a NaN makes both ends NaN, so it is never all zero); ``any`` is
    several times slower on reduced-precision floats.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t if t.dtype in _SUM_DTYPE else t.float())
    return float(lo) == 0.0 == float(hi)
