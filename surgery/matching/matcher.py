"""Find the repeated units of the main chain that satisfy a pattern."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import MatchError
from ..tracing.tracer import Trace
from .pattern import CallView, Pattern, view_of


@dataclass(frozen=True)
class Match:
    """One matched unit: its module path, class (for reports), chain position, hint index."""

    name: str
    cls: str
    position: int
    hint_index: int | None = None


@dataclass(frozen=True)
class PartialMatch:
    """A candidate that failed: how far it got and why it stopped."""

    name: str
    cls: str
    passed: int
    failed_check: str
    reason: str

    def describe(self, total: int) -> str:
        return f"{self.name} ({self.cls}) passed {self.passed}/{total}, failed '{self.failed_check}': {self.reason}"


@dataclass
class MatchResult:
    views: list[CallView]
    matches: list[Match]
    partial: list[PartialMatch]
    calls: list = field(default_factory=list, repr=False)  # the traced calls, for explaining a failure


def find_chain(trace: Trace, root: nn.Module, pattern: Pattern) -> MatchResult:
    """All calls that satisfy ``pattern`` and form one chain (each feeds the next).

    Calls at the outermost depth that matches win; the chain order is execution order.
    """
    full: list[CallView] = []
    partial: list[PartialMatch] = []
    for call in trace.calls:
        view = view_of(call, root)
        passed, failed, reason = pattern.evaluate(view)
        if failed is None:
            full.append(view)
        else:
            partial.append(PartialMatch(call.qualname or "<root>", type(call.module).__name__, passed, failed, reason))
    if full:
        depth = min(v.call.depth for v in full)
        full = [v for v in full if v.call.depth == depth]
        full = _longest_chain(full)
    matches = [Match(v.qualname, type(v.call.module).__name__, i) for i, v in enumerate(full)]
    partial.sort(key=lambda p: -p.passed)
    return MatchResult(full, matches, partial, list(trace.calls))


def _longest_chain(views: list[CallView]) -> list[CallView]:
    best: list[CallView] = []
    current: list[CallView] = []
    for view in views:
        if current and view.stream_in is not current[-1].stream_out:
            best = current if len(current) > len(best) else best
            current = []
        current.append(view)
    return current if len(current) > len(best) else best


def expect_count(result: MatchResult, pattern: Pattern, expected: int, rule_name: str) -> None:
    """Raise a MatchError naming the nearest partial matches if the count is wrong."""
    found = len(result.matches)
    if found == expected:
        return
    near = "; ".join(p.describe(len(pattern.checks)) for p in result.partial[:3]) or "no candidates"
    raise MatchError(
        f"rule '{rule_name}' expected {expected} {pattern.name}(s) but matched {found} "
        f"({', '.join(m.name for m in result.matches[:6])}{'...' if found > 6 else ''}); nearest partial matches: {near}",
        _count_fix(result, found))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _count_fix(result: MatchResult, found: int) -> str:
    """What to do about a wrong count, from what the nearest candidate failed."""
    if found:
        return (f"if the model has {found} such blocks, set the rule's num_layers option to {found}; otherwise the "
                "nearest partial matches above name the check the other blocks fail")
    nearest = result.partial[0] if result.partial else None
    if nearest is not None and "attention" in nearest.failed_check:
        call = next((c for c in result.calls if (c.qualname or "<root>") == nearest.name), None)
        inside = [c.qualname for c in result.calls if call is not None and c.depth == call.depth + 1
                  and c.qualname.startswith(nearest.name + ".") and not isinstance(c.module, _CONTAINERS)]
        if inside:
            # Every block alike: the block index becomes a wildcard (``blocks.*.cross_attn``).
            names = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name, count=1) for name in inside))
            shown = ", ".join(f"'{name}'" for name in names)
            return (f"the matcher sees attention only as one opaque call, and {', '.join(inside)} were traced "
                    f"through: make the attention modules among them leaves: rule = dataclasses.replace(rule, "
                    f"trace_policy=rule.trace_policy.with_leaves({shown}))")
    reason = f"'{nearest.failed_check}' ({nearest.reason})" if nearest is not None else "no candidate block"
    return (f"no block of this model has the structure the rule needs: the nearest fails {reason}; the rule "
            "does not apply to this model as it is")
