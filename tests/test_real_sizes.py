"""Real sizes on the command line: base weights from a checkpoint, never a random base, streamed saves.

`surgery apply MODEL --size 1.3B --weights FULL --save OUT` used to build a randomly initialised
base model (13 GB at 1.3B) just to save the VACE branch, and ignored the base keys of a full
checkpoint. Here, at tiny size (the 1.3B measurement is benchmarks/peak_memory.py, not CI):
the base of a full checkpoint (or of --base-weights) loads bit for bit into a model built on
meta, with no init function writing a single value; base keys that do not fit are one line;
--save streams the branch and reads back as the checkpoint's VACE tensors; at real sizes (here
the 1.3B path run with tiny dimensions) a base without a file is zero pages, not random.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgery
from examples import PIPELINES
from examples.driver import example_call
from examples.reference import random_vace_state_dict
from examples.wan import pipeline as wan_pipeline
from rules import vace
from rules.vace import DEFAULT_VACE_PREFIXES, load_vace_weights
from rules.vace.keymaps import NATIVE_TO_DIFFUSERS
from surgery.cli import commands
from surgery.cli.main import main
from surgery.cli.safetensors_out import write_safetensors
from surgery.errors import InputError
from surgery.weights import apply_key_map, compile_key_map

NAME = "longlive"
PIPELINE = PIPELINES[NAME]
FILE_SEED = 11  # the checkpoint's base differs from the CLI's seed-0 random base
INIT_FUNCTIONS = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")
                  and callable(getattr(torch.nn.init, name))]


def is_vace(key: str) -> bool:
    return key.startswith(DEFAULT_VACE_PREFIXES)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    """A tiny full checkpoint: a seed-11 base and non-zero VACE weights, native keys."""
    base = PIPELINE.build("tiny", seed=FILE_SEED)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, PIPELINE))
    tensors = {k: v.detach().clone() for k, v in result.module.state_dict().items() if not is_vace(k)}
    tensors.update(random_vace_state_dict(result.module, seed=3))
    return tensors


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real_sizes")
    paths = {name: root / f"{name}.safetensors" for name in ("full", "base", "vace", "full_bf16", "diffusers")}
    save_file(checkpoint, str(paths["full"]))
    save_file({k: v for k, v in checkpoint.items() if not is_vace(k)}, str(paths["base"]))
    save_file({k: v for k, v in checkpoint.items() if is_vace(k)}, str(paths["vace"]))
    save_file({k: v.to(torch.bfloat16) for k, v in checkpoint.items()}, str(paths["full_bf16"]))
    renames = compile_key_map(NATIVE_TO_DIFFUSERS)
    save_file({apply_key_map(k, renames): v for k, v in checkpoint.items()}, str(paths["diffusers"]))
    return paths


@dataclass
class Run:
    """One in-process CLI run, with what the engine saw and which init functions wrote values."""

    code: int
    out: str
    err: str
    builds: list[str] = field(default_factory=list)  # init= of every built-in model build
    wrote: list[str] = field(default_factory=list)  # nn.init functions called on a tensor with storage
    model: Any = None  # the base model surgery was applied to
    result: Any = None

    @property
    def line(self) -> str:
        lines = self.err.strip("\n").split("\n")
        assert len(lines) == 1 and "Traceback" not in self.err, self.err
        return lines[0]


@contextlib.contextmanager
def watched_inits(run: Run, patch: pytest.MonkeyPatch):
    """Record every ``torch.nn.init`` call that writes values (on a tensor that is not ``meta``)."""
    for name in INIT_FUNCTIONS:
        real = getattr(torch.nn.init, name)

        def spy(tensor, *args, _real=real, _name=name, **kwargs):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                run.wrote.append(_name)
            return _real(tensor, *args, **kwargs)

        patch.setattr(torch.nn.init, name, spy)
    yield


def cli(argv: list[str], sizes: dict[str, dict] | None = None) -> Run:
    """Run ``surgery ARGV`` with the real engine, recording the model, the result, builds and inits."""
    run = Run(0, "", "")
    real_backend = commands.engine_backend
    real_build = wan_pipeline.PipelineSpec.build

    def backend() -> commands.Backend:
        engine = real_backend()
        apply = engine.apply

        def recording(model, *args, **kwargs):
            run.model = model
            run.result = apply(model, *args, **kwargs)
            return run.result

        engine.apply = recording
        return engine

    def build(self, *args, **kwargs):
        run.builds.append(kwargs.get("init", "random"))
        return real_build(self, *args, **kwargs)

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, watched_inits(run, patch):
        patch.setattr(commands, "engine_backend", backend)
        patch.setattr(wan_pipeline.PipelineSpec, "build", build)
        for size, dims in (sizes or {}).items():
            patch.setitem(wan_pipeline.MODEL_SIZES, size, dims)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run.code = main(argv)
    run.out, run.err = out.getvalue(), err.getvalue()
    return run


def assert_state(module: torch.nn.Module, expected: dict[str, torch.Tensor], keys: list[str]) -> None:
    """Bit for bit: same dtype and values for every key."""
    state = module.state_dict()
    assert keys, "nothing to compare"
    for key in keys:
        assert state[key].dtype == expected[key].dtype and torch.equal(state[key], expected[key]), key


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory) -> tuple[Run, Path]:
    saved = tmp_path_factory.mktemp("full_run") / "branch.safetensors"
    return cli(["apply", NAME, "--no-validate", "--weights", str(files["full"]), "--save", str(saved)]), saved


# --- a full checkpoint: base and VACE from one file --------------------------------------


def test_the_init_spy_sees_a_random_build():
    """The check below can fail: a random tiny build writes values through torch.nn.init."""
    run = Run(0, "", "")
    with pytest.MonkeyPatch.context() as patch, watched_inits(run, patch):
        PIPELINE.build("tiny", seed=0)
    assert run.wrote


def test_full_checkpoint_builds_the_base_on_meta_without_any_init(full_run):
    run, _ = full_run
    assert run.code == 0, run.err
    assert run.builds == ["meta"]
    assert run.wrote == []
    assert "Base weights: " in run.out and "tensors left for the rule's weights" in run.out


def test_full_checkpoint_loads_base_and_vace_bit_for_bit(full_run, checkpoint):
    run, _ = full_run
    base_keys = [k for k in checkpoint if not is_vace(k)]
    assert_state(run.model, checkpoint, base_keys)
    assert_state(run.result.module, checkpoint, list(checkpoint))
    assert {p.device.type for p in run.result.module.parameters()} == {"cpu"}
    # Zero copy: the rewritten model holds the loaded base tensors themselves.
    assert all(run.result.module.state_dict()[k].data_ptr() == run.model.state_dict()[k].data_ptr()
               for k in base_keys)


def test_save_writes_the_checkpoints_vace_tensors_and_reads_back(full_run, checkpoint):
    _, saved = full_run
    tensors = load_file(str(saved))
    assert sorted(tensors) == sorted(k for k in checkpoint if is_vace(k))
    assert all(tensors[k].dtype == checkpoint[k].dtype and torch.equal(tensors[k], checkpoint[k]) for k in tensors)
    with safe_open(str(saved), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "surgery_rule": "vace"}
    base = PIPELINE.build("tiny", seed=0)
    fresh = surgery.apply(base, vace.rule(), example_inputs=example_call(base, PIPELINE)).module
    report = load_vace_weights(fresh, saved)
    assert report.tensors == len(tensors)
    assert_state(fresh, checkpoint, list(tensors))


def test_base_weights_and_a_vace_only_file_equal_the_full_checkpoint(files, checkpoint):
    run = cli(["apply", NAME, "--no-validate", "--base-weights", str(files["base"]), "--weights", str(files["vace"])])
    assert run.code == 0, run.err
    assert run.builds == ["meta"] and run.wrote == []
    assert_state(run.result.module, checkpoint, list(checkpoint))


def test_a_vace_only_file_keeps_the_random_tiny_base(files, checkpoint):
    run = cli(["apply", NAME, "--no-validate", "--weights", str(files["vace"])])
    assert run.code == 0, run.err
    assert run.builds == ["random"] and "Base weights" not in run.out
    random_base = PIPELINE.build("tiny", seed=0).state_dict()
    assert_state(run.result.module, random_base, list(random_base))
    assert_state(run.result.module, checkpoint, [k for k in checkpoint if is_vace(k)])


def test_the_model_dtype_follows_the_base_checkpoint(files, checkpoint):
    run = cli(["apply", NAME, "--no-validate", "--weights", str(files["full_bf16"])])
    assert run.code == 0, run.err
    assert {p.dtype for p in run.result.module.parameters()} == {torch.bfloat16}
    widened = cli(["apply", NAME, "--no-validate", "--weights", str(files["full_bf16"]), "--dtype", "float32"])
    assert widened.code == 0, widened.err
    assert_state(widened.result.module, {k: v.to(torch.bfloat16).float() for k, v in checkpoint.items()},
                 list(checkpoint))


def test_key_map_renames_the_base_keys_too(files, checkpoint):
    line = cli(["apply", NAME, "--no-validate", "--weights", str(files["diffusers"])]).line
    assert "does not fit the model: 121 base keys missing" in line
    assert "fix: the file uses diffusers names: pass --key-map diffusers" in line
    run = cli(["apply", NAME, "--no-validate", "--weights", str(files["diffusers"]), "--key-map", "diffusers"])
    assert run.code == 0, run.err
    assert_state(run.result.module, checkpoint, list(checkpoint))


def test_a_factory_model_gets_the_base_of_a_full_checkpoint(files, checkpoint):
    run = cli(["apply", f"{__name__}:random_longlive", "--weights", str(files["full"])])
    assert run.code == 0, run.err
    assert_state(run.result.module, checkpoint, list(checkpoint))


def random_longlive() -> torch.nn.Module:
    return PIPELINE.build("tiny", seed=5)


# --- refusals: one line, nothing written -------------------------------------------------


@pytest.mark.parametrize("change, needles", [
    ("drop", ["1 base keys missing from the file (blocks.1.ffn.0.weight)"]),
    ("extra", ["1 unexpected keys in the file (blocks.9.ffn.0.weight)"]),
    ("shape", ["1 shape mismatches, model vs file (head.head.weight: [64, 64] vs [64, 63])"]),
])
def test_base_keys_that_do_not_fit_are_one_line(change, needles, checkpoint, tmp_path):
    tensors = dict(checkpoint)
    if change == "drop":
        del tensors["blocks.1.ffn.0.weight"]
    elif change == "extra":
        tensors["blocks.9.ffn.0.weight"] = torch.ones(2, 2)
    else:
        tensors["head.head.weight"] = tensors["head.head.weight"][:, :63].contiguous()
    path, saved = tmp_path / "bad.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(path))
    run = cli(["apply", NAME, "--no-validate", "--weights", str(path), "--save", str(saved)])
    assert run.code == 2
    assert run.line.startswith(f"surgery: error: {path} does not fit the model: ") and "; fix: " in run.line
    assert all(n in run.line for n in needles), run.line
    assert run.line.endswith("; fix: use the file made for this model, or pass --key-map NAME for its layout "
                             "(rule vace has: diffusers)"), run.line
    assert run.result is None and not saved.exists()


def test_a_base_tensor_that_is_not_floating_point_is_one_line(checkpoint, tmp_path):
    tensors = dict(checkpoint)
    tensors["blocks.0.ffn.0.bias"] = torch.arange(tensors["blocks.0.ffn.0.bias"].numel())
    path = tmp_path / "int.safetensors"
    save_file(tensors, str(path))
    run = cli(["apply", NAME, "--no-validate", "--weights", str(path)])
    assert run.code == 2 and run.result is None
    assert run.line == (f"surgery: error: {path}: 1 base tensors are not floating point (blocks.0.ffn.0.bias (int64)), "
                        "and integer or bool values are never converted to weights; fix: use a checkpoint that stores "
                        "the weights as float32, bfloat16 or float16")


@pytest.mark.parametrize("argv, needle", [
    (["--base-weights", "{vace}"], "--base-weights {vace} holds no base-model weights, only rule vace's keys "
                                   "(vace_blocks., vace_patch_embedding.); fix: pass the base model's checkpoint to "
                                   "--base-weights, and this file to --weights"),
    (["--base-weights", "{base}", "--weights", "{full}"],
     "--weights {full} is a full checkpoint (123 base tensors besides rule vace's keys) and --base-weights {base} "
     "holds a base too; fix: drop --base-weights"),
    (["--base-weights", "{base}", "--dry-run"], "--base-weights needs the rewritten model, which --dry-run does not build"),
    (["--size", "1.3B", "--validate"], "validating longlive at --size 1.3B needs the base model's weights, and random "
                                       "ones are made only at --size tiny; fix: pass a full checkpoint"),
])
def test_where_the_base_comes_from_is_checked_before_work(argv, needle, files):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    run = cli(["apply", NAME, *argv])
    assert run.code == 2 and needle.format(**{k: str(v) for k, v in files.items()}) in run.line, run.line
    assert run.builds == [] and run.model is None


# --- the real-size path (1.3B with tiny dimensions, so that CI stays small) ----------------


def test_real_size_save_without_weights_is_meta_then_zero_pages(tmp_path):
    saved = tmp_path / "branch.safetensors"
    run = cli(["apply", NAME, "--size", "1.3B", "--save", str(saved)], sizes={"1.3B": wan_pipeline.MODEL_SIZES["tiny"]})
    assert run.code == 0, run.err
    assert run.builds == ["meta"] and run.wrote == []
    state = run.model.state_dict()
    assert state and all(t.device.type == "cpu" and not t.any() for t in state.values())
    tensors = load_file(str(saved))
    branch = {k: v for k, v in run.result.module.state_dict().items() if is_vace(k)}
    assert sorted(tensors) == sorted(branch) and all(not t.any() for t in tensors.values())


def test_real_size_full_checkpoint_loads_its_base(files, checkpoint, tmp_path):
    saved = tmp_path / "branch.safetensors"
    run = cli(["apply", NAME, "--size", "1.3B", "--weights", str(files["full"]), "--save", str(saved)],
              sizes={"1.3B": wan_pipeline.MODEL_SIZES["tiny"]})
    assert run.code == 0, run.err
    assert run.builds == ["meta"] and run.wrote == []
    assert_state(run.result.module, checkpoint, list(checkpoint))
    tensors = load_file(str(saved))
    assert all(torch.equal(tensors[k], checkpoint[k]) for k in tensors) and len(tensors) == 62


# --- the streamed safetensors writer ------------------------------------------------------


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    path = write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"k": "v"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
               for k, v in tensors.items())
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"k": "v"}
    # Values made on the fly from a meta layout give the same file.
    layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    made = write_safetensors(tmp_path / "lazy.safetensors", layout, values=tensors.__getitem__, metadata={"k": "v"})
    assert made.read_bytes() == path.read_bytes()


def test_streamed_file_refuses_values_that_break_the_header_and_leaves_nothing(tmp_path):
    layout = {"a": torch.empty(2, device="meta"), "b": torch.empty(3, device="meta")}
    values = {"a": torch.ones(2), "b": torch.ones(4)}
    target = tmp_path / "t.safetensors"
    with pytest.raises(InputError, match=r"tensor 'b' is torch.float32 \[4\] but its header entry says torch.float32 \[3\]"):
        write_safetensors(target, layout, values=values.__getitem__)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="cannot save 'a': it is on the meta device"):
        write_safetensors(target, layout)
    assert list(tmp_path.iterdir()) == []


def mapping_rss_kib(address: int) -> int:
    """Resident KiB of the memory mapping holding ``address`` (Linux ``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux /proc/self/smaps")
def test_saving_a_fresh_branch_commits_no_memory(tmp_path):
    """Zero pages read as the kernel's zero page (a private mapping), so saving them commits nothing."""
    from surgery.grafting.build import zeros

    fresh = zeros((16, 1 << 18), dtype=torch.float32, device=torch.device("cpu"))  # 16 MiB
    # The kernel may merge the mapping with a neighbouring private one (a long test run's heap
    # arenas), so the change of its resident size is measured, not the size itself.
    before = mapping_rss_kib(fresh.data_ptr())
    write_safetensors(tmp_path / "zeros.safetensors", {"w": fresh})
    assert mapping_rss_kib(fresh.data_ptr()) - before < 4 * 1024  # a shared mapping would commit 16 MiB
    assert not load_file(str(tmp_path / "zeros.safetensors"))["w"].any()
    before = mapping_rss_kib(fresh.data_ptr())
    fresh[:8] = 1.0  # written pages are committed: the measurement sees them
    assert mapping_rss_kib(fresh.data_ptr()) - before >= 8 * 1024


def test_a_base_of_another_size_names_the_size_it_was_made_for(files):
    run = cli(["apply", NAME, "--size", "1.3B", "--no-validate", "--weights", str(files["full"])])
    assert run.code == 2 and run.builds == ["meta"] and run.result is None
    assert "does not fit the model: " in run.line and "shape mismatches, model vs file (" in run.line
    assert run.line.endswith(f"; fix: {files['full']} is for --size tiny: pass --size tiny"), run.line
