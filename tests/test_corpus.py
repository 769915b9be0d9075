"""The unchanged VACE rule on a corpus of models written the way real projects write them.

Each corpus model (tests/corpus/) traces, matches and grafts with ``rules.vace.rule``
as is, and streams bit for bit like the same model with VACE added by hand through hooks
(tests/corpus/handwritten.py), with identical non-zero VACE weights, over several chunks
with caches. Tracing never touches the caller's model or caches, even when apply fails.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
from typing import Any

import pytest
import torch
import torch.nn as nn

import surgery
from corpus import Family, object_store
from corpus.handwritten import HookedVace, random_vace_weights
from examples import PIPELINES
from examples.driver import example_call
from examples.reference import CausalVaceWanModel, load_vace_state_dict, random_vace_state_dict
from rules import vace
from surgery.errors import MatchError, TraceError
from test_errors import DataDependentFFN as ClampingFFN

CORPUS = ["diffusers_fork", "dataclass_fork", "odd_names", "object_store"]
VACE_IN_DIM = 8
CHUNKS = 3


def corpus(name: str) -> Family:
    return importlib.import_module(f"corpus.{name}").FAMILY


def _context(seed: int, frames: int = 2) -> torch.Tensor:
    return torch.randn(1, VACE_IN_DIM, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


def _stream(model: nn.Module, family: Any, **vace_inputs: Any) -> tuple[list[torch.Tensor], Any]:
    """Outputs of CHUNKS streaming calls on fresh caches, and the caches afterwards."""
    cache = family.new_cache(model)
    generator = torch.Generator().manual_seed(5)
    outputs = []
    with torch.no_grad():
        for chunk in range(CHUNKS):
            args, kwargs = family.call(model, cache, chunk, generator)
            outputs.append(family.output_of(model(*args, **kwargs, **vace_inputs)).clone())
    return outputs, cache


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _contents(value: Any, path: str = "") -> list[tuple[str, type, Any]]:
    """Everything inside a cache: (path, type, tensor copy or scalar), objects by their attributes."""
    if isinstance(value, torch.Tensor):
        return [(path, torch.Tensor, value.detach().clone())]
    if isinstance(value, (bool, int, float, str, type(None))):
        return [(path, type(value), value)]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        items = sorted(vars(value).items())
    found = [(path, type(value), len(items))]
    for key, item in items:
        found += _contents(item, f"{path}/{key}")
    return found


def _identities(value: Any, path: str = "") -> list[tuple[str, int]]:
    """The identity of every object inside a cache, by path."""
    found = [(path, id(value))]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    elif isinstance(value, (torch.Tensor, bool, int, float, str, type(None))):
        items = []
    else:
        items = sorted(vars(value).items())
    for key, item in items:
        found += _identities(item, f"{path}/{key}")
    return found


def _same_contents(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        pa == pb and ta is tb and (torch.equal(va, vb) if ta is torch.Tensor else va == vb)
        for (pa, ta, va), (pb, tb, vb) in zip(a, b))


def _model_state(model: nn.Module) -> tuple:
    tensors = [(name, id(t), t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()]
    tree = [(name, id(module), type(module), sorted(k for k in vars(module) if not k.startswith("_")))
            for name, module in model.named_modules()]
    return tensors, tree


def _same_model(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(
        na == nb and ia == ib and torch.equal(ta, tb) for (na, ia, ta), (nb, ib, tb) in zip(a[0], b[0]))


def _apply(family: Any, **options: Any) -> tuple[nn.Module, Any]:
    base = family.build(0)
    cache = family.new_cache(base)
    example = family.call(base, cache, 0, torch.Generator().manual_seed(5))
    return base, surgery.apply(base, vace.rule(vace_in_dim=VACE_IN_DIM, **options), example_inputs=example)


def _projections(model: nn.Module, family: Any) -> tuple[str, str]:
    """The names the rule gave VACE block 0's input projection and every block's hint projection."""
    own = set(family.vace_block()._modules)
    first = set(model.vace_blocks[0]._modules) - own
    after = set(model.vace_blocks[-1]._modules) - own
    assert len(model.vace_blocks) > 1 and len(first) == 2 and len(after) == 1, (first, after)
    return (first - after).pop(), after.pop()


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_model_streams_like_hand_written_vace(name):
    family = corpus(name)
    base, result = _apply(family, vace_layers=[0, 2])
    model = result.module
    layers = [m.position for m in result.matches if m.index is not None]
    hand_base = family.build(0)
    blocks = family.blocks_of(hand_base)
    hand = HookedVace(hand_base, blocks, family.embedding_of(hand_base), family.vace_block, family.vace_block_call,
                      VACE_IN_DIM, layers, _projections(model, family))
    weights = random_vace_weights(hand, seed=3)
    hand.load_state_dict(weights, strict=False)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not any(k.startswith("vace_") for k in missing)
    assert sorted(k for k in model.state_dict() if k.startswith("vace_")) == sorted(weights)

    context = _context(11)
    context_name, scale_name = result.rule.inputs  # a family's profile may name them its own way
    ours, our_cache = _stream(model, family, **{context_name: context, scale_name: 0.75})
    theirs, their_cache = _stream(hand, family, vace_context=context, vace_context_scale=0.75)
    assert _max_diff(ours, theirs) == 0.0
    assert _same_contents(_contents(our_cache), _contents(their_cache))
    plain, plain_cache = _stream(base, family)
    assert _max_diff(ours, plain) > 0.0  # the branch really runs
    off, off_cache = _stream(model, family)
    assert _max_diff(off, plain) == 0.0  # vace_context=None is the base model
    assert _same_contents(_contents(off_cache), _contents(plain_cache))


@pytest.mark.parametrize("name", CORPUS)
def test_tracing_never_touches_the_callers_model_or_caches(name):
    family = corpus(name)
    model = family.build(0)
    cache = family.new_cache(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a cache in mid-stream, as a host holds it
        model(*family.call(model, cache, 0, generator)[0], **family.call(model, cache, 0, generator)[1])
    example = family.call(model, cache, 1, generator)
    contents, identities, state = _contents(example), _identities(example), _model_state(model)

    surgery.apply(model, vace.rule(vace_in_dim=VACE_IN_DIM, vace_layers=[0, 1]), example_inputs=example)
    assert _identities(example) == identities and _same_contents(_contents(example), contents)
    assert _same_model(_model_state(model), state)

    # A failed apply (the count is checked after the whole trace ran) leaves them alone too.
    with pytest.raises(MatchError):
        surgery.apply(model, vace.rule(vace_in_dim=VACE_IN_DIM, num_layers=7, vace_layers=[0]), example_inputs=example)
    assert _identities(example) == identities and _same_contents(_contents(example), contents)
    assert _same_model(_model_state(model), state)


@pytest.mark.parametrize("name", ["dataclass_fork", "odd_names"])  # neither declares a block count
def test_model_without_num_layers_gets_a_hint_every_second_matched_block(name):
    family = corpus(name)
    _, result = _apply(family)
    count = len(family.blocks_of(result.module))
    assert [m.position for m in result.matches] == list(range(count))
    assert [m.index for m in result.matches] == [k // 2 if k % 2 == 0 else None for k in range(count)]
    assert len(result.module.vace_blocks) == (count + 1) // 2


# --- signatures hosts can read (#11 item 4) -------------------------------------------------

#: What scope's generator passes besides the example call's own keywords (pipelines spec 8.3).
GENERATOR_KWARGS = {"kv_bank": None, "update_bank": False, "q_bank": False, "update_cache": False,
                    "is_recache": False, "current_end": None, "cache_start": None, "kv_cache_attention_bias": 1.0,
                    "sink_recache_after_switch": False}


def scope_call_model(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """scope's ``WanDiffusionWrapper._call_model`` (pipelines spec 8.2): keywords that
    ``model._forward_inference`` does not list are dropped unless it takes ``**kwargs``."""
    params = inspect.signature(model._forward_inference).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return model(*args, **kwargs)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_host_that_filters_keywords_by_signature_passes_vace_inputs(name):
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=64, width=64))
    model = result.module
    for method in ("forward", "_forward_inference"):
        params = inspect.signature(getattr(model, method)).parameters
        assert params["vace_context"].kind is inspect.Parameter.KEYWORD_ONLY and params["vace_context"].default is None
        assert params["vace_context_scale"].kind is inspect.Parameter.KEYWORD_ONLY
    reference = CausalVaceWanModel(pipeline.build("tiny", seed=0))
    weights = random_vace_state_dict(reference, seed=3)
    load_vace_state_dict(reference, weights)
    model.load_state_dict(weights, strict=False)
    context = torch.randn(1, 96, pipeline.config.num_frame_per_block, 8, 8, generator=torch.Generator().manual_seed(1))

    def host(target: nn.Module, call: Any = scope_call_model) -> torch.Tensor:
        args, kwargs = example_call(target, pipeline, height=64, width=64)  # fresh caches for each model
        kwargs = {**GENERATOR_KWARGS, **kwargs, "vace_context": context, "vace_context_scale": 0.5}
        with torch.no_grad():
            return call(target, *args, **kwargs)

    ours, theirs, plain = host(model), host(reference), host(base)
    assert float((ours - theirs).abs().max()) == 0.0
    assert float((ours - plain).abs().max()) > 0.0  # VACE is on
    # The entry method itself runs through surgery, traced from that method.
    direct = host(model, lambda target, *a, **k: target._forward_inference(
        *a, **{n: v for n, v in k.items() if n in inspect.signature(target._forward_inference).parameters}))
    assert float((direct - theirs).abs().max()) == 0.0
    assert {spec.entry for spec in model.surgery_state.specialisations.values()} >= {"forward", "_forward_inference"}


# --- every error's fix is right (#11 item 5) --------------------------------------------------
#
# Each class of TraceError / MatchError the engine raises, on a corpus model: the message names
# the construct and the place, and the fix it suggests is applied here and works; where the
# cause cannot be known, the message says so and where to look.

class ClampingFFNFixed(ClampingFFN):
    """The fix the message asks for: the same computation as tensor operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.where(x.abs().amax() > 1e4, x.clamp(-1e4, 1e4), x))


class GainFromContext(nn.Module):
    """A cross-attention leaf (it takes the cache) that turns a tensor into a Python float."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, context: torch.Tensor, crossattn_cache: Any = None) -> torch.Tensor:
        gain = float(context.std())
        return self.inner(x, context, crossattn_cache=crossattn_cache) * gain


class GainFromContextFixed(GainFromContext):
    def forward(self, x: torch.Tensor, context: torch.Tensor, crossattn_cache: Any = None) -> torch.Tensor:
        return self.inner(x, context, crossattn_cache=crossattn_cache) * context.std()


class NumpyCrossAttention(object_store.CrossAttention):
    """A cross-attention (a leaf: it takes the cache) that leaves torch for numpy, which
    tracing without values cannot run."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, crossattn_cache: Any = None) -> torch.Tensor:
        gain = torch.from_numpy(context.detach().numpy().std(keepdims=True))
        return super().forward(x, context, crossattn_cache) * gain


class TypeCheckedNorm(nn.Module):
    """A norm that asserts it got a tensor (a tracer's proxy is not one)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(x, torch.Tensor), "expects a tensor"
        return self.inner(x)


class CheckedBlock(object_store.Block):
    """A block that checks its cache's fill level in its own code (a real integer cache value)."""

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, kv: Any = None,
                crossattn_cache: Any = None) -> torch.Tensor:
        if kv is not None and int(kv.size) + x.shape[1] > kv.k.shape[1]:
            raise RuntimeError("the stream is longer than the cache")
        return super().forward(x, e, context, kv, crossattn_cache)


class RoomCheck(nn.Module):
    """The fix: the check in a submodule of its own."""

    def forward(self, tokens: int, kv: Any) -> None:
        if int(kv.size) + tokens > kv.k.shape[1]:
            raise RuntimeError("the stream is longer than the cache")


class CheckedBlockFixed(object_store.Block):
    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__(dim, heads, ffn_dim)
        self.room = RoomCheck()

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, kv: Any = None,
                crossattn_cache: Any = None) -> torch.Tensor:
        if kv is not None:
            self.room(x.shape[1], kv)
        return super().forward(x, e, context, kv, crossattn_cache)


def _blocks_of(cls: type) -> Any:
    """Replace every block by an instance of ``cls`` holding the same weights."""
    def change(model: nn.Module) -> None:
        blocks = nn.ModuleList()
        for block in model.layers:
            new = cls(block.dim, block.heads, block.ffn_dim)
            new.load_state_dict(block.state_dict(), strict=False)
            blocks.append(new)
        model.layers = blocks
    return change


class SigmaBranching(nn.Module):
    """Top-level code that branches on an input tensor's value."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.num_layers = inner, inner.num_layers

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, prompt: list, **kwargs: Any) -> torch.Tensor:
        if float(sigma.max()) < 0.5:
            latents = latents * 0.5
        return self.inner(latents, sigma, prompt, **kwargs)


class SigmaGiven(SigmaBranching):
    """The fix: the caller computes the value and passes it as a Python number."""

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, prompt: list, low_noise: bool = False,
                **kwargs: Any) -> torch.Tensor:
        if low_noise:
            latents = latents * 0.5
        return self.inner(latents, sigma, prompt, **kwargs)


class AssertsTopLevel(SigmaBranching):
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, prompt: list, **kwargs: Any) -> torch.Tensor:
        assert type(latents) is torch.Tensor, "a plain tensor please"
        return self.inner(latents, sigma, prompt, **kwargs)


STORE = "object_store"


def _store_model(change: Any = None) -> nn.Module:
    model = corpus(STORE).build(0)
    if change is not None:
        change(model)
    return model


def _fails(model: nn.Module, error: type, rule: Any = None, family: Any = None) -> str:
    family = family or corpus(STORE)
    example = family.call(model, family.new_cache(model), 0, torch.Generator().manual_seed(5))
    with pytest.raises(error) as info:
        surgery.apply(model, rule or vace.rule(vace_in_dim=VACE_IN_DIM), example_inputs=example)
    message = str(info.value)
    assert "\n" not in message and "; fix: " in message
    return message


def _works(model: nn.Module, rule: Any = None, family: Any = None) -> None:
    """The fixed apply succeeds, VACE off is the model itself and VACE on changes its output."""
    family = family or corpus(STORE)
    rule = rule or vace.rule(vace_in_dim=VACE_IN_DIM)
    example = family.call(model, family.new_cache(model), 0, torch.Generator().manual_seed(5))
    rewritten = surgery.apply(model, rule, example_inputs=example).module
    rewritten.load_state_dict(random_vace_weights(rewritten, seed=3), strict=False)
    plain, _ = _stream(model, family)
    assert _max_diff(_stream(rewritten, family)[0], plain) == 0.0
    assert _max_diff(_stream(rewritten, family, vace_context=_context(11))[0], plain) > 0.0


def _suggested_leaves(message: str) -> list[str]:
    found = re.search(r"with_leaves\(([^)]*)\)", message)
    assert found, message
    return re.findall(r"'([^']+)'", found.group(1))


def _with_leaves(names: list[str]) -> Any:
    rule = vace.rule(vace_in_dim=VACE_IN_DIM)
    return dataclasses.replace(rule, trace_policy=rule.trace_policy.with_leaves(*names))


def _line(cls: type, needle: str) -> str:
    lines, start = inspect.getsourcelines(cls.forward)
    index = next(i for i, line in enumerate(lines) if needle in line)
    return f"{os.path.basename(inspect.getsourcefile(cls))}:{start + index}"


VALUES_FIX = "express it with tensor operations"


@pytest.mark.parametrize("where, wrapper, fixed, needle", [
    ("layers.1.ffn", ClampingFFN, ClampingFFNFixed, "if x.abs().amax()"),
    ("layers.0.cross_attn", GainFromContext, GainFromContextFixed, "gain = float("),
])
def test_reading_activation_values_asks_for_tensor_operations_and_that_works(where, wrapper, fixed, needle):
    layer, name = where.split(".")[1], where.split(".")[2]
    model = _store_model(lambda m: setattr(m.layers[int(layer)], name, wrapper(getattr(m.layers[int(layer)], name))))
    message = _fails(model, TraceError)
    assert f"`{needle}" in message and _line(wrapper, needle) in message and f"`{where}`" in message
    assert VALUES_FIX in message and "with_leaves" not in message  # a leaf would not have the values either
    target = getattr(model.layers[int(layer)], name)
    setattr(model.layers[int(layer)], name, fixed(target.inner))
    _works(model)


def test_top_level_code_reading_a_value_asks_for_a_number_and_that_works():
    message = _fails(SigmaBranching(corpus(STORE).build(0)), TraceError)
    assert "top-level code" in message and "pass it in as a Python number" in message
    assert _line(SigmaBranching, "if float(sigma.max())") in message
    family = corpus(STORE)
    outputs = []
    for low_noise in (False, True):
        def call(model: nn.Module, cache: Any, chunk: int, generator: torch.Generator, flag: bool = low_noise):
            args, kwargs = family.call(model, cache, chunk, generator)
            return args, {**kwargs, "low_noise": flag}
        given = dataclasses.replace(family, call=call)
        fixed = SigmaGiven(family.build(0))
        _works(fixed, family=given)
        outputs.append(_stream(fixed, given)[0])
    assert _max_diff(*outputs) > 0.0  # the number really selects the branch


def test_untraceable_construct_in_a_submodule_names_it_and_making_it_a_leaf_works():
    model = _store_model(lambda m: setattr(m.layers[1], "norm3", TypeCheckedNorm(m.layers[1].norm3)))
    message = _fails(model, TraceError)
    assert "`assert isinstance" in message and _line(TypeCheckedNorm, "assert isinstance") in message
    assert _suggested_leaves(message) == ["layers.1.norm3"]
    _works(model, _with_leaves(_suggested_leaves(message)))


def test_cache_value_read_in_a_block_moves_into_a_submodule_and_that_works():
    model = _store_model(_blocks_of(CheckedBlock))
    message = _fails(model, TraceError)
    assert "data-dependent control flow" in message and _line(CheckedBlock, "int(kv.size)") in message
    assert _suggested_leaves(message) == ["layers.0"]
    # A block is what the rule matches: as a leaf it cannot match...
    assert "move the construct into a submodule of its own and make that the leaf" in message
    _fails(model, MatchError, _with_leaves(["layers.*"]))
    # ...so the check moves into a submodule of its own (handed the cache, it runs eagerly by itself).
    fixed = _store_model(_blocks_of(CheckedBlockFixed))
    _works(fixed)
    _works(fixed, _with_leaves(["layers.*.room"]))


def test_failure_inside_a_leaf_says_the_cause_is_unknown_and_where_to_look():
    def change(model: nn.Module) -> None:
        for layer in model.layers:
            numpy_attention = NumpyCrossAttention(layer.dim, layer.heads)
            numpy_attention.load_state_dict(layer.cross_attn.state_dict())
            layer.cross_attn = numpy_attention
    message = _fails(_store_model(change), TraceError)
    assert "inside `layers.0.cross_attn`, which runs eagerly as a leaf" in message
    assert "cause is unknown" in message and "look at " in message
    assert _line(NumpyCrossAttention, "gain = torch.from_numpy") in message.split("look at ")[1]
    assert "with_leaves" not in message  # never suggests making a leaf what already is one


def test_untraceable_top_level_code_says_the_cause_is_unknown_and_where_to_look():
    message = _fails(AssertsTopLevel(corpus(STORE).build(0)), TraceError)
    assert "top-level code" in message and "cause is unknown" in message
    assert _line(AssertsTopLevel, "assert type(latents)") in message and "with_leaves" not in message


def test_wrong_block_count_suggests_the_count_and_that_works():
    model = _store_model()
    message = _fails(model, MatchError, vace.rule(vace_in_dim=VACE_IN_DIM, num_layers=5))
    assert "set the rule's num_layers option to 3" in message
    _works(model, vace.rule(vace_in_dim=VACE_IN_DIM, num_layers=3))


def test_attention_traced_through_suggests_leaves_and_that_works():
    family = corpus("odd_names")
    cache_free = dataclasses.replace(family, new_cache=lambda model: None)
    model = family.build(0)  # called without memory: no cache marks the attention modules
    options = {"vace_in_dim": VACE_IN_DIM, "vace_layers": [0, 2]}
    message = _fails(model, MatchError, vace.rule(**options), cache_free)
    assert "matched 0" in message
    leaves = _suggested_leaves(message)
    assert set(leaves) >= {"trunk.*.mix", "trunk.*.read"}, leaves
    rule = vace.rule(**options)
    _works(model, dataclasses.replace(rule, trace_policy=rule.trace_policy.with_leaves(*leaves)), cache_free)


def test_a_model_without_the_structure_says_the_rule_does_not_apply():
    def change(model: nn.Module) -> None:
        for layer in model.layers:
            layer.ffn = nn.Sequential(nn.Linear(layer.dim, layer.dim))
    message = _fails(_store_model(change), MatchError)
    assert "failed 'feed-forward'" in message and "does not apply to this model as it is" in message


def test_grad_mode_read_by_the_model_is_a_guard():
    """``torch.is_grad_enabled() and self.gradient_checkpointing`` picks a branch: the grad mode
    the trace saw is guarded, so a call in the other mode re-specialises instead of reusing it."""
    family = corpus("diffusers_fork")
    base, result = _apply(family, vace_layers=[0, 2])
    model = result.module
    assert any("is_grad_enabled" in g.expr for g in result.guards)
    state = model.surgery_state
    for grad in (torch.is_grad_enabled(), not torch.is_grad_enabled()):
        cache, base_cache = family.new_cache(model), family.new_cache(base)
        with torch.set_grad_enabled(grad):
            args, kwargs = family.call(model, cache, 0, torch.Generator().manual_seed(5))
            ours = family.output_of(model(*args, **kwargs))
            args, kwargs = family.call(base, base_cache, 0, torch.Generator().manual_seed(5))
            assert torch.equal(ours, family.output_of(base(*args, **kwargs)))
    assert state.last_dispatch[0] == "specialised" and "is_grad_enabled" in state.reasons[-1]
