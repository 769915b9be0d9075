"""Find the units that satisfy a pattern: every one, or those of one residual chain."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch.fx as fx
import torch.nn as nn

from ..errors import MatchError
from ..tracing.tracer import ModuleCall, Trace, _clone_proxy, _map_proxies, _proxies
from .pattern import CallView, Pattern, view_of


#: Match fields renamed since report schema 1 (and pickles of that time): old name -> name.
SCHEMA_1_RENAMES = {"hint_index": "index"}


def current_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A match's fields (a pickled ``Match``'s state, a report's match) under today's names."""
    return {SCHEMA_1_RENAMES.get(name, name): value for name, value in fields.items()}


@dataclass(frozen=True)
class Match:
    """One matched unit: its module path, class (for reports), position in execution order,
    and ``index``, the rule's own numbering of the units it acts on (``Rule.assign``; ``None``:
    the rule leaves this unit alone)."""

    name: str
    cls: str
    position: int
    index: int | None = None

    def __setstate__(self, state: dict) -> None:
        # Models pickled before a field was renamed carry it under its schema-1 name.
        self.__dict__.update(current_fields(state))


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


def unit_calls(calls: Sequence[ModuleCall], root: nn.Module) -> list[ModuleCall]:
    """Every module call of a trace in execution order, the parts of replayed calls included.

    The tracer records a replayed call (a block identical to one traced before, whose nodes
    were copied) as one call; the calls inside it exist only in its template. They are
    rebuilt here from the template's, with their nodes and values moved to the copy, so a
    pattern sees the FFN of every block, not only of the first.
    """
    expanded: list[ModuleCall] = []
    position: dict[int, int] = {}
    for call in calls:
        position[id(call)] = len(expanded)
        expanded.append(call)
        if call.template is not None and id(call.template) in position:
            expanded.extend(_moved(call, _parts(expanded, position[id(call.template)]), root))
    return expanded


def _parts(calls: list[ModuleCall], index: int) -> list[ModuleCall]:
    """The calls made inside ``calls[index]``: the deeper run right after it."""
    depth, end = calls[index].depth, index + 1
    while end < len(calls) and calls[end].depth > depth:
        end += 1
    return calls[index + 1:end]


def _moved(call: ModuleCall, parts: list[ModuleCall], root: nn.Module) -> list[ModuleCall]:
    """``parts`` of ``call.template`` as the same calls inside the replayed ``call``."""
    template = call.template
    env: dict[fx.Node, fx.Node] = dict(zip(template.nodes, call.nodes))
    for old, new in zip(_proxies((template.args, template.kwargs)), _proxies((call.args, call.kwargs))):
        env[old.node] = new.node
    old_prefix, new_prefix = template.qualname + ".", call.qualname + "."

    def move(value: Any) -> Any:
        return _map_proxies(value, lambda p: _clone_proxy(p, env.get(p.node, p.node), p.tracer))

    moved = []
    for part in parts:
        qualname = new_prefix + part.qualname[len(old_prefix):] if part.qualname.startswith(old_prefix) \
            else part.qualname
        depth = part.depth + call.depth - template.depth
        moved.append(ModuleCall(qualname, root.get_submodule(qualname), move(part.args), move(part.kwargs),
                                move(part.output), depth=depth, index=call.index,
                                nodes=[env.get(n, n) for n in part.nodes], template=part.template or part))
    return moved


def find_units(trace: Trace, root: nn.Module, pattern: Pattern) -> MatchResult:
    """The calls that satisfy ``pattern``, selected as the pattern says (:attr:`Pattern.select`).

    Raises:
        MatchError: with ``select="all"``, one match runs inside another.
    """
    calls = unit_calls(trace.calls, root)
    full: list[CallView] = []
    partial: list[PartialMatch] = []
    for call in calls:
        view = view_of(call, root)
        passed, failed, reason = pattern.evaluate(view)
        if failed is None:
            full.append(view)
        else:
            partial.append(PartialMatch(call.qualname or "<root>", type(call.module).__name__, passed, failed, reason))
    if full and pattern.select == "chain":
        depth = min(v.call.depth for v in full)
        full = _longest_chain([v for v in full if v.call.depth == depth])
    elif full:
        _refuse_nested(calls, full, pattern)
    matches = [Match(v.qualname, type(v.call.module).__name__, i) for i, v in enumerate(full)]
    partial.sort(key=lambda p: -p.passed)
    return MatchResult(full, matches, partial, calls)


def _refuse_nested(calls: list[ModuleCall], views: list[CallView], pattern: Pattern) -> None:
    """A match inside another means the checks describe what a unit contains, not what it is."""
    matched = {id(v.call): v.qualname for v in views}
    open_calls: list[ModuleCall] = []  # the calls the current one runs inside
    for call in calls:
        while open_calls and open_calls[-1].depth >= call.depth:
            open_calls.pop()
        if id(call) in matched:
            outer = next((c for c in open_calls if id(c) in matched), None)
            if outer is not None:
                raise MatchError(
                    f"pattern '{pattern.name}' matched {call.qualname} and also {outer.qualname}, which runs it",
                    "make the checks say what the unit is rather than what it contains (e.g. "
                    "surgery.matching.pattern.is_feed_forward instead of feed_forward), or give the pattern "
                    "select='chain' to keep only the outermost chain of units")
        open_calls.append(call)


def _longest_chain(views: list[CallView]) -> list[CallView]:
    best: list[CallView] = []
    current: list[CallView] = []
    for view in views:
        if current and view.stream_in is not current[-1].stream_out:
            best = current if len(current) > len(best) else best
            current = []
        current.append(view)
    return current if len(current) > len(best) else best


def expect_count(result: MatchResult, pattern: Pattern, expected: int, rule_name: str,
                 count_option: str | None = None) -> None:
    """Raise a MatchError naming the nearest partial matches if the count is wrong.

    ``count_option`` is the rule's option that sets the expected count: the fix names it.
    """
    found = len(result.matches)
    if found == expected:
        return
    near = "; ".join(p.describe(len(pattern.checks)) for p in result.partial[:3]) or "no candidates"
    raise MatchError(
        f"rule '{rule_name}' expected {expected} {pattern.name}(s) but matched {found} "
        f"({', '.join(m.name for m in result.matches[:6])}{'...' if found > 6 else ''}); nearest partial matches: {near}",
        _count_fix(result, found, pattern.name, rule_name, count_option))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _count_fix(result: MatchResult, found: int, unit: str, rule_name: str, count_option: str | None) -> str:
    """What to do about a wrong count, from what the nearest candidate failed."""
    if found:
        change = (f"set the rule's {count_option} option to {found}" if count_option else
                  f"rule '{rule_name}' expects another count and has no option to change it")
        return (f"if the model has {found} such {unit}s, {change}; otherwise the nearest partial matches above "
                f"name the check the other {unit}s fail")
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
