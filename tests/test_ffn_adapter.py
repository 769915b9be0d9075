"""The ``ffn-adapter`` rule on the five stand-ins: one adapter after every FFN, an exact
identity while ``up`` is zero, and with trained weights exactly the adapter written by hand
as forward hooks on the FFNs."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn as nn

import surgery
from examples import PIPELINES
from examples.driver import compare, example_call, run_stream
from rules import RULES, ffn_adapter
from rules.ffn_adapter import AdaptedFFN, BottleneckAdapter, FfnAdapterConfig
from surgery.cli.main import main
from surgery.errors import GraftError, MatchError, OrderError, RuleError
from surgery.rule import Reference
from surgery.validation import validation_cases

from family_names import family_names_in

NAMES = ["longlive", "streamdiffusionv2", "krea_realtime_video", "reward_forcing", "memflow"]
FFNS = [f"blocks.{i}.ffn" for i in range(4)]


def _applied(name: str, **options):
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, ffn_adapter.rule(**options), example_inputs=example_call(base, pipeline))
    return pipeline, base, result


def _randomise(module: nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """Non-zero adapter weights, written into ``module`` and returned by native key."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if "_adapter." in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
                values[key] = tensor.clone()
    return values


def _hooked(pipeline, weights: dict[str, torch.Tensor], bottleneck: int, activation: nn.Module) -> nn.Module:
    """The adapter written by hand: a forward hook on each FFN adds ``up(act(down(y)))``."""
    model = pipeline.build("tiny", seed=0)
    for path in FFNS:
        ffn = model.get_submodule(path)
        adapter = BottleneckAdapter(ffn[0].in_features, bottleneck, activation)
        adapter.load_state_dict({k[len(path) + len("_adapter."):]: v for k, v in weights.items()
                                 if k.startswith(path + "_adapter.")})
        ffn.register_forward_hook(lambda module, args, out, adapter=adapter: out + adapter(out))
    return model


@pytest.mark.parametrize("name", NAMES)
def test_every_ffn_gets_an_adapter_that_is_an_exact_identity_at_zero(name):
    pipeline, base, result = _applied(name)
    assert [m.name for m in result.matches] == FFNS
    assert [g.name for g in result.grafted] == [f"{path}_adapter" for path in FFNS]
    added = set(result.module.state_dict()) - set(base.state_dict())
    assert added == {f"{path}_adapter.{layer}.{kind}" for path in FFNS for layer in ("down", "up")
                     for kind in ("weight", "bias")}
    assert tuple(result.module.blocks[0].ffn_adapter.down.weight.shape) == (16, base.blocks[0].ffn[0].in_features)
    ours = run_stream(result.module, pipeline, chunks=3)
    assert compare(ours, run_stream(base, pipeline, chunks=3)) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_trained_adapters_equal_forward_hooks_bit_for_bit(name):
    pipeline, base, result = _applied(name, bottleneck_dim=8, activation="silu")
    weights = _randomise(result.module)
    ours = run_stream(result.module, pipeline, chunks=3)
    assert compare(ours, run_stream(_hooked(pipeline, weights, 8, nn.SiLU()), pipeline, chunks=3)) == 0.0
    assert compare(ours, run_stream(base, pipeline, chunks=3)) > 0.0  # the adapters really run


def test_layers_choose_the_adapted_ffns():
    pipeline, base, result = _applied("longlive", layers=[1, 3], num_ffns=4)
    assert [m.index for m in result.matches] == [None, 0, None, 1]
    assert [g.name for g in result.grafted] == ["blocks.1.ffn_adapter", "blocks.3.ffn_adapter"]
    weights = _randomise(result.module)
    reference = pipeline.build("tiny", seed=0)
    for path in ("blocks.1.ffn", "blocks.3.ffn"):
        adapter = BottleneckAdapter(reference.dim, 16, nn.GELU())
        adapter.load_state_dict({k[len(path) + len("_adapter."):]: v for k, v in weights.items()
                                 if k.startswith(path + "_adapter.")})
        reference.get_submodule(path).register_forward_hook(lambda m, a, out, adapter=adapter: out + adapter(out))
    assert compare(run_stream(result.module, pipeline, chunks=3), run_stream(reference, pipeline, chunks=3)) == 0.0


def test_a_wrong_ffn_count_names_the_rules_option():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    with pytest.raises(MatchError) as caught:
        surgery.apply(base, ffn_adapter.rule(num_ffns=5), example_inputs=example_call(base, pipeline))
    message = str(caught.value)
    assert "rule 'ffn-adapter' expected 5 feed-forward unit(s) but matched 4 (blocks.0.ffn, " in message
    assert "set the rule's num_ffns option to 4" in message and "num_layers" not in message
    with pytest.raises(RuleError, match=r"layers \[0, 4\] is out of range for 4 FFNs; fix: use positions 0..3"):
        surgery.apply(base, ffn_adapter.rule(layers=[0, 4]), example_inputs=example_call(base, pipeline))


@pytest.mark.parametrize("options, problem", [
    ({"bottleneck_dim": 0}, "bottleneck_dim must be a positive integer, got 0"),
    ({"bottleneck_dim": True}, "bottleneck_dim must be a positive integer, got True"),
    ({"activation": "tanh"}, "unknown activation 'tanh'; fix: use one of gelu, gelu_tanh, relu, silu"),
    ({"layers": []}, "layers is empty"),
    ({"layers": [2, 1]}, "layers [2, 1] is not sorted and unique; fix: use [1, 2]"),
    ({"layers": [-1]}, "layers must hold non-negative integers"),
    ({"layers": "0,1"}, "layers must be a list of FFN positions"),
    ({"num_ffns": 0}, "num_ffns must be a positive integer, got 0"),
    ({"layers": [0, 3], "num_ffns": 2}, "layers [0, 3] is out of range for 2 FFNs"),
])
def test_bad_options_are_refused_when_the_rule_is_built(options, problem):
    with pytest.raises(RuleError) as caught:
        ffn_adapter.rule(**options)
    assert problem in str(caught.value)


def test_default_init_trains_from_an_exact_identity():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, ffn_adapter.rule(), example_inputs=example_call(base, pipeline), graft_init="default")
    adapter = result.module.blocks[2].ffn_adapter
    assert adapter.down.weight.abs().sum() > 0 and not adapter.up.weight.any() and not adapter.up.bias.any()
    assert compare(run_stream(result.module, pipeline, chunks=3), run_stream(base, pipeline, chunks=3)) == 0.0


def test_order_and_existing_adapters_are_refused():
    pipeline, base, result = _applied("longlive")
    with pytest.raises(OrderError, match="already rewritten by rule 'ffn-adapter'"):
        surgery.apply(result.module, ffn_adapter.rule(), example_inputs=example_call(base, pipeline))
    carrying = pipeline.build("tiny", seed=0)
    carrying.blocks[0].ffn_adapter = BottleneckAdapter(carrying.dim, 4, nn.GELU())
    # Found by the rule's weight prefix pattern (blocks.*.ffn_adapter.) before any tracing.
    with pytest.raises(OrderError, match=r"already carries ffn-adapter modules \(blocks.0.ffn_adapter.down.weight"):
        surgery.apply(carrying, ffn_adapter.rule(), example_inputs=example_call(carrying, pipeline))
    elsewhere = pipeline.build("tiny", seed=0)
    elsewhere.blocks[0].ffn_adapter_x = BottleneckAdapter(elsewhere.dim, 4, nn.GELU())  # outside the pattern
    elsewhere.blocks[0].ffn_adapter = nn.Identity()  # no parameters: only the graft itself can refuse it
    with pytest.raises(GraftError, match="grafts 'blocks.0.ffn_adapter', but 'blocks.0' already has an attribute"):
        surgery.apply(elsewhere, ffn_adapter.rule(), example_inputs=example_call(elsewhere, pipeline))


def test_a_rewritten_model_pickles_and_streams_the_same():
    pipeline, _, result = _applied("longlive", bottleneck_dim=4)
    _randomise(result.module)
    buffer = io.BytesIO()
    torch.save(result.module, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded.surgery_state.rule.options == {"bottleneck_dim": 4, "activation": "gelu", "layers": None,
                                                 "num_ffns": None}
    assert compare(run_stream(loaded, pipeline, chunks=3), run_stream(result.module, pipeline, chunks=3)) == 0.0


def test_the_rule_is_registered_and_documents_its_options():
    assert RULES["ffn-adapter"] is ffn_adapter.rule
    doc = FfnAdapterConfig.__doc__
    assert all(option in doc for option in ("bottleneck_dim", "activation", "layers", "num_ffns"))


def test_cli_applies_it(capsys):
    assert main(["apply", "longlive", "--rule", "ffn-adapter", "--set", "bottleneck_dim=4", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "blocks.3.ffn" in out and "blocks.3.ffn_adapter" in out


def test_the_rule_names_no_model_family():
    assert family_names_in(ffn_adapter.__file__) == []


def test_cli_validates_it_against_the_rules_own_reference(capsys):
    assert main(["validate", "longlive", "--rule", "ffn-adapter"]) == 0
    out = capsys.readouterr().out
    assert "4 matches, 4 grafted modules" in out and "validation PASSED (4/4 cases, max abs diff 0)" in out
    for case in ("structure", "graph", "ffn-adapter-on", "lora"):
        assert case in out


class _Doubled(AdaptedFFN):
    """A wrong hand-written adapter (twice the branch), which validation must catch."""

    def forward(self, *args, **kwargs):
        y = self.unit(*args, **kwargs)
        return y + self.adapter(y) * 2


def test_validation_catches_a_reference_that_differs():
    pipeline, base, result = _applied("longlive")
    right = result.rule.reference

    def build(model, matches):
        built = right.build(model, matches)
        for module in built.modules():
            if isinstance(module, AdaptedFFN):
                module.__class__ = _Doubled
        return built

    result.rule = dataclasses.replace(result.rule, reference=Reference(build, right.to_native))
    cases = {case.name: case for case in validation_cases(result, model=base, pipeline=pipeline,
                                                           example_inputs=example_call(base, pipeline))}
    assert list(cases) == ["structure", "graph", "ffn-adapter-on", "lora"]
    assert cases["structure"].run().passed  # same modules and weights
    graph, on = cases["graph"].run(), cases["ffn-adapter-on"].run()
    assert not graph.passed and "differences" in graph.detail
    assert not on.passed and on.max_abs_diff > 0
