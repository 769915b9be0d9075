"""The build order Base -> rules -> LoRA (e.g. Base -> vace -> LoRA), enforced.

Surgery rebuilds blocks and copies weights by their native state_dict names; once PEFT
has wrapped a Linear its weight lives at ``...q.base_layer.weight`` and the adapters at
``...lora_A.<name>.weight``, so surgery on a LoRA-carrying model would silently drop
the adapters or leave grafted blocks without weights.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from torch import nn

from surgery.errors import OrderError


def build_order(*rule_names: str) -> str:
    """The build order naming the rules, e.g. ``Base -> vace -> LoRA`` (``Base -> surgery -> LoRA`` for none)."""
    return " -> ".join(("Base", *(rule_names or ("surgery",)), "LoRA"))


def applied_rules(model: nn.Module) -> tuple[str, ...]:
    """Names of the rules that rewrote ``model`` (PEFT wrappers looked through), in order; empty for none."""
    for module in model.modules():
        state = module.__dict__.get("_surgery")
        if state is not None:
            return tuple(rule.name for rule in state.rules)
    return ()


def check_sequence(earlier: Sequence[Any], rule: Any) -> None:
    """Refuse ``rule`` after the ``earlier`` rules (in application order) where a rule's declared
    order forbids it (``Rule.may_precede`` of an earlier one, ``Rule.may_follow`` of ``rule``).

    Raises:
        OrderError: naming both rules and the order asked for.
    """
    order = build_order(*(r.name for r in earlier), rule.name)
    for before in earlier:
        if before.may_precede is not None and rule.name not in before.may_precede:
            problem = f"rule '{before.name}' allows no rule '{rule.name}' after it (asked: {order})"
        elif rule.may_follow is not None and before.name not in rule.may_follow:
            problem = f"rule '{rule.name}' may not follow rule '{before.name}' (asked: {order})"
        else:
            continue
        raise OrderError(problem, f"apply '{rule.name}' to a model without '{before.name}', or in an order both "
                                  "rules allow (Rule.may_follow / Rule.may_precede)")


def peft_imported() -> bool:
    """Whether peft is loaded; if not, no model can hold PEFT objects (and importing it costs seconds)."""
    return "peft" in sys.modules


def peft_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the PEFT tuner layers inside ``model`` (empty if none)."""
    if not peft_imported():
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def peft_owner(model: nn.Module) -> tuple[str, str] | None:
    """``(name, class)`` of the first PEFT object in ``model`` (the root included), or ``None``."""
    if not peft_imported():
        return None
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, (PeftModel, BaseTuner, BaseTunerLayer)):
            return name or "root", type(module).__name__
    return None


def check_order(model: nn.Module) -> None:
    """Raise :class:`OrderError` if ``model`` is a PEFT model or already has LoRA layers.

    Call it before any surgery; LoRA belongs last: Base -> rules -> LoRA.
    """
    if not peft_imported():
        return
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    fix = (
        f"build in the order {build_order(*applied_rules(model))}: run the surgery and load its weights on the plain "
        "base model, then load LoRAs; if LoRA was applied first, start again from the base model (or "
        "merge_and_unload() the adapters first)"
    )
    if isinstance(model, (PeftModel, BaseTuner)):
        raise OrderError(f"the model is already a PEFT {type(model).__name__}, so surgery would come after LoRA", fix)
    layers = peft_layer_names(model)
    if layers:
        raise OrderError(
            f"the model already contains {len(layers)} LoRA/PEFT layers (e.g. {layers[0]!r}), so surgery would come "
            "after LoRA",
            fix,
        )
