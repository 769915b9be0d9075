"""Zero copy without shared identity: the rewritten model's tensors are its own objects.

``surgery.apply`` returns a model whose every parameter, buffer and plain tensor attribute
(``freqs``) views the input's storage (same ``data_ptr``: nothing is copied) but is a new
tensor object. Converting the rewritten model (``half()``, ``to(dtype)``, ``to(device)``,
``requires_grad_``, PEFT's freezing) must never change the input model: not its dtypes,
values, devices, ``requires_grad`` flags, nor the identity of its Parameter objects. Both
settings of ``torch.__future__.set_overwrite_module_params_on_conversion`` are covered:
with ``False`` (the default) ``nn.Module._apply`` rebinds ``param.data`` in place, which is
safe only because the rewritten model's Parameter objects are not the input's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn

import surgery
from examples import PIPELINES
from examples.driver import example_call
from rules import vace
from surgery.tracing.twin import share_tree
from test_errors import ModelSnapshot, base_output

NAME = "longlive"


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters, buffers and plain tensor attributes (``freqs``) of every module, by path."""
    out = [(f"param:{n}", t) for n, t in model.named_parameters(remove_duplicate=False)]
    out += [(f"buffer:{n}", t) for n, t in model.named_buffers(remove_duplicate=False)]
    for path, module in model.named_modules(remove_duplicate=False):
        out += [(f"plain:{path}.{k}" if path else f"plain:{k}", v) for k, v in vars(module).items()
                if not k.startswith("_") and isinstance(v, torch.Tensor)]
    return out


@dataclass
class InputRecord:
    """Every tensor of the input model: identity, storage, dtype, device, requires_grad, values."""

    rows: dict[str, tuple[int, int, torch.dtype, torch.device, bool]]
    values: dict[str, torch.Tensor]
    snapshot: ModelSnapshot

    @classmethod
    def take(cls, model: nn.Module, run: Callable[[nn.Module], torch.Tensor] | None = None) -> "InputRecord":
        snapshot = ModelSnapshot.take(model, run)  # first: a run's pipeline setup writes attributes
        tensors = named_tensors(model)
        return cls({n: (id(t), t.data_ptr(), t.dtype, t.device, t.requires_grad) for n, t in tensors},
                   {n: t.detach().clone() for n, t in tensors}, snapshot)

    def assert_unchanged(self, model: nn.Module, run: Callable[[nn.Module], torch.Tensor] | None = None) -> None:
        tensors = dict(named_tensors(model))
        assert tensors.keys() == self.rows.keys()
        now = {n: (id(t), t.data_ptr(), t.dtype, t.device, t.requires_grad) for n, t in tensors.items()}
        changed = [n for n in self.rows if now[n] != self.rows[n]]
        assert not changed, f"input tensors changed identity/dtype/device/requires_grad: {changed[:5]}"
        differ = [n for n in self.values if not torch.equal(tensors[n].detach(), self.values[n])]
        assert not differ, f"input values changed: {differ[:5]}"
        self.snapshot.assert_unchanged(model, run)


def build(name: str = NAME, **apply_kwargs: Any) -> tuple[Any, nn.Module, surgery.ApplyResult]:
    pipeline = PIPELINES[name]
    model = pipeline.build("tiny", seed=0)
    # A persistent buffer in the root and a block (the stand-ins have none), read by nothing.
    model.register_buffer("calibration", torch.linspace(0.0, 1.0, 5))
    model.blocks[1].register_buffer("running_scale", torch.ones(3))
    return pipeline, model, surgery.apply(model, vace.rule(), example_inputs=example_call(model, pipeline),
                                          **apply_kwargs)


def assert_shared_storage_own_objects(model: nn.Module, rewritten: nn.Module) -> None:
    """Zero copy (same data_ptr, shape, dtype) but no shared tensor object."""
    theirs = dict(named_tensors(rewritten))
    ours = named_tensors(model)
    assert any(n.startswith("buffer:") for n, _ in ours) and any(n.startswith("plain:") for n, _ in ours)
    for name, tensor in ours:
        other = theirs[name]
        assert other is not tensor, name
        assert other.data_ptr() == tensor.data_ptr() and other.shape == tensor.shape, name
        assert other.dtype == tensor.dtype and other.requires_grad == tensor.requires_grad, name
        assert type(other) is type(tensor), name


@contextlib.contextmanager
def overwrite_on_conversion(value: bool) -> Iterator[None]:
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(value)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)


CONVERSIONS: dict[str, Callable[[nn.Module], Any]] = {
    "half": lambda m: m.half(),
    "to-float64": lambda m: m.to(torch.float64),
    "to-bfloat16": lambda m: m.to(dtype=torch.bfloat16),
    "double": lambda m: m.double(),
    "to-meta": lambda m: m.to("meta"),
    "to-empty-meta": lambda m: m.to_empty(device="meta"),
    "requires-grad-off": lambda m: m.requires_grad_(False),
    "blocks-requires-grad-off": lambda m: m.blocks.requires_grad_(False),
    "param-requires-grad-off": lambda m: m.patch_embedding.weight.requires_grad_(False),
    "train-eval": lambda m: m.eval(),
}


# Each conversion with torch's default (``param.data`` rebound in place); the dtype, device
# and flag conversions also with new Parameter objects on conversion.
CASES = [(name, False) for name in CONVERSIONS] + [(name, True) for name in ("half", "to-meta", "requires-grad-off")]


@pytest.mark.parametrize("conversion, overwrite", CASES,
                         ids=[f"{n}-{'new-parameters' if o else 'rebind-data'}" for n, o in CASES])
def test_converting_the_rewritten_model_never_changes_the_input(conversion, overwrite):
    pipeline, model, result = build()
    assert_shared_storage_own_objects(model, result.module)
    run = base_output(pipeline)
    record = InputRecord.take(model, run)
    with overwrite_on_conversion(overwrite):
        CONVERSIONS[conversion](result.module)
    # The conversion did reach the rewritten model, so the check above could have failed.
    if conversion in ("half", "to-float64", "to-bfloat16", "double"):
        assert result.module.blocks[0].ffn[0].weight.dtype != torch.float32
        assert result.module.calibration.dtype != torch.float32
    if conversion.startswith("to-") and "meta" in conversion:
        assert result.module.blocks[1].running_scale.is_meta and result.module.patch_embedding.weight.is_meta
    if conversion == "requires-grad-off":
        assert not any(p.requires_grad for p in result.module.parameters())
    if conversion == "train-eval":
        assert not result.module.blocks[0].training and model.blocks[0].training
    record.assert_unchanged(model, run)  # and the input still gives the same output


def test_a_chain_of_conversions_and_calls_leaves_the_input_alone():
    pipeline, model, result = build()
    record = InputRecord.take(model)
    rewritten = result.module
    for convert in (lambda m: m.half(), lambda m: m.float(), lambda m: m.requires_grad_(False), lambda m: m.double()):
        convert(rewritten)
        args, kwargs = example_call(rewritten, pipeline, seed=5)
        with torch.no_grad():
            rewritten(*args, **kwargs, vace_context=torch.randn(1, 96, 3, 4, 4, dtype=torch.float64))
        record.assert_unchanged(model)


def test_a_converted_rewritten_model_computes_like_the_converted_base_model():
    """VACE off after ``.double()``: bit for bit the base model converted the same way."""
    pipeline, model, result = build()
    result.module.double()
    mirror = pipeline.build("tiny", seed=0).double()
    run = base_output(pipeline)
    assert torch.equal(run(result.module), run(mirror))
    assert result.module.blocks[0].self_attn.q.weight.data_ptr() != model.blocks[0].self_attn.q.weight.data_ptr()


def test_peft_freezing_the_result_does_not_freeze_the_input():
    peft = pytest.importorskip("peft")
    _, model, result = build()
    record = InputRecord.take(model)
    peft.get_peft_model(result.module, peft.LoraConfig(r=2, target_modules=["blocks.0.self_attn.q", "ffn.0"]))
    assert not result.module.patch_embedding.weight.requires_grad  # PEFT froze the base weights ...
    record.assert_unchanged(model)  # ... of the result only
    assert all(p.requires_grad for p in model.parameters())


def test_loading_vace_weights_into_the_result_leaves_the_input_alone(tmp_path):
    from safetensors.torch import save_file

    from examples.reference import random_vace_state_dict
    from rules.vace import load_vace_weights

    _, model, result = build()
    record = InputRecord.take(model)
    path = tmp_path / "vace.safetensors"
    save_file(random_vace_state_dict(result.module, seed=2), str(path))
    load_vace_weights(result.module, path)
    record.assert_unchanged(model)
    # Base weights are still shared after the load (it only swaps the grafted tensors).
    assert result.module.blocks[0].ffn[0].weight.data_ptr() == model.blocks[0].ffn[0].weight.data_ptr()


def test_in_place_value_writes_are_shared_as_documented():
    """Zero copy means the values are one storage: an in-place write shows on both sides."""
    _, model, result = build()
    with torch.no_grad():
        result.module.head.head.weight.add_(1.0)
    assert torch.equal(model.head.head.weight, result.module.head.head.weight)


def test_share_tree_keeps_ties_subclasses_and_flags():
    class Tagged(nn.Parameter):
        pass

    root = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    root[2].weight = root[0].weight  # tied
    root[0].bias = Tagged(torch.zeros(3), requires_grad=False)
    root[0].bias.loader_flag = "kept"
    root.table = torch.arange(4.0)
    copy = share_tree(root)
    assert copy[0].weight is copy[2].weight and copy[0].weight is not root[0].weight
    assert type(copy[0].bias) is Tagged and copy[0].bias.loader_flag == "kept" and not copy[0].bias.requires_grad
    assert copy[1].running_mean is not root[1].running_mean
    assert copy[1].running_mean.data_ptr() == root[1].running_mean.data_ptr()
    assert copy.table is not root.table and copy.table.data_ptr() == root.table.data_ptr()
    copy.half()
    assert copy[0].weight is copy[2].weight and copy[0].weight.dtype == torch.float16
    assert root[0].weight.dtype == torch.float32 and root[1].running_mean.dtype == torch.float32
    assert len(list(copy.parameters())) == len(list(root.parameters()))


def test_zero_copy_holds_for_every_pipeline():
    for name in PIPELINES:
        _, model, result = build(name)
        assert_shared_storage_own_objects(model, result.module)
