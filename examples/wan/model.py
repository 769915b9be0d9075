"""Shared Wan2.1 helpers: stand-in for each pipeline's ``modules/model.py`` (spec 1.1-1.5).

Everything here is identical across the five pipelines, except the cross-attention
kernel, which each pipeline selects through :func:`make_cross_attention_classes`.
The code keeps upstream's constructs (float64/complex128 RoPE with a Python loop over
``grid_sizes.tolist()``, the ``crossattn_cache`` dict protocol) because they are what
the surgery tool must cope with.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (
    FLASH_ATTN_2_AVAILABLE,
    FLASH_ATTN_3_AVAILABLE,
    SAGEATTN_AVAILABLE,
    attention,
    flash_attention,
    sageattn,
)

__all__ = [
    "CausalHead",
    "FLASH_ATTN_2_AVAILABLE",
    "FLASH_ATTN_3_AVAILABLE",
    "MLPProj",
    "SAGEATTN_AVAILABLE",
    "WAN_CROSSATTENTION_CLASSES",
    "WanI2VCrossAttention",
    "WanLayerNorm",
    "WanRMSNorm",
    "WanSelfAttention",
    "WanT2VCrossAttention",
    "build_freqs",
    "causal_rope_apply",
    "make_cross_attention_classes",
    "rope_apply",
    "rope_params",
    "sinusoidal_embedding_1d",
    "wan_init_weights",
    "wan_unpatchify",
]

CROSS_ATTENTION_KERNELS = ("flash_attention", "attention", "flags")


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of ``position``: [len(position), dim] in float64."""
    assert dim % 2 == 0
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    x = torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)
    return x


def rope_params(max_seq_len: int, dim: int, theta: float = 10000) -> torch.Tensor:
    """Complex128 rotation table [max_seq_len, dim/2]."""
    assert dim % 2 == 0
    freqs = torch.outer(
        torch.arange(max_seq_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim))
    )
    freqs = torch.polar(torch.ones_like(freqs), freqs)
    return freqs


def build_freqs(dim: int, num_heads: int) -> torch.Tensor:
    """The model's ``freqs`` table [1024, d/2] (temporal, height, width parts), spec 1.1."""
    d = dim // num_heads
    return torch.cat(
        [rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)), rope_params(1024, 2 * (d // 6))],
        dim=1,
    )


def rope_apply(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """3-D RoPE from frame 0 on x [B, tokens, n, d]; tokens beyond f*h*w pass through."""
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat(
            [
                freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        x_i = torch.cat([x_i, x[i, seq_len:]])
        output.append(x_i)
    return torch.stack(output).type_as(x)


def causal_rope_apply(
    x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor, start_frame: int = 0
) -> torch.Tensor:
    """3-D RoPE whose temporal positions start at ``start_frame`` (spec 1.1)."""
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat(
            [
                freqs[0][start_frame : start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        x_i = torch.cat([x_i, x[i, seq_len:]])
        output.append(x_i)
    return torch.stack(output).type_as(x)


class WanRMSNorm(nn.Module):
    """RMS norm computed in float32, scaled by ``weight`` (initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm whose output is cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class WanSelfAttention(nn.Module):
    """Bidirectional Wan self-attention; base class of the cross-attention classes."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int] = (-1, -1),
        qk_norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        assert dim % num_heads == 0
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qk_norm = qk_norm
        self.eps = eps

        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, seq_lens: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor
    ) -> torch.Tensor:
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim

        def qkv_fn(x):
            q = self.norm_q(self.q(x)).view(b, s, n, d)
            k = self.norm_k(self.k(x)).view(b, s, n, d)
            v = self.v(x).view(b, s, n, d)
            return q, k, v

        q, k, v = qkv_fn(x)
        x = flash_attention(
            q=rope_apply(q, grid_sizes, freqs),
            k=rope_apply(k, grid_sizes, freqs),
            v=v,
            k_lens=seq_lens,
            window_size=self.window_size,
        )
        x = x.flatten(2)
        x = self.o(x)
        return x


class WanT2VCrossAttention(WanSelfAttention):
    """Text cross-attention with the ``crossattn_cache`` dict protocol (spec 1.4).

    ``attention_kernel`` selects the upstream kernel call: ``"flash_attention"``
    (LongLive, SDv2, MemFlow), ``"attention"`` (RewardForcing) or ``"flags"`` (Krea's
    branching on the module-level availability flags, spec 4.4). Pipelines get a
    subclass with their kernel from :func:`make_cross_attention_classes`.
    """

    attention_kernel: str = "flash_attention"

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_lens: Optional[torch.Tensor],
        crossattn_cache: Optional[dict] = None,
    ) -> torch.Tensor:
        b, n, d = x.size(0), self.num_heads, self.head_dim

        q = self.norm_q(self.q(x)).view(b, -1, n, d)

        if crossattn_cache is not None:
            if not crossattn_cache["is_init"]:
                crossattn_cache["is_init"] = True
                k = self.norm_k(self.k(context)).view(b, -1, n, d)
                v = self.v(context).view(b, -1, n, d)
                crossattn_cache["k"] = k
                crossattn_cache["v"] = v
            else:
                k = crossattn_cache["k"]
                v = crossattn_cache["v"]
        else:
            k = self.norm_k(self.k(context)).view(b, -1, n, d)
            v = self.v(context).view(b, -1, n, d)

        if self.attention_kernel == "flash_attention":
            x = flash_attention(q, k, v, k_lens=context_lens)
        elif self.attention_kernel == "attention":
            x = attention(q, k, v, k_lens=context_lens)
        else:
            # Krea's model.py: the kernel is chosen from the module-level flags.
            if SAGEATTN_AVAILABLE:
                x = sageattn(
                    q.to(torch.bfloat16).transpose(1, 2),
                    k.to(torch.bfloat16).transpose(1, 2),
                    v.to(torch.bfloat16).transpose(1, 2),
                ).transpose(1, 2).to(q.dtype)
            elif FLASH_ATTN_2_AVAILABLE or FLASH_ATTN_3_AVAILABLE:
                x = flash_attention(q, k, v, k_lens=context_lens)
            else:
                # Upstream never casts back, so fp32 models fail in ``self.o`` below.
                x = F.scaled_dot_product_attention(
                    q.to(torch.bfloat16).transpose(1, 2),
                    k.to(torch.bfloat16).transpose(1, 2),
                    v.to(torch.bfloat16).transpose(1, 2),
                ).transpose(1, 2).contiguous()

        x = x.flatten(2)
        x = self.o(x)
        return x


class WanI2VCrossAttention(WanSelfAttention):
    """Image+text cross-attention. It has no ``crossattn_cache`` parameter (spec 1.4)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int] = (-1, -1),
        qk_norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(dim, num_heads, window_size, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_lens: Optional[torch.Tensor]) -> torch.Tensor:
        context_img = context[:, :257]
        context = context[:, 257:]
        b, n, d = x.size(0), self.num_heads, self.head_dim

        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, n, d)
        v_img = self.v_img(context_img).view(b, -1, n, d)
        img_x = flash_attention(q, k_img, v_img, k_lens=None)
        x = flash_attention(q, k, v, k_lens=context_lens)

        x = x.flatten(2)
        img_x = img_x.flatten(2)
        x = x + img_x
        x = self.o(x)
        return x


WAN_CROSSATTENTION_CLASSES = {
    "t2v_cross_attn": WanT2VCrossAttention,
    "i2v_cross_attn": WanI2VCrossAttention,
}


def make_cross_attention_classes(kernel: str) -> dict[str, type]:
    """A ``WAN_CROSSATTENTION_CLASSES`` table whose t2v class calls ``kernel``.

    The subclass keeps the name ``WanT2VCrossAttention`` so leaf-module rules that match
    by class name see the upstream name in every pipeline.
    """
    if kernel not in CROSS_ATTENTION_KERNELS:
        raise ValueError(f"unknown cross-attention kernel {kernel!r}; use one of {CROSS_ATTENTION_KERNELS}")
    if kernel == WanT2VCrossAttention.attention_kernel:
        return dict(WAN_CROSSATTENTION_CLASSES)
    t2v = type("WanT2VCrossAttention", (WanT2VCrossAttention,), {"attention_kernel": kernel, "__module__": __name__})
    return {"t2v_cross_attn": t2v, "i2v_cross_attn": WanI2VCrossAttention}


class MLPProj(nn.Module):
    """CLIP-feature projection (``img_emb`` on i2v models)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds)


class CausalHead(nn.Module):
    """Output head with per-frame modulation; output stays [B, F, fs, prod(patch)*out_dim]."""

    def __init__(self, dim: int, out_dim: int, patch_size: Sequence[int], eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = patch_size
        self.eps = eps

        out_dim = math.prod(patch_size) * out_dim
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        x = self.head(self.norm(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[1]) + e[0])
        return x


def wan_init_weights(model: nn.Module) -> None:
    """Upstream ``CausalWanModel.init_weights`` (spec 1.6); zeros ``head.head.weight``."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    for m in model.text_embedding.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    for m in model.time_embedding.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    nn.init.zeros_(model.head.head.weight)


def wan_unpatchify(model: nn.Module, x: torch.Tensor, grid_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Upstream ``unpatchify``: per sample [F, fs, prod(patch)*c] tokens -> [c, F, H, W]."""
    c = model.out_dim
    out = []
    for u, v in zip(x, grid_sizes.tolist()):
        u = u[: math.prod(v)].view(*v, *model.patch_size, c)
        u = torch.einsum("fhwpqrc->cfphqwr", u)
        u = u.reshape(c, *[i * j for i, j in zip(v, model.patch_size)])
        out.append(u)
    return out


def build_wan_trunk(model: nn.Module, make_block, num_layers: int, cross_attn_type: str) -> None:
    """Register the shared submodules on ``model`` in upstream order (spec 1.6).

    ``model`` must already carry ``patch_size, in_dim, dim, text_dim, freq_dim, out_dim,
    num_heads, eps, model_type``; ``make_block(cross_attn_type)`` builds one block.
    """
    dim = model.dim
    model.patch_embedding = nn.Conv3d(model.in_dim, dim, kernel_size=model.patch_size, stride=model.patch_size)
    model.text_embedding = nn.Sequential(nn.Linear(model.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
    model.time_embedding = nn.Sequential(nn.Linear(model.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    model.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
    model.blocks = nn.ModuleList([make_block(cross_attn_type) for _ in range(num_layers)])
    model.head = CausalHead(dim, model.out_dim, model.patch_size, model.eps)

    assert (dim % model.num_heads) == 0 and (dim // model.num_heads) % 2 == 0
    # A plain attribute, not a buffer: ``.to()`` must not change its complex128 dtype.
    model.freqs = build_freqs(dim, model.num_heads)

    if model.model_type == "i2v":
        model.img_emb = MLPProj(1280, dim)
