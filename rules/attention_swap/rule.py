"""``attention-swap``: another attention kernel inside every self-attention unit.

The rule names no model family. Blocks are found by structure
(:data:`surgery.matching.pattern.ATTENTION_BLOCK`); a block's self-attention unit is its
opaque module call that reads only the block's own tokens, and it must call one of the
target functions by name. In the rewritten model each chosen unit gets a class whose
``forward`` finds the kernel under those names (:mod:`.swap`); the traced graph is the base
graph unchanged, because the unit already is one opaque call in it. No module is grafted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch.nn as nn

from surgery.errors import GraftError
from surgery.matching.matcher import Match
from surgery.matching.pattern import ATTENTION_BLOCK, CallView, Pattern, self_attention_calls
from surgery.rule import GraftContext, Rule
from surgery.tracing.policy import TracePolicy

from .config import AttentionSwapConfig
from .kernels import KernelCall, resolve_kernel
from .reference import reference
from .swap import original_class, swapped_class, swapped_names

NAME = "attention-swap"


@dataclass(frozen=True)
class CallsATarget:
    """The pattern's check that a block's self-attention unit calls a target function by name.

    It notes each passing block's unit in ``found`` (block path -> unit path), for the grafts
    and the reference; equal for equal targets, so a rebuilt rule is the same rule.
    """

    targets: tuple[str, ...]
    found: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, view: CallView) -> Optional[str]:
        for node in self_attention_calls(view):
            unit = view.root.get_submodule(node.target)
            if swapped_names(original_class(unit).forward, dict.fromkeys(self.targets, "")):
                self.found[view.qualname] = node.target
                return None
        return f"its self-attention calls none of {', '.join(self.targets)} by name"


def rule(kernel: Union[str, Callable[..., Any]] = "sdpa", targets: Optional[Mapping[str, str]] = None,
         layers: Optional[Sequence[int]] = None) -> Rule:
    """Every (or each chosen) self-attention unit's core attention computed by another kernel (default: SDPA).

    The options are those of :class:`~rules.attention_swap.config.AttentionSwapConfig`.

    Raises:
        RuleError: on invalid options (at construction; a ``layers`` range that depends on
            the block count, at apply time).
    """
    config = AttentionSwapConfig(kernel, targets if targets is not None else AttentionSwapConfig().targets,
                                 layers)  # type: ignore[arg-type]  # checked there
    calls = tuple(KernelCall(name, layout, resolve_kernel(config.kernel)) for name, layout in config.targets.items())
    calls_a_target = CallsATarget(tuple(config.targets))
    found = calls_a_target.found

    pattern = Pattern("self-attention unit", ATTENTION_BLOCK.checks + (("calls a target kernel", calls_a_target),),
                      select=ATTENTION_BLOCK.select)

    def units(matches: Sequence[Match]) -> dict[str, str]:
        """Chosen block -> its self-attention unit's path."""
        chosen = config.chosen(len(matches))
        return {m.name: found[m.name] for m in matches if m.position in chosen}

    def assign(position: int, count: int) -> Optional[int]:
        chosen = config.chosen(count)
        return chosen.index(position) if position in chosen else None

    def grafts(context: GraftContext) -> dict[str, nn.Module]:
        # Nothing is added: each chosen unit of the rewritten model (a copy; the user's model
        # keeps its classes) gets the class that dispatches to the kernel.
        for path in units(context.matches).values():
            unit = context.model.get_submodule(path)
            cls = original_class(unit)
            names = swapped_names(cls.forward, config.targets)
            if not names:  # matched on the same model a moment ago: only a changed class gets here
                raise GraftError(f"the self-attention unit {path} calls none of {', '.join(config.targets)}",
                                 "name the function it calls in the rule's targets")
            unit.__class__ = swapped_class(cls, calls, {name: target for name, (target, _) in names.items()})
        return {}

    def check_call(inputs: dict[str, Any], call_inputs: dict[str, Any], latent: Any,
                   model: nn.Module) -> dict[str, Any]:
        return {}  # the rule adds no call inputs

    return Rule(
        name=NAME,
        options={"kernel": kernel, "targets": dict(config.targets),
                 "layers": list(config.layers) if config.layers is not None else None},
        pattern=pattern,
        expected=lambda model: None,
        assign=assign,
        grafts=grafts,
        actions=(),
        inputs={},
        check_call=check_call,
        trace_policy=TracePolicy(),
        reference=reference(resolve_kernel(config.kernel), config.targets, units),
        # SDPA computes exactly what a model's own SDPA-based kernel did: no change is no fault.
        effect_required=False,
    )


__all__ = ["NAME", "rule"]
