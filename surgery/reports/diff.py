"""Graph diffs on canonical text: unified diffs, node-level change lists, goldens.

Nodes of the two graphs are aligned in passes of decreasing strictness: on the whole
line, then (inside each region that differs) on the line with node references blanked,
then on op/target/base name alone, so that a node whose inputs were rewired or whose
literal arguments changed shows up as *changed* rather than as a removal plus an addition.
"""
from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx

from surgery.errors import ReportError
from surgery.reports.canonical import ParsedLine, canonical_text, parse_canonical
from surgery.reports.files import atomic_write_text, path_kind

_COUNTER = re.compile(r"#\d+")
_REF = re.compile(r"%[^\s,()\[\]{}]+")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


@dataclass(frozen=True)
class NodeChange:
    """One node that differs: ``status`` is ``"added"``, ``"removed"`` or ``"changed"``."""

    status: str
    name: str
    op: str
    target: str
    scope: str
    role: str = ""
    before: str | None = None
    after: str | None = None
    detail: str = ""  # for "changed": which parts differ (inputs/arguments, shape, surgery role)

    def describe(self) -> str:
        """One line naming the node, its module path and op, e.g. ``added blocks.0: call_function operator.mul (%blocks.0/mul)``."""
        where = self.scope or "<top level>"
        what = f"{self.op} {self.target}".rstrip()
        role = f" [{self.role}]" if self.role else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.status} {where}: {what} ({self.name}){role}{detail}"


@dataclass
class GraphDiff:
    """Result of comparing two canonical graphs (``before`` -> ``after``)."""

    equal: bool
    unified: str
    changes: list[str]
    node_changes: list[NodeChange] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many nodes were added, removed and changed."""
        tally = Counter(c.status for c in self.node_changes)
        return {status: tally.get(status, 0) for status in ("added", "removed", "changed")}


def unified_diff(before: str, after: str, before_label: str = "before", after_label: str = "after", context: int = 3) -> str:
    """Unified diff between two canonical texts ('' when equal)."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=before_label,
        tofile=after_label,
        n=context,
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _strip_counters(text: str) -> str:
    return _COUNTER.sub("", text)


def _full_key(line: ParsedLine) -> str:
    # Counters (#k) shift when a same-named node is inserted earlier in the same scope, so
    # alignment ignores them; whether inputs really changed is checked after pairing.
    return _strip_counters(line.text)


def _literal_key(line: ParsedLine) -> str:
    # The line with every node reference blanked: pairs nodes whose inputs were rewired.
    return _REF.sub("%", line.text.split(" = ", 1)[1]) + " " + _strip_counters(line.name)


def _coarse_key(line: ParsedLine) -> str:
    # Op, target and base name only: pairs nodes whose literal arguments changed.
    return f"{line.op} {line.target} {_strip_counters(line.name)}"


_KEYS = (_full_key, _literal_key, _coarse_key)


def _split_line(text: str) -> tuple[str, str, str]:
    """(head with arguments, shape annotation, role annotation) of a canonical line."""
    text, _, role = text.partition("  # ")
    head, _, meta = text.partition(" :: ")
    return head, meta, role


def _what_changed(old: str, new: str) -> str:
    parts = ("inputs/arguments", "shape", "surgery role")
    return ", ".join(p for p, a, b in zip(parts, _split_line(old), _split_line(new)) if a != b)


def _change(status: str, old: ParsedLine | None, new: ParsedLine | None, detail: str = "") -> NodeChange:
    ref = new if new is not None else old
    assert ref is not None
    return NodeChange(
        status=status,
        name=ref.name,
        op=ref.op,
        target=ref.target,
        scope=ref.scope,
        role=ref.role,
        before=old.text if old else None,
        after=new.text if new else None,
        detail=detail,
    )


def _align(before: list[ParsedLine], after: list[ParsedLine], level: int = 0,
           offset: tuple[int, int] = (0, 0)) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Pair nodes of two graphs: returns (pairs, unpaired before indices, unpaired after indices).

    Each region left unpaired at one level is aligned again with a looser key, so a node
    is paired as strictly as possible: same line, then same literals, then same op/target.
    """
    i0, j0 = offset
    if level == len(_KEYS):
        return [], [i0 + i for i in range(len(before))], [j0 + j for j in range(len(after))]
    key = _KEYS[level]
    pairs: list[tuple[int, int]] = []
    removed: list[int] = []
    added: list[int] = []
    matcher = difflib.SequenceMatcher(a=[key(x) for x in before], b=[key(x) for x in after], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs += [(i0 + i, j0 + j) for i, j in zip(range(i1, i2), range(j1, j2))]
            continue
        p, r, a = _align(before[i1:i2], after[j1:j2], level + 1, (i0 + i1, j0 + j1))
        pairs += p
        removed += r
        added += a
    return pairs, removed, added


def node_changes(before: list[ParsedLine], after: list[ParsedLine]) -> list[NodeChange]:
    """Node-level changes from ``before`` to ``after``, sorted by position in ``after`` (removals by old position).

    A paired node is *changed* when its line differs after renaming every reference in the
    old line to the name its target has in the new graph: i.e. when its op, target,
    literal arguments, shape or any input really differ, not merely a name counter.
    """
    pairs, removed, added = _align(before, after)
    rename = {before[i].name: after[j].name for i, j in pairs}

    def translate(text: str) -> str:
        # Inputs that were removed keep an impossible name so the line cannot compare equal.
        return _REF.sub(lambda m: rename.get(m.group(0), m.group(0) + "<removed>"), text)

    keyed: list[tuple[tuple[int, int], NodeChange]] = []
    for i, j in pairs:
        old_text = translate(before[i].text)
        if old_text != after[j].text:
            detail = _what_changed(old_text, after[j].text)
            keyed.append(((j, 0), _change("changed", before[i], after[j], detail)))
    keyed += [((j, 0), _change("added", None, after[j])) for j in added]
    # A removed node sorts right after the new node that precedes its old position.
    new_pos = dict(pairs)
    prev_new = [-1] * (len(before) + 1)
    for k in range(len(before)):
        prev_new[k + 1] = max(prev_new[k], new_pos.get(k, -1))
    keyed += [((prev_new[i], 1), _change("removed", before[i], None)) for i in removed]
    keyed.sort(key=lambda item: item[0])
    return [change for _, change in keyed]


def diff_texts(before: str, after: str, before_label: str = "before", after_label: str = "after") -> GraphDiff:
    """Compare two canonical texts."""
    changes = node_changes(parse_canonical(before), parse_canonical(after))
    unified = unified_diff(before, after, before_label, after_label)
    return GraphDiff(
        equal=before == after,
        unified=unified,
        changes=[c.describe() for c in changes],
        node_changes=changes,
    )


def diff_graphs(before: torch.fx.Graph, after: torch.fx.Graph, before_label: str = "before", after_label: str = "after") -> GraphDiff:
    """Compare two fx graphs through their canonical text."""
    return diff_texts(canonical_text(before), canonical_text(after), before_label, after_label)


def read_golden(golden_path: str | os.PathLike[str]) -> str:
    """Read a golden canonical text; :class:`ReportError` if it is missing, not a regular file, unreadable or not UTF-8."""
    path = Path(golden_path)
    update = "create it with `surgery diff MODEL --update` and commit it"
    kind = path_kind(path)
    if kind not in (None, "a regular file"):
        # Opening a FIFO or a device would block or read forever.
        raise ReportError(f"golden graph {path} is {kind}, not a regular file", "pass the golden .graph.txt file")
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ReportError(f"golden graph {path} does not exist", update) from exc
    except OSError as exc:
        raise ReportError(f"cannot read golden graph {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(
            f"golden graph {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            f"it is not a golden written by surgery; {update.replace('create', 'rewrite')}",
        ) from exc
    # As text mode would: CRLF reads as LF, so an autocrlf checkout does not read as drift.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def compare_to_golden(graph: torch.fx.Graph, golden_path: str | os.PathLike[str], golden: str | None = None) -> GraphDiff:
    """Diff ``graph`` (canonicalised) against the golden text at ``golden_path`` (golden -> current).

    ``golden`` is the golden's text when it was already read (the CLI reads it before any work).
    """
    if golden is None:
        golden = read_golden(golden_path)
    return diff_texts(golden, canonical_text(graph), before_label=f"{golden_path} (golden)", after_label="current")


def write_golden(graph: torch.fx.Graph, path: str | os.PathLike[str]) -> Path:
    """Atomically (re)write the golden canonical text of ``graph`` at ``path``."""
    return atomic_write_text(path, canonical_text(graph))


def template_path(scope: str) -> str:
    """Replace the first numeric path component (the block index) by ``*`` so repeated blocks
    collapse: ``blocks.3.ffn.0`` -> ``blocks.*.ffn.0``."""
    return _INDEX.sub("*", scope, count=1)


@dataclass(frozen=True)
class ChangeGroup:
    """Identical changes across repeated blocks, collapsed into one row."""

    status: str
    op: str
    target: str
    path: str
    count: int
    role: str = ""


def group_changes(changes: list[NodeChange]) -> list[ChangeGroup]:
    """Collapse changes that differ only by block index; sorted by module path then status."""
    tally: Counter[tuple[str, str, str, str, str]] = Counter()
    for c in changes:
        target = template_path(c.target) if c.op == "call_module" else c.target
        tally[(template_path(c.scope), c.status, c.op, target, c.role)] += 1
    return [
        ChangeGroup(status=status, op=op, target=target, path=path, count=n, role=role)
        for (path, status, op, target, role), n in sorted(tally.items())
    ]


__all__ = [
    "ChangeGroup",
    "GraphDiff",
    "NodeChange",
    "compare_to_golden",
    "diff_graphs",
    "diff_texts",
    "group_changes",
    "node_changes",
    "read_golden",
    "template_path",
    "unified_diff",
    "write_golden",
]
