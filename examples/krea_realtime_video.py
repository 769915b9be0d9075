"""Krea Realtime Video stand-in: ``krea_realtime_video/modules/causal_model.py`` (spec section 4).

Cache semantics: self-attention writes the caller's ``kv_cache`` in place and then
**replaces** the index entries with whatever it computed (a Python int for
``global_end_index``; ``local_end_index`` stays a tensor on the cache path and becomes an
int after a KV recompute). A non-None ``block_mask`` forces the non-cache (flex) path even
with a cache, and that path fills the cache from position 0: this is the KV recompute
the pipeline runs before every chunk instead of a commit pass. With
``kv_cache_attention_bias != 1.0`` the cached keys between the first frame and the
current block get ``log(bias)`` added to their scores through a flex ``score_mod``.
``forward`` always takes the inference path; blocks and the model return tensors; the
pipeline fuses q/k/v into ``to_qkv`` after loading (``fuse_projections``).
The upstream constructs listed for Krea in spec 11 are kept on purpose.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import create_mask

from examples.wan.attention import attention
from examples.wan.attention import flex_attention as _flex_attention
from examples.wan.configuration import ConfigMixin, ModelMixin, register_to_config
from examples.wan.masks import blockwise_causal_mask, blockwise_causal_mask_i2v, teacher_forcing_mask
from examples.wan.model import (
    WanLayerNorm,
    WanRMSNorm,
    build_wan_trunk,
    causal_rope_apply,
    make_cross_attention_classes,
    rope_apply,
    sinusoidal_embedding_1d,
    wan_init_weights,
    wan_unpatchify,
)
from examples.wan.pipeline import GENERATOR_SEQ_LEN, PipelineConfig, PipelineSpec, frame_seq_length

# Upstream: torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs").
# torch's own flex attention through dynamo; the eager backend skips inductor's C++ codegen
# on CPU. It refuses meta tensors like the real kernel, and fx cannot trace through it.
flex_attention = torch.compile(_flex_attention, backend="eager", dynamic=False)

# Krea's model.py picks the cross-attention kernel from the attention module's flags (spec 4.4).
WAN_CROSSATTENTION_CLASSES = make_cross_attention_classes("flags")
WanT2VCrossAttention = WAN_CROSSATTENTION_CLASSES["t2v_cross_attn"]

FLEX_ATTENTION_ALIGNMENT = 128
KV_CACHE_ATTENTION_BIAS_DISABLED = 1.0
# What the pipeline's DenoiseBlock passes (the recompute pass leaves the default 1.0).
DEFAULT_KV_CACHE_ATTENTION_BIAS = 0.3
KV_CACHE_NUM_FRAMES = 3

__all__ = [
    "CausalWanAttentionBlock",
    "CausalWanModel",
    "CausalWanSelfAttention",
    "DEFAULT_KV_CACHE_ATTENTION_BIAS",
    "KreaPipelineSpec",
    "PIPELINE",
    "get_block_mask",
]


def _pad_tensor_for_flex_attention(tensor, target_length, pad_dim=1):
    """Append zero rows along ``pad_dim`` up to ``target_length`` (unchanged if already long enough)."""
    current_length = tensor.shape[pad_dim]
    padded_length = target_length - current_length
    if padded_length <= 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[pad_dim] = padded_length
    padding = torch.zeros(pad_shape, device=tensor.device, dtype=tensor.dtype)
    return torch.cat([tensor, padding], dim=pad_dim)


@functools.lru_cache(maxsize=32)
def get_block_mask(device: str, num_frames: int = 21, frame_seqlen: int = 1560, num_frame_per_block=3, local_attn_size=-1):
    """The blockwise causal mask, cached per geometry (the recompute builds one every chunk)."""
    return blockwise_causal_mask(device, num_frames, frame_seqlen, num_frame_per_block, local_attn_size)


@functools.lru_cache(maxsize=32)
def get_sdpa_mask(device: str, num_frames: int = 21, frame_seqlen: int = 1560, num_frame_per_block=3, local_attn_size=-1):
    """Dense boolean SDPA equivalent of :func:`get_block_mask` (unused by forward, as upstream)."""
    block_mask = blockwise_causal_mask(device, num_frames, frame_seqlen, num_frame_per_block, local_attn_size)
    mask = create_mask(block_mask.mask_mod, None, None, *block_mask.seq_lengths, device=device)
    print(f" cache a block wise causal sdpa mask with block size of {num_frame_per_block} frames")
    print(mask)
    return mask


class CausalWanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, local_attn_size=-1, sink_size=0, qk_norm=True, eps=1e-6):
        assert dim % num_heads == 0
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.qk_norm = qk_norm
        self.eps = eps
        # Overwritten at run time by SetupCachesBlock; read instead of grid_sizes on the cache path.
        self.frame_seq_length = 1560
        self.max_attention_size = 32760 if local_attn_size == -1 else local_attn_size * self.frame_seq_length
        self.fused_projections = False
        # num_frame_per_block is set by SetupCachesBlock, not here (only the bias path reads it).

        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    @torch.no_grad()
    def fuse_projections(self):
        """Concatenate q/k/v into one ``to_qkv`` Linear; q/k/v stay (bypassed) with their keys."""
        if self.fused_projections:
            return
        concatenated_weights = torch.cat([self.q.weight.data, self.k.weight.data, self.v.weight.data])
        concatenated_bias = torch.cat([self.q.bias.data, self.k.bias.data, self.v.bias.data])
        out_features, in_features = concatenated_weights.shape
        with torch.device("meta"):
            self.to_qkv = nn.Linear(in_features, out_features, bias=True)
        self.to_qkv.load_state_dict(
            {"weight": concatenated_weights, "bias": concatenated_bias}, strict=True, assign=True
        )
        self.fused_projections = True

    def forward(
        self,
        x,
        seq_lens,
        grid_sizes,
        freqs,
        block_mask,
        kv_cache=None,
        current_start=0,
        cache_start=None,
        kv_cache_attention_bias=KV_CACHE_ATTENTION_BIAS_DISABLED,
    ):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        if cache_start is None:
            cache_start = current_start

        def qkv_fn(x):
            if self.fused_projections:
                q, k, v = self.to_qkv(x).chunk(3, dim=-1)
                q = self.norm_q(q).view(b, s, n, d)
                k = self.norm_k(k).view(b, s, n, d)
                v = v.view(b, s, n, d)
            else:
                q = self.norm_q(self.q(x)).view(b, s, n, d)
                k = self.norm_k(self.k(x)).view(b, s, n, d)
                v = self.v(x).view(b, s, n, d)
            return q, k, v

        q, k, v = qkv_fn(x)

        # block_mask set with a cache: the KV recompute over the context frames.
        if kv_cache is None or block_mask is not None:
            is_tf = False  # the teacher-forcing code upstream is dead
            if not is_tf:
                roped_query = rope_apply(q, grid_sizes, freqs).type_as(v)
                roped_key = rope_apply(k, grid_sizes, freqs).type_as(v)

            if kv_cache is not None:
                cache_len = roped_key.shape[1]
                kv_cache["k"][:, :cache_len] = roped_key
                kv_cache["v"][:, :cache_len] = v
                kv_cache["global_end_index"] = cache_len
                kv_cache["local_end_index"] = cache_len

            padded_length = math.ceil(q.shape[1] / FLEX_ATTENTION_ALIGNMENT) * FLEX_ATTENTION_ALIGNMENT - q.shape[1]
            padded_roped_query = torch.cat(
                [roped_query, torch.zeros([q.shape[0], padded_length, q.shape[2], q.shape[3]], device=q.device, dtype=v.dtype)],
                dim=1,
            )
            padded_roped_key = torch.cat(
                [roped_key, torch.zeros([k.shape[0], padded_length, k.shape[2], k.shape[3]], device=k.device, dtype=v.dtype)],
                dim=1,
            )
            padded_v = torch.cat(
                [v, torch.zeros([v.shape[0], padded_length, v.shape[2], v.shape[3]], device=v.device, dtype=v.dtype)],
                dim=1,
            )
            x = flex_attention(
                query=padded_roped_query.transpose(2, 1).contiguous(),
                key=padded_roped_key.transpose(2, 1).contiguous(),
                value=padded_v.transpose(2, 1).contiguous(),
                block_mask=block_mask,
                kernel_options={"BLOCKS_ARE_CONTIGUOUS": True},
            )
            if padded_length > 0:
                x = x[:, :, :-padded_length]
            x = x.transpose(2, 1)
        else:
            # The attribute, not grid_sizes: upstream avoids .item() for torch.compile.
            frame_seqlen = self.frame_seq_length
            current_start_frame = current_start // frame_seqlen
            roped_query = causal_rope_apply(q, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)
            roped_key = causal_rope_apply(k, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)

            current_end = current_start + roped_query.shape[1]
            sink_tokens = self.sink_size * frame_seqlen
            kv_cache_size = kv_cache["k"].shape[1]
            num_new_tokens = roped_query.shape[1]

            # The stored indices are compared as they are (tensor or int), without .item().
            if (
                self.local_attn_size != -1
                and (current_end > kv_cache["global_end_index"])
                and (num_new_tokens + kv_cache["local_end_index"] > kv_cache_size)
            ):
                num_evicted_tokens = num_new_tokens + kv_cache["local_end_index"] - kv_cache_size
                num_rolled_tokens = kv_cache["local_end_index"] - num_evicted_tokens - sink_tokens
                kv_cache["k"][:, sink_tokens : sink_tokens + num_rolled_tokens] = kv_cache["k"][
                    :, sink_tokens + num_evicted_tokens : sink_tokens + num_evicted_tokens + num_rolled_tokens
                ].clone()
                kv_cache["v"][:, sink_tokens : sink_tokens + num_rolled_tokens] = kv_cache["v"][
                    :, sink_tokens + num_evicted_tokens : sink_tokens + num_evicted_tokens + num_rolled_tokens
                ].clone()
                local_end_index = (
                    kv_cache["local_end_index"] + current_end - kv_cache["global_end_index"] - num_evicted_tokens
                )
                local_start_index = local_end_index - num_new_tokens
                kv_cache["k"][:, local_start_index:local_end_index] = roped_key
                kv_cache["v"][:, local_start_index:local_end_index] = v
            else:
                local_end_index = kv_cache["local_end_index"] + current_end - kv_cache["global_end_index"]
                local_start_index = local_end_index - num_new_tokens
                kv_cache["k"][:, local_start_index:local_end_index] = roped_key
                kv_cache["v"][:, local_start_index:local_end_index] = v

            kv_start_idx = max(0, local_end_index - self.max_attention_size)
            cached_k = kv_cache["k"][:, kv_start_idx:local_end_index]
            cached_v = kv_cache["v"][:, kv_start_idx:local_end_index]

            if kv_cache_attention_bias != KV_CACHE_ATTENTION_BIAS_DISABLED:
                log_scale = math.log(kv_cache_attention_bias)
                cache_len = local_end_index - kv_start_idx
                cache_current_block_start = cache_len - frame_seqlen * self.num_frame_per_block

                q_len = roped_query.shape[1]
                kv_len = cached_k.shape[1]
                target_padded_length = (
                    math.ceil(max(q_len, kv_len) / FLEX_ATTENTION_ALIGNMENT) * FLEX_ATTENTION_ALIGNMENT
                )
                padded_roped_query = _pad_tensor_for_flex_attention(roped_query, target_padded_length, pad_dim=1)
                padded_k = _pad_tensor_for_flex_attention(cached_k, target_padded_length, pad_dim=1)
                padded_v = _pad_tensor_for_flex_attention(cached_v, target_padded_length, pad_dim=1)

                frame_seqlen_tensor = torch.as_tensor(frame_seqlen, dtype=torch.int32, device=roped_query.device)
                cache_current_block_start_tensor = torch.as_tensor(
                    cache_current_block_start, dtype=torch.int32, device=roped_query.device
                ).squeeze()
                log_scale_tensor = torch.as_tensor(log_scale, dtype=roped_query.dtype, device=roped_query.device)

                # The first frame and the current block are left unbiased.
                def score_mod(score, b_idx, h_idx, q_idx, kv_idx):
                    return torch.where(
                        (kv_idx >= frame_seqlen_tensor) & (kv_idx < cache_current_block_start_tensor),
                        score + log_scale_tensor,
                        score,
                    )

                x = flex_attention(
                    query=padded_roped_query.transpose(2, 1).contiguous(),
                    key=padded_k.transpose(2, 1).contiguous(),
                    value=padded_v.transpose(2, 1).contiguous(),
                    score_mod=score_mod,
                )[:, :, :q_len]
                x = x.transpose(2, 1)
            else:
                x = attention(roped_query, cached_k, cached_v)

            kv_cache["global_end_index"] = current_end
            kv_cache["local_end_index"] = local_end_index

        x = x.flatten(2)
        x = self.o(x)
        return x


class CausalWanAttentionBlock(nn.Module):
    def __init__(
        self,
        cross_attn_type,
        dim,
        ffn_dim,
        num_heads,
        local_attn_size=-1,
        sink_size=0,
        qk_norm=True,
        cross_attn_norm=False,
        eps=1e-6,
    ):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.local_attn_size = local_attn_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps

        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = CausalWanSelfAttention(dim, num_heads, local_attn_size, sink_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WAN_CROSSATTENTION_CLASSES[cross_attn_type](dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x,
        e,
        seq_lens,
        grid_sizes,
        freqs,
        context,
        context_lens,
        block_mask,
        kv_cache=None,
        crossattn_cache=None,
        current_start=0,
        cache_start=None,
        kv_cache_attention_bias=KV_CACHE_ATTENTION_BIAS_DISABLED,
    ):
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)

        y = self.self_attn(
            (self.norm1(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[1]) + e[0]).flatten(1, 2),
            seq_lens,
            grid_sizes,
            freqs,
            block_mask,
            kv_cache,
            current_start,
            cache_start,
            kv_cache_attention_bias,
        )

        x = x + (y.unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * e[2]).flatten(1, 2)

        def cross_attn_ffn(x, context, context_lens, e, crossattn_cache=None):
            x = x + self.cross_attn(self.norm3(x), context, context_lens, crossattn_cache=crossattn_cache)
            y = self.ffn(
                (self.norm2(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[4]) + e[3]).flatten(1, 2)
            )
            x = x + (y.unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * e[5]).flatten(1, 2)
            return x

        x = cross_attn_ffn(x, context, context_lens, e, crossattn_cache)
        return x


class CausalWanModel(ModelMixin, ConfigMixin):
    ignore_for_config = ["patch_size", "cross_attn_norm", "qk_norm", "text_dim"]
    _no_split_modules = ["WanAttentionBlock"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        model_type="t2v",
        patch_size=(1, 2, 2),
        text_len=512,
        in_dim=16,
        dim=2048,
        ffn_dim=8192,
        freq_dim=256,
        text_dim=4096,
        out_dim=16,
        num_heads=16,
        num_layers=32,
        local_attn_size=-1,
        sink_size=0,
        qk_norm=True,
        cross_attn_norm=True,
        eps=1e-6,
    ):
        super().__init__()
        assert model_type in ["t2v", "i2v"]
        self.model_type = model_type
        self.patch_size = patch_size
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.local_attn_size = local_attn_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps

        cross_attn_type = "t2v_cross_attn" if model_type == "t2v" else "i2v_cross_attn"
        build_wan_trunk(
            self,
            lambda kind: CausalWanAttentionBlock(
                kind, dim, ffn_dim, num_heads, local_attn_size, sink_size, qk_norm, cross_attn_norm, eps
            ),
            num_layers,
            cross_attn_type,
        )

        self.init_weights()

        self.gradient_checkpointing = False
        self.block_mask = None
        self.num_frame_per_block = 1
        self.independent_first_frame = False

    def _set_gradient_checkpointing(self, module, value=False):
        self.gradient_checkpointing = value

    @staticmethod
    def _prepare_blockwise_causal_attn_mask(
        device, num_frames=21, frame_seqlen=1560, num_frame_per_block=1, local_attn_size=-1
    ):
        return get_block_mask(str(device), num_frames, frame_seqlen, num_frame_per_block, local_attn_size)

    @staticmethod
    def _prepare_teacher_forcing_mask(device, num_frames=21, frame_seqlen=1560, num_frame_per_block=1):
        return teacher_forcing_mask(device, num_frames, frame_seqlen, num_frame_per_block)

    @staticmethod
    def _prepare_blockwise_causal_attn_mask_i2v(
        device, num_frames=21, frame_seqlen=1560, num_frame_per_block=4, local_attn_size=-1
    ):
        return blockwise_causal_mask_i2v(device, num_frames, frame_seqlen, num_frame_per_block, local_attn_size)

    def _forward_inference(
        self,
        x,
        t,
        context,
        seq_len,
        clip_fea=None,
        y=None,
        kv_cache: dict = None,
        crossattn_cache: dict = None,
        current_start: int = 0,
        cache_start: int = 0,
        kv_cache_attention_bias: float = KV_CACHE_ATTENTION_BIAS_DISABLED,
    ):
        if self.model_type == "i2v":
            assert clip_fea is not None and y is not None
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)

        if y is not None:
            x = [torch.cat([u, v], dim=0) for u, v in zip(x, y)]

        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = torch.tensor([u.size(1) for u in x], dtype=torch.long)
        assert seq_lens.max() <= seq_len
        x = torch.cat(x)

        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).type_as(x))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim)).unflatten(dim=0, sizes=t.shape)

        context_lens = None
        context = self.text_embedding(
            torch.stack([torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))]) for u in context])
        )

        if clip_fea is not None:
            context_clip = self.img_emb(clip_fea)
            context = torch.concat([context_clip, context], dim=1)

        kwargs = dict(
            e=e0,
            seq_lens=seq_lens,
            grid_sizes=grid_sizes,
            freqs=self.freqs,
            context=context,
            context_lens=context_lens,
            block_mask=self.block_mask,
        )

        def create_custom_forward(module):
            def custom_forward(*inputs, **kwargs):
                return module(*inputs, **kwargs)

            return custom_forward

        for block_index, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                kwargs.update(
                    {
                        "kv_cache": kv_cache[block_index],
                        "current_start": current_start,
                        "cache_start": cache_start,
                        "kv_cache_attention_bias": kv_cache_attention_bias,
                    }
                )
                x = torch.utils.checkpoint.checkpoint(create_custom_forward(block), x, **kwargs, use_reentrant=False)
            else:
                kwargs.update(
                    {
                        "kv_cache": kv_cache[block_index],
                        "crossattn_cache": crossattn_cache[block_index],
                        "current_start": current_start,
                        "cache_start": cache_start,
                        "kv_cache_attention_bias": kv_cache_attention_bias,
                    }
                )
                x = block(x, **kwargs)

        x = self.head(x, e.unflatten(dim=0, sizes=t.shape).unsqueeze(2))
        x = self.unpatchify(x, grid_sizes)
        return torch.stack(x)

    def _forward_train(self, x, t, context, seq_len, clean_x=None, aug_t=None, clip_fea=None, y=None):
        """Blockwise-causal training forward over a whole clip (unreachable through ``forward``).

        Teacher forcing (``clean_x``) is not reproduced: the stand-ins serve streaming inference.
        """
        if clean_x is not None or aug_t is not None:
            raise NotImplementedError("the Krea stand-in does not reproduce teacher-forcing training")
        if self.model_type == "i2v":
            assert clip_fea is not None and y is not None
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)

        if self.block_mask is None:
            self.block_mask = self._prepare_blockwise_causal_attn_mask(
                device=device,
                num_frames=x.shape[2],
                frame_seqlen=x.shape[-2] * x.shape[-1] // (self.patch_size[1] * self.patch_size[2]),
                num_frame_per_block=self.num_frame_per_block,
                local_attn_size=self.local_attn_size,
            )

        if y is not None:
            x = [torch.cat([u, v], dim=0) for u, v in zip(x, y)]

        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = torch.tensor([u.size(1) for u in x], dtype=torch.long)
        assert seq_lens.max() <= seq_len
        x = torch.cat([torch.cat([u, u.new_zeros(1, seq_len - u.size(1), u.size(2))], dim=1) for u in x])

        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).type_as(x))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim)).unflatten(dim=0, sizes=t.shape)

        context_lens = None
        context = self.text_embedding(
            torch.stack([torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))]) for u in context])
        )
        if clip_fea is not None:
            context_clip = self.img_emb(clip_fea)
            context = torch.concat([context_clip, context], dim=1)

        kwargs = dict(
            e=e0,
            seq_lens=seq_lens,
            grid_sizes=grid_sizes,
            freqs=self.freqs,
            context=context,
            context_lens=context_lens,
            block_mask=self.block_mask,
        )
        for block in self.blocks:
            x = block(x, **kwargs)

        x = self.head(x, e.unflatten(dim=0, sizes=t.shape).unsqueeze(2))
        x = self.unpatchify(x, grid_sizes)
        return torch.stack(x)

    def forward(self, *args, **kwargs):
        # Upstream comments the training dispatch out: every call is an inference call.
        return self._forward_inference(*args, **kwargs)

    def unpatchify(self, x, grid_sizes):
        return wan_unpatchify(self, x, grid_sizes)

    def init_weights(self):
        wan_init_weights(self)


def _fuse_all_projections(model: nn.Module) -> None:
    """What ``KreaRealtimeVideoPipeline.__init__`` does right after loading the base weights."""
    for block in model.blocks:
        block.self_attn.fuse_projections()


def _plain_call(model: nn.Module) -> Callable[..., torch.Tensor]:
    """A ``call(kind, x, **kwargs)`` that just runs ``model`` without gradients."""

    def call(kind: str, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return model(x, **kwargs)

    return call


def _block_mask_model(model: nn.Module) -> nn.Module:
    """The object whose ``block_mask`` the blocks read (under a PEFT and/or VACE wrapper)."""
    unwrap = getattr(model, "get_base_model", None)
    if callable(unwrap):  # PeftModel / LoraModel around the model
        model = unwrap()
    owner = getattr(model, "causal_wan_model", None)
    return model if owner is None else owner


@dataclass(frozen=True)
class KreaPipelineSpec(PipelineSpec):
    """Krea's pipeline: fused projections, and a KV recompute before each chunk instead of a commit.

    Per chunk (spec 4.7, 7): ``RecomputeKVCacheBlock`` (from the second chunk on) rebuilds
    the cache from the context frames (the stream's first latent frame plus the last
    ``kv_cache_num_frames - 1`` generated frames) through the ``block_mask`` path, then the
    denoising calls run at ``chunk_start_frame(current_start_frame)``; there is no
    ``CleanKVCacheBlock``. ``before_chunk``, ``commits_cache`` and ``chunk_start_frame`` are
    the driver's chunk hooks (``examples/driver.py``); the recompute is recorded there as a call
    of kind ``"recompute"``.
    """

    kv_cache_num_frames: int = KV_CACHE_NUM_FRAMES
    commits_cache: bool = False

    def build(self, size="tiny", seed=0, device="cpu", dtype=torch.float32, init="random") -> nn.Module:
        """``PipelineSpec.build``, then ``fuse_projections()`` on every block, as the pipeline does."""
        model = super().build(size=size, seed=seed, device=device, dtype=dtype, init=init)
        _fuse_all_projections(model)
        return model

    def chunk_start_frame(self, current_start_frame: int) -> int:
        """The start frame the denoising calls use: context frames occupy the cache before it."""
        return min(current_start_frame, self.kv_cache_num_frames)

    def context_frames(self, history: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """Context latents [B, C, F, H, W] for the recompute; None before the first chunk exists.

        ``history`` holds the denoised latents of the previous chunks in model layout. The
        stream's first frame is used as is (upstream re-encodes its decoded image from the
        third chunk on; the stand-ins have no VAE).
        """
        if not history:
            return None
        first = history[0][:, :, :1]
        buffer_size = self.kv_cache_num_frames - 1
        if buffer_size <= 0:
            return first
        # PrepareContextFramesBlock: a zero-initialised sliding window of the latest frames.
        buffer = first.new_zeros([*first.shape[:2], buffer_size, *first.shape[3:]])
        for latents in history:
            buffer = torch.cat([buffer, latents], dim=2)[:, :, -buffer_size:]
        return torch.cat([first, buffer], dim=2)

    def recompute_kv_cache(
        self,
        model: nn.Module,
        caches: dict[str, Any],
        context_frames: torch.Tensor,
        context: torch.Tensor,
        *,
        current_start_frame: int,
        height: int,
        width: int,
        seq_len: int = GENERATOR_SEQ_LEN,
        call: Optional[Callable[..., torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``RecomputeKVCacheBlock`` for a chunk after the first: refill ``caches["kv_cache"]``.

        The model runs through ``call("recompute", x, **kwargs)`` (the driver's recording
        :data:`examples.driver.ModelCall`; default: a plain call without gradients) while
        ``block_mask`` is set on the model that owns it. Returns the call's output.
        """
        call = _plain_call(model) if call is None else call
        fs = frame_seq_length(height, width)
        start_frame = self.chunk_start_frame(current_start_frame)
        num_context_frames = context_frames.shape[2]
        # initialize_kv_cache on reuse (zero_cache=False): k/v kept, indices replaced.
        for entry in caches["kv_cache"]:
            device = entry["k"].device if entry["k"].device.type != "meta" else torch.device("cpu")
            entry["global_end_index"] = torch.tensor([0], dtype=torch.long, device=device)
            entry["local_end_index"] = torch.tensor([0], dtype=torch.long, device=device)
        owner = _block_mask_model(model)
        # A mask is index data: on meta models it is built on CPU (flex_attention moves it).
        mask_device = context_frames.device if context_frames.device.type != "meta" else torch.device("cpu")
        owner.block_mask = owner._prepare_blockwise_causal_attn_mask(
            device=mask_device,
            num_frames=num_context_frames,
            frame_seqlen=fs,
            num_frame_per_block=self.config.num_frame_per_block,
            local_attn_size=-1,
        )
        try:
            timestep = torch.zeros([context_frames.shape[0], num_context_frames], dtype=torch.int64,
                                   device=context_frames.device)
            full = dict(
                t=timestep,
                context=context,
                seq_len=seq_len,
                kv_cache=caches["kv_cache"],
                crossattn_cache=caches["crossattn_cache"],
                current_start=start_frame * fs,
                cache_start=None,
                kv_cache_attention_bias=KV_CACHE_ATTENTION_BIAS_DISABLED,
            )
            return call("recompute", context_frames, **{name: full[name] for name in self.call_keywords})
        finally:
            owner.block_mask = None

    def before_chunk(
        self,
        model: nn.Module,
        caches: dict[str, Any],
        *,
        chunk: int,
        frames: int,
        height: int,
        width: int,
        context: torch.Tensor,
        history: Sequence[torch.Tensor],
        seq_len: int = GENERATOR_SEQ_LEN,
        call: Optional[Callable[..., torch.Tensor]] = None,
    ) -> int:
        """Driver hook: run the recompute for ``chunk`` and return the denoising start frame.

        ``call`` makes the recompute's model call (see :meth:`recompute_kv_cache`).
        """
        current_start_frame = chunk * frames
        if current_start_frame > 0:
            context_frames = self.context_frames(history)
            self.recompute_kv_cache(
                model, caches, context_frames, context,
                current_start_frame=current_start_frame, height=height, width=width, seq_len=seq_len, call=call,
            )
        return self.chunk_start_frame(current_start_frame)


PIPELINE = KreaPipelineSpec(
    name="krea_realtime_video",
    module=sys.modules[__name__],
    config=PipelineConfig(
        base_model="14B",
        num_frame_per_block=3,
        local_attn_size=6,
        sink_size=0,
        steps=(1000, 750, 500, 250),
        model_kwargs={},
        sets_block_local_attn_size=False,
        kv_cache_attention_bias=DEFAULT_KV_CACHE_ATTENTION_BIAS,
        timestep_shift=5.0,
        height=320,
        width=576,
        vace_layers=(0, 5, 10, 15, 20, 25, 30, 35),
        vace_in_dim=96,
    ),
    call_keywords=(
        "t",
        "context",
        "seq_len",
        "kv_cache",
        "crossattn_cache",
        "current_start",
        "cache_start",
        "kv_cache_attention_bias",
    ),
)
