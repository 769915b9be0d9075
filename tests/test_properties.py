"""Property test: surgery equals the hand-written reference on random tiny configurations.

Each draw picks a pipeline, a block count (1..6), a valid ``vace_layers`` (a sorted subset
containing 0), small dimensions, a pixel size, a context scale and 1..3 streaming chunks.
Surgery's rewritten model and ``examples.reference.CausalVaceWanModel`` get identical
random non-zero VACE weights and must agree **bit for bit** (max abs diff 0.0) on every
call's output and every cache snapshot of the stream.

CI runs a handful of draws. For a long soak run locally, e.g.::

    SURGERY_SOAK=500 PYTHONPATH=. python -m pytest tests/test_properties.py -q

``SURGERY_SOAK=N`` sets the number of draws (hypothesis prints the failing draw, and its
database in ``.hypothesis/`` replays it first on the next run).
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery
from examples import PIPELINE_MODULES, PIPELINES
from examples.driver import call_diffs, example_call, run_stream
from examples.reference import CausalVaceWanModel, load_vace_state_dict, native_state_dict, random_vace_state_dict
from examples.wan.pipeline import MODEL_SIZES
from rules import vace
from surgery.errors import CallError
from test_call_checks import latent_change
from test_identity import InputRecord

SOAK = int(os.environ.get("SURGERY_SOAK", "0") or 0)
EXAMPLES = SOAK if SOAK > 0 else 8
VACE_IN_DIM = 96
SIZE = "property"  # a temporary MODEL_SIZES entry, so each pipeline's own build() (Krea fuses) is used



@st.composite
def configurations(draw: st.DrawFn) -> dict:
    """One random tiny configuration (see the module docstring)."""
    num_layers = draw(st.integers(1, 6))
    rest = draw(st.sets(st.integers(1, num_layers - 1), max_size=num_layers - 1)) if num_layers > 1 else set()
    dim = draw(st.sampled_from([32, 64]))
    num_heads = draw(st.sampled_from([2, 4]))  # head_dim 8..32, even
    name = draw(st.sampled_from(sorted(PIPELINE_MODULES)))
    layers = [0, *sorted(rest)]
    scale = draw(st.one_of(
        st.sampled_from([1.0, 0.5, 1.5]),
        st.lists(st.sampled_from([0.25, 1.0, 2.0]), min_size=len(layers), max_size=len(layers)),
    ))
    return dict(
        pipeline=name,
        num_layers=num_layers,
        vace_layers=layers,
        dim=dim,
        ffn_dim=draw(st.sampled_from([dim, 2 * dim])),
        num_heads=num_heads,
        pixels=draw(st.sampled_from([(32, 32), (32, 48), (48, 48)])),
        chunks=draw(st.integers(1, 3)),
        steps=draw(st.integers(1, 2)),
        scale=scale,
        seed=draw(st.integers(0, 2**16)),
    )


def _build(pipeline, config: dict) -> torch.nn.Module:
    size = {**MODEL_SIZES["tiny"], "dim": config["dim"], "ffn_dim": config["ffn_dim"],
            "num_heads": config["num_heads"], "num_layers": config["num_layers"]}
    with mock.patch.dict(MODEL_SIZES, {SIZE: size}):
        return pipeline.build(SIZE, seed=config["seed"])


def _stream_settings(pipeline, config: dict) -> dict:
    height, width = config["pixels"]
    # Krea's blocks never roll their cache: 2-frame chunks keep three chunks inside 6 frames.
    # Elsewhere an 8-frame window is overflowed by the third 3-frame chunk.
    frames, window = (2, 6) if pipeline.name == "krea_realtime_video" else (3, 8)
    return dict(chunks=config["chunks"], frames_per_chunk=frames, local_attn_size=window, height=height,
                width=width, steps=tuple(pipeline.config.steps[: config["steps"]]))


def _contexts(settings_: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, VACE_IN_DIM, settings_["frames_per_chunk"], settings_["height"] // 8, settings_["width"] // 8)
    per_chunk = [torch.randn(shape, generator=gen) for _ in range(settings_["chunks"])]
    return lambda chunk: per_chunk[chunk]


def check_equivalence(config: dict) -> None:
    """Surgery vs reference on one configuration: every call's output and caches bit-equal."""
    pipeline = PIPELINES[config["pipeline"]]
    stream = _stream_settings(pipeline, config)
    base = _build(pipeline, config)
    args, kwargs = example_call(base, pipeline, height=stream["height"], width=stream["width"],
                                frames=stream["frames_per_chunk"], local_attn_size=stream["local_attn_size"])
    result = surgery.apply(base, vace.rule(vace_in_dim=VACE_IN_DIM, vace_layers=config["vace_layers"]),
                           example_inputs=(args, kwargs))
    reference = CausalVaceWanModel(_build(pipeline, config), vace_in_dim=VACE_IN_DIM,
                                   vace_layers=config["vace_layers"])

    weights = random_vace_state_dict(result.module, seed=config["seed"])
    # Both models must name exactly the same VACE tensors with the same shapes.
    ref_vace = {k: tuple(v.shape) for k, v in native_state_dict(reference).items() if k.startswith("vace_")}
    assert {k: tuple(v.shape) for k, v in weights.items()} == ref_vace
    outcome = result.module.load_state_dict(weights, strict=False)
    assert outcome.unexpected_keys == [] and not [k for k in outcome.missing_keys if k.startswith("vace_")]
    assert load_vace_state_dict(reference, weights) == []

    contexts = _contexts(stream, config["seed"] + 1)
    ours = run_stream(result.module, pipeline, seed=config["seed"], vace_context=contexts,
                      vace_context_scale=config["scale"], **stream)
    theirs = run_stream(reference, pipeline, seed=config["seed"], vace_context=contexts,
                        vace_context_scale=config["scale"], **stream)
    diffs = call_diffs(ours, theirs)
    assert max(diffs) == 0.0, f"surgery != reference for {config}: per-call max abs diff {diffs}"
    # The grafted branch is live: a non-zero hint changed the output relative to no context.
    assert any(not torch.equal(a.output, b.output) for a, b in zip(
        ours.calls, run_stream(result.module, pipeline, seed=config["seed"], snapshot=False, **stream).calls))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=SOAK == 0, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(config=configurations())
def test_surgery_equals_reference_on_random_configurations(config: dict) -> None:
    check_equivalence(config)


@pytest.mark.parametrize("config", [
    # Corners the random draws may miss in a short CI run: one block, every block hinted.
    dict(pipeline="memflow", num_layers=1, vace_layers=[0], dim=32, ffn_dim=32, num_heads=2,
         pixels=(32, 32), chunks=3, steps=1, scale=1.0, seed=1),
    dict(pipeline="krea_realtime_video", num_layers=6, vace_layers=[0, 1, 2, 3, 4, 5], dim=32, ffn_dim=64,
         num_heads=4, pixels=(32, 48), chunks=2, steps=1, scale=[0.25, 1.0, 2.0, 1.0, 0.25, 2.0], seed=2),
], ids=["one-block", "every-block"])
def test_surgery_equals_reference_on_corner_configurations(config: dict) -> None:
    check_equivalence(config)


# --- property: no sequence of calls and conversions touches the input model ----------------
#
# Random sequences of steps on a rewritten tiny LongLive: dtype conversions and requires_grad_
# of the rewritten model, valid calls (latent positional or as x=, VACE on or off, two
# resolutions, scalar or per-layer scales) and invalid calls (bad scales, bad contexts, a
# misspelt keyword, a latent the embedding cannot take). After every step the input model is
# unchanged (values, dtypes, requires_grad, Parameter identities); a valid call is bit-exact
# against the base model (VACE off) and against a fresh rewritten model (VACE on), both given
# the same conversions; an invalid call raises CallError and builds no graph.

SEQUENCE_EXAMPLES = max(1, SOAK // 10) if SOAK > 0 else 4
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64, "float32": torch.float32}
RESOLUTIONS = [(32, 32), (32, 48)]


def _ctx(height: int, width: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(1, VACE_IN_DIM, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality in which NaN equals NaN at the same place (a 1e300 scale overflows float64
    activations to NaN on both sides alike)."""
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0))


# name -> (rule inputs or a call change, whether it is refused for a model of this dtype)
BAD_STEPS = {
    "nan-scale": (dict(vace_context_scale=float("nan")), lambda dtype: True),
    "inf-scale-entry": (dict(vace_context_scale=[1.0, float("inf")]), lambda dtype: True),
    "1e39-scale": (dict(vace_context_scale=1e39), lambda dtype: torch.finfo(dtype).max < 1e39),
    "1e300-scale": (dict(vace_context_scale=1e300), lambda dtype: torch.finfo(dtype).max < 1e300),
    "channels-context": (dict(vace_context=lambda h, w: _ctx(h, w)[:, :48]), lambda dtype: True),
    "grid-context": (dict(vace_context=lambda h, w: _ctx(h * 2, w)), lambda dtype: True),
    "int-context": (dict(vace_context=lambda h, w: _ctx(h, w).long()), lambda dtype: True),
    "bool-context": (dict(vace_context=lambda h, w: _ctx(h, w) > 0), lambda dtype: True),
    "zero-frame-context": (dict(vace_context=lambda h, w: _ctx(h, w)[:, :, :0]), lambda dtype: True),
    "misspelt-keyword": (dict(vace_ctx=lambda h, w: _ctx(h, w)), lambda dtype: True),
    "channels-latent": (latent_change(lambda x: x[:, :3]), lambda dtype: True),
    "int-latent": (latent_change(lambda x: x.long()), lambda dtype: True),
}

STEPS = st.one_of(
    st.tuples(st.just("convert"), st.sampled_from(sorted(DTYPES))),
    st.tuples(st.just("requires_grad"), st.booleans()),
    st.tuples(st.just("call"), st.sampled_from(["positional", "keyword"]), st.booleans(), st.sampled_from(RESOLUTIONS),
              st.sampled_from([1.0, 0.5, (0.25, 2.0)])),
    st.tuples(st.just("bad"), st.sampled_from(sorted(BAD_STEPS)), st.sampled_from(["positional", "keyword"]),
              st.sampled_from(RESOLUTIONS)),
)


class Sequence_:
    """The input model, the rewritten model under test, and the two models it must agree with."""

    def __init__(self) -> None:
        self.pipeline = PIPELINES["longlive"]
        self.input = self.pipeline.build("tiny", seed=0)
        rule = vace.rule(vace_in_dim=VACE_IN_DIM)
        self.subject = surgery.apply(self.input, rule, example_inputs=example_call(self.input, self.pipeline)).module
        fresh_base = self.pipeline.build("tiny", seed=0)
        self.fresh = surgery.apply(fresh_base, rule, example_inputs=example_call(fresh_base, self.pipeline)).module
        weights = random_vace_state_dict(self.subject, seed=6)
        for model in (self.subject, self.fresh):
            model.load_state_dict(weights, strict=False)
        self.plain = self.pipeline.build("tiny", seed=0)
        self.record = InputRecord.take(self.input)
        self.dtype = torch.float32

    def call(self, model: torch.nn.Module, form: str, resolution: tuple[int, int], change=None,
             **rule_inputs) -> torch.Tensor:
        args, kwargs = example_call(model, self.pipeline, height=resolution[0], width=resolution[1], seed=8)
        if form == "keyword":
            args, kwargs = (), {"x": args[0], **kwargs}
        if change is not None:
            args, kwargs = change(args, kwargs)
        with torch.no_grad():
            return model(*args, **kwargs, **rule_inputs)

    def step(self, step: tuple) -> None:
        kind = step[0]
        if kind == "convert":
            self.dtype = DTYPES[step[1]]
            for model in (self.subject, self.fresh, self.plain):
                model.to(self.dtype)
        elif kind == "requires_grad":
            self.subject.requires_grad_(step[1])
        elif kind == "call":
            _, form, on, resolution, scale = step
            scale = list(scale) if isinstance(scale, tuple) else scale
            inputs = dict(vace_context=_ctx(*resolution), vace_context_scale=scale) if on else {}
            got = self.call(self.subject, form, resolution, **inputs)
            want = self.call(self.fresh if on else self.plain, "positional", resolution, **inputs)
            assert got.dtype == self.dtype and _bit_equal(got, want), \
                f"{step} differs from the {'fresh' if on else 'base'} model"
        else:
            _, name, form, resolution = step
            spec, refused = BAD_STEPS[name]
            change = spec if callable(spec) else None
            inputs = {} if callable(spec) else {k: (v(*resolution) if callable(v) else v) for k, v in spec.items()}
            if not any(k == "vace_context" for k in inputs) and not callable(spec):
                inputs.setdefault("vace_context", _ctx(*resolution))
            if not refused(self.dtype):  # a scale that is finite in this dtype: a valid call
                self.step(("call", form, True, resolution, inputs["vace_context_scale"]))
                return
            built = self.subject.surgery_state.built
            with pytest.raises(CallError):
                self.call(self.subject, form, resolution, change, **inputs)
            assert self.subject.surgery_state.built == built, f"{step} built a graph before it was refused"
        self.record.assert_unchanged(self.input)


@settings(max_examples=SEQUENCE_EXAMPLES, deadline=None, derandomize=SOAK == 0, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEPS, min_size=3, max_size=7))
def test_no_sequence_of_calls_and_conversions_touches_the_input(steps: list) -> None:
    sequence = Sequence_()
    for step in steps:
        sequence.step(step)


@pytest.mark.parametrize("steps", [
    # Every conversion, both call forms, every bad input, once each: what a short CI run may not draw.
    [("convert", "float64"), ("call", "keyword", True, (32, 48), (0.25, 2.0)), ("bad", "1e300-scale", "positional", (32, 32)),
     ("bad", "1e39-scale", "keyword", (32, 32)), ("convert", "float16"), ("bad", "1e39-scale", "keyword", (32, 32)),
     ("requires_grad", False), ("call", "positional", False, (32, 32), 1.0), ("convert", "bfloat16"),
     ("call", "keyword", True, (32, 32), 0.5)]
    + [("bad", name, form, (32, 48)) for name in sorted(BAD_STEPS) for form in ("positional", "keyword")]
    + [("convert", "float32"), ("call", "keyword", False, (32, 48), 1.0), ("call", "positional", True, (32, 32), 1.0)],
], ids=["every-step"])
def test_every_step_kind_once(steps: list) -> None:
    sequence = Sequence_()
    for step in steps:
        sequence.step(step)

