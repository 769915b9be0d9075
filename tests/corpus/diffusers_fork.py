"""A streaming fork of a diffusers-style Wan transformer.

Written the way diffusers code reads: ``hidden_states``/``encoder_hidden_states`` names,
an attention module that hands its work to a processor object, ``**kwargs`` forwarded from
the block into the processor, a ``FeedForward`` whose first projection lives inside an
activation module and is followed by ``Dropout``, timesteps embedded with
``timesteps[:, None]``, a gradient-checkpointing branch, and its configuration kept in a
``config`` object (the model has no ``num_layers`` attribute). The streaming fork adds
``past_key_values``: one dict per layer, ``{"self": {...}, "cross": {...}}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from corpus import Family


@dataclass(frozen=True)
class TransformerConfig:
    patch_size: tuple = (1, 2, 2)
    in_channels: int = 4
    out_channels: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 8
    text_dim: int = 12
    freq_dim: int = 16
    ffn_dim: int = 32
    num_layers: int = 3
    cache_tokens: int = 24


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int, max_period: int = 10000) -> torch.Tensor:
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half_dim, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / half_dim
    emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value)


def _math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    weights = (query @ key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    return weights.softmax(dim=-1) @ value


ATTENTION_BACKENDS = {"sdpa": _sdpa, "math": _math_attention}


class WanAttnProcessor:
    """The processor object diffusers attention modules delegate to."""

    def __call__(self, attn: "WanAttention", hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                 **kwargs: Any) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        query = attn.norm_q(attn.to_q(hidden_states))
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and cache is not None and cache["ready"]:
            key, value = cache["k"], cache["v"]
        else:
            key = attn.norm_k(attn.to_k(source))
            value = attn.to_v(source)
            if encoder_hidden_states is not None and cache is not None:
                cache["k"], cache["v"], cache["ready"] = key, value, True
        if encoder_hidden_states is None and cache is not None:
            start = int(cache["end"].item())
            end = start + key.shape[1]
            cache["k"][:, start:end] = key
            cache["v"][:, start:end] = value
            cache["end"].fill_(end)
            key, value = cache["k"][:, :end], cache["v"][:, :end]
        heads = attn.heads
        query, key, value = (t.unflatten(2, (heads, -1)).transpose(1, 2) for t in (query, key, value))
        out = ATTENTION_BACKENDS[attn.backend](query, key, value)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * query.shape[-1])
        for layer in attn.to_out:
            out = layer(out)
        return out


class WanAttention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, backend: str = "sdpa") -> None:
        super().__init__()
        self.inner_dim = dim_head * heads
        self.heads = heads
        self.backend = backend
        self.to_q = nn.Linear(query_dim, self.inner_dim)
        self.to_k = nn.Linear(query_dim, self.inner_dim)
        self.to_v = nn.Linear(query_dim, self.inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, query_dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(self.inner_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(self.inner_dim, eps=1e-6)
        self.processor = WanAttnProcessor()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, **kwargs)


class GELU(nn.Module):
    """diffusers' GELU: the projection lives inside the activation module."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class WanTransformerBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.ffn_dim, self.num_heads, self.eps = dim, ffn_dim, num_heads, eps
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, num_heads, dim // num_heads)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = WanAttention(dim, num_heads, dim // num_heads, backend="math")
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                layer_past: Optional[dict] = None, **kwargs: Any) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, cache=None if layer_past is None else layer_past["self"], **kwargs)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states,
                                 cache=None if layer_past is None else layer_past["cross"])
        hidden_states = hidden_states + attn_output
        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale) + c_shift).type_as(hidden_states)
        ff_output = self.ffn(norm_hidden_states)
        hidden_states = (hidden_states.float() + ff_output.float() * c_gate).type_as(hidden_states)
        return hidden_states


class WanStreamTransformer3DModel(nn.Module):
    _supports_gradient_checkpointing = True

    def __init__(self, config: TransformerConfig = TransformerConfig()) -> None:
        super().__init__()
        self.config = config
        inner_dim = config.num_attention_heads * config.attention_head_dim
        self.patch_embedding = nn.Conv3d(config.in_channels, inner_dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.time_embedder = TimestepEmbedding(config.freq_dim, inner_dim)
        self.time_proj = nn.Linear(inner_dim, inner_dim * 6)
        self.text_embedder = nn.Sequential(nn.Linear(config.text_dim, inner_dim), nn.GELU(approximate="tanh"),
                                           nn.Linear(inner_dim, inner_dim))
        self.blocks = nn.ModuleList(
            WanTransformerBlock(inner_dim, config.ffn_dim, config.num_attention_heads) for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(inner_dim, 1e-6, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, config.out_channels * math.prod(config.patch_size))
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                past_key_values: Optional[list] = None, return_dict: bool = False, **kwargs: Any) -> Any:
        batch_size, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        hidden_states = self.patch_embedding(hidden_states)
        hidden_states = hidden_states.flatten(2).transpose(1, 2)

        temb = self.time_embedder(get_timestep_embedding(timestep, self.config.freq_dim).type_as(hidden_states))
        timestep_proj = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        encoder_hidden_states = self.text_embedder(encoder_hidden_states)

        for index, block in enumerate(self.blocks):
            layer_past = past_key_values[index] if past_key_values is not None else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = torch.utils.checkpoint.checkpoint(
                    block, hidden_states, encoder_hidden_states, timestep_proj, layer_past, use_reentrant=False)
            else:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, layer_past=layer_past,
                                      **kwargs)

        hidden_states = self.proj_out(self.norm_out(hidden_states))
        hidden_states = hidden_states.reshape(batch_size, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return {"sample": output}


# ----- what the corpus test needs ----------------------------------------------------------

CONFIG = TransformerConfig()
INNER = CONFIG.num_attention_heads * CONFIG.attention_head_dim


def new_cache(model: nn.Module) -> list:
    return [{"self": {"k": torch.zeros(1, CONFIG.cache_tokens, INNER), "v": torch.zeros(1, CONFIG.cache_tokens, INNER),
                      "end": torch.zeros((), dtype=torch.long)},
             "cross": {"k": None, "v": None, "ready": False}}
            for _ in range(CONFIG.num_layers)]


def call(model: nn.Module, cache: list, chunk: int, generator: torch.Generator) -> tuple[tuple, dict]:
    latent = torch.randn(1, CONFIG.in_channels, 2, 4, 4, generator=generator)
    timestep = torch.tensor([999 - 250 * chunk])
    text = torch.randn(1, 5, CONFIG.text_dim, generator=torch.Generator().manual_seed(7))
    return (latent, timestep, text), {"past_key_values": cache}


FAMILY = Family(
    model=lambda: WanStreamTransformer3DModel(CONFIG), new_cache=new_cache, call=call,
    blocks="blocks", patch_embedding="patch_embedding",
    vace_block=lambda: WanTransformerBlock(INNER, CONFIG.ffn_dim, CONFIG.num_attention_heads),
    # Without caches the block needs its three required inputs.
    vace_block_call=lambda block, c, args, kwargs: block(c, args[1], args[2]),
    output_of=lambda result: result[0],
)
