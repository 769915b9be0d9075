"""The unchanged VACE rule on a corpus of models written the way real projects write them.

Each corpus model (tests/corpus/) traces, matches and grafts with ``rules.vace.rule``
as is, and streams bit for bit like the same model with VACE added by hand through hooks
(tests/corpus/handwritten.py), with identical non-zero VACE weights, over several chunks
with caches. Tracing never touches the caller's model or caches, even when apply fails.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest
import torch
import torch.nn as nn

import surgery
from corpus.handwritten import HookedVace, random_vace_weights
from examples import PIPELINES
from examples.driver import example_call
from examples.reference import CausalVaceWanModel, load_vace_state_dict, random_vace_state_dict
from rules import vace
from surgery.errors import MatchError

CORPUS = ["diffusers_fork", "dataclass_fork", "odd_names", "object_store"]
VACE_IN_DIM = 8
CHUNKS = 3


def corpus(name: str) -> Any:
    return importlib.import_module(f"corpus.{name}")


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
    layers = [m.position for m in result.matches if m.hint_index is not None]
    hand_base = family.build(0)
    blocks = family.blocks(hand_base)
    hand = HookedVace(hand_base, blocks, family.patch_embedding(hand_base), family.vace_block, family.vace_block_call,
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


@pytest.mark.parametrize("name", [n for n in CORPUS if not hasattr(corpus(n).build(0), "num_layers")])
def test_model_without_num_layers_gets_a_hint_every_second_matched_block(name):
    family = corpus(name)
    _, result = _apply(family)
    count = len(family.blocks(result.module))
    assert [m.position for m in result.matches] == list(range(count))
    assert [m.hint_index for m in result.matches] == [k // 2 if k % 2 == 0 else None for k in range(count)]
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
