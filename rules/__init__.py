"""Rules as data. ``RULES`` maps a rule name to its factory (``RULES["vace"](**options) -> surgery.Rule``).

Factories are imported on first access, so listing rule names (``surgery rules``, argparse
choices) never imports a rule's module or its dependencies.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

#: rule name -> "module:attribute" of its factory.
_FACTORIES: dict[str, str] = {
    "vace": "rules.vace:rule",
}


class _LazyRules(Mapping[str, Callable[..., Any]]):
    """Read-only mapping that imports a rule factory the first time it is looked up."""

    def __init__(self, spec: Mapping[str, str]) -> None:
        self._spec = dict(spec)
        self._loaded: dict[str, Callable[..., Any]] = {}

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self._loaded:
            module_name, attr = self._spec[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module_name), attr)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spec)

    def __len__(self) -> int:
        return len(self._spec)

    def __repr__(self) -> str:
        return f"RULES({', '.join(self._spec)})"


RULES: Mapping[str, Callable[..., Any]] = _LazyRules(_FACTORIES)

__all__ = ["RULES"]
