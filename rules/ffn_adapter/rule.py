"""``ffn-adapter``: a bottleneck adapter after every feed-forward unit, as a residual.

The rule names no model family. The units are found by what they compute
(:data:`surgery.matching.pattern.FEED_FORWARD`: a call whose own dataflow is ``Linear ->
activation -> Linear``), every one at any depth, so one adapter goes after the FFN of each
block. Each adapter is grafted beside its FFN, at ``<ffn path>_adapter`` (``blocks.3.ffn`` ->
``blocks.3.ffn_adapter``), so its weights have native keys in the block's own namespace; the
action adds its output to the FFN's: ``y + up(act(down(y)))``.

Its weights load with :func:`surgery.weights.load_rule_weights` (or ``--weights``) by the
pattern :data:`WEIGHT_PREFIXES`, the adapters of FFNs at ``<list>.<index>.ffn`` (the usual
transformer layout, every stand-in's): one pattern part stands for the block index. For FFNs
named otherwise, declare theirs: ``dataclasses.replace(rule(), weight_prefixes=("layers.*.mlp_adapter.",))``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.nn as nn

from surgery.errors import GraftError
from surgery.matching.pattern import FEED_FORWARD
from surgery.rule import GraftContext, Rule, Site, Where
from surgery.tracing.policy import TracePolicy

from .adapter import build_adapter
from .config import FfnAdapterConfig
from .reference import SUFFIX, adapter_path, first_linear, reference

NAME = "ffn-adapter"
#: The state_dict prefixes of the grafted adapters (``*``: any one name part, e.g. a block index).
WEIGHT_PREFIXES = ("*.*.ffn" + SUFFIX + ".",)


def rule(bottleneck_dim: int = 16, activation: str = "gelu", layers: Optional[Sequence[int]] = None,
         num_ffns: Optional[int] = None) -> Rule:
    """A bottleneck adapter after every feed-forward unit, as a residual (zero-initialised: an exact identity).

    The options are those of :class:`~rules.ffn_adapter.config.FfnAdapterConfig`.

    Raises:
        RuleError: on invalid options (at construction; a ``layers`` range that depends on
            the FFN count, at apply time).
    """
    config = FfnAdapterConfig(bottleneck_dim, activation, layers, num_ffns)  # type: ignore[arg-type]  # checked there

    def expected(model: nn.Module) -> Optional[int]:
        return config.num_ffns

    def assign(position: int, count: int) -> Optional[int]:
        chosen = config.chosen(count)
        return chosen.index(position) if position in chosen else None

    def grafts(context: GraftContext) -> dict[str, nn.Module]:
        adapters: dict[str, nn.Module] = {}
        for match, ffn in zip(context.matches, context.matched_modules):
            if match.index is None:
                continue
            first = first_linear(ffn)
            if first is None:  # the pattern saw Linears; a module calling foreign ones is not adaptable here
                raise GraftError(f"the FFN {match.name} holds no nn.Linear to size its adapter from",
                                 "adapt FFNs that own their projections")
            adapters[adapter_path(match.name)] = build_adapter(first.in_features, config.bottleneck_dim,
                                                               config.activation_layer(), like=first.weight,
                                                               init=context.init)
        return adapters

    def check_call(inputs: dict[str, Any], call_inputs: dict[str, Any], latent: Any,
                   model: nn.Module) -> dict[str, Any]:
        return {}  # the rule adds no call inputs

    return Rule(
        name=NAME,
        options={"bottleneck_dim": bottleneck_dim, "activation": activation,
                 "layers": list(config.layers) if config.layers is not None else None, "num_ffns": num_ffns},
        pattern=FEED_FORWARD,
        expected=expected,
        assign=assign,
        grafts=grafts,
        actions=((Where.AFTER_EACH, add_adapter),),
        inputs={},
        check_call=check_call,
        trace_policy=TracePolicy(),
        count_option="num_ffns",
        weight_prefixes=WEIGHT_PREFIXES,
        reference=reference(config),
    )


def add_adapter(site: Site) -> Any:
    """After an adapted FFN: its output plus the adapter's branch on it."""
    if site.match.index is None:
        return None
    return site.stream + site.module(adapter_path(site.match.name))(site.stream)


__all__ = ["NAME", "add_adapter", "rule"]
