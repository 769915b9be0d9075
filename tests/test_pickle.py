"""Saving a rewritten model: ``pickle``, ``torch.save``/``torch.load`` and ``copy.deepcopy``.

A rewritten model pickles as its module tree (weights, grafted modules, attributes) plus its
rule's recipe (registered name and options); the generated graphs are code and are not
kept. Loading rebuilds the rule and an empty specialisation cache, so the first call traces
again. The reloaded model must give bit-identical outputs with VACE off (= the base model)
and on (= the model it was saved from), keep dispatching (a new resolution re-specialises),
and keep its call checks. A rule that cannot be rebuilt from ``rules.RULES`` is refused with
a one-line error naming the supported way: ``state_dict`` plus applying the rule again.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import pickle
from typing import Any, Callable

import pytest
import torch
from torch import nn

import surgery
from examples import PIPELINES
from examples.driver import example_call
from examples.reference import random_vace_state_dict
from rules import vace
from surgery.errors import CallError, SaveError
from test_errors import one_line
from test_identity import InputRecord


def _pickle(module: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(module))


def _torch_save(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole-module pickle runs code: trusted files only


ROUND_TRIPS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "pickle": _pickle,
    "torch.save": _torch_save,
    "deepcopy": copy.deepcopy,
}
# The stand-ins for Krea and RewardForcing build a WanT2VCrossAttention subclass at run time
# (examples/wan/model.py, per attention kernel) that pickle cannot find by name: their *base*
# models do not pickle either. deepcopy does not look classes up by name and works for all five.
CASES = {
    "longlive": ("pickle", "torch.save", "deepcopy"),
    "streamdiffusionv2": ("pickle",),
    "memflow": ("torch.save",),
    "krea_realtime_video": ("deepcopy",),
    "reward_forcing": ("deepcopy",),
}


def _rewritten(name: str, **rule_options: Any) -> tuple[Any, nn.Module, surgery.ApplyResult]:
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(**rule_options), example_inputs=example_call(base, pipeline))
    result.module.load_state_dict(random_vace_state_dict(result.module, seed=4), strict=False)
    return pipeline, base, result


def _run(model: nn.Module, pipeline, *, height: int = 32, width: int = 32, **rule_inputs: Any) -> torch.Tensor:
    args, kwargs = example_call(model, pipeline, height=height, width=width, seed=9)
    with torch.no_grad():
        return model(*args, **kwargs, **rule_inputs)


def _context(pipeline, height: int = 32, width: int = 32) -> torch.Tensor:
    frames = pipeline.config.num_frame_per_block
    return torch.randn(1, 96, frames, height // 8, width // 8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact_and_keeps_dispatching(name):
    pipeline, base, result = _rewritten(name, vace_layers=[0, 1, 3])
    original = result.module
    scale = [1.0, 0.5, 2.0]
    on = _run(original, pipeline, vace_context=_context(pipeline), vace_context_scale=scale)
    off = _run(base, pipeline)
    at_b = dict(height=48, width=64, vace_context=_context(pipeline, 48, 64))
    on_b = _run(original, pipeline, **at_b)
    record = InputRecord.take(original)
    for how in CASES[name]:
        loaded = ROUND_TRIPS[how](original)

        record.assert_unchanged(original)  # saving changes nothing
        assert type(loaded) is type(original) and isinstance(loaded, type(base)) and loaded is not original
        state = loaded.surgery_state
        assert state is not original.surgery_state and not state.specialisations
        assert state.rule.options == original.surgery_state.rule.options and state.latent_input == "arg0"
        ours, theirs = original.state_dict(), loaded.state_dict()
        assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), how
        assert all(ours[k].data_ptr() != theirs[k].data_ptr() for k in ours), how  # its own storage
        # VACE on: as the model it was saved from; VACE off: as the base model.
        assert torch.equal(_run(loaded, pipeline, vace_context=_context(pipeline), vace_context_scale=scale), on), how
        assert state.last_dispatch[0] == "specialised" and state.reasons[-1] == "first call"
        assert torch.equal(_run(loaded, pipeline), off), how
        # A new resolution: dispatched (re-specialised or rechecked) and still exact.
        assert torch.equal(_run(loaded, pipeline, **at_b), on_b), how
        assert state.last_dispatch[0] in ("specialised", "rechecked")
        # The call checks came along: a wrong context passed with the latent as x= is refused.
        args, kwargs = example_call(loaded, pipeline, seed=1)
        with pytest.raises(CallError, match="does not fit the latent"), torch.no_grad():
            loaded(x=args[0], **kwargs, vace_context=torch.randn(1, 48, args[0].shape[2], 4, 4))
        record = InputRecord.take(original)  # example_call ran the pipeline's setup on it


def test_a_reloaded_model_can_be_saved_again_and_wrapped_by_peft():
    peft = pytest.importorskip("peft")
    pipeline, _, result = _rewritten("longlive")
    twice = _pickle(_pickle(result.module))
    on = _run(result.module, pipeline, vace_context=_context(pipeline))
    assert torch.equal(_run(twice, pipeline, vace_context=_context(pipeline)), on)
    wrapped = peft.get_peft_model(twice, peft.LoraConfig(r=2, target_modules=["blocks.0.self_attn.q"]))
    assert torch.equal(_run(wrapped, pipeline, vace_context=_context(pipeline)), on)  # LoRA B starts at zero


def _custom(rule: surgery.Rule) -> surgery.Rule:
    return dataclasses.replace(rule, name="custom")


def _changed_code(rule: surgery.Rule) -> surgery.Rule:
    """The same behaviour through other code: not what the registered factory builds."""
    return dataclasses.replace(rule, check_call=lambda *arguments: rule.check_call(*arguments))


UNSAVEABLE = {
    "unregistered": (_custom, "rule 'custom': it is not registered in rules.RULES"),
    "changed-code": (_changed_code, "rules.RULES['vace'](**{'vace_in_dim': 96, 'vace_layers': None, "),
}


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("case", list(UNSAVEABLE))
def test_a_rule_that_cannot_be_rebuilt_names_the_supported_way(case, how):
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    change, needle = UNSAVEABLE[case]
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    state = result.module.surgery_state
    state.rule = change(state.rule)  # as if rewritten by a rule of its own making
    before = _run(result.module, pipeline, vace_context=_context(pipeline))
    record = InputRecord.take(result.module)
    with pytest.raises(SaveError) as info:
        ROUND_TRIPS[how](result.module)
    message = one_line(info.value)
    assert needle in message and "cannot pickle or copy a model rewritten by rule" in message, message
    assert case != "changed-code" or "}) builds a different rule" in message, message
    assert "; fix: save result.module.state_dict()" in message and "surgery.apply the same rule" in message
    record.assert_unchanged(result.module)
    assert torch.equal(_run(result.module, pipeline, vace_context=_context(pipeline)), before)
