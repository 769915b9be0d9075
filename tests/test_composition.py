"""Two rules in sequence (#12 item 5): ``surgery.apply`` on a model it already rewrote.

On a small model written here: two rules acting at the same units run first-rule first
(each later action reads the earlier one's result), a later rule does not match the
grafts of an earlier one, both rules' grafts live in the one model, and the input models
stay untouched; ordering is rule data (``Rule.may_follow`` / ``Rule.may_precede``), with
one-line errors. On the LongLive stand-in: ``vace`` then ``ffn-adapter`` equals VACE alone
while the adapter is zero, and VACE written by hand plus adapter hooks with adapter weights,
bit for bit over three streaming chunks; it pickles, and its report names both rules.
"""
from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
import torch.nn as nn

import surgery
import surgery.errors
import surgery.validation
from examples import PIPELINES
from examples.driver import compare, example_call, run_stream
from examples.reference import CausalVaceWanModel, load_vace_state_dict, random_vace_state_dict
from rules import ffn_adapter, vace
from rules.ffn_adapter import BottleneckAdapter
from surgery.errors import GraftError, InputError, OrderError, RuleError
from surgery.matching.pattern import FEED_FORWARD, Pattern, feed_forward, shape_preserving
from surgery.reports import build_report, render_markdown, write_report
from surgery.rule import Rule, Site, Where
from surgery.tracing.policy import TracePolicy

from report_fakes import DIM, Tiny

HIDDEN = 16

# ---- a small model and simple rules ------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class Net(Tiny):
    """An embedding, three blocks with an FFN each, a head."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__(blocks)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))


class Gain(nn.Module):
    """A per-channel gain (a graft with a parameter, set to non-trivial values below)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


BLOCK = Pattern("block", (("shape", shape_preserving), ("feed-forward", feed_forward)), select="chain")


def _rule(name: str, pattern: Pattern, actions, grafts=None, inputs=None, **fields) -> Rule:
    return Rule(name=name, options={}, pattern=pattern, expected=None, assign=lambda position, count: position,
                grafts=grafts or (lambda context: {}), actions=tuple(actions), inputs=dict(inputs or {}),
                check_call=lambda given, call, latent, model: dict(given), trace_policy=TracePolicy(), **fields)


def _gains(suffix: str):
    """Grafts a :class:`Gain` beside each matched unit, at ``<unit>.<suffix>``."""
    def grafts(context) -> dict[str, nn.Module]:
        made = {}
        for match in context.matches:
            gain = Gain()
            with torch.no_grad():
                gain.scale.copy_(torch.linspace(0.5, 1.5, DIM) * (match.position + 1))
            made[f"{match.name}.{suffix}"] = gain
        return made
    return grafts


def _gain_after(suffix: str, offset: float = 0.0):
    def act(site: Site):
        return site.module(f"{site.match.name}.{suffix}")(site.stream) + offset
    return act


def _shift_before(site: Site):
    return site.stream + 0.25 * (site.match.position + 1)


def _double_before(site: Site):
    return site.stream * 2.0


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(seed))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _apply(model: nn.Module, rule: Rule, **kwargs) -> surgery.ApplyResult:
    return surgery.apply(model, rule, example_inputs=((_x(),), {}), **kwargs)


def _exact(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and "; fix: " in message, message
    return message


# ---- composition on the small model ---------------------------------------------------------------

def test_two_rules_at_the_same_units_run_first_rule_first_and_keep_their_inputs_untouched():
    base = _net()
    x = _x(2)
    expected_base = base(x)
    first = _apply(base, _rule("gain", BLOCK, [(Where.AFTER_EACH, _gain_after("gain"))], _gains("gain")))
    first_out = first.module(x)
    second = _apply(first.module, _rule("tilt", BLOCK, [(Where.AFTER_EACH, _gain_after("tilt", 1.0))],
                                        _gains("tilt")))

    model = second.module
    assert [r.name for r in model.surgery_state.rules] == ["gain", "tilt"]
    assert [a.rule.name for a in second.rules] == ["gain", "tilt"]
    assert [[m.name for m in a.matches] for a in second.rules] == [["blocks.0", "blocks.1", "blocks.2"]] * 2
    assert [g.name for g in second.grafted] == ["blocks.0.tilt", "blocks.1.tilt", "blocks.2.tilt"]
    assert isinstance(model.blocks[1].gain, Gain) and isinstance(model.blocks[1].tilt, Gain)
    assert model.blocks[0].gain.scale.data_ptr() == first.module.blocks[0].gain.scale.data_ptr()  # shared, not copied

    # By hand: each block, then the first rule's gain, then the second's (which reads the first's result).
    with torch.no_grad():
        h = base.embed(x)
        for i, block in enumerate(base.blocks):
            h = model.blocks[i].tilt(model.blocks[i].gain(block(h))) + 1.0
        expected = base.head(h)
    assert _exact(model(x), expected) == 0.0

    # The inputs: the first rewritten model has no second-rule graft and still computes what it did.
    assert [r.name for r in first.module.surgery_state.rules] == ["gain"]
    assert not hasattr(first.module.blocks[0], "tilt")
    assert _exact(first.module(x), first_out) == 0.0
    assert type(base) is Net and "_surgery" not in vars(base) and not hasattr(base.blocks[0], "gain")
    assert _exact(base(x), expected_base) == 0.0


def test_two_before_each_actions_at_one_unit_chain_in_rule_order():
    base = _net()
    x = _x(3)
    first = _apply(base, _rule("shift", BLOCK, [(Where.BEFORE_EACH, _shift_before)]))
    second = _apply(first.module, _rule("double", BLOCK, [(Where.BEFORE_EACH, _double_before)]))
    with torch.no_grad():
        h = base.embed(x)
        for i, block in enumerate(base.blocks):
            h = block((h + 0.25 * (i + 1)) * 2.0)
        expected = base.head(h)
    assert _exact(second.module(x), expected) == 0.0
    # The other order is another model: the order of application is the order of the actions.
    swapped = _apply(_apply(base, _rule("double", BLOCK, [(Where.BEFORE_EACH, _double_before)])).module,
                     _rule("shift", BLOCK, [(Where.BEFORE_EACH, _shift_before)]))
    assert _exact(swapped.module(x), expected) > 0


def test_a_later_rule_matches_the_base_graph_not_the_earlier_rules_grafts():
    base = _net()
    x = _x(4)
    adapted = surgery.apply(base, ffn_adapter.rule(bottleneck_dim=4), example_inputs=((_x(),), {}),
                            graft_init="default")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in range(3):
            adapted.module.blocks[i].ffn_adapter.up.weight.copy_(torch.randn(DIM, 4, generator=gen))

    def halve(site: Site):
        return site.stream * 0.5

    # The adapters are Linear -> GELU -> Linear too, but they are the first rule's code, not the model's.
    halved = _apply(adapted.module, _rule("halve", FEED_FORWARD, [(Where.AFTER_EACH, halve)]))
    assert [m.name for m in halved.matches] == ["blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn"]
    with torch.no_grad():
        h = base.embed(x)
        for i, block in enumerate(base.blocks):
            y = block.ffn(block.norm(h))
            y = y + adapted.module.blocks[i].ffn_adapter(y)
            h = h + y * 0.5
        expected = base.head(h)
    assert _exact(halved.module(x), expected) == 0.0
    assert _exact(halved.module(x), adapted.module(x)) > 0


def test_a_dry_run_on_a_rewritten_model_reports_every_rule_and_builds_nothing():
    base = _net()
    first = _apply(base, _rule("gain", BLOCK, [(Where.AFTER_EACH, _gain_after("gain"))], _gains("gain")))
    dry = _apply(first.module, _rule("tilt", BLOCK, [(Where.AFTER_EACH, _gain_after("tilt"))], _gains("tilt")),
                 dry_run=True)
    assert dry.module is first.module and dry.grafted == [] and not hasattr(first.module.blocks[0], "tilt")
    report = build_report(dry)
    assert [r["name"] for r in report["rules"]] == ["gain", "tilt"] and report["dry_run"]
    assert report["build_order"] == "Base -> gain -> tilt -> LoRA"


def test_call_inputs_of_both_rules_are_accepted_and_checked_by_their_own_rule():
    seen: list[tuple[str, dict]] = []

    def checked(name: str):
        def check(given, call, latent, model):
            seen.append((name, dict(given)))
            return dict(given)
        return check

    def add_input(key: str):
        def act(site: Site):
            value = site.inputs[key]
            return None if value is None else site.stream + value
        return act

    base = _net()
    x = _x(6)
    plus = _rule("plus", BLOCK, [(Where.AFTER_EACH, add_input("plus"))], inputs={"plus": None})
    plus = dataclasses.replace(plus, check_call=checked("plus"))
    minus = _rule("minus", BLOCK, [(Where.AFTER_EACH, add_input("minus"))], inputs={"minus": None})
    minus = dataclasses.replace(minus, check_call=checked("minus"))
    model = _apply(_apply(base, plus).module, minus).module
    seen.clear()
    out = model(x, plus=torch.tensor(1.0), minus=torch.tensor(-0.5))
    assert [name for name, _ in seen] == ["plus", "minus"]
    assert list(seen[0][1]) == ["plus"] and list(seen[1][1]) == ["minus"]
    with torch.no_grad():
        h = base.embed(x)
        for block in base.blocks:
            h = block(h) + 1.0 - 0.5
        expected = base.head(h)
    assert _exact(out, expected) == 0.0
    assert _exact(model(x), base(x)) == 0.0  # neither input given: neither rule acts

    clash = _rule("again", BLOCK, [(Where.AFTER_EACH, add_input("plus"))], inputs={"plus": None})
    with pytest.raises(RuleError) as caught:
        _apply(_apply(base, plus).module, clash)
    assert "rules 'plus' and 'again' both take the call input 'plus'" in _one_line(caught.value)


def test_graft_names_of_two_rules_must_differ():
    base = _net()
    first = _apply(base, _rule("gain", BLOCK, [(Where.AFTER_EACH, _gain_after("gain"))], _gains("gain")))
    with pytest.raises(GraftError) as caught:
        _apply(first.module, _rule("gain-2", BLOCK, [(Where.AFTER_EACH, _gain_after("gain"))], _gains("gain")))
    assert "rule 'gain-2' grafts 'blocks.0.gain', but 'blocks.0' already has an attribute 'gain'" in \
        _one_line(caught.value)


# ---- order as rule data -----------------------------------------------------------------------

def _noop(name: str, **fields) -> Rule:
    return _rule(name, BLOCK, [(Where.AFTER_EACH, lambda site: None)], **fields)


def test_a_rule_that_allows_no_follower_refuses_the_second_rule_naming_both():
    base = _net()
    last = _apply(base, _noop("final", may_precede=()))
    with pytest.raises(OrderError) as caught:
        _apply(last.module, _noop("extra"))
    message = _one_line(caught.value)
    assert "rule 'final' allows no rule 'extra' after it (asked: Base -> final -> extra -> LoRA)" in message
    assert [r.name for r in last.module.surgery_state.rules] == ["final"]  # the input is untouched


def test_a_rule_may_name_what_it_follows():
    base = _net()
    picky = _noop("picky", may_follow=("gain",))
    with pytest.raises(OrderError) as caught:
        _apply(_apply(base, _noop("other")).module, picky)
    assert "rule 'picky' may not follow rule 'other'" in _one_line(caught.value)
    first = _apply(base, _rule("gain", BLOCK, [(Where.AFTER_EACH, _gain_after("gain"))], _gains("gain")))
    assert [r.name for r in _apply(first.module, picky).module.surgery_state.rules] == ["gain", "picky"]
    allowed = _apply(_apply(base, _noop("lead", may_precede=("next",))).module, _noop("next"))
    assert [r.name for r in allowed.module.surgery_state.rules] == ["lead", "next"]


def test_the_same_rule_twice_and_surgery_after_lora_stay_refused():
    from peft import LoraConfig, inject_adapter_in_model

    base = _net()
    first = _apply(base, _noop("once"))
    with pytest.raises(OrderError) as caught:
        _apply(first.module, _noop("once"))
    assert "the model was already rewritten by rule 'once'" in _one_line(caught.value)

    second = _apply(first.module, _noop("twice"))
    wrapped = inject_adapter_in_model(LoraConfig(target_modules=["head"], r=2), second.module)
    with pytest.raises(OrderError) as caught:
        _apply(wrapped, _noop("third"))
    message = _one_line(caught.value)
    assert "already LoRA-wrapped" in message and "Base -> once -> twice -> third -> LoRA" in message
    from surgery.lora.order import applied_rules
    assert applied_rules(wrapped) == ("once", "twice")


# ---- vace then ffn-adapter on the LongLive stand-in ---------------------------------------------------

STREAM = {"chunks": 3}


@pytest.fixture(scope="module")
def longlive():
    """The base, the VACE reference by hand with trained VACE weights, VACE by surgery with the
    same weights, then ffn-adapter composed onto it, and a control context."""
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    reference = CausalVaceWanModel(pipeline.build("tiny", seed=0), vace_in_dim=96)
    weights = random_vace_state_dict(reference, seed=1)
    load_vace_state_dict(reference, weights)
    first = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    missing = first.module.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys
    second = surgery.apply(first.module, ffn_adapter.rule(bottleneck_dim=4), example_inputs=example_call(base, pipeline))
    context = torch.randn(1, 96, pipeline.config.num_frame_per_block, 4, 4, generator=torch.Generator().manual_seed(7))
    return pipeline, base, reference, first, second, context


def test_vace_then_ffn_adapter_zero_adapter_equals_vace_alone(longlive):
    pipeline, base, _, first, second, context = longlive
    assert [r.name for r in second.module.surgery_state.rules] == ["vace", "ffn-adapter"]
    assert [m.name for m in second.matches] == [f"blocks.{i}.ffn" for i in range(4)]
    assert [m.name for m in second.rules[0].matches] == [f"blocks.{i}" for i in range(4)]
    composed = run_stream(second.module, pipeline, vace_context=context, **STREAM)
    alone = run_stream(first.module, pipeline, vace_context=context, **STREAM)
    assert compare(composed, alone) == 0.0
    assert compare(alone, run_stream(base, pipeline, **STREAM)) > 0  # VACE is on


def test_ffn_adapter_then_vace_zero_adapter_equals_vace_alone(longlive):
    """The other order: VACE's blocks are rebuilt from a block that now carries an adapter, and
    still get none (a graft is no constructor argument)."""
    pipeline, base, _, first, _, context = longlive
    call = example_call(base, pipeline)
    adapted = surgery.apply(base, ffn_adapter.rule(bottleneck_dim=4), example_inputs=call)
    composed = surgery.apply(adapted.module, vace.rule(), example_inputs=call)
    assert [r.name for r in composed.module.surgery_state.rules] == ["ffn-adapter", "vace"]
    assert not any("adapter" in name for name, _ in composed.module.vace_blocks.named_modules())
    composed.module.load_state_dict({k: v for k, v in first.module.state_dict().items() if k.startswith("vace_")},
                                    strict=False)
    assert compare(run_stream(composed.module, pipeline, vace_context=context, **STREAM),
                   run_stream(first.module, pipeline, vace_context=context, **STREAM)) == 0.0


def _adapter_weights(model: nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """Non-zero values for ``model``'s adapters, by native key."""
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn(tensor.shape, generator=gen) * 0.2
            for key, tensor in model.state_dict().items() if "_adapter." in key}


def test_vace_then_ffn_adapter_equals_vace_by_hand_plus_adapter_hooks(longlive):
    pipeline, base, reference, first, _, context = longlive
    # A composition of its own: the fixture's adapters stay zero for the other tests.
    trained = surgery.apply(first.module, ffn_adapter.rule(bottleneck_dim=4),
                            example_inputs=example_call(base, pipeline)).module
    weights = _adapter_weights(trained)
    assert not trained.load_state_dict(weights, strict=False).unexpected_keys
    hooks = []
    for i in range(4):
        path = f"blocks.{i}.ffn"
        ffn = reference.get_submodule(f"causal_wan_model.{path}")
        adapter = BottleneckAdapter(ffn[0].in_features, 4, nn.GELU())
        adapter.load_state_dict({k[len(path) + len("_adapter."):]: v for k, v in weights.items()
                                 if k.startswith(path + "_adapter.")})
        hooks.append(ffn.register_forward_hook(lambda module, args, out, adapter=adapter: out + adapter(out)))
    try:
        by_hand = run_stream(reference, pipeline, vace_context=context, **STREAM)
    finally:
        for hook in hooks:
            hook.remove()
    assert compare(run_stream(trained, pipeline, vace_context=context, **STREAM), by_hand) == 0.0
    assert compare(run_stream(reference, pipeline, vace_context=context, **STREAM), by_hand) > 0  # adapters act


def test_a_composed_model_pickles_with_both_rules(longlive):
    pipeline, _, _, _, second, context = longlive
    buffer = io.BytesIO()
    torch.save(second.module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [r.name for r in loaded.surgery_state.rules] == ["vace", "ffn-adapter"]
    assert loaded.surgery_state.rule.options == second.rule.options
    assert compare(run_stream(loaded, pipeline, vace_context=context, chunks=1),
                   run_stream(second.module, pipeline, vace_context=context, chunks=1)) == 0.0


def test_the_report_records_both_rules(longlive, tmp_path):
    _, _, _, _, second, _ = longlive
    report = build_report(second, source="longlive")
    assert report["schema_version"] == 2
    assert [r["name"] for r in report["rules"]] == ["vace", "ffn-adapter"]
    assert report["rules"][1]["options"]["bottleneck_dim"] == 4
    assert [m["name"] for m in report["rules"][0]["matches"]] == [f"blocks.{i}" for i in range(4)]
    assert report["rule"] == "ffn-adapter" and report["matches"] == report["rules"][1]["matches"]
    assert report["build_order"] == "Base -> vace -> ffn-adapter -> LoRA"
    markdown = render_markdown(report, second.base_graph, second.graph)
    assert markdown.startswith("# Surgery report: vace + ffn-adapter on CausalWanModel (longlive)")
    assert "Build order: `Base -> vace -> ffn-adapter -> LoRA`" in markdown
    assert "| ffn-adapter | 0 | blocks.0.ffn |" in markdown and "| vace | 0 | blocks.0 |" in markdown
    json_path, _ = write_report(tmp_path, report, markdown)
    assert json.loads(json_path.read_text())["rules"] == report["rules"]


def test_validate_compares_a_composed_model_with_the_references_composed(longlive):
    """The owner's VACE reference with the ffn-adapter reference applied on it; zero grafts of both
    rules get seeded weights, so both branches act in every case."""
    pipeline, base, _, _, _, _ = longlive
    call = example_call(base, pipeline)
    first = surgery.apply(base, vace.rule(), example_inputs=call)
    second = surgery.apply(first.module, ffn_adapter.rule(bottleneck_dim=4), example_inputs=call)
    report = surgery.validation.validate(second, model=base, pipeline=pipeline, example_inputs=call)
    assert [c.name for c in report.cases] == ["structure", "graph", "vace+ffn-adapter-off", "vace+ffn-adapter-on",
                                              "scales", "multi-context", "lora"]
    assert report.passed, [(c.name, c.error) for c in report.cases if not c.passed]
    assert all(c.max_abs_diff in (None, 0.0) for c in report.cases)

    def doubled(site: Site):  # a wrong adapter action: the composed reference must tell
        if site.match.index is None:
            return None
        return site.stream + 2 * site.module(f"{site.match.name}_adapter")(site.stream)

    wrong = dataclasses.replace(ffn_adapter.rule(bottleneck_dim=4), actions=((Where.AFTER_EACH, doubled),))
    broken = surgery.apply(first.module, wrong, example_inputs=call)
    on = next(case for case in surgery.validation.validation_cases(broken, model=base, pipeline=pipeline,
                                                                   example_inputs=call)
              if case.name == "vace+ffn-adapter-on").run()
    assert not on.passed and on.max_abs_diff > 0


def test_validation_refuses_a_rewritten_model_as_the_base(longlive):
    """The composed reference is built from model=; a rewritten one there would get VACE twice."""
    pipeline, base, _, _, _, _ = longlive
    call = example_call(base, pipeline)
    first = surgery.apply(base, vace.rule(), example_inputs=call)
    second = surgery.apply(first.module, ffn_adapter.rule(bottleneck_dim=4), example_inputs=call)
    for check in (surgery.validation.validate, surgery.validation.validation_cases):
        with pytest.raises(InputError) as caught:
            check(second, model=first.module, pipeline=pipeline, example_inputs=call)
        assert "model= is already rewritten (by 'vace'), not the base model; fix: pass model= the base" \
            in str(caught.value)
        assert "\n" not in str(caught.value)


def test_validation_refuses_a_later_rule_without_a_reference(longlive):
    pipeline, base, _, first, _, _ = longlive
    call = example_call(base, pipeline)

    def halve(site: Site):
        return site.stream * 0.5

    composed = surgery.apply(first.module, _rule("halve", FEED_FORWARD, [(Where.AFTER_EACH, halve)]),
                             example_inputs=call)
    with pytest.raises(surgery.errors.InputError) as caught:
        surgery.validation.validation_cases(composed, model=base, pipeline=pipeline, example_inputs=call)
    assert "rule 'halve' writes no reference (Rule.reference), so the model composed of vace + halve" in \
        _one_line(caught.value)
