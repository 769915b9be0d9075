"""Stand-in fidelity for Krea Realtime Video, RewardForcing and MemFlow (spec sections 4-6).

Tiny geometry: 32x32 pixels -> 2x2 tokens per frame (FS = 4). The streams are built once
per module and shared; each test reads the per-call cache snapshots the driver records.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.fx

from examples import PIPELINES
from examples.driver import compare, example_call, run_stream, snapshot_caches
from examples.wan.pipeline import MODEL_SIZES, PipelineSpec
from surgery.tracing.twin import fake_inputs, fake_twin, is_fake, new_fake_mode

FS = 4
H = W = 32
STEPS = (1000, 500)
LAYERS = MODEL_SIZES["tiny"]["num_layers"]
PART2 = ["krea_realtime_video", "reward_forcing", "memflow"]


def _indices(cache: dict) -> tuple[int, int]:
    return tuple(int(torch.as_tensor(cache[k]).reshape(-1)[0]) for k in ("global_end_index", "local_end_index"))


def _calls(record, chunk, kind=None):
    return [c for c in record.calls if c.chunk == chunk and (kind is None or c.kind == kind)]


def _memflow_fast_bank():
    """MemFlow with a bank slot every chunk and a 2-frame bank, so compression happens in chunk 3."""
    pipeline = PIPELINES["memflow"]
    config = dataclasses.replace(
        pipeline.config,
        record_interval=1,
        bank_size=2,
        model_kwargs={**pipeline.config.model_kwargs, "record_interval": 1, "bank_size": 2},
    )
    return dataclasses.replace(pipeline, config=config)


def _generic(pipeline):
    """The same spec as a plain ``PipelineSpec``: the driver's generic denoise + commit loop, no chunk hooks."""
    return PipelineSpec(**{f.name: getattr(pipeline, f.name) for f in dataclasses.fields(PipelineSpec)})


def _krea_with_local_window():
    """Krea with SetTransformerBlocksLocalAttnSizeBlock-like behaviour: reaches the (normally dead) roll branch."""
    pipeline = _generic(PIPELINES["krea_realtime_video"])
    return dataclasses.replace(pipeline, config=dataclasses.replace(pipeline.config, sets_block_local_attn_size=True))


def _krea_stream(model, pipeline, chunks, frames=3, seed=0, steps=STEPS):
    """The Krea chunk loop through the pipeline hooks: recompute, then denoise; no commit pass."""
    caches = pipeline.setup(model, H, W)
    device = model.patch_embedding.weight.device
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device)

    context = randn(1, model.text_len // 2, model.text_dim)
    history, log = [], []
    for chunk in range(chunks):
        start_frame = pipeline.before_chunk(
            model, caches, chunk=chunk, frames=frames, height=H, width=W, context=context, history=history
        )
        log.append(("recomputed", chunk, snapshot_caches(caches)))
        for step in steps:
            t = torch.full((1, frames), step, dtype=torch.int64, device=device)
            kwargs = dict(t=t, context=context, seq_len=32760, kv_cache=caches["kv_cache"],
                          crossattn_cache=caches["crossattn_cache"], current_start=start_frame * FS,
                          cache_start=None, kv_cache_attention_bias=pipeline.config.kv_cache_attention_bias)
            with torch.no_grad():
                out = model(randn(1, 16, frames, 4, 4), **kwargs)
            log.append(("denoised", chunk, snapshot_caches(caches)))
        assert not pipeline.commits_cache
        history.append(out)
    return caches, log, out


# ---------------------------------------------------------------- shared streams


@pytest.fixture(scope="module")
def rf_ema():
    """RewardForcing at its yaml geometry (local 9, sink 3, 3 frames): chunk 3 evicts exactly one sink."""
    pipeline = PIPELINES["reward_forcing"]
    model = pipeline.build("tiny")
    keys = []
    handle = model.blocks[0].self_attn.norm_k.register_forward_hook(lambda m, a, out: keys.append(out.detach().clone()))
    record = run_stream(model, pipeline, chunks=4, height=H, width=W, steps=STEPS)
    handle.remove()
    return model, record, keys


@pytest.fixture(scope="module")
def memflow_stream():
    pipeline = _memflow_fast_bank()
    model = pipeline.build("tiny")
    kinds = []
    handle = model.blocks[0].register_forward_hook(lambda m, a, out: kinds.append(type(out)))
    record = run_stream(model, pipeline, chunks=4, height=H, width=W, steps=STEPS, local_attn_size=8)
    handle.remove()
    return pipeline, model, record, kinds


@pytest.fixture(scope="module")
def krea_driver_stream():
    """Krea through the generic driver loop: 2-frame chunks keep three chunks inside the 6-frame cache."""
    pipeline = PIPELINES["krea_realtime_video"]
    model = pipeline.build("tiny")  # fused, as the pipeline does
    return pipeline, model, run_stream(model, _generic(pipeline), chunks=3, frames_per_chunk=2, steps=STEPS)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("name", PART2)
def test_plain_symbolic_trace_fails(name):
    model = PIPELINES[name].build("tiny")
    with pytest.raises(torch.fx.proxy.TraceError, match="cannot be iterated"):
        torch.fx.symbolic_trace(model)


@pytest.mark.parametrize("name", PART2)
def test_block_traces_only_with_attention_leaves(name):
    block = PIPELINES[name].build("tiny").blocks[0]
    no_cache = {"kv_cache": None, "crossattn_cache": None}
    with pytest.raises(torch.fx.proxy.TraceError, match="cannot be iterated"):
        torch.fx.symbolic_trace(block, concrete_args=no_cache)

    class AttentionLeaves(torch.fx.Tracer):
        def is_leaf_module(self, module, qualified_name):
            leaf = type(module).__name__ in ("CausalWanSelfAttention", "WanT2VCrossAttention")
            return leaf or super().is_leaf_module(module, qualified_name)

    graph = AttentionLeaves().trace(block, concrete_args=no_cache)
    assert {"self_attn", "cross_attn", "ffn.0", "ffn.1", "ffn.2"} <= {n.target for n in graph.nodes if n.op == "call_module"}


@pytest.mark.parametrize("name", PART2)
def test_compiled_flex_attention_refuses_fx(name):
    module = PIPELINES[name].module
    with pytest.raises(RuntimeError, match="dynamo-optimized"):
        torch.fx.symbolic_trace(lambda q: module.flex_attention(q, q, q))


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


E = inspect.Parameter.empty
BLOCK_HEAD = [("x", E), ("e", E), ("seq_lens", E), ("grid_sizes", E), ("freqs", E), ("context", E),
              ("context_lens", E), ("block_mask", E), ("kv_cache", None), ("crossattn_cache", None),
              ("current_start", 0), ("cache_start", None)]
SA_HEAD = [("x", E), ("seq_lens", E), ("grid_sizes", E), ("freqs", E), ("block_mask", E),
           ("kv_cache", None), ("current_start", 0), ("cache_start", None)]
INFER_HEAD = [("x", E), ("t", E), ("context", E), ("seq_len", E), ("clip_fea", None), ("y", None),
              ("kv_cache", None), ("crossattn_cache", None), ("current_start", 0), ("cache_start", 0)]
SIGNATURES = {
    "krea_realtime_video": {
        "CausalWanSelfAttention.__init__": [("dim", E), ("num_heads", E), ("local_attn_size", -1), ("sink_size", 0),
                                            ("qk_norm", True), ("eps", 1e-6)],
        "CausalWanSelfAttention.forward": SA_HEAD + [("kv_cache_attention_bias", 1.0)],
        "CausalWanAttentionBlock.forward": BLOCK_HEAD + [("kv_cache_attention_bias", 1.0)],
        "CausalWanModel._forward_inference": INFER_HEAD + [("kv_cache_attention_bias", 1.0)],
    },
    "reward_forcing": {
        "CausalWanSelfAttention.__init__": [("dim", E), ("num_heads", E), ("local_attn_size", -1), ("sink_size", 0),
                                            ("qk_norm", True), ("eps", 1e-6), ("compression_alpha", 0.999)],
        "CausalWanSelfAttention.forward": SA_HEAD,
        "CausalWanSelfAttention.incremental_update": [("new_k", E), ("new_v", E), ("current_sink_k", E),
                                                      ("current_sink_v", E), ("alpha", None)],
        "CausalWanAttentionBlock.forward": BLOCK_HEAD,
        "CausalWanModel._forward_inference": INFER_HEAD,
    },
    "memflow": {
        "CausalWanSelfAttention.__init__": [("dim", E), ("num_heads", E), ("local_attn_size", -1), ("sink_size", 0),
                                            ("qk_norm", True), ("eps", 1e-6), ("record_interval", 3), ("SMA", False)],
        "CausalWanSelfAttention.forward": SA_HEAD + [("kv_bank", None), ("update_bank", None), ("is_recache", None)],
        "CausalWanAttentionBlock.__init__": [("cross_attn_type", E), ("dim", E), ("ffn_dim", E), ("num_heads", E),
                                             ("local_attn_size", -1), ("sink_size", 0), ("bank_size", 3),
                                             ("qk_norm", True), ("cross_attn_norm", False), ("eps", 1e-6),
                                             ("record_interval", 3), ("SMA", False)],
        "CausalWanAttentionBlock.forward": BLOCK_HEAD + [("kv_bank", None), ("update_bank", None), ("q_bank", None),
                                                         ("is_recache", None)],
        "CausalWanModel._forward_inference": INFER_HEAD + [("kv_bank", None), ("update_bank", True), ("q_bank", False),
                                                           ("update_cache", True), ("is_recache", False)],
        "CausalWanModel._apply_cache_updates": [("kv_cache", E), ("cache_update_infos", E), ("kv_bank", None),
                                                ("update_bank", True), ("kwargs", E)],
        "CausalWanModel._apply_cache_updates_before": [("kv_bank", E), ("crossattn_cache", E), ("frame_seqlen", E)],
    },
}


@pytest.mark.parametrize("name", PART2)
def test_signatures(name):
    module = PIPELINES[name].module
    for qualname, expected in SIGNATURES[name].items():
        cls, method = qualname.split(".")
        assert _params(getattr(getattr(module, cls), method)) == expected, qualname
    model_params = [p for p, _ in _params(module.CausalWanModel.__init__)]
    assert model_params[11:13] == ["local_attn_size", "sink_size"]
    if name == "memflow":
        assert model_params[13:16] == ["bank_size", "record_interval", "SMA"]
    assert list(inspect.signature(module.CausalWanModel.forward).parameters) == ["self", "args", "kwargs"]


@pytest.mark.parametrize("name, kernel", [("krea_realtime_video", "flags"), ("reward_forcing", "attention"),
                                          ("memflow", "flash_attention")])
def test_state_dict_and_cross_attention_kernel(name, kernel):
    model = PIPELINES[name].build("tiny")
    keys = list(model.state_dict())
    per_block = 29 if name == "krea_realtime_video" else 27  # Krea adds self_attn.to_qkv.{weight,bias}
    assert len(keys) == 15 + per_block * LAYERS
    assert not any(k.startswith("freqs") for k in keys) and model.freqs.dtype == torch.complex128
    cross = model.blocks[0].cross_attn
    assert type(cross).__name__ == "WanT2VCrossAttention" and cross.attention_kernel == kernel


# ---------------------------------------------------------------- RewardForcing


def test_reward_forcing_stream_runs(rf_ema):
    _, record, _ = rf_ema
    assert len(record.calls) == 4 * (len(STEPS) + 1)
    for call in record.calls:
        assert call.output.shape == (1, 16, 3, 4, 4) and torch.isfinite(call.output).all()
        assert call.output.abs().sum() > 0
    assert [_indices(c.caches["kv_cache"][0]) for c in record.calls[-1:]] == [(48, 36)]


def test_reward_forcing_caches_unroped_keys(rf_ema):
    _, record, keys = rf_ema
    # Call 2 is chunk 0's commit; its keys land un-roped in slots [0, 12).
    commit = record.calls[2]
    assert commit.kind == "commit" and commit.chunk == 0
    raw_k = keys[2].view(1, 12, 4, 16)
    assert torch.equal(commit.caches["kv_cache"][0]["k"][:, :12], raw_k)


def test_reward_forcing_ema_sink(rf_ema):
    model, record, keys = rf_ema
    sink, alpha = 12, model.blocks[0].self_attn.compression_alpha
    assert alpha == 0.999
    before = _calls(record, 2, "commit")[0].caches["kv_cache"]
    after = _calls(record, 3)[0].caches["kv_cache"]
    raw_k = keys[9].view(1, 12, 4, 16)  # chunk 3, step 0
    for prev, now in zip(before, after):
        assert _indices(prev) == (36, 36) and _indices(now) == (48, 36)
        evicted = prev["k"][:, sink : 2 * sink]  # E = 12 + 36 - 36 = 12 = S: EMA
        assert torch.equal(now["k"][:, :sink], alpha * prev["k"][:, :sink] + (1 - alpha) * evicted)
        assert torch.equal(now["v"][:, :sink], alpha * prev["v"][:, :sink] + (1 - alpha) * prev["v"][:, sink : 2 * sink])
        assert torch.equal(now["k"][:, sink : 2 * sink], prev["k"][:, 2 * sink : 3 * sink])  # rolled
    assert torch.equal(after[0]["k"][:, 24:36], raw_k)
    # Later steps of the same chunk do not roll again, so the sink is compressed once per chunk.
    assert all(torch.equal(c.caches["kv_cache"][0]["k"][:, :sink], after[0]["k"][:, :sink]) for c in _calls(record, 3))


def test_reward_forcing_partial_eviction_copies_into_sink():
    pipeline = PIPELINES["reward_forcing"]
    record = run_stream(pipeline.build("tiny"), pipeline, chunks=3, local_attn_size=8, steps=(1000,))
    before = _calls(record, 1, "commit")[0].caches["kv_cache"][0]
    now = _calls(record, 2)[0].caches["kv_cache"][0]
    # Capacity 32: chunk 2 evicts 4 tokens (not a whole sink of 12): they overwrite the sink's start.
    assert torch.equal(now["k"][:, :4], before["k"][:, 12:16])
    assert torch.equal(now["k"][:, 4:12], before["k"][:, 4:12])
    assert torch.equal(now["k"][:, 12:20], before["k"][:, 16:24])
    assert _indices(now) == (36, 32)


def test_reward_forcing_train_path_is_block_causal(capsys):
    model = PIPELINES["reward_forcing"].build("tiny")
    model.num_frame_per_block = 1
    x = torch.randn(1, 16, 3, 4, 4)
    t = torch.full((1, 3), 500, dtype=torch.long)
    context = torch.randn(1, 8, 32)
    with torch.no_grad():
        out = model(x, t=t, context=context, seq_len=12)
    assert "block wise causal mask" in capsys.readouterr().out  # the upstream print
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    with torch.no_grad():
        changed = model(x2, t=t, context=context, seq_len=12)
    assert torch.equal(out[:, :, 0], changed[:, :, 0]) and not torch.equal(out[:, :, 2], changed[:, :, 2])


# ---------------------------------------------------------------- MemFlow


def test_memflow_stream_is_deterministic_and_returns_tuples(memflow_stream):
    pipeline, model, record, kinds = memflow_stream
    assert len(record.calls) == 4 * (len(STEPS) + 1)
    assert all(torch.isfinite(c.output).all() and c.output.abs().sum() > 0 for c in record.calls)
    assert kinds and all(kind is tuple for kind in kinds)  # blocks return (x, info) with a cache
    again = run_stream(model, pipeline, chunks=4, steps=STEPS, local_attn_size=8)
    assert compare(record, again) == 0.0
    other = run_stream(pipeline.build("tiny", seed=1), pipeline, chunks=4, steps=STEPS, local_attn_size=8)
    assert compare(record, other) > 0.0


def test_memflow_denoising_never_commits(memflow_stream):
    _, _, record, _ = memflow_stream
    previous = None
    for call in record.calls:
        kv, bank = call.caches["kv_cache"], call.caches["kv_bank"]
        if call.kind == "denoise" and previous is not None:
            # update_cache=False: no kv writes, no index moves, no staging.
            assert compare_entries(kv, previous["kv_cache"])
            for b_now, b_prev in zip(bank, previous["kv_bank"]):
                assert _indices(b_now) == _indices(b_prev)
                assert torch.equal(b_now["k_new"], b_prev["k_new"])
        previous = call.caches
    commits = [_indices(c.caches["kv_cache"][0]) for c in record.calls if c.kind == "commit"]
    assert commits == [(12, 12), (24, 24), (36, 32), (48, 32)]  # chunk 2 rolls (capacity 32)
    banks = [_indices(c.caches["kv_bank"][0]) for c in record.calls if c.kind == "commit"]
    assert banks == [(4, 4), (8, 8), (12, 12), (16, 16)]


def compare_entries(a, b):
    return all(torch.equal(x["k"], y["k"]) and torch.equal(x["v"], y["v"]) and _indices(x) == _indices(y)
               for x, y in zip(a, b))


def test_memflow_update_cache_gates_the_deferred_pass(memflow_stream):
    pipeline, model, record, _ = memflow_stream
    caches = snapshot_caches(_calls(record, 0, "commit")[0].caches)
    context = torch.randn(1, 8, 32)
    kwargs = dict(t=torch.full((1, 3), 500), context=context, seq_len=32760, current_start=12, cache_start=None,
                  update_bank=False, q_bank=False, is_recache=False, **caches)
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 4, 4), update_cache=False, **kwargs)
    assert _indices(caches["kv_cache"][0]) == (12, 12)
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 4, 4), update_cache=True, **kwargs)
    assert _indices(caches["kv_cache"][0]) == (24, 24) and _indices(caches["kv_bank"][0]) == (4, 4)


def test_memflow_bank_prepass_runs_on_q_bank(memflow_stream):
    _, model, record, _ = memflow_stream
    staged = _calls(record, 1, "commit")[0].caches  # bank index 8: chunk 1's first frame staged
    caches = snapshot_caches(staged)
    kwargs = dict(t=torch.full((1, 3), 1000), context=torch.randn(1, 8, 32), seq_len=32760, current_start=24,
                  cache_start=None, update_bank=False, update_cache=False, is_recache=False, **caches)
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 4, 4), q_bank=False, **kwargs)
    assert torch.equal(caches["kv_bank"][0]["k"], staged["kv_bank"][0]["k"])
    assert caches["kv_bank"][0]["k"][:, 4:8].abs().sum() == 0
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 4, 4), q_bank=True, **kwargs)
    for bank, prev in zip(caches["kv_bank"], staged["kv_bank"]):
        assert torch.equal(bank["k"][:, 4:8], prev["k_new"]) and torch.equal(bank["v"][:, 4:8], prev["v_new"])
        assert torch.equal(bank["k"][:, :4], prev["k"][:, :4])
    # The driver's stream did exactly this on chunk 2's first step.
    assert torch.equal(_calls(record, 2)[0].caches["kv_bank"][0]["k"], caches["kv_bank"][0]["k"])


def test_memflow_bank_compression_keeps_the_text_relevant_frame(memflow_stream):
    _, _, record, _ = memflow_stream
    before = _calls(record, 2, "commit")[0].caches  # bank full (2 frames), third frame staged, index 12
    after = _calls(record, 3)[0].caches  # pre-pass compressed
    for i, (prev, now) in enumerate(zip(before["kv_bank"], after["kv_bank"])):
        text_k = before["crossattn_cache"][i]["k"]  # [1, 16, 4, 16]
        scores = torch.einsum("bthd,bkhd->bhtk", text_k.double(), prev["k"].double()) / 4.0
        block_scores = scores.reshape(1, 4, text_k.shape[1], 2, FS).mean(dim=(1, 2, 4))
        kept = int(block_scores.argmax())
        assert torch.equal(now["k"][:, :FS], prev["k"][:, kept * FS : (kept + 1) * FS])
        assert torch.equal(now["k"][:, FS:], prev["k_new"]) and torch.equal(now["v"][:, FS:], prev["v_new"])


def test_memflow_compress_kv_bank_validates_lengths():
    model = PIPELINES["memflow"].build("tiny")
    bank = {"k": torch.zeros(1, 10, 4, 16), "v": torch.zeros(1, 10, 4, 16)}
    text = {"k": torch.randn(1, 16, 4, 16)}
    with pytest.raises(ValueError, match="multiple"):
        model.compress_kv_bank(bank, torch.zeros(1, 4, 4, 16), torch.zeros(1, 4, 4, 16), text, tokens_per_block=4)
    bank = {"k": torch.zeros(1, 8, 4, 16), "v": torch.zeros(1, 8, 4, 16)}
    with pytest.raises(ValueError, match="multiple"):
        model.compress_kv_bank(bank, torch.zeros(1, 3, 4, 16), torch.zeros(1, 3, 4, 16), text, tokens_per_block=4)


def test_memflow_sma_routing_selects_whole_chunks():
    sa = PIPELINES["memflow"].build("tiny").blocks[0].self_attn
    key = torch.randn(1, 5 * FS, 4, 16)
    value = torch.randn(1, 5 * FS, 4, 16)
    query = key[:, 2 * FS : 3 * FS] * 10  # aligned with chunk 2
    k_sel, v_sel = sa.dynamic_topk_routing_attention(query, key, value, chunk_size=FS, top_k=3)
    assert k_sel.shape == (1, 3 * FS, 4, 16) and v_sel.shape == k_sel.shape
    chunks = key.view(1, 5, FS, 4, 16)
    for h in range(4):
        picked = [c for c in range(5) for j in range(3) if torch.equal(k_sel[0, j * FS : (j + 1) * FS, h], chunks[0, c, :, h])]
        assert len(picked) == 3 and picked == sorted(picked) and 2 in picked
    with pytest.raises(AssertionError):
        sa.dynamic_topk_routing_attention(query, key[:, :-1], value[:, :-1], chunk_size=FS, top_k=3)


def test_memflow_sma_stream_runs():
    pipeline = _memflow_fast_bank()
    pipeline = dataclasses.replace(
        pipeline, config=dataclasses.replace(pipeline.config, model_kwargs={**pipeline.config.model_kwargs, "SMA": True})
    )
    model = pipeline.build("tiny")
    assert model.blocks[0].self_attn.SMA is True
    record = run_stream(model, pipeline, chunks=2, steps=(1000,), local_attn_size=8, snapshot=False)
    assert all(torch.isfinite(c.output).all() for c in record.calls)


def test_memflow_non_cache_forward_raises_like_upstream():
    model = PIPELINES["memflow"].build("tiny")
    with pytest.raises(NotImplementedError):
        model(torch.randn(1, 16, 3, 4, 4), t=torch.zeros(1, 3), context=torch.randn(1, 8, 32), seq_len=12)


# ---------------------------------------------------------------- Krea


def test_krea_driver_stream_replaces_indices_with_ints(krea_driver_stream):
    pipeline, model, record = krea_driver_stream
    assert pipeline.config.kv_cache_attention_bias == 0.3
    assert all(block.self_attn.fused_projections for block in model.blocks)
    first = record.calls[0].caches["kv_cache"]
    assert all(type(c["global_end_index"]) is int and c["global_end_index"] == 8 for c in first)
    assert all(isinstance(c["local_end_index"], torch.Tensor) for c in first)  # measured upstream
    assert [_indices(c.caches["kv_cache"][0]) for c in record.calls if c.kind == "commit"] == [(8, 8), (16, 16), (24, 24)]
    assert all(torch.isfinite(c.output).all() and c.output.abs().sum() > 0 for c in record.calls)


def test_krea_bias_only_touches_keys_between_first_frame_and_current_block(krea_driver_stream):
    pipeline, model, record = krea_driver_stream

    def call(caches, chunk, bias):
        caches = snapshot_caches(caches)
        g = torch.Generator().manual_seed(7)
        kwargs = dict(t=torch.full((1, 2), 750), context=torch.randn(1, 8, 32, generator=g), seq_len=32760,
                      current_start=chunk * 2 * FS, cache_start=None, kv_cache_attention_bias=bias,
                      kv_cache=caches["kv_cache"], crossattn_cache=caches["crossattn_cache"])
        with torch.no_grad():
            return model(torch.randn(1, 16, 2, 4, 4, generator=g), **kwargs)

    fresh = pipeline.init_caches(model, H, W)
    # Chunk 0: the cache holds only the current block, so no key is biased (the bias value is moot).
    assert torch.equal(call(fresh, 0, 0.3), call(fresh, 0, 0.5))
    # Chunk 2: keys [4, 12) are biased; the result depends on the bias.
    before = _calls(record, 1, "commit")[0].caches
    assert not torch.equal(call(before, 2, 0.3), call(before, 2, 0.5))


def test_krea_fused_projections_bypass_q_k_v():
    pipeline = PIPELINES["krea_realtime_video"]
    model = pipeline.build("tiny")
    sa = model.blocks[0].self_attn
    assert sa.to_qkv.weight.shape == (3 * 64, 64)
    assert torch.equal(sa.to_qkv.weight, torch.cat([sa.q.weight, sa.k.weight, sa.v.weight]))
    sa.fuse_projections()  # idempotent
    reference = run_stream(model, _generic(pipeline), chunks=1, steps=(1000,), snapshot=False).outputs
    with torch.no_grad():
        for block in model.blocks:
            block.self_attn.q.weight.zero_()
    again = run_stream(model, _generic(pipeline), chunks=1, steps=(1000,), snapshot=False).outputs
    assert all(torch.equal(a, b) for a, b in zip(reference, again))


def test_krea_recompute_loop_streams_four_chunks():
    pipeline = PIPELINES["krea_realtime_video"]
    model = pipeline.build("tiny")
    hits_before = pipeline.module.get_block_mask.cache_info().hits
    caches, log, out = _krea_stream(model, pipeline, chunks=4)
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()
    for stage, chunk, snap in log:
        kv = snap["kv_cache"]
        if stage == "recomputed" and chunk > 0:
            # block_mask path: cache refilled from 0 with the 3 context frames; both indices are ints.
            assert all(type(c["global_end_index"]) is int and type(c["local_end_index"]) is int for c in kv)
            assert all(_indices(c) == (12, 12) for c in kv)
        if stage == "denoised" and chunk > 0:
            assert all(_indices(c) == (24, 24) for c in kv)  # new block after the context, at start frame 3
    assert model.block_mask is None
    assert pipeline.module.get_block_mask.cache_info().hits > hits_before  # lru-cached mask reused


def test_krea_roll_branch_when_blocks_get_a_window():
    pipeline = _krea_with_local_window()
    model = PIPELINES["krea_realtime_video"].build("tiny")
    record = run_stream(model, pipeline, chunks=3, steps=STEPS)
    before = _calls(record, 1, "commit")[0].caches["kv_cache"]
    now = _calls(record, 2)[0].caches["kv_cache"]
    for prev, cur in zip(before, now):
        # Capacity 24, no sink: chunk 2 evicts 12 tokens and rolls 12.
        assert _indices(prev) == (24, 24) and _indices(cur) == (36, 24)
        assert torch.equal(cur["k"][:, :12], prev["k"][:, 12:24])
        assert not torch.equal(cur["k"][:, 12:24], prev["k"][:, 12:24])


def test_krea_forward_always_takes_the_inference_path():
    model = PIPELINES["krea_realtime_video"].build("tiny")
    with pytest.raises(TypeError, match="NoneType"):
        model(torch.randn(1, 16, 3, 4, 4), t=torch.zeros(1, 3), context=torch.randn(1, 8, 32), seq_len=12)


# ---------------------------------------------------------------- meta device


@pytest.mark.parametrize(
    "name, options",
    [("reward_forcing", dict(chunks=4)), ("memflow", dict(chunks=4, local_attn_size=8)),
     ("krea_realtime_video", dict(chunks=3, frames_per_chunk=2))],
)
def test_fake_twin_stream(name, options):
    """A whole stream on the tracer's fake twin: torch's flex attention (which refuses meta)
    runs on fake tensors, and the real index tensors drive the cache bookkeeping."""
    pipeline = _memflow_fast_bank() if name == "memflow" else PIPELINES[name]
    real, mode = pipeline.build("tiny"), new_fake_mode()
    model = fake_twin(real, mode)
    pipeline = _generic(pipeline)
    assert is_fake(model.patch_embedding.weight) and is_fake(model.freqs)
    # Caches as the tracer sees them: float buffers fake, index tensors real.
    caches = fake_inputs(pipeline.setup(real, 32, 32, options.get("local_attn_size", pipeline.config.local_attn_size)),
                         mode)
    record = run_stream(model, pipeline, steps=(1000,), snapshot=False, caches=caches, **options)
    assert all(is_fake(c.output) for c in record.calls)
    kv = record.caches["kv_cache"]
    assert not any(is_fake(torch.as_tensor(c["local_end_index"])) for c in kv)
    expected = {"reward_forcing": (48, 36), "memflow": (48, 32), "krea_realtime_video": (24, 24)}[name]
    assert all(_indices(c) == expected for c in kv)  # EMA sink / bank compression / bias path ran fake
    if name == "memflow":
        assert all(_indices(b) == (16, 16) for b in record.caches["kv_bank"])


def test_fake_twin_krea_recompute_loop():
    pipeline = PIPELINES["krea_realtime_video"]
    model = fake_twin(pipeline.build("tiny"), new_fake_mode())
    caches, _, out = _krea_stream(model, pipeline, chunks=3, steps=(1000,))
    assert is_fake(out) and all(_indices(c) == (24, 24) for c in caches["kv_cache"])


@pytest.mark.parametrize("name", PART2)
def test_fake_twin_non_cache_block_path(name):
    """The flex (non-cache) self-attention path, which VACE blocks always take, on the fake twin."""
    pipeline = _memflow_fast_bank() if name == "memflow" else PIPELINES[name]
    model = fake_twin(pipeline.build("tiny"), new_fake_mode())
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, dict(kwargs)

    handle = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    args, kwargs = fake_inputs(example_call(model, pipeline), model.__dict__["_fake_mode"])
    model(*args, **kwargs)
    handle.remove()
    block_kwargs = {**captured["kwargs"], "kv_cache": None, "crossattn_cache": None}
    out = model.blocks[0](*captured["args"], **block_kwargs)
    assert is_fake(out) and out.shape == (1, 12, 64)
