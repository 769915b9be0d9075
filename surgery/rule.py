"""Rules are data: a pattern, where to act, and ordinary code to run there.

A :class:`Rule` says what to find (a structural :class:`~surgery.matching.pattern.Pattern`
and how many times), which modules to graft in, and a list of ``(where, action)`` pairs.
Each action is ordinary Python written against :class:`Site`; the engine traces it into
the specialised graph at that place, the way ``subgraph_rewriter`` traces a replacement.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch.nn as nn

from .errors import RuleError
from .matching.matcher import Match
from .matching.pattern import Pattern
from .tracing.policy import TracePolicy

if TYPE_CHECKING:
    from .weights.checks import WeightChecks


class Where(enum.Enum):
    """Where an action's code is inserted, relative to the matched units, and what its
    return value (``None``: nothing) replaces.

    * ``BEFORE_FIRST``: once, before the first match; the result is ignored (actions share
      values through ``site.scratch``).
    * ``BEFORE_EACH``: before each match; a result replaces the unit's input stream for the
      unit only (other readers of that value keep the original).
    * ``AFTER_EACH``: after each match; a result replaces the unit's output stream for every
      later reader.
    * ``REPLACE``: after each match; a result, shaped like ``site.output``, replaces the
      unit's whole output, and the unit's own nodes that nothing reads any more are dropped
      (except those with side effects, such as cache writes).
    """

    BEFORE_FIRST = "before the first match"
    BEFORE_EACH = "before each match"
    AFTER_EACH = "after each match"
    REPLACE = "instead of each match"


@dataclass
class Site:
    """What an action sees at its insertion point.

    ``stream`` is the unit's stream input (its first argument: ``BEFORE_FIRST``,
    ``BEFORE_EACH``, ``REPLACE``) or output (its first result: ``AFTER_EACH``); ``output`` the
    unit's whole output (``AFTER_EACH``, ``REPLACE``; ``None`` before the unit);
    ``arguments`` the unit's call arguments bound by name, ``required`` those without a
    default (what a cache-free call of the same unit needs); ``inputs`` the rule's own call
    inputs (``None`` when the caller gave none); ``model`` the model whose modules the action
    may call, grafts included (``site.module(path)`` fetches one); ``scratch`` is shared by the
    actions of one rewrite.
    """

    match: Match
    stream: Any
    arguments: dict[str, Any]
    required: dict[str, Any]
    inputs: dict[str, Any]
    model: nn.Module
    scratch: dict[str, Any] = field(default_factory=dict)
    output: Any = None

    def module(self, path: str) -> nn.Module:
        """The model's module at dotted ``path`` (a graft such as ``blocks.3.ffn_adapter``)."""
        return self.model.get_submodule(path)


@dataclass
class GraftContext:
    """What a graft builder sees.

    ``model`` is the new model (grafts go into it), ``matches`` and ``matched_modules`` the
    matched units in execution order, ``stream_source`` the leaf module that produced the
    matched chain's input stream (the nearest module call the first unit's input comes from, e.g.
    a patch embedding; ``None`` when the stream is a model input), ``root_attributes`` the
    model's public instance attributes, ``init`` the ``graft_init`` of :func:`surgery.apply`.
    """

    model: nn.Module
    matches: list[Match]
    matched_modules: list[nn.Module]
    stream_source: nn.Module | None
    root_attributes: Mapping[str, Any]
    init: str = "zeros"


@dataclass(frozen=True)
class Reference:
    """The rule written by hand, which validation compares the rewritten model with.

    Args:
        build: ``build(base, matches)`` turns ``base`` (a structural copy of the base model:
            its module tree is the reference's to change, its tensors share the user's
            storage and must not be written) into the reference for the matched units.
        to_native: ``to_native(name, matches)`` maps a reference state_dict key (or a module
            path plus ``"."``) to the rewritten model's name; ``None`` for names that only the
            reference has (a wrapper module).
    """

    build: Callable[[nn.Module, Sequence[Match]], nn.Module]
    to_native: Callable[[str, Sequence[Match]], "str | None"]


Action = Callable[[Site], Any]
GraftBuilder = Callable[[GraftContext], "dict[str, nn.Module]"]
CallCheck = Callable[[dict[str, Any], dict[str, Any], Any, nn.Module], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    """A complete surgery rule.

    Args:
        name: short name used in reports and on the command line.
        options: the options the rule was built with (reported verbatim).
        pattern: what a unit looks like.
        expected: number of units the rule expects on a model (``None``, or a ``None``
            result for a model that declares no count: any, at least one).
        count_option: the name of the rule's option that sets the expected count; a wrong
            count's error tells the user to set it. ``None``: the rule has none.
        effect_required: validation fails when the rewritten model's output equals the base
            model's, because a rule that silently did nothing would pass. A rule whose effect
            may rightly be nil on a model (a kernel swap whose kernel computes exactly what the
            original did) sets ``False``; its reference comparison alone decides.
        reference: the rule written by hand, for validation (:class:`Reference`); ``None``:
            the model's owner provides the reference (``surgery.validation.Harness``).
        lora_schemes: ``lora_schemes(model)`` gives the rule's own LoRA target namings
            (:class:`surgery.lora.TargetScheme`) for a model it rewrote; ``None``: none.
        check_weights: the rule's own checks of a weights file against the model
            (:class:`surgery.weights.WeightChecks`: its branch's width and depth, values it
            cannot use), run by :func:`surgery.weights.load_rule_weights`; ``None``: none.
        assign: gives each match its index for the actions (``None`` = not acted on).
        grafts: builds the new modules, keyed by their dotted path in the model
            (``adapters`` on the root, ``blocks.3.ffn_adapter`` inside a block); each is
            added under its parent, which must exist and must not have that name yet.
        actions: ``(where, code)`` pairs applied in order.
        inputs: the rule's extra call inputs and their defaults.
        check_call: validates and normalises the rule's inputs at call time.
        trace_policy: which modules and methods stay opaque while tracing.
        key_maps: named weight-key maps (data) for checkpoint layouts this rule accepts.
        weight_prefixes: state_dict prefixes of the grafted modules (a model that already
            has them already carries the rule); a ``*`` part matches any one name part
            (``blocks.*.ffn_adapter.``: grafts inside every block).
        example: builds example values of the rule's inputs from the latent input, so that
            ``apply`` can specialise (and report) the rewritten graph up front.
        bind: called by ``apply`` as ``bind(rule, model)`` before anything else; returns the
            rule to use on that model (a rule that adapts to the model's family: its call
            input names, checkpoint names, opaque modules). ``None``: the rule as it is.
        may_follow: names of the rules this rule may be applied after (composition,
            :func:`surgery.apply` on a rewritten model); ``None``: any other rule; ``()``: it
            applies to a base model only.
        may_precede: names of the rules that may be applied after this one; ``None``: any other
            rule; ``()``: none (LoRA, which is not a rule, may always come last).
    """

    name: str
    options: Mapping[str, Any]
    pattern: Pattern
    expected: Callable[[nn.Module], "int | None"] | None
    assign: Callable[[int, int], "int | None"]
    grafts: GraftBuilder
    actions: tuple[tuple[Where, Action], ...]
    inputs: Mapping[str, Any]
    check_call: CallCheck
    trace_policy: TracePolicy
    key_maps: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    weight_prefixes: tuple[str, ...] = ()
    example: Callable[[Any, nn.Module], dict[str, Any]] | None = None
    bind: Callable[["Rule", nn.Module], "Rule"] | None = None
    count_option: str | None = None
    effect_required: bool = True
    reference: Reference | None = None
    lora_schemes: Callable[[nn.Module], "Sequence[Any]"] | None = None
    check_weights: WeightChecks | None = None
    may_follow: tuple[str, ...] | None = None
    may_precede: tuple[str, ...] | None = None


def as_rules(rules: "Rule | Sequence[Rule]") -> tuple[Rule, ...]:
    """One rule or several, in application order, as a tuple."""
    return (rules,) if isinstance(rules, Rule) else tuple(rules)


def combined_inputs(rules: "Rule | Sequence[Rule]") -> dict[str, Any]:
    """The call inputs (and defaults) of ``rules`` together, in rule order.

    Raises:
        RuleError: two rules declare the same input name (a call could not tell whose it is).
    """
    owners: dict[str, str] = {}
    inputs: dict[str, Any] = {}
    for rule in as_rules(rules):
        for name, default in rule.inputs.items():
            if name in owners:
                raise RuleError(f"rules '{owners[name]}' and '{rule.name}' both take the call input '{name}'",
                                "rename the input in one of the rules; composed rules' inputs must differ")
            owners[name] = rule.name
            inputs[name] = default
    return inputs


def combined_policy(rules: "Rule | Sequence[Rule]") -> TracePolicy:
    """One trace policy keeping opaque what any of ``rules`` keeps opaque."""
    rules = as_rules(rules)
    policy = rules[0].trace_policy
    for rule in rules[1:]:
        other = rule.trace_policy
        policy = replace(policy, cache_arguments=policy.cache_arguments | other.cache_arguments,
                         extra_leaves=policy.extra_leaves | other.extra_leaves)
    return policy
