"""Blockwise causal ``BlockMask`` builders (spec 1.12) for the Krea, RewardForcing and MemFlow stand-ins.

Upstream each ``CausalWanModel`` carries these as static methods; the three stand-ins
here wrap these functions so the mask arithmetic exists once. Pipeline quirks (Krea's
``lru_cache``, RewardForcing's prints) stay in the pipeline modules.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .attention import BlockMask, create_block_mask

__all__ = ["blockwise_causal_mask", "blockwise_causal_mask_i2v", "teacher_forcing_mask"]


def _padded(total_length: int) -> int:
    return math.ceil(total_length / 128) * 128


def blockwise_causal_mask(
    device: Any,
    num_frames: int = 21,
    frame_seqlen: int = 1560,
    num_frame_per_block: int = 1,
    local_attn_size: int = -1,
) -> BlockMask:
    """Token j attends to every key before the end of its block of ``num_frame_per_block`` frames.

    With ``local_attn_size != -1`` only the last ``local_attn_size`` frames before that end
    count. Padding tokens (up to a multiple of 128) have end 0, so they only see themselves.
    """
    total_length = num_frames * frame_seqlen
    padded_length = _padded(total_length) - total_length
    ends = torch.zeros(total_length + padded_length, device=device, dtype=torch.long)

    frame_indices = torch.arange(start=0, end=total_length, step=frame_seqlen * num_frame_per_block, device=device)
    for tmp in frame_indices:
        ends[tmp : tmp + frame_seqlen * num_frame_per_block] = tmp + frame_seqlen * num_frame_per_block

    def attention_mask(b, h, q_idx, kv_idx):
        if local_attn_size == -1:
            return (kv_idx < ends[q_idx]) | (q_idx == kv_idx)
        return ((kv_idx < ends[q_idx]) & (kv_idx >= (ends[q_idx] - local_attn_size * frame_seqlen))) | (q_idx == kv_idx)

    return create_block_mask(
        attention_mask,
        B=None,
        H=None,
        Q_LEN=total_length + padded_length,
        KV_LEN=total_length + padded_length,
        _compile=False,
        device=device,
    )


def teacher_forcing_mask(
    device: Any, num_frames: int = 21, frame_seqlen: int = 1560, num_frame_per_block: int = 1
) -> BlockMask:
    """Training mask over [clean | noisy] halves: noisy block j sees clean blocks < j and itself."""
    total_length = num_frames * frame_seqlen * 2
    padded_length = _padded(total_length) - total_length
    clean_ends = num_frames * frame_seqlen
    context_ends = torch.zeros(total_length + padded_length, device=device, dtype=torch.long)
    noise_context_ends = torch.zeros(total_length + padded_length, device=device, dtype=torch.long)
    noise_noise_starts = torch.zeros(total_length + padded_length, device=device, dtype=torch.long)
    noise_noise_ends = torch.zeros(total_length + padded_length, device=device, dtype=torch.long)

    attention_block_size = frame_seqlen * num_frame_per_block
    frame_indices = torch.arange(start=0, end=num_frames * frame_seqlen, step=attention_block_size, device=device)
    for start in frame_indices:
        context_ends[start : start + attention_block_size] = start + attention_block_size
    noisy_image_start_list = torch.arange(num_frames * frame_seqlen, total_length, step=attention_block_size, device=device)
    noisy_image_end_list = noisy_image_start_list + attention_block_size
    for block_index, (start, end) in enumerate(zip(noisy_image_start_list, noisy_image_end_list)):
        noise_noise_starts[start:end] = start
        noise_noise_ends[start:end] = end
        noise_context_ends[start:end] = block_index * attention_block_size

    def attention_mask(b, h, q_idx, kv_idx):
        clean_mask = (q_idx < clean_ends) & (kv_idx < context_ends[q_idx])
        c1 = (kv_idx < noise_context_ends[q_idx]) & (q_idx >= clean_ends)
        c2 = (kv_idx < noise_noise_ends[q_idx]) & (kv_idx >= noise_noise_starts[q_idx])
        return clean_mask | c1 | c2 | (q_idx == kv_idx)

    return create_block_mask(
        attention_mask,
        B=None,
        H=None,
        Q_LEN=total_length + padded_length,
        KV_LEN=total_length + padded_length,
        _compile=False,
        device=device,
    )


def blockwise_causal_mask_i2v(
    device: Any,
    num_frames: int = 21,
    frame_seqlen: int = 1560,
    num_frame_per_block: int = 4,
    local_attn_size: int = -1,
) -> BlockMask:
    """As :func:`blockwise_causal_mask`, but the first frame is a block of its own (i2v training)."""
    total_length = num_frames * frame_seqlen
    padded_length = _padded(total_length) - total_length
    ends = torch.zeros(total_length + padded_length, device=device, dtype=torch.long)

    ends[:frame_seqlen] = frame_seqlen
    frame_indices = torch.arange(
        start=frame_seqlen, end=total_length, step=frame_seqlen * num_frame_per_block, device=device
    )
    for tmp in frame_indices:
        ends[tmp : tmp + frame_seqlen * num_frame_per_block] = tmp + frame_seqlen * num_frame_per_block

    def attention_mask(b, h, q_idx, kv_idx):
        if local_attn_size == -1:
            return (kv_idx < ends[q_idx]) | (q_idx == kv_idx)
        return ((kv_idx < ends[q_idx]) & (kv_idx >= (ends[q_idx] - local_attn_size * frame_seqlen))) | (q_idx == kv_idx)

    return create_block_mask(
        attention_mask,
        B=None,
        H=None,
        Q_LEN=total_length + padded_length,
        KV_LEN=total_length + padded_length,
        _compile=False,
        device=device,
    )
