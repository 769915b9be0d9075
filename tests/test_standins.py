"""Stand-in fidelity: tracing hazards, streaming runs, cache semantics, meta execution.

``CASES`` lists the pipelines and the tiny streaming geometry that reaches the roll
branch; add a ``Case`` for each further stand-in. The cache-semantics tests are
per-pipeline because those semantics are what differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.fx

from examples import PIPELINES
from examples.driver import compare, example_call, run_stream
from examples.wan.pipeline import MODEL_SIZES
from surgery.tracing.twin import fake_twin, is_fake, new_fake_mode


@dataclass(frozen=True)
class Case:
    name: str
    local_attn_size: int  # small enough that chunk 3 overflows the rolling buffer
    frames: int  # frames per chunk
    roll_chunk: int  # first chunk whose first call takes the roll branch
    deferred_updates: bool  # cache written by the model after the blocks, not inside them


# 32x32 pixels: 4 tokens per frame. local 8 -> 32-token buffer, sink 3 frames = 12 tokens;
# chunk 2 (tokens 24..36) evicts 4 tokens and rolls 8 (a non-empty shift).
CASES = [
    Case("longlive", local_attn_size=8, frames=3, roll_chunk=2, deferred_updates=True),
    Case("streamdiffusionv2", local_attn_size=8, frames=3, roll_chunk=2, deferred_updates=False),
]
IDS = [c.name for c in CASES]
STEPS = (1000, 500)
FS = 4
SINK = 3 * FS


def _stream(case: Case, seed: int = 0, chunks: int = 3):
    pipeline = PIPELINES[case.name]
    model = pipeline.build("tiny", seed=seed)
    record = run_stream(
        model, pipeline, chunks=chunks, frames_per_chunk=case.frames, local_attn_size=case.local_attn_size, steps=STEPS
    )
    return model, record


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def streamed(request):
    case = request.param
    model, record = _stream(case)
    return case, model, record


def _indices(cache: dict) -> tuple[int, int]:
    return int(torch.as_tensor(cache["global_end_index"]).reshape(-1)[0]), int(
        torch.as_tensor(cache["local_end_index"]).reshape(-1)[0]
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_plain_symbolic_trace_fails(case):
    model = PIPELINES[case.name].build("tiny")
    with pytest.raises(torch.fx.proxy.TraceError, match="cannot be iterated"):
        torch.fx.symbolic_trace(model)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_block_traces_only_with_attention_leaves(case):
    block = PIPELINES[case.name].build("tiny").blocks[0]
    no_cache = {"kv_cache": None, "crossattn_cache": None}
    with pytest.raises(torch.fx.proxy.TraceError, match="cannot be iterated"):
        torch.fx.symbolic_trace(block, concrete_args=no_cache)  # star-unpack of x.shape

    class AttentionLeaves(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            leaf = type(module).__name__ in ("CausalWanSelfAttention", "WanT2VCrossAttention")
            return leaf or super().is_leaf_module(module, name)

    graph = AttentionLeaves().trace(block, concrete_args=no_cache)
    targets = {n.target for n in graph.nodes if n.op == "call_module"}
    assert {"self_attn", "cross_attn", "ffn.0", "ffn.1", "ffn.2"} <= targets


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiled_flex_attention_refuses_fx(case):
    module = PIPELINES[case.name].module
    with pytest.raises(RuntimeError, match="dynamo-optimized"):
        torch.fx.symbolic_trace(lambda q: module.flex_attention(q, q, q))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_keys_and_plain_freqs(case):
    model = PIPELINES[case.name].build("tiny")
    keys = list(model.state_dict())
    assert len(keys) == 15 + 27 * MODEL_SIZES["tiny"]["num_layers"]
    assert "blocks.3.self_attn.norm_k.weight" in keys and "blocks.0.norm3.bias" in keys
    assert not any(k.startswith(("blocks.0.norm1", "blocks.0.norm2", "freqs")) for k in keys)
    assert model.freqs.dtype == torch.complex128 and model.freqs.shape == (1024, 8)


def test_stream_is_deterministic_and_nontrivial(streamed):
    case, _, record = streamed
    assert len(record.calls) == 3 * (len(STEPS) + 1)
    for call in record.calls:
        assert call.output.shape == (1, 16, case.frames, 4, 4) and call.output.dtype == torch.float32
        assert torch.isfinite(call.output).all() and call.output.abs().sum() > 0
    _, again = _stream(case)
    assert compare(record, again) == 0.0
    _, other_seed = _stream(case, seed=1)
    assert compare(record, other_seed) > 0.0


def test_roll_branch_reached(streamed):
    case, _, record = streamed
    chunk_tokens = case.frames * FS
    capacity = case.local_attn_size * FS
    before = [c for c in record.calls if c.chunk == case.roll_chunk - 1][-1].caches["kv_cache"]
    first_roll = [c for c in record.calls if c.chunk == case.roll_chunk][0].caches["kv_cache"]
    g_prev, l_prev = _indices(before[0])
    evicted = chunk_tokens + l_prev - capacity
    rolled = l_prev - evicted - SINK
    assert evicted > 0 and rolled > 0
    current_end = (case.roll_chunk + 1) * chunk_tokens
    for prev, now in zip(before, first_roll):
        assert _indices(now) == (current_end, l_prev + current_end - g_prev - evicted)
        assert torch.equal(now["k"][:, :SINK], prev["k"][:, :SINK])  # the sink stays
        assert torch.equal(now["k"][:, SINK : SINK + rolled], prev["k"][:, SINK + evicted : SINK + evicted + rolled])
        assert torch.equal(now["v"][:, SINK : SINK + rolled], prev["v"][:, SINK + evicted : SINK + evicted + rolled])
        assert not torch.equal(now["k"][:, capacity - chunk_tokens :], prev["k"][:, capacity - chunk_tokens :])


def test_compare_reports_cache_and_structure_differences(streamed):
    case, _, record = streamed
    _, again = _stream(case)
    again.calls[-1].caches["kv_cache"][1]["v"][0, 0, 0, 0] += 0.5
    assert compare(record, again) == 0.5
    again.calls[-1].caches["kv_cache"][1]["global_end_index"] = int(_indices(record.caches["kv_cache"][1])[0])
    again.calls[-1].caches["kv_cache"][1]["v"] = record.calls[-1].caches["kv_cache"][1]["v"]
    assert compare(record, again) == 0.0  # an int index equals a tensor([n]) index of the same value
    del again.calls[-1].caches["crossattn_cache"][0]["is_init"]
    assert compare(record, again) == math.inf


def test_crossattn_cache_entries_replaced(streamed):
    _, _, record = streamed
    for entry in record.caches["crossattn_cache"]:
        assert entry["is_init"] is True
        assert entry["k"].abs().sum() > 0  # the text keys, not the pre-allocated zeros


def _block_inputs(pipeline, model, case):
    """Inputs of block 0 for the first cache call, captured from a real model call."""
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, dict(kwargs)

    handle = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    args, kwargs = example_call(model, pipeline, frames=case.frames, local_attn_size=case.local_attn_size)
    with torch.no_grad():
        model(*args, **kwargs)
    handle.remove()
    return captured["args"], captured["kwargs"]


def test_longlive_cache_written_only_by_apply_cache_updates():
    case = CASES[IDS.index("longlive")]
    pipeline = PIPELINES["longlive"]
    model = pipeline.build("tiny")
    args, kwargs = _block_inputs(pipeline, model, case)
    cache = pipeline.init_caches(model, 32, 32, case.local_attn_size)["kv_cache"][0]
    kwargs.update(kv_cache=cache, crossattn_cache=None, current_start=0)
    with torch.no_grad():
        x, info = model.blocks[0](*args, **kwargs)
    current_end, local_end, update = info
    assert (current_end, local_end, update["action"]) == (12, 12, "direct_insert")
    assert cache["k"].abs().sum() == 0 and _indices(cache) == (0, 0)  # untouched inside the block
    model._apply_cache_updates([cache], [(0, info)])
    assert torch.equal(cache["k"][:, :12], update["new_k"]) and _indices(cache) == (12, 12)

    # Model level: with the deferred pass disabled nothing in the cache changes.
    args, kwargs = example_call(model, pipeline, frames=case.frames, local_attn_size=case.local_attn_size)
    model._apply_cache_updates = lambda *a, **k: None
    with torch.no_grad():
        model(*args, **kwargs)
    assert all(c["k"].abs().sum() == 0 and _indices(c) == (0, 0) for c in kwargs["kv_cache"])


def test_streamdiffusionv2_cache_written_in_place_by_the_block():
    case = CASES[IDS.index("streamdiffusionv2")]
    pipeline = PIPELINES["streamdiffusionv2"]
    model = pipeline.build("tiny")
    args, kwargs = _block_inputs(pipeline, model, case)
    cache = pipeline.init_caches(model, 32, 32, case.local_attn_size)["kv_cache"][0]
    k_buffer, index = cache["k"], cache["global_end_index"]
    kwargs.update(kv_cache=cache, crossattn_cache=None, current_start=0, current_end=0)
    with torch.no_grad():
        out = model.blocks[0](*args, **kwargs)
    assert isinstance(out, torch.Tensor)
    assert cache["k"] is k_buffer and cache["global_end_index"] is index  # same objects, written in place
    assert cache["k"][:, :12].abs().sum() > 0 and cache["k"][:, 12:].abs().sum() == 0
    assert _indices(cache) == (12, 12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_meta_device_cache_call(case):
    pipeline = PIPELINES[case.name]
    model = pipeline.build("tiny", init="meta")
    assert model.patch_embedding.weight.is_meta and not model.freqs.is_meta
    args, kwargs = example_call(model, pipeline, frames=case.frames, local_attn_size=case.local_attn_size)
    assert kwargs["kv_cache"][0]["k"].is_meta and not kwargs["kv_cache"][0]["global_end_index"].is_meta
    out = model(*args, **kwargs)
    assert out.is_meta and out.shape == (1, 16, case.frames, 4, 4)
    assert model.freqs.is_meta  # the lazy device move
    assert all(_indices(c) == (12, 12) for c in kwargs["kv_cache"])
    assert kwargs["crossattn_cache"][0]["is_init"] is True

    # The non-cache self-attention path (what VACE blocks run) calls torch's flex attention,
    # which refuses meta tensors as it does upstream: the tracer must not rely on meta.
    block_args, block_kwargs = _block_inputs(pipeline, model, case)
    block_kwargs.update(kv_cache=None, crossattn_cache=None)
    with pytest.raises(ValueError, match="Found input tensors on meta device"):
        model.blocks[0](*block_args, **block_kwargs)

    # A whole stream on meta reaches the roll branch through the real index tensors.
    record = run_stream(model, pipeline, chunks=case.roll_chunk + 1, frames_per_chunk=case.frames,
                        local_attn_size=case.local_attn_size, steps=STEPS, snapshot=False)
    end = (case.roll_chunk + 1) * case.frames * FS
    assert all(_indices(c) == (end, case.local_attn_size * FS) for c in record.caches["kv_cache"])


@pytest.mark.parametrize("init", ["zeros", "meta"])
def test_build_inits(init):
    pipeline = PIPELINES["longlive"]
    model = pipeline.build("tiny", init=init)
    assert model.config.sink_size == 3 and model.blocks[0].self_attn.sink_size == 3
    assert model.freqs.device.type == "cpu" and model.freqs.dtype == torch.complex128
    if init == "zeros":
        assert all(p.abs().sum() == 0 for p in model.parameters())


def test_streamdiffusionv2_train_path_uses_block_mask():
    pipeline = PIPELINES["streamdiffusionv2"]
    model = pipeline.build("tiny")
    x = torch.randn(1, 16, 3, 4, 4)
    t = torch.full((1, 3), 500, dtype=torch.long)
    context = torch.randn(1, 8, 32)
    with torch.no_grad():
        causal = model(x, t=t, context=context, seq_len=12)
    assert model.block_mask is not None and model.block_mask.shape == (1, 1, 128, 128)
    # Frame 0 sees only itself, so changing frame 2 must leave frame 0's output unchanged.
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    with torch.no_grad():
        changed = model(x2, t=t, context=context, seq_len=12)
    assert torch.equal(causal[:, :, 0], changed[:, :, 0]) and not torch.equal(causal[:, :, 2], changed[:, :, 2])

    # Same path on the tracer's fake twin, with the real mask.
    fake = fake_twin(model, new_fake_mode())
    out = fake(x, t=t, context=context, seq_len=12)
    assert is_fake(out) and out.shape == x.shape


def test_longlive_non_cache_forward_raises_like_upstream():
    model = PIPELINES["longlive"].build("tiny")
    with pytest.raises(NotImplementedError):
        model(torch.randn(1, 16, 3, 4, 4), t=torch.zeros(1, 3), context=torch.randn(1, 8, 32), seq_len=12)


def test_registry_lists_all_five():
    assert set(PIPELINES) == {"longlive", "streamdiffusionv2", "krea_realtime_video", "reward_forcing", "memflow"}
    assert PIPELINES["longlive"].name == "longlive"
    assert math.prod(MODEL_SIZES["tiny"]["patch_size"]) == 4
