"""Every call form is checked before anything is traced or run (docs/errors.md, "Call checks").

The rule's checks (``vace_context`` against the latent, ``vace_context_scale``) must run
whether the latent is passed positionally or as ``x=``, through a PEFT wrapper, and after a
re-specialisation; the base model's own arguments (unknown keyword, missing argument, the
latent's channels and dtype, ``meta`` tensors) are checked first, so a bad call never reaches
a trace error that talks about leaves. Malformed ``surgery.apply`` arguments are refused
before anything runs.

Each refused call must: raise the named ``SurgeryError`` subclass with a one-line message
(problem, ``; fix: ``, fix), build no specialisation, leave the caches it was given as they
were, and leave the input model exactly as it was.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import pytest
import torch
from torch import nn

import surgery
from examples import PIPELINES
from examples.driver import example_call, snapshot_caches
from examples.reference import random_vace_state_dict
from rules import RULES, vace
from surgery.entry import EntryPoint
from surgery.errors import ArgumentError, CallError, SurgeryError
from test_errors import ModelSnapshot, base_output, one_line
from test_identity import InputRecord

NAME = "longlive"
LATENT = "(1, 16, 3, 4, 4)"
CACHE_KEYS = ("kv_cache", "crossattn_cache", "kv_bank")


class Setup(types.SimpleNamespace):
    pipeline: Any
    base: nn.Module
    record: InputRecord
    module: nn.Module


def _setup(pipeline_name: str = NAME) -> Setup:
    pipeline = PIPELINES[pipeline_name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    result.module.load_state_dict(random_vace_state_dict(result.module, seed=2), strict=False)
    return Setup(pipeline=pipeline, base=base, record=InputRecord.take(base), module=result.module)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return _setup()


def ctx(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    shape = shape or (1, 96, 3, 4, 4)
    return torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype=dtype, device=device)


def keyword_form(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The same call with the latent passed as ``x=``."""
    return (), {"x": args[0], **kwargs}


FORMS: dict[str, Callable[[tuple, dict], tuple[tuple, dict]]] = {
    "positional": lambda args, kwargs: (args, kwargs),
    "keyword": keyword_form,
}


def refused(s: Setup, error: type, *, form: str = "positional", module: nn.Module | None = None,
            change: Callable[[tuple, dict], tuple[tuple, dict]] | None = None, **rule_inputs: Any) -> str:
    """Make a call that must be refused; check nothing happened; return the one-line message."""
    module = s.module if module is None else module
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    args, kwargs = FORMS[form](*example_call(inner, s.pipeline, seed=4))
    if change is not None:
        args, kwargs = change(args, kwargs)
    caches = {k: kwargs[k] for k in CACHE_KEYS if k in kwargs}
    before = snapshot_caches(caches)
    state = inner.surgery_state
    built = state.built
    with pytest.raises(error) as info, torch.no_grad():
        module(*args, **kwargs, **rule_inputs)
    assert isinstance(info.value, SurgeryError)
    assert snapshot_caches(caches).keys() == before.keys()
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in _leaves(snapshot_caches(caches), before))
    assert state.built == built, "a refused call built a specialisation"
    s.record.assert_unchanged(s.base)
    message = one_line(info.value)
    assert "; fix: " in message, message
    return message


def _leaves(a: Any, b: Any):
    if isinstance(a, dict):
        for k in a:
            yield from _leaves(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            yield from _leaves(x, y)
    else:
        yield a, b


def call(module: nn.Module, s: Setup, form: str = "positional", seed: int = 4, **rule_inputs: Any) -> torch.Tensor:
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    args, kwargs = FORMS[form](*example_call(inner, s.pipeline, seed=seed))
    with torch.no_grad():
        return module(*args, **kwargs, **rule_inputs)


# --- the rule's checks on every call form -------------------------------------------------

BAD_CONTEXTS = {
    "channels": (lambda: ctx(1, 48, 3, 4, 4), "of shape (48, 3, 4, 4) does not fit the latent of shape " + LATENT),
    "grid": (lambda: ctx(1, 96, 3, 8, 4), "expected 96 channels and a 4x4 grid"),
    "batch": (lambda: ctx(2, 96, 3, 4, 4), "2 entries for a batch of 1"),
    "unbatched": (lambda: ctx(96, 3, 4, 4), "expected a batched [1, 96, F, 4, 4] tensor"),
    "int": (lambda: ctx(dtype=torch.int64), "vace_context[0] has dtype torch.int64, expected a floating-point tensor"),
    "bool": (lambda: ctx(dtype=torch.bool), "vace_context[0] has dtype torch.bool, expected a floating-point tensor"),
    "zero-frames": (lambda: ctx(1, 96, 0, 4, 4), "vace_context[0] of shape (96, 0, 4, 4) has 0 frames"),
    "empty-list": (lambda: [], "vace_context is empty"),
    "meta": (lambda: ctx(device="meta"), "input 'vace_context' is on the meta device but the model's weights are on cpu"),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(BAD_CONTEXTS))
def test_bad_vace_context_is_refused_in_every_call_form(case, form, setup):
    make, needle = BAD_CONTEXTS[case]
    message = refused(setup, CallError, form=form, vace_context=make())
    assert needle in message, message


BAD_SCALES = {
    "nan": (float("nan"), "is not all finite numbers"),
    "inf": (float("inf"), "is not all finite numbers"),
    "minus-inf-entry": ([1.0, float("-inf")], "is not all finite numbers"),
    "1e300": (1e300, "is not all finite numbers in the model's dtype torch.float32 (largest 3.40282e+38)"),
    "minus-1e300-entry": ([1.0, -1e300], "is not all finite numbers in the model's dtype torch.float32"),
    "1e39": (1e39, "in the model's dtype torch.float32"),
    "huge-int": (10**400, "is not all finite numbers"),
    "tensor-inf": (torch.tensor([1.0, float("inf")]), "is not all finite numbers"),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_scales_must_be_finite_in_the_model_dtype(case, form, setup):
    scale, needle = BAD_SCALES[case]
    message = refused(setup, CallError, form=form, vace_context=ctx(), vace_context_scale=scale)
    assert needle in message, message
    # Checked without a context too: a bad scale fails on the first call, not later.
    assert needle in refused(setup, CallError, form=form, vace_context_scale=scale)


def test_scale_limit_follows_the_model_dtype():
    assert vace.normalise_scale(1e300, 2, torch.float64) == (1e300, 1e300)
    assert vace.normalise_scale(60000.0, 1, torch.float16) == (60000.0,)
    with pytest.raises(CallError, match="torch.float16 \\(largest 65504\\)"):
        vace.normalise_scale(70000.0, 1, torch.float16)
    with pytest.raises(CallError, match="torch.bfloat16"):
        vace.normalise_scale([1.0, 1e39], 2, torch.bfloat16)


def test_keyword_and_positional_calls_agree_bit_for_bit(setup):
    on_positional = call(setup.module, setup, "positional", vace_context=ctx())
    on_keyword = call(setup.module, setup, "keyword", vace_context=ctx())
    assert torch.equal(on_positional, on_keyword)
    off = call(setup.module, setup, "keyword")
    assert torch.equal(off, call(setup.base, setup, "keyword"))
    assert not torch.equal(off, on_keyword)  # the branch is live, so the comparison above means something
    setup.record = InputRecord.take(setup.base)  # the base calls ran its pipeline setup (attributes)


# --- the base entry point's own arguments -------------------------------------------------


def test_misspelt_keyword_names_it_and_the_accepted_ones(setup):
    for form in FORMS:
        message = refused(setup, CallError, form=form, vace_ctx=ctx())
        assert "unknown keyword argument 'vace_ctx'" in message and "did you mean 'vace_context'?" in message
        accepted = message.split("it accepts ")[1].split(";")[0].split(", ")
        assert {"x", "t", "context", "seq_len", "kv_cache", "vace_context", "vace_context_scale"} <= set(accepted)
    message = refused(setup, CallError, change=lambda a, k: (a, {**k, "kv_cahce": k["kv_cache"]}))
    assert "unknown keyword argument 'kv_cahce'" in message and "did you mean 'kv_cache'?" in message


def test_a_call_that_fits_no_signature_is_refused(setup):
    message = refused(setup, CallError, change=lambda a, k: (a, {n: v for n, v in k.items() if n != "t"}))
    assert "fits no signature of CausalWanModel.forward" in message and "missing a required argument: 't'" in message


def latent_change(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[tuple, dict], tuple[tuple, dict]]:
    """Apply ``change`` to the latent, wherever the call passes it."""
    def swap(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (change(args[0]),), kwargs
        return args, {**kwargs, "x": change(kwargs["x"])}
    return swap


LATENTS = {
    "channels": (lambda x: x[:, :3], "the latent 'x' of shape (1, 3, 3, 4, 4) has 3 channels on dimension 1, "
                                     "but patch_embedding takes 16"),
    "int": (lambda x: x.long(), "the latent 'x' has dtype torch.int64"),
    "meta": (lambda x: x.to("meta"), "is on the meta device but the model's weights are on cpu"),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(LATENTS))
def test_a_latent_the_embedding_cannot_take_is_refused(case, form, setup):
    change, needle = LATENTS[case]
    message = refused(setup, CallError, form=form, change=latent_change(change))
    assert needle in message, message
    if case == "meta":
        assert ("positional argument 0" if form == "positional" else "input 'x'") in message


# --- through PEFT, and after a re-specialisation -----------------------------------------


def test_checks_run_through_a_peft_wrapper():
    peft = pytest.importorskip("peft")
    s = _setup()
    expected = call(s.module, s, vace_context=ctx())
    # The patch embedding is wrapped too: the latent check reads its channels from base_layer.
    wrapped = peft.get_peft_model(s.module, peft.LoraConfig(r=2, target_modules=["blocks.0.self_attn.q", "ffn.0",
                                                                                  "patch_embedding"]))
    assert type(s.module.patch_embedding).__module__.startswith("peft.")
    for form in FORMS:
        assert "but patch_embedding takes 16" in refused(s, CallError, form=form, module=wrapped,
                                                         change=latent_change(lambda x: x[:, :3]))
        assert "does not fit the latent" in refused(s, CallError, form=form, module=wrapped, vace_context=ctx(1, 48, 3, 4, 4))
        assert "unknown keyword argument 'vace_ctx'" in refused(s, CallError, form=form, module=wrapped, vace_ctx=ctx())
        assert "in the model's dtype" in refused(s, CallError, form=form, module=wrapped, vace_context=ctx(),
                                                 vace_context_scale=1e300)
        # LoRA B starts at zero: a valid call still gives the rewritten model's output.
        assert torch.equal(call(wrapped, s, form, vace_context=ctx()), expected)


def test_checks_run_after_a_re_specialisation(setup):
    s = setup
    state = s.module.surgery_state
    for form in FORMS:
        args, kwargs = FORMS[form](*example_call(s.module, s.pipeline, height=48, width=64, seed=3))
        with torch.no_grad():
            s.module(*args, **kwargs, vace_context=ctx(1, 96, 3, 6, 8))
        assert state.last_dispatch[0] in ("specialised", "rechecked")

        def at_new_size(a: tuple, k: dict) -> tuple[tuple, dict]:
            return FORMS[form](*example_call(s.module, s.pipeline, height=48, width=64, seed=5))

        message = refused(s, CallError, change=at_new_size, vace_context=ctx(1, 96, 3, 4, 4))
        assert "does not fit the latent of shape (1, 16, 3, 6, 8)" in message, message
        assert "in the model's dtype" in refused(s, CallError, change=at_new_size, vace_context=ctx(1, 96, 3, 6, 8),
                                                 vace_context_scale=[1.0, 1e300])


# --- malformed surgery.apply arguments -----------------------------------------------------


def _meta_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    cache = [dict(entry) for entry in kwargs["kv_cache"]]
    cache[1]["k"] = cache[1]["k"].to("meta")
    return args, {**kwargs, "kv_cache": cache}


APPLY_CASES: dict[str, tuple[Callable[[Any, tuple, dict], dict], str]] = {
    "example-inputs-none": (lambda m, a, k: dict(example_inputs=None),
                            "example_inputs must be a pair (args, kwargs), got None"),
    "example-inputs-args-only": (lambda m, a, k: dict(example_inputs=a), "example_inputs must be a pair"),
    "example-inputs-kwargs-not-a-dict": (lambda m, a, k: dict(example_inputs=(a, list(k.items()))),
                                         "example_inputs must be (args tuple, kwargs dict), got (tuple, list)"),
    "rule-name": (lambda m, a, k: dict(rule="vace"), "rule must be a surgery.Rule, got the name 'vace'"),
    "rule-factory-uncalled": (lambda m, a, k: dict(rule=vace.rule),
                              "got the uncalled factory rules.vace.rule; fix: call it: rules.vace.rule(...)"),
    "registry-factory-uncalled": (lambda m, a, k: dict(rule=RULES["vace"]), "got the uncalled factory rules.vace.rule"),
    "rule-none": (lambda m, a, k: dict(rule=None), "rule must be a surgery.Rule, got NoneType"),
    "meta-latent": (lambda m, a, k: dict(example_inputs=((a[0].to("meta"),), k)),
                    "example_inputs args[0] is on the meta device but the model's weights are on cpu"),
    "meta-cache-entry": (lambda m, a, k: dict(example_inputs=_meta_cache(a, k)),
                         "example_inputs kwargs['kv_cache'][1]['k'] is on the meta device"),
    "graft-init-unknown": (lambda m, a, k: dict(graft_init="random"),
                           "graft_init must be one of 'zeros', 'default', got 'random'"),
    "graft-init-none": (lambda m, a, k: dict(graft_init=None), "graft_init must be one of"),
    "dry-run-string": (lambda m, a, k: dict(dry_run="yes"), "dry_run must be True or False, got 'yes'"),
    "model-state-dict": (lambda m, a, k: dict(model=m.state_dict()),
                         "model must be a torch.nn.Module, got OrderedDict"),
    "misspelt-example-keyword": (lambda m, a, k: dict(example_inputs=(a, {**k, "kv_cahce": k["kv_cache"]})),
                                 "example_inputs do not fit the model: CausalWanModel.forward() got an unknown "
                                 "keyword argument 'kv_cahce'"),
}


@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_malformed_apply_arguments_are_refused_before_anything_runs(case):
    pipeline = PIPELINES[NAME]
    model = pipeline.build("tiny", seed=0)
    args, kwargs = example_call(model, pipeline)
    run = base_output(pipeline)
    before = InputRecord.take(model, run)
    call_kwargs = dict(model=model, rule=vace.rule(), example_inputs=(args, kwargs))
    make, needle = APPLY_CASES[case]
    call_kwargs.update(make(model, args, kwargs))
    with pytest.raises(ArgumentError) as info:
        surgery.apply(call_kwargs.pop("model"), call_kwargs.pop("rule"), **call_kwargs)
    message = one_line(info.value)
    assert needle in message and "; fix: " in message, message
    before.assert_unchanged(model, run)


# --- how calls bind to the base entry point ------------------------------------------------


class Direct(nn.Module):
    def forward(self, x, t, scale=1.0):
        return x


class Delegating(nn.Module):
    def forward(self, *args, **kwargs):
        if kwargs.pop("train", False):
            return self._train(*args, **kwargs)
        return self._infer(*args, **kwargs)

    def _infer(self, x, t, cache=None):
        return x

    def _train(self, x, t, target=None):
        return x


class Open(nn.Module):
    def forward(self, *args, **kwargs):
        options = dict(kwargs)  # used in a way no reader can follow
        return self._infer(*args, **options)

    def _infer(self, x, t):
        return x


def test_entry_points_bind_by_signature_or_pass_through():
    direct = EntryPoint.of(Direct)
    assert direct.accepted == ("x", "t", "scale") and not direct.open
    assert direct.form(1, ("t",)) == {"x": "arg0", "t": "t"}
    assert direct.form(0, ("t", "x")) == {"t": "t", "x": "x"}
    delegating = EntryPoint.of(Delegating)
    assert delegating.accepted == ("x", "t", "cache", "target", "train") and not delegating.open
    assert delegating.form(1, ("cache", "t")) == {"x": "arg0", "t": "t", "cache": "cache"}
    with pytest.raises(CallError, match="fits no signature of Delegating.forward: .*_infer.*_train"):
        delegating.form(1, ("cache", "t", "target"))
    with pytest.raises(CallError, match="unknown keyword argument 'cahce'.*did you mean 'cache'"):
        delegating.form(1, ("cahce", "t"))
    opened = EntryPoint.of(Open)
    assert opened.open and opened.form(0, ("anything", "x")) == {"anything": "anything", "x": "x"}
