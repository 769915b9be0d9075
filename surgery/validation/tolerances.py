"""How far the rewritten model may drift from the reference, per device and dtype.

The rewritten model and the reference run the same operations, in the same order, on the
same weights; only Python bookkeeping differs (where a wrapper pads and cuts, which no-op
casts it spells). So the default is exactness, and a tolerance is granted only where the
hardware may legitimately pick different kernels for the two sides:

* **CPU, float32 and float64: 0.0.** The CPU kernels are deterministic for a given shape,
  dtype and memory layout, and both sides feed them identical tensors. Any non-zero
  difference is a bug. (This is the acceptance bar of the project: ``torch.equal``.)
* **CPU, bfloat16 / float16.** The same ops, but oneDNN may choose a different blocking
  (hence a different accumulation order) when one side hands it a non-contiguous view
  that the other side made contiguous: a wrapper that pads to a maximum length and slices
  later produces strided views. One reordering costs up to about one rounding of the
  output; we allow 8 units in the last place at unit scale: bfloat16 ``8 * 2**-7``,
  float16 ``8 * 2**-10``. The models' activations are of order one (normalised blocks,
  flow-prediction outputs), so an absolute bound is meaningful.
* **CUDA.** Besides layout-dependent kernel choice, cuBLAS/cuDNN heuristics may select
  different algorithms for differently strided inputs, and cuDNN convolutions use TF32
  by default (10 mantissa bits) regardless of ``float32``. float32 therefore gets a bound
  of one TF32 unit at unit scale, ``2**-10``; bfloat16 / float16 the same 8 ulps as on
  CPU; float64 ``1e-12`` (far below any real bug, above reduction-order noise).

Devices not listed (``mps``, ``xpu``, ...) use the CUDA row: they share its reasons
(vendor kernels chosen by heuristics). A real bug (a wrong weight, scale, slice or added term)
moves outputs by far more than any of these bounds.
"""
from __future__ import annotations

import torch

#: ``(device type, dtype) -> max abs diff`` allowed between the rewritten model and the reference.
TOLERANCES: dict[tuple[str, torch.dtype], float] = {
    ("cpu", torch.float64): 0.0,
    ("cpu", torch.float32): 0.0,
    ("cpu", torch.bfloat16): 8 * 2.0**-7,
    ("cpu", torch.float16): 8 * 2.0**-10,
    ("cuda", torch.float64): 1e-12,
    ("cuda", torch.float32): 2.0**-10,
    ("cuda", torch.bfloat16): 8 * 2.0**-7,
    ("cuda", torch.float16): 8 * 2.0**-10,
}


def tolerance(dtype: torch.dtype, device: torch.device | str) -> float:
    """The documented tolerance for a model running in ``dtype`` on ``device``.

    Unlisted devices use the ``cuda`` row; unlisted dtypes are exact (0.0).
    """
    kind = torch.device(device).type
    if (kind, dtype) in TOLERANCES:
        return TOLERANCES[(kind, dtype)]
    return TOLERANCES.get(("cuda", dtype), 0.0) if kind != "cpu" else 0.0


def model_tolerance(module: torch.nn.Module) -> tuple[float, torch.dtype, torch.device]:
    """``(tolerance, dtype, device)`` from the module's first floating-point parameter."""
    for param in module.parameters():
        if param.is_floating_point():
            return tolerance(param.dtype, param.device), param.dtype, param.device
    return 0.0, torch.get_default_dtype(), torch.device("cpu")


__all__ = ["TOLERANCES", "model_tolerance", "tolerance"]
