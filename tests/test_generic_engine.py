"""The engine names no rule (#12): generic match indices, old reports and pickles still read."""
from __future__ import annotations

import dataclasses
import pickle

from surgery.matching.matcher import Match
from surgery.reports.report import render_markdown


def test_a_match_pickled_with_the_old_field_name_reads_its_index():
    old = Match.__new__(Match)
    old.__dict__.update({"name": "blocks.2", "cls": "Block", "position": 2, "hint_index": 1})
    restored = pickle.loads(pickle.dumps(old))
    assert (restored.index, restored) == (1, Match("blocks.2", "Block", 2, 1))


def test_a_schema_1_report_with_hint_index_renders_its_indices():
    report = {"rule": "vace", "model": "M", "source": None, "options": {}, "grafted": [], "guards": [],
              "dry_run": True, "graph": {}, "validation": None, "golden": None, "timings": {}, "lora": {},
              "matches": [{"name": "blocks.0", "class": "Block", "position": 0, "hint_index": 3},
                          {"name": "blocks.1", "class": "Block", "position": 1, "hint_index": None}]}
    page = render_markdown(report, None, None)
    assert "| 0 | blocks.0 | Block | 3 |" in page and "| 1 | blocks.1 | Block |  |" in page


def test_the_order_names_the_rules():
    from surgery.lora.order import build_order

    assert build_order("vace") == "Base -> vace -> LoRA"
    assert build_order("vace", "ffn-adapter") == "Base -> vace -> ffn-adapter -> LoRA"
    assert build_order() == "Base -> surgery -> LoRA"


def test_lora_naming_of_the_rule_comes_from_the_rule(tmp_path):
    """A Ditto key (``blocks.N.vace.*``) loads into a VACE-rewritten model through the rule's own
    scheme: N is the main layer the VACE block feeds, read from the model's matches."""
    import torch
    from safetensors.torch import save_file

    import surgery
    from examples import PIPELINES
    from examples.driver import example_call
    from rules import vace
    from surgery.lora import load_lora_file

    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    model = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline)).module
    assert vace.model_layers(model) == (0, 2)  # every second of the four blocks
    linear = model.vace_blocks[1].ffn[0]
    path = tmp_path / "ditto.safetensors"
    save_file({"diffusion_model.blocks.2.vace.ffn.0.lora_A.weight": torch.ones(2, linear.in_features),
               "diffusion_model.blocks.2.vace.ffn.0.lora_B.weight": torch.ones(linear.out_features, 2)}, str(path))
    report = load_lora_file(model, path)
    assert report.targets == ("vace_blocks.1.ffn.0",) and "blocks.N.vace (Ditto)" in report.schemes


def test_lora_report_counts_targets_per_module_list_of_any_name():
    from surgery.lora.report import LoraLoadReport

    report = LoraLoadReport(model=None, adapter_name="a", files=(), schemes=(), ranks={}, with_alpha=0, scale=1.0,
                            tensors=0, lora_dtypes={}, seconds=0.0,
                            targets=("blocks.0.q", "blocks.1.ffn.0", "adapters.0.up", "head.head"))
    assert report.groups == {"blocks": 2, "adapters": 1, "other": 1}
    assert dict(report.as_rows())["targets"] == "4 (blocks: 2, adapters: 1, other: 1)"


def test_the_engine_imports_no_rule_and_no_model_package():
    """surgery/ finds the rule registry and the built-in models through entry points (surgery.catalogue)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "surgery"
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            names += [node.args[0].value for _ in [0] if isinstance(node, ast.Call) and getattr(node.func, "attr", "")
                      == "import_module" and node.args and isinstance(node.args[0], ast.Constant)]
            found += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in ("rules", "examples")]
    assert found == []


def test_the_catalogue_names_the_built_in_rules_and_models():
    import examples
    import rules
    from surgery.catalogue import models_module, rule_registry

    assert rule_registry() is rules.RULES and models_module() is examples


def test_rule_weights_load_by_the_rules_own_prefixes_and_key_maps(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    import surgery
    from examples import PIPELINES
    from examples.driver import example_call
    from examples.reference import random_vace_state_dict
    from rules import ffn_adapter, vace
    from rules.vace.keymaps import NATIVE_TO_DIFFUSERS
    from surgery.errors import WeightsError
    from rules.vace import load_vace_weights
    from surgery.weights import apply_key_map, compile_key_map, load_rule_weights

    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    call = example_call(base, pipeline)
    by_rule, by_vace = (surgery.apply(base, vace.rule(), example_inputs=call).module for _ in range(2))
    weights = random_vace_state_dict(by_rule, seed=3)
    native, diffusers = tmp_path / "native.safetensors", tmp_path / "diffusers.safetensors"
    save_file(weights, str(native))
    table = compile_key_map(NATIVE_TO_DIFFUSERS)
    save_file({apply_key_map(k, table): v for k, v in weights.items()}, str(diffusers))
    load_vace_weights(by_vace, native)
    report = load_rule_weights(by_rule, diffusers, key_map="diffusers")
    assert report.tensors == len(weights)
    got, want = by_rule.state_dict(), by_vace.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want) and all(torch.equal(got[k], weights[k]) for k in weights)

    with pytest.raises(WeightsError, match="has no key map 'comfy'; fix: use one of: diffusers"):
        load_rule_weights(by_rule, native, key_map="comfy")
    adapted = surgery.apply(base, ffn_adapter.rule(), example_inputs=call).module
    with pytest.raises(WeightsError, match=r"holds no ffn-adapter keys \(\*\.\*\.ffn_adapter\.\) after prefix stripping"):
        load_rule_weights(adapted, native)  # by the rule's own (pattern) prefixes, not VACE's
    unprefixed = dataclasses.replace(adapted.surgery_state.rule, weight_prefixes=())
    with pytest.raises(WeightsError, match="rule 'ffn-adapter' declares no weight prefixes"):
        load_rule_weights(adapted, native, rule=unprefixed)
    with pytest.raises(WeightsError, match="was not rewritten by surgery"):
        load_rule_weights(base, native)


def test_cli_weights_follow_the_chosen_rule(tmp_path, capsys):
    """--weights loads the grafted modules of the --rule given, not VACE's whatever the rule."""
    from safetensors.torch import save_file

    import surgery
    from examples import PIPELINES
    from examples.driver import example_call
    from examples.reference import random_vace_state_dict
    from rules import vace
    from surgery.cli.main import main

    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    rewritten = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline)).module
    path = tmp_path / "vace.safetensors"
    save_file(random_vace_state_dict(rewritten, seed=1), str(path))
    assert main(["apply", "longlive", "--rule", "ffn-adapter", "--no-validate", "--weights", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "vace.safetensors holds no ffn-adapter keys (*.*.ffn_adapter.)" in error[0]
    assert main(["apply", "longlive", "--no-validate", "--weights", str(path)]) == 0


def test_the_default_rule_and_its_unqualified_goldens_come_from_the_catalogue():
    import torch

    import rules
    from surgery.catalogue import default_rule
    from surgery.cli import commands
    from surgery.cli.loading import LoadedModel

    assert default_rule() == next(iter(rules.RULES)) and commands.ApplyOptions(model="m").rule == default_rule()
    loaded = LoadedModel(name="longlive", model=torch.nn.Identity(), example_inputs=None, pipeline=object(), size="tiny")
    assert commands.default_golden(loaded, default_rule()).name == "longlive.graph.txt"
    assert commands.default_golden(loaded, "ffn-adapter").name == "longlive.ffn-adapter.graph.txt"
