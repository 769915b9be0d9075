"""Stand-in for upstream ``wan2_1/modules/attention.py`` (spec 1.3), plus flex attention.

Upstream imports ``flash_attn_func`` from flash-attn and picks a kernel from module-level
availability flags. Here every kernel is SDPA-based so the stand-ins run on CPU (and on
the ``meta`` device), while the signatures, the flags and the flag-driven branching stay
as upstream, because that branching is one of the tracing hazards (spec 11, row 26).

``flex_attention``, ``create_block_mask`` and ``BlockMask`` are torch's own
(``torch.nn.attention.flex_attention``), as upstream imports them: they refuse ``meta``
tensors and masks are block-sparse, so the stand-ins keep that hazard for the tracer.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = [
    "FLASH_ATTN_2_AVAILABLE",
    "FLASH_ATTN_3_AVAILABLE",
    "SAGEATTN_AVAILABLE",
    "BlockMask",
    "attention",
    "create_block_mask",
    "flash_attention",
    "flash_attn_func",
    "flex_attention",
    "sageattn",
]

# Upstream reports flash-attn 2 on every non-Hopper setup; FA3 and SageAttention are off.
FLASH_ATTN_2_AVAILABLE = True
FLASH_ATTN_3_AVAILABLE = False
SAGEATTN_AVAILABLE = False


def _sdpa_nld(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention with scale 1/sqrt(d) on [B, L, n, d] layouts."""
    # contiguous(): the CPU kernel must not depend on the caller's strides, so that a
    # rewritten graph and a hand-written reference produce bit-identical results.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    )
    return out.transpose(1, 2).contiguous()


class _FlashAttnFunc(torch.autograd.Function):
    """Mirrors flash-attn's ``FlashAttnFunc``: an autograd.Function, not plain torch ops."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return _sdpa_nld(q, k, v)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        # Recompute through SDPA: flash-attn also recomputes instead of storing probabilities.
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = _sdpa_nld(*leaves)
        return torch.autograd.grad(out, leaves, grad_out)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stand-in for ``flash_attn.flash_attn_func``: full attention, returns q's dtype."""
    return _FlashAttnFunc.apply(q, k, v)


def _flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> torch.Tensor:
    """Packed variable-length attention (the FA3 kernel's contract), one sequence at a time."""
    outs = []
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        outs.append(_sdpa_nld(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke])[0])
    return torch.cat(outs)


def sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND") -> torch.Tensor:
    """Stand-in for SageAttention's ``sageattn`` (only reached if ``SAGEATTN_AVAILABLE``)."""
    if tensor_layout == "NHD":
        return _sdpa_nld(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: Optional[torch.Tensor] = None,
    k_lens: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    q_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    version: Optional[int] = None,
) -> torch.Tensor:
    """Upstream ``flash_attention``: q/k/v [B, L, n, d] -> [B, L, n, d] in q's dtype.

    Without FA3 every argument after ``v`` is ignored (upstream behaviour): the result is
    full, unmasked attention with scale 1/sqrt(d).
    """
    if (version is None or version == 3) and FLASH_ATTN_3_AVAILABLE:
        # FA3 varlen path: pack the batch with list comprehensions, as upstream does.
        b, lq, lk = q.size(0), q.size(1), k.size(1)
        if q_lens is None:
            q_lens = torch.tensor([lq] * b, dtype=torch.int32)
        if k_lens is None:
            k_lens = torch.tensor([lk] * b, dtype=torch.int32)
        q_packed = torch.cat([u[:n] for u, n in zip(q, q_lens)])
        k_packed = torch.cat([u[:n] for u, n in zip(k, k_lens)])
        v_packed = torch.cat([u[:n] for u, n in zip(v, k_lens)])
        cu_q = torch.cat([q_lens.new_zeros([1]), q_lens]).cumsum(0, dtype=torch.int32)
        cu_k = torch.cat([k_lens.new_zeros([1]), k_lens]).cumsum(0, dtype=torch.int32)
        x = _flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k).unflatten(0, (b, lq))
        return x.type(q.dtype)
    return flash_attn_func(q, k, v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: Optional[torch.Tensor] = None,
    k_lens: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    q_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    fa_version: Optional[int] = None,
) -> torch.Tensor:
    """Upstream ``attention``: SageAttention, else flash attention, else bf16 SDPA.

    The SDPA fallback casts to bf16 and does not cast back (upstream behaviour).
    """
    if SAGEATTN_AVAILABLE:
        out_dtype = q.dtype
        x = sageattn(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), tensor_layout="NHD")
        return x.to(out_dtype)
    if FLASH_ATTN_2_AVAILABLE or FLASH_ATTN_3_AVAILABLE:
        return flash_attention(
            q, k, v, q_lens=q_lens, k_lens=k_lens, dropout_p=dropout_p, softmax_scale=softmax_scale,
            q_scale=q_scale, causal=causal, window_size=window_size, deterministic=deterministic,
            dtype=dtype, version=fa_version,
        )
    q, k, v = (t.transpose(1, 2).to(torch.bfloat16) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal).transpose(1, 2).contiguous()
