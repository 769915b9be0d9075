"""diffusers drop-in: VACE grafted onto ``WanTransformer3DModel`` is ``WanVACETransformer3DModel``.

The rewritten model takes diffusers' own call (``control_hidden_states``, a per-layer
``control_hidden_states_scale`` tensor, ``return_dict``), has diffusers' VACE state_dict keys
(so diffusers' VACE weights load with no key map), and matches diffusers' own VACE model
built from the same base weights bit for bit on CPU float32. Tiny sizes; skipped without
diffusers (the ``test`` extra installs it).
"""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import surgery  # noqa: E402
from rules import vace  # noqa: E402
from rules.vace import load_vace_weights  # noqa: E402
from rules.vace.keymaps import DIFFUSERS_TO_NATIVE, NATIVE_TO_DIFFUSERS  # noqa: E402
from rules.vace.profiles import DIFFUSERS  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from surgery.errors import CallError, GraftError  # noqa: E402
from surgery.grafting.build import rebuild_like  # noqa: E402
from surgery.weights.keys import apply_key_map, compile_key_map  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=16, ffn_dim=64, num_layers=4, cross_attn_norm=True, rope_max_seq_len=32)
LAYERS = [0, 2]


def _call(frames: int, height: int, width: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)  # integer timesteps, as pipelines pass them
    ctx = torch.randn(batch, 7, 16, generator=g)
    control = torch.randn(batch, 96, frames, height, width, generator=g)
    return (x, t, ctx), control


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base, rewritten, diffusers' VACE model): same base weights, same VACE weights."""
    torch.manual_seed(0)
    base = diffusers.WanTransformer3DModel(**CONFIG).eval()
    args, _ = _call(2, 4, 4)
    result = surgery.apply(base, vace.rule(vace_layers=LAYERS), example_inputs=(args, {"return_dict": False}))
    reference = diffusers.WanVACETransformer3DModel(**CONFIG, vace_layers=LAYERS, vace_in_channels=96).eval()
    missing, unexpected = reference.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vace") for k in missing)
    path = tmp_path_factory.mktemp("vace") / "diffusers_vace.safetensors"
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.2 for k, v in reference.state_dict().items() if k.startswith("vace")}
    reference.load_state_dict(weights, strict=False)
    save_file(weights, str(path))
    report = load_vace_weights(result.module, path)  # no key map: the names are diffusers' own
    assert report.tensors == len(weights) and report.facts["VACE blocks"] == len(LAYERS)
    return base, result, reference


def test_family_detected_and_call_inputs_are_diffusers(models):
    base, result, _ = models
    assert result.rule.options["profile"] == "diffusers"
    assert set(result.rule.inputs) == {"control_hidden_states", "control_hidden_states_scale"}
    assert [m.index for m in result.matches] == [0, None, 1, None]
    assert isinstance(result.module, diffusers.WanTransformer3DModel)
    # No options at all: the block count comes from the model's config (every second block).
    args, _ = _call(2, 4, 4)
    plain = surgery.apply(base, vace.rule(), example_inputs=(args, {"return_dict": False}), dry_run=True)
    assert [m.index for m in plain.matches] == [0, None, 1, None]


def test_state_dict_is_diffusers_vace_layout(models):
    base, result, reference = models
    ours = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert "vace_blocks.0.proj_in.weight" in ours and "vace_blocks.1.proj_in.weight" not in ours
    assert "vace_blocks.1.proj_out.weight" in ours and "vace_blocks.0.norm2.weight" in ours  # cross_attn_norm=True
    for key, value in base.state_dict().items():  # base weights shared, not copied
        assert result.module.state_dict()[key].data_ptr() == value.data_ptr()


CASES = {
    "scale 1 (default)": dict(shape=(2, 4, 4), scale=None),
    "per-layer scale tensor": dict(shape=(2, 4, 4), scale=[0.5, -1.75]),
    "second resolution": dict(shape=(3, 6, 8), scale=[2.0, 0.25]),
    "short control clip (zero-padded)": dict(shape=(3, 4, 4), scale=None, control_frames=1),
    "batch of two": dict(shape=(2, 4, 4), scale=[1.0, 0.5], batch=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_diffusers_vace_bit_for_bit(models, case):
    _, result, reference = models
    spec = CASES[case]
    args, control = _call(*spec["shape"], batch=spec.get("batch", 1), seed=len(case))
    control = control[:, :, :spec.get("control_frames", control.shape[2])]
    extra = {} if spec["scale"] is None else {"control_hidden_states_scale": torch.tensor(spec["scale"])}
    with torch.no_grad():
        ours = result.module(*args, control_hidden_states=control, return_dict=False, **extra)
        theirs = reference(*args, control_hidden_states=control, return_dict=False, **extra)
    assert isinstance(ours, tuple) and len(ours) == 1
    assert ours[0].shape == theirs[0].shape
    assert (ours[0] - theirs[0]).abs().max().item() == 0.0
    assert theirs[0].abs().max().item() > 0  # a real comparison, not of zeros


def test_return_dict_gives_diffusers_output(models):
    _, result, reference = models
    args, control = _call(2, 4, 4, seed=5)
    with torch.no_grad():
        ours = result.module(*args, control_hidden_states=control)
        theirs = reference(*args, control_hidden_states=control)
    assert type(ours) is type(theirs)
    assert (ours.sample - theirs.sample).abs().max().item() == 0.0


def test_no_control_is_the_base_model(models):
    base, result, _ = models
    for shape in ((2, 4, 4), (3, 6, 8)):
        args, _ = _call(*shape, seed=7)
        with torch.no_grad():
            ours = result.module(*args, return_dict=False)[0]
            theirs = base(*args, return_dict=False)[0]
        assert (ours - theirs).abs().max().item() == 0.0


def test_call_errors_name_diffusers_inputs(models):
    _, result, _ = models
    args, control = _call(2, 4, 4)
    with pytest.raises(CallError, match=r"^control_hidden_states_scale has 3 values for 2 VACE layers"):
        result.module(*args, control_hidden_states=control, control_hidden_states_scale=torch.ones(3))
    with pytest.raises(CallError, match=r"^control_hidden_states\[0\] of shape \(48, 2, 4, 4\) does not fit"):
        result.module(*args, control_hidden_states=control[:, :48])


def test_a_profile_for_another_family_is_passed_explicitly():
    torch.manual_seed(0)
    base = diffusers.WanTransformer3DModel(**CONFIG).eval()
    mine = dataclasses.replace(DIFFUSERS, name="mine", detect=None, context_input="control",
                               scale_input="control_scale", output_projection="to_hint")
    args, control = _call(2, 4, 4)
    result = surgery.apply(base, vace.rule(vace_layers=LAYERS, profile=mine), example_inputs=(args, {"return_dict": False}))
    assert set(result.rule.inputs) == {"control", "control_scale"}
    assert "vace_blocks.1.to_hint.weight" in result.module.state_dict()
    with torch.no_grad():  # a zero branch: exactly the base model, through the new names
        out = result.module(*args, control=control, control_scale=[1.0, 2.0], return_dict=False)[0]
        assert (out - base(*args, return_dict=False)[0]).abs().max().item() == 0.0


def test_block_settings_are_read_from_config_and_structure_never_defaulted():
    torch.manual_seed(0)
    base = diffusers.WanTransformer3DModel(**CONFIG)
    block = base.blocks[0]
    fresh = rebuild_like(block, root=base, sources=DIFFUSERS.block_settings)
    assert type(fresh.norm2) is type(block.norm2) and fresh.attn1.heads == block.attn1.heads
    # Without the structure, dim and num_heads are nowhere by name: an error naming them.
    with pytest.raises(GraftError, match=r"constructor argument\(s\) 'dim', 'num_heads' are not found"):
        rebuild_like(block, root=base, sources=("attributes", "config"))
    # Attributes alone leave cross_attn_norm (defaulted False in __init__) unknown: named, not defaulted.
    with pytest.raises(GraftError, match=r"'cross_attn_norm'"):
        rebuild_like(block, root=base, sources=("attributes",))


def test_diffusers_folder_and_native_checkpoints_load(models, tmp_path):
    base, _, reference = models
    args, _ = _call(2, 4, 4)
    vace_weights = {k: v for k, v in reference.state_dict().items() if k.startswith("vace")}
    reference.save_pretrained(tmp_path / "diffusers")  # a full diffusers VACE folder: base keys are ignored
    native = compile_key_map(DIFFUSERS_TO_NATIVE)
    save_file({apply_key_map(k, native): v.contiguous() for k, v in vace_weights.items()}, str(tmp_path / "native.safetensors"))
    for path, key_map in ((tmp_path / "diffusers", None), (tmp_path / "native.safetensors", NATIVE_TO_DIFFUSERS)):
        fresh = surgery.apply(base, vace.rule(vace_layers=LAYERS), example_inputs=(args, {"return_dict": False})).module
        load_vace_weights(fresh, path, key_map=key_map)
        loaded = fresh.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in vace_weights.items()), path.name


def test_pickled_model_keeps_its_family(models):
    _, result, _ = models
    buffer = io.BytesIO()
    torch.save(result.module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.surgery_state.rule.options["profile"] == "diffusers"
    args, control = _call(2, 4, 4, seed=9)
    with torch.no_grad():
        ours = loaded(*args, control_hidden_states=control, control_hidden_states_scale=torch.tensor([2.0, 0.5]))
        theirs = result.module(*args, control_hidden_states=control, control_hidden_states_scale=torch.tensor([2.0, 0.5]))
    assert (ours.sample - theirs.sample).abs().max().item() == 0.0


def test_a_file_of_the_other_layout_is_refused_naming_the_rules_key_map(models, tmp_path):
    """The loader's fix names the key map of the model's own rule that makes the file fit:
    ``native`` for the diffusers drop-in, ``diffusers`` for a Wan-layout model."""
    from examples import PIPELINES
    from examples.driver import example_call
    from surgery.errors import WeightsError

    _, result, reference = models
    vace_weights = {k: v.contiguous() for k, v in reference.state_dict().items() if k.startswith("vace")}
    native = {apply_key_map(k, compile_key_map(DIFFUSERS_TO_NATIVE)): v for k, v in vace_weights.items()}
    save_file(native, str(tmp_path / "native.safetensors"))
    with pytest.raises(WeightsError, match=r"; fix: the file uses the 'native' layout: pass "
                                           r"key_map=model\.surgery_state\.rule\.key_maps\['native'\]"):
        load_vace_weights(result.module, tmp_path / "native.safetensors")

    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    wan = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline)).module
    to_diffusers = compile_key_map(NATIVE_TO_DIFFUSERS)
    save_file({apply_key_map(k, to_diffusers): torch.randn(v.shape) for k, v in wan.state_dict().items()
               if k.startswith("vace")}, str(tmp_path / "diffusers.safetensors"))
    with pytest.raises(WeightsError, match=r"; fix: the file uses the 'diffusers' layout: pass "
                                           r"key_map=model\.surgery_state\.rule\.key_maps\['diffusers'\]"):
        load_vace_weights(wan, tmp_path / "diffusers.safetensors")
    report = load_vace_weights(wan, tmp_path / "diffusers.safetensors", key_map=wan.surgery_state.rule.key_maps["diffusers"])
    assert report.tensors == sum(k.startswith("vace") for k in wan.state_dict())
