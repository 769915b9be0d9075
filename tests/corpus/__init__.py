"""Small Wan-like transformers written the way real projects write them.

Each module is one model family: its own naming, cache layout and code habits (see each
module's docstring), seeded and tiny. Besides the model it exposes ``FAMILY``: what the
corpus test needs to build, stream and hand-write VACE for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

#: ``call(model, cache, chunk, generator) -> (args, kwargs)`` of one streaming chunk.
ChunkCall = Callable[[nn.Module, Any, int, torch.Generator], "tuple[tuple, dict]"]


def _same(result: Any) -> Any:
    return result


@dataclass(frozen=True)
class Family:
    """A corpus model and how to drive it.

    ``blocks`` and ``patch_embedding`` are the attribute names of the main blocks and the
    patch embedding; ``vace_block()`` builds one fresh block by hand and
    ``vace_block_call(block, c, args, kwargs)`` runs it without caches, given block 0's call.
    """

    model: Callable[[], nn.Module]
    new_cache: Callable[[nn.Module], Any]
    call: ChunkCall
    blocks: str
    patch_embedding: str
    vace_block: Callable[[], nn.Module]
    vace_block_call: Callable[[nn.Module, torch.Tensor, tuple, dict], Any]
    output_of: Callable[[Any], torch.Tensor] = _same

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.model().eval()

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, self.blocks)

    def embedding_of(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.patch_embedding)
