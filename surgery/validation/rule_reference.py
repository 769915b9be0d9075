"""A rule's own reference (:class:`surgery.rule.Reference`) in place of the model owner's.

The model's owner knows how to drive the model (a streaming scenario) and how to compare two
runs; a rule that is not tied to one model family (an adapter after every FFN) knows what it
means written by hand. The harness keeps the owner's driving and takes the rule's reference,
its key map and the generic seeded weights (the owner's seeded weights are for its own
reference's layout).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.nn as nn

from ..errors import InputError
from ..rule import Rule, combined_inputs, combined_policy
from ..tracing.twin import share_tree
from .harness import Harness


def applied_rules(result: Any) -> list[tuple[Rule, list]]:
    """``(rule, matches)`` of every rule of ``result``'s model, in application order."""
    applied = getattr(result, "applied", None) or ()
    return [(a.rule, list(a.matches)) for a in applied] or [(result.rule, list(result.matches))]


def first_rule_view(result: Any) -> Any:
    """``result`` as the model owner's harness sees it: its first rule and that rule's matches
    (the owner writes the reference of a rule applied to the base model)."""
    rules = applied_rules(result)
    if len(rules) == 1 or not dataclasses.is_dataclass(result):
        return result
    return dataclasses.replace(result, rule=rules[0][0], matches=rules[0][1], rules=())


def with_rule_reference(harness: Harness, result: Any) -> Harness:
    """``harness`` with the references of the rules that write one (``Rule.reference``).

    Composed rules' references are applied in rule order, each on the previous one's model,
    starting from the owner's reference when the first rule writes none; a reference's names
    map to native names through every step's ``to_native`` in the same order.

    Raises:
        InputError: a rule after the first writes no reference of its own.
    """
    rules = applied_rules(result)
    references = [(rule.reference, matches) for rule, matches in rules]
    for (rule, _), (reference, _) in zip(rules[1:], references[1:]):
        if reference is None:
            raise InputError(f"rule '{rule.name}' writes no reference (Rule.reference), so the model composed "
                             f"of {' + '.join(r.name for r, _ in rules)} has nothing to be validated against",
                             "validate each rule on a model of its own, or give the rule a reference")
    if references[0][0] is None and len(references) == 1:
        return harness
    owned = references[0][0] is None
    steps = references[1:] if owned else references
    start: Callable[[nn.Module], nn.Module] = harness.reference_factory if owned else share_tree

    def build(base: nn.Module) -> nn.Module:
        model = start(base)
        for index, (reference, matches) in enumerate(steps):
            # Each step changes a module tree of its own (the owner's reference may share modules).
            model = reference.build(model if index == 0 and not owned else share_tree(model), matches)
        return model

    names = ([harness.to_native] if owned else []) + [
        (lambda name, r=reference, m=matches: r.to_native(name, m)) for reference, matches in steps]

    def to_native(name: str) -> str | None:
        for step in names:
            name = step(name)
            if name is None:
                return None
        return name

    return dataclasses.replace(harness, reference_factory=build, to_native=to_native,
                               random_weights=harness.random_weights if owned else None)


def validated_rule(result: Any) -> Rule:
    """The rule validation drives: ``result.rule``, or for a composed model its rules as one
    (named ``a+b``, every rule's call inputs, trace policy and example inputs)."""
    rules = [rule for rule, _ in applied_rules(result)]
    if len(rules) == 1:
        return rules[0]

    def example(latent: Any, model: nn.Module) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for rule in rules:
            values.update(rule.example(latent, model) if rule.example is not None else rule.inputs)
        return values

    return dataclasses.replace(rules[-1], name="+".join(rule.name for rule in rules), inputs=combined_inputs(rules),
                               trace_policy=combined_policy(rules), example=example,
                               effect_required=any(rule.effect_required for rule in rules))


def control_matches(result: Any) -> list:
    """The matches a per-layer value of the call inputs covers: those of the last rule that takes
    call inputs (the only rule, for a model rewritten by one)."""
    rules = applied_rules(result)
    return next((matches for rule, matches in reversed(rules) if rule.inputs), rules[-1][1])


__all__ = ["applied_rules", "control_matches", "first_rule_view", "validated_rule", "with_rule_reference"]
