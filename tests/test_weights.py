"""VACE weights from safetensors: every accepted layout, every error row, dtype handling.

The target is a small stand-in with native VACE keys (the engine and the reference build
the same key layout); the files are written here with seeded random non-zero weights.
"""
from __future__ import annotations

import io
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rules.vace import load_vace_weights
from rules.vace.keymaps import DIFFUSERS_TO_NATIVE, NATIVE_TO_DIFFUSERS
from surgery.errors import OrderError, RuleError, WeightsError
from surgery.weights import LoadReport, apply_key_map, compile_key_map, read_header

DIM, FFN, VACE_IN, MAIN_LAYERS, VACE_BLOCKS = 64, 128, 96, 4, 2


# --------------------------------------------------------------------------- stand-in model
class Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim), nn.RMSNorm(dim)


class Block(nn.Module):
    """27 tensors like a Wan block; VACE blocks add after_proj (and before_proj on block 0)."""

    def __init__(self, dim: int, ffn: int, vace_index: int | None = None) -> None:
        super().__init__()
        self.self_attn = Attn(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn = Attn(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        if vace_index == 0:
            self.before_proj = nn.Linear(dim, dim)
        if vace_index is not None:
            self.after_proj = nn.Linear(dim, dim)


class StandIn(nn.Module):
    def __init__(self, dim: int = DIM, ffn: int = FFN, vace_in: int = VACE_IN, vace_blocks: int = VACE_BLOCKS):
        super().__init__()
        self.patch_embedding = nn.Conv3d(16, dim, (1, 2, 2), (1, 2, 2))
        self.blocks = nn.ModuleList(Block(dim, ffn) for _ in range(MAIN_LAYERS))
        self.vace_patch_embedding = nn.Conv3d(vace_in, dim, (1, 2, 2), (1, 2, 2))
        self.vace_blocks = nn.ModuleList(Block(dim, ffn, k) for k in range(vace_blocks))


def vace_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("vace_")}


def exact_values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded non-zero float32 values exactly representable in bfloat16 AND float16.

    Magnitudes in [1/64, 4] with 8 significant bits survive every cast used here, so all
    layouts (whatever dtype they store) must load to identical parameters.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        x = torch.randn(shape, generator=g)
        x = torch.where(x < 0, -1.0, 1.0) * x.abs().clamp(1 / 64, 4)
        out[key] = x.to(torch.bfloat16).to(torch.float32)
    return out


def base_values(seed: int = 7) -> dict[str, torch.Tensor]:
    """Non-VACE tensors a full checkpoint also carries (must be ignored)."""
    model = StandIn()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("vace_")}
    shapes.update({"head.head.weight": (64, DIM), "head.modulation": (1, 2, DIM)})
    return exact_values(shapes, seed)


def diffusers_name(native: str) -> str:
    """diffusers name of a native VACE key, written out by hand from the conversion table.

    Independent of rules.vace.keymaps on purpose, so a wrong map cannot agree with itself.
    """
    if native.startswith("vace_patch_embedding."):
        return native
    block, rest = re.match(r"^(vace_blocks\.\d+)\.(.+)$", native).groups()
    if rest == "modulation":
        return f"{block}.scale_shift_table"
    module, _, leaf = rest.rpartition(".")
    table = {"norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
             "before_proj": "proj_in", "after_proj": "proj_out"}
    for native_attn, diff_attn in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        table.update({f"{native_attn}.q": f"{diff_attn}.to_q", f"{native_attn}.k": f"{diff_attn}.to_k",
                      f"{native_attn}.v": f"{diff_attn}.to_v", f"{native_attn}.o": f"{diff_attn}.to_out.0",
                      f"{native_attn}.norm_q": f"{diff_attn}.norm_q", f"{native_attn}.norm_k": f"{diff_attn}.norm_k"})
    return f"{block}.{table[module]}.{leaf}"


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return exact_values(vace_shapes(StandIn()), seed=1234)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int, int]]:
    return {k: (v.detach().clone(), v.data_ptr(), id(v)) for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = model.state_dict(keep_vars=True)
    assert now.keys() == snap.keys()
    for k, (value, ptr, ident) in snap.items():
        assert id(now[k]) == ident and now[k].data_ptr() == ptr and torch.equal(now[k].detach(), value), k


def assert_loaded(model: nn.Module, ref: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(sd[k].float(), v), k


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def expect_error(model: nn.Module, exc: type[Exception], pattern: str, *args, **kwargs) -> WeightsError:
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern) as info:
        load_vace_weights(model, *args, **kwargs)
    assert_unchanged(model, snap)
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------------------- layouts
def _layouts(tmp: Path, ref: dict[str, torch.Tensor]) -> dict[str, tuple[Path, dict]]:
    base = base_values()
    bf16 = {k: v.to(torch.bfloat16) for k, v in ref.items()}
    layouts: dict[str, tuple[Path, dict]] = {}
    layouts["vace-only bf16"] = (write(tmp / "vace_module_bf16.safetensors", bf16), {})
    layouts["vace-only fp32"] = (write(tmp / "vace_module_fp32.safetensors", ref), {})
    full = {**{k: v for k, v in base.items()}, **ref}
    layouts["full"] = (write(tmp / "full.safetensors", full), {})
    layouts["comfy prefix"] = (
        write(tmp / "comfy.safetensors", {f"model.diffusion_model.{k}": v.half() for k, v in full.items()}), {}
    )
    layouts["diffusion_model prefix"] = (
        write(tmp / "dm.safetensors", {f"diffusion_model.{k}": v for k, v in ref.items()}), {}
    )
    # Sharded with an index: base in shards 1-2, VACE split over shards 2-3 (mixed dtypes).
    shard_dir = tmp / "sharded"
    shard_dir.mkdir()
    keys = sorted(full)
    vace_keys = [k for k in keys if k.startswith("vace_")]
    groups = [
        [k for k in keys if not k.startswith("vace_")][:20],
        [k for k in keys if not k.startswith("vace_")][20:] + vace_keys[: len(vace_keys) // 2],
        vace_keys[len(vace_keys) // 2:],
    ]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-00003.safetensors"
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i - 1]
        write(shard_dir / name, {k: full[k].to(dtype) for k in group})
        weight_map.update({k: name for k in group})
    index = shard_dir / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    layouts["sharded index"] = (index, {})
    layouts["sharded dir"] = (shard_dir, {})
    glob_dir = tmp / "glob"
    glob_dir.mkdir()
    for p in shard_dir.glob("*.safetensors"):
        (glob_dir / p.name).write_bytes(p.read_bytes())
    layouts["shard set, no index"] = (glob_dir, {})
    one_dir = tmp / "one"
    one_dir.mkdir()
    write(one_dir / "diffusion_pytorch_model.safetensors", bf16)
    layouts["directory, one file"] = (one_dir, {})
    diffusers = {diffusers_name(k): v for k, v in bf16.items()}
    # Base keys in diffusers naming too, including the colliding top-level proj_out.
    diffusers.update({"proj_out.weight": base["head.head.weight"], "scale_shift_table": base["head.modulation"],
                      "blocks.0.attn1.to_q.weight": base["blocks.0.self_attn.q.weight"]})
    layouts["diffusers"] = (write(tmp / "diffusers.safetensors", diffusers), {"key_map": DIFFUSERS_TO_NATIVE})
    return layouts


def test_every_layout_loads_identical_parameters(tmp_path, ref):
    layouts = _layouts(tmp_path, ref)
    loaded = {}
    for name, (path, kwargs) in layouts.items():
        model = StandIn()
        before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("vace_")}
        report = load_vace_weights(model, path, expect_vace_in_dim=96, expect_blocks=VACE_BLOCKS, **kwargs)
        assert isinstance(report, LoadReport)
        assert (report.tensors, report.facts) == (len(ref), {"vace_in_dim": 96, "VACE blocks": VACE_BLOCKS}), name
        assert_loaded(model, ref)
        # Non-VACE parameters are never touched, even when the file carries them.
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), name
        loaded[name] = {k: v for k, v in after.items() if k.startswith("vace_")}
    first = next(iter(loaded.values()))
    for name, sd in loaded.items():
        assert all(torch.equal(sd[k], first[k]) for k in first), name
    assert all(v.any() for v in first.values())


def test_report_counts_and_rows(tmp_path, ref):
    path = write(tmp_path / "full.safetensors", {**base_values(), **ref})
    model = StandIn()
    report = load_vace_weights(model, path)
    assert report.ignored == len(base_values())
    assert report.file_dtypes == {"float32": len(ref)} and report.target_dtypes == {"float32": len(ref)}
    assert report.bytes_read == sum(v.numel() * 4 for v in ref.values())
    assert report.files == (str(path),) and report.seconds > 0
    rows = dict(report.as_rows())
    assert rows["VACE blocks"] == "2" and rows["vace_in_dim"] == "96"
    from rich.console import Console
    from rich.table import Table

    table = Table("field", "value")
    for row in report.as_rows():
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    assert "tensors loaded" in out.getvalue()
    assert json.dumps(report.as_dict())


def test_mixed_dtypes_are_converted_per_tensor(tmp_path, ref):
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    mixed = {k: v.to(dtypes[i % 3]) for i, (k, v) in enumerate(sorted(ref.items()))}
    path = write(tmp_path / "mixed.safetensors", mixed)
    want_file = {"bfloat16": 0, "float16": 0, "float32": 0}
    for v in mixed.values():
        want_file[str(v.dtype)[6:]] += 1

    fp32 = StandIn()
    ptrs = {k: v.data_ptr() for k, v in fp32.state_dict().items()}
    report = load_vace_weights(fp32, path)
    assert report.file_dtypes == want_file and report.target_dtypes == {"float32": len(ref)}
    assert (report.shared, report.copied, report.converted) == (
        0, want_file["float32"], len(ref) - want_file["float32"])
    assert_loaded(fp32, ref)
    # Every tensor was built in fresh storage and swapped in: no VACE parameter keeps its
    # old storage, so nothing is ever half-written.
    for k, v in fp32.state_dict().items():
        if k.startswith("vace_"):
            assert v.data_ptr() != ptrs[k] and v.dtype == torch.float32, k

    bf16 = StandIn().to(torch.bfloat16)
    report = load_vace_weights(bf16, path, mmap=True)
    assert report.target_dtypes == {"bfloat16": len(ref)}
    assert (report.shared, report.copied) == (want_file["bfloat16"], 0)
    for k, v in bf16.state_dict().items():
        if k.startswith("vace_"):
            assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k
    # Per-module dtypes are honoured too (e.g. norms kept in float32 inside a bf16 model).
    partial = StandIn().to(torch.bfloat16)
    partial.vace_blocks[0].norm3.float()
    load_vace_weights(partial, path)
    assert partial.vace_blocks[0].norm3.weight.dtype == torch.float32
    assert torch.equal(partial.vace_blocks[0].norm3.weight, ref["vace_blocks.0.norm3.weight"])


def _mapped_files(ptr: int) -> set[str]:
    files = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi and len(fields) == 6:
            files.add(fields[5].strip())
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_mmap_opt_in_shares_the_file_mapping_and_copy_on_write(tmp_path, ref):
    path = write(tmp_path / "vace.safetensors", ref)
    model = StandIn()
    report = load_vace_weights(model, path, mmap=True)
    assert (report.shared, report.converted, report.copied) == (len(ref), 0, 0)
    weight = model.vace_blocks[1].ffn[0].weight
    assert str(path) in _mapped_files(weight.data_ptr())
    assert isinstance(weight, nn.Parameter) and weight.requires_grad
    # Private mapping: writing the parameter leaves the file intact.
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(load_file(str(path))["vace_blocks.1.ffn.0.weight"], ref["vace_blocks.1.ffn.0.weight"])

    copied = StandIn()
    ptr = copied.vace_blocks[1].ffn[0].weight.data_ptr()
    report = load_vace_weights(copied, path)  # the default copies
    assert (report.shared, report.copied) == (0, len(ref))
    assert copied.vace_blocks[1].ffn[0].weight.data_ptr() != ptr  # fresh storage, swapped in at the end
    assert str(path) not in _mapped_files(copied.vace_blocks[1].ffn[0].weight.data_ptr())
    assert_loaded(copied, ref)


def test_meta_module_loads_onto_cpu(tmp_path, ref):
    path = write(tmp_path / "vace.safetensors", ref)
    with torch.device("meta"):
        model = StandIn()
    report = load_vace_weights(model, path)
    assert report.devices == {"cpu": len(ref)}
    assert all(v.device.type == "cpu" for k, v in model.state_dict().items() if k.startswith("vace_"))
    assert_loaded(model, ref)


def test_requires_grad_and_aliases_are_kept(tmp_path, ref):
    path = write(tmp_path / "vace.safetensors", ref)
    model = StandIn()
    model.vace_blocks.requires_grad_(False)
    model.vace_alias = model.vace_blocks[1]  # the same module under a second name
    load_vace_weights(model, path, vace_prefixes=("vace_blocks.", "vace_patch_embedding."))
    assert model.vace_alias.after_proj.weight is model.vace_blocks[1].after_proj.weight
    assert not model.vace_blocks[0].after_proj.weight.requires_grad
    assert model.vace_patch_embedding.weight.requires_grad


# --------------------------------------------------------------------------- file errors
def test_truncated_file(tmp_path, ref):
    path = write(tmp_path / "cut.safetensors", ref)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    err = expect_error(StandIn(), WeightsError, "not a valid safetensors file", path)
    assert str(path) in str(err) and "truncated" in str(err)
    path.write_bytes(data[:5])
    expect_error(StandIn(), WeightsError, "not a valid safetensors file", path)


def test_corrupted_header(tmp_path, ref):
    path = write(tmp_path / "bad.safetensors", ref)
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12  # JSON syntax destroyed
    path.write_bytes(bytes(data))
    err = expect_error(StandIn(), WeightsError, "not a valid safetensors file", path)
    assert str(path) in str(err)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)  # header length beyond the file
    path.write_bytes(bytes(data))
    expect_error(StandIn(), WeightsError, "not a valid safetensors file", path)
    # Offsets that disagree with the shape.
    good = write(tmp_path / "good.safetensors", {"vace_patch_embedding.weight": ref["vace_patch_embedding.weight"]})
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["vace_patch_embedding.weight"]["shape"][0] += 1
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    good.write_bytes(raw[:8] + text + raw[8 + n :])
    expect_error(StandIn(), WeightsError, "not a valid safetensors file.*do not match its shape", good)


class _Marker:
    """Unpickling this creates the marker file, proving the loader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_pickle_is_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(pickle.dumps(_Marker(marker)))
    err = expect_error(StandIn(), WeightsError, "pickle", path)
    assert not marker.exists()
    assert str(path) in str(err) and "safetensors" in str(err) and "python -c" in str(err)
    # Also refused when named by an index or found in a directory.
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"vace_patch_embedding.weight": path.name}}))
    expect_error(StandIn(), WeightsError, "pickle", index)
    index.unlink()
    expect_error(StandIn(), WeightsError, "pickle", tmp_path)
    assert not marker.exists()


def test_pickle_renamed_to_safetensors(tmp_path):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "weights.safetensors"
    torch.save({"x": torch.ones(3)}, path)  # zip container
    expect_error(StandIn(), WeightsError, "not a valid safetensors file.*torch.save", path)
    path.write_bytes(pickle.dumps(_Marker(marker), protocol=2))
    expect_error(StandIn(), WeightsError, "not a valid safetensors file", path)
    assert not marker.exists()


def test_missing_path_and_unknown_format(tmp_path):
    expect_error(StandIn(), WeightsError, "does not exist", tmp_path / "nope.safetensors")
    other = tmp_path / "w.npz"
    other.write_bytes(b"x")
    expect_error(StandIn(), WeightsError, "unknown weights format", other)
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(StandIn(), WeightsError, "no .safetensors", empty)


def test_incomplete_shard_set_and_bad_index(tmp_path, ref):
    keys = sorted(ref)
    for i, part in enumerate((keys[:30], keys[30:]), 1):
        write(tmp_path / f"m-{i:05d}-of-00003.safetensors", {k: ref[k] for k in part})
    expect_error(StandIn(), WeightsError, "incomplete shard set.*00003-of-00003", tmp_path)
    index = tmp_path / "m.safetensors.index.json"
    index.write_text("{not json")
    expect_error(StandIn(), WeightsError, "not a valid safetensors index", index)
    index.write_text(json.dumps({"weight_map": {k: "m-00001-of-00003.safetensors" for k in keys}}))
    expect_error(StandIn(), WeightsError, "do not hold them", index)
    index.write_text(json.dumps({"weight_map": {keys[0]: "m-00009-of-00003.safetensors"}}))
    expect_error(StandIn(), WeightsError, "do not exist", index)


# --------------------------------------------------------------------------- fit errors
def test_wrong_vace_in_dim(tmp_path, ref):
    model16 = StandIn(vace_in=16)
    path = write(tmp_path / "vace.safetensors", ref)
    err = expect_error(model16, WeightsError, "vace_in_dim 96", path)
    assert "16" in str(err)
    expect_error(StandIn(), WeightsError, "vace_in_dim 96 .* but 48 was expected", path, expect_vace_in_dim=48)


def test_wrong_dim_lists_shapes(tmp_path):
    small = exact_values(vace_shapes(StandIn(dim=32, vace_in=96)), seed=3)
    path = write(tmp_path / "dim32.safetensors", small)
    err = expect_error(StandIn(), WeightsError, "shape mismatches, model vs file", path)
    assert "vace_patch_embedding.weight: [64, 96, 1, 2, 2] vs [32, 96, 1, 2, 2]" in str(err)
    # Every tensor but ffn.0.bias (ffn_dim-sized) differs.
    assert len(err.details["shape_mismatches"]) == len(small) - VACE_BLOCKS


def test_wrong_ffn_dim(tmp_path):
    other = exact_values(vace_shapes(StandIn(ffn=96)), seed=3)
    err = expect_error(StandIn(), WeightsError, "shape mismatches", write(tmp_path / "f.safetensors", other))
    assert "vace_blocks.0.ffn.0.weight: [128, 64] vs [96, 64]" in str(err)


def test_missing_and_unexpected_keys(tmp_path, ref):
    gone = dict(ref)
    del gone["vace_blocks.1.after_proj.bias"], gone["vace_blocks.0.before_proj.weight"]
    err = expect_error(StandIn(), WeightsError, "2 VACE keys missing", write(tmp_path / "a.safetensors", gone))
    assert "vace_blocks.1.after_proj.bias" in str(err) and "vace_blocks.0.before_proj.weight" in str(err)
    extra = {**ref, "vace_blocks.1.before_proj.weight": ref["vace_blocks.0.before_proj.weight"]}
    err = expect_error(StandIn(), WeightsError, "1 unexpected keys", write(tmp_path / "b.safetensors", extra))
    assert "vace_blocks.1.before_proj.weight" in str(err)


def test_diffusers_names_without_key_map_hint(tmp_path, ref):
    path = write(tmp_path / "d.safetensors", {diffusers_name(k): v for k, v in ref.items()})
    expect_error(StandIn(), WeightsError, "DIFFUSERS_TO_NATIVE", path)


@pytest.mark.parametrize("blocks", [1, 3])
def test_block_count_mismatch(tmp_path, blocks):
    other = exact_values(vace_shapes(StandIn(vace_blocks=blocks)), seed=5)
    path = write(tmp_path / "n.safetensors", other)
    err = expect_error(StandIn(), WeightsError, f"has {blocks} VACE blocks .* model has 2", path)
    assert "vace_blocks.0-1" in str(err)
    expect_error(StandIn(vace_blocks=blocks), WeightsError, f"has {blocks} VACE blocks .* but 2 were expected",
                 path, expect_blocks=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_tensor_is_named(tmp_path, ref, bad):
    poisoned = {k: v.to(torch.bfloat16) for k, v in ref.items()}
    poisoned["vace_blocks.1.ffn.0.weight"][3, 5] = bad
    path = write(tmp_path / "nan.safetensors", poisoned)
    err = expect_error(StandIn(), WeightsError, "NaN or Inf", path)
    assert "vace_blocks.1.ffn.0.weight" in str(err) and str(path) in str(err)


def test_all_zero_patch_embedding(tmp_path, ref):
    zeroed = {**ref, "vace_patch_embedding.weight": torch.zeros_like(ref["vace_patch_embedding.weight"])}
    expect_error(StandIn(), WeightsError, "vace_patch_embedding.weight' is all zeros",
                 write(tmp_path / "z.safetensors", zeroed))


def test_overflow_on_narrowing_conversion(tmp_path, ref):
    big = dict(ref)
    big["vace_blocks.0.self_attn.q.weight"] = ref["vace_blocks.0.self_attn.q.weight"].clone()
    big["vace_blocks.0.self_attn.q.weight"][0, 0] = 1e6
    path = write(tmp_path / "big.safetensors", big)
    expect_error(StandIn().half(), WeightsError, "beyond the float16 range", path)
    load_vace_weights(StandIn().to(torch.bfloat16), path)  # bf16 has the float32 range


def test_no_vace_keys_and_no_vace_module(tmp_path, ref):
    path = write(tmp_path / "base.safetensors", base_values())
    expect_error(StandIn(), WeightsError, "holds no VACE keys", path)
    plain = nn.Sequential(nn.Linear(2, 2))
    expect_error(plain, WeightsError, "graft the VACE modules first", write(tmp_path / "v.safetensors", ref))


def test_ambiguous_prefixes(tmp_path, ref):
    both = {**ref, "diffusion_model.vace_patch_embedding.bias": ref["vace_patch_embedding.bias"]}
    expect_error(StandIn(), WeightsError, "both map to 'vace_patch_embedding.bias'",
                 write(tmp_path / "both.safetensors", both))


def test_peft_wrapped_vace_is_an_order_error(tmp_path, ref):
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["after_proj"]), StandIn())
    expect_error(model, OrderError, "Base -> VACE -> LoRA", write(tmp_path / "v.safetensors", ref))


def test_failure_while_assigning_rolls_back(tmp_path, ref, monkeypatch):
    import surgery.weights.loader as loader

    real, calls = loader._assign, []

    def flaky(slot, value):
        calls.append(slot)
        if len(calls) == 10:
            raise RuntimeError("simulated failure mid-load")
        real(slot, value)

    monkeypatch.setattr(loader, "_assign", flaky)
    model = StandIn()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="simulated"):
        load_vace_weights(model, write(tmp_path / "v.safetensors", ref))
    assert_unchanged(model, snap)


def test_failure_during_conversion_restores_assigned_parameters(tmp_path, ref, monkeypatch):
    import surgery.weights.loader as loader

    def broken(*args):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(loader, "_converted", broken)
    mixed = {k: (v.half() if "ffn" in k else v) for k, v in ref.items()}  # some assigned, some copied
    model = StandIn()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="simulated"):
        load_vace_weights(model, write(tmp_path / "v.safetensors", mixed))
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------- key maps
def test_key_maps_match_the_handwritten_table(ref):
    to_diff = compile_key_map(NATIVE_TO_DIFFUSERS)
    to_native = compile_key_map(DIFFUSERS_TO_NATIVE)
    for key in ref:
        assert apply_key_map(key, to_diff) == diffusers_name(key)
        assert apply_key_map(diffusers_name(key), to_native) == key
    # Whole native model (base + VACE) round-trips, and the proj_out collision is resolved.
    for key in [*base_values(), *ref, "time_embedding.0.weight", "text_embedding.2.bias", "time_projection.1.weight"]:
        assert apply_key_map(apply_key_map(key, to_diff), to_native) == key
    assert apply_key_map("head.head.weight", to_diff) == "proj_out.weight"
    assert apply_key_map("vace_blocks.3.after_proj.weight", to_diff) == "vace_blocks.3.proj_out.weight"
    assert apply_key_map("blocks.5.norm3.bias", to_diff) == "blocks.5.norm2.bias"
    assert apply_key_map("time_embedding.2.bias", to_diff) == "condition_embedder.time_embedder.linear_2.bias"
    assert apply_key_map("blocks.0.cross_attn.k_img.weight", to_diff) == "blocks.0.attn2.add_k_proj.weight"


def test_key_map_validation():
    for bad in ["not a list", [("a",)], [("", "b")], [("re:(", "x")], [(1, "x")]]:
        with pytest.raises(RuleError):
            compile_key_map(bad)
    rules = compile_key_map([("re:^x\\.(\\d+)", r"y.\1"), (re.compile("y"), "z"), ("z.", "w.")])
    assert apply_key_map("x.12.a", rules) == "w.12.a"


def test_read_header_reports_entries(tmp_path, ref):
    mixed = {k: (v.half() if "ffn" in k else v) for k, v in ref.items()}
    path = write(tmp_path / "h.safetensors", mixed)
    entries = read_header(path)
    assert set(entries) == set(ref)
    e = entries["vace_blocks.0.ffn.0.weight"]
    assert (e.dtype, e.shape, e.nbytes, e.torch_dtype) == ("F16", (FFN, DIM), FFN * DIM * 2, torch.float16)
