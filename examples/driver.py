"""Streaming driver: calls a causal Wan model the way the pipelines' generator does.

Per chunk: several denoising steps at the same ``current_start`` (``DenoiseBlock``), then
one cache-commit pass at timestep 0 without ``vace_context`` (``CleanKVCacheBlock``),
spec 8.3-8.4. Every call passes exactly the keyword set the generator's signature filter
lets through for the pipeline (``PipelineSpec.call_keywords``), plus ``vace_context`` and
``vace_context_scale`` when a VACE context is given. The record keeps every output and a
snapshot of every cache after every call, so two models can be compared call by call.

A pipeline whose chunk loop differs (Krea recomputes its KV cache before each chunk instead
of committing after it) describes the difference with optional attributes of its spec; the
driver looks them up by name and has no per-pipeline code:

* ``commits_cache`` (bool, default True): run the commit pass after the denoising steps.
* ``before_chunk(model, caches, *, chunk, frames, height, width, context, history, seq_len,
  call) -> int``: run the pipeline's stages before the chunk's denoising and return the start
  frame of its denoising calls (default ``chunk * frames``). ``history`` holds the previous
  chunks' final denoising outputs in model layout [B, C, F, H, W]. Every model call the hook
  makes goes through ``call(kind, x, **kwargs)`` (a :data:`ModelCall`), which runs the model
  without gradients and records the call (output and cache snapshot) under ``kind``.
* ``chunk_start_frame(current_start_frame) -> int``: the same start frame without running
  anything (used by :func:`example_call`, which has no history).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from examples.wan.pipeline import PipelineSpec, frame_seq_length

__all__ = [
    "CallRecord",
    "ModelCall",
    "StreamRecord",
    "call_diffs",
    "compare",
    "example_call",
    "run_stream",
    "snapshot_caches",
]

VaceContext = Union[torch.Tensor, Sequence[torch.Tensor], Callable[[int], Any], None]
# ``call(kind, x, **kwargs) -> output``: how a chunk hook makes (and the driver records) a model call.
ModelCall = Callable[..., torch.Tensor]

# Tiny-model geometry: 32x32 pixels -> 4x4 latents -> 2x2 tokens per frame.
DEFAULT_HEIGHT = 32
DEFAULT_WIDTH = 32


@dataclass
class CallRecord:
    """One model call: where it sat in the stream, its output and the caches after it."""

    chunk: int
    step: int  # denoising step index; -1 for every other pass
    kind: str  # "denoise", "commit", or a chunk hook's kind such as "recompute"
    current_start: int
    output: torch.Tensor
    caches: Optional[dict[str, Any]]


@dataclass
class StreamRecord:
    """Everything a streaming run produced, in call order."""

    pipeline: str
    frame_seq_length: int
    frames_per_chunk: int
    local_attn_size: int
    calls: list[CallRecord] = field(default_factory=list)
    caches: dict[str, Any] = field(default_factory=dict)  # the live caches after the last call

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [call.output for call in self.calls]


def snapshot_caches(caches: dict[str, Any]) -> dict[str, Any]:
    """Deep copy of cache lists/dicts with tensors detached and cloned (Python values copied)."""

    def copy_value(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy_value(v) for v in value)
        return copy.deepcopy(value)

    return {name: copy_value(value) for name, value in caches.items() if value is not None}


def _value_diff(a: Any, b: Any) -> float:
    """Max abs difference of two tensors / Python numbers; inf when they do not line up."""
    if isinstance(a, (dict, list, tuple)) or isinstance(b, (dict, list, tuple)):
        return _structure_diff(a, b)
    ta, tb = torch.as_tensor(a), torch.as_tensor(b)
    # Index entries may be tensor([n]) or a Python int (Krea replaces them); compare values.
    if ta.numel() != tb.numel() or (ta.dim() > 1 and ta.shape != tb.shape):
        return math.inf
    ta, tb = ta.reshape(-1), tb.reshape(-1)
    if ta.numel() == 0:
        return 0.0
    if torch.equal(ta, tb):
        return 0.0
    diff = (ta.double() - tb.double()).abs()
    return float(torch.nan_to_num(diff, nan=math.inf).max())


def _structure_diff(a: Any, b: Any) -> float:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return math.inf
        return max((_value_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return math.inf
        return max((_value_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return math.inf


def call_diffs(a: StreamRecord, b: StreamRecord) -> list[float]:
    """Per call: max abs difference over the output and every cache snapshot entry."""
    if len(a.calls) != len(b.calls):
        raise ValueError(f"records have {len(a.calls)} and {len(b.calls)} calls; run both with the same settings")
    diffs = []
    for ca, cb in zip(a.calls, b.calls):
        d = _value_diff(ca.output, cb.output)
        if ca.caches is not None or cb.caches is not None:
            d = max(d, _value_diff(ca.caches or {}, cb.caches or {}))
        diffs.append(d)
    return diffs


def compare(a: StreamRecord, b: StreamRecord) -> float:
    """Max abs difference between two runs over all outputs and cache snapshots (0.0 = exact)."""
    return max(call_diffs(a, b), default=0.0)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = model.patch_embedding.weight
    return weight.device, weight.dtype


def _randn(shape: Sequence[int], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Drawn on CPU so the values do not depend on the device; meta has no values to draw.
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _generator_kwargs(
    pipeline: PipelineSpec,
    caches: dict[str, Any],
    *,
    t: torch.Tensor,
    context: torch.Tensor,
    seq_len: int,
    current_start: int,
    current_end: int,
    update_bank: bool,
    q_bank: bool,
    update_cache: bool,
    kv_cache_attention_bias: float,
    vace_context: Any,
    vace_context_scale: float,
) -> dict[str, Any]:
    """The generator's keyword set (spec 8.3) filtered to what the base model accepts."""
    full = dict(
        t=t,
        context=context,
        seq_len=seq_len,
        kv_cache=caches.get("kv_cache"),
        crossattn_cache=caches.get("crossattn_cache"),
        kv_bank=caches.get("kv_bank"),
        update_bank=update_bank,
        q_bank=q_bank,
        update_cache=update_cache,
        is_recache=False,
        current_start=current_start,
        current_end=current_end,
        cache_start=None,
        kv_cache_attention_bias=kv_cache_attention_bias,
        sink_recache_after_switch=False,
    )
    kwargs = {name: full[name] for name in pipeline.call_keywords}
    if vace_context is not None:
        kwargs["vace_context"] = vace_context
        kwargs["vace_context_scale"] = vace_context_scale
    return kwargs


def _context(model: nn.Module, batch_size: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
    # Shorter than text_len so the model's zero padding of the prompt is exercised.
    tokens = max(1, model.text_len // 2)
    return _randn([batch_size, tokens, model.text_dim], generator, device, dtype)


def _chunk_start_frame(pipeline: PipelineSpec, chunk: int, frames: int) -> int:
    """The denoising start frame of ``chunk`` without running anything (``chunk_start_frame`` hook)."""
    hook = getattr(pipeline, "chunk_start_frame", None)
    return chunk * frames if hook is None else int(hook(chunk * frames))


def run_stream(
    model: nn.Module,
    pipeline: PipelineSpec,
    *,
    chunks: int = 3,
    frames_per_chunk: Optional[int] = None,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    steps: Optional[Sequence[int]] = None,
    seed: int = 0,
    vace_context: VaceContext = None,
    vace_context_scale: float = 1.0,
    local_attn_size: Optional[int] = None,
    caches: Optional[dict[str, Any]] = None,
    batch_size: int = 1,
    snapshot: bool = True,
) -> StreamRecord:
    """Run ``chunks`` streaming chunks through ``model`` as the pipeline would.

    ``height``/``width`` are pixel sizes (latents are /8, tokens /16). ``steps`` defaults
    to the pipeline's denoising list; ``frames_per_chunk`` to its ``num_frame_per_block``.
    ``vace_context`` is a tensor (or list) used for every chunk, or ``callable(chunk)``; it
    reaches the denoising calls only (commit and hook passes run without it, spec 8.4, 7).
    ``caches``: reuse these instead of fresh ones (the setup mutations still run).
    With ``snapshot=False`` cache snapshots are skipped (``CallRecord.caches`` is None).
    The spec's optional chunk hooks (module docstring) shape the loop; their model calls are
    recorded like the others.
    """
    cfg = pipeline.config
    frames = cfg.num_frame_per_block if frames_per_chunk is None else frames_per_chunk
    step_values = tuple(cfg.steps if steps is None else steps)
    las = cfg.local_attn_size if local_attn_size is None else local_attn_size
    device, dtype = _model_device_dtype(model)
    before_chunk = getattr(pipeline, "before_chunk", None)
    commits_cache = bool(getattr(pipeline, "commits_cache", True))

    if caches is None:
        caches = pipeline.setup(model, height, width, las, batch_size=batch_size)
    else:
        pipeline.configure(model, height, width, las)
    fs = frame_seq_length(height, width)
    seq_len = pipeline.generator_seq_len(height, width, las)

    generator = torch.Generator().manual_seed(seed)
    context = _context(model, batch_size, generator, device, dtype)
    latent_shape = [batch_size, model.in_dim, frames, height // 8, width // 8]
    record = StreamRecord(pipeline.name, fs, frames, las, caches=caches)
    history: list[torch.Tensor] = []  # each chunk's final denoising output, model layout

    def call(chunk: int, step: int, kind: str, start: int, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            output = model(x, **kwargs)
        record.calls.append(CallRecord(chunk, step, kind, start, output.detach().clone(),
                                       snapshot_caches(caches) if snapshot else None))
        return output

    for chunk in range(chunks):
        chunk_vace = vace_context(chunk) if callable(vace_context) else vace_context
        if before_chunk is None:
            start_frame = chunk * frames
        else:
            hook_call = functools.partial(_hook_call, call, chunk)
            start_frame = int(before_chunk(
                model, caches, chunk=chunk, frames=frames, height=height, width=width,
                context=context, history=tuple(history), seq_len=seq_len, call=hook_call,
            ))
        current_start = start_frame * fs
        current_end = (start_frame + frames) * fs

        denoised = None
        for step_index, step_value in enumerate(step_values):
            noisy = _randn(latent_shape, generator, device, dtype)
            t = torch.ones([batch_size, frames], dtype=torch.int64, device=device) * step_value
            kwargs = _generator_kwargs(
                pipeline, caches, t=t, context=context, seq_len=seq_len,
                current_start=current_start, current_end=current_end,
                update_bank=False, q_bank=(step_index == 0), update_cache=False,
                kv_cache_attention_bias=cfg.kv_cache_attention_bias,
                vace_context=chunk_vace, vace_context_scale=vace_context_scale,
            )
            denoised = call(chunk, step_index, "denoise", current_start, noisy, **kwargs)

        if commits_cache:
            # CleanKVCacheBlock: re-run the denoised latent at timestep 0 to commit the cache.
            clean = denoised if denoised is not None else _randn(latent_shape, generator, device, dtype)
            update_bank = cfg.record_interval is not None and start_frame % (3 * cfg.record_interval) == 0
            kwargs = _generator_kwargs(
                pipeline, caches, t=torch.zeros([batch_size, frames], device=device), context=context,
                seq_len=seq_len, current_start=current_start, current_end=current_end,
                update_bank=update_bank, q_bank=False, update_cache=True,
                kv_cache_attention_bias=1.0, vace_context=None, vace_context_scale=vace_context_scale,
            )
            call(chunk, -1, "commit", current_start, clean, **kwargs)
        if denoised is not None:
            history.append(denoised)
    return record


def _hook_call(call: Callable[..., torch.Tensor], chunk: int, kind: str, x: torch.Tensor,
               **kwargs: Any) -> torch.Tensor:
    """The :data:`ModelCall` handed to ``before_chunk``: a recorded pass of ``kind`` (step -1)."""
    if kind in ("denoise", "commit"):
        raise ValueError(f"a chunk hook's call kind must differ from the driver's own, got {kind!r}")
    return call(chunk, -1, kind, int(kwargs.get("current_start", 0)), x, **kwargs)


def example_call(
    model: nn.Module,
    pipeline: PipelineSpec,
    *,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    frames: Optional[int] = None,
    chunk_index: int = 0,
    step_value: Optional[int] = None,
    seed: int = 0,
    local_attn_size: Optional[int] = None,
    caches: Optional[dict[str, Any]] = None,
    vace_context: Any = None,
    vace_context_scale: float = 1.0,
    batch_size: int = 1,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for one first-step denoising call with caches, as the generator makes it.

    ``chunk_index`` places the call in the stream: ``current_start`` comes from the spec's
    ``chunk_start_frame`` hook when it has one (Krea), else ``chunk_index * frames``. No chunk
    hook runs here: pass ``caches`` from a stream to get the cache state that goes with it.
    Runs the pipeline's setup mutations on ``model``. Tensors follow the model's device and
    dtype; on ``meta`` the cache index tensors stay real CPU tensors.
    """
    cfg = pipeline.config
    frames = cfg.num_frame_per_block if frames is None else frames
    las = cfg.local_attn_size if local_attn_size is None else local_attn_size
    device, dtype = _model_device_dtype(model)
    if caches is None:
        caches = pipeline.setup(model, height, width, las, batch_size=batch_size)
    else:
        pipeline.configure(model, height, width, las)
    fs = frame_seq_length(height, width)
    generator = torch.Generator().manual_seed(seed)
    context = _context(model, batch_size, generator, device, dtype)
    x = _randn([batch_size, model.in_dim, frames, height // 8, width // 8], generator, device, dtype)
    step = cfg.steps[0] if step_value is None else step_value
    t = torch.ones([batch_size, frames], dtype=torch.int64, device=device) * step
    # Pipelines with a chunk hook (Krea) denoise at their own start frame, not chunk * frames.
    current_start = _chunk_start_frame(pipeline, chunk_index, frames) * fs
    kwargs = _generator_kwargs(
        pipeline, caches, t=t, context=context, seq_len=pipeline.generator_seq_len(height, width, las),
        current_start=current_start, current_end=current_start + frames * fs,
        update_bank=False, q_bank=True, update_cache=False,
        kv_cache_attention_bias=cfg.kv_cache_attention_bias,
        vace_context=vace_context, vace_context_scale=vace_context_scale,
    )
    return (x,), kwargs
