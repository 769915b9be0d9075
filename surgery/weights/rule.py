"""Loading the weights of the modules a rule grafted, by the rule's own data.

:func:`load_rule_weights` reads what to load from the rule that rewrote the model
(``Rule.weight_prefixes``: the state_dict prefixes of its grafted modules, ``*`` parts matching
any one name part, e.g. ``blocks.*.ffn_adapter.``; ``Rule.key_maps``:
the checkpoint layouts it accepts, by name; ``Rule.check_weights``: its own checks of a file
against the model) and loads them with every check of :func:`surgery.weights.loader.load_weights`
(all or nothing, regular files only, values checked after conversion).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from surgery.errors import WeightsError
from surgery.rule import Rule
from surgery.weights.keys import KeyMap
from surgery.weights.loader import load_weights
from surgery.weights.report import LoadReport


def rule_of(module: nn.Module) -> Rule | None:
    """The rule that rewrote ``module``, or ``None`` for a model surgery did not rewrite."""
    state = module.__dict__.get("_surgery")
    return state.rule if state is not None else None


def load_rule_weights(module: nn.Module, path: str | Path, *, key_map: str | KeyMap | None = None,
                      rule: Rule | None = None, **options: Any) -> LoadReport:
    """Load the grafted modules' weights of ``rule`` (default: the rule that rewrote ``module``).

    Args:
        module: the rewritten model (or any module with the rule's grafted modules).
        path: a safetensors file, a sharded index or a directory holding either; a full
            checkpoint is filtered to the rule's keys.
        key_map: the name of one of the rule's key maps (``Rule.key_maps``), or a map itself.
        rule: the rule whose modules to load; needed only for a model surgery did not rewrite.
        options: passed on to the loader (``strip_prefixes``, ``mmap``).

    Raises:
        WeightsError: no rule, a rule that declares no weight prefixes, an unknown key map
            name, or anything the loader or the rule's checks refuse.
    """
    rule = rule if rule is not None else rule_of(module)
    if rule is None:
        raise WeightsError(f"{type(module).__name__} was not rewritten by surgery, so which weights to load is unknown",
                           "apply the rule first (surgery.apply) or pass rule=")
    if not rule.weight_prefixes:
        raise WeightsError(f"rule '{rule.name}' declares no weight prefixes (Rule.weight_prefixes), so its weights "
                           f"cannot be told apart from the base model's",
                           "load them with module.load_state_dict(weights, strict=False), or declare the prefixes "
                           "(a * part matches any one name part: blocks.*.adapter.)")
    if isinstance(key_map, str):
        if key_map not in rule.key_maps:
            known = ", ".join(rule.key_maps) or "none"
            raise WeightsError(f"rule '{rule.name}' has no key map {key_map!r}", f"use one of: {known}")
        key_map = rule.key_maps[key_map]
    return load_weights(module, path, prefixes=tuple(rule.weight_prefixes), key_map=key_map,
                        checks=getattr(rule, "check_weights", None), label=rule.name, **options)


__all__ = ["load_rule_weights", "rule_of"]
