"""The built-in stand-ins as benchmark subjects (the default ``--provider`` of ``benchmarks/bench.py``).

The harness measures; this module knows the models: how a pipeline builds its base
model, the generator's call convention (``examples.driver``), the hand-written reference
(``examples.reference.CausalVaceWanModel``), the lean hand-written VACE
(:mod:`benchmarks.lean_vace`) and what a streaming chunk is.

Geometry: ``tokens`` is the token count of one streaming chunk, ``frames`` latent frames of
``(height/16) x (width/16)`` tokens each, with the aspect ratio kept near the pipelines'
320x576. Defaults: the pipeline's real chunk (3 frames at 320x576 = 2160 tokens) on CUDA
and meta; 3 frames at 64x128 (96 tokens) on CPU, where a 1.3B forward is slow.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from benchmarks.lean_vace import attach_lean_vace
from benchmarks.subject import BenchSubject
from examples import PIPELINES
from examples.driver import example_call, run_stream
from examples.reference import VACE_PREFIXES, CausalVaceWanModel, native_state_dict, random_vace_state_dict
from examples.wan.pipeline import PipelineSpec, frame_seq_length
from rules import vace
from surgery.errors import InputError

__all__ = ["CPU_TOKENS_PER_FRAME", "WanForward", "bench_subject", "fill_random", "geometry_for_tokens"]

#: Tokens per latent frame of the default CPU chunk (64x128 pixels).
CPU_TOKENS_PER_FRAME = 32
#: Aspect ratio (width / height, in tokens) of the pipelines' 320x576 video.
ASPECT = 36 / 20


def geometry_for_tokens(tokens: int, frames: int) -> tuple[int, int]:
    """Pixel ``(height, width)`` whose chunk of ``frames`` latent frames has ``tokens`` tokens."""
    if tokens % frames:
        raise InputError(f"--tokens {tokens} is not a multiple of the {frames} latent frames per chunk",
                         f"pass a multiple of {frames}, e.g. {frames * CPU_TOKENS_PER_FRAME}")
    per_frame = tokens // frames
    rows = min((a for a in range(1, per_frame + 1) if per_frame % a == 0 and a <= per_frame // a),
               key=lambda a: abs(math.log((per_frame // a) / a / ASPECT)))
    return 16 * rows, 16 * (per_frame // rows)


def fill_random(model: nn.Module, seed: int) -> nn.Module:
    """Seeded values of order one, in place: fast at any size (no ``reset_parameters``).

    Matrices ~ N(0, 1/fan_in), norm weights 1, other vectors ~ N(0, 0.02^2). Each tensor
    depends on ``(seed, name)`` only.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta":
                continue
            gen = torch.Generator(device=param.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(math.prod(param.shape[1:])), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model


@dataclass
class WanForward:
    """Forward runs of a causal Wan stand-in: chunks of denoising calls as the generator makes them."""

    pipeline: PipelineSpec
    size: str
    device: torch.device
    dtype: torch.dtype
    seed: int
    height: int
    width: int
    alt_height: int
    alt_width: int
    steps: tuple[int, ...]
    init: str

    def build_base(self) -> nn.Module:
        if self.init == "random":
            model = self.pipeline.build(self.size, self.seed, self.device, self.dtype, "random")
        else:
            model = fill_random(self.pipeline.build(self.size, self.seed, self.device, self.dtype, "zeros"), self.seed)
        if self.device.type != "cpu":
            model.freqs = model.freqs.to(self.device)  # as build_base in bench_subject
        return model

    def share_weights(self, rewritten: nn.Module, reference: nn.Module,
                      lean: Optional[nn.Module] = None) -> dict[str, Any]:
        """Seeded random VACE weights into the reference; the rewritten model (and ``lean``) use the same tensors.

        Values come one tensor at a time from ``random_vace_state_dict`` (each depends on
        seed, key and shape only), so no full second copy is ever held.
        """
        ref = {k: v for k, v in native_state_dict(reference).items() if k.startswith(VACE_PREFIXES)}
        ours = {k: v for k, v in rewritten.state_dict().items() if k.startswith(VACE_PREFIXES)}
        if set(ref) != set(ours) or any(ref[k].shape != ours[k].shape for k in ref):
            missing = sorted(set(ref) ^ set(ours))[:3]
            raise InputError(f"rewritten and reference VACE keys differ (e.g. {missing})",
                             "use the same vace_in_dim and vace_layers on both sides")
        with torch.no_grad():
            for key in sorted(ref):
                value = random_vace_state_dict({key: tuple(ref[key].shape)}, seed=self.seed + 1, dtype=self.dtype)[key]
                ref[key].copy_(value)
        for model in (rewritten, lean) if lean is not None else (rewritten,):
            model.load_state_dict(ref, strict=False, assign=True)
            if not all(model.get_parameter(k).data_ptr() == ref[k].data_ptr() for k in ref):
                raise InputError("a measured model did not take the reference's VACE tensors", "check the key names")
        return {"seed": self.seed + 1, "tensors": len(ref), "bytes": sum(v.numel() * v.element_size() for v in ref.values()),
                "storage": "shared (every side reads the very same VACE tensors)"}

    def _vace_context(self, height: int, width: int, frames: int, in_dim: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 2)
        ctx = torch.randn([1, in_dim, frames, height // 8, width // 8], generator=gen)
        return ctx.to(device=self.device, dtype=self.dtype)

    def runner(self, model: nn.Module, *, vace: bool, alternate: bool = False, prefill: bool = True,
               calls: Optional[int] = None) -> list[Callable[[], torch.Tensor]]:
        """Caches, a prefill chunk (chunk 0: denoising + commit), then chunk 1's denoising calls.

        Denoising calls at one ``current_start`` rewrite the same cache rows, so the chunk
        can be run again and again; each call is its own function (see ``ForwardSuite``).
        """
        pipeline = self.pipeline
        height, width = (self.alt_height, self.alt_width) if alternate else (self.height, self.width)
        frames = pipeline.config.num_frame_per_block
        ctx = self._vace_context(height, width, frames, pipeline.config.vace_in_dim) if vace else None
        caches = pipeline.setup(model, height, width)
        steps = self.steps[:calls] if calls is not None else self.steps
        if prefill:
            run_stream(model, pipeline, chunks=1, height=height, width=width, steps=steps, seed=self.seed,
                       vace_context=ctx, caches=caches, snapshot=False)
        chunk = 1 if prefill else 0
        prepared = []
        for index, step in enumerate(steps):
            args, kwargs = example_call(model, pipeline, height=height, width=width, chunk_index=chunk,
                                        step_value=step, seed=self.seed + 10 + index, caches=caches, vace_context=ctx)
            if index > 0 and "q_bank" in kwargs:
                kwargs["q_bank"] = False  # only the first step of a chunk reads the bank (spec 8.3)
            prepared.append((args, kwargs))

        def make_call(args: tuple, kwargs: dict) -> Callable[[], torch.Tensor]:
            def call() -> torch.Tensor:
                with torch.no_grad():
                    return model(*args, **kwargs)

            return call

        return [make_call(args, kwargs) for args, kwargs in prepared]


def _rule_options(pipeline: PipelineSpec, size: str) -> dict[str, Any]:
    # The pipeline's VACE layout describes its real checkpoint; other sizes use the defaults.
    cfg = pipeline.config
    return {"vace_in_dim": cfg.vace_in_dim, "vace_layers": cfg.vace_layers if size == cfg.base_model else None}


def bench_subject(model: str, *, size: str, device: torch.device, dtype: torch.dtype, tokens: Optional[int] = None,
                  steps: Optional[int] = None, seed: int = 0) -> BenchSubject:
    """The benchmark subject for built-in model ``model`` (a key of ``examples.PIPELINES``)."""
    if model not in PIPELINES:
        raise InputError(f"unknown model {model!r}", f"use one of {', '.join(PIPELINES)}")
    pipeline = PIPELINES[model]
    device = torch.device(device)
    cfg = pipeline.config
    frames = cfg.num_frame_per_block
    if tokens is None:
        tokens = frames * (CPU_TOKENS_PER_FRAME if device.type == "cpu" else frame_seq_length(cfg.height, cfg.width))
    height, width = geometry_for_tokens(tokens, frames)
    alt_height, alt_width = height, width + 32  # two more token columns: a new input signature
    all_steps = tuple(cfg.steps)
    count = len(all_steps) if steps is None else steps
    if count < 1:
        raise InputError(f"--steps {count} is not positive", "pass --steps 1 or more")
    step_values = tuple(all_steps[i % len(all_steps)] for i in range(count))
    init = "meta" if device.type == "meta" else ("random" if size == "tiny" else "zeros")
    options = _rule_options(pipeline, size)

    def rule() -> Any:
        return vace.rule(**options)

    def build_base() -> nn.Module:
        model = pipeline.build(size, seed, device, dtype, init)
        if device.type not in ("cpu", "meta"):
            # The first call would move freqs (a plain attribute, which .to() leaves on CPU);
            # doing it here keeps that one-time move out of every measured model.
            model.freqs = model.freqs.to(device)
        if device.type == "meta":
            # The meta build keeps freqs on CPU (the generator's hack); on meta too, calls of
            # the rewritten model can run shape-only (re-specialisation timing).
            model.freqs = model.freqs.to("meta")
        return model

    def example_inputs(base: nn.Module) -> tuple[tuple, dict]:
        args, kwargs = example_call(base, pipeline, height=height, width=width, seed=seed)
        return tuple(args), dict(kwargs)

    def call_inputs(model: nn.Module, alternate: bool) -> tuple[tuple, dict]:
        h, w = (alt_height, alt_width) if alternate else (height, width)
        ctx = torch.randn([1, options["vace_in_dim"], frames, h // 8, w // 8], generator=torch.Generator().manual_seed(seed))
        args, kwargs = example_call(model, pipeline, height=h, width=w, seed=seed,
                                    vace_context=ctx.to(device=device, dtype=dtype))
        return tuple(args), dict(kwargs)

    def build_reference(base: nn.Module) -> nn.Module:
        return CausalVaceWanModel(base, options["vace_in_dim"], options["vace_layers"])

    def build_lean(base: nn.Module, eager_branch: bool) -> nn.Module:
        attach_lean_vace(base, options["vace_in_dim"], options["vace_layers"], eager_branch=eager_branch)
        return base

    def warmup() -> None:
        # The same code paths on a tiny model: imports, lazy initialisation, CUDA context.
        import surgery

        small_device = "cpu" if device.type == "meta" else device
        small = pipeline.build("tiny", seed, small_device, dtype, "random")
        surgery.apply(small, vace.rule(vace_in_dim=options["vace_in_dim"]),
                      example_inputs=example_call(small, pipeline, seed=seed))
        CausalVaceWanModel(pipeline.build("tiny", seed, small_device, dtype, "random"), options["vace_in_dim"])

    shape_model = pipeline.build(size, seed, "meta", dtype, "meta")
    base_bytes = sum(p.numel() * p.element_size() for p in shape_model.parameters())
    real = device.type != "meta"
    forward = WanForward(pipeline, size, device, dtype, seed, height, width, alt_height, alt_width, step_values,
                         "random" if size == "tiny" else "zeros+fill") if real else None
    return BenchSubject(
        name=model, size=size, device=device, dtype=dtype, rule=rule, build_base=build_base,
        example_inputs=example_inputs, base_param_bytes=base_bytes,
        build_reference=build_reference if real else None, build_lean=build_lean if real else None, forward=forward,
        warmup=warmup, call_inputs=call_inputs,
        settings={"tokens": tokens, "frames_per_chunk": frames, "height": height, "width": width,
                  "tokens_per_frame": tokens // frames, "denoise_calls_per_chunk": count, "steps": list(step_values),
                  "respecialise_height": alt_height, "respecialise_width": alt_width,
                  "base_init": init if init != "zeros" else "zeros (apply/reference); seeded fill (forward)",
                  "vace_rule": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
                  "base_param_bytes": base_bytes},
    )
