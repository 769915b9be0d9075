"""A streaming model whose caches are objects with methods, behind a dispatching forward.

``forward(*args, **kwargs)`` dispatches to ``infer`` when a ``store`` is given. The
self-attention cache is a ``KVStore`` object (``append`` / ``view`` methods) reached
through a ``Stores`` object; the cross-attention cache is a list of ``[k, v]`` lists under
the conventional ``crossattn_cache`` name. The prompt is a list of per-sample embeddings
of any length, cut and padded to the model's text length. After the blocks, ``infer`` calls the store's
own ``commit`` through a helper. Attention picks its kernel from a backend name, blocks
forward ``**kwargs`` to their attention, and the block loop has a gradient-checkpointing
branch guarded by ``torch.is_grad_enabled()``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from corpus import Family

DIM, HEADS, FFN, LAYERS, CTX, IN_CH, ROOM, TEXT = 16, 2, 32, 3, 12, 4, 24, 6


class KVStore:
    def __init__(self, room: int, dim: int) -> None:
        self.k = torch.zeros(1, room, dim)
        self.v = torch.zeros(1, room, dim)
        self.pending = 0
        self.size = torch.zeros((), dtype=torch.long)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.size) + self.pending
        self.k[:, start:start + k.shape[1]] = k
        self.v[:, start:start + v.shape[1]] = v
        self.pending += k.shape[1]
        return self.k[:, :start + k.shape[1]], self.v[:, :start + v.shape[1]]

    def commit(self) -> None:
        self.size += self.pending
        self.pending = 0


class Stores:
    def __init__(self, layers: int, room: int, dim: int) -> None:
        self.per_layer = [KVStore(room, dim) for _ in range(layers)]

    def __getitem__(self, index: int) -> KVStore:
        return self.per_layer[index]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, backend: str) -> torch.Tensor:
    q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    if backend == "flash" and q.is_cuda:
        out = F.scaled_dot_product_attention(q.half(), k.half(), v.half()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str = "flash") -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, kv: Optional[KVStore] = None, **unused: Any) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if kv is not None:
            k, v = kv.append(k, v)
        return self.o(_attend(q, k, v, self.heads, self.backend))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor, crossattn_cache: Optional[list] = None) -> torch.Tensor:
        if crossattn_cache is not None and len(crossattn_cache) == 2:
            k, v = crossattn_cache
        else:
            k, v = self.k(context), self.v(context)
            if crossattn_cache is not None:
                crossattn_cache.extend([k, v])
        return self.o(_attend(self.q(x), k, v, self.heads, "sdpa"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.dim, self.heads, self.ffn_dim = dim, heads, ffn_dim
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.self_attn = SelfAttention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, kv: Optional[KVStore] = None,
                crossattn_cache: Optional[list] = None, **kwargs: Any) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x) * (1 + e), kv, **kwargs)
        x = x + self.cross_attn(self.norm2(x), context, crossattn_cache=crossattn_cache)
        return x + self.ffn(self.norm3(x))


class StreamingTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_layers = LAYERS
        self.patchify = nn.Conv3d(IN_CH, DIM, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.time_mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.context_proj = nn.Linear(CTX, DIM)
        self.layers = nn.ModuleList(Block(DIM, HEADS, FFN) for _ in range(LAYERS))
        self.unpatchify = nn.Linear(DIM, IN_CH * 4)
        self.gradient_checkpointing = False

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("store") is not None:
            return self.infer(*args, **kwargs)
        return self.infer(*args, store=None, crossattn_cache=None, **kwargs)

    def infer(self, latents: torch.Tensor, sigma: torch.Tensor, prompt: list, store: Optional[Stores] = None,
              crossattn_cache: Optional[list] = None, **block_kwargs: Any) -> torch.Tensor:
        shape = latents.shape
        x = self.patchify(latents).flatten(2).transpose(1, 2)
        half = DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = sigma.to(x.dtype)[:, None] * freqs[None]
        e = self.time_mlp(torch.cat([angles.cos(), angles.sin()], dim=1))[:, None, :]
        context = self.context_proj(torch.stack([torch.cat([u[:TEXT], u.new_zeros(TEXT, u.shape[-1])])[:TEXT]
                                                 for u in prompt]))
        for i, layer in enumerate(self.layers):
            kv = store[i] if store is not None else None
            cross = crossattn_cache[i] if crossattn_cache is not None else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, e, context, kv, cross, use_reentrant=False)
            else:
                x = layer(x, e, context, kv, cross, **block_kwargs)
        if store is not None:
            self.finish_chunk(store)
        return self.unpatchify(x).unflatten(1, (shape[2], shape[3] // 2, shape[4] // 2))

    def finish_chunk(self, stores: Stores) -> None:
        for kv in stores.per_layer:
            kv.commit()


# ----- what the corpus test needs ----------------------------------------------------------

def call(model: nn.Module, cache: dict, chunk: int, generator: torch.Generator) -> tuple[tuple, dict]:
    latents = torch.randn(1, IN_CH, 2, 4, 4, generator=generator)
    prompt = [torch.randn(5, CTX, generator=torch.Generator().manual_seed(7))]
    sigma = torch.tensor([1.0 - 0.25 * chunk])
    return (latents, sigma, prompt), dict(cache)


FAMILY = Family(
    model=StreamingTransformer,
    new_cache=lambda model: {"store": Stores(LAYERS, ROOM, DIM), "crossattn_cache": [[] for _ in range(LAYERS)]},
    call=call, blocks="layers", patch_embedding="patchify",
    vace_block=lambda: Block(DIM, HEADS, FFN),
    vace_block_call=lambda block, c, args, kwargs: block(c, args[1], args[2]),
)
