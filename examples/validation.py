"""The validation harness for the built-in pipelines.

``surgery.validation`` is generic: it asks the model's owner for a
:class:`~surgery.validation.Harness`. For the five stand-ins the reference is
``examples.reference.CausalVaceWanModel`` (built on a zero-copy structural copy of the base
model, with the same ``vace_in_dim`` and hinted layers as the rule), the key map is the
reference's documented ``REFERENCE_KEY_MAP`` (``to_native_key``), and a scenario is a
``run_stream`` over three chunks with a different random ``vace_context`` per chunk (with
several contexts, a list of them per chunk, the first the one-context scenario's).
``surgery.validation.discover_harness`` finds :func:`validation_harness` here because the
pipelines' ``PipelineSpec`` lives in this package.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from examples.driver import StreamRecord, call_diffs, run_stream
from examples.reference import CausalVaceWanModel, random_vace_state_dict, to_native_key
from examples.wan.pipeline import PipelineSpec
from surgery.tracing.twin import share_tree
from surgery.validation import Harness, Scenario

__all__ = ["CONTEXT_SEED", "second_resolution", "validation_harness"]

#: Seed of the per-chunk VACE contexts (one generator per scenario, so both sides get the same).
CONTEXT_SEED = 7


def second_resolution(height: int, width: int) -> tuple[int, int]:
    """Another token grid than the example's: one token row and two token columns more."""
    return height + 16, width + 32


def _latent_size(example_inputs: Optional[tuple[tuple, dict]]) -> tuple[int, int]:
    if example_inputs is not None and example_inputs[0]:
        latent = example_inputs[0][0]
        if isinstance(latent, torch.Tensor) and latent.dim() == 5:
            return int(latent.shape[3]) * 8, int(latent.shape[4]) * 8
    return 32, 32


def _hinted_layers(result: Any) -> list[int]:
    return [m.position for m in result.matches if m.index is not None]


def validation_harness(result: Any, *, model: nn.Module, pipeline: PipelineSpec,
                       example_inputs: Optional[tuple[tuple, dict]] = None, steps: Optional[Sequence[int]] = None,
                       chunks: int = 3, resolutions: Optional[Sequence[tuple[int, int]]] = None) -> Harness:
    """The harness for a built-in pipeline.

    ``steps`` overrides the pipeline's denoising steps (tests use two to stay fast);
    ``resolutions`` defaults to the example's pixel size and :func:`second_resolution` of it.
    """
    if chunks < 3:
        raise ValueError(f"validation streams need at least 3 chunks, got {chunks}")
    vace_in_dim = int(result.rule.options.get("vace_in_dim", 96))
    layers = _hinted_layers(result)
    first = _latent_size(example_inputs)
    sizes = [tuple(r) for r in resolutions] if resolutions else [first, second_resolution(*first)]

    def reference_factory(base: nn.Module) -> nn.Module:
        # The reference swaps the blocks of the model it wraps; give it its own module tree.
        return CausalVaceWanModel(share_tree(base), vace_in_dim=vace_in_dim, vace_layers=layers)

    def drive(model: nn.Module, scenario: Scenario) -> StreamRecord:
        height, width = scenario.resolution
        context = None
        if scenario.control:
            frames = pipeline.config.num_frame_per_block
            gen = torch.Generator().manual_seed(CONTEXT_SEED + scenario.seed)
            weight = model.patch_embedding.weight
            # Context-major, so the first context of every chunk is the one-context scenario's.
            streams = [[torch.randn(1, vace_in_dim, frames, height // 8, width // 8, generator=gen)
                        .to(device=weight.device, dtype=weight.dtype) for _ in range(chunks)]
                       for _ in range(scenario.contexts)]
            per_chunk = [[stream[chunk] for stream in streams] if scenario.contexts > 1 else streams[0][chunk]
                         for chunk in range(chunks)]
            context = per_chunk.__getitem__
        return run_stream(model, pipeline, chunks=chunks, height=height, width=width, steps=steps,
                          seed=scenario.seed, vace_context=context, vace_context_scale=scenario.scale)

    def compare(a: StreamRecord, b: StreamRecord) -> list[tuple[str, float]]:
        labels = [f"chunk {c.chunk} {c.kind}" + (f" step {c.step}" if c.step >= 0 else "") for c in a.calls]
        return list(zip(labels, call_diffs(a, b)))

    def random_weights(module: nn.Module) -> dict[str, torch.Tensor]:
        return random_vace_state_dict(module, seed=1)

    return Harness(reference_factory=reference_factory, to_native=to_native_key, drive=drive, compare=compare,
                   resolutions=sizes, chunks=chunks, random_weights=random_weights)
