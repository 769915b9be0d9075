"""Reports: canonical graph text, graph diffs and goldens, Mermaid pictures, report files."""
from __future__ import annotations

from surgery.reports.canonical import canonical_edges, canonical_graph_dict, canonical_text
from surgery.reports.diff import GraphDiff, compare_to_golden, diff_graphs, diff_texts, write_golden
from surgery.reports.files import atomic_write_many, atomic_write_text
from surgery.reports.mermaid import mermaid_region
from surgery.reports.report import SCHEMA_VERSION, build_report, render_markdown, write_report

__all__ = [
    "SCHEMA_VERSION",
    "GraphDiff",
    "atomic_write_many",
    "atomic_write_text",
    "build_report",
    "canonical_edges",
    "canonical_graph_dict",
    "canonical_text",
    "compare_to_golden",
    "diff_graphs",
    "diff_texts",
    "mermaid_region",
    "render_markdown",
    "write_golden",
    "write_report",
]
