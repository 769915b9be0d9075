"""The recipe a pickled rewritten model keeps of its rule: the registered name and options.

A :class:`~surgery.rule.Rule` holds closures, which do not pickle. A rule that
``rules.RULES[name](**options)`` rebuilds exactly (same options, same code) is saved as
``(name, options)``; any other rule cannot be saved that way, and the error names what works
for every rule: the ``state_dict`` plus applying the same rule again.
"""
from __future__ import annotations

from typing import Any

from .errors import SaveError
from .rule import Rule

_SUPPORTED = ("save result.module.state_dict() instead (e.g. with safetensors) and, to load, build the base "
              "model, surgery.apply the same rule and load_state_dict(..., strict=False)")


def _code(fn: Any) -> Any:
    """What makes two closures of one factory the same function: their code (not identity)."""
    return getattr(fn, "__code__", fn)


def fingerprint(rule: Rule) -> tuple:
    """The parts of a rule that decide what it does, comparable across rebuilds."""
    return (rule.name, dict(rule.options), rule.pattern, tuple((w, _code(a)) for w, a in rule.actions),
            dict(rule.inputs), rule.trace_policy, dict(rule.key_maps), tuple(rule.weight_prefixes),
            _code(rule.expected), _code(rule.assign), _code(rule.grafts), _code(rule.check_call),
            _code(rule.example))


def _factory(name: str) -> Any:
    from .catalogue import rule_registry  # the registry lives beside the rules, outside the engine

    return rule_registry().get(name)


def rule_recipe(rule: Rule) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` that rebuild ``rule``.

    Raises:
        SaveError: the rule is not registered, or its registered factory builds another rule.
    """
    problem = f"cannot pickle or copy a model rewritten by rule '{rule.name}'"
    try:
        factory = _factory(rule.name)
        rebuilt = factory(**dict(rule.options)) if factory is not None else None
    except Exception as error:  # an unimportable registry or a factory refusing the options
        raise SaveError(f"{problem}: rebuilding it from rules.RULES failed ({type(error).__name__}: {error})",
                        _SUPPORTED) from error
    if rebuilt is None:
        raise SaveError(f"{problem}: it is not registered in rules.RULES", _SUPPORTED)
    if fingerprint(rebuilt) != fingerprint(rule):
        raise SaveError(f"{problem}: rules.RULES['{rule.name}'](**{dict(rule.options)}) builds a different rule",
                        _SUPPORTED)
    return rule.name, dict(rule.options)


def rebuild_rule(recipe: tuple[str, dict[str, Any]]) -> Rule:
    """The rule a recipe names (on load)."""
    name, options = recipe
    factory = _factory(name)
    if factory is None:
        raise SaveError(f"cannot load a model rewritten by rule '{name}': it is not registered in rules.RULES",
                        "register the rule's factory in rules/__init__.py (_FACTORIES)")
    return factory(**options)
