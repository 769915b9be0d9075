"""Krea Realtime Video streamed the way its pipeline does it, through the driver's chunk hooks.

Krea has no commit pass: before every chunk after the first, ``RecomputeKVCacheBlock`` refills the
cache from three context frames with ``block_mask`` set on the model that owns it and no
``vace_context`` (spec 4.7, 7); the denoising calls then run at start frame ``min(f, 3)``. The
driver records the recompute as a call of kind ``"recompute"``, so the base stand-in, the
hand-written reference and the surgery-rewritten model are compared call by call, outputs and
caches, bit for bit. Geometry: 64x64 pixels (16 tokens per frame), 3-frame chunks, 4 chunks,
so the 6-frame cache would overflow in chunk 2 under a commit loop.
"""
from __future__ import annotations

import pytest
import torch

import surgery
from examples import PIPELINES
from examples.driver import StreamRecord, call_diffs, example_call, run_stream
from examples.reference import CausalVaceWanModel, load_vace_state_dict, random_vace_state_dict
from rules import vace

H = W = 64
FS = (H // 16) * (W // 16)
FRAMES = 3
CHUNKS = 4
STREAM = dict(chunks=CHUNKS, frames_per_chunk=FRAMES, height=H, width=W, steps=(1000, 500))
LAYERS = [0, 2]



@pytest.fixture(scope="module")
def pipeline():
    return PIPELINES["krea_realtime_video"]


@pytest.fixture(scope="module")
def weights(pipeline):
    return random_vace_state_dict(CausalVaceWanModel(pipeline.build("tiny", seed=0), vace_layers=LAYERS), seed=3)


@pytest.fixture(scope="module")
def base_record(pipeline) -> StreamRecord:
    return run_stream(pipeline.build("tiny", seed=0), pipeline, **STREAM)


@pytest.fixture(scope="module")
def reference(pipeline, weights) -> CausalVaceWanModel:
    ref = CausalVaceWanModel(pipeline.build("tiny", seed=0), vace_layers=LAYERS)
    load_vace_state_dict(ref, weights)
    return ref


@pytest.fixture(scope="module")
def rewritten(pipeline, weights):
    model = pipeline.build("tiny", seed=0)
    result = surgery.apply(model, vace.rule(vace_layers=LAYERS),
                           example_inputs=example_call(model, pipeline, height=H, width=W))
    missing, unexpected = result.module.load_state_dict(weights, strict=False)
    assert not unexpected and not any(k.startswith("vace") for k in missing)
    return result.module


@pytest.fixture(scope="module")
def contexts():
    """A different [1, 96, 3, 8, 8] VACE context per chunk."""
    gen = torch.Generator().manual_seed(7)
    per_chunk = [torch.randn(1, 96, FRAMES, H // 8, W // 8, generator=gen) for _ in range(CHUNKS)]
    return lambda chunk: per_chunk[chunk]


def _indices(cache: dict) -> tuple[int, int]:
    return tuple(int(torch.as_tensor(cache[k]).reshape(-1)[0]) for k in ("global_end_index", "local_end_index"))


def _index_types(record: StreamRecord) -> list[list[tuple[type, type]]]:
    """Per call, per block: the Python types of the index entries (Krea swaps tensors for ints)."""
    return [[(type(c["global_end_index"]), type(c["local_end_index"])) for c in call.caches["kv_cache"]]
            for call in record.calls]


def _layout(record: StreamRecord) -> list[tuple[int, int, str, int]]:
    return [(c.chunk, c.step, c.kind, c.current_start) for c in record.calls]


def _assert_exact(a: StreamRecord, b: StreamRecord) -> None:
    """Same calls in the same places; every output and every cache snapshot bit for bit."""
    assert _layout(a) == _layout(b)
    diffs = call_diffs(a, b)
    assert diffs == [0.0] * len(diffs), diffs
    assert all(torch.equal(ca.output, cb.output) for ca, cb in zip(a.calls, b.calls))
    assert _index_types(a) == _index_types(b)


# ---- (1) the base stand-in streams like the pipeline ------------------------------------------

def test_base_stream_recomputes_instead_of_committing(base_record):
    expected = [(0, 0, "denoise", 0), (0, 1, "denoise", 0)]
    for chunk in range(1, CHUNKS):
        expected += [(chunk, -1, "recompute", 3 * FS), (chunk, 0, "denoise", 3 * FS), (chunk, 1, "denoise", 3 * FS)]
    assert _layout(base_record) == expected
    for call in base_record.calls:
        assert torch.isfinite(call.output).all() and call.output.abs().sum() > 0
        assert call.output.shape == (1, 16, FRAMES, H // 8, W // 8)
        kv = call.caches["kv_cache"]
        if call.kind == "recompute":
            # The block_mask path refilled the cache from 0 with the 3 context frames: int indices.
            assert all(type(c["global_end_index"]) is int and type(c["local_end_index"]) is int for c in kv)
            assert all(_indices(c) == (3 * FS, 3 * FS) for c in kv)
        else:
            end = FRAMES * FS if call.chunk == 0 else 6 * FS  # never past the 6-frame cache
            assert all(_indices(c) == (end, end) for c in kv)


def test_recompute_reads_the_previous_chunks(pipeline, base_record):
    """The recompute's input: the stream's first frame plus the latest two generated frames."""
    model = pipeline.build("tiny", seed=0)
    inputs = []
    handle = model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    record = run_stream(model, pipeline, **STREAM)
    handle.remove()
    assert len(inputs) == len(record.calls)
    final = [c.output for c in base_record.calls if c.kind == "denoise" and c.step == 1]
    recomputes = [x for x, call in zip(inputs, record.calls) if call.kind == "recompute"]
    assert torch.equal(recomputes[0], final[0])
    for chunk in range(2, CHUNKS):
        expected = torch.cat([final[0][:, :, :1], final[chunk - 1][:, :, 1:]], dim=2)
        assert torch.equal(recomputes[chunk - 1], expected), chunk


def test_block_mask_is_set_only_during_the_recompute(pipeline):
    """Base and reference: the blocks see a mask exactly in the recompute calls; it is reset after."""
    reference = CausalVaceWanModel(pipeline.build("tiny", seed=0), vace_layers=LAYERS)
    for model in (pipeline.build("tiny", seed=0), reference):
        seen = []
        handle = model.blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["block_mask"] is not None), with_kwargs=True)
        record = run_stream(model, pipeline, **STREAM)
        handle.remove()
        assert seen == [call.kind == "recompute" for call in record.calls]
        assert model.block_mask is None and getattr(model, "causal_wan_model", model).block_mask is None


def test_example_call_uses_the_chunk_start_frame(pipeline):
    model = pipeline.build("tiny", seed=0)
    starts = [example_call(model, pipeline, height=H, width=W, chunk_index=i)[1]["current_start"] for i in range(3)]
    assert starts == [0, 3 * FS, 3 * FS]


# ---- (2) the reference without a context is the base model -----------------------------------

def test_reference_without_context_equals_base(pipeline, reference, base_record):
    _assert_exact(run_stream(reference, pipeline, **STREAM), base_record)


# ---- (3) the rewritten model: the reference with a context, the base without -----------------

def test_rewritten_equals_reference_with_context(pipeline, rewritten, reference, contexts, base_record):
    ours = run_stream(rewritten, pipeline, vace_context=contexts, **STREAM)
    theirs = run_stream(reference, pipeline, vace_context=contexts, **STREAM)
    _assert_exact(ours, theirs)
    assert rewritten.block_mask is None
    # The branch really runs: every call moves (recomputes read the changed history).
    assert all(not torch.equal(a.output, b.output) for a, b in zip(ours.calls, base_record.calls))


def test_rewritten_without_context_equals_base(pipeline, rewritten, base_record):
    _assert_exact(run_stream(rewritten, pipeline, **STREAM), base_record)


# ---- (4) torch's own flex attention, on the bias path of every cached denoising call ----------

def test_cached_calls_run_torchs_flex_attention_with_the_bias(pipeline, rewritten, reference, contexts,
                                                             monkeypatch):
    """Krea's pipeline passes kv_cache_attention_bias=0.3, so every cached denoising call of every
    block runs torch's real flex attention with a ``score_mod`` (spec 4), in the rewritten model
    (traced on a fake twin: flex attention refuses meta) and in the reference alike."""
    import examples.krea_realtime_video as krea
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    import examples.wan.attention as wan_attention

    assert wan_attention.flex_attention is torch_flex_attention
    assert pipeline.config.kv_cache_attention_bias == 0.3
    compiled = krea.flex_attention
    biased: list[bool] = []

    def counting(*args, **kwargs):
        biased.append(kwargs.get("score_mod") is not None)
        return compiled(*args, **kwargs)

    monkeypatch.setattr(krea, "flex_attention", counting)
    blocks = len(rewritten.blocks)
    for model in (rewritten, reference):
        biased.clear()
        record = run_stream(model, pipeline, vace_context=contexts, **STREAM)
        denoise = sum(1 for c in record.calls if c.kind == "denoise")
        assert sum(biased) == denoise * blocks
        # The rest are the recompute passes and the cache-free VACE blocks, all on flex attention.
        assert len(biased) > sum(biased)
