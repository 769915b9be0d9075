"""The hand-written VACE reference (``examples/reference.py``) on every pipeline.

Each streaming test runs the driver over several chunks (denoising steps plus the cache-commit
pass, small ``local_attn_size`` so the rolling buffer overflows) and compares every call's
output and cache snapshot with the base model **bit for bit** (``compare(...) == 0.0``).
A pipeline whose stand-in is not importable fails with a message naming it.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from examples import PIPELINE_MODULES, PIPELINES
from examples.driver import call_diffs, compare, example_call, run_stream
from examples.reference import (
    REFERENCE_KEY_MAP,
    CausalVaceWanModel,
    load_vace_state_dict,
    native_state_dict,
    random_vace_state_dict,
    to_native_key,
    to_reference_key,
    vace_key_shapes,
)
from surgery.errors import CallError, OrderError, RuleError, WeightsError

NAMES = list(PIPELINE_MODULES)
# Tiny geometry (32x32 pixels: 4 tokens per frame): a 32-token buffer that chunk 2 overflows
# (Krea instead recomputes its cache before every chunk after the first, through the driver's hook).
STREAM = dict(chunks=3, frames_per_chunk=3, local_attn_size=8, steps=(1000, 500))
LAYERS = [0, 2]  # the default for the 4-layer tiny model



def _pipeline(name: str):
    try:
        return PIPELINES[name]
    except Exception as exc:  # the stand-in is missing or broken: say which one
        pytest.fail(f"pipeline {name!r} is not available ({type(exc).__name__}: {exc})")


@pytest.fixture(params=NAMES)
def pipeline(request):
    return _pipeline(request.param)


def _base(pipeline):
    return pipeline.build("tiny", seed=0)


def _reference(pipeline, weights_seed: int | None = None, vace_layers=None) -> CausalVaceWanModel:
    ref = CausalVaceWanModel(pipeline.build("tiny", seed=0), vace_in_dim=96, vace_layers=vace_layers)
    if weights_seed is not None:
        load_vace_state_dict(ref, random_vace_state_dict(ref, seed=weights_seed))
    return ref


def _contexts(seed: int = 7):
    """A different [1, 96, F, 4, 4] context per chunk, as a streaming pipeline encodes them."""
    gen = torch.Generator().manual_seed(seed)
    per_chunk = [torch.randn(1, 96, STREAM["frames_per_chunk"], 4, 4, generator=gen)
                 for _ in range(STREAM["chunks"])]
    return lambda chunk: per_chunk[chunk]


def _assert_exact(a, b) -> None:
    diffs = call_diffs(a, b)
    assert diffs == [0.0] * len(diffs), diffs
    for ca, cb in zip(a.calls, b.calls):
        assert torch.equal(ca.output, cb.output)


@pytest.fixture(scope="module")
def base_records():
    """One base-model stream per pipeline, shared by the comparisons (built lazily)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            pipeline = _pipeline(name)
            cache[name] = run_stream(_base(pipeline), pipeline, **STREAM)
        return cache[name]

    return get


# ---- (a) no context: the base model, bit for bit -----------------------------------------------

def test_no_context_equals_base(pipeline, base_records):
    """Even with trained (non-zero) VACE weights loaded, no context means the base model."""
    base = base_records(pipeline.name)
    assert {c.chunk for c in base.calls} == set(range(STREAM["chunks"]))
    assert sum(c.kind == "denoise" for c in base.calls) == STREAM["chunks"] * len(STREAM["steps"])
    assert base.outputs[0].abs().sum() > 0  # a non-trivial stream
    if pipeline.name == "krea_realtime_video":  # the KV recompute (block_mask path) is exercised
        assert sum(c.kind == "recompute" for c in base.calls) == STREAM["chunks"] - 1
    ref = _reference(pipeline, weights_seed=1)
    _assert_exact(run_stream(ref, pipeline, **STREAM), base)


# ---- (b) zero-initialised projections: identity for any context --------------------------------

def test_zero_init_is_identity_for_any_context(pipeline, base_records):
    """A fresh graft: VACE blocks with their constructor's random init, zero projections."""
    ref = _reference(pipeline)
    assert all(p.any() for n, p in ref.vace_blocks.named_parameters() if "ffn.0.weight" in n)
    assert not any(p.any() for n, p in ref.vace_blocks.named_parameters() if "_proj" in n)
    record = run_stream(ref, pipeline, vace_context=_contexts(), **STREAM)
    _assert_exact(record, base_records(pipeline.name))


def test_zeroed_projections_silence_a_trained_branch(pipeline, base_records):
    ref = _reference(pipeline, weights_seed=1)
    with torch.no_grad():
        for name, param in ref.vace_blocks.named_parameters():
            if "before_proj" in name or "after_proj" in name:
                param.zero_()
    record = run_stream(ref, pipeline, vace_context=_contexts(), **STREAM)
    _assert_exact(record, base_records(pipeline.name))


def test_batch_of_two(pipeline):
    """Two samples with their own contexts: zero-init identity, and per-sample hints."""
    base, ref = _base(pipeline), _reference(pipeline)
    contexts = torch.randn(2, 96, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        args, kwargs = example_call(base, pipeline, frames=3, batch_size=2)
        expected = base(*args, **kwargs)
        args, kwargs = example_call(ref, pipeline, frames=3, batch_size=2, vace_context=contexts)
        assert torch.equal(ref(*args, **kwargs), expected)

        # Changing sample 1's context changes only sample 1's output.
        load_vace_state_dict(ref, random_vace_state_dict(ref, seed=1))
        outputs = []
        for second in (contexts[1], torch.zeros_like(contexts[1])):
            args, kwargs = example_call(ref, pipeline, frames=3, batch_size=2,
                                        vace_context=[contexts[0], second])
            outputs.append(ref(*args, **kwargs))
        assert torch.equal(outputs[0][0], outputs[1][0])
        assert not torch.equal(outputs[0][1], outputs[1][1])


# ---- (c) trained weights change the output ----------------------------------------------------

def test_trained_weights_change_every_denoising_call(pipeline, base_records):
    base = base_records(pipeline.name)
    record = run_stream(_reference(pipeline, weights_seed=1), pipeline, vace_context=_contexts(), **STREAM)
    for ca, cb in zip(record.calls, base.calls):
        if ca.kind == "denoise":
            assert not torch.equal(ca.output, cb.output), (ca.chunk, ca.step)
            assert torch.isfinite(ca.output).all()


# ---- (d) vace_context_scale ---------------------------------------------------------------------

def test_scale_zero_equals_base(pipeline, base_records):
    ref = _reference(pipeline, weights_seed=1)
    record = run_stream(ref, pipeline, vace_context=_contexts(), vace_context_scale=0.0, **STREAM)
    _assert_exact(record, base_records(pipeline.name))


def test_per_layer_scales(pipeline, base_records):
    """A zero entry silences exactly that layer: the same as zeroing its after_proj."""
    contexts = _contexts()
    masked = run_stream(_reference(pipeline, 1), pipeline, vace_context=contexts,
                        vace_context_scale=[0.7, 0.0], **STREAM)
    silenced = _reference(pipeline, 1)
    with torch.no_grad():
        silenced.vace_blocks[1].after_proj.weight.zero_()
        silenced.vace_blocks[1].after_proj.bias.zero_()
    expected = run_stream(silenced, pipeline, vace_context=contexts, vace_context_scale=0.7, **STREAM)
    _assert_exact(masked, expected)
    assert compare(masked, base_records(pipeline.name)) > 0


def test_scale_forms(pipeline):
    """A float, a list and a tensor of equal per-layer values agree; None means 1.0."""
    ref = _reference(pipeline, weights_seed=1)
    context = torch.randn(1, 96, 3, 4, 4, generator=torch.Generator().manual_seed(3))

    def output(scale):
        args, kwargs = example_call(ref, pipeline, frames=3, vace_context=context, vace_context_scale=scale)
        with torch.no_grad():
            return ref(*args, **kwargs)

    for same in ([None, 1.0, [1.0, 1.0]], [0.7, [0.7, 0.7], torch.tensor([0.7, 0.7])]):
        outputs = [output(scale) for scale in same]
        assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    assert not torch.equal(output(0.7), output(1.0))
    with pytest.raises(CallError, match="one value per VACE layer"):
        output([1.0, 1.0, 1.0])


# ---- context forms and checks -------------------------------------------------------------------

@torch.no_grad()  # inference, as pipelines run it: flex attention has no CPU backward
def test_context_as_list_equals_tensor_and_grid_is_checked(pipeline):
    ref = _reference(pipeline, weights_seed=2)
    context = torch.randn(1, 96, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    args, kwargs = example_call(ref, pipeline, frames=3, vace_context=context)
    as_tensor = ref(*args, **kwargs)
    args, kwargs = example_call(ref, pipeline, frames=3, vace_context=[context[0]])
    assert torch.equal(ref(*args, **kwargs), as_tensor)

    args, kwargs = example_call(ref, pipeline, frames=3, vace_context=torch.randn(1, 96, 3, 6, 4))
    with pytest.raises(CallError, match="token grid"):
        ref(*args, **kwargs)
    args, kwargs = example_call(ref, pipeline, frames=3, vace_context=context[0])
    with pytest.raises(CallError, match="shape"):
        ref(*args, **kwargs)


def test_hints_follow_the_formula(pipeline):
    """Non-default layers, cache-free call: every block output equals the formula of vace.md 1.2."""
    ref = _reference(pipeline, weights_seed=3, vace_layers=[0, 1, 3])
    assert [b.block_id for b in ref.blocks] == [0, 1, None, 2]
    context = torch.randn(1, 96, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    args, kwargs = example_call(ref, pipeline, frames=3, vace_context=context, vace_context_scale=0.5)
    kwargs.update(kv_cache=None, crossattn_cache=None)
    if "kv_bank" in kwargs:
        kwargs["kv_bank"] = None

    seen = {}
    hooks = [block.register_forward_hook(lambda m, a, kw, out, i=i: seen.__setitem__(i, (a, kw, out)),
                                         with_kwargs=True)
             for i, block in enumerate(ref.blocks)]
    with torch.no_grad():
        ref._forward_inference(*args, **kwargs)
        for hook in hooks:
            hook.remove()

        x0, kw0 = seen[0][0][0], seen[0][1]
        c = ref.vace_patch_embedding(context).flatten(2).transpose(1, 2)
        c = ref.vace_blocks[0].before_proj(c[:, : x0.size(1)]) + x0
        hints = []
        for block in ref.vace_blocks:
            out = nn.Module.__call__(block, c, kw0["e"], kw0["seq_lens"], kw0["grid_sizes"], kw0["freqs"],
                                     kw0["context"], kw0["context_lens"], kw0["block_mask"])
            c = out[0] if isinstance(out, tuple) else out
            hints.append(block.after_proj(c))
        assert all(h.abs().sum() > 0 for h in hints)

        for i, block in enumerate(ref.blocks):
            block_args, block_kwargs, out = seen[i]
            assert [scale for _, scale in block_kwargs["hints"]] == [0.5]  # one (hints, scale) pair per context
            plain = block(*block_args, **{**block_kwargs, "hints": None})
            expected = plain if block.block_id is None else plain + hints[block.block_id] * 0.5
            assert torch.equal(out, expected), i


# ---- (e) pipeline structure that must survive the wrap -------------------------------------------

def test_parameters_are_shared_not_copied(pipeline):
    model = pipeline.build("tiny", seed=0).eval()
    model.requires_grad_(False)
    old = list(model.blocks)
    ref = CausalVaceWanModel(model)
    assert ref.blocks is model.blocks
    for before, after in zip(old, ref.blocks):
        assert type(after).__name__ == "BaseWanAttentionBlock" and isinstance(after, type(before))
        for (n1, p1), (n2, p2) in zip(before.named_parameters(), after.named_parameters()):
            assert n1 == n2 and p1 is p2 and not p2.requires_grad
    assert all(type(b).__name__ == "VaceWanAttentionBlock" and isinstance(b, type(old[0]))
               for b in ref.vace_blocks)
    assert not any(p.requires_grad for p in ref.vace_blocks.parameters())
    assert not ref.training and not any(m.training for m in ref.modules())


def test_krea_keeps_fused_projections():
    pipeline = _pipeline("krea_realtime_video")
    model = pipeline.build("tiny", seed=0)
    fused = [b.self_attn.to_qkv for b in model.blocks]
    assert all(b.self_attn.fused_projections for b in model.blocks)
    ref = CausalVaceWanModel(model)
    assert [b.self_attn.to_qkv for b in ref.blocks] == fused
    assert all(b.self_attn.fused_projections for b in ref.blocks)
    assert all(f"blocks.{i}.self_attn.to_qkv.weight" in native_state_dict(ref) for i in range(len(fused)))
    # The fused path is the one in use: the bypassed q projection no longer matters.
    args, kwargs = example_call(ref, pipeline)
    with torch.no_grad():
        before = ref(*args, **kwargs)
        for block in ref.blocks:
            block.self_attn.q.weight.zero_()
        args, kwargs = example_call(ref, pipeline)
        assert torch.equal(ref(*args, **kwargs), before)


def test_memflow_bank_compression_stream():
    """MemFlow with a bank slot every chunk and a 2-frame bank: the pre-pass compresses by chunk 3."""
    pipeline = _pipeline("memflow")
    model_kwargs = {**pipeline.config.model_kwargs, "record_interval": 1, "bank_size": 2}
    config = dataclasses.replace(pipeline.config, record_interval=1, bank_size=2, model_kwargs=model_kwargs)
    pipeline = dataclasses.replace(pipeline, config=config)
    stream = dict(STREAM, chunks=4)
    compressions = []
    base_model = _base(pipeline)
    original = base_model.compress_kv_bank
    base_model.compress_kv_bank = lambda *a, **k: compressions.append(1) or original(*a, **k)
    base = run_stream(base_model, pipeline, **stream)
    assert compressions
    _assert_exact(run_stream(_reference(pipeline, weights_seed=1), pipeline, **stream), base)
    contexts = [torch.randn(1, 96, 3, 4, 4, generator=torch.Generator().manual_seed(c)) for c in range(4)]
    record = run_stream(_reference(pipeline), pipeline, vace_context=lambda c: contexts[c], **stream)
    _assert_exact(record, base)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _indices(caches):
    return [[int(torch.as_tensor(c[k]).reshape(-1)[0]) for k in ("global_end_index", "local_end_index")]
            for c in caches]


def test_memflow_update_cache_and_bank_prepass():
    """vace.md 2.8 B: update_cache=False commits nothing; q_bank runs the pre-pass once."""
    pipeline = _pipeline("memflow")
    context = torch.randn(1, 96, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    results = []
    for model in (_base(pipeline), _reference(pipeline, weights_seed=1)):
        inner = getattr(model, "causal_wan_model", model)
        counter = _Counter(inner._apply_cache_updates_before)
        inner._apply_cache_updates_before = counter
        vace = {"vace_context": context} if model is not inner else {}
        # Commit one chunk so the bank and cache hold data, then a first denoising step.
        record = run_stream(model, pipeline, chunks=1, frames_per_chunk=3, local_attn_size=8, steps=(1000,))
        calls_before = counter.calls
        args, kwargs = example_call(model, pipeline, chunk_index=1, caches=record.caches,
                                    local_attn_size=8, **vace)
        assert kwargs["update_cache"] is False and kwargs["q_bank"] is True
        indices = _indices(kwargs["kv_cache"]), _indices(kwargs["kv_bank"])
        with torch.no_grad():
            model(*args, **kwargs)
        assert (_indices(kwargs["kv_cache"]), _indices(kwargs["kv_bank"])) == indices
        results.append((counter.calls - calls_before, indices, [c["k"].clone() for c in kwargs["kv_bank"]]))
    (base_calls, base_idx, base_bank), (ref_calls, ref_idx, ref_bank) = results
    assert base_calls == ref_calls == 1
    assert base_idx == ref_idx and base_idx[0][0][0] > 0
    assert all(torch.equal(a, b) for a, b in zip(base_bank, ref_bank))


def test_block_mask_writes_reach_the_base_model(pipeline):
    ref = _reference(pipeline)
    sentinel = object()
    ref.block_mask = sentinel
    assert ref.causal_wan_model.block_mask is sentinel and ref.block_mask is sentinel
    ref.block_mask = None
    assert "block_mask" not in ref.__dict__


# ---- construction errors and dispatch ----------------------------------------------------------

def test_bad_vace_layers_and_double_wrap():
    pipeline = _pipeline("longlive")
    for layers in ([1, 2], [0, 4], [0, 0]):
        with pytest.raises(RuleError, match="vace_layers"):
            CausalVaceWanModel(pipeline.build("tiny"), vace_layers=layers)
    model = pipeline.build("tiny")
    model.blocks[1] = CausalVaceWanModel(pipeline.build("tiny")).blocks[1]
    with pytest.raises(OrderError, match="Base -> VACE -> LoRA"):
        CausalVaceWanModel(model)


def test_forward_without_cache_goes_to_the_base_model():
    pipeline = _pipeline("longlive")
    ref = _reference(pipeline)
    args, kwargs = example_call(ref, pipeline)
    kwargs = {k: kwargs[k] for k in ("t", "context", "seq_len")}
    with pytest.raises(CallError, match="kv_cache"):
        ref(*args, **kwargs, vace_context=torch.zeros(1, 96, 3, 4, 4))
    with pytest.raises(NotImplementedError):  # LongLive's training path raises, like upstream
        ref(*args, **kwargs, vace_context=None, vace_context_scale=1.0)


# ---- keys and weights ---------------------------------------------------------------------------

def test_native_keys_match_the_checkpoint_layout(pipeline):
    ref = _reference(pipeline)
    base_keys = set(_base(pipeline).state_dict())
    native = native_state_dict(ref)
    m = ref.causal_wan_model
    expected_vace = vace_key_shapes(m.dim, m.ffn_dim, len(LAYERS), 96, m.patch_size)
    assert set(native) == base_keys | set(expected_vace)
    assert {k: tuple(native[k].shape) for k in expected_vace} == expected_vace
    params = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    for key, tensor in native.items():
        ref_key = to_reference_key(key)
        assert to_native_key(ref_key) == key
        assert tensor.data_ptr() == params[ref_key].data_ptr()  # shared, not copied
    assert [p for p, _ in REFERENCE_KEY_MAP][0] == "causal_wan_model."


def test_random_vace_state_dict_is_deterministic_and_nonzero():
    ref = _reference(_pipeline("longlive"))
    m = ref.causal_wan_model
    a = random_vace_state_dict(ref, seed=1)
    b = random_vace_state_dict(vace_key_shapes(m.dim, m.ffn_dim, 2), seed=1)
    c = random_vace_state_dict(seed=1, dim=m.dim, ffn_dim=m.ffn_dim, num_vace_blocks=2)
    d = random_vace_state_dict(ref, seed=2)
    assert set(a) == set(b) == set(c) and "vace_blocks.0.before_proj.weight" in a
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.float32 and v.any() for v in a.values())
    assert all(not torch.equal(a[k], d[k]) for k in a)


def test_load_vace_state_dict_like_scope():
    pipeline = _pipeline("longlive")
    ref = _reference(pipeline)
    sd = random_vace_state_dict(ref, seed=1)

    full = {**native_state_dict(_reference(pipeline)), **sd}  # a full checkpoint is filtered
    assert load_vace_state_dict(ref, full) == []
    assert all(torch.equal(native_state_dict(ref)[k], v) for k, v in sd.items())

    with pytest.raises(WeightsError, match="lacks 1 VACE keys"):
        load_vace_state_dict(ref, {k: v for k, v in sd.items() if k != "vace_blocks.1.after_proj.bias"})
    with pytest.raises(WeightsError, match="vace_in_dim=16"):
        load_vace_state_dict(ref, {**sd, "vace_patch_embedding.weight": torch.ones(64, 16, 1, 2, 2)})
    with pytest.raises(WeightsError, match="all zeros"):
        load_vace_state_dict(ref, {**sd, "vace_patch_embedding.weight": torch.zeros(64, 96, 1, 2, 2)})
    with pytest.raises(WeightsError, match="no vace_blocks"):
        load_vace_state_dict(ref, {"patch_embedding.bias": torch.zeros(64)})
    extra = {**sd, **{k.replace("vace_blocks.1.", "vace_blocks.2."): v
                      for k, v in sd.items() if k.startswith("vace_blocks.1.")}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unexpected = load_vace_state_dict(ref, extra)
    assert unexpected and all(k.startswith("vace_blocks.2.") for k in unexpected)
    assert any("unexpected VACE keys" in str(w.message) for w in caught)


@pytest.mark.parametrize("name, size, vace_keys, native_keys", [
    ("longlive", "1.3B", 439, 1264),
    ("krea_realtime_video", "14B", 236, 1331 + 40 * 2),  # + the fused to_qkv weight and bias per block
])
def test_real_sizes_on_meta_match_the_checkpoint_counts(name, size, vace_keys, native_keys):
    """vace.md 5.6: 439 / 1264 tensors for 1.3B, 236 / 1331 for 14B (Krea's vace_layers)."""
    pipeline = _pipeline(name)
    layers = pipeline.config.vace_layers
    ref = CausalVaceWanModel(pipeline.build(size, init="meta"), vace_layers=layers)
    native = native_state_dict(ref)
    assert len([k for k in native if k.startswith(("vace_blocks.", "vace_patch_embedding."))]) == vace_keys
    assert len(native) == native_keys
    assert ref.vace_patch_embedding.weight.is_meta and native["vace_patch_embedding.weight"].shape[1] == 96
