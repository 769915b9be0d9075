"""Per-pipeline engine figures: graph nodes, guards, trace and apply time.

    PYTHONPATH=. python benchmarks/engine_stats.py --size tiny 1.3B

Large sizes are built on the meta device (tracing never executes real FLOPs, so the
figures are the same as for a real model of that shape).
"""
from __future__ import annotations

import argparse
import json
import time

import surgery
from examples import PIPELINES
from examples.driver import example_call
from rules import vace


def stats(name: str, size: str) -> dict:
    pipeline = PIPELINES[name]
    model = pipeline.build(size, seed=0, init="random" if size == "tiny" else "meta")
    layers = None
    if pipeline.config.vace_layers is not None and size == pipeline.config.base_model:
        layers = list(pipeline.config.vace_layers)
    call = example_call(model, pipeline, height=64, width=64)
    started = time.perf_counter()
    result = surgery.apply(model, vace.rule(vace_layers=layers), example_inputs=call)
    wall = time.perf_counter() - started
    return {
        "pipeline": name, "size": size, "matches": len(result.matches),
        "vace_blocks": sum(1 for g in result.grafted if g.name.startswith("vace_blocks.")),
        "base_nodes": len(result.base_graph.nodes), "rewritten_nodes": len(result.graph.nodes),
        "guards": len(result.guards), "guard_kinds": sorted({g.kind for g in result.guards}),
        "trace_s": round(result.timings["trace_s"], 3), "apply_s": round(wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", nargs="+", default=["tiny"])
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    options = parser.parse_args()
    for size in options.size:
        for name in options.pipelines:
            print(json.dumps(stats(name, size)))


if __name__ == "__main__":
    main()
