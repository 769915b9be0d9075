"""MemFlow stand-in: ``memflow/modules/causal_model.py`` (spec section 6).

Cache semantics: as LongLive, self-attention writes only into clones and returns
``(x, (current_end, local_end, cache_update_info))``; the model applies every update in
one deferred pass, ``_apply_cache_updates``, and only when ``update_cache`` is True (the
generator's default False means denoising steps never commit). On top of that each block
has a memory bank ``kv_bank[i]``: the commit stages the first frame of the new keys in
``k_new``/``v_new`` (when ``update_bank``), and the bank pre-pass
``_apply_cache_updates_before`` (run before the blocks when ``q_bank``) moves the staged
frame into the bank, or, once the bank is full, keeps the text-relevant frames
(``compress_kv_bank``). Attention sees sink + bank + local window.
The upstream constructs listed for MemFlow in spec 11 are kept on purpose.
"""
from __future__ import annotations

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

WAN_CROSSATTENTION_CLASSES = make_cross_attention_classes("flash_attention")
WanT2VCrossAttention = WAN_CROSSATTENTION_CLASSES["t2v_cross_attn"]

__all__ = ["CausalWanAttentionBlock", "CausalWanModel", "CausalWanSelfAttention", "PIPELINE"]


def _max_local_attn_size(local_attn_size) -> int:
    """Largest window that is not -1, over an int or any iterable (e.g. a ListConfig)."""
    if isinstance(local_attn_size, int):
        values = [local_attn_size]
    else:
        values = list(local_attn_size)
    values = [int(v) for v in values if int(v) != -1]
    return max(values) if values else -1


class CausalWanSelfAttention(nn.Module):
    def __init__(
        self,
        dim,
        num_heads,
        local_attn_size=-1,
        sink_size=0,
        qk_norm=True,
        eps=1e-6,
        record_interval=3,
        SMA=False,
    ):
        assert dim % num_heads == 0
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.qk_norm = qk_norm
        self.eps = eps
        self.record_interval = record_interval
        self.SMA = SMA
        max_local = _max_local_attn_size(local_attn_size)
        self.max_attention_size = 32760 if max_local == -1 else max_local * 1560

        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def dynamic_topk_routing_attention(self, query, key, value, chunk_size, top_k):
        """SMA routing: keep the ``top_k`` key/value chunks most aligned with the mean query, per head.

        Returns the selected keys and values [B, k * chunk_size, n, d], chunks in their
        original order.
        """
        B, L_kv, n, d = key.shape
        assert L_kv % chunk_size == 0
        num_chunks = L_kv // chunk_size
        key_chunks = key.view(B, num_chunks, chunk_size, n, d)
        value_chunks = value.view(B, num_chunks, chunk_size, n, d)

        query_descriptor = query.mean(dim=1)  # [B, n, d]
        chunk_descriptors = key_chunks.mean(dim=2)  # [B, num_chunks, n, d]
        relevance = (chunk_descriptors * query_descriptor.unsqueeze(1)).sum(dim=-1)  # [B, num_chunks, n]

        k = min(top_k, num_chunks)
        top_indices = torch.topk(relevance, k, dim=1).indices
        top_indices, _ = torch.sort(top_indices, dim=1)
        gather_index = top_indices[:, :, None, :, None].expand(B, k, chunk_size, n, d)
        selected_k = torch.gather(key_chunks, 1, gather_index).reshape(B, k * chunk_size, n, d)
        selected_v = torch.gather(value_chunks, 1, gather_index).reshape(B, k * chunk_size, n, d)
        return selected_k, selected_v

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
        kv_bank=None,
        update_bank=None,
        is_recache=None,
    ):
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
            # Teacher-forcing layout (clean + noisy halves) only occurs in training.
            is_tf = s == seq_lens[0].item() * 2
            if is_tf:
                q_chunk = torch.chunk(q, 2, dim=1)
                k_chunk = torch.chunk(k, 2, dim=1)
                roped_query = []
                roped_key = []
                for ii in range(2):
                    rq = rope_apply(q_chunk[ii], grid_sizes, freqs).type_as(v)
                    rk = rope_apply(k_chunk[ii], grid_sizes, freqs).type_as(v)
                    roped_query.append(rq)
                    roped_key.append(rk)
                roped_query = torch.cat(roped_query, dim=1)
                roped_key = torch.cat(roped_key, dim=1)
            else:
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
            current_start_frame = current_start // frame_seqlen
            roped_query = causal_rope_apply(q, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)
            roped_key = causal_rope_apply(k, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)

            current_end = current_start + roped_query.shape[1]
            # One bank slot per record_interval blocks of 3 frames (the 3 is hard-coded upstream).
            current_end_bank = ((current_end // (frame_seqlen * 3) - 1) // self.record_interval + 1) * frame_seqlen
            sink_tokens = self.sink_size * frame_seqlen
            kv_cache_size = kv_cache["k"].shape[1]
            kv_bank_size = kv_bank["k"].shape[1]
            num_new_tokens = roped_query.shape[1]
            global_end_index = kv_cache["global_end_index"].item()
            local_end_index_prev = kv_cache["local_end_index"].item()
            is_recompute = current_end <= global_end_index and current_start > 0

            if (
                self.local_attn_size != -1
                and (current_end > global_end_index)
                and (num_new_tokens + local_end_index_prev > kv_cache_size)
            ):
                num_evicted_tokens = num_new_tokens + local_end_index_prev - kv_cache_size
                num_rolled_tokens = local_end_index_prev - num_evicted_tokens - sink_tokens
                local_end_index = local_end_index_prev + current_end - global_end_index - num_evicted_tokens
                local_start_index = local_end_index - num_new_tokens

                temp_k = kv_cache["k"].clone()
                temp_v = kv_cache["v"].clone()
                temp_k[:, sink_tokens : sink_tokens + num_rolled_tokens] = temp_k[
                    :, sink_tokens + num_evicted_tokens : sink_tokens + num_evicted_tokens + num_rolled_tokens
                ].clone()
                temp_v[:, sink_tokens : sink_tokens + num_rolled_tokens] = temp_v[
                    :, sink_tokens + num_evicted_tokens : sink_tokens + num_evicted_tokens + num_rolled_tokens
                ].clone()

                write_start_index = max(local_start_index, sink_tokens) if is_recompute else local_start_index
                roped_offset = max(0, write_start_index - local_start_index)
                write_len = max(0, local_end_index - write_start_index)
                if write_len > 0:
                    temp_k[:, write_start_index:local_end_index] = roped_key[:, roped_offset : roped_offset + write_len]
                    temp_v[:, write_start_index:local_end_index] = v[:, roped_offset : roped_offset + write_len]

                local_end_index_bank = (
                    kv_bank["local_end_index"].item() + current_end_bank - kv_bank["global_end_index"].item()
                )
                local_start_index_bank = local_end_index_bank - num_new_tokens // 3
                write_start_index_bank = local_start_index_bank
                bank_k = kv_bank["k"].clone()
                bank_v = kv_bank["v"].clone()

                cache_update_info = {
                    "action": "roll_and_insert",
                    "sink_tokens": sink_tokens,
                    "num_rolled_tokens": num_rolled_tokens,
                    "num_evicted_tokens": num_evicted_tokens,
                    "local_start_index": local_start_index,
                    "local_end_index": local_end_index,
                    "write_start_index": write_start_index,
                    "write_end_index": local_end_index,
                    "new_k": roped_key[:, roped_offset : roped_offset + write_len],
                    "new_v": v[:, roped_offset : roped_offset + write_len],
                    "current_end": current_end,
                    "is_recompute": is_recompute,
                    "local_start_index_bank": local_start_index_bank,
                    "local_end_index_bank": local_end_index_bank,
                    "write_start_index_bank": write_start_index_bank,
                    "write_end_index_bank": local_end_index_bank,
                    "current_end_bank": current_end_bank,
                    "frame_seqlen": frame_seqlen,
                }
            else:
                local_end_index = local_end_index_prev + current_end - global_end_index
                local_start_index = local_end_index - num_new_tokens

                temp_k = kv_cache["k"].clone()
                temp_v = kv_cache["v"].clone()

                write_start_index = max(local_start_index, sink_tokens) if is_recompute else local_start_index
                roped_offset = max(0, write_start_index - local_start_index)
                write_len = max(0, local_end_index - write_start_index)
                if write_len > 0:
                    temp_k[:, write_start_index:local_end_index] = roped_key[:, roped_offset : roped_offset + write_len]
                    temp_v[:, write_start_index:local_end_index] = v[:, roped_offset : roped_offset + write_len]

                local_end_index_bank = (
                    kv_bank["local_end_index"].item() + current_end_bank - kv_bank["global_end_index"].item()
                )
                local_start_index_bank = local_end_index_bank - num_new_tokens // 3
                write_start_index_bank = local_start_index_bank
                bank_k = kv_bank["k"].clone()
                bank_v = kv_bank["v"].clone()

                cache_update_info = {
                    "action": "direct_insert",
                    "local_start_index": local_start_index,
                    "local_end_index": local_end_index,
                    "write_start_index": write_start_index,
                    "write_end_index": local_end_index,
                    "new_k": roped_key[:, roped_offset : roped_offset + write_len],
                    "new_v": v[:, roped_offset : roped_offset + write_len],
                    "current_end": current_end,
                    "is_recompute": is_recompute,
                    "local_start_index_bank": local_start_index_bank,
                    "local_end_index_bank": local_end_index_bank,
                    "write_start_index_bank": write_start_index_bank,
                    "write_end_index_bank": local_end_index_bank,
                    "current_end_bank": current_end_bank,
                    "frame_seqlen": frame_seqlen,
                }

            if sink_tokens > 0:
                local_budget = self.max_attention_size - sink_tokens
                k_sink = temp_k[:, :sink_tokens]
                v_sink = temp_v[:, :sink_tokens]
                if local_budget > 0:
                    local_start_for_window = max(sink_tokens, local_end_index - local_budget)
                    k_local = temp_k[:, local_start_for_window:local_end_index]
                    v_local = temp_v[:, local_start_for_window:local_end_index]

                    # A chunk that will record into the bank must not attend its own (unstaged) slot.
                    is_update_bank = (current_start // (3 * frame_seqlen)) % self.record_interval == 0
                    if is_recache:
                        is_update_bank = False
                    if is_update_bank:
                        bank_len = min(local_start_index_bank, kv_bank_size)
                    else:
                        bank_len = min(local_end_index_bank, kv_bank_size)
                    bank_has_data = kv_bank["global_end_index"].item() > 0
                    if bank_has_data:
                        k_bank = bank_k[:, :bank_len]
                        v_bank = bank_v[:, :bank_len]
                    else:
                        k_bank = bank_k[:, :0]
                        v_bank = bank_v[:, :0]

                    if self.SMA and bank_has_data:
                        k_mem, v_mem = self.dynamic_topk_routing_attention(
                            query=roped_query,
                            key=torch.cat([k_sink, k_bank], dim=1),
                            value=torch.cat([v_sink, v_bank], dim=1),
                            chunk_size=frame_seqlen,
                            top_k=3,
                        )
                        k_cat = torch.cat([k_mem, k_local], dim=1)
                        v_cat = torch.cat([v_mem, v_local], dim=1)
                    else:
                        k_cat = torch.cat([k_sink, k_bank, k_local], dim=1)
                        v_cat = torch.cat([v_sink, v_bank, v_local], dim=1)
                else:
                    k_cat = k_sink
                    v_cat = v_sink
            else:
                window_start = max(0, local_end_index - self.max_attention_size)
                k_cat = temp_k[:, window_start:local_end_index]
                v_cat = temp_v[:, window_start:local_end_index]

            x = attention(roped_query, k_cat, v_cat)

        x = x.flatten(2)
        x = self.o(x)

        if kv_cache is not None:
            return x, (current_end, local_end_index, cache_update_info)
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
        bank_size=3,
        qk_norm=True,
        cross_attn_norm=False,
        eps=1e-6,
        record_interval=3,
        SMA=False,
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
        self.self_attn = CausalWanSelfAttention(
            dim, num_heads, local_attn_size, sink_size, qk_norm, eps, record_interval, SMA
        )
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
        kv_bank=None,
        update_bank=None,
        q_bank=None,
        is_recache=None,
    ):
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)

        self_attn_result = self.self_attn(
            (self.norm1(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[1]) + e[0]).flatten(1, 2),
            seq_lens,
            grid_sizes,
            freqs,
            block_mask,
            kv_cache,
            current_start,
            cache_start,
            kv_bank,
            update_bank,
            is_recache,
        )
        if kv_cache is not None:
            y, cache_update_info = self_attn_result
        else:
            y = self_attn_result
            cache_update_info = None

        x = x + (y.unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * e[2]).flatten(1, 2)

        def cross_attn_ffn(x, context, context_lens, e, crossattn_cache=None):
            x = x + self.cross_attn(self.norm3(x), context, context_lens, crossattn_cache=crossattn_cache)
            y = self.ffn(
                (self.norm2(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[4]) + e[3]).flatten(1, 2)
            )
            x = x + (y.unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * e[5]).flatten(1, 2)
            return x

        x = cross_attn_ffn(x, context, context_lens, e, crossattn_cache)

        if cache_update_info is not None:
            return x, cache_update_info
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
        bank_size=3,
        record_interval=3,
        SMA=False,
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
        self.bank_size = bank_size

        cross_attn_type = "t2v_cross_attn" if model_type == "t2v" else "i2v_cross_attn"
        build_wan_trunk(
            self,
            lambda kind: CausalWanAttentionBlock(
                kind,
                dim,
                ffn_dim,
                num_heads,
                local_attn_size,
                sink_size,
                bank_size,
                qk_norm,
                cross_attn_norm,
                eps,
                record_interval,
                SMA,
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
        return blockwise_causal_mask(device, num_frames, frame_seqlen, num_frame_per_block, local_attn_size)

    @staticmethod
    def _prepare_teacher_forcing_mask(device, num_frames=21, frame_seqlen=1560, num_frame_per_block=1):
        return teacher_forcing_mask(device, num_frames, frame_seqlen, num_frame_per_block)

    @staticmethod
    def _prepare_blockwise_causal_attn_mask_i2v(
        device, num_frames=21, frame_seqlen=1560, num_frame_per_block=4, local_attn_size=-1
    ):
        return blockwise_causal_mask_i2v(device, num_frames, frame_seqlen, num_frame_per_block, local_attn_size)

    def compress_kv_bank(
        self,
        kv_cache,
        new_k,
        new_v,
        crossattn_cache,
        tokens_per_block=1560,
        memory_budget_in_blocks=3,
        num_prototypes_in_blocks=1,
    ):
        """Keep the bank frames the prompt attends to most, then append the new frame(s).

        Each historical block of ``tokens_per_block`` tokens is scored by the mean scaled dot
        product between the cached text keys (used as queries) and the block's keys.
        """
        hist_k = kv_cache["k"]
        hist_v = kv_cache["v"]
        B, L_hist, H, D = hist_k.shape
        L_new = new_k.shape[1]
        if L_hist % tokens_per_block != 0:
            raise ValueError(f"bank length {L_hist} is not a multiple of tokens_per_block {tokens_per_block}")
        if L_new % tokens_per_block != 0:
            raise ValueError(f"new length {L_new} is not a multiple of tokens_per_block {tokens_per_block}")
        num_hist_blocks = L_hist // tokens_per_block
        num_new_blocks = L_new // tokens_per_block

        text_q = crossattn_cache["k"]
        L_text = text_q.shape[1]
        q = text_q.permute(0, 2, 1, 3).reshape(B * H, L_text, D)
        k = hist_k.permute(0, 2, 1, 3).reshape(B * H, L_hist, D)
        scores = torch.bmm(q, k.transpose(1, 2)) * (D**-0.5)  # [B*H, L_text, L_hist]
        scores = scores.view(B, H, L_text, num_hist_blocks, tokens_per_block)
        block_scores = scores.mean(dim=(1, 2, 4))  # [B, num_hist_blocks]

        num_keep = min(memory_budget_in_blocks - num_new_blocks, num_hist_blocks)
        keep_indices = torch.topk(block_scores, num_keep, dim=-1).indices  # score order, not sorted
        gather_index = keep_indices[:, :, None, None, None].expand(B, num_keep, tokens_per_block, H, D)
        kept_k = torch.gather(hist_k.view(B, num_hist_blocks, tokens_per_block, H, D), 1, gather_index)
        kept_v = torch.gather(hist_v.view(B, num_hist_blocks, tokens_per_block, H, D), 1, gather_index)
        kept_k = kept_k.reshape(B, num_keep * tokens_per_block, H, D)
        kept_v = kept_v.reshape(B, num_keep * tokens_per_block, H, D)
        return {"k": torch.cat([kept_k, new_k], dim=1), "v": torch.cat([kept_v, new_v], dim=1)}

    def _apply_cache_updates_before(self, kv_bank, crossattn_cache, frame_seqlen):
        """Bank pre-pass: move each block's staged frame into its bank (compressing when full)."""
        for block_index in range(len(kv_bank)):
            bank = kv_bank[block_index]
            local_end_index = bank["local_end_index"]
            if local_end_index >= frame_seqlen:
                local_start_index = local_end_index - frame_seqlen
                new_k = bank["k_new"].clone()
                new_v = bank["v_new"].clone()
                with torch.no_grad():
                    if local_end_index <= bank["k"].shape[1]:
                        bank["k"][:, local_start_index:local_end_index] = new_k
                        bank["v"][:, local_start_index:local_end_index] = new_v
                    else:
                        compressed = self.compress_kv_bank(
                            kv_cache=bank,
                            new_k=new_k,
                            new_v=new_v,
                            crossattn_cache=crossattn_cache[block_index],
                            tokens_per_block=frame_seqlen,
                            memory_budget_in_blocks=self.bank_size,
                            num_prototypes_in_blocks=1,
                        )
                        bank["k"][:, :] = compressed["k"]
                        bank["v"][:, :] = compressed["v"]

    def _apply_cache_updates(self, kv_cache, cache_update_infos, kv_bank=None, update_bank=True, **kwargs):
        for block_index, (current_end, local_end_index, update_info) in cache_update_infos:
            if update_info is not None:
                cache = kv_cache[block_index]
                bank = kv_bank[block_index] if kv_bank is not None else None
                if update_info["action"] == "roll_and_insert":
                    sink_tokens = update_info["sink_tokens"]
                    num_rolled_tokens = update_info["num_rolled_tokens"]
                    num_evicted_tokens = update_info["num_evicted_tokens"]
                    local_start_index = update_info["local_start_index"]
                    local_end_index = update_info["local_end_index"]
                    write_start_index = update_info.get("write_start_index", local_start_index)
                    write_end_index = update_info.get("write_end_index", local_end_index)
                    new_k = update_info["new_k"]
                    new_v = update_info["new_v"]

                    cache["k"][:, sink_tokens : sink_tokens + num_rolled_tokens] = cache["k"][
                        :, sink_tokens + num_evicted_tokens : sink_tokens + num_evicted_tokens + num_rolled_tokens
                    ].clone()
                    cache["v"][:, sink_tokens : sink_tokens + num_rolled_tokens] = cache["v"][
                        :, sink_tokens + num_evicted_tokens : sink_tokens + num_evicted_tokens + num_rolled_tokens
                    ].clone()
                    if write_end_index > write_start_index and new_k.shape[1] == (write_end_index - write_start_index):
                        cache["k"][:, write_start_index:write_end_index] = new_k
                        cache["v"][:, write_start_index:write_end_index] = new_v
                        if update_bank:
                            # Stage the first new frame; the next q_bank pre-pass moves it into the bank.
                            frame_seqlen = update_info["frame_seqlen"]
                            bank["k_new"][:, :] = new_k[:, :frame_seqlen]
                            bank["v_new"][:, :] = new_v[:, :frame_seqlen]

                elif update_info["action"] == "direct_insert":
                    local_start_index = update_info["local_start_index"]
                    local_end_index = update_info["local_end_index"]
                    write_start_index = update_info.get("write_start_index", local_start_index)
                    write_end_index = update_info.get("write_end_index", local_end_index)
                    new_k = update_info["new_k"]
                    new_v = update_info["new_v"]
                    if write_end_index > write_start_index and new_k.shape[1] == (write_end_index - write_start_index):
                        cache["k"][:, write_start_index:write_end_index] = new_k
                        cache["v"][:, write_start_index:write_end_index] = new_v
                        if update_bank:
                            frame_seqlen = update_info["frame_seqlen"]
                            bank["k_new"][:, :] = new_k[:, :frame_seqlen]
                            bank["v_new"][:, :] = new_v[:, :frame_seqlen]

                if not update_info.get("is_recompute", False):
                    kv_cache[block_index]["global_end_index"].fill_(current_end)
                    kv_cache[block_index]["local_end_index"].fill_(local_end_index)
                if update_bank:
                    kv_bank[block_index]["global_end_index"].fill_(update_info["current_end_bank"])
                    kv_bank[block_index]["local_end_index"].fill_(update_info["local_end_index_bank"])

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
        kv_bank=None,
        update_bank=True,
        q_bank=False,
        update_cache=True,
        is_recache=False,
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
            is_recache=is_recache,
            update_bank=update_bank,
        )

        # The bank pre-pass runs before any block, on the first denoising step of a chunk.
        if kv_bank is not None and q_bank:
            frame_seqlen = math.prod(grid_sizes[0][1:]).item()
            self._apply_cache_updates_before(kv_bank, crossattn_cache, frame_seqlen)

        def create_custom_forward(module):
            def custom_forward(*inputs, **kwargs):
                return module(*inputs, **kwargs)

            return custom_forward

        cache_update_infos = []
        for block_index, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                kwargs.update(
                    {
                        "kv_cache": kv_cache[block_index],
                        "kv_bank": kv_bank[block_index],
                        "current_start": current_start,
                        "cache_start": cache_start,
                    }
                )
                result = torch.utils.checkpoint.checkpoint(
                    create_custom_forward(block), x, **kwargs, use_reentrant=False
                )
            else:
                kwargs.update(
                    {
                        "kv_cache": kv_cache[block_index],
                        "kv_bank": kv_bank[block_index],
                        "crossattn_cache": crossattn_cache[block_index],
                        "current_start": current_start,
                        "cache_start": cache_start,
                        "q_bank": q_bank,
                    }
                )
                result = block(x, **kwargs)
            if kv_cache is not None and isinstance(result, tuple):
                x, block_cache_update_info = result
                cache_update_infos.append((block_index, block_cache_update_info))
            else:
                x = result

        # Denoising calls pass update_cache=False: only the commit pass mutates the caches.
        if kv_cache is not None and cache_update_infos and update_cache:
            self._apply_cache_updates(kv_cache, cache_update_infos, kv_bank, update_bank=update_bank)

        x = self.head(x, e.unflatten(dim=0, sizes=t.shape).unsqueeze(2))
        x = self.unpatchify(x, grid_sizes)
        return torch.stack(x)

    def _forward_train(self, x, t, context, seq_len, clean_x=None, aug_t=None, clip_fea=None, y=None):
        # Upstream raises here; the training code after it is dead.
        raise NotImplementedError()

    def forward(self, *args, **kwargs):
        if kwargs.get("kv_cache", None) is not None:
            return self._forward_inference(*args, **kwargs)
        return self._forward_train(*args, **kwargs)

    def unpatchify(self, x, grid_sizes):
        return wan_unpatchify(self, x, grid_sizes)

    def init_weights(self):
        wan_init_weights(self)


PIPELINE = PipelineSpec(
    name="memflow",
    module=sys.modules[__name__],
    config=PipelineConfig(
        base_model="1.3B",
        num_frame_per_block=3,
        local_attn_size=12,
        sink_size=3,
        steps=(1000, 750, 500, 250),
        model_kwargs={"sink_size": 3, "bank_size": 3, "record_interval": 3},
        sets_block_local_attn_size=True,
        timestep_shift=5.0,
        height=320,
        width=576,
        bank_size=3,
        record_interval=3,
        builtin_lora=True,
    ),
    call_keywords=(
        "t",
        "context",
        "seq_len",
        "kv_cache",
        "crossattn_cache",
        "current_start",
        "cache_start",
        "kv_bank",
        "update_bank",
        "q_bank",
        "update_cache",
        "is_recache",
    ),
)
