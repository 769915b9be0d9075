"""What a benchmark provider hands the harness: a model to measure and its forward runs.

A provider is a function ``provider(model, *, size, device, dtype, tokens, steps, seed) ->
BenchSubject``; ``benchmarks.bench_models.bench_subject`` is the one for the built-in
examples. The harness (:mod:`benchmarks.bench`) only measures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn as nn

__all__ = ["BenchSubject", "ForwardSuite"]


class ForwardSuite(Protocol):
    """Model-specific forward runs: a base with real values, shared weights, streaming chunks."""

    def build_base(self) -> nn.Module:
        """A base model with non-trivial values (outputs must differ from zeros)."""

    def share_weights(self, rewritten: nn.Module, reference: nn.Module,
                      lean: Optional[nn.Module] = None) -> dict[str, Any]:
        """Give the models (``lean`` too, when given) the same seeded random graft weights; returns what was done."""

    def runner(self, model: nn.Module, *, vace: bool, alternate: bool = False, prefill: bool = True,
               calls: Optional[int] = None) -> list[Callable[[], torch.Tensor]]:
        """Prepare caches (and a prefill chunk) for ``model``; return one streaming chunk.

        The chunk is a list of denoising calls (at the same ``current_start``), each a
        function returning that call's output; running them in order is one chunk, and
        every run of the list repeats the same chunk. ``alternate`` uses the second
        geometry (a new input signature); ``calls`` keeps only the first ``calls`` calls.
        """


@dataclass
class BenchSubject:
    """A model to benchmark, as a provider describes it.

    ``build_base()`` returns a fresh base model on ``device`` (zeros or meta at real sizes:
    values do not matter for apply); ``example_inputs(base)`` its example call;
    ``build_reference(base)`` wraps ``base`` (in place) in the hand-written reference;
    ``build_lean(base, eager_branch)`` adds the lean hand-written graft to ``base`` in place
    (hooks, the graft padded only to the chunk; ``eager_branch``: its branch stays out of
    ``torch.compile``, for when the main blocks are compiled one by one) and returns it;
    ``warmup()`` runs apply and the reference once on a small model (one-time imports and
    lazy initialisation out of the memory measurements); ``call_inputs(model, alternate)``
    is one call with a VACE context at the example geometry or (``alternate``) a new one,
    used on the meta device to time re-specialisation. ``settings`` is recorded as is.
    """

    name: str
    size: str
    device: torch.device
    dtype: torch.dtype
    rule: Callable[[], Any]
    build_base: Callable[[], nn.Module]
    example_inputs: Callable[[nn.Module], tuple[tuple, dict]]
    base_param_bytes: int
    build_reference: Optional[Callable[[nn.Module], nn.Module]] = None
    build_lean: Optional[Callable[[nn.Module, bool], nn.Module]] = None
    forward: Optional[ForwardSuite] = None
    warmup: Optional[Callable[[], None]] = None
    call_inputs: Optional[Callable[[nn.Module, bool], tuple[tuple, dict]]] = None
    settings: dict[str, Any] = field(default_factory=dict)

