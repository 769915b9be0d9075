"""A model whose author chose names that collide with everything a tracer uses itself.

The latent is called ``target``, the timestep ``name``, the text ``args`` (passed by
keyword), the per-block modulation ``mod``, the self-attention cache ``self_`` and the
cross-attention cache ``args``; ``kwargs`` is an ordinary parameter. Caches are ``namedtuple``s (their tensors are written in place) held
in a plain ``Memory`` object. Inputs include an integer timestep tensor, a bool keep-mask,
and the code indexes with tensors, ``None``, ``...`` and slices. The FFN has an
``Identity`` between its activation and its second Linear; blocks live in ``trunk``.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from corpus import Family

from corpus import Family

WIDTH, HEADS, HIDDEN, DEPTH, WORDS, CHANNELS, ROOM = 16, 4, 48, 3, 10, 4, 24

KV = namedtuple("KV", "k v n")
Text = namedtuple("Text", "k v filled")


class Memory:
    """Per-layer caches as attributes of a plain object."""

    def __init__(self, depth: int, width: int) -> None:
        self.layers = [KV(torch.zeros(1, ROOM, width), torch.zeros(1, ROOM, width), torch.zeros((), dtype=torch.long))
                       for _ in range(depth)]
        self.text = [Text(torch.zeros(1, 6, width), torch.zeros(1, 6, width), torch.zeros((), dtype=torch.bool))
                     for _ in range(depth)]


def heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


class SelfMix(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, target: torch.Tensor, self_: Optional[KV] = None) -> torch.Tensor:
        q, k, v = self.to_qkv(target).chunk(3, dim=-1)
        if self_ is not None:
            at = int(self_.n)
            self_.k[:, at:at + k.shape[1]] = k
            self_.v[:, at:at + k.shape[1]] = v
            self_.n.add_(k.shape[1])
            k, v = self_.k[:, :at + k.shape[1]], self_.v[:, :at + k.shape[1]]
        mixed = F.scaled_dot_product_attention(heads_first(q, self.heads), heads_first(k, self.heads),
                                               heads_first(v, self.heads))
        return self.out(mixed.transpose(1, 2).flatten(-2))


class TextMix(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, target: torch.Tensor, name: torch.Tensor, args: Optional[Text] = None) -> torch.Tensor:
        if args is not None and bool(args.filled):
            k, v = args.k, args.v
        else:
            k, v = self.k(name), self.v(name)
            if args is not None:
                args.k.copy_(k)
                args.v.copy_(v)
                args.filled.fill_(True)
        mixed = F.scaled_dot_product_attention(heads_first(self.q(target), self.heads), heads_first(k, self.heads),
                                               heads_first(v, self.heads))
        return self.out(mixed.transpose(1, 2).flatten(-2))


class Cell(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.width, self.heads, self.hidden = width, heads, hidden
        self.pre = nn.LayerNorm(width, elementwise_affine=False)
        self.mix = SelfMix(width, heads)
        self.mid = nn.LayerNorm(width)
        self.read = TextMix(width, heads)
        self.post = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Identity(), nn.Linear(hidden, width))
        self.table = nn.Parameter(torch.randn(1, 3, width) / width**0.5)

    def forward(self, target: torch.Tensor, mod: torch.Tensor, name: torch.Tensor, self_: Optional[KV] = None,
                args: Optional[Text] = None, kwargs: Optional[dict] = None) -> torch.Tensor:
        gates = (self.table + mod[:, None, :]).unbind(1)
        target = target + self.mix(self.pre(target) * (1 + gates[0][:, None]), self_) * gates[1][:, None]
        target = target + self.read(self.mid(target), name, args)
        target = target + self.mlp(self.post(target)) * gates[2][..., None, :]
        return target


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(CHANNELS, WIDTH, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.clock = nn.Linear(1, WIDTH)
        self.tempo = nn.Parameter(torch.tensor(1e-3))
        self.words = nn.Linear(WORDS, WIDTH)
        self.where = nn.Parameter(torch.randn(ROOM, WIDTH) * 0.02)
        self.trunk = nn.ModuleList(Cell(WIDTH, HEADS, HIDDEN) for _ in range(DEPTH))
        self.tail = nn.Linear(WIDTH, CHANNELS * 4)

    def forward(self, target: torch.Tensor, name: torch.Tensor, keep: torch.Tensor, args: torch.Tensor,
                memory: Optional[Memory] = None) -> torch.Tensor:
        grid = target.shape[2:]
        x = self.stem(target).flatten(2).transpose(1, 2)
        x = x * keep[..., None].to(x.dtype)
        offset = memory.layers[0].n if memory is not None else torch.zeros((), dtype=torch.long)
        x = x + self.where[torch.arange(x.shape[1]) + offset][None, ...]
        mod = F.silu(self.clock((name * self.tempo)[:, None]))
        text = self.words(args[:, :6])
        for i, cell in enumerate(self.trunk):
            x = cell(x, mod, text, memory.layers[i] if memory is not None else None,
                     memory.text[i] if memory is not None else None)
        return self.tail(x).unflatten(1, (grid[0], grid[1] // 2, grid[2] // 2))


# ----- what the corpus test needs ----------------------------------------------------------

def call(model: nn.Module, cache: Memory, chunk: int, generator: torch.Generator) -> tuple[tuple, dict]:
    target = torch.randn(1, CHANNELS, 2, 4, 4, generator=generator)
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[:, chunk] = False
    words = torch.randn(1, 7, WORDS, generator=torch.Generator().manual_seed(7))
    return (target, torch.tensor([900 - 200 * chunk]), keep), {"args": words, "memory": cache}


FAMILY = Family(
    model=Net, new_cache=lambda model: Memory(DEPTH, WIDTH), call=call, blocks="trunk", patch_embedding="stem",
    vace_block=lambda: Cell(WIDTH, HEADS, HIDDEN),
    vace_block_call=lambda block, c, args, kwargs: block(c, args[1], args[2]),
)
