"""A rule's own checks of a weights file against the model (``Rule.check_weights``).

The loader checks what holds for any grafted weights (keys, shapes, dtypes, finite values,
regular files); what only a rule knows (its branch's input width, its depth, a tensor whose
values must not all be zero) comes from the rule as a :class:`WeightChecks`, and runs at the
same points: from the headers before any tensor is read, then on each converted value before
the module is touched.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgery.weights.files import TensorEntry

#: ``fit(where, stored, held)``: the file's tensors (model key -> header entry) and the model's
#: (key -> tensor) under the rule's prefixes; raises ``WeightsError`` for a file that does not fit
#: the model in the rule's terms and returns facts about the file for the load report.
FitCheck = Callable[[str, Mapping[str, TensorEntry], Mapping[str, torch.Tensor]], Mapping[str, Any]]
#: ``value(key, entry, converted)``: raises ``WeightsError`` for values the rule cannot use.
ValueCheck = Callable[[str, TensorEntry, torch.Tensor], None]
#: ``layout_fix(unexpected)``: the fix for stored names of another layout, when no rule rewrote
#: the module (a rewritten module's rule offers its key maps instead), or ``None``.
LayoutFix = Callable[[Sequence[str]], "str | None"]


@dataclass(frozen=True)
class WeightChecks:
    """What a rule checks in a weights file beyond what every grafted module needs.

    Args:
        label: how messages name the rule's weights ("2 <label> keys missing"); ``None``: the
            rule's name.
        fit: checks the file against the model from the headers (see :data:`FitCheck`); its
            facts (label -> value) become rows of the load report.
        value: checks one tensor's converted values (see :data:`ValueCheck`).
        layout_fix: names the key map for a file of another layout (see :data:`LayoutFix`).
        mismatch_fix: the fix for keys or shapes that do not fit when no key map explains them.
    """

    label: str | None = None
    fit: FitCheck | None = None
    value: ValueCheck | None = None
    layout_fix: LayoutFix | None = None
    mismatch_fix: str | None = None


__all__ = ["FitCheck", "LayoutFix", "ValueCheck", "WeightChecks"]
