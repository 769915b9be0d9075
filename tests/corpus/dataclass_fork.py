"""A research fork that keeps its streaming state in dataclasses.

Habits on show: caches are ``@dataclass`` objects (``LayerCache`` per block with a plain
``int`` write position, which the model's own code branches on; ``TextCache`` for
cross-attention); ``forward`` is the whole model,
not a dispatcher, and takes its latent keyword-only; cache positions are committed by a
helper method after the blocks; the block's modulation parameter is called ``mod`` (as in
many DiT forks); RoPE is applied in place in the block's own code; residual adds run in
float32 with ``.float()`` / ``.type_as``; the FFN has a ``Dropout`` after its activation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from corpus import Family

DIM, HEADS, FFN, LAYERS, TEXT_DIM, FREQ_DIM, IN_CH, CAPACITY = 16, 2, 32, 4, 12, 16, 4, 24


@dataclass
class LayerCache:
    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


@dataclass
class TextCache:
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None


@dataclass
class StreamState:
    layers: list = field(default_factory=list)
    text: list = field(default_factory=list)


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In-place rotary embedding on [B, L, H, D] (pairs are the two halves of D)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half].clone(), x[..., half:].clone()
    x[..., :half].mul_(cos[None, :, None, :]).sub_(b * sin[None, :, None, :])
    x[..., half:].mul_(cos[None, :, None, :]).add_(a * sin[None, :, None, :])
    return x


class CachedSelfAttention(nn.Module):
    """Attention over the cache; writes the chunk's keys at ``cache.length`` (committed later)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        if cache is not None:
            end = cache.length + k.shape[1]
            cache.k[:, cache.length:end] = k
            cache.v[:, cache.length:end] = v
            k, v = cache.k[:, :end], cache.v[:, :end]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)


class TextAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, memo: Optional[TextCache] = None) -> torch.Tensor:
        if memo is not None and memo.k is not None:
            k, v = memo.k, memo.v
        else:
            k, v = self.kv(text).unflatten(2, (self.heads, -1)).transpose(1, 2).chunk(2, dim=-1)
            if memo is not None:
                memo.k, memo.v = k, v
        q = self.q(x).unflatten(2, (self.heads, -1)).transpose(1, 2)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim, self.heads, self.ffn_dim, self.dropout = dim, heads, ffn_dim, dropout
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = CachedSelfAttention()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = TextAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.mod = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, rope: tuple, text: torch.Tensor,
                cache: Optional[LayerCache] = None, memo: Optional[TextCache] = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.mod + mod).unbind(1)
        h = self.norm1(x.float()) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = (t.contiguous() for t in self.qkv(h.type_as(x)).unflatten(2, (3 * self.heads, -1)).chunk(3, dim=2))
        cos, sin = rope
        rotate_(q, cos, sin)
        rotate_(k, cos, sin)
        x = (x.float() + self.proj(self.attn(q, k, v, cache)).float() * gate1[:, None]).type_as(x)
        x = x + self.cross(self.norm2(x), text, memo)
        h = self.norm3(x.float()) * (1 + scale2[:, None]) + shift2[:, None]
        x = (x.float() + self.mlp(h.type_as(x)).float() * gate2[:, None]).type_as(x)
        return x


class StreamDiT(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS, ffn_dim: int = FFN, depth: int = LAYERS) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.x_embed = nn.Conv3d(IN_CH, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embed = nn.Linear(TEXT_DIM, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, ffn_dim) for _ in range(depth))
        self.final = nn.Linear(dim, IN_CH * 4)
        self.bos = nn.Parameter(torch.randn(dim) * 0.02)  # marks the first chunk of a stream

    def forward(self, *, latent: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                state: Optional[StreamState] = None) -> torch.Tensor:
        b, _, f, h, w = latent.shape
        x = self.x_embed(latent).flatten(2).transpose(1, 2)
        freqs = torch.exp(-math.log(10000) * torch.arange(FREQ_DIM // 2, dtype=torch.float32) / (FREQ_DIM // 2))
        t_freq = t.to(x.dtype)[..., None] * freqs
        mod = self.t_embed(torch.cat([t_freq.cos(), t_freq.sin()], dim=-1)).unflatten(1, (6, self.dim))
        start = state.layers[0].length if state is not None else 0
        if start == 0:
            x = x + self.bos
        positions = torch.arange(start, start + x.shape[1])
        rope = rope_tables(positions, self.dim // self.heads)
        y = self.y_embed(text)
        for i, block in enumerate(self.blocks):
            x = block(x, mod, rope, y, state.layers[i] if state is not None else None,
                      state.text[i] if state is not None else None)
        if state is not None:
            self._commit(state, x.shape[1])
        out = self.final(x)
        return out.unflatten(1, (f, h // 2, w // 2))

    def _commit(self, streams: StreamState, written: int) -> None:
        for cache in streams.layers:
            cache.length += written


# ----- what the corpus test needs ----------------------------------------------------------

def new_cache(model: nn.Module) -> StreamState:
    return StreamState([LayerCache(torch.zeros(1, CAPACITY, HEADS, DIM // HEADS),
                                   torch.zeros(1, CAPACITY, HEADS, DIM // HEADS)) for _ in range(LAYERS)],
                       [TextCache() for _ in range(LAYERS)])


def call(model: nn.Module, cache: StreamState, chunk: int, generator: torch.Generator) -> tuple[tuple, dict]:
    latent = torch.randn(1, IN_CH, 2, 4, 4, generator=generator)
    text = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(7))
    return (), {"latent": latent, "t": torch.tensor([1000 - 300 * chunk]), "text": text, "state": cache}


FAMILY = Family(
    model=StreamDiT, new_cache=new_cache, call=call, blocks="blocks", patch_embedding="x_embed",
    vace_block=lambda: DiTBlock(DIM, HEADS, FFN),
    vace_block_call=lambda block, c, args, kwargs: block(c, args[1], args[2], args[3]),
)
