"""Validation: the rewritten model against a hand-written reference.

``surgery apply --validate`` and ``surgery validate`` call :func:`validation_cases` and run
the cases one by one; :func:`validate` runs them all and returns a :class:`ValidationReport`.
The reference itself comes from a :class:`Harness` that the model's owner provides (the
engine names no model family).

* :mod:`.harness`: the harness and how it is discovered;
* :mod:`.rule_reference`: a rule's own reference (``Rule.reference``) in the harness's place;
* :mod:`.cases`: the named cases (``structure``, ``graph``, ``<rule>-off``, ``<rule>-on``,
  ``scales``, ``lora``) and how they drive models without changing them;
* :mod:`.structure`: module tree, parameters and state_dict through the key map;
* :mod:`.reference_trace`, :mod:`.dataflow`, :mod:`.graphs`: the reference traced with the
  engine's tracer, both graphs reduced to tensor dataflow, compared with networkx;
* :mod:`.tolerances`: the per-device, per-dtype tolerance table (exact on CPU float32).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import InputError, SurgeryError
from ..lora.order import applied_rules
from .cases import Case, CaseResult, Session, build_cases, default_scales, detached, seeded_weights
from .graphs import GraphComparison, GraphDifference, compare_graphs
from .reference_trace import trace_reference
from .rule_reference import first_rule_view, with_rule_reference
from .harness import Harness, Scenario, discover_harness
from .structure import StructureRow, compare_structure
from .tolerances import TOLERANCES, model_tolerance, tolerance


@dataclass
class ValidationReport:
    """Every case's verdict plus the structure table and the graph differences."""

    passed: bool
    cases: list[CaseResult]
    structure: list[StructureRow] = field(default_factory=list)
    graph: list[GraphDifference] = field(default_factory=list)
    graph_comparison: GraphComparison | None = None

    def case(self, name: str) -> CaseResult:
        """The result of the case called ``name``."""
        for result in self.cases:
            if result.name == name:
                return result
        raise KeyError(f"no validation case {name!r}; cases: {', '.join(c.name for c in self.cases)}")


def _discovered(result: Any, model: nn.Module, pipeline: Any, example_inputs: tuple[tuple, dict] | None) -> Harness:
    """The model owner's harness, with the rule's own reference when the rule writes one."""
    # A composed model's owner writes the reference of its first rule, applied to the base model.
    found = discover_harness(first_rule_view(result), model=model, pipeline=pipeline, example_inputs=example_inputs)
    return with_rule_reference(found, result)


def _refuse_rewritten(model: nn.Module) -> None:
    # A composed model's reference is built from the base: a rewritten model there would
    # get every rule applied twice, and the cases would compare the wrong models.
    rules = applied_rules(model)
    if rules:
        raise InputError(f"model= is already rewritten (by {', '.join(map(repr, rules))}), not the base model",
                         "pass model= the base model the first surgery.apply started from")


def validation_cases(result: Any, *, model: nn.Module, pipeline: Any = None,
                     example_inputs: tuple[tuple, dict] | None = None,
                     harness: Harness | None = None) -> list[Case]:
    """The validation cases for ``result`` (an ``ApplyResult``) of surgery on ``model``.

    Args:
        result: what :func:`surgery.apply` returned for ``model``.
        model: the base model the surgery was applied to (never modified by validation).
        pipeline: the model's pipeline description, used to find a harness when none is given.
        example_inputs: the ``(args, kwargs)`` given to ``apply`` (for the graph comparison).
        harness: the reference and driver; by default :func:`discover_harness` finds it, and
            a rule that writes its own reference (``Rule.reference``) replaces the reference.

    Returns:
        Cases with ``name``, ``tolerance`` and ``run() -> CaseResult``, in running order.

    Raises:
        InputError: no reference is known for the model, or ``result`` is a dry run.
    """
    _refuse_rewritten(model)
    harness = harness or _discovered(result, model, pipeline, example_inputs)
    return build_cases(Session(result, model, harness, example_inputs))


def validate(result: Any, *, model: nn.Module, pipeline: Any = None,
             example_inputs: tuple[tuple, dict] | None = None, harness: Harness | None = None) -> ValidationReport:
    """Run every case of :func:`validation_cases`; a case that raises fails with its error.

    A :class:`~surgery.errors.SurgeryError` (bad input, not a validation finding) propagates.
    """
    _refuse_rewritten(model)
    harness = harness or _discovered(result, model, pipeline, example_inputs)
    session = Session(result, model, harness, example_inputs)
    results = []
    for case in build_cases(session):
        try:
            results.append(case.run())
        except SurgeryError:
            raise
        except Exception as exc:  # one broken case must not hide the others
            last = traceback.extract_tb(exc.__traceback__)[-1]
            results.append(CaseResult(case.name, None, False, case.tolerance,
                                      error=f"{type(exc).__name__}: {exc} ({last.filename}:{last.lineno})"))
    comparison = session.graph_comparison
    return ValidationReport(all(r.passed for r in results), results, session.structure_rows,
                            list(comparison.differences) if comparison else [], comparison)


__all__ = [
    "TOLERANCES", "Case", "CaseResult", "GraphComparison", "GraphDifference", "Harness", "Scenario",
    "StructureRow", "ValidationReport", "compare_graphs", "compare_structure", "default_scales", "detached",
    "discover_harness", "model_tolerance", "seeded_weights", "tolerance", "trace_reference", "validate",
    "validation_cases", "with_rule_reference",
]
