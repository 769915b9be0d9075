"""The command line covers the API: --lora/--lora-scale, --key-map, --dtype, --device, --version, help.

Refusals run with the fake engine and check that nothing was built or traced (the
``engine`` fixture of ``test_cli_robust`` records every model load and engine call). The
flags that change the model run the real engine on the tiny LongLive stand-in and compare
with the same steps through the Python API, bit for bit.
"""
from __future__ import annotations

import argparse
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from examples import PIPELINES
from examples.driver import example_call
from examples.reference import random_vace_state_dict
from report_fakes import Tiny
from rules import vace
from rules.vace import load_vace_weights
from rules.vace.keymaps import NATIVE_TO_DIFFUSERS
from surgery.cli import commands
from surgery.cli.main import build_parser, main
from surgery.lora import load_lora_file
from surgery.weights import apply_key_map, compile_key_map
from test_cli_basic import FACTORY
from test_cli_robust import engine, error_line, refused_before_work  # noqa: F401 (engine is a fixture)

pytest.importorskip("peft")

NAME = "longlive"
PIPELINE = PIPELINES[NAME]
LORA_TARGETS = ("blocks.0.self_attn.q", "blocks.2.ffn.0", "vace_blocks.0.self_attn.v", "vace_blocks.1.cross_attn.o")
RECEIVED: list[dict] = []  # what typed_factory was called with


# --- factories the CLI imports as tests.test_cli_options:... -------------------------


def typed_factory(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    RECEIVED.append({"dtype": dtype, "device": device})
    return Tiny().to(device=device, dtype=dtype), ((torch.randn(2, 5, 4, dtype=dtype, device=device),), {})


def careless_factory(dtype: torch.dtype = torch.float32):
    return Tiny(), ((torch.randn(2, 5, 4),), {})  # ignores the dtype it is given


A_MODEL = Tiny()


# --- files and the API path ------------------------------------------------------------


def api_rewritten() -> surgery.ApplyResult:
    """What `surgery apply longlive` builds, through the API (same build, seed and example call)."""
    base = PIPELINE.build("tiny", seed=0)
    return surgery.apply(base, vace.rule(), example_inputs=example_call(base, PIPELINE, seed=0))


def one_call(model: torch.nn.Module) -> torch.Tensor:
    """One denoising call with a VACE context and fresh caches."""
    ctx = torch.randn(1, 96, PIPELINE.config.num_frame_per_block, 4, 4, generator=torch.Generator().manual_seed(1))
    args, kwargs = example_call(model, PIPELINE, height=32, width=32, vace_context=ctx)
    with torch.no_grad():
        return model(*args, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Non-zero VACE weights (native and diffusers names) and a LoRA on main and VACE blocks."""
    root = tmp_path_factory.mktemp("cli_options")
    module = api_rewritten().module
    weights = random_vace_state_dict(module, seed=3)
    paths = {"weights": root / "vace.safetensors", "diffusers": root / "vace_diffusers.safetensors",
             "lora": root / "lora.safetensors"}
    save_file(weights, str(paths["weights"]))
    renames = compile_key_map(NATIVE_TO_DIFFUSERS)
    save_file({apply_key_map(k, renames): v for k, v in weights.items()}, str(paths["diffusers"]))
    g = torch.Generator().manual_seed(5)
    lora = {}
    for target in LORA_TARGETS:
        linear = module.get_submodule(target)
        lora[f"{target}.lora_A.weight"] = torch.randn(2, linear.in_features, generator=g) / 8
        lora[f"{target}.lora_B.weight"] = torch.randn(linear.out_features, 2, generator=g) / 8
    save_file(lora, str(paths["lora"]))
    return paths


@pytest.fixture
def rewritten(monkeypatch) -> dict:
    """The real engine, keeping the result of the CLI's apply under ``["result"]``."""
    seen: dict = {}
    real_backend = commands.engine_backend

    def backend() -> commands.Backend:
        real = real_backend()
        apply = real.apply

        def recording(*args, **kwargs):
            seen["result"] = apply(*args, **kwargs)
            return seen["result"]

        real.apply = recording
        return real

    monkeypatch.setattr(commands, "engine_backend", backend)
    return seen


# --- help, version ---------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {parser.prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(_parsers(sub))
    return found


def test_every_flag_of_every_subcommand_has_help():
    parsers = _parsers(build_parser())
    assert set(parsers) == {"surgery", *(f"surgery {c}" for c in ("apply", "validate", "diff", "rules", "models",
                                                                  "bench"))}
    for prog, parser in parsers.items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (prog, action.dest)
    options = {a.option_strings[0] for a in parsers["surgery apply"]._actions if a.option_strings}
    assert {"--lora", "--lora-scale", "--lora-key-map", "--key-map", "--dtype", "--device"} <= options


@pytest.mark.parametrize("command", ["apply", "validate", "diff", "rules", "models"])
def test_help_of_each_subcommand_exits_0(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: surgery {command}") and "--debug" in out


def test_version_prints_the_package_and_torch_versions(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"surgery {version('surgery')} (torch {torch.__version__})\n"


# --- refused before any work -----------------------------------------------------------


@pytest.mark.parametrize("device, needle", [
    ("meta", "--device meta holds no values"),
    ("bogus", "unknown device 'bogus'"),
    ("cuda:99", "sees no cuda device" if not torch.cuda.is_available() else "cuda device(s)"),
])
@pytest.mark.parametrize("command", ["apply", "diff"])
def test_bad_or_missing_device_is_refused_before_work(command, device, needle, engine, capsys):
    refused_before_work([command, NAME, "--device", device], engine, capsys, needle)


@pytest.mark.parametrize("argv, needle", [
    (["--key-map", "diffusers"], "--key-map needs --weights"),
    (["--lora-scale", "2"], "--lora-scale needs --lora"),
    (["--lora-key-map", "diffusers"], "--lora-key-map needs --lora"),
    (["--dry-run", "--lora", "{lora}"], "--lora needs the rewritten model, which --dry-run does not build"),
    (["--lora", "{missing}"], "LoRA file {missing} does not exist"),
    (["--set", "profile=wan", "--weights", "{weights}", "--key-map", "nope"],
     "--key-map 'nope' is not a key map of rule vace; fix: use one of diffusers"),
])
def test_weight_options_are_checked_before_work(argv, needle, files, tmp_path, engine, capsys):
    values = {"lora": files["lora"], "weights": files["weights"], "missing": tmp_path / "none.safetensors"}
    refused_before_work(["apply", NAME, *(a.format(**values) for a in argv)], engine, capsys, needle.format(**values))


def test_unknown_key_map_of_a_family_rule_is_refused_before_surgery(files, engine, capsys):
    # Without profile= the rule adapts to the model's family, whose key maps are known once it is built.
    line = error_line(["apply", NAME, "--weights", str(files["weights"]), "--key-map", "native"], capsys)
    assert "--key-map 'native' is not a key map of rule vace for this model; fix: use one of diffusers" in line
    assert not [c for c in engine.calls if c[0] != "load_model"]


@pytest.mark.parametrize("scale", ["nan", "inf", "x"])
def test_lora_scale_must_be_finite(scale, engine, capsys):
    line = error_line(["apply", NAME, "--lora-scale", scale], capsys)
    assert line.startswith("surgery apply: error: argument --lora-scale:")
    assert engine.calls == []


@pytest.mark.parametrize("argv, needle", [
    ([FACTORY, "--dtype", "bfloat16"], "takes no dtype argument, so --dtype cannot be applied"),
    ([f"{__name__}:A_MODEL", "--device", "cpu"], "is a model, not a factory, so --device cannot be applied"),
    ([f"{__name__}:careless_factory", "--dtype", "float16"],
     "was given dtype=torch.float16 but returned parameter embed.weight in torch.float32"),
])
def test_factory_must_take_and_honour_dtype_and_device(argv, needle, engine, capsys):
    line = error_line(["apply", *argv], capsys)
    assert needle in line and "; fix: " in line
    assert [c[0] for c in engine.calls] == ["load_model"]


def test_factory_gets_dtype_and_device(engine, capsys):
    RECEIVED.clear()
    assert main(["apply", f"{__name__}:typed_factory", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert RECEIVED == [{"dtype": torch.bfloat16, "device": torch.device("cpu")}]
    RECEIVED.clear()
    assert main(["apply", f"{__name__}:typed_factory"]) == 0
    assert RECEIVED == [{"dtype": torch.float32, "device": "cpu"}]  # nothing given: the factory's defaults
    assert [c[0] for c in engine.calls] == ["load_model", "apply", "load_model", "apply"]


def test_lora_and_key_map_reach_the_engine(files, engine, capsys):
    argv = ["apply", FACTORY, "--weights", str(files["weights"]), "--key-map", "diffusers",
            "--lora", str(files["lora"]), "--lora-scale", "0.5", "--lora-key-map", "diffusers"]
    assert main(argv) == 0
    assert [c for c in engine.calls if c[0].startswith("load_")] == [
        ("load_model", FACTORY),
        ("load_weights", True, str(files["weights"]), "diffusers"),
        ("load_lora", True, str(files["lora"]), 0.5, "diffusers"),
    ]
    assert "LoRA: " in capsys.readouterr().out


# --- the real engine -------------------------------------------------------------------


def test_lora_after_weights_equals_the_api_bit_for_bit(files, rewritten, capsys):
    argv = ["apply", NAME, "--no-validate", "--weights", str(files["weights"]), "--lora", str(files["lora"]),
            "--lora-scale", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA: " in out and "blocks: 2, vace_blocks: 2" in out
    cli = rewritten["result"].module

    api = api_rewritten().module
    load_vace_weights(api, files["weights"], expect_vace_in_dim=96)
    without_lora = one_call(api)
    load_lora_file(api, files["lora"], scale=0.5)
    with_lora = one_call(api)
    assert not torch.equal(with_lora, without_lora)  # the LoRA changes the output
    assert torch.equal(one_call(cli), with_lora)  # and the CLI did exactly what the API does


def test_diffusers_weights_name_the_flag_then_load_with_it(files, rewritten, capsys):
    line = error_line(["apply", NAME, "--no-validate", "--weights", str(files["diffusers"])], capsys)
    assert line.endswith("; fix: the file uses diffusers names: pass --key-map diffusers"), line
    assert "key_map=" not in line

    assert main(["apply", NAME, "--no-validate", "--weights", str(files["diffusers"]), "--key-map", "diffusers"]) == 0
    state = rewritten["result"].module.state_dict()
    expected = load_file(str(files["weights"]))
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_dtype_bfloat16_builds_a_bfloat16_model(rewritten, capsys):
    assert main(["apply", NAME, "--no-validate", "--dtype", "bfloat16"]) == 0
    module = rewritten["result"].module
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    assert dtypes == {torch.bfloat16}
    assert one_call(module).dtype == torch.bfloat16
