"""The targets a benchmark run is judged by, each checked only at the setting it is defined for.

A target that does not apply to the run's setting (the 1.3B CPU float32 targets on a tiny
run) is ``n/a``, never ``fail``, and a target whose measurement was skipped is ``not
measured``; only an applicable, measured target can ``pass`` or ``fail``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["NOT_APPLICABLE", "NOT_MEASURED", "TARGETS", "Target", "evaluate_targets", "failed", "verdict"]

NOT_APPLICABLE = "n/a"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Target:
    """``metric <= factor x against`` (or ``< limit``), checked where ``scope`` holds."""

    name: str
    text: str
    scope: str
    applies: Callable[[Mapping[str, Any]], bool]
    value: Callable[[Mapping[str, Any]], Optional[float]]
    limit: Callable[[Mapping[str, Any]], Optional[float]]
    strict: bool = False  # "<" rather than "<="


def _at_13b_cpu_f32(r: Mapping[str, Any]) -> bool:
    return r["size"] == "1.3B" and r["device"] == "cpu" and r["dtype"] == "float32"


def _scaled(key: str, factor: float) -> Callable[[Mapping[str, Any]], Optional[float]]:
    return lambda r: None if r.get(key) is None else factor * r[key]


def _graphs_during_pairs(r: Mapping[str, Any]) -> Optional[float]:
    compiled = (r.get("forward") or {}).get("compile")
    return None if not compiled else compiled["graphs_during_pairs"]


TARGETS: tuple[Target, ...] = (
    Target("apply_vs_reference", "apply_s <= 0.1 x reference_build_s", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("apply_s"), _scaled("reference_build_s", 0.1)),
    Target("apply_memory", "apply_extra_bytes <= 1.02 x vace_param_bytes", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("apply_extra_bytes"), _scaled("vace_param_bytes", 1.02)),
    Target("forward_on", "forward_ratio_on <= 1.00", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("forward_ratio_on"), lambda r: 1.00),
    # Against the lean hand-written graft (no pad to seq_len): the price of surgery itself.
    Target("forward_on_lean", "forward_ratio_on_lean <= 1.02", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("forward_ratio_on_lean"), lambda r: 1.02),
    Target("forward_off", "forward_ratio_off <= 1.01", "1.3B, cpu, float32",
           _at_13b_cpu_f32, lambda r: r.get("forward_ratio_off"), lambda r: 1.01),
    Target("apply_14b", "apply_s < 2 s (14B shapes, any device incl. meta)", "14B",
           lambda r: r["size"] == "14B", lambda r: r.get("apply_s"), lambda r: 2.0, strict=True),
    # A compiled run (--compile or --compile-blocks): repeated identical chunks compile nothing.
    Target("no_recompiles", "graphs compiled during the pairs <= 0 (compiled runs)", "compiled",
           lambda r: bool((r.get("settings") or {}).get("compile") or (r.get("settings") or {}).get("compile_blocks")),
           _graphs_during_pairs, lambda r: 0),
    # At tiny size both sides are fixed per-call overheads (0.2 s against 0.4 s), which say
    # nothing about reuse at real sizes, where a trace is what a recheck saves.
    Target("respecialise", "respecialise_s < 0.25 x apply_s (1.3B and 14B)", "1.3B, 14B",
           lambda r: r["size"] in ("1.3B", "14B"), lambda r: r.get("respecialise_s"), _scaled("apply_s", 0.25),
           strict=True),
)


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with its value and limit (recorded even where it does not apply) and its ``result``.

    ``result`` is ``pass``, ``fail``, ``n/a`` (not this run's setting) or ``not measured``;
    ``pass`` is ``True``/``False`` for an applicable measured target, else ``None``.
    """
    rows = []
    for target in TARGETS:
        value, limit = target.value(results), target.limit(results)
        applies = bool(target.applies(results))
        passed = None
        if not applies:
            result = NOT_APPLICABLE
        elif value is None or limit is None:
            result = NOT_MEASURED
        else:
            passed = bool(value < limit) if target.strict else bool(value <= limit)
            result = "pass" if passed else "fail"
        rows.append({"name": target.name, "target": target.text, "scope": target.scope, "applies": applies,
                     "value": value, "limit": limit, "pass": passed, "result": result})
    return rows


def verdict(row: Mapping[str, Any]) -> str:
    """A target row's result; rows recorded before ``result`` existed (``benchmarks/results/``) are read too."""
    if "result" in row:
        return str(row["result"])
    if not row["applies"]:
        return NOT_APPLICABLE
    return NOT_MEASURED if row["pass"] is None else ("pass" if row["pass"] else "fail")


def failed(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the applicable targets that failed (what makes the harness exit 1)."""
    return [row["name"] for row in rows if verdict(row) == "fail"]
