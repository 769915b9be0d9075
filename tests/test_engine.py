"""The engine's acceptance tests: bit-exact with the hand-written reference on all five pipelines."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import surgery
from examples import PIPELINES
from examples.driver import compare, example_call, run_stream
from examples.reference import CausalVaceWanModel, load_vace_state_dict, random_vace_state_dict
from rules import vace
from surgery.errors import MatchError, OrderError, RuleError

NAMES = ["longlive", "streamdiffusionv2", "krea_realtime_video", "reward_forcing", "memflow"]
RES_A = (64, 64)
RES_B = (48, 80)


def _pair(name: str, vace_layers=None):
    """(pipeline, base, rewritten result, reference) with identical non-zero VACE weights."""
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(vace_layers=vace_layers),
                           example_inputs=example_call(base, pipeline, height=RES_A[0], width=RES_A[1]))
    reference = CausalVaceWanModel(pipeline.build("tiny", seed=0), vace_layers=vace_layers)
    weights = random_vace_state_dict(reference, seed=3)
    load_vace_state_dict(reference, weights)
    missing, unexpected = result.module.load_state_dict(weights, strict=False)
    assert not unexpected
    assert all(not k.startswith("vace") for k in missing)
    return pipeline, base, result, reference


def _context(pipeline, height, width, seed=1, frames=None):
    frames = frames or pipeline.config.num_frame_per_block
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 96, frames, height // 8, width // 8, generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_rewritten_equals_reference_bit_for_bit(name):
    pipeline, base, result, reference = _pair(name)
    model = result.module
    n = len(model.vace_blocks)
    runs = [(RES_A, 1.0), (RES_B, 0.0), (RES_B, 0.5), (RES_A, 1.5), (RES_B, [0.25 * (k + 1) for k in range(n)])]
    for (height, width), scale in runs:
        ctx = _context(pipeline, height, width)
        ours = run_stream(model, pipeline, chunks=3, height=height, width=width, vace_context=ctx,
                          vace_context_scale=scale)
        theirs = run_stream(reference, pipeline, chunks=3, height=height, width=width, vace_context=ctx,
                            vace_context_scale=scale)
        assert compare(ours, theirs) == 0.0, (name, height, width, scale)
    # The branch really runs: non-zero weights move the output away from the base model.
    plain = run_stream(base, pipeline, chunks=3, height=RES_A[0], width=RES_A[1])
    hinted = run_stream(model, pipeline, chunks=3, height=RES_A[0], width=RES_A[1],
                        vace_context=_context(pipeline, *RES_A))
    assert compare(plain, hinted) > 0.0
    # vace_context=None is exactly the base model, at both resolutions.
    for height, width in (RES_A, RES_B):
        off = run_stream(model, pipeline, chunks=3, height=height, width=width)
        assert compare(off, run_stream(base, pipeline, chunks=3, height=height, width=width)) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_custom_vace_layers(name):
    pipeline, _, result, reference = _pair(name, vace_layers=[0, 1, 3])
    assert [m.index for m in result.matches] == [0, 1, None, 2]
    ctx = _context(pipeline, *RES_A)
    ours = run_stream(result.module, pipeline, chunks=3, height=RES_A[0], width=RES_A[1], vace_context=ctx)
    theirs = run_stream(reference, pipeline, chunks=3, height=RES_A[0], width=RES_A[1], vace_context=ctx)
    assert compare(ours, theirs) == 0.0


def test_zero_copy_and_native_layout():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    before = {k: (v.data_ptr(), v.clone()) for k, v in base.state_dict().items()}
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=64, width=64))
    rewritten = result.module.state_dict()
    for key, (ptr, value) in before.items():
        assert rewritten[key].data_ptr() == ptr, key
        assert torch.equal(base.state_dict()[key], value), key
    extra = sorted(set(rewritten) - set(before))
    assert extra and all(k.startswith(("vace_blocks.", "vace_patch_embedding.")) for k in extra)
    assert "vace_blocks.0.before_proj.weight" in extra and "vace_blocks.1.before_proj.weight" not in extra
    assert {f"vace_blocks.{k}.after_proj.bias" for k in range(2)} <= set(extra)
    # The input model is untouched: same class, same module objects, no VACE modules.
    assert type(base) is pipeline.module.CausalWanModel and not hasattr(base, "vace_blocks")
    assert isinstance(result.module, pipeline.module.CausalWanModel)
    assert result.module.blocks[0] is not base.blocks[0]
    assert [g.name for g in result.grafted][:2] == ["vace_patch_embedding", "vace_blocks.0"]


def test_zero_initialised_branch_is_identity():
    pipeline = PIPELINES["memflow"]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=64, width=64))
    ctx = _context(pipeline, 64, 64)
    a = run_stream(result.module, pipeline, chunks=3, height=64, width=64, vace_context=ctx)
    b = run_stream(base, pipeline, chunks=3, height=64, width=64)
    assert compare(a, b) == 0.0


def test_dry_run_reports_matches_without_building():
    pipeline = PIPELINES["reward_forcing"]
    base = pipeline.build("tiny", seed=0)
    names = [n for n, _ in base.named_modules()]
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline), dry_run=True)
    assert result.module is base and result.dry_run and result.graph is None and not result.grafted
    assert [(m.name, m.cls, m.position, m.index) for m in result.matches] == [
        (f"blocks.{i}", "CausalWanAttentionBlock", i, {0: 0, 2: 1}.get(i)) for i in range(4)]
    assert [n for n, _ in base.named_modules()] == names


def test_wrong_count_names_nearest_partial_matches():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    with pytest.raises(MatchError) as info:
        surgery.apply(base, vace.rule(num_layers=5), example_inputs=example_call(base, pipeline))
    message = str(info.value)
    assert "expected 5 attention block(s) but matched 4" in message
    assert "nearest partial matches" in message and "failed '" in message
    assert "\n" not in message


def test_model_without_blocks_fails_at_first_check():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_layers = 2
            self.ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            return x + self.ffn(x)

    with pytest.raises(MatchError, match=r"matched 0 .*ffn \(Sequential\) passed 1/5, failed 'residual adds'"):
        surgery.apply(Chain(), vace.rule(), example_inputs=((torch.randn(1, 4, 8),), {}))


def test_rewritten_model_refuses_second_surgery_and_lora_first():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    call = example_call(base, pipeline)
    result = surgery.apply(base, vace.rule(), example_inputs=call)
    with pytest.raises(OrderError, match="Base -> vace -> LoRA"):
        surgery.apply(result.module, vace.rule(), example_inputs=call)
    import peft
    wrapped = peft.get_peft_model(pipeline.build("tiny", seed=0), peft.LoraConfig(target_modules=["blocks.0.ffn.0"]))
    with pytest.raises(OrderError, match="Base -> vace -> LoRA"):
        surgery.apply(wrapped, vace.rule(), example_inputs=call)


@pytest.mark.parametrize("layers", [[1, 2], [0, 2, 1], [0, 0, 2], [], [0, -1], [0, 9]])
def test_invalid_vace_layers_at_construction(layers):
    with pytest.raises(RuleError):
        vace.rule(vace_layers=layers, num_layers=4)


def test_guards_reuse_recheck_and_respecialise():
    pipeline = PIPELINES["streamdiffusionv2"]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=64, width=64))
    state = result.module.surgery_state
    ctx = _context(pipeline, 64, 64)
    run_stream(result.module, pipeline, chunks=3, height=64, width=64, vace_context=ctx)
    built = state.built
    run_stream(result.module, pipeline, chunks=2, height=64, width=64, vace_context=ctx)
    assert state.built == built and state.last_dispatch[0] == "cached"  # same signatures
    # New sizes: shape arithmetic is in the graph and every Python decision re-derives
    # unchanged, so the cached graph is reused (and the new sizes remembered).
    run_stream(result.module, pipeline, chunks=1, height=48, width=80, vace_context=_context(pipeline, 48, 80))
    assert state.built == built and state.rechecks >= 1
    assert any("re-derived unchanged" in r for r in state.reasons)
    rechecks = state.rechecks
    run_stream(result.module, pipeline, chunks=1, height=48, width=80, vace_context=_context(pipeline, 48, 80))
    assert state.rechecks == rechecks and state.last_dispatch[0] == "cached"
    kinds = {g.kind for g in result.guards}
    assert {"shape", "input"} <= kinds
    assert any("seq_len" in g.expr for g in result.guards)


def _applied_at(name: str, height: int, width: int):
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=height, width=width))
    run_stream(result.module, pipeline, chunks=1, height=height, width=width,
               vace_context=_context(pipeline, height, width))
    return pipeline, result.module, result.module.surgery_state


def test_a_decision_that_changes_respecialises_and_is_named():
    # A control clip one frame short flips the rule's own decision (pad the hint tokens).
    pipeline, model, state = _applied_at("longlive", 64, 64)
    built = state.built
    run_stream(model, pipeline, chunks=1, height=64, width=64, vace_context=_context(pipeline, 64, 64, frames=2))
    assert state.built > built
    assert any("missing" in r and "!= traced" in r for r in state.reasons), state.reasons
    # MemFlow reads frame_seqlen with .item(): a new token count per frame is a new graph.
    pipeline, model, state = _applied_at("memflow", 32, 32)
    built = state.built
    run_stream(model, pipeline, chunks=1, height=32, width=48, vace_context=_context(pipeline, 32, 48))
    assert state.built > built
    assert any(".item()" in r and "!= traced" in r for r in state.reasons)


def test_specialisation_cache_is_bounded():
    pipeline = PIPELINES["memflow"]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=32, width=32))
    state = result.module.surgery_state
    state.limit = 2
    for width in (32, 48, 64, 80):  # 4, 6, 8, 10 tokens per frame: a new frame_seqlen each
        run_stream(result.module, pipeline, chunks=1, height=32, width=width, steps=(1000,))
    assert len(state.specialisations) == 2 and state.evictions >= 2


def test_graph_keeps_linear_leaves_and_marks_inserted_nodes():
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    targets = {n.target for n in result.graph.nodes if n.op == "call_module"}
    assert {"blocks.0.ffn.0", "blocks.3.ffn.2", "vace_blocks.1.ffn.0", "vace_blocks.0.before_proj",
            "vace_blocks.1.after_proj", "vace_patch_embedding", "blocks.2.self_attn"} <= targets
    roles = [n.meta["surgery"]["role"] for n in result.graph.nodes if "surgery" in n.meta]
    assert roles.count("inject") >= 2 and "branch" in roles
    inject = {n.meta["surgery"]["index"] for n in result.graph.nodes if n.meta.get("surgery", {}).get("role") == "inject"}
    assert inject == {0, 1}
    helpers = [n for n in result.graph.nodes if n.op == "call_method" and n.target == "_apply_cache_updates"]
    assert len(helpers) == 1  # the deferred cache update stays one opaque call
