"""A rule's weights by its own prefixes, ``*`` patterns included: ``ffn-adapter`` grafts inside every
block (``blocks.N.ffn_adapter``), declares ``*.*.ffn_adapter.``, and its weights load with
``load_rule_weights``, ``load_base_weights`` (a full checkpoint) and the CLI's ``--weights``/``--save``,
with every check of the loader."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import surgery
from examples import PIPELINES
from examples.driver import compare, example_call, run_stream
from rules import ffn_adapter
from rules.ffn_adapter import BottleneckAdapter
from surgery.cli.main import main
from surgery.errors import WeightsError
from surgery.lora.targets import module_targeted_targets
from surgery.weights import load_base_weights, load_rule_weights
from surgery.tracing.policy import TracePolicy
from surgery.weights.keys import under_prefixes

PIPELINE = PIPELINES["longlive"]
ADAPTER_KEYS = sorted(f"blocks.{i}.ffn_adapter.{layer}.{kind}" for i in range(4) for layer in ("down", "up")
                      for kind in ("weight", "bias"))


@pytest.fixture(scope="module")
def applied():
    base = PIPELINE.build("tiny", seed=0)
    return base, surgery.apply(base, ffn_adapter.rule(), example_inputs=example_call(base, PIPELINE))


def _adapter_weights(result, seed: int = 7) -> dict[str, torch.Tensor]:
    """Seeded random values for every adapter tensor, by native key."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in result.module.state_dict().items()
            if under_prefixes(k, result.rule.weight_prefixes)}


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module, snapshot) -> bool:
    state = module.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("key, prefixes, expected", [
    ("blocks.3.ffn_adapter.up.weight", ("blocks.*.ffn_adapter.",), True),
    ("blocks.3.ffn_adapter.up.weight", ("*.*.ffn_adapter.",), True),
    ("blocks.3.ffn.0.weight", ("*.*.ffn_adapter.",), False),
    ("blocks.3.ffn_adapter_x.up.weight", ("*.*.ffn_adapter.",), False),  # a * part is one whole name part
    ("blocks.3.4.ffn_adapter.up.weight", ("blocks.*.ffn_adapter.",), False),
    ("blocksX3.ffn_adapter.up.weight", ("blocks.*.ffn_adapter.",), False),  # the dot is no wildcard
    ("vace_blocks.0.proj.weight", ("vace_blocks.", "vace_patch_embedding."), True),  # plain prefixes as before
    ("blocks.0.proj.weight", ("vace_blocks.",), False),
    ("anything", ("",), True),
    ("anything", (), False),
])
def test_weight_prefixes_match_part_wise(key, prefixes, expected):
    assert under_prefixes(key, prefixes) is expected


@pytest.mark.parametrize("qualname, patterns, expected", [
    ("blocks.2.cross_attn", ("blocks.*.cross_attn",), True),
    ("blocks.2.cross_attn", ("blocks.2.cross_attn",), True),
    ("blocks.2.cross_attn.k", ("blocks.*.cross_attn",), False),  # a leaf pattern names the whole name
    ("blocks.2.3.cross_attn", ("blocks.*.cross_attn",), False),
    ("blocksX2.cross_attn", ("blocks.*.cross_attn",), False),
    ("blocks.2.cross_attn", ("blocks.*",), False),
])
def test_leaf_patterns_use_the_same_parts_as_weight_prefixes(qualname, patterns, expected):
    """One pattern language (surgery.dotted) for TracePolicy.extra_leaves and Rule.weight_prefixes."""
    assert TracePolicy(extra_leaves=frozenset(patterns)).named_leaf(qualname) is expected


def test_the_rule_declares_a_pattern_that_holds_exactly_its_adapters(applied):
    base, result = applied
    assert result.rule.weight_prefixes == ffn_adapter.rule().weight_prefixes == ("*.*.ffn_adapter.",)
    declared = sorted(k for k in result.module.state_dict() if under_prefixes(k, result.rule.weight_prefixes))
    assert declared == ADAPTER_KEYS == sorted(set(result.module.state_dict()) - set(base.state_dict()))


def test_loaded_adapters_equal_the_hand_written_reference_bit_for_bit(applied, tmp_path):
    base, result = applied
    weights = _adapter_weights(result)
    path = tmp_path / "adapters.safetensors"
    save_file(weights, str(path))
    report = load_rule_weights(result.module, path)
    assert (report.tensors, report.ignored) == (16, 0)
    state = result.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())

    reference = result.rule.reference.build(PIPELINE.build("tiny", seed=0), result.matches)
    filled = 0
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            native = result.rule.reference.to_native(name, result.matches)
            if native in weights:
                tensor.copy_(weights[native])
                filled += 1
    assert filled == len(weights)
    ours = run_stream(result.module, PIPELINE, chunks=3)
    assert compare(ours, run_stream(reference, PIPELINE, chunks=3)) == 0.0
    assert compare(ours, run_stream(base, PIPELINE, chunks=3)) > 0.0  # the loaded adapters really run


def _refusals(weights: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """Files the loader must refuse, each with the start of its one-line error."""
    last = list(weights)[-1]  # the last the loader reads (module order): every other tensor checks out first
    nan = dict(weights)
    nan[last] = weights[last].clone()
    nan[last].view(-1)[-1] = float("nan")
    return {
        "missing": ({k: v for k, v in weights.items() if k != "blocks.2.ffn_adapter.up.bias"},
                    "1 ffn-adapter keys missing from the file (blocks.2.ffn_adapter.up.bias)"),
        "unexpected": ({**weights, "blocks.1.ffn_adapter.gate.weight": torch.ones(2, 2)},
                       "1 unexpected keys in the file (blocks.1.ffn_adapter.gate.weight)"),
        "shape": ({**weights, "blocks.0.ffn_adapter.down.weight": torch.ones(3, 3)},
                  "1 shape mismatches, model vs file (blocks.0.ffn_adapter.down.weight: [16, 64] vs [3, 3])"),
        "dtype": ({**weights, "blocks.3.ffn_adapter.up.bias": torch.ones(weights["blocks.3.ffn_adapter.up.bias"].shape,
                                                                         dtype=torch.int32)},
                  "1 tensors are not floating point (blocks.3.ffn_adapter.up.bias (int32))"),
        "nan": (nan, f"tensor {last!r} (model key {last!r}) contains NaN or Inf values"),
    }


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "dtype", "nan"])
def test_a_refused_file_leaves_the_model_unchanged(applied, tmp_path, case):
    _, result = applied
    good = tmp_path / "good.safetensors"
    save_file(_adapter_weights(result, seed=1), str(good))
    load_rule_weights(result.module, good)
    before = _snapshot(result.module)
    stored, problem = _refusals(_adapter_weights(result, seed=2))[case]
    bad = tmp_path / f"{case}.safetensors"
    save_file(stored, str(bad))
    with pytest.raises(WeightsError) as caught:
        load_rule_weights(result.module, bad)
    message = str(caught.value)
    assert problem in message and "; fix: " in message and "\n" not in message
    assert _same(result.module, before)  # all or nothing: not even the tensors checked before the bad one


def test_a_full_checkpoint_loads_its_base_and_then_its_adapters(applied, tmp_path):
    base, result = applied
    weights = _adapter_weights(result)
    full = tmp_path / "full.safetensors"
    save_file({**{k: v.clone() for k, v in base.state_dict().items()}, **weights}, str(full))
    prefixes = result.rule.weight_prefixes

    other = PIPELINE.build("tiny", seed=5)
    untouched = _snapshot(other)
    with pytest.raises(WeightsError, match=r"16 unexpected keys in the file \(blocks.0.ffn_adapter.down.bias"):
        load_base_weights(other, full)  # without the rule's prefixes its adapters are not base keys
    assert _same(other, untouched)
    report = load_base_weights(other, full, rule_prefixes=prefixes)
    assert (report.tensors, report.ignored) == (len(base.state_dict()), 16)
    assert _same(other, _snapshot(base))

    rewritten = surgery.apply(other, ffn_adapter.rule(), example_inputs=example_call(other, PIPELINE)).module
    report = load_rule_weights(rewritten, full)
    assert (report.tensors, report.ignored) == (16, len(base.state_dict()))
    # The base load into a rewritten model leaves its adapters alone.
    before = _snapshot(rewritten)
    load_base_weights(rewritten, full, rule_prefixes=prefixes)
    assert _same(rewritten, before)
    state = rewritten.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_lora_targets_skip_adapters_grafted_inside_the_blocks(applied):
    base, result = applied
    targets = module_targeted_targets(result.module)
    assert targets == module_targeted_targets(base)
    assert not [t for t in targets if "ffn_adapter" in t]


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def test_cli_loads_saves_and_reloads_the_adapters(applied, tmp_path, capsys):
    base, result = applied
    weights = _adapter_weights(result)
    given, saved = tmp_path / "adapters.safetensors", tmp_path / "saved.safetensors"
    save_file(weights, str(given))
    assert main(["apply", "longlive", "--rule", "ffn-adapter", "--weights", str(given), "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "ffn-adapter-on" in out and "validation PASSED (4/4 cases, max abs diff 0)" in out
    tensors, metadata = _tensors(saved)
    assert sorted(tensors) == ADAPTER_KEYS and all(torch.equal(tensors[k], v) for k, v in weights.items())
    assert metadata["surgery_rule"] == "ffn-adapter"

    assert main(["apply", "longlive", "--rule", "ffn-adapter", "--weights", str(saved), "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert f"Weights: {saved}" in out and "Base weights" not in out
    assert "│ tensors loaded                   │ 16" in out


def test_cli_takes_a_full_checkpoint_for_the_base_and_the_adapters(applied, tmp_path, capsys):
    base, result = applied
    full = tmp_path / "full.safetensors"
    save_file({**{k: v.clone() for k, v in base.state_dict().items()}, **_adapter_weights(result)}, str(full))
    assert main(["apply", "longlive", "--rule", "ffn-adapter", "--weights", str(full), "--no-validate"]) == 0
    out = capsys.readouterr().out
    base_part, _, rule_part = out.partition(f"Weights: {full}")
    assert f"Base weights: {full}" in base_part
    assert f"tensors loaded                      │ {len(base.state_dict())}" in base_part
    assert "tensors left for the rule's weights │ 16" in base_part
    assert "tensors loaded                   │ 16" in rule_part


def test_cli_refuses_a_bad_adapter_file_in_one_line(applied, tmp_path, capsys):
    _, result = applied
    weights = _adapter_weights(result)
    del weights["blocks.2.ffn_adapter.up.bias"]
    path = tmp_path / "short.safetensors"
    save_file(weights, str(path))
    assert main(["apply", "longlive", "--rule", "ffn-adapter", "--weights", str(path), "--no-validate"]) != 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.err + captured.out).splitlines() if "ffn-adapter keys missing" in line]
    assert len(lines) == 1 and "blocks.2.ffn_adapter.up.bias" in lines[0] and "fix:" in lines[0]


def test_cli_takes_a_file_without_adapter_keys_for_no_full_checkpoint(applied, tmp_path, capsys):
    base, _ = applied
    path = tmp_path / "base.safetensors"
    save_file({k: v.clone() for k, v in base.state_dict().items()}, str(path))
    assert main(["apply", "longlive", "--rule", "ffn-adapter", "--weights", str(path), "--no-validate"]) == 2
    captured = capsys.readouterr()
    assert "Base weights" not in captured.out  # nothing was loaded as a base before the refusal
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and f"{path} holds no ffn-adapter keys (*.*.ffn_adapter.)" in error[0]


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class _Layers(torch.nn.Module):
    """FFNs at ``layers.N.mlp``: outside the default pattern, so the rule's prefixes are declared for them."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_ffns_named_otherwise_load_by_the_prefixes_declared_for_them(tmp_path):
    torch.manual_seed(0)
    model, x = _Layers().eval(), torch.randn(2, 3, 8)
    default = surgery.apply(model, ffn_adapter.rule(bottleneck_dim=4), example_inputs=((x,), {}))
    declared = dataclasses.replace(ffn_adapter.rule(bottleneck_dim=4), weight_prefixes=("layers.*.mlp_adapter.",))
    result = surgery.apply(model, declared, example_inputs=((x,), {}))
    weights = _adapter_weights(result)
    assert sorted(weights) == sorted(f"layers.{i}.mlp_adapter.{layer}.{kind}" for i in range(2)
                                     for layer in ("down", "up") for kind in ("weight", "bias"))
    path = tmp_path / "adapters.safetensors"
    save_file(weights, str(path))
    before = _snapshot(default.module)
    with pytest.raises(WeightsError, match=r"holds no ffn-adapter keys \(\*\.\*\.ffn_adapter\.\)"):
        load_rule_weights(default.module, path)
    assert _same(default.module, before)
    assert load_rule_weights(result.module, path).tensors == 8
    hooked = copy.deepcopy(model)  # the adapter written by hand, as forward hooks on the FFNs
    for i, layer in enumerate(hooked.layers):
        adapter = BottleneckAdapter(8, 4, torch.nn.GELU())
        adapter.load_state_dict({k.removeprefix(f"layers.{i}.mlp_adapter."): v for k, v in weights.items()
                                 if k.startswith(f"layers.{i}.mlp_adapter.")})
        layer.mlp.register_forward_hook(lambda module, args, out, adapter=adapter: out + adapter(out))
    with torch.no_grad():
        assert torch.equal(result.module(x), hooked(x)) and not torch.equal(result.module(x), model(x))
