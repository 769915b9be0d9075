"""A rule's own reference (:class:`surgery.rule.Reference`) in place of the model owner's.

The model's owner knows how to drive the model (a streaming scenario) and how to compare two
runs; a rule that is not tied to one model family (an adapter after every FFN) knows what it
means written by hand. The harness keeps the owner's driving and takes the rule's reference,
its key map and the generic seeded weights (the owner's seeded weights are for its own
reference's layout).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from ..tracing.twin import share_tree
from .harness import Harness


def with_rule_reference(harness: Harness, result: Any) -> Harness:
    """``harness`` with the reference of ``result.rule`` when the rule writes one."""
    reference = getattr(getattr(result, "rule", None), "reference", None)
    if reference is None:
        return harness
    matches = list(result.matches)

    def build(base: nn.Module) -> nn.Module:
        return reference.build(share_tree(base), matches)

    return dataclasses.replace(harness, reference_factory=build,
                               to_native=lambda name: reference.to_native(name, matches), random_weights=None)


__all__ = ["with_rule_reference"]
