"""A module's constructor settings, read back from the module: never a silent default.

A grafted unit is a fresh instance of a matched module's class, so every argument of that
class's ``__init__`` must be known. Families keep them differently: one (e.g. the Wan family)
stores each one as an attribute of the block; diffusers' blocks store none, but the model's
``config`` holds some and the block's structure implies the rest (``dim`` is the width of
its projections). Three sources, tried in this order:

* ``"attributes"``: an attribute of that name on the module, on one of its descendants
  (first in definition order), or on the model;
* ``"config"``: a key of that name in the module's or the model's ``config`` (a mapping,
  as diffusers' ``ConfigMixin`` keeps it, or a plain object);
* ``"structure"``: the settings still missing (defaulted or not) are solved. Candidate
  values (the default first, then the scalar attributes and parameter sizes found in the
  module) are tried until an instance built on ``meta`` has exactly the module's
  submodule classes and parameter shapes, and the same value for every scalar attribute
  both have.

A setting no allowed source yields is an error naming it, even when ``__init__`` has a
default for it: a default that does not match the block (``cross_attn_norm=False`` gives an
``Identity`` where the block has a ``LayerNorm``) would build a different module silently.
"""
from __future__ import annotations

import inspect
import itertools
import math
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..errors import GraftError

#: The sources :func:`constructor_arguments` may read, in lookup order.
SOURCES = ("attributes", "config", "structure")
#: Most candidate instances built when solving settings from the structure.
STRUCTURE_TRIES = 256

_SCALARS = (bool, int, float, str, type(None))
_TYPE_NAMES = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}
_EMPTY = inspect.Parameter.empty


def constructor_arguments(module: nn.Module, root: nn.Module | None = None,
                          overrides: Mapping[str, Any] | None = None, sources: Sequence[str] = SOURCES,
                          build: Callable[[dict[str, Any]], nn.Module] | None = None) -> dict[str, Any]:
    """Arguments for ``type(module)(**kwargs)``, every one of them found or solved.

    Args:
        module: the module to describe.
        root: the model it belongs to (its attributes and ``config`` are searched too).
        overrides: settings given outright; they win over every source.
        sources: which of :data:`SOURCES` to use (a model family's profile names them).
        build: builds a candidate from keyword arguments for ``"structure"`` (default:
            the class itself, on ``meta``).

    Raises:
        GraftError: a setting no source yields, named, with what was searched.
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise GraftError(f"unknown constructor-setting source(s) {unknown}", f"use some of {list(SOURCES)}")
    cls = type(module)
    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    given = {name: value for name, value in dict(overrides or {}).items() if name in {p.name for p in params}}
    lookups = _lookups(module, root, sources)
    found: dict[str, Any] = {}
    missing = []
    for param in params:
        for lookup in lookups:
            hit = lookup(param.name)
            if hit is not _EMPTY:
                found[param.name] = hit
                break
        else:
            missing.append(param)
    unknown_names = [p.name for p in missing if p.name not in given]
    if not unknown_names:
        return {**found, **given}
    names = ", ".join(f"'{name}'" for name in unknown_names)
    searched = _searched(sources)
    if "structure" not in sources:
        raise GraftError(f"cannot rebuild {cls.__name__}: constructor argument(s) {names} are not found in {searched}",
                         f"pass them as constructor overrides, e.g. {{'{unknown_names[0]}': ...}}, or allow the "
                         f"'structure' source")
    # Overridden settings are solved too: the candidates must reproduce the module as it is.
    solved = _solve(module, found, missing, build or _meta_builder(cls))
    if isinstance(solved, str):
        raise GraftError(f"cannot rebuild {cls.__name__}: constructor argument(s) {names} are not found in {searched}, "
                         f"and no candidate values rebuild its structure ({solved})",
                         f"pass them as constructor overrides, e.g. {{'{unknown_names[0]}': ...}}")
    return {**found, **solved, **given}


def _lookups(module: nn.Module, root: nn.Module | None, sources: Sequence[str]) -> list[Callable[[str], Any]]:
    owners = [module] + [m for _, m in module.named_modules() if m is not module]
    lookups: list[Callable[[str], Any]] = []
    if "attributes" in sources:
        lookups += [_attribute_of(owner) for owner in owners + ([root] if root is not None else [])]
    if "config" in sources:
        lookups += [_config_of(owner) for owner in (module, root) if owner is not None]
    return lookups


def _searched(sources: Sequence[str]) -> str:
    places = {"attributes": "the attributes of the module, its children and the model",
              "config": "the module's and the model's config"}
    return ", or in ".join(places[s] for s in sources if s in places) or "no source"


def _attribute_of(owner: Any) -> Callable[[str], Any]:
    def lookup(name: str) -> Any:
        attrs = vars(owner)
        return attrs[name] if name in attrs and not name.startswith("_") else _EMPTY
    return lookup


def _config_of(owner: nn.Module) -> Callable[[str], Any]:
    try:
        config = getattr(owner, "config", None)
    except Exception:  # a config property that fails to build is no config
        config = None

    def lookup(name: str) -> Any:
        if isinstance(config, Mapping):
            return config[name] if name in config else _EMPTY
        attrs = getattr(config, "__dict__", {})
        return attrs[name] if config is not None and name in attrs else _EMPTY
    return lookup


def _meta_builder(cls: type) -> Callable[[dict[str, Any]], nn.Module]:
    def build(kwargs: dict[str, Any]) -> nn.Module:
        with torch.device("meta"):
            return cls(**kwargs)
    return build


def _solve(module: nn.Module, found: dict[str, Any], missing: list[inspect.Parameter],
           build: Callable[[dict[str, Any]], nn.Module]) -> dict[str, Any] | str:
    """Values for ``missing`` under which a built instance has ``module``'s structure, or why none."""
    target = structure_of(module)
    pool = list(_candidates(module))
    choices = itertools.product(*(_ordered(param, pool) for param in missing))
    closest: tuple[float, str] | None = None  # (number of differences, description)
    tries = 0
    for values in itertools.islice(choices, STRUCTURE_TRIES):
        tries += 1
        guess = dict(zip((p.name for p in missing), values))
        try:
            with warnings.catch_warnings():  # odd candidates make constructors warn (zero-size tensors)
                warnings.simplefilter("ignore")
                differences = structure_differences(structure_of(build({**found, **guess})), target)
        except Exception as error:  # the constructor refusing a candidate is a failed try
            differences = [f"{type(error).__name__}: {error}"]
            if closest is None:
                closest = (math.inf, f"with {_shown(guess)}: {differences[0]}")
            continue
        if not differences:
            return guess
        if closest is None or len(differences) < closest[0]:
            closest = (len(differences), f"closest, with {_shown(guess)}: {differences[0]}")
    return f"{tries} tried; {closest[1]}" if closest else "no candidate values"


def _shown(guess: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in guess.items())


def _candidates(module: nn.Module) -> Iterator[Any]:
    """Scalar attribute values and parameter sizes of ``module``, in definition order."""
    for sub in module.modules():
        for attr, value in vars(sub).items():
            if not attr.startswith("_") and attr != "training" and isinstance(value, _SCALARS):
                yield value
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        yield from tensor.shape


def _ordered(param: inspect.Parameter, pool: list[Any]) -> list[Any]:
    """The default first, then every distinct pool value of a type the parameter takes (flags
    and ``None`` always among them)."""
    kinds = _kinds(param)
    seen: set[tuple[type, Any]] = set()
    out = []
    for value in ([] if param.default is _EMPTY else [param.default]) + pool + [True, False, None]:
        key = (type(value), value)
        if key in seen or (kinds is not None and not isinstance(value, kinds)) or \
                (isinstance(value, bool) and kinds is not None and bool not in kinds):
            continue
        seen.add(key)
        out.append(value)
    return out


def _kinds(param: inspect.Parameter) -> tuple[type, ...] | None:
    """The scalar types a parameter takes, from its annotation or default (None: any)."""
    annotation = param.annotation
    if annotation is not _EMPTY:
        kinds = _annotation_kinds(annotation)
        if kinds is not None:
            return tuple(set(kinds) | ({int} if float in kinds else set()))
    default = param.default
    if default is _EMPTY or default is None or not isinstance(default, _SCALARS):
        return None
    return (float, int) if isinstance(default, float) else (type(default),)


def _annotation_kinds(annotation: Any) -> tuple[type, ...] | None:
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.removeprefix("Optional[").removesuffix("]").split("|")]
        if annotation.startswith("Optional["):
            parts.append("None")
        kinds = [_TYPE_NAMES.get(p) for p in parts]
        return None if None in kinds else tuple(kinds)
    if annotation is None:
        return (type(None),)
    if annotation in _SCALARS:
        return (annotation,)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [_annotation_kinds(a) for a in typing.get_args(annotation)]
        return None if None in kinds else tuple(k for group in kinds for k in group)
    return None


def structure_of(module: nn.Module) -> dict[tuple[str, str, str], Any]:
    """Submodule classes, parameter and buffer shapes, and plain scalar attributes, by path."""
    entries: dict[tuple[str, str, str], Any] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        entries[(path, "class", "")] = type(sub)
        for name, tensor in itertools.chain(sub._parameters.items(), sub._buffers.items()):
            entries[(path, "tensor", name)] = None if tensor is None else tuple(tensor.shape)
        for attr, value in vars(sub).items():
            if not attr.startswith("_") and attr != "training" and _is_scalar(value):
                entries[(path, "scalar", attr)] = value
    return entries


def structure_difference(built: dict[tuple[str, str, str], Any], target: dict[tuple[str, str, str], Any]) -> str | None:
    """The first way ``built`` differs from ``target`` (see :func:`structure_of`), or None."""
    differences = structure_differences(built, target)
    return differences[0] if differences else None


def structure_differences(built: dict[tuple[str, str, str], Any], target: dict[tuple[str, str, str], Any]) -> list[str]:
    """Every way ``built`` differs from ``target``, outermost first.

    Classes and tensors must agree both ways; a scalar attribute only where both have it,
    since a model may set attributes of its own after construction.
    """
    out = []
    for key in sorted(set(built) | set(target), key=lambda k: (k[0].count("."), k)):
        path, kind, name = key
        where = ".".join(p for p in (path, name) if p) or "<module>"
        if kind == "scalar":
            if key in built and key in target and built[key] != target[key] and built[key] == built[key]:
                out.append(f"{where} is {built[key]!r}, the module has {target[key]!r}")
        elif key not in built:
            out.append(f"{where} is missing" if kind == "tensor" else f"{where} ({target[key].__name__}) is missing")
        elif key not in target:
            out.append(f"{where} is extra" if kind == "tensor" else f"{where} ({built[key].__name__}) is extra")
        elif built[key] != target[key]:
            out.append(f"{where} is {built[key].__name__}, the module has {target[key].__name__}" if kind == "class"
                       else f"{where} has shape {list(built[key] or [])}, the module has {list(target[key] or [])}")
    return out


def _is_scalar(value: Any) -> bool:
    return isinstance(value, _SCALARS) or (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value))
