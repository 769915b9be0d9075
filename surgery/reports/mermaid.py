"""A small Mermaid flowchart of the region that surgery rewrote.

GitHub renders ```` ```mermaid ```` blocks inline, so a reviewer sees the change without
downloading anything. A whole transformer would be unreadable, so the picture shows only:

- the first injection point (a node with ``meta["surgery"]["role"] == "inject"``) and its
  immediate inputs;
- the inserted branch (``role == "branch"``), collapsed to one box per module-path prefix
  (``vace_blocks.0``, ``vace_patch_embedding``), with the graph inputs that feed it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.fx

from surgery.reports.canonical import canonical_names, module_scope, qualified_name

#: Above this many boxes the branch is collapsed further, to top-level module names.
MAX_GROUPS = 16

_STYLES = (
    "classDef branch fill:#e6f4ea,stroke:#137333,color:#0d652d",
    "classDef inject fill:#fce8e6,stroke:#c5221f,color:#a50e0e",
    "classDef base fill:#f1f3f4,stroke:#5f6368,color:#202124",
    "classDef input fill:#e8f0fe,stroke:#1967d2,color:#174ea6",
)


def _role(node: torch.fx.Node) -> str | None:
    info = node.meta.get("surgery")
    return info.get("role") if isinstance(info, dict) else None


def _escape(text: str) -> str:
    # Mermaid entity codes keep quotes and angle brackets from breaking the label syntax.
    return text.replace("#", "#35;").replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _prefix(path: str, depth_two: bool) -> str:
    parts = path.split(".")
    if depth_two and len(parts) >= 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _describe(node: torch.fx.Node, names: dict[torch.fx.Node, str]) -> str:
    """Escaped two-line label: canonical name, then what the node does."""
    if node.op == "call_function":
        what = qualified_name(node.target)
    elif node.op == "call_method":
        what = f".{node.target}()"
    else:
        what = node.op
    return f"{_escape(names[node])}<br/>{_escape(what)}"


def _group_branch(branch: list[torch.fx.Node], depth_two: bool, fallback: str) -> "OrderedDict[torch.fx.Node, str]":
    """Assign every branch node to a box label; nodes outside any module join their first grouped input."""
    groups: OrderedDict[torch.fx.Node, str] = OrderedDict()
    for node in branch:
        scope = module_scope(node)
        if scope:
            groups[node] = _prefix(scope, depth_two)
            continue
        inherited = next((groups[i] for i in node.all_input_nodes if i in groups), None)
        groups[node] = inherited or fallback
    return groups


def _injection_point(injects: list[torch.fx.Node]) -> tuple[list[torch.fx.Node], int]:
    """The nodes of the first injection point (same rule and index as the first inject node) and the point count."""
    def key(node: torch.fx.Node) -> tuple[Any, Any]:
        info = node.meta["surgery"]
        return info.get("rule"), info.get("index")

    first = key(injects[0])
    points = len({key(n) for n in injects})
    return [n for n in injects if key(n) == first], points


def mermaid_region(graph: torch.fx.Graph, *, max_groups: int = MAX_GROUPS, max_inject_nodes: int = 8) -> str:
    """Mermaid ``flowchart`` source for the rewritten region of ``graph`` ('' if nothing was inserted).

    The injection point is drawn node by node (one box if it has more than
    ``max_inject_nodes`` nodes); the branch is collapsed to at most ``max_groups`` boxes.
    """
    nodes = list(graph.nodes)
    branch = [n for n in nodes if _role(n) == "branch"]
    injects = [n for n in nodes if _role(n) == "inject"]
    if not branch and not injects:
        return ""
    names = canonical_names(graph)
    rule = next((n.meta["surgery"].get("rule") for n in branch + injects), None) or "branch"

    groups = _group_branch(branch, depth_two=True, fallback=f"{rule} (ops)")
    if len(set(groups.values())) > max_groups:
        groups = _group_branch(branch, depth_two=False, fallback=f"{rule} (ops)")
    labels = list(OrderedDict.fromkeys(groups.values()))
    box_id = {label: f"g{k}" for k, label in enumerate(labels)}
    sizes = {label: sum(1 for v in groups.values() if v == label) for label in labels}

    lines = ["flowchart TD"]
    point: list[torch.fx.Node] = []
    if injects:
        point, count = _injection_point(injects)
        if count > 1:
            lines.append(f"  %% showing the first of {count} injection points")
    for label in labels:
        noun = "node" if sizes[label] == 1 else "nodes"
        lines.append(f'  {box_id[label]}["{_escape(label)}<br/>{sizes[label]} {noun}"]:::branch')

    edges: list[str] = []
    extra: OrderedDict[torch.fx.Node, str] = OrderedDict()

    def extra_id(node: torch.fx.Node, style: str) -> str:
        if node not in extra:
            extra[node] = f"x{len(extra)}"
            shape = f'(["{_escape(names[node])}"])' if node.op == "placeholder" else f'["{_describe(node, names)}"]'
            lines.append(f"  {extra[node]}{shape}:::{style}")
        return extra[node]

    def add_edge(src: str, dst: str) -> None:
        edge = f"  {src} --> {dst}"
        if edge not in edges and src != dst:
            edges.append(edge)

    def source_id(src: torch.fx.Node) -> str:
        if src in groups:
            return box_id[groups[src]]
        return extra_id(src, "input" if src.op == "placeholder" else "base")

    for node in branch:
        dst = box_id[groups[node]]
        for src in node.all_input_nodes:
            if src in groups:
                add_edge(box_id[groups[src]], dst)
            elif src.op == "placeholder":
                add_edge(extra_id(src, "input"), dst)

    if point:
        info = point[0].meta["surgery"]
        if len(point) > max_inject_nodes:
            inject_id = {n: "inj" for n in point}
            label = f"injection {info.get('index')}<br/>{len(point)} nodes"
            lines.append(f'  inj["{label}"]:::inject')
        else:
            inject_id = {n: f"inj{k}" for k, n in enumerate(point)}
            for n in point:
                lines.append(f'  {inject_id[n]}["{_describe(n, names)}"]:::inject')
        for n in point:
            for src in n.all_input_nodes:
                add_edge(inject_id[src] if src in inject_id else source_id(src), inject_id[n])

    return "\n".join(lines + edges + [f"  {s}" for s in _STYLES]) + "\n"


__all__ = ["MAX_GROUPS", "mermaid_region"]
