"""What surgery changed, as a small graph of boxes: the model's main chain and the inserted code.

A rewritten transformer graph has thousands of nodes; a reviewer wants to see where the new
code sits. :func:`overview` condenses the rewritten ``torch.fx`` graph into

- the **main chain**: what embeds the residual stream (``patch_embedding``), the matched blocks
  in order, runs of blocks without an injection collapsed into one box (``blocks.1-2``),
  every injection point right after its block (``+ <rule> 1``: the rule and the action's
  index, e.g. ``+ vace 1``), and what reads the final stream (``head``) up to the output;
- the **inserted branch**: one box per grafted module (e.g. ``vace_blocks.0``), with the graph
  inputs and main-chain values that feed it (the stream entering the first block gets a box
  of its own when the branch reads it) and the injection points it feeds.

Everything comes from the graph and the matches: the ``meta["surgery"]`` role of inserted
nodes (``branch`` or ``inject``) and their index, module scopes (``nn_module_stack``),
example values (shapes, dtypes) and the grafted module names. Nothing is specific to a rule.

Ops outside any module (reshapes, indexing, arithmetic) get no box: an edge ``A -> B`` means a
value flows from ``A`` to ``B`` through such ops. Values that are not floating-point data
(sizes, lengths, integer tensors, flags) draw no edge, so bookkeeping such as sequence
lengths does not wire every block to the embedding. Inputs read only by injection points
(a scale) are named in the injection's box instead of being wired to each of them.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from surgery.reports.canonical import module_scope

#: More injection points than this: the ones between the first two and the last two share one box.
MAX_POINTS = 16
#: More branch boxes than this: numbered siblings (``x_blocks.0`` .. ``.39``) share one box.
MAX_GROUPS = 16

Edge = tuple[str, str]


@dataclass
class Box:
    """One box: ``kind`` is ``in`` (a graph input), ``out``, ``base`` (a module of the base
    model), ``value`` (the stream entering the first block), ``block`` (a run of matched
    blocks), ``inject`` (an injection point) or ``branch`` (inserted code, per grafted module)."""

    key: str
    kind: str
    lines: list[str]


@dataclass
class Overview:
    """Boxes in drawing order and edges between their keys; ``rule`` names the inserted code."""

    boxes: list[Box] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    rule: str = ""

    @property
    def empty(self) -> bool:
        return not self.boxes


# --- reading the graph ------------------------------------------------------------------------


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        value = obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)
        if value is not None:
            return value
    return None


def _info(node: torch.fx.Node) -> dict[str, Any] | None:
    info = node.meta.get("surgery")
    return info if isinstance(info, dict) else None


def _role(node: torch.fx.Node) -> str | None:
    info = _info(node)
    return info.get("role") if info else None


def _is_data(node: torch.fx.Node) -> bool:
    """Whether the node's value can carry activations: a floating tensor or a container (caches)."""
    if "example_value" not in node.meta:
        return True  # a graph without example values (plain symbolic_trace): any edge may
    value = node.meta["example_value"]
    if isinstance(value, torch.Tensor):
        return value.dtype.is_floating_point or value.dtype.is_complex
    return isinstance(value, (list, tuple, dict)) and not isinstance(value, torch.Size)


def _data_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [i for i in node.all_input_nodes if _is_data(i)]


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("example_value")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _class_names(graph: torch.fx.Graph) -> dict[str, str]:
    """Module path -> class name, from the innermost ``nn_module_stack`` entry of each node."""
    classes: dict[str, str] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        value = list(stack.values())[-1] if stack else None
        if isinstance(value, tuple) and len(value) >= 2:
            cls = value[1]
            name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>")
            classes.setdefault(module_scope(node), name)
    return classes


def _within(scope: str, path: str) -> bool:
    return scope == path or scope.startswith(path + ".")


def _numbered(path: str) -> tuple[str, int] | None:
    found = re.fullmatch(r"(.*)\.(\d+)", path)
    return (found.group(1), int(found.group(2))) if found else None


def _group_path(scope: str) -> str:
    """``blocks.0.ffn.2`` -> ``blocks.0``; ``head.norm`` -> ``head``."""
    parts = scope.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and parts[1].isdigit() else parts[0]


def span(names: Sequence[str]) -> str:
    """``blocks.1``; ``blocks.1-3`` for numbered siblings; else ``first .. last``."""
    if len(names) == 1:
        return names[0]
    first, last = _numbered(names[0]), _numbered(names[-1])
    if first and last and all((p := _numbered(n)) and p[0] == first[0] for n in names):
        return f"{first[0]}.{first[1]}-{last[1]}"
    return f"{names[0]} .. {names[-1]}"


@dataclass(frozen=True)
class _Block:
    name: str
    cls: str | None


def _blocks(graph: torch.fx.Graph, matches: Sequence[Any] | None) -> list[_Block]:
    """The matched blocks in chain order; without matches, the numbered siblings injections follow."""
    if matches is not None:
        ordered = sorted(matches, key=lambda m: int(_get(m, "position") or 0))
        return [_Block(str(_get(m, "name")), _get(m, "cls", "class")) for m in ordered]
    numbered: dict[str, None] = {}
    families: set[str] = set()
    last: tuple[str, int] | None = None
    for node in graph.nodes:
        if _role(node) == "inject" and last is not None:
            families.add(last[0])
        elif _info(node) is None and (parts := _numbered(path := _group_path(module_scope(node)))):
            numbered[path] = None
            last = parts
    names = sorted((n for n in numbered if _numbered(n)[0] in families), key=lambda n: _numbered(n)[1])  # type: ignore[index]
    return [_Block(n, None) for n in names]


class _Condensed:
    """The graph's nodes grouped into boxes, and the box edges through the unboxed ops between them.

    Keys: ``in:<name>``, ``out``, ``block:<name>``, ``inject:<rule>:<index>:<block>``,
    ``branch:<module>``, ``base:<top-level module>``. Unscoped ops get no box.
    """

    def __init__(self, graph: torch.fx.Graph, blocks: list[_Block], grafted: Sequence[str]) -> None:
        self.nodes = list(graph.nodes)
        self.block_names = [b.name for b in blocks]
        self.owner: dict[torch.fx.Node, str] = {}
        self.injects: dict[str, list[torch.fx.Node]] = {}  # key -> nodes, in graph order
        self.anchor: dict[str, str] = {}  # injection key -> the block it follows
        self.members: dict[str, list[torch.fx.Node]] = {b: [] for b in self.block_names}
        self._assign(sorted(grafted, key=len, reverse=True))

    def _assign(self, grafted: list[str]) -> None:
        last_block = ""
        for node in self.nodes:
            role, scope = _role(node), module_scope(node)
            if node.op == "placeholder":
                self.owner[node] = f"in:{node.target}"
            elif node.op == "output":
                self.owner[node] = "out"
            elif role == "inject":
                # An action after a block is inserted right behind the block's output.
                info = _info(node) or {}
                key = f"inject:{info.get('rule')}:{info.get('index')}:{last_block}"
                self.owner[node] = key
                self.injects.setdefault(key, []).append(node)
                self.anchor[key] = last_block
            elif role is not None:
                if scope:
                    path = next((g for g in grafted if _within(scope, g)), None) or _group_path(scope)
                    self.owner[node] = f"branch:{path}"
            elif scope and (block := self._block_of(scope)):
                self.owner[node] = f"block:{block}"
                self.members[block].append(node)
                last_block = block
            elif scope:
                self.owner[node] = f"base:{scope.split('.')[0]}"

    def _block_of(self, scope: str) -> str | None:
        parts = scope.split(".")
        return next((path for k in range(1, len(parts) + 1) if (path := ".".join(parts[:k])) in self.members), None)

    def edges(self) -> dict[Edge, None]:
        """``A -> B`` when a data value flows from a node of A to a node of B through unboxed ops."""
        sources: dict[torch.fx.Node, frozenset[str]] = {}
        edges: dict[Edge, None] = {}
        for node in self.nodes:
            found: set[str] = set()
            for i in _data_inputs(node):
                found |= {self.owner[i]} if i in self.owner else sources.get(i, frozenset())
            key = self.owner.get(node)
            if key is None:
                sources[node] = frozenset(found)
            else:
                edges.update(((src, key), None) for src in sorted(found) if src != key)
        return edges

    def first(self) -> dict[str, int]:
        """Graph position of each box's first node."""
        first: dict[str, int] = {}
        for position, node in enumerate(self.nodes):
            if node in self.owner:
                first.setdefault(self.owner[node], position)
        return first

    def downstream(self, start: torch.fx.Node) -> tuple[set[str], set[str]]:
        """Boxes downstream of ``start`` on any path, and those reached through unboxed ops only."""
        def walk(through_boxes: bool) -> set[str]:
            found, seen, stack = set(), {start}, [start]
            while stack:
                for user in stack.pop().users:
                    if user in self.owner:
                        found.add(self.owner[user])
                        if not through_boxes:
                            continue
                    if user not in seen:
                        seen.add(user)
                        stack.append(user)
            return found
        return walk(True), walk(False)


def _stream(c: _Condensed) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    """The residual stream entering the first block and leaving the last one (``None``: unknown).

    A block's stream output is the last value leaving it with the stream's shape (the shape of
    what an injection reads from its block); the stream input is the value of that shape
    entering the first block, preferring one with a skip connection (a path of plain ops) to
    the block's output.
    """
    if not c.block_names:
        return None, None
    shape = None
    for key, group in c.injects.items():
        read = [i for n in group for i in n.all_input_nodes if c.owner.get(i) == f"block:{c.anchor[key]}"]
        if read and _shape(read[0]) is not None:
            shape = _shape(read[0])
            break

    def stream_out(block: str) -> torch.fx.Node | None:
        inside = set(c.members[block])
        leaving = [n for n in c.members[block] if _is_data(n) and any(u not in inside for u in n.users)]
        if shape is not None:
            leaving = [n for n in leaving if _shape(n) == shape] or leaving
        return leaving[-1] if leaving else None

    first = c.block_names[0]
    out0, inside = stream_out(first), set(c.members[first])
    entering = list(dict.fromkeys(i for n in c.members[first] for i in _data_inputs(n) if i not in inside))
    wanted = shape if shape is not None else (_shape(out0) if out0 is not None else None)
    if wanted is not None:
        entering = [i for i in entering if _shape(i) == wanted] or entering
    if len(entering) > 1 and out0 is not None:
        entering = [i for i in entering if _skip_path(i, out0, inside)] or entering
    return (entering[0] if entering else None), stream_out(c.block_names[-1])


def _skip_path(src: torch.fx.Node, dst: torch.fx.Node, inside: set[torch.fx.Node]) -> bool:
    """Whether ``dst`` is reached from ``src`` through function and method calls only."""
    seen, stack = set(), [src]
    while stack:
        for user in stack.pop().users:
            if user is dst:
                return True
            if user in inside and user not in seen and user.op in ("call_function", "call_method"):
                seen.add(user)
                stack.append(user)
    return False


def _ancestors(start: str, edges: Iterable[Edge]) -> set[str]:
    back: dict[str, list[str]] = {}
    for a, b in edges:
        back.setdefault(b, []).append(a)
    seen, stack = {start}, [start]
    while stack:
        for prev in back.get(stack.pop(), []):
            if prev not in seen:
                seen.add(prev)
                stack.append(prev)
    return seen


# --- the chain and the collapsed boxes -------------------------------------------------------

_Item = tuple[str, list[str], list[str]]  # key, block names, injection keys


def _chain(c: _Condensed, blocks: list[_Block], max_points: int) -> tuple[list[_Item], dict[str, str]]:
    """The main chain as runs of blocks and injection points, and the renaming of box keys into it."""
    after: dict[str, list[str]] = {}
    for key in c.injects:
        after.setdefault(c.anchor[key], []).append(key)
    items: list[_Item] = []
    run: list[str] = []
    for block in blocks:
        run.append(block.name)
        if block.name in after:
            items.append((f"run:{run[0]}", run, []))
            items += [(key, [], [key]) for key in after[block.name]]
            run = []
    if run:
        items.append((f"run:{run[0]}", run, []))
    items += [(key, [], [key]) for key in c.injects if c.anchor[key] not in c.block_names]

    points = [k for k, item in enumerate(items) if item[2]]
    if len(points) > max(max_points, 4):
        lo, hi = points[1] + 1, points[-2]
        middle = items[lo:hi]
        names = [b for _, bs, _ in middle for b in bs]
        merged = (f"run:{names[0]}" if names else middle[0][0], names, [k for _, _, ks in middle for k in ks])
        items = items[:lo] + [merged] + items[hi:]
    rename = {}
    for key, names, injects in items:
        rename.update({f"block:{name}": key for name in names})
        rename.update({inject: key for inject in injects})
    return items, rename


def _collapse_branch(branch: list[str], max_groups: int) -> dict[str, str]:
    """Past ``max_groups`` branch boxes, numbered siblings are renamed to their family's first box."""
    if len(branch) <= max_groups:
        return {}
    families: dict[str, list[str]] = {}
    for key in branch:
        parts = _numbered(key)
        families.setdefault(parts[0] if parts else key, []).append(key)
    return {key: members[0] for members in families.values() if len(members) > 1 for key in members}


def _reduce(edges: dict[Edge, None], kinds: tuple[str, ...]) -> None:
    """Drop an edge into a box of ``kinds`` that a longer drawn path already implies."""
    def reachable(a: str, b: str, skip: Edge) -> bool:
        seen, stack = {a}, [a]
        while stack:
            node = stack.pop()
            for edge in edges:
                if edge[0] == node and edge != skip and edge[1] not in seen:
                    if edge[1] == b:
                        return True
                    seen.add(edge[1])
                    stack.append(edge[1])
        return False

    for edge in [e for e in edges if e[1].split(":")[0] in kinds]:
        if reachable(edge[0], edge[1], edge):
            del edges[edge]


def _splice_value(edges: dict[Edge, None], first_item: str | None) -> None:
    """Drop the stream's own box when only the first block reads it: it would show nothing."""
    outs = [b for a, b in edges if a == "value:stream"]
    if outs and set(outs) != {first_item}:
        return
    ins = [a for a, b in edges if b == "value:stream"]
    for edge in [e for e in edges if "value:stream" in e]:
        del edges[edge]
    edges.update(((a, b), None) for a in ins for b in outs)


# --- labels ----------------------------------------------------------------------------------


def _inject_lines(c: _Condensed, keys: list[str], reads: list[str]) -> list[str]:
    """``+ <rule> 0`` (the rule and its action's index), ``+ adapters.3`` (modules it calls), else ``+ <rule>``."""
    labels = []
    for key in keys:
        group = c.injects[key]
        info = _info(group[0]) or {}
        modules = list(dict.fromkeys(_group_path(s) for n in group if (s := module_scope(n))))
        parts = ([f"{info.get('rule')} {info['index']}"] if info.get("index") is not None else []) + modules
        labels.append("+ " + (", ".join(parts) or str(info.get("rule"))))
    lines = [labels[0] if len(labels) == 1 else f"{labels[0]} .. {labels[-1]}"]
    return lines + ([f"with {', '.join(dict.fromkeys(reads))}"] if reads else [])


def _kind_line(classes: list[str | None], count: int, noun: str) -> str:
    known = list(dict.fromkeys(k for k in classes if k))
    if len(known) == 1 and len(classes) == count:
        return known[0] if count == 1 else f"{count} × {known[0]}"
    return f"{count} {noun}" if count > 1 else ""


class _Labels:
    def __init__(self, c: _Condensed, blocks: list[_Block], classes: dict[str, str],
                 inject_inputs: dict[str, list[str]], rename: dict[str, str]) -> None:
        self.c, self.classes, self.inject_inputs = c, classes, inject_inputs
        self.cls = {b.name: b.cls or classes.get(b.name) for b in blocks}
        self.merged: dict[str, list[str]] = {}
        for old, new in rename.items():
            if old.startswith("branch:"):
                self.merged.setdefault(new, []).append(old.partition(":")[2])

    def item(self, key: str, names: list[str], injects: list[str]) -> Box:
        reads = self.inject_inputs.get(key, [])
        if names and injects:  # the collapsed middle of a long chain
            lines = [span(names), f"{len(names)} blocks, {len(injects)} injection points",
                     *_inject_lines(self.c, injects, reads)]
            return Box(key, "inject", lines)
        if injects:
            return Box(key, "inject", _inject_lines(self.c, injects, reads))
        return Box(key, "block", [span(names), _kind_line([self.cls[n] for n in names], len(names), "blocks")])

    def other(self, key: str, first_block: str | None) -> Box:
        kind, _, path = key.partition(":")
        if kind == "out":
            return Box(key, kind, ["output"])
        if kind == "value":
            return Box(key, kind, [f"input of {first_block}" if first_block else "residual stream"])
        if kind == "branch" and key in self.merged:
            paths = sorted(self.merged[key], key=lambda p: (_numbered(p) or (p, 0))[1])
            return Box(key, kind, [span(paths), _kind_line([self.classes.get(p) for p in paths], len(paths), "modules")])
        return Box(key, kind, [path] + ([self.classes[path]] if kind != "in" and path in self.classes else []))


# --- the overview ----------------------------------------------------------------------------


def overview(
    graph: torch.fx.Graph,
    matches: Sequence[Any] | None = None,
    grafted: Sequence[Any] = (),
    *,
    max_points: int = MAX_POINTS,
    max_groups: int = MAX_GROUPS,
) -> Overview:
    """The boxes and edges of the rewritten region (empty if surgery inserted nothing).

    Args:
        graph: the rewritten graph (``ApplyResult.graph``).
        matches: the matched blocks (``ApplyResult.matches`` or the report's ``matches``:
            objects or mappings with ``name``, ``position`` and ``cls``/``class``); ``None``
            infers them from the numbered modules that injection points follow.
        grafted: the grafted modules (``ApplyResult.grafted``, the report's list, or names).
        max_points: above this many injection points, those between the first two and the
            last two share one box.
        max_groups: above this many branch boxes, numbered siblings share one box.
    """
    rule = next((str(info.get("rule")) for n in graph.nodes if (info := _info(n))), None)
    if rule is None:
        return Overview()
    blocks = _blocks(graph, matches)
    c = _Condensed(graph, blocks, [g if isinstance(g, str) else str(_get(g, "name")) for g in grafted])
    stream_in, stream_out = _stream(c)
    if stream_in is not None and stream_in not in c.owner:
        c.owner[stream_in] = "value:stream"
    edges, first = c.edges(), c.first()
    chain, rename = _chain(c, blocks, max_points)
    chain_keys = [key for key, _, _ in chain]
    branch = sorted({k for k in c.owner.values() if k.startswith("branch:")}, key=first.__getitem__)
    rename.update(_collapse_branch(branch, max_groups))

    drawn: dict[Edge, None] = {}

    def add(src: str, dst: str) -> None:
        src, dst = rename.get(src, src), rename.get(dst, dst)
        if src != dst and (dst, src) not in drawn:  # the first drawn direction wins: the chain's
            drawn[(src, dst)] = None

    # The main chain: the stem that embeds the stream, blocks and injections, the tail to the output.
    stem: set[str] = set()
    if stream_in is not None:
        stem = {k for k in _ancestors(c.owner[stream_in], edges) if k.split(":")[0] in ("in", "base", "value")}
        for a, b in edges:
            if a in stem and b in stem:
                add(a, b)
        if chain:
            add(c.owner[stream_in], chain_keys[0])
    for a, b in zip(chain_keys, chain_keys[1:]):
        add(a, b)
    tail: set[str] = set()
    final = c.injects[chain[-1][2][-1]][-1] if chain and chain[-1][2] else stream_out
    if chain and final is not None:
        reached, entries = c.downstream(final)
        tail = {k for k in reached if k.split(":")[0] in ("base", "out")}
        for key in sorted(entries & tail):
            add(chain_keys[-1], key)
        for a, b in edges:
            if a in tail and b in tail:
                add(a, b)

    # The branch: the inputs and main-chain values it reads, and what it feeds.
    shown = stem | set(chain_keys) | tail | {rename.get(k, k) for k in branch}
    shown |= {a for a, b in edges if b.startswith("branch:") and a.startswith("in:")}
    inject_inputs: dict[str, list[str]] = {}
    for a, b in edges:
        if (b.startswith("branch:") and rename.get(a, a) in shown) or \
                (a.startswith("branch:") and rename.get(b, b) in shown):
            add(a, b)
        elif b.startswith("inject:") and a.startswith("in:"):
            if a in shown:
                add(a, b)
            else:
                inject_inputs.setdefault(rename.get(b, b), []).append(a[3:])
    _reduce(drawn, ("base", "out"))
    _splice_value(drawn, chain_keys[0] if chain_keys else None)

    labels = _Labels(c, blocks, _class_names(graph), inject_inputs, rename)
    used = {k for edge in drawn for k in edge} | {rename.get(k, k) for k in branch}
    first_block = chain[0][1][0] if chain and chain[0][1] else None
    others = sorted(used - set(chain_keys), key=lambda k: first.get(k, -1))
    chain_start = first.get(f"block:{first_block}", 0) if first_block else 0
    before = [k for k in others if k.split(":")[0] in ("in", "base", "value") and first.get(k, 0) <= chain_start]
    after = [k for k in others if k not in before and k.split(":")[0] in ("base", "out")]
    rest = [k for k in others if k not in before and k not in after]
    boxes = [labels.other(k, first_block) for k in before] + [labels.item(*item) for item in chain] + \
        [labels.other(k, first_block) for k in after + rest]
    order = {box.key: k for k, box in enumerate(boxes)}
    return Overview(boxes, sorted(drawn, key=lambda e: (order[e[0]], order[e[1]])), rule)


__all__ = ["MAX_GROUPS", "MAX_POINTS", "Box", "Overview", "overview", "span"]
