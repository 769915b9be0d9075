"""The rewritten model's module tree, parameters and state_dict against the reference's.

The reference may lay its modules out differently (a wrapper holding the base model as a
child, aliases of the same blocks). Its names are read through a key map to the native
layout, which is the rewritten model's own layout, and each native name becomes one row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import SurgeryError

NameMap = Callable[[str], "str | None"]


@dataclass(frozen=True)
class StructureRow:
    """One native name: what each side has there.

    ``section`` is ``"module"``, ``"parameter"`` or ``"state_dict"``; ``rewritten`` and
    ``reference`` describe the entry (class name, or ``shape dtype``), ``None`` when
    absent; ``reference_names`` are the reference's own names for it (aliases included).
    """

    section: str
    name: str
    rewritten: str | None
    reference: str | None
    reference_names: tuple[str, ...]
    ok: bool
    note: str = ""

    def describe(self) -> str:
        return (f"{self.section} {self.name or '<root>'}: rewritten {self.rewritten or '-'}, reference "
                f"{self.reference or '-'}" + (f" ({self.note})" if self.note else ""))


def map_name(to_native: NameMap, name: str, module: bool = False) -> str | None:
    """A reference name in the native layout, or None when the key map has no rule for it.

    Key maps are written for state_dict keys (prefix rules), so module paths are mapped
    with a trailing dot; the root is ``""``.
    """
    try:
        mapped = to_native(name + "." if module else name)
    except SurgeryError:
        return None
    if mapped is None:
        return None
    return mapped[:-1] if module and mapped.endswith(".") else mapped


def _tensor(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _class_ok(a: type, b: type) -> bool:
    # Generated subclasses (the rewritten root, a wrapper's block that adds the rule's output)
    # keep the base class in their MRO; one side's class must be the other's or derive from it.
    return issubclass(a, b) or issubclass(b, a)


def _compare_tensors(section: str, ours: dict[str, torch.Tensor],
                     theirs: Iterable[tuple[str, torch.Tensor]], to_native: NameMap) -> list[StructureRow]:
    mapped: dict[str, list[tuple[str, torch.Tensor]]] = {}
    rows: list[StructureRow] = []
    for name, tensor in theirs:
        native = map_name(to_native, name)
        if native is None:
            rows.append(StructureRow(section, f"<unmapped>.{name}", None, _tensor(tensor), (name,), False,
                                     "the key map has no native name for this reference key"))
            continue
        mapped.setdefault(native, []).append((name, tensor))
    for native in sorted(set(ours) | set(mapped)):
        entries = mapped.get(native, [])
        names = tuple(n for n, _ in entries)
        if len({id(t) for _, t in entries}) > 1:
            rows.append(StructureRow(section, native, _tensor(ours[native]) if native in ours else None,
                                     " | ".join(_tensor(t) for _, t in entries), names, False,
                                     "several different reference tensors map to this name"))
            continue
        mine = _tensor(ours[native]) if native in ours else None
        other = _tensor(entries[0][1]) if entries else None
        if mine is None:
            rows.append(StructureRow(section, native, None, other, names, False, "missing in the rewritten model"))
        elif other is None:
            rows.append(StructureRow(section, native, mine, None, (), False, "missing in the reference"))
        else:
            rows.append(StructureRow(section, native, mine, other, names, mine == other,
                                     "" if mine == other else "shape or dtype differs"))
    return rows


def compare_modules(rewritten: nn.Module, reference: nn.Module, to_native: NameMap) -> list[StructureRow]:
    """One row per native module path: classes must match (one may derive from the other).

    A reference module without a native name (the wrapper itself) is not a row when every
    state_dict key under it maps to a native name; otherwise it is reported as unmapped.
    """
    ours = dict(rewritten.named_modules())
    mapped: dict[str, list[tuple[str, nn.Module]]] = {}
    rows: list[StructureRow] = []
    for name, module in reference.named_modules(remove_duplicate=False):
        native = map_name(to_native, name, module=True)
        if native is None:
            keys = [f"{name}.{k}" if name else k for k in module.state_dict()]
            if any(map_name(to_native, k) is None for k in keys):
                rows.append(StructureRow("module", f"<unmapped>.{name}", None, type(module).__name__, (name,), False,
                                         "has state the key map does not place in the native layout"))
            continue
        mapped.setdefault(native, []).append((name, module))
    for native in sorted(set(ours) | set(mapped)):
        entries = mapped.get(native, [])
        names = tuple(n for n, _ in entries)
        mine = ours.get(native)
        if len({id(m) for _, m in entries}) > 1:
            rows.append(StructureRow("module", native, type(mine).__name__ if mine is not None else None,
                                     " | ".join(type(m).__name__ for _, m in entries), names, False,
                                     "several different reference modules map to this path"))
            continue
        other = entries[0][1] if entries else None
        if mine is None or other is None:
            rows.append(StructureRow("module", native, type(mine).__name__ if mine is not None else None,
                                     type(other).__name__ if other is not None else None, names, False,
                                     "missing in the " + ("rewritten model" if mine is None else "reference")))
            continue
        ok = _class_ok(type(mine), type(other))
        rows.append(StructureRow("module", native, type(mine).__name__, type(other).__name__, names, ok,
                                 "" if ok else "classes are unrelated"))
    return rows


def compare_structure(rewritten: nn.Module, reference: nn.Module, to_native: NameMap) -> list[StructureRow]:
    """Module tree, parameters and state_dict of both models, row by native name."""
    rows = compare_modules(rewritten, reference, to_native)
    rows += _compare_tensors("parameter", dict(rewritten.named_parameters()),
                             reference.named_parameters(remove_duplicate=False), to_native)
    rows += _compare_tensors("state_dict", dict(rewritten.state_dict()),
                             reference.state_dict(keep_vars=True).items(), to_native)
    return rows


__all__ = ["StructureRow", "compare_modules", "compare_structure", "map_name"]
