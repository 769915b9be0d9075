"""The command line: exit codes, one-line errors, listings, and the apply/validate/diff pipelines.

Most tests drive ``surgery.cli.main.main`` with a fake engine (``Backend``) so they check
the CLI, not the engine; two smoke tests run the real engine on the tiny LongLive stand-in.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from report_fakes import DoubledBlock, TinyBranch, fake_result
from surgery.cli import commands
from surgery.cli.commands import ApplyOptions, Backend, run_validate
from surgery.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
FACTORY = f"{__name__}:tiny_factory"


# --- factories the CLI imports as package.module:factory -------------------------------


def tiny_factory():
    from report_fakes import Tiny

    return Tiny(), ((torch.randn(2, 5, 4),), {})


def bare_factory():
    from report_fakes import Tiny

    return Tiny()


def not_a_model():
    return "a string"


NOT_CALLABLE = 42


# --- a fake engine --------------------------------------------------------------------


@dataclass
class Case:
    name: str
    diff: float | None = 0.0
    error: Exception | None = None

    def run(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"max_abs_diff": self.diff, "passed": self.diff == 0.0, "tolerance": 0.0}


class LoadReport:
    def as_rows(self):
        return [("tensors loaded", "7")]


class FakeEngine:
    """Records calls; ``module`` decides the rewritten graph (swap a block to simulate drift)."""

    def __init__(self, cases: list[Case] | None = None) -> None:
        self.cases = cases if cases is not None else [Case("chunk 0"), Case("chunk 1")]
        self.module: torch.nn.Module = TinyBranch()
        self.calls: list[tuple] = []

    def apply(self, model, rule, *, example_inputs, dry_run):
        self.calls.append(("apply", type(model).__name__, rule.name, example_inputs is not None, dry_run))
        result = fake_result(rule=rule, module=self.module)
        if dry_run:
            result.graph, result.grafted = None, []
            result.dry_run = True  # type: ignore[attr-defined]
        return result

    def load_weights(self, module, path, rule, key_map):
        self.calls.append(("load_weights", module is self.module, path, key_map))
        return LoadReport()

    def load_lora(self, module, path, rule, scale, key_map):
        self.calls.append(("load_lora", module is self.module, path, scale, key_map))
        return LoadReport()

    def validation_cases(self, loaded, result):
        self.calls.append(("validation_cases", loaded.name))
        return self.cases

    def backend(self) -> Backend:
        return Backend(apply=self.apply, load_weights=self.load_weights, validation_cases=self.validation_cases,
                       load_lora=self.load_lora)


@pytest.fixture
def engine(monkeypatch) -> FakeEngine:
    fake = FakeEngine()
    monkeypatch.setattr(commands, "engine_backend", fake.backend)
    return fake


def _one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    return lines[0]


# --- usage and input errors: exit 2, one line ------------------------------------------


@pytest.mark.parametrize("argv", [
    [],
    ["frob"],
    ["apply"],
    ["apply", "longlive", "--size", "huge"],
    ["apply", "longlive", "--rule", "nope"],
    ["apply", "longlive", "--bogus"],
    ["diff"],
    ["validate", "longlive", "--dry-run"],
])
def test_usage_errors_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert line.startswith("surgery") and "error:" in line and "--help" in line
    assert captured.out == ""


@pytest.mark.parametrize("argv, needle", [
    (["apply", "nosuch"], "unknown model 'nosuch'"),
    (["apply", "no_such_pkg.models:build"], "cannot import 'no_such_pkg.models'"),
    (["apply", f"{__name__}:not_a_model"], "returned str, not a torch.nn.Module"),
    (["apply", f"{__name__}:NOT_CALLABLE"], "is a int, not a model factory"),
    (["apply", f"{__name__}:missing"], "has no attribute 'missing'"),
    (["apply", "bad:ref:"], "bad model reference 'bad:ref:'"),
    (["apply", "pkg.mod:"], "bad model reference 'pkg.mod:'"),
    (["apply", FACTORY, "--set", "novalue"], "bad --set 'novalue'"),
    (["apply", FACTORY, "--set", "bogus=1"], "unknown option bogus for rule vace"),
    (["apply", FACTORY, "--set", "vace_in_dim=-3"], "vace_in_dim must be a positive integer"),
    (["apply", FACTORY, "--dry-run", "--validate"], "--validate needs the rewritten model"),
    (["diff", FACTORY], "has no built-in golden graph"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, engine, capsys):
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("surgery: error: ") and needle in line and "fix:" in line
    assert "Traceback" not in line
    assert not [c for c in engine.calls if c[0] == "apply"]  # rejected before any surgery


def test_debug_shows_the_traceback(capsys):
    assert main(["apply", "nosuch", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().endswith("or package.module:factory")


def test_internal_errors_are_distinguishable(engine, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("engine bug\nsecond line")

    engine.apply = broken  # type: ignore[method-assign]
    assert main(["apply", FACTORY]) == 3
    line = _one_line(capsys.readouterr().err)
    assert "internal error: RuntimeError: engine bug second line (rerun with --debug" in line


def test_python_dash_m_surgery_exit_code_and_one_line():
    proc = subprocess.run([sys.executable, "-m", "surgery", "apply", "nosuch"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert _one_line(proc.stderr).startswith("surgery: error: unknown model 'nosuch'")


# --- listings -------------------------------------------------------------------------


def test_models_lists_the_builtin_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("longlive", "streamdiffusionv2", "krea_realtime_video", "reward_forcing", "memflow"):
        assert name in out


def test_models_reports_a_broken_builtin(monkeypatch, capsys):
    class Spec:
        class config:
            base_model, num_frame_per_block, local_attn_size, sink_size = "1.3B", 3, 12, 3
            vace_layers, vace_in_dim = None, 96

    class Pipelines(dict):
        def __getitem__(self, name):
            if name == "broken":
                raise ImportError("no module named broken_standin")
            return super().__getitem__(name)

    monkeypatch.setattr(commands, "builtin_pipelines", lambda: Pipelines(good=Spec(), broken=None))
    assert main(["models"]) == 2
    captured = capsys.readouterr()
    assert "good" in captured.out and "broken" in captured.out
    assert "broken_standin" in _one_line(captured.err)


def test_rules_lists_vace_and_its_options(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "vace" in out and "vace_in_dim=96" in out and "vace_layers=None" in out


@pytest.mark.parametrize("argv, command", [
    (["bench"], "python benchmarks/bench.py`"),
    (["bench", "--help"], "python benchmarks/bench.py --help`"),
    (["bench", "longlive", "--size", "1.3B", "--report", "out dir"], "python benchmarks/bench.py longlive --size 1.3B "
                                                                     "--report 'out dir'`"),
])
def test_bench_moved_out_of_the_package(argv, command, capsys):
    # The harness imports the examples, which an installed package does not have.
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert line.startswith("surgery: error: `surgery bench` has moved") and f"fix: run `{command}" in line
    assert captured.out == ""


# --- apply / validate with a fake engine -----------------------------------------------


def test_apply_prints_tables_and_writes_the_report(engine, tmp_path, capsys):
    report_dir = tmp_path / "report"
    assert main(["apply", FACTORY, "--report", str(report_dir)]) == 0
    out = capsys.readouterr().out
    assert "Matches (3)" in out and "blocks.2" in out and "vace_blocks.1" in out and "x.shape[1]" in out
    assert "vace on Tiny: 3 matches" in out
    report = json.loads((report_dir / "report.json").read_text())
    assert report["schema_version"] == 2 and report["source"] == FACTORY
    assert report["validation"] is None
    assert [m["name"] for m in report["matches"]] == ["blocks.0", "blocks.1", "blocks.2"]
    md = (report_dir / "report.md").read_text()
    assert "```mermaid" in md and "```diff" in md
    assert engine.calls == [("apply", "Tiny", "vace", True, False)]


def test_dry_run_reports_matches_only(engine, tmp_path, capsys):
    assert main(["apply", FACTORY, "--dry-run", "--report", str(tmp_path)]) == 0
    assert "dry run (nothing grafted or rewritten)" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] is True and len(report["matches"]) == 3 and report["graph"]["nodes"] is None
    assert engine.calls == [("apply", "Tiny", "vace", True, True)]


def test_factory_without_example_inputs_for_an_unknown_class_says_what_is_missing(engine, capsys):
    assert main(["apply", f"{__name__}:bare_factory"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "returned a report_fakes.Tiny without example inputs" in line and "built-in models (longlive" in line
    assert "fix: return (model, (args, kwargs)) from the factory" in line
    assert engine.calls == []


def test_apply_validate_passes(engine, tmp_path, capsys):
    assert main(["apply", FACTORY, "--validate", "--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Validation: passed" in out and "chunk 1" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["validation"]["passed"] is True
    assert [c["name"] for c in report["validation"]["cases"]] == ["chunk 0", "chunk 1"]
    assert report["timings"]["validate_s"] >= 0.0


def test_validation_failure_exits_1(engine, tmp_path, capsys):
    engine.cases = [Case("chunk 0"), Case("chunk 1", diff=2.0 ** -20), Case("chunk 2", error=RuntimeError("boom"))]
    opts = ApplyOptions(model=FACTORY, report=str(tmp_path))
    assert run_validate(opts, engine.backend()) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "RuntimeError: boom" in out
    cases = json.loads((tmp_path / "report.json").read_text())["validation"]["cases"]
    assert [c["passed"] for c in cases] == [True, False, False]
    assert cases[1]["max_abs_diff"] == 2.0 ** -20
    assert cases[2]["max_abs_diff"] is None and cases[2]["error"] == "RuntimeError: boom"


def test_weights_and_save(engine, tmp_path, capsys):
    saved = tmp_path / "branch.safetensors"
    weights = tmp_path / "w.safetensors"
    save_file({"vace_blocks.0.w": torch.zeros(2)}, str(weights))  # headers are checked before any work
    assert main(["apply", FACTORY, "--weights", str(weights), "--save", str(saved)]) == 0
    assert ("load_weights", True, str(weights), None) in engine.calls
    assert "tensors loaded" in capsys.readouterr().out
    tensors = load_file(saved)
    assert tensors and all(k.startswith(("vace_embed.", "vace_blocks.0.", "vace_blocks.1.")) for k in tensors)
    state = engine.module.state_dict()
    assert all(torch.equal(tensors[k], state[k]) for k in tensors)
    assert not any(k.startswith("blocks.") for k in tensors)


def test_report_into_unwritable_directory_exits_2(engine, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["apply", FACTORY, "--report", str(blocker / "out")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(blocker / "out") in line and "fix:" in line


# --- diff with a fake engine -----------------------------------------------------------


def test_diff_update_then_match_then_drift(engine, tmp_path, capsys):
    golden = tmp_path / "goldens" / "tiny.graph.txt"
    assert main(["diff", FACTORY, "--golden", str(golden), "--update"]) == 0
    assert golden.exists()
    assert main(["diff", FACTORY, "--golden", str(golden)]) == 0
    assert "graph matches golden" in capsys.readouterr().out

    engine.module = TinyBranch()
    engine.module.blocks[1] = DoubledBlock()
    report_dir = tmp_path / "report"
    assert main(["diff", FACTORY, "--golden", str(golden), "--report", str(report_dir)]) == 1
    out = capsys.readouterr().out
    assert "graph drifted from golden" in out
    assert "added blocks.1: call_function operator.mul (%blocks.1/mul)" in out
    assert "+%blocks.1/mul = call_function operator.mul(%blocks.1.norm, 2.0)" in out
    report = json.loads((report_dir / "report.json").read_text())
    assert report["golden"]["equal"] is False
    assert "added blocks.1: call_function operator.mul (%blocks.1/mul)" in report["golden"]["changes"]


def test_diff_without_golden_exits_2(engine, tmp_path, capsys):
    assert main(["diff", FACTORY, "--golden", str(tmp_path / "missing.txt")]) == 2
    assert "--update" in _one_line(capsys.readouterr().err)


def test_builtin_golden_location():
    from surgery.cli.loading import LoadedModel

    loaded = LoadedModel(name="longlive", model=torch.nn.Identity(), example_inputs=None, pipeline=object(), size="tiny")
    assert commands.default_golden(loaded) == ROOT / "tests" / "goldens" / "longlive.graph.txt"
    loaded.size = "1.3B"
    assert commands.default_golden(loaded).name == "longlive.1.3B.graph.txt"


# --- the real engine on the tiny LongLive stand-in -------------------------------------


def test_real_apply_writes_a_report(tmp_path, capsys):
    assert main(["apply", "longlive", "--report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "CausalWanModel" and report["source"] == "longlive"
    assert [m["index"] for m in report["matches"]] == [0, None, 1, None]
    assert report["graph"]["inserted"] > 0 and report["graph"]["nodes"] > report["graph"]["base_nodes"]
    md = (tmp_path / "report.md").read_text()
    assert '["vace_blocks.0<br/>' in md and ":::inject" in md


def test_real_canonical_graph_is_stable_across_two_traces(tmp_path, capsys):
    golden = tmp_path / "longlive.graph.txt"
    assert main(["diff", "longlive", "--golden", str(golden), "--update"]) == 0
    assert main(["diff", "longlive", "--golden", str(golden)]) == 0
    text = golden.read_text()
    assert "# vace:inject" in text and "0x" not in text
