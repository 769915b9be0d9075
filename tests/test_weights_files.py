"""Weights files are what they claim (issue #13 item 4).

Only regular files are opened (FIFOs, devices and sockets are refused from ``stat`` alone,
symbolic link loops are named as such); an index names shards only inside its directory;
only floating-point tensors load, and every value check runs on the values the model
would get after conversion; loaded tensors are copies unless ``mmap=True`` is asked for.
Every refusal is one line, leaves the model's parameters and the files byte for byte as
they were, and the same load without the fault succeeds (so each check is live).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery.weights.loader as loader
import surgery.weights.reading as reading
from rules.vace import load_vace_weights
from surgery.errors import ReportError, WeightsError
from surgery.weights import require_regular_file
from surgery.weights.paths import open_regular
from surgery.weights.values import all_finite, all_zero
from test_weights import StandIn, assert_loaded, assert_unchanged, exact_values, snapshot, vace_shapes, write

needs_posix = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and sockets")
FIX = "; fix: "


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return exact_values(vace_shapes(StandIn()), seed=4321)


def digest(*paths: Path) -> dict[str, str]:
    """Bytes of every regular file under ``paths`` (links not followed), to prove nothing was written."""
    out = {}
    for root in paths:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(model: nn.Module, path: Path, pattern: str, *, watch: Path | None = None, **kwargs) -> str:
    """Load must raise a one-line WeightsError matching ``pattern``; model and files unchanged."""
    snap, files = snapshot(model), digest(watch or path.parent)
    with pytest.raises(WeightsError, match=pattern) as info:
        load_vace_weights(model, path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and FIX in message, message
    assert_unchanged(model, snap)
    assert digest(watch or path.parent) == files
    return message


class _Deadline:
    """Fail instead of hanging: a blocking open of a FIFO would wait forever for a writer."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def expire(signum, frame):
            raise TimeoutError("blocked: the loader opened something that waits for a writer")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


# --------------------------------------------------------------------------- regular files only
@needs_posix
def test_fifo_is_refused_without_opening_it(tmp_path, ref):
    fifo = tmp_path / "vace.safetensors"
    os.mkfifo(fifo)
    with _Deadline(20):
        message = refused(StandIn(), fifo, r"is a named pipe \(FIFO\), not a regular file")
    assert message.startswith(f"weights file {fifo} is a named pipe")
    # Found in a directory, or named by an index, it is refused the same way.
    with _Deadline(20):
        refused(StandIn(), tmp_path, "named pipe")
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: fifo.name for k in ref}}))
    with _Deadline(20):
        refused(StandIn(), index, f"weights shard {fifo} is a named pipe")
    # A FIFO given as the index itself.
    index.unlink()
    os.mkfifo(index)
    with _Deadline(20):
        refused(StandIn(), index, "weights file .*index.json is a named pipe")


@needs_posix
@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_devices_and_sockets_are_refused(tmp_path, ref):
    link = tmp_path / "device.safetensors"
    link.symlink_to("/dev/null")
    refused(StandIn(), link, r"is a character device, not a regular file")
    refused(StandIn(), Path("/dev/null"), r"weights file /dev/null is a character device", watch=tmp_path)
    sock_path = tmp_path / "sock.safetensors"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        refused(StandIn(), sock_path, r"is a socket, not a regular file")


@needs_posix
def test_symlink_loop_is_named_not_called_missing(tmp_path, ref):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    message = refused(StandIn(), a, r"is a symbolic link loop \(too many levels of symbolic links\)")
    assert "does not exist" not in message
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: a.name for k in ref}}))
    refused(StandIn(), index, "weights shard .*a.safetensors is a symbolic link loop")


def test_broken_symlink_and_missing_file(tmp_path, ref):
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to("nowhere.safetensors")
    refused(StandIn(), dangling, r"is a broken symbolic link \(to nowhere.safetensors\)")
    refused(StandIn(), tmp_path / "absent.safetensors", "weights file .*absent.safetensors does not exist; fix: check")
    plain = write(tmp_path / "plain.safetensors", ref)
    refused(StandIn(), plain / "x.safetensors", "a parent in the path is a file")


def test_require_regular_file_for_readers_and_writers(tmp_path):
    target = tmp_path / "model.safetensors"
    assert require_regular_file(target, "--save target", missing_ok=True) is None
    with pytest.raises(WeightsError, match="--save target .* does not exist"):
        require_regular_file(target, "--save target")
    target.write_bytes(b"x")
    assert require_regular_file(target, "--save target", missing_ok=True).st_size == 1
    with pytest.raises(ReportError, match=f"report file {tmp_path} is a directory, not a regular file"):
        require_regular_file(tmp_path, "report file", missing_ok=True, error=ReportError)
    dangling = tmp_path / "link.json"
    dangling.symlink_to("elsewhere.json")
    with pytest.raises(ReportError, match="broken symbolic link"):
        require_regular_file(dangling, "report file", missing_ok=True, error=ReportError)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "report.json"
        os.mkfifo(fifo)
        with _Deadline(20), pytest.raises(ReportError, match="report file .* is a named pipe") as info:
            require_regular_file(fifo, "report file", missing_ok=True, error=ReportError)
        assert str(info.value).count(FIX) == 1


@needs_posix
def test_path_swapped_for_a_fifo_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    """The open itself never blocks and is checked again with fstat (a race the stat cannot see)."""
    import surgery.weights.paths as paths

    fifo = tmp_path / "raced.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(paths, "require_regular_file", lambda *args, **kwargs: None)
    with _Deadline(20), pytest.raises(WeightsError, match=r"became a named pipe \(FIFO\) while it was being opened"):
        open_regular(fifo, "weights file")


# --------------------------------------------------------------------------- floating point only
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_float_tensor_is_refused(tmp_path, ref, dtype):
    bad = dict(ref)
    bad["vace_blocks.1.norm3.weight"] = ref["vace_blocks.1.norm3.weight"].to(dtype)
    path = write(tmp_path / "int.safetensors", bad)
    name = str(dtype).removeprefix("torch.")
    pattern = f"1 tensors are not floating point \\(vace_blocks.1.norm3.weight \\({name}\\)\\)"
    message = refused(StandIn(), path, pattern)
    assert "never converted" in message
    # Same file with a floating-point tensor in that place loads (the check is live).
    model = StandIn()
    load_vace_weights(model, write(tmp_path / "float.safetensors", ref))
    assert_loaded(model, ref)


def test_non_float_model_tensor_is_refused(tmp_path, ref):
    model = StandIn()
    model.vace_blocks[0].norm3.weight = nn.Parameter(torch.ones(64, dtype=torch.int64), requires_grad=False)
    refused(model, write(tmp_path / "v.safetensors", ref), "the model holds 1 VACE tensors that are not floating point")


@pytest.mark.parametrize("mmap", [False, True])
def test_overflow_is_judged_on_converted_values(tmp_path, ref, mmap):
    fits = dict(ref)
    fits["vace_blocks.0.self_attn.q.weight"] = ref["vace_blocks.0.self_attn.q.weight"].clone()
    fits["vace_blocks.0.self_attn.q.weight"][0, 0] = 65519.0  # rounds to 65504, the float16 maximum
    model = StandIn().half()
    load_vace_weights(model, write(tmp_path / "fits.safetensors", fits), mmap=mmap)
    assert model.vace_blocks[0].self_attn.q.weight[0, 0].item() == 65504.0
    over = dict(fits)
    over["vace_blocks.0.self_attn.q.weight"] = fits["vace_blocks.0.self_attn.q.weight"].clone()
    over["vace_blocks.0.self_attn.q.weight"][0, 1] = 65520.0  # rounds to inf
    message = refused(StandIn().half(), write(tmp_path / "over.safetensors", over),
                      "has \\|values\\| up to 6.552e\\+04, beyond the float16 range", mmap=mmap)
    assert "load into a float32 or bfloat16 model" in message
    huge = {k: v.double() for k, v in ref.items()}
    huge["vace_blocks.1.ffn.2.weight"][3, 3] = 1e300
    huge_path = write(tmp_path / "huge64.safetensors", huge)
    message = refused(StandIn(), huge_path, "up to 1e\\+300, beyond the float32 range", mmap=mmap)
    assert "re-export" in message


def test_underflow_to_zero_patch_embedding_is_refused(tmp_path, ref):
    tiny = {k: v.double() for k, v in ref.items()}
    tiny["vace_patch_embedding.weight"] = torch.full_like(tiny["vace_patch_embedding.weight"], 1e-320)
    path = write(tmp_path / "tiny64.safetensors", tiny)
    refused(StandIn(), path, "'vace_patch_embedding.weight' is all zeros in the model's float32")
    # The same file loads into a float64 model, where the values survive.
    model = StandIn().double()
    load_vace_weights(model, path)
    assert model.vace_patch_embedding.weight.min().item() == 1e-320
    half = dict(ref)
    half["vace_patch_embedding.weight"] = torch.full_like(ref["vace_patch_embedding.weight"], 1e-9)
    refused(StandIn().half(), write(tmp_path / "tiny32.safetensors", half), "is all zeros in the model's float16")


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_found_in_every_chunk_position(tmp_path, ref, monkeypatch, mmap, stored):
    """Small chunks so that NaN/Inf land in first, middle, last and partial chunks."""
    monkeypatch.setattr(reading, "CHUNK_BYTES", 256)
    key = "vace_blocks.1.ffn.0.weight"  # 128 x 64 values: many chunks of 64 float32
    numel = ref[key].numel()
    for position in (0, 63, 64, numel // 2, numel - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            poisoned = {k: v.to(stored, copy=True) for k, v in ref.items()}
            poisoned[key].view(-1)[position] = bad
            path = write(tmp_path / "poisoned.safetensors", poisoned)
            refused(StandIn(), path, f"tensor '{key}' \\(model key '{key}'\\) contains NaN or Inf", mmap=mmap)
    # Opposite infinities in different chunks do not cancel.
    poisoned = {k: v.to(stored, copy=True) for k, v in ref.items()}
    poisoned[key].view(-1)[1] = float("inf")
    poisoned[key].view(-1)[numel - 2] = float("-inf")
    refused(StandIn(), write(tmp_path / "both.safetensors", poisoned), "contains NaN or Inf", mmap=mmap)
    model = StandIn()
    load_vace_weights(model, write(tmp_path / "clean.safetensors", {k: v.to(stored) for k, v in ref.items()}),
                      mmap=mmap)
    assert_loaded(model, ref)


def test_all_finite_is_exact_where_sums_overflow():
    big = torch.full((1000,), 3e38)  # finite values whose float32 sum overflows
    assert all_finite(big) and all_finite(big.double()) and all_finite(big.to(torch.bfloat16))
    ones = torch.ones(100_000, dtype=torch.float16)  # sums past 65504
    assert all_finite(ones) and all_finite(torch.full((10,), 65504.0, dtype=torch.float16))
    assert all_finite(torch.empty(0))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.zeros(4097, dtype=dtype)
            t[4096] = bad
            assert not all_finite(t), (dtype, bad)
        t = torch.zeros(10, dtype=dtype)
        t[2], t[7] = float("inf"), float("-inf")
        assert not all_finite(t)
    if hasattr(torch, "float8_e5m2"):
        f8 = torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2)
        assert not all_finite(f8) and all_finite(f8[:1])
    assert all_zero(torch.tensor([0.0, -0.0])) and not all_zero(torch.tensor([0.0, 1e-30]))
    assert not all_zero(torch.tensor([0.0, float("nan")])) and all_zero(torch.zeros(0))
    assert all_zero(torch.zeros(5, dtype=torch.bfloat16)) and not all_zero(torch.tensor([0.0, -2.0]).half())


# --------------------------------------------------------------------------- index confinement
def _sharded(directory: Path, ref: dict[str, torch.Tensor], names: tuple[str, str]) -> Path:
    """An index in ``directory`` naming two shards by ``names`` (relative to it)."""
    keys = sorted(ref)
    half = len(keys) // 2
    for name, part in zip(names, (keys[:half], keys[half:])):
        target = directory / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target, {k: ref[k] for k in part})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: names[i >= half] for i, k in enumerate(keys)}}))
    return index


def test_index_shards_outside_its_directory_are_refused(tmp_path, ref):
    outside = tmp_path / "outside"
    outside.mkdir()
    _sharded(outside, ref, ("a.safetensors", "b.safetensors"))
    inside = tmp_path / "model"
    inside.mkdir()
    write(inside / "b.safetensors", {k: ref[k] for k in sorted(ref)[len(ref) // 2:]})

    index = _sharded(inside, ref, (str(outside / "a.safetensors"), "b.safetensors"))
    refused(StandIn(), index, "names shard '.*outside/a.safetensors' by an absolute path", watch=tmp_path)
    index = _sharded(inside, ref, ("../outside/a.safetensors", "b.safetensors"))
    message = refused(StandIn(), index, "names shard '../outside/a.safetensors', which leaves the index's directory",
                      watch=tmp_path)
    assert f"put the shards in {inside}" in message
    (inside / "a.safetensors").symlink_to(outside / "a.safetensors")
    index = _sharded(inside, ref, ("a.safetensors", "b.safetensors"))
    refused(StandIn(), index, f"a symbolic link to {outside / 'a.safetensors'} outside the index's directory",
            watch=tmp_path)
    (inside / "sub").mkdir()
    (inside / "sub" / "a.safetensors").symlink_to("../../outside/a.safetensors")
    index = _sharded(inside, ref, ("sub/a.safetensors", "b.safetensors"))
    refused(StandIn(), index, "a symbolic link to .* outside the index's directory", watch=tmp_path)
    index.write_text(json.dumps({"weight_map": {k: 7 for k in ref}}))
    refused(StandIn(), index, "names a shard by 7, not a file name", watch=tmp_path)


def test_index_shards_inside_its_directory_load(tmp_path, ref):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    index = _sharded(model_dir, ref, ("shards/a.safetensors", "b.safetensors"))
    model = StandIn()
    load_vace_weights(model, index)
    assert_loaded(model, ref)
    # A link that stays inside the directory is fine.
    (model_dir / "b.safetensors").rename(model_dir / "shards" / "b-real.safetensors")
    (model_dir / "b.safetensors").symlink_to("shards/b-real.safetensors")
    model = StandIn()
    load_vace_weights(model, index)
    assert_loaded(model, ref)


def test_hugging_face_cache_links_into_blobs_load(tmp_path, ref):
    """snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub stores every download."""
    repo = tmp_path / "models--org--vace"
    blobs, snapshot_dir = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    keys = sorted(ref)
    half = len(keys) // 2
    for i, (name, part) in enumerate((("a.safetensors", keys[:half]), ("b.safetensors", keys[half:]))):
        write(blobs / f"blob{i}", {k: ref[k] for k in part})
        (snapshot_dir / name).symlink_to(f"../../blobs/blob{i}")
    (blobs / "index").write_text(json.dumps({"weight_map": {k: "a.safetensors" if i < half else "b.safetensors"
                                                            for i, k in enumerate(keys)}}))
    index = snapshot_dir / "model.safetensors.index.json"
    index.symlink_to("../../blobs/index")
    model = StandIn()
    load_vace_weights(model, index)
    assert_loaded(model, ref)
    # A link from the snapshot to anything but the repository's own blobs is still refused.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere / "blob0", {k: ref[k] for k in keys[:half]})
    (snapshot_dir / "a.safetensors").unlink()
    (snapshot_dir / "a.safetensors").symlink_to(elsewhere / "blob0")
    refused(StandIn(), index, "a symbolic link to .*elsewhere/blob0 outside the index's directory", watch=tmp_path)


# --------------------------------------------------------------------------- copies by default
def test_default_load_is_a_copy_the_file_cannot_change(tmp_path, ref):
    path = write(tmp_path / "vace.safetensors", ref)
    model = StandIn()
    report = load_vace_weights(model, path)
    assert (report.shared, report.copied) == (0, len(ref))
    other = exact_values(vace_shapes(StandIn()), seed=99)
    data = bytearray(path.read_bytes())
    replacement = write(tmp_path / "other.safetensors", other).read_bytes()
    assert len(replacement) == len(data)
    with path.open("r+b") as fh:  # rewritten in place: same inode, other values
        fh.write(replacement)
    assert_loaded(model, ref)
    os.truncate(path, 16)  # a mapping would now raise SIGBUS on access
    assert_loaded(model, ref)


@pytest.mark.skipif(sys.platform != "linux", reason="MAP_PRIVATE page-cache semantics of Linux")
def test_mmap_opt_in_is_the_file_until_written(tmp_path, ref):
    """What the docstring warns about: a mapped parameter follows an in-place rewrite of its file."""
    path = write(tmp_path / "vace.safetensors", ref)
    model = StandIn()
    assert load_vace_weights(model, path, mmap=True).shared == len(ref)
    other = exact_values(vace_shapes(StandIn()), seed=99)
    with path.open("r+b") as fh:
        fh.write(write(tmp_path / "other.safetensors", other).read_bytes())
    assert_loaded(model, other)


@pytest.mark.skipif(sys.platform != "linux", reason="SIGBUS on a truncated mapping")
def test_mmap_opt_in_dies_with_sigbus_when_the_file_is_truncated(tmp_path, ref):
    path = write(tmp_path / "vace.safetensors", ref)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
        from test_weights import StandIn
        from rules.vace import load_vace_weights
        model = StandIn()
        load_vace_weights(model, {str(path)!r}, mmap=True)
        os.truncate({str(path)!r}, 16)
        print(float(model.vace_blocks[1].ffn[0].weight.sum()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGBUS, done.stderr[-2000:]


def test_file_changed_after_its_header_was_read(tmp_path, ref, monkeypatch):
    path = write(tmp_path / "vace.safetensors", ref)
    real, versions = loader.resolve_checkpoint, iter(range(1, 100))

    def then_rewrite(p):
        entries = real(p)
        os.utime(path, ns=(0, next(versions)))  # a new version of the file (its mtime changes)
        return entries

    monkeypatch.setattr(loader, "resolve_checkpoint", then_rewrite)
    for mmap in (False, True):
        model = StandIn()
        snap = snapshot(model)
        with pytest.raises(WeightsError, match="vace.safetensors changed after its header was read; fix: do not"):
            load_vace_weights(model, path, mmap=mmap)
        assert_unchanged(model, snap)
    monkeypatch.undo()
    model = StandIn()
    load_vace_weights(model, path)
    assert_loaded(model, ref)


@pytest.mark.parametrize("cut", [False, True], ids=["rewritten", "truncated"])
def test_file_changed_while_it_is_read(tmp_path, ref, monkeypatch, cut):
    path = write(tmp_path / "vace.safetensors", ref)
    size = path.stat().st_size
    real, calls = reading.TensorFile._read, []

    def interfere(self, entry, view, skip):
        calls.append(entry.name)
        if len(calls) == 20:
            if cut:
                os.truncate(path, size // 2)
            else:
                os.utime(path, ns=(0, 1))
        return real(self, entry, view, skip)

    monkeypatch.setattr(reading.TensorFile, "_read", interfere)
    model = StandIn()
    snap = snapshot(model)
    pattern = "truncated while being read|changed while it was being read" if cut else "changed while it was being read"
    with pytest.raises(WeightsError, match=pattern) as info:
        load_vace_weights(model, path)
    assert "\n" not in str(info.value)
    assert_unchanged(model, snap)
    assert len(calls) >= 20


def test_fresh_cpu_storage_is_private_and_writable():
    small, large = reading.fresh_cpu((4, 4), torch.bfloat16), reading.fresh_cpu((3, 1 << 18), torch.float32)
    for t in (small, large):
        t.fill_(2.0)
        assert t.is_contiguous() and float(t.float().sum()) == 2.0 * t.numel()
    assert large.shape == (3, 1 << 18) and large.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()
