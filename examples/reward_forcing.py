"""RewardForcing stand-in: ``reward_forcing/modules/causal_model.py`` (spec section 5).

Cache semantics: self-attention writes the caller's ``kv_cache`` in place and stores the
keys **un-roped**; RoPE is applied at attention time, relative to the attended window
(sink from frame 0, then the local window, then the queries). When a roll evicts exactly
one sink's worth of tokens the sink becomes an EMA of itself and the evicted tokens
(``incremental_update``, ``compression_alpha`` 0.999). Blocks and the model return tensors.
The upstream constructs listed for RewardForcing in spec 11 are kept on purpose
(``copy.deepcopy(grid_sizes)`` + item assignment, ``.item()`` control flow, prints in the
mask builder, ``attention(...)`` in the cross-attention).
"""
from __future__ import annotations

import copy
import math
import sys

import torch
import torch.nn as nn

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
from examples.wan.pipeline import PipelineConfig, PipelineSpec

# Upstream: torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs").
# torch's own flex attention through dynamo; the eager backend skips inductor's C++ codegen
# on CPU. It refuses meta tensors like the real kernel, and fx cannot trace through it.
flex_attention = torch.compile(_flex_attention, backend="eager", dynamic=False)

# RewardForcing's model.py calls ``attention(...)`` (sage / flash / SDPA dispatch) in the cross-attention.
WAN_CROSSATTENTION_CLASSES = make_cross_attention_classes("attention")
WanT2VCrossAttention = WAN_CROSSATTENTION_CLASSES["t2v_cross_attn"]

__all__ = ["CausalWanAttentionBlock", "CausalWanModel", "CausalWanSelfAttention", "PIPELINE"]


class CausalWanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, local_attn_size=-1, sink_size=0, qk_norm=True, eps=1e-6, compression_alpha=0.999):
        assert dim % num_heads == 0
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.qk_norm = qk_norm
        self.eps = eps
        self.compression_alpha = compression_alpha
        self.max_attention_size = 32760 if local_attn_size == -1 else local_attn_size * 1560

        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def incremental_update(self, new_k, new_v, current_sink_k, current_sink_v, alpha=None):
        """EMA of the sink with the tokens just evicted from behind it."""
        if alpha is None:
            alpha = self.compression_alpha
        updated_sink_k = alpha * current_sink_k + (1 - alpha) * new_k
        updated_sink_v = alpha * current_sink_v + (1 - alpha) * new_v
        return updated_sink_k, updated_sink_v

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        if cache_start is None:
            cache_start = current_start

        def qkv_fn(x):
            q = self.norm_q(self.q(x)).view(b, s, n, d)
            k = self.norm_k(self.k(x)).view(b, s, n, d)
            v = self.v(x).view(b, s, n, d)
            return q, k, v

        q, k, v = qkv_fn(x)

        if kv_cache is None:
            roped_query = rope_apply(q, grid_sizes, freqs).type_as(v)
            roped_key = rope_apply(k, grid_sizes, freqs).type_as(v)

            padded_length = math.ceil(q.shape[1] / 128) * 128 - q.shape[1]
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
                query=padded_roped_query.transpose(2, 1),
                key=padded_roped_key.transpose(2, 1),
                value=padded_v.transpose(2, 1),
                block_mask=block_mask,
            )
            if padded_length > 0:
                x = x[:, :, :-padded_length]
            x = x.transpose(2, 1)
        else:
            frame_seqlen = math.prod(grid_sizes[0][1:]).item()
            current_end = current_start + q.shape[1]
            total_sink_tokens = self.sink_size * frame_seqlen
            kv_cache_size = kv_cache["k"].shape[1]
            num_new_tokens = q.shape[1]

            evicted_k = None
            evicted_v = None
            num_evicted_tokens = 0
            if (
                self.local_attn_size != -1
                and (current_end > kv_cache["global_end_index"].item())
                and (num_new_tokens + kv_cache["local_end_index"].item() > kv_cache_size)
            ):
                num_evicted_tokens = num_new_tokens + kv_cache["local_end_index"].item() - kv_cache_size
                num_rolled_tokens = kv_cache["local_end_index"].item() - num_evicted_tokens - total_sink_tokens
                # Keep what falls out of the window: it is folded into the sink below.
                evicted_k = kv_cache["k"][:, total_sink_tokens : total_sink_tokens + num_evicted_tokens].clone()
                evicted_v = kv_cache["v"][:, total_sink_tokens : total_sink_tokens + num_evicted_tokens].clone()
                kv_cache["k"][:, total_sink_tokens : total_sink_tokens + num_rolled_tokens] = kv_cache["k"][
                    :, total_sink_tokens + num_evicted_tokens : total_sink_tokens + num_evicted_tokens + num_rolled_tokens
                ].clone()
                kv_cache["v"][:, total_sink_tokens : total_sink_tokens + num_rolled_tokens] = kv_cache["v"][
                    :, total_sink_tokens + num_evicted_tokens : total_sink_tokens + num_evicted_tokens + num_rolled_tokens
                ].clone()
                local_end_index = (
                    kv_cache["local_end_index"].item()
                    + current_end
                    - kv_cache["global_end_index"].item()
                    - num_evicted_tokens
                )
                local_start_index = local_end_index - num_new_tokens
                # Keys are cached un-roped: positions are assigned at attention time.
                kv_cache["k"][:, local_start_index:local_end_index] = k
                kv_cache["v"][:, local_start_index:local_end_index] = v
            else:
                local_end_index = kv_cache["local_end_index"].item() + current_end - kv_cache["global_end_index"].item()
                local_start_index = local_end_index - num_new_tokens
                kv_cache["k"][:, local_start_index:local_end_index] = k
                kv_cache["v"][:, local_start_index:local_end_index] = v

            if evicted_k is not None and num_evicted_tokens > 0:
                if num_evicted_tokens == total_sink_tokens:
                    sink_k, sink_v = self.incremental_update(
                        evicted_k,
                        evicted_v,
                        kv_cache["k"][:, :total_sink_tokens],
                        kv_cache["v"][:, :total_sink_tokens],
                    )
                    kv_cache["k"][:, :total_sink_tokens] = sink_k
                    kv_cache["v"][:, :total_sink_tokens] = sink_v
                else:
                    num_copy = min(num_evicted_tokens, total_sink_tokens)
                    kv_cache["k"][:, :num_copy] = evicted_k[:, :num_copy]
                    kv_cache["v"][:, :num_copy] = evicted_v[:, :num_copy]

            kv_start = max(total_sink_tokens, local_end_index - self.max_attention_size + total_sink_tokens)
            segment_k = kv_cache["k"][:, kv_start:local_end_index]
            segment_v = kv_cache["v"][:, kv_start:local_end_index]
            actual_length = local_end_index - kv_start

            if self.sink_size > 0:
                k_cat = torch.cat([kv_cache["k"][:, :total_sink_tokens], segment_k], dim=1)
                v_cat = torch.cat([kv_cache["v"][:, :total_sink_tokens], segment_v], dim=1)
                grid_sizes_kv = copy.deepcopy(grid_sizes)
                grid_sizes_kv[:, 0] = (total_sink_tokens + actual_length) // frame_seqlen
                query_start_frame = (total_sink_tokens + (local_end_index - kv_start) - num_new_tokens) // frame_seqlen
            else:
                k_cat = segment_k
                v_cat = segment_v
                grid_sizes_kv = copy.deepcopy(grid_sizes)
                grid_sizes_kv[:, 0] = actual_length // frame_seqlen
                query_start_frame = (local_end_index - self.max_attention_size - num_new_tokens) // frame_seqlen

            roped_query = causal_rope_apply(q, grid_sizes, freqs, start_frame=query_start_frame).type_as(v)
            roped_key = causal_rope_apply(k_cat, grid_sizes_kv, freqs, start_frame=0).type_as(v)
            x = attention(roped_query, roped_key, v_cat)

            kv_cache["global_end_index"].fill_(current_end)
            kv_cache["local_end_index"].fill_(local_end_index)

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
        # compression_alpha is not passed: always the default 0.999.
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
        block_mask = blockwise_causal_mask(device, num_frames, frame_seqlen, num_frame_per_block, local_attn_size)
        # Upstream prints the mask it builds.
        print(f" cache a block wise causal mask with block size of {num_frame_per_block} frames")
        print(block_mask)
        return block_mask

    @staticmethod
    def _prepare_teacher_forcing_mask(device, num_frames=21, frame_seqlen=1560, num_frame_per_block=1):
        block_mask = teacher_forcing_mask(device, num_frames, frame_seqlen, num_frame_per_block)
        print(f" cache a block wise causal mask with block size of {num_frame_per_block} frames")
        print(block_mask)
        return block_mask

    @staticmethod
    def _prepare_blockwise_causal_attn_mask_i2v(
        device, num_frames=21, frame_seqlen=1560, num_frame_per_block=4, local_attn_size=-1
    ):
        block_mask = blockwise_causal_mask_i2v(device, num_frames, frame_seqlen, num_frame_per_block, local_attn_size)
        print(f" cache a block wise causal mask with block size of {num_frame_per_block} frames")
        print(block_mask)
        return block_mask

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
                        "crossattn_cache": crossattn_cache[block_index],
                        "current_start": current_start,
                        "cache_start": cache_start,
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
                    }
                )
                x = block(x, **kwargs)

        x = self.head(x, e.unflatten(dim=0, sizes=t.shape).unsqueeze(2))
        x = self.unpatchify(x, grid_sizes)
        return torch.stack(x)

    def _forward_train(self, x, t, context, seq_len, clean_x=None, aug_t=None, clip_fea=None, y=None):
        """Blockwise-causal training forward over a whole clip (no caches).

        Teacher forcing (``clean_x``) is not reproduced: the stand-ins serve streaming inference.
        """
        if clean_x is not None or aug_t is not None:
            raise NotImplementedError("the RewardForcing stand-in does not reproduce teacher-forcing training")
        if self.model_type == "i2v":
            assert clip_fea is not None and y is not None
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)

        # The mask is built once, lazily, for the first clip's geometry.
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
        if kwargs.get("kv_cache", None) is not None:
            return self._forward_inference(*args, **kwargs)
        return self._forward_train(*args, **kwargs)

    def unpatchify(self, x, grid_sizes):
        return wan_unpatchify(self, x, grid_sizes)

    def init_weights(self):
        wan_init_weights(self)


PIPELINE = PipelineSpec(
    name="reward_forcing",
    module=sys.modules[__name__],
    config=PipelineConfig(
        base_model="1.3B",
        num_frame_per_block=3,
        local_attn_size=9,
        sink_size=3,
        steps=(1000, 750, 500, 250),
        model_kwargs={"sink_size": 3},
        sets_block_local_attn_size=True,
        timestep_shift=5.0,
        height=320,
        width=576,
    ),
    call_keywords=(
        "t",
        "context",
        "seq_len",
        "kv_cache",
        "crossattn_cache",
        "current_start",
        "cache_start",
    ),
)
