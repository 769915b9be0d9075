"""CI's graph gate: every built-in model's rewritten graph matches its committed golden,
and a change inside one block is caught and named node by node."""
from __future__ import annotations

import json
import types

import pytest

import surgery
from surgery.cli.loading import build_rule, load_model
from surgery.cli.main import main
from surgery.reports.diff import compare_to_golden

MODELS = ["longlive", "streamdiffusionv2", "krea_realtime_video", "reward_forcing", "memflow"]


@pytest.mark.parametrize("model", MODELS)
def test_builtin_graph_matches_golden(model, tmp_path):
    assert main(["diff", model, "--report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["golden"]["equal"] is True and report["golden"]["changes"] == []


def test_an_op_added_inside_one_block_is_named(tmp_path):
    loaded = load_model("longlive", size=None, seed=0, need_values=False)
    norm = loaded.model.blocks[1].norm2
    original = type(norm).forward
    norm.forward = types.MethodType(lambda self, x: original(self, x) * 1.0, norm)
    result = surgery.apply(loaded.model, build_rule("vace", [], loaded), example_inputs=loaded.example_inputs)
    diff = compare_to_golden(result.graph, "tests/goldens/longlive.graph.txt")
    assert not diff.equal
    added = [c for c in diff.changes if c.startswith("added")]
    assert added == ["added blocks.1.norm2: call_function operator.mul (%blocks.1.norm2/mul)"]
    assert "blocks.1.norm2" in diff.unified and "operator.mul" in diff.unified
