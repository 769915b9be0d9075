"""The benchmark harness (``benchmarks/bench.py``): one tiny run, checking bench.json's shape and keys
(not timings), the targets and the exit code, and the refusals before any work."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is beside the package, not installed with it
    sys.path.insert(0, str(ROOT))

from benchmarks import bench  # noqa: E402
from benchmarks.bench_models import bench_subject, geometry_for_tokens  # noqa: E402
from benchmarks.lean_vace import attach_lean_vace  # noqa: E402
from benchmarks.measure import STEADY_CALLS, measure_forward  # noqa: E402
from benchmarks.memory import PeakMemory  # noqa: E402
from benchmarks.targets import evaluate_targets, failed, verdict  # noqa: E402
from surgery.errors import InputError  # noqa: E402

HEADLINE = ("apply_s", "reference_build_s", "apply_extra_bytes", "reference_extra_bytes", "vace_param_bytes",
            "forward_ratio_on", "forward_ratio_on_lean", "forward_ratio_off", "respecialise_s")
TARGET_NAMES = {"apply_vs_reference", "apply_memory", "forward_on", "forward_on_lean", "forward_off", "apply_14b",
                "no_recompiles", "respecialise"}


# The bench's own runs; the other benchmark scripts (peak_memory, weights_load) record their own schemas.
RESULTS = sorted(p for p in (ROOT / "benchmarks" / "results").glob("*.json")
                 if not p.name.startswith(("peak_memory-", "weights_load-")))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    code = bench.main(["longlive", "--size", "tiny", "--repeats", "2", "--tokens", "12", "--steps", "2",
                       "--profile", "5", "--report", str(out)])
    assert (out / bench.PROFILE_FILE).read_text().strip()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temporaries
    results = json.loads((out / bench.BENCH_FILE).read_text())
    # Exit 1 exactly when a target of this setting failed; none applies to a tiny run.
    assert code == 0 and not failed(results["targets"])  # nothing of a tiny run is a 1.3B or 14B target
    return results


def test_headline_numbers_present_and_finite(tiny_run: dict) -> None:
    for key in HEADLINE:
        assert isinstance(tiny_run[key], (int, float)), key
        assert math.isfinite(tiny_run[key]), key
    assert tiny_run["apply_s"] > 0 and tiny_run["reference_build_s"] > 0
    assert tiny_run["forward_ratio_on"] > 0 and tiny_run["forward_ratio_off"] > 0
    assert tiny_run["vace_param_bytes"] == tiny_run["reference_vace_param_bytes"] > 0
    assert tiny_run["skipped"] == {}


def test_run_describes_its_setting(tiny_run: dict) -> None:
    assert (tiny_run["model"], tiny_run["size"], tiny_run["device"], tiny_run["dtype"]) == \
        ("longlive", "tiny", "cpu", "float32")
    assert tiny_run["requested_device"] == "cpu" and tiny_run["note"] is None
    assert tiny_run["torch"] == torch.__version__
    for key in ("cpu", "logical_cores", "usable_cores", "torch_threads", "loadavg", "python"):
        assert key in tiny_run["machine"], key
    settings = tiny_run["settings"]
    assert settings["tokens"] == 12 and settings["frames_per_chunk"] == 3 and settings["denoise_calls_per_chunk"] == 2
    assert (settings["height"], settings["width"]) == (32, 32)
    assert set(tiny_run["load"]) == {"before", "after"}
    assert tiny_run["source"] is None or len(tiny_run["source"]["commit"]) == 40


def test_stats_are_medians_with_min_and_max(tiny_run: dict) -> None:
    for key in ("apply_s", "reference_build_s", "forward_ratio_on", "forward_ratio_on_lean", "forward_ratio_off"):
        s = tiny_run["stats"][key]
        assert s["n"] == 2 and len(s["values"]) == 2
        assert s["min"] <= s["median"] <= s["max"]
        assert s["median"] == tiny_run[key]
    assert set(tiny_run["apply_phases_s"]) >= {"trace_s", "match_s", "graft_s", "rewrite_s", "apply_s"}


def test_forward_sides_do_the_same_work(tiny_run: dict) -> None:
    forward = tiny_run["forward"]
    # Same VACE tensors on both sides: the rewritten model is bit-exact with the reference,
    # and without a context it is bit-exact with the base model.
    assert forward["on"]["max_abs_diff"] == 0.0
    assert forward["on_lean"]["max_abs_diff"] == 0.0  # the lean graft too
    assert forward["off"]["max_abs_diff"] == 0.0
    # Both VACE-on ratios come from the same rounds: one set of rewritten chunk times.
    assert forward["on"]["rewritten_s"] == forward["on_lean"]["rewritten_s"]
    assert forward["compile"] is None
    assert forward["weights"]["bytes"] == tiny_run["vace_param_bytes"]
    assert forward["weights"]["storage"].startswith("shared")
    real = forward["respecialise"]
    # A new resolution re-derives the cached graph's decisions instead of tracing again.
    assert real["outcome"] == "rechecked" and real["new_specialisations"] == 0
    assert real["seconds"] > 0 and real["first_call_s"] > real["seconds"]


def test_respecialise_on_meta(tiny_run: dict) -> None:
    re = tiny_run["respecialise"]
    assert re["device"] == "meta"
    assert re["outcome"] == "rechecked" and re["new_specialisations"] == 0 and re["apply_s"] > 0
    assert re["fresh_specialisation_s"] == pytest.approx(re["trace_s"] + re["rewrite_s"])
    assert 0 < re["seconds"] < re["fresh_specialisation_s"]
    assert re["steady_call_s"]["n"] == STEADY_CALLS
    assert re["wall_s"] == pytest.approx(re["first_call_s"] - re["steady_call_s"]["median"])
    assert re["seconds"] == tiny_run["respecialise_s"]


def test_memory_section(tiny_run: dict) -> None:
    memory = tiny_run["memory"]
    for which in ("apply", "reference"):
        assert "error" not in memory[which], memory[which]
        assert memory[which]["extra_bytes"] >= 0
        assert memory[which]["param_bytes"] == tiny_run["vace_param_bytes"]
    assert tiny_run["apply_extra_bytes"] == memory["apply"]["extra_bytes"]
    assert memory["method"]


def test_targets_section(tiny_run: dict) -> None:
    targets = {t["name"]: t for t in tiny_run["targets"]}
    assert set(targets) == TARGET_NAMES
    for t in targets.values():
        assert set(t) == {"name", "target", "scope", "applies", "value", "limit", "pass", "result"}
        if t["name"] != "no_recompiles":  # nothing was compiled
            assert t["value"] is not None and t["limit"] is not None  # everything was measured at tiny size
    # The 1.3B and 14B targets do not apply to a tiny run: n/a, whatever the numbers.
    for name in TARGET_NAMES:
        assert (targets[name]["applies"], targets[name]["result"], targets[name]["pass"]) == (False, "n/a", None)
    assert targets["apply_vs_reference"]["limit"] == pytest.approx(0.1 * tiny_run["reference_build_s"])


def test_evaluate_targets_pass_and_fail() -> None:
    results = {"size": "1.3B", "device": "cpu", "dtype": "float32", "apply_s": 1.0, "reference_build_s": 20.0,
               "apply_extra_bytes": 103, "vace_param_bytes": 100, "forward_ratio_on": 1.0,
               "forward_ratio_off": 1.02, "respecialise_s": 0.25, "forward_ratio_on_lean": 1.03}
    rows = {r["name"]: r for r in evaluate_targets(results)}
    assert rows["apply_vs_reference"]["pass"] is True
    assert rows["apply_memory"]["pass"] is False
    assert rows["forward_on"]["pass"] is True  # <= 1.00 holds at exactly 1.00
    assert rows["forward_off"]["pass"] is False
    assert rows["forward_on_lean"]["pass"] is False
    assert rows["no_recompiles"]["result"] == "n/a"  # not a compiled run
    assert rows["respecialise"]["pass"] is False  # strictly below 25%
    assert rows["apply_14b"]["applies"] is False and rows["apply_14b"]["result"] == "n/a"
    assert failed(list(rows.values())) == ["apply_memory", "forward_on_lean", "forward_off", "respecialise"]
    compiled = {"size": "tiny", "device": "cpu", "dtype": "float32", "settings": {"compile_blocks": "inductor"}}
    for graphs, result in ((0, "pass"), (2, "fail")):
        row = {r["name"]: r for r in evaluate_targets({**compiled, "forward": {"compile": {"graphs_during_pairs": graphs}}})}
        assert row["no_recompiles"]["result"] == result
    missing = {r["name"]: r for r in evaluate_targets({"size": "14B", "device": "meta", "dtype": "float32",
                                                        "apply_s": 1.5})}
    assert missing["apply_14b"] == {**missing["apply_14b"], "applies": True, "pass": True, "result": "pass"}
    assert missing["respecialise"]["result"] == "not measured" and missing["respecialise"]["pass"] is None
    assert missing["forward_on"]["result"] == "n/a" and missing["apply_vs_reference"]["pass"] is None


def _canned(size: str, **values: float) -> dict:
    results = {"model": "longlive", "size": size, "device": "cpu", "requested_device": "cpu", "dtype": "float32",
               "note": None, "skipped": {}, "stats": {}, **values}
    results["targets"] = evaluate_targets(results)
    return results


# At tiny, every 1.3B target would fail by its numbers; none of them applies.
TINY_MISSING_1_3B = _canned("tiny", apply_s=1.0, reference_build_s=1.0, apply_extra_bytes=10, vace_param_bytes=1,
                            forward_ratio_on=3.0, forward_ratio_off=3.0, respecialise_s=0.1)


@pytest.mark.parametrize("results, code, shown", [
    (TINY_MISSING_1_3B, 0, ["n/a"]),
    (_canned("1.3B", apply_s=1.0, reference_build_s=5.0), 1,
     ["fail", "failed targets of this setting: apply_vs_reference (exit 1)"]),
])
def test_exit_code_counts_only_targets_of_the_setting(results, code, shown, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "run_bench", lambda config: dict(results))
    assert bench.main(["longlive", "--report", str(tmp_path)]) == code
    out = capsys.readouterr().out
    assert all(s in out for s in shown)
    if code == 0:
        assert "fail" not in out
    assert json.loads((tmp_path / bench.BENCH_FILE).read_text())["targets"] == results["targets"]


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_recorded_results_still_read(path: Path) -> None:
    # Runs recorded before targets had a "result" field: the same verdicts, the same table.
    recorded = json.loads(path.read_text())
    again = {r["name"]: r for r in evaluate_targets(recorded)}
    for row in recorded["targets"]:
        assert verdict(row) == again[row["name"]]["result"]
        assert (verdict(row) == "n/a") == (not row["applies"])
    metrics, targets = bench.render_table(recorded)
    assert metrics.row_count >= 8 and targets.row_count == len(recorded["targets"])


def test_every_flag_has_help() -> None:
    for action in bench.build_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), action.dest


def test_peak_memory_sees_an_allocation() -> None:
    with PeakMemory(torch.device("cpu")) as probe:
        block = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
        del block
    assert probe.as_dict()["host_peak_extra_bytes"] >= 15 * 2**20


def test_geometry_for_tokens() -> None:
    assert geometry_for_tokens(2160, 3) == (320, 576)
    assert geometry_for_tokens(96, 3) == (64, 128)
    assert geometry_for_tokens(12, 3) == (32, 32)
    with pytest.raises(InputError):
        geometry_for_tokens(100, 3)


def test_large_models_fall_back_to_meta(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Pretend the machine has 1 MiB free: the tiny model no longer "fits", apply runs on meta.
    monkeypatch.setattr(bench, "_free_bytes", lambda device: 2**20)
    config = bench.BenchConfig(model="longlive", size="tiny", repeats=1, memory=False)
    results = bench.run_bench(config)
    assert results["device"] == "meta" and results["requested_device"] == "cpu"
    assert "meta" in results["note"]
    assert results["apply_s"] > 0 and results["reference_build_s"] is None
    assert results["forward_ratio_on"] is None and "forward" in results["skipped"]
    assert results["respecialise"]["device"] == "meta" and results["respecialise_s"] is not None
    bench.write_results(tmp_path, results)
    assert json.loads((tmp_path / bench.BENCH_FILE).read_text())["device"] == "meta"


def test_unknown_model_is_an_input_error() -> None:
    with pytest.raises(InputError):
        bench_subject("nope", size="tiny", device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("argv, needle", [
    (["nope"], "bench: error: unknown model 'nope'; fix: use one of longlive"),
    (["longlive", "--repeats", "0"], "bench: error: argument --repeats: 0 is not positive"),
    (["longlive", "--device", "bogus"], "bench: error: unknown device 'bogus'"),
    (["longlive", "--compile", "inductr"],
     "bench: error: unknown torch.compile backend 'inductr' for --compile; fix: use eager"),
    (["longlive", "--compile-blocks", "inductr"],
     "bench: error: unknown torch.compile backend 'inductr' for --compile-blocks; fix: use eager"),
    (["longlive", "--compile", "eager", "--compile-blocks", "eager"],
     "bench: error: --compile and --compile-blocks were both given; fix: pass one"),
    (["longlive", "--provider", "nowhere.at_all:subject"], "cannot import benchmark provider 'nowhere.at_all'"),
    (["longlive", "--report", "{file}/out"], "cannot create report directory {file}/out: Not a directory"),
])
def test_bad_input_is_one_line_exit_2_before_any_work(argv, needle, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    measured = []
    monkeypatch.setattr(bench, "measure_build_times", lambda *args: measured.append(args))
    assert bench.main([a.format(file=blocker) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle.format(file=blocker) in err, err
    assert measured == []


def test_runs_as_a_script_from_any_directory(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "longlive", "--device", "nowhere"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("bench: error: unknown device 'nowhere'") and proc.stderr.count("\n") == 1


def test_lean_vace_equals_the_rewritten_model_and_the_reference_bit_for_bit() -> None:
    import surgery
    from examples import PIPELINES
    from examples.driver import example_call, run_stream
    from examples.reference import VACE_PREFIXES, CausalVaceWanModel, random_vace_state_dict
    from rules import vace
    from surgery.tracing.twin import share_tree

    pipeline = PIPELINES["longlive"]
    cfg = pipeline.config
    base = pipeline.build("tiny", 0, "cpu", torch.float32, "random")
    rewritten = surgery.apply(base, vace.rule(vace_in_dim=cfg.vace_in_dim),
                              example_inputs=example_call(base, pipeline, seed=0)).module
    reference = CausalVaceWanModel(share_tree(base), cfg.vace_in_dim)
    lean = share_tree(base)
    handle = attach_lean_vace(lean, cfg.vace_in_dim)
    weights = random_vace_state_dict(reference, seed=3)  # non-zero, before_proj and after_proj included
    for model in (reference, rewritten, lean):
        result = model.load_state_dict(weights, strict=False)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if k.startswith(VACE_PREFIXES)]
    assert sorted(k for k in lean.state_dict() if k.startswith(VACE_PREFIXES)) == sorted(weights)
    context = torch.randn(1, cfg.vace_in_dim, cfg.num_frame_per_block, 4, 4, generator=torch.Generator().manual_seed(5))
    # The tokens reach before_proj laid out as the reference's: at real sizes (not at this
    # one) a matmul on a strided view rounds differently, by 2e-6 at 1.3B.
    strides: dict[str, list] = {"reference": [], "lean": []}
    probes = [model.vace_blocks[0].before_proj.register_forward_pre_hook(
        lambda module, args, seen=strides[name]: seen.append((args[0].is_contiguous(), args[0].stride()[1:])))
        for name, model in (("reference", reference), ("lean", lean))]
    streams = {name: run_stream(model, pipeline, chunks=3, vace_context=context, vace_context_scale=0.7, seed=1).outputs
               for name, model in (("rewritten", rewritten), ("reference", reference), ("lean", lean))}
    plain = run_stream(base, pipeline, chunks=3, seed=1).outputs
    assert len(streams["lean"]) == len(plain) > 3  # three chunks of denoising calls and commits
    for name in ("reference", "lean"):
        assert all(torch.equal(a, b) for a, b in zip(streams["rewritten"], streams[name])), name
    assert strides["lean"] == strides["reference"] and strides["lean"]
    for probe in probes:
        probe.remove()
    assert max(float((a - b).abs().max()) for a, b in zip(streams["lean"], plain)) > 0.1  # VACE changed the stream
    # VACE off: the base model's stream.
    assert all(torch.equal(a, b) for a, b in zip(run_stream(lean, pipeline, chunks=3, seed=1).outputs, plain))
    handle.remove()
    hooked = [m for m in lean.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooked == [] and not handle.handles


@pytest.mark.slow  # compiles five models' blocks (about 30 s on 2 cores)
def test_compiled_blocks_run_every_side_without_recompiles() -> None:
    # One call per chunk: its first run sees the caches as the prefill left them, later runs
    # as the chunk leaves them; the warm-up runs it twice, so the pairs compile nothing.
    subject = bench_subject("longlive", size="tiny", device=torch.device("cpu"), dtype=torch.float32, tokens=12, steps=1)
    forward = measure_forward(subject, 2, backend="eager", blocks=True)
    compiled = forward["compile"]
    assert (compiled["backend"], compiled["mode"], compiled["graphs_during_pairs"]) == ("eager", "blocks", 0)
    assert set(compiled["first_chunk_s"]) == {"rewritten_on", "reference_on", "lean_on", "rewritten_off", "base_off"}
    for side in ("on", "on_lean", "off"):
        assert forward[side]["max_abs_diff"] == 0.0 and forward[side]["ratio"]["n"] == 2, side
