"""Where surgery finds the rule registry and the built-in models: entry points, so that the
engine imports no rule and no model package by name.

A package provides them in its ``pyproject.toml`` (this repository's ``rules`` and
``examples`` packages do)::

    [project.entry-points."surgery.catalogue"]
    rules = "rules:RULES"      # a Mapping: rule name -> rule factory
    models = "examples"        # a module with PIPELINES, PIPELINE_MODULES and a .driver submodule

Entry points come from the installed distribution's metadata (``pip install -e .``); a
checkout that is not installed has no catalogue, so the CLI lists no built-in rules or models.
"""
from __future__ import annotations

import importlib.metadata
from types import ModuleType
from typing import Any, Callable, Mapping

#: The entry-point group of the catalogue.
GROUP = "surgery.catalogue"


def _entry(name: str) -> Any | None:
    """The object the first installed entry point ``name`` of :data:`GROUP` names; ``None`` if none
    is installed or its package is not importable."""
    for point in importlib.metadata.entry_points(group=GROUP):
        if point.name == name:
            try:
                return point.load()
            except ImportError:
                return None
    return None


def rule_registry() -> Mapping[str, Callable[..., Any]]:
    """Rule name -> factory, from the registered rule registry (``{}`` without one)."""
    return _entry("rules") or {}


def default_rule() -> str | None:
    """The rule the CLI applies without ``--rule``: the registry's first (``None`` without one).
    Its goldens are the unqualified ``<model>.graph.txt``."""
    return next(iter(rule_registry()), None)


def models_module() -> ModuleType | None:
    """The registered module of built-in models (``PIPELINES``, ``PIPELINE_MODULES``, ``.driver``), or ``None``."""
    found = _entry("models")
    return found if isinstance(found, ModuleType) else None


__all__ = ["GROUP", "default_rule", "models_module", "rule_registry"]
