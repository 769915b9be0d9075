"""Faults inside surgery: the user's model is untouched, nothing leaks, nothing grows.

(a) Transactional apply by fault injection: each stage that ``surgery.apply`` calls
    (trace, match, graft, rewrite) is made to fail in turn, before and after doing its
    work, by patching the name where ``surgery.api`` (or ``surgery.rewriting.specialise``)
    looks it up; the weights loader is made to fail while reading, assigning and copying.
    The input model must be exactly as before: state_dict values, parameter identities
    (``id`` and ``data_ptr``), module tree, attributes, class, forward output.
(c) No state leaks: one rule applied to two models, apply again after a failure, and many
    re-specialisations (new resolutions) with a bounded, evicting cache that frees what
    it evicts.
"""
from __future__ import annotations

import dataclasses
import gc
import weakref
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import surgery
import surgery.api as api
import surgery.rewriting.specialise as specialise
import surgery.weights.loader as loader
from examples import PIPELINE_MODULES, PIPELINES
from examples.driver import example_call
from examples.reference import CausalVaceWanModel, load_vace_state_dict, random_vace_state_dict
from rules import vace
from rules.vace import load_vace_weights
from test_errors import ModelSnapshot, base_output

NAMES = list(PIPELINE_MODULES)



class Injected(RuntimeError):
    """The fault raised by the patched stage."""


def _context(batch: int = 1, frames: int = 3, h: int = 4, w: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 96, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _vace_output(pipeline, ctx: torch.Tensor, **call: Any) -> Callable[[nn.Module], torch.Tensor]:
    """One denoising call with fresh caches and a VACE context."""

    def run(model: nn.Module) -> torch.Tensor:
        args, kwargs = example_call(model, pipeline, seed=11, vace_context=ctx, **call)
        with torch.no_grad():
            return model(*args, **kwargs)

    return run


# --- (a) transactional apply --------------------------------------------------------------


def _fail(*_: Any, **__: Any) -> Any:
    raise Injected("injected fault")


def _after(real: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    """The real stage runs to completion (mutating whatever it mutates), then the fault."""

    def run(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise exc

    return run


# (stage, module that surgery looks the name up in, name, fault factory)
STAGES: list[tuple[str, Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
    ("copy", api, "share_tree", lambda real: _after(real, Injected("after share_tree"))),
    ("trace", api, "trace_base", lambda real: _fail),
    ("trace-done", api, "trace_base", lambda real: _after(real, Injected("after trace"))),
    ("match", api, "match", lambda real: _fail),
    ("match-done", api, "match", lambda real: _after(real, Injected("after match"))),
    ("graft", api, "_graft", lambda real: _fail),
    ("graft-done", api, "_graft", lambda real: _after(real, Injected("after graft"))),
    ("graft-interrupted", api, "_graft", lambda real: _after(real, KeyboardInterrupt())),
    ("graft-visible", api, "add_modules", lambda real: _after(real, Injected("after add_modules"))),
    ("rewrite", api, "finish", lambda real: _fail),
    ("rewrite-actions", specialise, "rewrite", lambda real: _after(real, Injected("after rewrite"))),
    ("rewrite-compile", specialise, "compile_graph", lambda real: _after(real, Injected("after compile"))),
    ("rewrite-done", api, "finish", lambda real: _after(real, Injected("after finish"))),
]


@pytest.mark.parametrize("index", range(len(STAGES)), ids=[s[0] for s in STAGES])
def test_fault_in_each_apply_stage_leaves_the_model_untouched(index, monkeypatch):
    stage, where, name, fault = STAGES[index]
    pipeline = PIPELINES[NAMES[index % len(NAMES)]]  # spread the stages over every stand-in
    model = pipeline.build("tiny", seed=index)
    inputs = example_call(model, pipeline)
    run = base_output(pipeline)
    before = ModelSnapshot.take(model, run)
    monkeypatch.setattr(where, name, fault(getattr(where, name)))
    expected = KeyboardInterrupt if stage == "graft-interrupted" else Injected
    with pytest.raises(expected):
        surgery.apply(model, vace.rule(), example_inputs=inputs)
    monkeypatch.undo()
    before.assert_unchanged(model, run)
    assert "_surgery" not in model.__dict__ and not hasattr(model, vace.FALLBACK.blocks)


def test_fault_in_a_rules_graft_builder_leaves_the_model_untouched():
    """The rule's own code fails half-way through building its modules."""
    pipeline, real = PIPELINES["longlive"], vace.rule()
    built: list[dict[str, nn.Module]] = []

    def grafts(context):
        built.append(real.grafts(context))
        raise Injected("graft builder")

    model = pipeline.build("tiny")
    inputs = example_call(model, pipeline)
    run = base_output(pipeline)
    before = ModelSnapshot.take(model, run)
    with pytest.raises(Injected):
        surgery.apply(model, dataclasses.replace(real, grafts=grafts), example_inputs=inputs)
    assert built, "the builder ran"
    before.assert_unchanged(model, run)


def test_apply_again_after_a_failure_equals_a_fresh_apply(monkeypatch):
    pipeline = PIPELINES["memflow"]
    weights_for = {}

    def rewritten(model: nn.Module) -> nn.Module:
        module = surgery.apply(model, vace.rule(), example_inputs=example_call(model, pipeline)).module
        weights_for.setdefault("w", random_vace_state_dict(module, seed=9))
        module.load_state_dict(weights_for["w"], strict=False)
        return module

    run = _vace_output(pipeline, _context())
    fresh = run(rewritten(pipeline.build("tiny", seed=4)))

    model = pipeline.build("tiny", seed=4)
    for stage, where, name, fault in (STAGES[2], STAGES[6], STAGES[10]):
        monkeypatch.setattr(where, name, fault(getattr(where, name)))
        with pytest.raises(Injected):
            surgery.apply(model, vace.rule(), example_inputs=example_call(model, pipeline))
        monkeypatch.undo()
    assert torch.equal(run(rewritten(model)), fresh)


# --- (a) transactional weight loading --------------------------------------------------------


@pytest.fixture(scope="module")
def rewritten_with_weights(tmp_path_factory):
    """A rewritten tiny RewardForcing with loaded weights, and a second, different weights file."""
    pipeline = PIPELINES["reward_forcing"]
    model = pipeline.build("tiny")
    result = surgery.apply(model, vace.rule(), example_inputs=example_call(model, pipeline))
    directory = tmp_path_factory.mktemp("faults")
    first = random_vace_state_dict(result.module, seed=1)
    second = random_vace_state_dict(result.module, seed=2)
    save_file(first, str(directory / "first.safetensors"))
    save_file(second, str(directory / "second.safetensors"))
    save_file({k: v.double() for k, v in second.items()}, str(directory / "second64.safetensors"))
    return pipeline, model, result.module, directory


def _nth(real: Callable[..., Any], n: int, exc: BaseException) -> Callable[..., Any]:
    """Calls 1..n-1 run for real; call n raises ``exc`` instead."""
    count = {"calls": 0}

    def run(*args: Any, **kwargs: Any) -> Any:
        count["calls"] += 1
        if count["calls"] == n:
            raise exc
        return real(*args, **kwargs)

    return run


WEIGHT_FAULTS = [
    # (name patched in surgery.weights.loader, file, mmap, which call fails, fault)
    ("read_tensor", "second.safetensors", True, 7, Injected("read")),
    ("_assign", "second.safetensors", True, 7, Injected("assign")),
    ("_assign", "second.safetensors", True, 7, KeyboardInterrupt()),
    ("_converted", "second.safetensors", False, 7, Injected("copy")),
    ("_converted", "second64.safetensors", True, 7, KeyboardInterrupt()),
]


@pytest.mark.parametrize("fault", WEIGHT_FAULTS, ids=["read", "assign", "assign-interrupted", "copy",
                                                      "convert-interrupted"])
def test_fault_while_loading_weights_leaves_the_model_untouched(fault, rewritten_with_weights, monkeypatch):
    pipeline, base, module, directory = rewritten_with_weights
    name, file, mmap, n, exc = fault
    load_vace_weights(module, directory / "first.safetensors", mmap=False)
    ctx = _context()
    run = _vace_output(pipeline, ctx)
    before = ModelSnapshot.take(module, run)
    base_before = ModelSnapshot.take(base)
    monkeypatch.setattr(loader, name, _nth(getattr(loader, name), n, exc))
    with pytest.raises(type(exc)):
        load_vace_weights(module, directory / file, mmap=mmap)
    monkeypatch.undo()
    before.assert_unchanged(module, run)
    base_before.assert_unchanged(base)
    # The same load without the fault works and changes the output (the check above is live).
    load_vace_weights(module, directory / file, mmap=mmap)
    assert not torch.equal(run(module), before.output)


# --- (c) no state leaks ----------------------------------------------------------------------


def test_one_rule_applied_to_two_models_keeps_them_independent():
    rule = vace.rule(vace_layers=[0, 1])
    pipeline_a, pipeline_b = PIPELINES["longlive"], PIPELINES["krea_realtime_video"]
    model_a, model_b = pipeline_a.build("tiny", seed=1), pipeline_b.build("tiny", seed=2)
    a = surgery.apply(model_a, rule, example_inputs=example_call(model_a, pipeline_a)).module
    a.load_state_dict(random_vace_state_dict(a, seed=1), strict=False)
    run_a = _vace_output(pipeline_a, _context())
    out_a = run_a(a)
    built_a = a.surgery_state.built

    b = surgery.apply(model_b, rule, example_inputs=example_call(model_b, pipeline_b)).module
    b.load_state_dict(random_vace_state_dict(b, seed=2), strict=False)
    _vace_output(pipeline_b, _context(seed=4))(b)

    assert a.surgery_state is not b.surgery_state and a.surgery_state.built == built_a
    ids_a = {id(p) for p in a.parameters()}
    assert not ids_a & {id(p) for p in b.parameters()}
    assert torch.equal(run_a(a), out_a)
    # ... and A is exactly what a fresh rule on a fresh model in isolation gives.
    fresh_model = pipeline_a.build("tiny", seed=1)
    fresh = surgery.apply(fresh_model, vace.rule(vace_layers=[0, 1]),
                          example_inputs=example_call(fresh_model, pipeline_a)).module
    fresh.load_state_dict(random_vace_state_dict(fresh, seed=1), strict=False)
    assert torch.equal(run_a(fresh), out_a)


# Ten pixel sizes with ten token counts per frame (MemFlow branches on it with .item(), so
# each is a new specialisation): two more than the default cache limit of 8.
RESOLUTIONS = [(16, 16), (16, 32), (16, 48), (32, 32), (16, 80), (32, 48), (16, 112), (32, 64), (48, 48), (32, 80)]


def test_respecialisation_cache_is_bounded_evicts_and_frees():
    pipeline = PIPELINES["memflow"]
    model = pipeline.build("tiny", seed=3)
    result = surgery.apply(model, vace.rule(), example_inputs=example_call(model, pipeline))
    module, state = result.module, result.module.surgery_state
    weights = random_vace_state_dict(module, seed=3)
    module.load_state_dict(weights, strict=False)
    reference = CausalVaceWanModel(pipeline.build("tiny", seed=3))
    load_vace_state_dict(reference, weights)
    limit = state.limit
    assert len(RESOLUTIONS) > limit

    def call(height: int, width: int) -> None:
        frames = pipeline.config.num_frame_per_block
        run = _vace_output(pipeline, _context(frames=frames, h=height // 8, w=width // 8), height=height, width=width)
        assert torch.equal(run(module), run(reference)), (height, width)

    refs = [weakref.ref(spec) for spec in state.specialisations.values()]
    for height, width in RESOLUTIONS:
        call(height, width)
        refs.extend(weakref.ref(spec) for spec in state.specialisations.values())
        assert len(state.specialisations) <= limit
    assert len(state.specialisations) == limit
    assert state.evictions == state.built - limit > 0
    gc.collect()
    alive = {id(r()) for r in refs if r() is not None}
    assert alive == {id(spec) for spec in state.specialisations.values()}, "evicted graphs are still referenced"

    # An evicted resolution comes back: rebuilt (and counted), still exact.
    built, evictions = state.built, state.evictions
    call(*RESOLUTIONS[0])
    assert state.built == built + 1 and state.evictions == evictions + 1
    # A cached one is reused without building.
    call(*RESOLUTIONS[-1])
    assert state.built == built + 1 and len(state.specialisations) == limit


def test_repeated_applies_do_not_grow_global_state():
    pipeline = PIPELINES["longlive"]
    classes = len(surgery.module._CLASSES)
    refs = []
    for seed in range(3):
        model = pipeline.build("tiny", seed=seed)
        result = surgery.apply(model, vace.rule(), example_inputs=example_call(model, pipeline))
        refs.append(weakref.ref(result.module))
        del result
    gc.collect()
    assert len(surgery.module._CLASSES) <= classes + 1
    assert all(r() is None for r in refs), "a rewritten model outlived its last reference"
