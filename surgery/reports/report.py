"""The surgery report: a stable JSON document for CI and a Markdown page for reviewers.

The JSON schema is documented in ``docs/report-schema.md``; bump :data:`SCHEMA_VERSION`
whenever a key is renamed or removed (adding keys is backwards compatible).
"""
from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from surgery.lora.order import build_order
from surgery.matching.matcher import current_fields
from surgery.lora.uncalled import uncalled_linear
from surgery.reports.diff import diff_graphs, group_changes
from surgery.reports.files import atomic_write_many
from surgery.reports.mermaid import mermaid_region

SCHEMA_VERSION = 2
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

#: Diffs longer than this many lines are cut in the Markdown page (the JSON never holds them).
MAX_DIFF_LINES = 4000

PICTURE_LEGEND = (
    "Grey: the base model, with runs of matched blocks in one box; red: injection points, each after "
    "its block; green: the grafted branch; blue: graph inputs and the output. An arrow is a tensor "
    "flowing between modules (ops outside modules and integer bookkeeping are not drawn).")


def jsonable(value: Any) -> Any:
    """Convert option values and metadata into plain JSON types (tuples -> lists, dtypes -> str)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no NaN/inf; keep them readable rather than failing the whole report.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist()) if value.numel() <= 16 else f"<Tensor {tuple(value.shape)}>"
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    return str(value)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value)


def normalise_validation(validation: Any) -> dict[str, Any] | None:
    """The ``validation`` section from a validation result.

    Accepts an object or mapping with ``passed`` and ``cases`` (each case an object or
    mapping with ``name``, ``max_abs_diff``, ``passed``, ``tolerance``), or a bare sequence
    of cases (then ``passed`` is true when every case passed).
    """
    if validation is None:
        return None
    if isinstance(validation, Sequence) and not isinstance(validation, (str, bytes)):
        raw_cases, passed = validation, None
    else:
        raw_cases, passed = _get(validation, "cases", []), _get(validation, "passed")
    cases = [
        {
            "name": str(_get(case, "name")),
            "max_abs_diff": jsonable(_float_or_none(_get(case, "max_abs_diff"))),
            "passed": bool(_get(case, "passed")),
            "tolerance": jsonable(_float_or_none(_get(case, "tolerance", 0.0))),
            "error": None if _get(case, "error") is None else str(_get(case, "error")),
        }
        for case in raw_cases
    ]
    if passed is None:
        passed = all(c["passed"] for c in cases)
    return {"passed": bool(passed), "cases": cases}


def _inserted(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if isinstance(n.meta.get("surgery"), dict))


def golden_section(diff: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``golden`` section from a :class:`~surgery.reports.diff.GraphDiff` against ``path``."""
    return {"path": str(path), "equal": bool(diff.equal), "changes": list(diff.changes)}


def lora_section(result: Any) -> dict[str, Any]:
    """The ``lora`` section: Linear layers no specialised graph calls (a LoRA on them is a no-op).

    ``uncalled_linear`` is ``None`` when there are no rewritten graphs to ask (a dry run, or a
    result whose module was not rewritten by :func:`surgery.apply`).
    """
    module = getattr(result, "module", None)
    if getattr(result, "dry_run", False) or module is None or "_surgery" not in vars(module):
        return {"uncalled_linear": None}
    return {"uncalled_linear": uncalled_linear(module)}


def _match_rows(matches: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": m.name, "class": m.cls, "position": int(m.position), "index": m.index} for m in matches]


def rules_section(result: Any) -> list[dict[str, Any]]:
    """The ``rules`` section: every rule the model carries, in application order, with its
    options and matches (one entry for a model rewritten by one rule)."""
    applied = getattr(result, "applied", None) or ()
    pairs = [(a.rule, a.matches) for a in applied] or [(result.rule, result.matches)]
    return [{"name": str(rule.name), "options": jsonable(dict(getattr(rule, "options", None) or {})),
             "matches": _match_rows(matches)} for rule, matches in pairs]


def build_report(
    result: Any,
    validation: Any = None,
    timings: Mapping[str, float] | None = None,
    *,
    source: str | None = None,
    golden: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dictionary (schema in ``docs/report-schema.md``) for an ``ApplyResult``.

    ``timings`` adds to or overrides ``result.timings`` (the CLI passes ``validate_s``);
    ``source`` is the MODEL argument the CLI was given; ``golden`` is a
    :func:`golden_section` when the graph was compared with a golden file. ``rule``,
    ``options`` and ``matches`` are the last rule's (the one ``result`` applied); ``rules``
    lists every rule of a composed model.
    """
    all_timings = {**dict(getattr(result, "timings", None) or {}), **dict(timings or {})}
    rule = result.rule
    graph = getattr(result, "graph", None)
    base = getattr(result, "base_graph", None)
    rules = rules_section(result)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": str(result.model_name),
        "source": source,
        "rule": str(rule.name),
        "options": jsonable(dict(getattr(rule, "options", None) or {})),
        "matches": _match_rows(result.matches),
        "rules": rules,
        "build_order": build_order(*(r["name"] for r in rules)),
        "grafted": [{"name": g.name, "params": int(g.params)} for g in result.grafted],
        "guards": [{"kind": g.kind, "expr": g.expr, "value": str(g.value), "where": g.where} for g in result.guards],
        "validation": normalise_validation(validation),
        "timings": {key: _float_or_none(all_timings.get(key)) for key in ("trace_s", "apply_s", "validate_s")},
        "dry_run": bool(getattr(result, "dry_run", False)),
        "graph": {
            # A dry run builds no rewritten graph: its counts are unknown, not zero.
            "nodes": len(graph.nodes) if graph is not None else None,
            "inserted": _inserted(graph) if graph is not None else None,
            "base_nodes": len(base.nodes) if base is not None else None,
        },
        "golden": dict(golden) if golden is not None else None,
        "lora": lora_section(result),
    }


class Code(str):
    """A table cell shown as code (a guard's expression, a graph target), verbatim."""


def _cell(value: Any) -> str:
    """A Markdown table cell: names as text with HTML specials escaped, :class:`Code` as a code span."""
    text = ("" if value is None else str(value)).replace("\n", " ")
    if isinstance(value, Code):
        # A code span needs a fence longer than any backtick run inside it; GitHub tables still
        # split on a bare "|", even inside code, so that one is escaped everywhere.
        fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") else ""
        return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _fmt_diff(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _composed(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The report's rules when there are several (a composed model); empty otherwise (and
    for reports written before composition)."""
    rules = report.get("rules") or []
    return rules if len(rules) > 1 else []


def _rule_title(report: Mapping[str, Any]) -> str:
    """The rule's name, or the composed rules' names in order (e.g. ``vace + ffn-adapter``)."""
    composed = _composed(report)
    return " + ".join(r["name"] for r in composed) if composed else str(report["rule"])


def summary_line(report: Mapping[str, Any]) -> str:
    """One sentence: rule, model, matches, grafted parameters, inserted nodes, validation verdict."""
    params = sum(g["params"] for g in report["grafted"])
    graph = report["graph"]
    composed = _composed(report)
    matches = " + ".join(str(len(r["matches"])) for r in composed) if composed else str(len(report["matches"]))
    parts = [f"**{_rule_title(report)}** on **{report['model']}**", f"{matches} matches"]
    if report.get("dry_run"):
        parts.append("dry run (nothing grafted or rewritten)")
    else:
        parts.append(f"{len(report['grafted'])} grafted modules ({_params(params)} parameters)")
        if graph["nodes"] is not None:
            parts.append(f"{graph['inserted']} nodes inserted ({graph['base_nodes']} -> {graph['nodes']})")
    validation = report.get("validation")
    if validation is None:
        parts.append("not validated")
    else:
        cases = validation["cases"]
        ok = sum(1 for c in cases if c["passed"])
        diffs = [c["max_abs_diff"] for c in cases if isinstance(c["max_abs_diff"], (int, float))]
        worst = f", max abs diff {_fmt_diff(max(diffs))}" if diffs else ""
        verdict = "PASSED" if validation["passed"] else "FAILED"
        parts.append(f"validation {verdict} ({ok}/{len(cases)} cases{worst})")
    return f"{parts[0]}: {', '.join(parts[1:])}."


def _cut(text: str, limit: int) -> str:
    lines = text.splitlines()
    if len(lines) <= limit:
        return text
    return "\n".join(lines[:limit]) + f"\n... ({len(lines) - limit} more lines cut; run `surgery diff` for the full diff)\n"


def _lora_markdown(lora: Mapping[str, Any] | None) -> list[str]:
    """A warning section listing the Linear layers a LoRA cannot reach; nothing when there are none."""
    names = (lora or {}).get("uncalled_linear") or []
    if not names:
        return []
    groups: dict[str, int] = {}
    for name in names:
        # Collapse block indices so that "blocks.*.self_attn.q x4" reads as one row.
        pattern = re.sub(r"(?<=\.)\d+(?=\.)", "*", name)
        groups[pattern] = groups.get(pattern, 0) + 1
    out = ["## LoRA", "",
           f"**Warning:** {len(names)} Linear layers are never called by the rewritten graphs (for example "
           "projections replaced by a fused layer), so a LoRA that targets them has no effect:", ""]
    out += _table(("module", "count"), [(Code(p), f"x{n}") for p, n in groups.items()])
    out += ["", "<details><summary>All uncalled Linear layers</summary>", ""]
    out += [f"- `{name}`" for name in names]
    out += ["", "</details>", ""]
    return out


def _match_index(match: Mapping[str, Any]) -> int | None:
    """A match's ``index``; reports of schema 1 give it under its old name."""
    return current_fields(match).get("index")


def render_markdown(report: Mapping[str, Any], base_graph: torch.fx.Graph | None, rewritten_graph: torch.fx.Graph | None) -> str:
    """The reviewer's page: summary, tables, the rewritten region as Mermaid, and the graph diff."""
    source = f" ({report['source']})" if report.get("source") else ""
    out: list[str] = [f"# Surgery report: {_rule_title(report)} on {report['model']}{source}", "",
                      summary_line(report), ""]

    composed = _composed(report)
    if composed:
        out += [f"Build order: `{report.get('build_order') or build_order(*(r['name'] for r in composed))}`", ""]
        out += ["## Rules", ""]
        out += _table(("rule", "options", "matches"),
                      [(r["name"], Code(", ".join(f"{k}={json.dumps(v)}" for k, v in (r["options"] or {}).items())),
                        len(r["matches"])) for r in composed]) + [""]
    options = report.get("options") or {}
    if options and not composed:
        out += ["Rule options: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in options.items()), ""]

    out += ["## Matches", ""]
    groups = [(r["name"], r["matches"]) for r in composed] or [(None, report["matches"])]
    rows = [((name,) if name else ()) + (m["position"], m["name"], m["class"],
                                         "" if _match_index(m) is None else _match_index(m))
            for name, matches in groups for m in matches]
    headers = (("rule",) if composed else ()) + ("position", "module", "class", "index")
    out += (_table(headers, rows) if rows else ["No matches."]) + [""]

    out += ["## Grafted modules", ""]
    rows = [(g["name"], f"{g['params']:,}") for g in report["grafted"]]
    out += (_table(("module", "parameters"), rows) if rows else ["Nothing grafted."]) + [""]

    if report["guards"]:
        out += ["<details><summary>Guards of the initial specialisation "
                f"({len(report['guards'])})</summary>", ""]
        out += _table(("kind", "expression", "value", "where"),
                      [(g["kind"], Code(g["expr"]), g["value"], g["where"]) for g in report["guards"]])
        out += ["", "</details>", ""]

    out += _lora_markdown(report.get("lora"))

    out += ["## Validation", ""]
    validation = report.get("validation")
    if validation is None:
        out += ["Not run (pass `--validate`).", ""]
    else:
        rows = [(c["name"], _fmt_diff(c["max_abs_diff"]), _fmt_diff(c["tolerance"]), "pass" if c["passed"] else "**FAIL**") for c in validation["cases"]]
        out += _table(("case", "max abs diff", "tolerance", "result"), rows) + [""]

    timings = {k: v for k, v in report.get("timings", {}).items() if v is not None}
    if timings:
        out += ["Timings: " + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in timings.items()), ""]

    golden = report.get("golden")
    if golden is not None:
        verdict = "matches" if golden["equal"] else f"**drifted** ({len(golden['changes'])} node changes)"
        out += ["## Golden graph", "", f"`{golden['path']}`: {verdict}", ""]
        out += [f"- {c}" for c in golden["changes"][:200]] + ([""] if golden["changes"] else [])

    if rewritten_graph is not None:
        picture = mermaid_region(rewritten_graph, report["matches"], report["grafted"])
        if picture:
            out += ["## Rewritten region", "", PICTURE_LEGEND, "", "```mermaid", picture.rstrip("\n"), "```", ""]

    if base_graph is not None and rewritten_graph is not None:
        diff = diff_graphs(base_graph, rewritten_graph, "base (before surgery)", "rewritten (after surgery)")
        counts = diff.counts()
        out += ["## Graph changes", "",
                f"{counts['added']} nodes added, {counts['removed']} removed, {counts['changed']} changed "
                "(node names canonicalised; identical changes across blocks collapsed).", ""]
        groups = group_changes(diff.node_changes)
        if groups:
            rows = [(g.status, g.path or "<top level>", g.op, Code(g.target), g.role, f"x{g.count}") for g in groups]
            out += _table(("status", "module path", "op", "target", "surgery", "count"), rows) + [""]
        if diff.unified:
            out += ["<details><summary>Unified diff of the canonical graph</summary>", "", "```diff",
                    _cut(diff.unified, MAX_DIFF_LINES).rstrip("\n"), "```", "", "</details>", ""]
    return "\n".join(out)


def write_report(directory: str | os.PathLike[str], report: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    """Atomically write ``report.json`` and ``report.md`` into ``directory`` (created if needed).

    Raises :class:`surgery.errors.ReportError` naming the directory and the fix; on failure
    neither file is left partially written.
    """
    root = Path(directory)
    text = json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n"
    json_path, md_path = root / REPORT_JSON, root / REPORT_MD
    atomic_write_many({json_path: text, md_path: markdown if markdown.endswith("\n") else markdown + "\n"})
    return json_path, md_path


__all__ = [
    "MAX_DIFF_LINES",
    "REPORT_JSON",
    "REPORT_MD",
    "SCHEMA_VERSION",
    "build_report",
    "golden_section",
    "jsonable",
    "lora_section",
    "normalise_validation",
    "render_markdown",
    "rules_section",
    "summary_line",
    "write_report",
]
