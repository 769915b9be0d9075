"""Several VACE contexts in one call (ComfyUI's and kijai's stacked VACE inputs, #14 item 2).

Each context runs through the same VACE branch and its hints are added after each hinted
block one context after another, ``(x + h0_k * s0_k) + h1_k * s1_k``, as ComfyUI's
``VaceWanModel`` does. Checked bit for bit against the hand-written reference on every
stand-in over three streaming chunks, against diffusers' own VACE modules driven by a
hand-written multi-context forward, and for its call forms and errors.
"""
from __future__ import annotations

import operator

import pytest
import torch

import surgery
from examples.driver import compare, example_call, run_stream
from rules import vace
from surgery.cli.main import main
from surgery.errors import CallError
from test_engine import NAMES, RES_A, _pair
from test_errors import one_line

HEIGHT, WIDTH = RES_A


def _contexts(pipeline, seed: int, count: int = 3, frames: int | None = None):
    g = torch.Generator().manual_seed(seed)
    frames = frames or pipeline.config.num_frame_per_block
    return [torch.randn(1, 96, frames, HEIGHT // 8, WIDTH // 8, generator=g) for _ in range(count)]


def _stream(model, pipeline, contexts, scale):
    return run_stream(model, pipeline, chunks=3, height=HEIGHT, width=WIDTH, vace_context=contexts,
                      vace_context_scale=scale)


@pytest.mark.parametrize("name", NAMES)
def test_several_contexts_equal_the_reference_bit_for_bit(name):
    pipeline, _, result, reference = _pair(name)
    model = result.module
    layers = len(model.vace_blocks)
    # Per chunk: a control clip, a one-frame reference image given per batch element (R2V,
    # zero-padded), and a third clip; a float, a per-layer list and a per-layer tensor scale.
    chunks = [_contexts(pipeline, seed=chunk) for chunk in range(3)]
    image = [torch.randn(96, 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(9))]

    def per_chunk(chunk):
        clip, _, other = chunks[chunk]
        return [clip, image, other]

    scale = [1.0, [0.5 * (k + 1) for k in range(layers)], torch.tensor([-0.75] * layers)]
    ours = _stream(model, pipeline, per_chunk, scale)
    theirs = _stream(reference, pipeline, per_chunk, [1.0, scale[1], scale[2].tolist()])
    assert compare(ours, theirs) == 0.0
    # Every context counts: dropping the last one changes the output.
    fewer = _stream(model, pipeline, lambda chunk: per_chunk(chunk)[:2], scale[:2])
    assert compare(ours, fewer) > 0.0


def test_a_context_at_scale_zero_adds_nothing():
    """``x + h * 0`` is ``x`` exactly: two contexts with the second silenced are the first alone."""
    pipeline, _, result, _ = _pair("longlive")
    first, second = _contexts(pipeline, seed=4, count=2)
    both = _stream(result.module, pipeline, [first, second], [0.5, 0.0])
    alone = _stream(result.module, pipeline, first, 0.5)
    assert compare(both, alone) == 0.0
    assert compare(both, _stream(result.module, pipeline, [first, second], 0.5)) > 0.0


def test_one_context_in_a_list_is_the_single_context_graph():
    """``[ctx]`` with ``[scale]`` normalises to ``ctx`` with ``scale``: the same specialisation,
    no new trace, the same numbers."""
    pipeline, _, result, _ = _pair("reward_forcing")
    model, state = result.module, result.module.surgery_state
    ctx = _contexts(pipeline, seed=5, count=1)[0]
    single = _stream(model, pipeline, ctx, [0.25, 2.0])
    built = state.built
    listed = _stream(model, pipeline, [ctx], [[0.25, 2.0]])
    assert state.built == built and state.last_dispatch[0] == "cached"
    assert compare(single, listed) == 0.0


def test_hints_are_added_per_context_in_order_after_each_hinted_block():
    pipeline, _, result, _ = _pair("streamdiffusionv2")
    model, state = result.module, result.module.surgery_state
    args, kwargs = example_call(model, pipeline, height=HEIGHT, width=WIDTH)
    with torch.no_grad():
        model(*args, **kwargs, vace_context=_contexts(pipeline, seed=6, count=3), vace_context_scale=1.0)
    graph = next(reversed(state.specialisations.values())).graph
    assert "vace_context_scale" not in {n.target for n in graph.nodes if n.op == "placeholder"}
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    assert calls.count("vace_patch_embedding") == 3 and calls.count("vace_blocks.1.after_proj") == 3
    for index in range(len(model.vace_blocks)):
        adds = [n for n in graph.nodes if n.target is operator.add
                and n.meta.get("surgery", {}) == {"rule": "vace", "role": "inject", "index": index}]
        assert len(adds) == 3
        # A chain: the block's output, plus context 0's, then context 1's, then context 2's.
        assert adds[0].args[0].meta.get("surgery") is None
        assert [a.args[0] for a in adds[1:]] == adds[:2]
        assert all(a.args[1].target is operator.mul for a in adds)


# --- call forms that are refused -----------------------------------------------------------

def _ctx(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape or (1, 96, 3, 4, 4), dtype=dtype, device=device)


BAD_CALLS = {
    "whole context then batch element": (lambda: [_ctx(), _ctx(96, 3, 4, 4)], 1.0,
                                         "vace_context[1] has shape (96, 3, 4, 4) but vace_context[0] is a whole "
                                         "context"),
    "batch element then whole context": (lambda: [_ctx(96, 3, 4, 4), _ctx()], 1.0,
                                         "vace_context[1] is (1, 96, 3, 4, 4) but vace_context[0] is one batch "
                                         "element [C, F, H, W]"),
    "batch element then list": (lambda: [_ctx(96, 3, 4, 4), [_ctx(96, 3, 4, 4)]], 1.0,
                                "vace_context[1] is a list but vace_context[0] is one batch element"),
    "not a context": (lambda: [_ctx(), None], 1.0, "vace_context[1] must be a tensor or a list of tensors, got "
                                                   "NoneType"),
    "empty context": (lambda: [_ctx(), []], 1.0, "vace_context[1] is empty"),
    "misshapen batch element": (lambda: [_ctx(), [_ctx(96, 4, 4)]], 1.0,
                                "vace_context[1][0] has shape (96, 4, 4), expected [channels, frames, height, width]"),
    "channels": (lambda: [_ctx(), _ctx(1, 48, 3, 4, 4)], 1.0,
                 "vace_context[1][0] of shape (48, 3, 4, 4) does not fit the latent of shape (1, 16, 3, 4, 4)"),
    "batch": (lambda: [_ctx(), _ctx(2, 96, 3, 4, 4)], 1.0, "vace_context[1] has 2 entries for a batch of 1"),
    "integers": (lambda: [_ctx(), _ctx(dtype=torch.int64)], 1.0, "vace_context[1][0] has dtype torch.int64"),
    "meta": (lambda: [_ctx(), [_ctx(96, 3, 4, 4, device="meta")]], 1.0,
             "vace_context[1][0] is on the meta device but the model's weights are on cpu"),
    "scale tensor": (lambda: [_ctx(), _ctx()], torch.ones(2),
                     "vace_context_scale is a tensor of shape (2,) but vace_context holds 2 contexts"),
    "scale entries": (lambda: [_ctx(), _ctx(), _ctx()], [1.0, 1.0],
                      "vace_context_scale has 2 entries for the 3 contexts in vace_context"),
    "per-layer length": (lambda: [_ctx(), _ctx()], [1.0, [1.0]], "vace_context_scale[1] has 1 values for 2 VACE layers"),
    "not finite": (lambda: [_ctx(), _ctx()], [1.0, float("nan")], "vace_context_scale[1] [nan, nan] is not all finite"),
    "scale type": (lambda: [_ctx(), _ctx()], "1.0", "vace_context_scale must be a number or a list with one entry per "
                                                    "context, got str"),
}


@pytest.fixture(scope="module")
def longlive():
    pipeline, _, result, _ = _pair("longlive")
    return pipeline, result


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_ambiguous_or_malformed_contexts_are_one_line_errors(case, longlive):
    pipeline, result = longlive
    contexts, scale, needle = BAD_CALLS[case]
    state = result.module.surgery_state
    built = state.built
    args, kwargs = example_call(result.module, pipeline)
    with pytest.raises(CallError) as info, torch.no_grad():
        result.module(*args, **kwargs, vace_context=contexts(), vace_context_scale=scale)
    message = one_line(info.value)
    assert message.startswith(needle) and "; fix: " in message, message
    assert state.built == built


def test_errors_name_the_inputs_of_the_models_own_profile():
    """A profile with other input names hears them in every message, several contexts included."""
    import dataclasses

    from examples import PIPELINES
    from rules.vace.profiles import WAN

    pipeline = PIPELINES["memflow"]
    base = pipeline.build("tiny", seed=0)
    mine = dataclasses.replace(WAN, name="mine", detect=None, context_input="control", scale_input="strength")
    args, kwargs = example_call(base, pipeline)
    result = surgery.apply(base, vace.rule(profile=mine), example_inputs=(args, kwargs))
    for control, strength, needle in (
            ([_ctx(), _ctx(96, 3, 4, 4)], 1.0, "control[1] has shape (96, 3, 4, 4) but control[0] is a whole context"),
            ([_ctx(), _ctx()], [1.0], "strength has 1 entries for the 2 contexts in control"),
            (_ctx(), [1.0], "strength has 1 values for 2 VACE layers"),
            (_ctx(1, 48, 3, 4, 4), 1.0, "control[0] of shape (48, 3, 4, 4) does not fit")):
        with pytest.raises(CallError) as info, torch.no_grad():
            result.module(*args, **kwargs, control=control, strength=strength)
        message = one_line(info.value)
        assert message.startswith(needle) and "vace_context" not in message, message


def test_a_model_without_a_block_count_takes_a_float_example_scale_not_a_per_layer_one():
    """Before matching, the layer count of the default ``vace_layers`` is unknown: a float example
    scale traces (the default layers then come from the match count), a per-layer one is refused."""
    import torch.nn as nn

    from test_corpus import VACE_IN_DIM, corpus

    family = corpus("odd_names")
    base = family.build(0)
    args, kwargs = family.call(base, family.new_cache(base), 0, torch.Generator().manual_seed(5))
    control = torch.zeros(1, VACE_IN_DIM, 2, 4, 4)
    with pytest.raises(CallError) as info:
        surgery.apply(base, vace.rule(vace_in_dim=VACE_IN_DIM),
                      example_inputs=(args, {**kwargs, "vace_context": control, "vace_context_scale": [1.0, 1.0]}))
    assert one_line(info.value).startswith("vace_context_scale gives per-layer values, but the model declares no "
                                           "block count")
    result = surgery.apply(base, vace.rule(vace_in_dim=VACE_IN_DIM),
                           example_inputs=(args, {**kwargs, "vace_context": control, "vace_context_scale": 0.5}))
    count = len(family.blocks_of(result.module))
    assert isinstance(result.module.vace_blocks, nn.ModuleList) and len(result.module.vace_blocks) == (count + 1) // 2


# --- diffusers: its VACE model takes one control input; its own modules, driven per context --

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=16, ffn_dim=64, num_layers=4, cross_attn_norm=True, rope_max_seq_len=32)
LAYERS = [0, 2]


def diffusers_forward(model, x, t, text, controls, scales):
    """``WanVACETransformer3DModel.forward`` of diffusers 0.42.1 (no gradient checkpointing, no
    image embedding, ``return_dict=False``), written out with the control branch run once per
    control input and each input's hint added in order after every VACE layer."""
    b, _, f, h, w = x.shape
    p_t, p_h, p_w = model.config.patch_size
    rotary = model.rope(x)
    hidden = model.patch_embedding(x).flatten(2).transpose(1, 2)
    temb, projection, text, _ = model.condition_embedder(t, text, None)
    projection = projection.unflatten(1, (6, -1))
    branches = []
    for control, scale in zip(controls, scales):
        c = model.vace_patch_embedding(control).flatten(2).transpose(1, 2)
        c = torch.cat([c, c.new_zeros(b, hidden.size(1) - c.size(1), c.size(2))], dim=1)
        hints = []
        for block in model.vace_blocks:
            hint, c = block(hidden, text, c, projection, rotary)
            hints.append(hint)
        branches.append((hints, torch.unbind(scale)))
    for i, block in enumerate(model.blocks):
        hidden = block(hidden, text, projection, rotary)
        if i in model.config.vace_layers:
            k = model.config.vace_layers.index(i)
            for hints, scale in branches:
                hidden = hidden + hints[k] * scale[k]
    shift, factor = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = model.proj_out((model.norm_out(hidden.float()) * (1 + factor) + shift).type_as(hidden))
    hidden = hidden.reshape(b, f // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)


@pytest.fixture(scope="module")
def diffusers_pair():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    base = diffusers.WanTransformer3DModel(**CONFIG).eval()
    g = torch.Generator().manual_seed(0)
    call = (torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([999, 10]), torch.randn(2, 7, 16, generator=g))
    result = surgery.apply(base, vace.rule(vace_layers=LAYERS), example_inputs=(call, {"return_dict": False}))
    reference = diffusers.WanVACETransformer3DModel(**CONFIG, vace_layers=LAYERS, vace_in_channels=96).eval()
    reference.load_state_dict(base.state_dict(), strict=False)
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.2 for k, v in reference.state_dict().items() if k.startswith("vace")}
    reference.load_state_dict(weights, strict=False)
    result.module.load_state_dict(weights, strict=False)
    controls = [torch.randn(2, 96, 2, 4, 4, generator=g), torch.randn(2, 96, 1, 4, 4, generator=g)]
    return result.module, reference, call, controls


def test_diffusers_multi_context_equals_its_modules_driven_per_context(diffusers_pair):
    model, reference, call, controls = diffusers_pair
    with torch.no_grad():
        # The written-out forward is diffusers' own for one control input, bit for bit...
        scale = torch.tensor([0.5, -1.75])
        theirs = reference(*call, control_hidden_states=controls[0], control_hidden_states_scale=scale,
                           return_dict=False)[0]
        assert (diffusers_forward(reference, *call, controls[:1], [scale]) - theirs).abs().max().item() == 0.0
        # ...and with two it is what the rewritten model computes.
        scales = [scale, torch.tensor([2.0, 0.25])]
        expected = diffusers_forward(reference, *call, controls, scales)
        ours = model(*call, control_hidden_states=controls, control_hidden_states_scale=scales,
                     return_dict=False)[0]
    assert (ours - expected).abs().max().item() == 0.0
    assert (ours - theirs).abs().max().item() > 0.0  # the second input counts


def test_diffusers_multi_context_errors_use_diffusers_names(diffusers_pair):
    model, _, call, controls = diffusers_pair
    for control, scale, needle in (
            ([controls[0], controls[0][0]], None, "control_hidden_states[1] has shape (96, 2, 4, 4) but "
                                                  "control_hidden_states[0] is a whole context"),
            (controls, torch.ones(2), "control_hidden_states_scale is a tensor of shape (2,) but "
                                      "control_hidden_states holds 2 contexts"),
            (controls, [1.0, [1.0, 2.0, 3.0]], "control_hidden_states_scale[1] has 3 values for 2 VACE layers")):
        with pytest.raises(CallError) as info, torch.no_grad():
            model(*call, control_hidden_states=control, control_hidden_states_scale=scale)
        assert one_line(info.value).startswith(needle), str(info.value)


# --- the validation case -------------------------------------------------------------------

def test_surgery_validate_runs_the_multi_context_case(capsys, monkeypatch):
    import examples.validation

    harness = examples.validation.validation_harness
    # One denoising step per chunk (plus the commit pass), as tests/test_validation.py does.
    monkeypatch.setattr(examples.validation, "validation_harness",
                        lambda *args, **kwargs: harness(*args, **kwargs, steps=(1000,)))
    assert main(["validate", "longlive"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "multi-context" in line)
    assert "pass" in row and " 0 " in row, row
    assert "7/7 cases" in out
