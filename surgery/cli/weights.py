"""``--base-weights``, ``--weights``/``--key-map`` and ``--lora``/``--lora-scale``/``--lora-key-map``: files into the model.

The base model's weights come from ``--base-weights`` or from a full checkpoint given to
``--weights`` (base keys and the keys of the ``--rule``'s grafted modules in one file); which
one is decided from the headers before any work (:func:`base_file`), and they load into the
base model before surgery (:func:`load_base`): Base -> rule -> LoRA.

A key map is named on the command line (``--key-map diffusers``) and looked up in the
rule's ``key_maps``; a rule that adapts to the model's family (``Rule.bind``) may offer
other maps for other families, so a name the unbound rule does not know is checked again
once the model is built, before surgery. Loader errors that suggest a key map as a Python
argument are rephrased for the command line, naming the flag and, when one of the rule's
maps makes the file fit, that map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from surgery.errors import InputError, WeightsError
from surgery.weights.files import resolve_checkpoint
from surgery.weights.keys import under_prefixes

KeyMaps = Mapping[str, Any]


def _known(key_maps: KeyMaps, rule_name: str) -> str:
    return (f"use one of {', '.join(key_maps)} (the key maps of rule {rule_name})" if key_maps
            else f"rule {rule_name} has no key maps: drop the option")


def check_key_map_name(rule: Any, name: str | None, flag: str, model: nn.Module | None = None) -> None:
    """Refuse ``name`` if the rule (bound to ``model`` when given) has no key map of that name.

    Without ``model``, a rule that binds to the model's family is given the benefit of the
    doubt for names it does not know yet (call again with the model before surgery).
    """
    if name is None:
        return
    maps = dict(getattr(rule, "key_maps", {}) or {})
    if name in maps:
        return
    bind = getattr(rule, "bind", None)
    if bind is not None and model is None:
        return
    if bind is not None:
        maps = dict(bound_rule(rule, model).key_maps or {})
        if name in maps:
            return
    raise InputError(f"{flag} {name!r} is not a key map of rule {rule.name}"
                     + (" for this model" if bind is not None else ""), _known(maps, rule.name))


def bound_rule(rule: Any, model: nn.Module) -> Any:
    """``rule`` adapted to ``model``'s family (``Rule.bind``), as ``apply`` will adapt it; itself if it does not adapt."""
    bind = getattr(rule, "bind", None)
    return bind(rule, model) if bind is not None else rule


def key_map(rule: Any, name: str | None) -> Any:
    """The key map data ``rule.key_maps[name]`` (``None`` without a name); ``rule`` is the bound rule."""
    if name is None:
        return None
    maps = dict(rule.key_maps or {})
    if name not in maps:
        raise InputError(f"{name!r} is not a key map of rule {rule.name} for this model", _known(maps, rule.name))
    return maps[name]


def _prefixes(rule: Any) -> tuple[str, ...]:
    """The state_dict prefixes of the rule's grafted modules (``Rule.weight_prefixes``)."""
    return tuple(getattr(rule, "weight_prefixes", None) or ())


def _rule_fits(module: nn.Module, names: list[str], table: Any, rule: Any) -> bool:
    from surgery.weights import DEFAULT_STRIP_PREFIXES
    from surgery.weights.keys import select_keys

    prefixes = _prefixes(rule)
    wanted = {k for k in module.state_dict() if under_prefixes(k, prefixes)}
    selection = select_keys(names, strip_prefixes=DEFAULT_STRIP_PREFIXES, key_map=table, keep_prefixes=prefixes)
    return bool(wanted) and set(selection.selected) == wanted


def _base_fits(module: nn.Module, names: list[str], table: Any, rule: Any) -> bool:
    from surgery.weights import base_keys

    prefixes = _prefixes(rule)
    wanted = {k for k in module.state_dict() if not under_prefixes(k, prefixes)}
    return bool(wanted) and set(base_keys(names, key_map=table, rule_prefixes=prefixes)) == wanted


def _lora_fits(module: nn.Module, names: list[str], table: Any, rule: Any) -> bool:
    from surgery.lora import parse_lora_keys, rule_schemes

    parsed = parse_lora_keys(names, key_map=table, schemes=rule_schemes(module))
    modules = dict(module.named_modules())
    return bool(parsed.targets) and not parsed.unrecognized and all(t in modules for t in parsed.targets)


def _for_the_command_line(error: WeightsError, rule: Any, module: nn.Module, path: str, flag: str,
                          fits: Any) -> WeightsError:
    """``error`` with a fix that names ``flag`` instead of the loader's ``key_map=`` argument."""
    if "key_map" not in error.fix:
        return error
    try:
        names = sorted(resolve_checkpoint(path))
        fitting = [n for n, table in (rule.key_maps or {}).items() if fits(module, names, table, rule)]
    except WeightsError:  # a map that makes keys collide is no candidate
        fitting = []
    if fitting:
        fix = f"the file uses {fitting[0]} names: pass {flag} {fitting[0]}"
    else:
        maps = ", ".join(rule.key_maps or {}) or "none"
        fix = f"use the file made for this model, or pass {flag} NAME for its layout (rule {rule.name} has: {maps})"
    rephrased = WeightsError(error.problem, fix)
    rephrased.details = getattr(error, "details", None)  # type: ignore[attr-defined]
    return rephrased


def load_weights(module: nn.Module, path: str, rule: Any, map_name: str | None) -> Any:
    """``load_rule_weights`` of the rule that rewrote ``module`` (the ``--rule`` given), with the named key
    map: the rule's prefixes and its own checks of the file (``Rule.check_weights``)."""
    from surgery.weights import load_rule_weights

    try:
        return load_rule_weights(module, path, key_map=key_map(rule, map_name))
    except WeightsError as error:
        if map_name is not None:
            raise
        raise _for_the_command_line(error, rule, module, path, "--key-map", _rule_fits) from error


@dataclass(frozen=True)
class BaseFile:
    """The file the base model's weights come from, known from headers alone (before any work)."""

    path: str
    flag: str  # the option that named it: --weights (a full checkpoint) or --base-weights
    tensors: int  # base tensors in it
    dtype: torch.dtype | None  # the dtype all of them are stored in (float32, bfloat16, float16), else None


def base_file(weights: str | None, base_weights: str | None, rule: Any) -> BaseFile | None:
    """``--base-weights``, or ``--weights`` when it is a full checkpoint (base keys besides the rule's), or ``None``.

    The rule's keys are those under its ``weight_prefixes``; a rule without them has no keys to
    tell apart, so its ``--weights`` is never taken for a full checkpoint, and neither is a file
    without any of the rule's keys (a base alone, another rule's weights). Read from headers
    without a key map: a rule's maps rename keys inside a layer, never its grafted modules'
    prefixes, so the base keys are the same before and after mapping. Refuses a
    ``--base-weights`` file without base keys, and two files that both hold a base.
    """
    from surgery.weights import base_dtype, base_keys, resolve_checkpoint

    rule_prefixes, rule_keys = _prefixes(rule), f"rule {getattr(rule, 'name', '?')}'s keys"

    def base_of(path: str, beside_rule_keys: bool = False) -> list[Any]:
        entries = resolve_checkpoint(path)
        base = [entries[name] for name in base_keys(entries, rule_prefixes=rule_prefixes).values()]
        return [] if beside_rule_keys and len(base) == len(entries) else base

    full = base_of(weights, beside_rule_keys=True) if weights and rule_prefixes else []
    if base_weights is None:
        return BaseFile(weights, "--weights", len(full), base_dtype(full)) if weights and full else None
    base = base_of(base_weights)
    if not base:
        raise WeightsError(f"--base-weights {base_weights} holds no base-model weights, only {rule_keys} "
                           f"({', '.join(rule_prefixes)})",
                           "pass the base model's checkpoint to --base-weights, and this file to --weights")
    if full:
        raise InputError(f"--weights {weights} is a full checkpoint ({len(full)} base tensors besides {rule_keys}) "
                         f"and --base-weights {base_weights} holds a base too",
                         "drop --base-weights to load the base and the rule's weights from --weights, or pass a file "
                         "of the rule's weights alone to --weights")
    return BaseFile(base_weights, "--base-weights", len(base), base_dtype(base))


def base_width(path: str) -> int | None:
    """The width (``dim``) a base checkpoint was made for: the out-channels of its ``patch_embedding.weight``."""
    from surgery.weights import base_keys, resolve_checkpoint

    entries = resolve_checkpoint(path)
    name = base_keys(entries).get("patch_embedding.weight")
    return entries[name].shape[0] if name is not None and entries[name].shape else None


def load_base(module: nn.Module, path: str, rule: Any, map_name: str | None) -> Any:
    """``load_base_weights`` into the base model, before surgery, with the named key map of the rule adapted to it."""
    from surgery.weights import load_base_weights

    rule = bound_rule(rule, module)
    try:
        return load_base_weights(module, path, key_map=key_map(rule, map_name), rule_prefixes=_prefixes(rule))
    except WeightsError as error:
        if map_name is not None:
            raise
        raise _for_the_command_line(error, rule, module, path, "--key-map", _base_fits) from error


def base_rows(report: Any) -> list[tuple[str, str]]:
    """The rows of a base load's report for the CLI table: the tensors it left are the rule's."""
    from surgery.weights.report import IGNORED_LABEL

    return [("tensors left for the rule's weights" if label == IGNORED_LABEL else label, value)
            for label, value in report.as_rows()]


def load_lora(module: nn.Module, path: str, rule: Any, scale: float, map_name: str | None) -> Any:
    """``load_lora_file`` (adapter ``default``) with the named key map."""
    from surgery.lora import load_lora_file

    try:
        return load_lora_file(module, path, scale=scale, key_map=key_map(rule, map_name))
    except WeightsError as error:
        if map_name is not None:
            raise
        raise _for_the_command_line(error, rule, module, path, "--lora-key-map", _lora_fits) from error


__all__ = ["BaseFile", "base_file", "base_rows", "base_width", "bound_rule", "check_key_map_name", "key_map", "load_base", "load_lora",
           "load_weights"]
