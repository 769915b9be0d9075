"""What validation needs from outside the engine: a reference and a way to drive a model.

The engine knows nothing about any particular model family. Whoever owns the models (the
``examples`` package for the built-in pipelines) supplies a :class:`Harness`: how to build
the hand-written reference from the base model, the key map from the reference's layout to
the native layout, and how to run a streaming scenario and compare two runs.

When the caller does not pass one, :func:`discover_harness` asks the pipeline object for a
``validation_harness`` callable, then looks for a ``validation`` module in the top-level
package that defines the pipeline's class (``<package>.validation.validation_harness``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..errors import InputError

#: ``(label, max abs diff)`` per model call of two runs, e.g. ``("chunk 1 step 0", 0.0)``.
CallDiffs = Sequence[tuple[str, float]]


@dataclass(frozen=True)
class Scenario:
    """One streaming run.

    ``resolution`` is ``(height, width)`` in the driver's units; ``control`` says whether the
    rule's control input (e.g. VACE's ``vace_context`` per chunk) is passed, at ``scale``
    (a number or one value per layer the rule acts on); ``contexts`` > 1 passes that many control
    inputs at once, the first the same as with one, ``scale`` then holding one entry per
    context; ``seed`` fixes the driver's random inputs.
    """

    resolution: tuple[int, int]
    control: bool = False
    scale: Any = 1.0
    seed: int = 0
    contexts: int = 1

    def describe(self) -> str:
        h, w = self.resolution
        several = f" {self.contexts} contexts" if self.contexts > 1 else ""
        return f"{h}x{w}" + (f"{several} scale={_scale_text(self.scale)}" if self.control else " no control")


def _scale_text(scale: Any) -> str:
    if isinstance(scale, (list, tuple)):
        return "[" + ",".join(_scale_text(s) for s in scale) + "]"
    return f"{scale:g}" if isinstance(scale, (int, float)) else str(scale)


@dataclass
class Harness:
    """The glue between the generic validator and one model family.

    Args:
        reference_factory: ``base model -> reference``. Must not change the base model's
            tensors; it may build on a structural copy (the engine's ``share_tree``).
        to_native: reference state_dict key (or module path plus ``"."``) -> native key;
            raise a :class:`~surgery.errors.SurgeryError` or return None for names that only
            the reference's wrapper has.
        drive: runs one :class:`Scenario` through a model and returns an opaque record.
        compare: labelled per-call max abs differences of two records (outputs and caches).
        resolutions: at least two ``(height, width)``; the first is the example's.
        chunks: streaming chunks per run (at least 3), for the report.
        scales: scales to check given the number of acted-on layers (default: 0, 0.5 and a
            distinct value per layer).
        lora_targets: native module names PEFT wraps (default: every ``nn.Linear``).
        random_weights: seeded non-zero values for the grafted tensors, used when the
            rewritten model's grafted weights are all zero (default: a generic scheme).
    """

    reference_factory: Callable[[nn.Module], nn.Module]
    to_native: Callable[[str], "str | None"]
    drive: Callable[[nn.Module, Scenario], Any]
    compare: Callable[[Any, Any], CallDiffs]
    resolutions: Sequence[tuple[int, int]]
    chunks: int = 3
    scales: Callable[[int], Sequence[Any]] | None = None
    lora_targets: Callable[[nn.Module], list[str]] | None = None
    random_weights: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None


HarnessFactory = Callable[..., Harness]


def discover_harness(result: Any, *, model: nn.Module, pipeline: Any = None,
                     example_inputs: tuple[tuple, dict] | None = None) -> Harness:
    """The harness the model's owner provides (see the module docstring).

    Raises:
        InputError: nobody provides one for this model.
    """
    factory: HarnessFactory | None = getattr(pipeline, "validation_harness", None) if pipeline is not None else None
    if factory is None and pipeline is not None:
        package = type(pipeline).__module__.split(".")[0]
        try:
            module = importlib.import_module(f"{package}.validation")
        except ImportError:
            module = None
        factory = getattr(module, "validation_harness", None)
    if factory is None:
        raise InputError(f"no hand-written reference is known for model {getattr(result, 'model_name', '?')}",
                         "pass harness=Harness(...) to surgery.validation.validation_cases, or add "
                         "validation_harness() to a validation module of the model's package")
    return factory(result, model=model, pipeline=pipeline, example_inputs=example_inputs)


__all__ = ["CallDiffs", "Harness", "HarnessFactory", "Scenario", "discover_harness"]
