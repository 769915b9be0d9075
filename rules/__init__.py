"""Rules as data. ``RULES`` maps a rule name to its factory (``RULES["vace"](**options) -> surgery.Rule``).

The built-in rules are listed here; other packages add theirs through the entry-point group
``surgery.rules`` (name = rule name, value = ``"module:factory"``), e.g. in their
``pyproject.toml``::

    [project.entry-points."surgery.rules"]
    my-rule = "my_package.rule:rule"

A built-in name cannot be taken over by a package. Factories are imported on first access,
so listing rule names (``surgery rules``, argparse choices) never imports a rule's module or
its dependencies; the entry points are read once, on first use (``RULES.refresh()`` reads
them again, after installing a package in a running process).
"""
from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterator, Mapping
from typing import Any

#: The entry-point group through which installed packages register rules.
ENTRY_POINT_GROUP = "surgery.rules"

#: rule name -> "module:attribute" of its factory.
_FACTORIES: dict[str, str] = {
    "vace": "rules.vace:rule",
    "ffn-adapter": "rules.ffn_adapter:rule",
    "attention-swap": "rules.attention_swap:rule",
}


def installed_rules(group: str = ENTRY_POINT_GROUP) -> dict[str, tuple[str, str]]:
    """Rules that installed packages register: name -> (``"module:attribute"``, distribution)."""
    found = {}
    for point in importlib.metadata.entry_points(group=group):
        dist = getattr(point, "dist", None)
        found[point.name] = (point.value, dist.name if dist is not None else "?")
    return found


class _LazyRules(Mapping[str, Callable[..., Any]]):
    """Read-only mapping that imports a rule factory the first time it is looked up."""

    def __init__(self, builtin: Mapping[str, str], group: str | None = None) -> None:
        self._builtin = dict(builtin)
        self._group = group
        self._installed: dict[str, tuple[str, str]] | None = None
        self._loaded: dict[str, Callable[..., Any]] = {}

    @property
    def spec(self) -> dict[str, str]:
        """Rule name -> ``"module:attribute"``: the built-ins, then the installed ones."""
        return {**self._builtin, **{name: value for name, (value, _) in self._packages().items()}}

    def origin(self, name: str) -> str:
        """``"built-in"``, or the distribution that registers rule ``name``."""
        return "built-in" if name in self._builtin else self._packages()[name][1]

    def _packages(self) -> dict[str, tuple[str, str]]:
        if self._installed is None:
            found = installed_rules(self._group) if self._group else {}
            self._installed = {name: entry for name, entry in found.items() if name not in self._builtin}
        return self._installed

    def refresh(self) -> None:
        """Read the installed packages' rules again (after ``pip install`` in this process)."""
        importlib.invalidate_caches()
        self._installed = None
        self._loaded.clear()

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self._loaded:
            module_name, attr = self.spec[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module_name), attr)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.spec)

    def __len__(self) -> int:
        return len(self.spec)

    def __repr__(self) -> str:
        return f"RULES({', '.join(self.spec)})"


RULES: Mapping[str, Callable[..., Any]] = _LazyRules(_FACTORIES, ENTRY_POINT_GROUP)

__all__ = ["ENTRY_POINT_GROUP", "RULES", "installed_rules"]
