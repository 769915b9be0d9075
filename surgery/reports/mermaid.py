"""The report's picture: a small Mermaid flowchart of the model with what surgery inserted.

GitHub renders ```` ```mermaid ```` blocks inline, so a reviewer sees the change without
downloading anything. The boxes and edges come from :func:`surgery.reports.overview.overview`
(the main chain with runs of blocks collapsed, every injection point after its block, the
grafted branch and what feeds it); this module only writes them as Mermaid text.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx

from surgery.reports.overview import MAX_GROUPS, MAX_POINTS, Box, overview

_STYLES = {
    "in": "fill:#e8f0fe,stroke:#1967d2,color:#174ea6",
    "out": "fill:#e8f0fe,stroke:#1967d2,color:#174ea6",
    "value": "fill:#fff,stroke:#5f6368,color:#202124,stroke-dasharray:3 3",
    "base": "fill:#f1f3f4,stroke:#5f6368,color:#202124",
    "block": "fill:#f1f3f4,stroke:#202124,color:#202124",
    "inject": "fill:#fce8e6,stroke:#c5221f,color:#a50e0e",
    "branch": "fill:#e6f4ea,stroke:#137333,color:#0d652d",
}


def escape(text: str) -> str:
    """Text safe inside a quoted Mermaid label (entity codes for quotes, brackets, ``#`` and ``&``)."""
    return (text.replace("#", "#35;").replace("&", "#amp;").replace('"', "#quot;")
            .replace("<", "#lt;").replace(">", "#gt;"))


def _node(box: Box, ident: str) -> str:
    label = "<br/>".join(escape(line) for line in box.lines if line)
    if box.kind in ("in", "out"):
        shape = f'(["{label}"])'
    elif box.kind == "value":
        shape = f'[/"{label}"/]'
    else:
        shape = f'["{label}"]'
    return f"  {ident}{shape}:::{box.kind}"


def mermaid_region(
    graph: torch.fx.Graph,
    matches: Sequence[Any] | None = None,
    grafted: Sequence[Any] = (),
    *,
    max_points: int = MAX_POINTS,
    max_groups: int = MAX_GROUPS,
) -> str:
    """Mermaid ``flowchart`` source for the rewritten region of ``graph`` ('' if nothing was inserted).

    ``matches`` and ``grafted`` are ``ApplyResult.matches``/``.grafted`` or the report's lists
    (see :func:`~surgery.reports.overview.overview`); the grafted branch sits in a subgraph
    named after the rule.
    """
    view = overview(graph, matches, grafted, max_points=max_points, max_groups=max_groups)
    if view.empty:
        return ""
    ident = {box.key: f"n{k}" for k, box in enumerate(view.boxes)}
    lines = ["flowchart TD"]
    branch = [box for box in view.boxes if box.kind == "branch"]
    lines += [_node(box, ident[box.key]) for box in view.boxes if box.kind != "branch"]
    if branch:
        lines.append(f'  subgraph grafted ["{escape(view.rule)}: inserted branch"]')
        lines += ["  " + _node(box, ident[box.key]) for box in branch]
        lines.append("  end")
        lines.append("  style grafted fill:#fbfdfb,stroke:#137333,stroke-dasharray:4 3")
    lines += [f"  {ident[a]} --> {ident[b]}" for a, b in view.edges]
    kinds = dict.fromkeys(box.kind for box in view.boxes)
    lines += [f"  classDef {kind} {_STYLES[kind]}" for kind in kinds]
    return "\n".join(lines) + "\n"


__all__ = ["escape", "mermaid_region"]
