"""Bad input: one clear one-line error, the user's model and files untouched.

One section per row of the error catalogue (``docs/errors.md``). Each row is checked
through the Python API and, where the command line can reach it, through
``surgery.cli.main.main`` (exit code 2, exactly one ``surgery: error: ...`` line on
stderr). "Model unchanged" is checked with :class:`ModelSnapshot`: state_dict values,
parameter and buffer identities (``id`` and ``data_ptr``), the module tree (names and
classes), plain attributes, the model's class, and its forward output.
"""
from __future__ import annotations

import errno
import inspect
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import surgery
from examples import PIPELINES
from examples.driver import example_call, snapshot_caches
from examples.reference import CausalVaceWanModel, random_vace_state_dict
from rules import vace
from rules.vace import load_vace_weights
from surgery.cli import loading
from surgery.cli.main import main
from surgery.errors import (
    CallError,
    InputError,
    MatchError,
    OrderError,
    ReportError,
    RuleError,
    SurgeryError,
    TraceError,
    WeightsError,
)
from surgery.reports import files as report_files
from surgery.reports.report import REPORT_JSON, REPORT_MD, write_report

ROOT = Path(__file__).resolve().parents[1]
NAME = "longlive"  # the CLI's built-in tiny model: 4 blocks, dim 64, ffn 128, default vace_layers [0, 2]
HERE = __name__  # how the CLI imports this module (tests/ is on sys.path under pytest)



# --- helpers shared with test_faults.py ---------------------------------------------------


def one_line(error: BaseException) -> str:
    """``str(error)``, asserted to be one line without surrounding whitespace."""
    text = str(error)
    assert "\n" not in text and text == text.strip() and text, repr(text)
    return text


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 2) -> str:
    """Run the CLI in-process; assert the exit code and exactly one stderr line; return it."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    if code == 2:
        assert lines[0].startswith("surgery: error: "), lines[0]
    return lines[0]


def _attributes(model: nn.Module) -> dict[tuple[str, str], Any]:
    """Plain (non-underscore) attributes of every module; tensors by identity."""
    out: dict[tuple[str, str], Any] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            out[(name, key)] = ("tensor", id(value)) if isinstance(value, torch.Tensor) else value
    return out


def base_output(pipeline) -> Callable[[nn.Module], torch.Tensor]:
    """A forward call of the base model with fresh caches (so every call is identical)."""

    def run(model: nn.Module) -> torch.Tensor:
        args, kwargs = example_call(model, pipeline, seed=11)
        with torch.no_grad():
            return model(*args, **kwargs)

    return run


@dataclass
class ModelSnapshot:
    """Everything about a model that a failed surgery or load must leave exactly as it was."""

    cls: type
    keys: frozenset[str]
    tree: list[tuple[str, type]]
    identities: list[tuple[str, int, int]]
    state: dict[str, torch.Tensor]
    attributes: dict[tuple[str, str], Any]
    output: torch.Tensor | None

    @classmethod
    def take(cls, model: nn.Module, run: Callable[[nn.Module], torch.Tensor] | None = None) -> "ModelSnapshot":
        # Run first: a pipeline's setup (inside ``run``) writes run-time attributes, as it always does.
        output = run(model).detach().clone() if run is not None else None
        tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        return cls(
            cls=type(model),
            keys=frozenset(model.__dict__),
            tree=[(name, type(module)) for name, module in model.named_modules(remove_duplicate=False)],
            identities=[(name, id(t), t.data_ptr()) for name, t in tensors],
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            attributes=_attributes(model),
            output=output,
        )

    def assert_unchanged(self, model: nn.Module, run: Callable[[nn.Module], torch.Tensor] | None = None) -> None:
        after = ModelSnapshot.take(model, run if self.output is not None else None)
        assert after.cls is self.cls
        assert after.keys == self.keys, sorted(after.keys ^ self.keys)
        assert after.tree == self.tree
        assert after.identities == self.identities
        assert after.state.keys() == self.state.keys()
        changed = [k for k in self.state if not torch.equal(after.state[k], self.state[k])]
        assert not changed, f"values changed: {changed[:5]}"
        assert after.attributes == self.attributes
        if self.output is not None:
            assert torch.equal(after.output, self.output)


def build(pipeline_name: str = NAME, seed: int = 0) -> tuple[Any, nn.Module, tuple[tuple, dict]]:
    pipeline = PIPELINES[pipeline_name]
    model = pipeline.build("tiny", seed=seed)
    return pipeline, model, example_call(model, pipeline)


# --- weights fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def grafted():
    """A rewritten tiny LongLive with good non-zero VACE weights, and the file they came from."""
    pipeline, model, inputs = build()
    result = surgery.apply(model, vace.rule(), example_inputs=inputs)
    weights = random_vace_state_dict(result.module, seed=5)
    return pipeline, model, result, weights


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, grafted) -> Path:
    directory = tmp_path_factory.mktemp("weights")
    save_file(grafted[3], str(directory / "good.safetensors"))
    return directory


@pytest.fixture
def loaded(grafted, weights_dir):
    """The rewritten model with the good weights loaded, and a snapshot to compare against."""
    pipeline, _, result, _ = grafted
    load_vace_weights(result.module, weights_dir / "good.safetensors", mmap=False)
    ctx = torch.randn(1, 96, 3, 4, 4, generator=torch.Generator().manual_seed(3))

    def run(module: nn.Module) -> torch.Tensor:
        args, kwargs = example_call(module, pipeline, seed=11)
        with torch.no_grad():
            return module(*args, **kwargs, vace_context=ctx)

    return result.module, run, ModelSnapshot.take(result.module, run)


def _load_fails(path: Path, loaded, *needles: str) -> str:
    module, run, before = loaded
    with pytest.raises(WeightsError) as info:
        load_vace_weights(module, path)
    message = one_line(info.value)
    for needle in needles:
        assert needle in message, message
    before.assert_unchanged(module, run)
    return message


# --- row: weights file truncated, or header corrupted --------------------------------------


def _corrupt(raw: bytes, how: str) -> bytes:
    header_len = int.from_bytes(raw[:8], "little")
    if how == "truncated":
        return raw[:-100]
    if how == "cut-in-header":
        return raw[: 8 + header_len // 2]
    if how == "shorter-than-length":
        return raw[:5]
    if how == "garbage-header":
        return raw[:10] + b"\xff" * 10 + raw[20:]
    if how == "huge-length":
        return (10**12).to_bytes(8, "little") + raw[8:]
    if how == "not-an-object":
        body = b"[1, 2]".ljust(header_len, b" ")
        return raw[:8] + body + raw[8 + header_len:]
    if how == "bad-offsets":
        # Same header length: one shape grows, so its byte range no longer fits its dtype.
        return raw.replace(b'"shape":[64]', b'"shape":[65]', 1)
    raise AssertionError(how)


CORRUPTIONS = ["truncated", "cut-in-header", "shorter-than-length", "garbage-header", "huge-length",
               "not-an-object", "bad-offsets"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_safetensors_is_refused_and_model_unchanged(how, weights_dir, loaded, tmp_path):
    raw = (weights_dir / "good.safetensors").read_bytes()
    bad = _corrupt(raw, how)
    assert bad != raw
    path = tmp_path / f"{how}.safetensors"
    path.write_bytes(bad)
    _load_fails(path, loaded, str(path), "not a valid safetensors file")
    assert path.read_bytes() == bad  # the user's file is never rewritten


def test_torch_save_renamed_to_safetensors_is_refused(grafted, loaded, tmp_path):
    path = tmp_path / "renamed.safetensors"
    torch.save(grafted[3], path)
    _load_fails(path, loaded, str(path), "not a valid safetensors file", "torch.save")


@pytest.mark.parametrize("how", ["truncated", "garbage-header"])
def test_cli_corrupt_weights_exit_2(how, weights_dir, tmp_path, capsys):
    path = tmp_path / f"{how}.safetensors"
    path.write_bytes(_corrupt((weights_dir / "good.safetensors").read_bytes(), how))
    line = cli_error(["apply", NAME, "--weights", str(path)], capsys)
    assert str(path) in line and "not a valid safetensors file" in line


# --- row: .pt/.pth/.bin pickle files --------------------------------------------------------


class _Tripwire:
    """Unpickling this creates a file: proof that the loader never unpickled anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_pickle_checkpoint_is_refused_unopened_with_conversion_hint(suffix, loaded, tmp_path):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / f"vace{suffix}"
    path.write_bytes(pickle.dumps(_Tripwire(marker)))
    message = _load_fails(path, loaded, str(path), "pickle")
    assert "convert" in message and "save_file" in message and "weights_only=True" in message
    assert not marker.exists()


def test_directory_of_pickles_is_refused(loaded, tmp_path):
    marker = tmp_path / "UNPICKLED"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    _load_fails(tmp_path / "ckpt", loaded, "pickle", "convert")
    assert not marker.exists()


def test_cli_pickle_weights_exit_2(tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "vace.pth"
    path.write_bytes(pickle.dumps(_Tripwire(marker)))
    line = cli_error(["apply", NAME, "--weights", str(path)], capsys)
    assert "pickle" in line and "convert" in line and str(path) in line
    assert not marker.exists()


def test_cli_process_refuses_pickle_with_one_line_and_exit_2(tmp_path):
    """The real ``python -m surgery`` process: exit status 2 and a single stderr line."""
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "vace.pt"
    path.write_bytes(pickle.dumps(_Tripwire(marker)))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "surgery", "apply", NAME, "--weights", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("surgery: error: ") and "pickle" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


# --- row: weights that do not fit the model -----------------------------------------------


def _variant(weights: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    sd = dict(weights)
    if how == "vace_in_dim":
        sd["vace_patch_embedding.weight"] = torch.randn(64, 48, 1, 2, 2)
    elif how == "dim":
        sd = random_vace_state_dict(seed=1, dim=32, ffn_dim=128, num_vace_blocks=2)
    elif how == "missing":
        for key in [k for k in sd if k.startswith("vace_blocks.1.ffn.")]:
            del sd[key]
    elif how == "too-many-blocks":
        sd = random_vace_state_dict(seed=1, dim=64, ffn_dim=128, num_vace_blocks=3)
    elif how == "too-few-blocks":
        sd = random_vace_state_dict(seed=1, dim=64, ffn_dim=128, num_vace_blocks=1)
    elif how == "unexpected":
        sd["vace_blocks.1.extra.weight"] = torch.randn(3)
    else:
        raise AssertionError(how)
    return sd


MISFITS = {
    # how: what the one line must contain (keys, and expected vs actual shapes or counts)
    "vace_in_dim": ["vace_patch_embedding.weight", "vace_in_dim 48", "takes 96"],
    "dim": ["shape mismatches", "vace_patch_embedding.weight: [64, 96, 1, 2, 2] vs [32, 96, 1, 2, 2]",
            "vace_blocks.0.modulation: [1, 6, 64] vs [1, 6, 32]"],
    "missing": ["4 VACE keys missing", "vace_blocks.1.ffn.0.weight", "vace_blocks.1.ffn.2.bias"],
    "too-many-blocks": ["has 3 VACE blocks (vace_blocks.0-2)", "the model has 2 (vace_blocks.0-1)"],
    "too-few-blocks": ["has 1 VACE blocks (vace_blocks.0)", "the model has 2 (vace_blocks.0-1)"],
    "unexpected": ["unexpected keys", "vace_blocks.1.extra.weight"],
}


@pytest.mark.parametrize("how", list(MISFITS))
def test_weights_that_do_not_fit_are_refused_and_model_unchanged(how, grafted, loaded, tmp_path):
    path = tmp_path / f"{how}.safetensors"
    save_file(_variant(grafted[3], how), str(path))
    _load_fails(path, loaded, str(path), *MISFITS[how])


@pytest.mark.parametrize("how", ["dim", "too-many-blocks"])
def test_cli_weights_that_do_not_fit_exit_2(how, grafted, tmp_path, capsys):
    path = tmp_path / f"{how}.safetensors"
    save_file(_variant(grafted[3], how), str(path))
    line = cli_error(["apply", NAME, "--weights", str(path)], capsys)
    assert all(needle in line for needle in MISFITS[how]), line


# --- row: NaN or Inf in a weight tensor ---------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("vace_blocks.1.ffn.0.weight", float("nan")),
    ("vace_patch_embedding.bias", float("-inf")),
    ("vace_blocks.1.after_proj.bias", float("inf")),  # the last tensor: nothing before it may land
])
def test_non_finite_weight_is_refused_naming_the_tensor(key, value, grafted, loaded, tmp_path):
    sd = dict(grafted[3])
    bad = sd[key].clone()
    bad.view(-1)[bad.numel() // 2] = value
    sd[key] = bad
    # Different valid values elsewhere, so a partial load would show in the snapshot.
    sd.update({k: v + 1.0 for k, v in sd.items() if k != key})
    path = tmp_path / "nonfinite.safetensors"
    save_file(sd, str(path))
    _load_fails(path, loaded, f"'{key}'", "NaN or Inf")


def test_cli_non_finite_weight_exit_2(grafted, tmp_path, capsys):
    sd = dict(grafted[3])
    sd["vace_blocks.0.self_attn.q.weight"] = torch.full_like(sd["vace_blocks.0.self_attn.q.weight"], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    line = cli_error(["apply", NAME, "--weights", str(path)], capsys)
    assert "'vace_blocks.0.self_attn.q.weight'" in line and "NaN or Inf" in line


# --- row: vace_layers options ------------------------------------------------------------


@pytest.mark.parametrize("layers, num_layers, needles", [
    ([1, 2], None, ["does not contain 0"]),
    ([0, 9], 4, ["out of range for 4 blocks", "0..3"]),
    ([2, 0], None, ["not sorted", "[0, 2]"]),
    ([0, 0, 2], None, ["duplicates", "[0, 2]"]),
    ([], None, ["empty"]),
    ([-1, 0], None, ["negative"]),
    ([0, 2.0], None, ["integers"]),
    ("0,2", None, ["list of block indices"]),
])
def test_bad_vace_layers_fail_at_rule_construction(layers, num_layers, needles):
    with pytest.raises(RuleError) as info:
        vace.rule(vace_layers=layers, num_layers=num_layers)
    message = one_line(info.value)
    assert all(n in message for n in needles), message


def test_negative_vace_layer_is_not_reported_as_unsorted():
    """[0, -1] is out of range; the fix must not suggest another list with -1 in it."""
    with pytest.raises(RuleError) as info:
        vace.rule(vace_layers=[0, -1])
    message = one_line(info.value)
    assert "negative" in message or "range" in message, message
    assert "-1, 0" not in message, message


@pytest.mark.parametrize("options", [dict(vace_in_dim=0), dict(vace_in_dim="96"), dict(vace_in_dim=True),
                                     dict(num_layers=0), dict(num_layers="4")])
def test_bad_rule_options_fail_at_rule_construction(options):
    with pytest.raises(RuleError) as info:
        vace.rule(**options)
    one_line(info.value)


def test_out_of_range_layers_for_the_models_block_count_fail_before_any_change():
    """Without num_layers the range is known only from the model: apply refuses, model untouched."""
    pipeline, model, inputs = build()
    run = base_output(pipeline)
    before = ModelSnapshot.take(model, run)
    rule = vace.rule(vace_layers=[0, 9])
    with pytest.raises(RuleError) as info:
        surgery.apply(model, rule, example_inputs=inputs)
    assert "out of range for 4 blocks" in one_line(info.value)
    before.assert_unchanged(model, run)


@pytest.mark.parametrize("value, needle", [("[1,2]", "does not contain 0"), ("[0,9]", "out of range"),
                                           ("[2,0]", "not sorted"), ("[]", "empty")])
def test_cli_bad_vace_layers_exit_2(value, needle, capsys):
    assert needle in cli_error(["apply", NAME, "--dry-run", "--set", f"vace_layers={value}"], capsys)


# --- row: a model the tracer cannot capture ----------------------------------------------


class DataDependentFFN(nn.Module):
    """Wraps an FFN with a branch on tensor *values*: no graph can specialise on it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().amax() > 1e4:
            x = x.clamp(-1e4, 1e4)
        return self.inner(x)


class ScalarReadingFFN(nn.Module):
    """Reads a tensor value into a Python float."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = float(x.detach().std())
        return self.inner(x) * (1.0 if spread >= 0 else 0.5)


def _line_of(cls: type, needle: str) -> tuple[str, int]:
    lines, start = inspect.getsourcelines(cls.forward)
    index = next(i for i, line in enumerate(lines) if needle in line)
    return lines[index].strip(), start + index


def untraceable(wrapper: type = DataDependentFFN) -> tuple[Any, nn.Module, tuple[tuple, dict]]:
    pipeline, model, _ = build()
    model.blocks[1].ffn = wrapper(model.blocks[1].ffn)
    return pipeline, model, example_call(model, pipeline)


def untraceable_factory():
    """For the CLI: ``test_errors:untraceable_factory``."""
    _, model, inputs = untraceable()
    return model, inputs


@pytest.mark.parametrize("wrapper, needle", [(DataDependentFFN, "if x.abs().amax()"),
                                             (ScalarReadingFFN, "spread = float(")])
def test_untraceable_model_names_construct_location_and_fix(wrapper, needle):
    pipeline, model, inputs = untraceable(wrapper)
    run = base_output(pipeline)
    before = ModelSnapshot.take(model, run)
    with pytest.raises(TraceError) as info:
        surgery.apply(model, vace.rule(), example_inputs=inputs)
    message = one_line(info.value)
    source, lineno = _line_of(wrapper, needle)
    assert f"`{source}`" in message, message
    assert f"{Path(__file__).name}:{lineno}" in message, message
    # Tracing computes no activation values, so a leaf would not have them either (test_corpus.py).
    assert "blocks.1.ffn" in message and "tensor operations" in message and "leaf" not in message, message
    before.assert_unchanged(model, run)


def test_cli_untraceable_model_exit_2(capsys):
    line = cli_error(["apply", f"{HERE}:untraceable_factory"], capsys)
    source, lineno = _line_of(DataDependentFFN, "if x.abs().amax()")
    assert source in line and f"{Path(__file__).name}:{lineno}" in line and "tensor operations" in line


# --- row: a rule that matches 0 blocks, or not the expected count --------------------------


class MlpBlock(nn.Module):
    """Residual MLP block: passes the residual checks, has no attention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ffn(self.norm(x))
        return x + self.proj(x)


class MlpModel(nn.Module):
    def __init__(self, dim: int = 16, num_layers: int = 2) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.patch_embedding = nn.Conv3d(4, dim, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList(MlpBlock(dim) for _ in range(num_layers))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def mlp_factory():
    torch.manual_seed(0)
    return MlpModel(), ((torch.randn(1, 4, 1, 4, 4),), {})


def test_rule_matching_no_block_names_nearest_partial_matches():
    model, inputs = mlp_factory()
    before = ModelSnapshot.take(model, lambda m: m(*inputs[0]))
    with pytest.raises(MatchError) as info:
        surgery.apply(model, vace.rule(vace_in_dim=4), example_inputs=inputs)
    message = one_line(info.value)
    assert "expected 2 attention block(s) but matched 0" in message
    assert "nearest partial matches: blocks.0 (MlpBlock) passed 2/5, failed 'self-attention'" in message
    before.assert_unchanged(model, lambda m: m(*inputs[0]))


@pytest.mark.parametrize("num_layers", [3, 6])
def test_rule_matching_the_wrong_count_names_nearest_partial_matches(num_layers):
    pipeline, model, inputs = build("reward_forcing")
    run = base_output(pipeline)
    before = ModelSnapshot.take(model, run)
    with pytest.raises(MatchError) as info:
        surgery.apply(model, vace.rule(num_layers=num_layers), example_inputs=inputs)
    message = one_line(info.value)
    assert f"expected {num_layers} attention block(s) but matched 4 (blocks.0, blocks.1, blocks.2, blocks.3)" in message
    assert "nearest partial matches: " in message and "passed " in message
    before.assert_unchanged(model, run)


def test_model_without_num_layers_is_matched_not_refused():
    """Without a declared block count the default vace_layers come from the match count, so the
    missing count is no error: this model (no attention) fails at matching, as it would with one."""
    model, inputs = mlp_factory()
    del model.num_layers
    with pytest.raises(MatchError) as info:
        surgery.apply(model, vace.rule(vace_in_dim=4), example_inputs=inputs)
    assert "but matched 0" in one_line(info.value)


@pytest.mark.parametrize("argv, needle", [
    (["apply", NAME, "--dry-run", "--set", "num_layers=5"], "expected 5 attention block(s) but matched 4"),
    (["apply", f"{HERE}:mlp_factory", "--set", "vace_in_dim=4"], "but matched 0"),
])
def test_cli_match_errors_exit_2(argv, needle, capsys):
    line = cli_error(argv, capsys)
    assert needle in line and "nearest partial matches" in line


# --- row: surgery on a model that already has VACE or LoRA ----------------------------------

ORDER = "Base -> VACE -> LoRA"  # the VACE weights loader's order
SURGERY_ORDER = "Base -> vace -> LoRA"  # surgery's order names the rule


def _lora(model: nn.Module, wrap: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    config = LoraConfig(target_modules=["q", "v"], r=2)
    if wrap == "peft-model":
        return get_peft_model(model, config)
    return inject_adapter_in_model(config, model)


@pytest.mark.parametrize("case, needle", [
    ("rewritten", "already rewritten by rule 'vace'"),
    ("reference", "already carries vace modules"),
    ("injected", "already LoRA-wrapped"),
    ("peft-model", "already LoRA-wrapped (root is PeftModel)"),
])
def test_surgery_out_of_order_is_refused(case, needle):
    pipeline, model, inputs = build("streamdiffusionv2")
    if case == "rewritten":
        model = surgery.apply(model, vace.rule(), example_inputs=inputs).module
    elif case == "reference":
        model = CausalVaceWanModel(model)
    else:
        model = _lora(model, case)
    before = ModelSnapshot.take(model)
    with pytest.raises(OrderError) as info:
        surgery.apply(model, vace.rule(), example_inputs=inputs)
    message = one_line(info.value)
    assert needle in message and SURGERY_ORDER in message, message
    before.assert_unchanged(model)


def test_loading_vace_weights_after_lora_is_refused(weights_dir):
    pipeline, model, inputs = build()
    module = _lora(surgery.apply(model, vace.rule(), example_inputs=inputs).module, "injected")
    before = ModelSnapshot.take(module)
    with pytest.raises(OrderError) as info:
        load_vace_weights(module, weights_dir / "good.safetensors")
    assert ORDER in one_line(info.value)
    before.assert_unchanged(module)


def lora_factory():
    _, model, inputs = build()
    return _lora(model, "injected"), inputs


def test_cli_lora_wrapped_model_exit_2(capsys):
    line = cli_error(["apply", f"{HERE}:lora_factory"], capsys)
    assert "already LoRA-wrapped" in line and SURGERY_ORDER in line


# --- row: vace_context that does not fit the latent (at call time) --------------------------


@pytest.fixture(scope="module")
def rewritten():
    pipeline, model, inputs = build("memflow")
    result = surgery.apply(model, vace.rule(), example_inputs=inputs)
    result.module.load_state_dict(random_vace_state_dict(result.module, seed=2), strict=False)
    return pipeline, result.module


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _call_fails(rewritten, error: type, **rule_inputs: Any) -> str:
    """Call the rewritten model; it must raise before touching caches or building a graph."""
    pipeline, module = rewritten
    args, kwargs = example_call(module, pipeline, seed=4)
    caches = {k: kwargs[k] for k in ("kv_cache", "crossattn_cache", "kv_bank") if k in kwargs}
    before = snapshot_caches(caches)
    state = module.surgery_state
    built = state.built
    with pytest.raises(error) as info, torch.no_grad():
        module(*args, **kwargs, **rule_inputs)
    assert _equal(snapshot_caches(caches), before), "a failed call changed the caches"
    assert state.built == built, "a failed call built a specialisation"
    return one_line(info.value)


LATENT = "(1, 16, 3, 4, 4)"


@pytest.mark.parametrize("shape", [(1, 48, 3, 4, 4), (1, 96, 3, 8, 4), (1, 96, 3, 4, 2), (1, 16, 3, 4, 4)])
def test_vace_context_that_does_not_fit_names_both_shapes(shape, rewritten):
    message = _call_fails(rewritten, CallError, vace_context=torch.randn(shape))
    assert f"of shape {shape[1:]}" in message and f"latent of shape {LATENT}" in message, message


@pytest.mark.parametrize("context, needle", [
    (torch.randn(2, 96, 3, 4, 4), "2 entries for a batch of 1"),
    ([torch.randn(96, 4, 4)], "has shape (96, 4, 4), expected [channels, frames, height, width]"),
    (["not a tensor"], "has shape str"),
])
def test_vace_context_of_the_wrong_structure_is_refused(context, needle, rewritten):
    assert needle in _call_fails(rewritten, CallError, vace_context=context)


def test_unbatched_vace_context_is_refused_naming_both_shapes(rewritten):
    """A bare [C, F, H, W] tensor (batch dimension forgotten) must not fail inside the VACE branch."""
    message = _call_fails(rewritten, CallError, vace_context=torch.randn(96, 3, 4, 4))
    assert "(96, 3, 4, 4)" in message and LATENT in message, message


# --- row: vace_context_scale of the wrong length or not finite ------------------------------


@pytest.mark.parametrize("scale, needle", [
    ([1.0], "1 values for 2 VACE layers"),
    ([1.0, 1.0, 1.0], "3 values for 2 VACE layers"),
    (float("nan"), "not all finite"),
    (float("inf"), "not all finite"),
    ([1.0, float("-inf")], "not all finite"),
    (torch.tensor([1.0, float("nan")]), "not all finite"),
    ("1.0", "must be a number or a sequence"),
    (True, "must be a number or a sequence"),
])
def test_bad_vace_context_scale_is_refused_at_call_time(scale, needle, rewritten):
    message = _call_fails(rewritten, CallError, vace_context=torch.randn(1, 96, 3, 4, 4), vace_context_scale=scale)
    assert needle in message, message


# --- row: --report DIR that cannot be written, or an interrupted write --------------------


def _report_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_cli_report_dir_that_cannot_be_created_exit_2(where, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    target = blocker if where == "is-a-file" else blocker / "sub"
    line = cli_error(["apply", NAME, "--dry-run", "--report", str(target)], capsys)
    needle = "exists and is not a directory" if where == "is-a-file" else "cannot create report directory"
    assert str(target) in line and needle in line, line
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write read-only directories")
def test_cli_read_only_report_dir_exit_2(tmp_path, capsys):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        line = cli_error(["apply", NAME, "--dry-run", "--report", str(target)], capsys)
    finally:
        target.chmod(0o755)
    assert str(target) in line and _report_files(target) == []


def _failing_after(monkeypatch, name: str, calls: int, exc: BaseException) -> None:
    """Make call ``calls`` + 1 of ``os.<name>``, as seen by surgery.reports.files, fail (once)."""
    real = getattr(os, name)
    count = {"n": 0}

    def fake(*args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        if count["n"] == calls + 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(report_files, "os", _OsProxy(name, fake))


class _OsProxy:
    """``os`` with one function replaced, visible only to the module it is installed in."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self._name, self._fn = name, fn

    def __getattr__(self, attr: str) -> Any:
        return self._fn if attr == self._name else getattr(os, attr)


OLD_JSON, OLD_MD = '{"old": true}\n', "# old report\n"


@pytest.mark.parametrize("fault", [
    ("fsync", 1, OSError(errno.ENOSPC, "No space left on device")),   # second file's data
    ("fsync", 0, OSError(errno.EIO, "Input/output error")),           # first file's data
    ("replace", 1, OSError(errno.EIO, "Input/output error")),         # between the two renames
], ids=["disk-full-second-file", "io-error-first-file", "rename-fails-second-file"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "old-report"])
def test_interrupted_report_write_leaves_no_partial_report(fault, existing, tmp_path, monkeypatch):
    directory = tmp_path / "report"
    if existing:
        directory.mkdir()
        (directory / REPORT_JSON).write_text(OLD_JSON)
        (directory / REPORT_MD).write_text(OLD_MD)
    name, calls, exc = fault
    _failing_after(monkeypatch, name, calls, exc)
    with pytest.raises(ReportError) as info:
        write_report(directory, {"new": True}, "# new report")
    assert str(directory) in one_line(info.value)
    if existing:
        assert _report_files(directory) == [REPORT_JSON, REPORT_MD]
        assert (directory / REPORT_JSON).read_text() == OLD_JSON
        assert (directory / REPORT_MD).read_text() == OLD_MD
    else:
        assert _report_files(directory) == []


@pytest.mark.parametrize("when", [0, 1])
def test_keyboard_interrupt_during_report_write_leaves_nothing(when, tmp_path, monkeypatch):
    directory = tmp_path / "report"
    _failing_after(monkeypatch, "fsync", when, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_report(directory, {"new": True}, "# new report")
    assert _report_files(directory) == []


def test_cli_interrupted_report_write_exit_2_and_no_files(tmp_path, monkeypatch, capsys):
    directory = tmp_path / "report"
    _failing_after(monkeypatch, "fsync", 1, OSError(errno.ENOSPC, "No space left on device"))
    line = cli_error(["apply", NAME, "--dry-run", "--report", str(directory)], capsys)
    assert "No space left on device" in line and str(directory) in line
    assert _report_files(directory) == []


def test_cli_report_is_complete_json_when_written(tmp_path, capsys):
    """Control for the tests above: the same command without faults writes both files."""
    directory = tmp_path / "report"
    assert main(["apply", NAME, "--dry-run", "--report", str(directory)]) == 0
    capsys.readouterr()
    assert _report_files(directory) == [REPORT_JSON, REPORT_MD]
    json.loads((directory / REPORT_JSON).read_text())


# --- row: package.module:factory that does not import, or returns a non-module ---------------


def returns_a_number():
    return 42


def returns_a_dict():
    return {"model": nn.Linear(2, 2)}


def raises_inside():
    raise ValueError("checkpoint path not configured")


NOT_CALLABLE = "a string"


@pytest.fixture
def broken_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "broken_models_for_surgery.py").write_text("import torch\nraise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "broken_models_for_surgery"
    sys.modules.pop("broken_models_for_surgery", None)


@pytest.mark.parametrize("spec, needles", [
    ("no_such_package_xyz.models:build", ["cannot import 'no_such_package_xyz.models'", "ModuleNotFoundError"]),
    (f"{HERE}:no_such_factory", ["has no attribute 'no_such_factory'"]),
    (f"{HERE}:returns_a_number", ["returns_a_number returned int, not a torch.nn.Module"]),
    (f"{HERE}:returns_a_dict", ["returns_a_dict returned dict, not a torch.nn.Module"]),
    (f"{HERE}:NOT_CALLABLE", ["NOT_CALLABLE is a str, not a model factory"]),
    (f"{HERE}:raises_inside", ["raises_inside", "ValueError", "checkpoint path not configured"]),
])
def test_bad_factory_is_named(spec, needles, capsys):
    with pytest.raises(InputError) as info:
        loading.load_model(spec)
    message = one_line(info.value)
    assert spec in message and all(n in message for n in needles), message
    line = cli_error(["apply", spec], capsys)
    assert all(n in line for n in needles), line


def test_factory_module_failing_at_import_is_named(broken_module, capsys):
    spec = f"{broken_module}:build"
    with pytest.raises(InputError) as info:
        loading.load_model(spec)
    message = one_line(info.value)
    assert spec in message and "RuntimeError: half-written module" in message
    assert "half-written module" in cli_error(["apply", spec], capsys)


# --- every error class is a one-line SurgeryError -------------------------------------------


def test_error_messages_collapse_to_one_line():
    error = WeightsError("a\nproblem  spread\tover lines", "a\nfix")
    assert isinstance(error, SurgeryError) and one_line(error) == "a problem spread over lines; fix: a fix"
