"""The command line never shows a traceback, and checks every option and path before any work.

Each test checks the exit code, the one stderr line, and that nothing was built, traced or
written (the fake engine records every call; the user's files are compared before/after).
Real signals and pipes need a subprocess; everything else runs ``main`` in-process.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.cli import commands, loading
from surgery.cli.main import EXIT_INTERRUPTED, main
from surgery.errors import ReportError
from surgery.reports.files import atomic_write_bytes
from surgery.reports.report import REPORT_JSON, REPORT_MD, write_report
from test_cli_basic import FACTORY, FakeEngine

ROOT = Path(__file__).resolve().parents[1]
HERE = __name__
UNWRITABLE = Path("/sys/kernel")  # sysfs refuses new files even to root, for whom chmod is no obstacle


def bare_longlive() -> torch.nn.Module:
    """A factory returning only a model (no example inputs), of a built-in model class."""
    from examples import PIPELINES

    return PIPELINES["longlive"].build(size="tiny", seed=0)


@pytest.fixture
def engine(monkeypatch) -> FakeEngine:
    """The fake engine, plus a record of every model load: a refused option must come before both."""
    fake = FakeEngine()
    monkeypatch.setattr(commands, "engine_backend", fake.backend)
    real_load = commands.load_model

    def load(*args, **kwargs):
        fake.calls.append(("load_model", args[0]))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(commands, "load_model", load)
    return fake


def error_line(argv: list[str], capsys, code: int = 2) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def refused_before_work(argv: list[str], engine: FakeEngine, capsys, *needles: str) -> str:
    line = error_line(argv, capsys)
    assert line.startswith("surgery: error: ") and "; fix: " in line, line
    assert all(n in line for n in needles), line
    assert engine.calls == [], engine.calls  # nothing loaded, traced or validated
    return line


def snapshot(path: Path) -> tuple:
    """What a path is: its kind, device/inode and (for a regular file) its bytes."""
    st = path.stat()
    return stat.S_IFMT(st.st_mode), st.st_rdev, st.st_ino, path.read_bytes() if stat.S_ISREG(st.st_mode) else None


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path):
    path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    yield path
    sock.close()


# --- SIGINT and a closed pipe ---------------------------------------------------------


def _subprocess_env(extra: Path | None = None) -> dict[str, str]:
    paths = [str(ROOT)] + ([str(extra)] if extra else [])
    return {"PYTHONPATH": os.pathsep.join(paths), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


def test_sigint_exits_130_with_one_line_and_writes_nothing(tmp_path):
    ready = tmp_path / "ready"
    (tmp_path / "sleepy_models.py").write_text(
        "import pathlib, time\n"
        "def build():\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n"
        "    time.sleep(120)\n"
    )
    report = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "apply", "sleepy_models:build", "--report", str(report)],
                            cwd=tmp_path, env=_subprocess_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():  # the factory runs: options are parsed and checked, the work has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED
    assert err == "surgery: interrupted\n" and out == ""
    assert not report.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ready", "sleepy_models.py"]


def test_the_command_imports_no_torch_before_it_can_catch_ctrl_c():
    # Until main() runs, a Ctrl-C would print Python's traceback; torch takes seconds to import.
    code = "import sys, surgery.cli.main; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr


def test_keyboard_interrupt_in_any_stage_exits_130(engine, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    engine.apply = interrupted  # type: ignore[method-assign]
    assert error_line(["apply", FACTORY], capsys, code=130) == "surgery: interrupted"


def test_closed_stdout_pipe_exits_0_quietly():
    # Like `surgery models | head -1`, with the reader gone before the first table is written
    # (`rules` prints through the same console as `models` and starts faster).
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "rules"], cwd=ROOT, env=_subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert err == b""


class _ClosedPipe(io.TextIOBase):
    """A stdout whose reader went away."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no descriptor")


@pytest.mark.parametrize("argv", [["models"], ["rules"], ["apply", FACTORY]])
def test_broken_pipe_in_rich_output_exits_0_quietly(argv, engine, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


# --- every option and path is checked before the work ----------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64), "abc", "1.5"])
def test_out_of_range_seed_is_a_usage_error(seed, engine, capsys):
    line = error_line(["apply", FACTORY, "--seed", seed], capsys)
    assert "argument --seed" in line and ("out of range" in line or "not an integer" in line), line
    assert engine.calls == []


def test_largest_seed_is_accepted(engine, capsys):
    assert main(["apply", FACTORY, "--seed", str(2 ** 64 - 1)]) == 0


def test_corrupt_weights_are_refused_before_work(engine, tmp_path, capsys):
    path = tmp_path / "truncated.safetensors"
    save_file({"vace_blocks.0.w": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    refused_before_work(["apply", FACTORY, "--weights", str(path)], engine, capsys, "not a valid safetensors file")


@pytest.mark.parametrize("kind", ["missing", "fifo", "device", "socket", "missing-dir"])
def test_weights_that_are_not_a_file_or_directory(kind, engine, tmp_path, fifo, unix_socket, capsys):
    path = {"missing": tmp_path / "nope.safetensors", "fifo": fifo, "device": Path("/dev/null"),
            "socket": unix_socket, "missing-dir": tmp_path / "no" / "dir"}[kind]
    before = snapshot(path) if path.exists() else None
    needle = {"missing": "does not exist", "missing-dir": "does not exist", "fifo": "is a named pipe (FIFO)",
              "device": "is a character device", "socket": "is a socket"}[kind]
    refused_before_work(["apply", FACTORY, "--weights", str(path)], engine, capsys, str(path), needle)
    assert (snapshot(path) if path.exists() else None) == before


def test_weights_directory_is_accepted(engine, tmp_path, capsys):
    save_file({"vace_blocks.0.w": torch.zeros(2)}, str(tmp_path / "vace.safetensors"))
    assert main(["apply", FACTORY, "--weights", str(tmp_path)]) == 0
    assert ("load_weights", True, str(tmp_path), None) in engine.calls


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "socket"])
def test_save_never_replaces_something_that_is_not_a_regular_file(kind, engine, tmp_path, fifo, unix_socket, capsys):
    path = {"device": Path("/dev/null"), "fifo": fifo, "directory": tmp_path, "socket": unix_socket}[kind]
    before = snapshot(path)
    refused_before_work(["apply", FACTORY, "--save", str(path)], engine, capsys, str(path),
                        "exists and is a", "not a regular file")
    assert snapshot(path) == before


def test_save_under_a_regular_file(engine, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    refused_before_work(["apply", FACTORY, "--save", str(blocker / "x.safetensors")], engine, capsys,
                        f"directory {blocker} exists and is not a directory")
    assert blocker.read_text() == "keep"


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs sysfs")
@pytest.mark.parametrize("option", ["--save", "--report"])
def test_unwritable_parent_is_refused_before_work(option, engine, capsys):
    target = UNWRITABLE / "surgery-test-output"
    refused_before_work(["apply", FACTORY, option, str(target / "x.safetensors")], engine, capsys,
                        str(UNWRITABLE), "cannot write in")
    assert not target.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_save_directory_is_refused_before_work(engine, tmp_path, capsys):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        refused_before_work(["apply", FACTORY, "--save", str(directory / "x.safetensors")], engine, capsys,
                            "cannot write in directory", "Permission denied")
    finally:
        directory.chmod(0o755)
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("kind", ["device", "regular file"])
def test_report_path_that_is_not_a_directory(kind, engine, tmp_path, capsys):
    path = Path("/dev/null") if kind == "device" else tmp_path / "file"
    if kind == "regular file":
        path.write_text("keep")
    before = snapshot(path)
    refused_before_work(["apply", FACTORY, "--report", str(path)], engine, capsys,
                        f"report directory {path} exists and is not a directory")
    assert snapshot(path) == before


def test_report_file_that_is_a_fifo_is_never_replaced(engine, tmp_path, capsys):
    directory = tmp_path / "report"
    directory.mkdir()
    os.mkfifo(directory / REPORT_JSON)
    refused_before_work(["apply", FACTORY, "--report", str(directory)], engine, capsys,
                        f"{directory / REPORT_JSON} exists and is a named pipe (FIFO), not a regular file")
    assert stat.S_ISFIFO((directory / REPORT_JSON).stat().st_mode) and sorted(os.listdir(directory)) == [REPORT_JSON]


def test_the_writer_itself_never_replaces_a_device_or_fifo(tmp_path, fifo):
    """The same refusal at write time, for callers that skip the CLI's checks."""
    with pytest.raises(ReportError, match="/dev/null exists and is a character device, not a regular file"):
        atomic_write_bytes("/dev/null", b"data")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    directory = tmp_path / "report"
    directory.mkdir()
    (directory / REPORT_JSON).write_text("old")
    os.mkfifo(directory / REPORT_MD)
    with pytest.raises(ReportError, match=r"report.md exists and is a named pipe \(FIFO\)"):
        write_report(directory, {"new": True}, "# new")
    assert (directory / REPORT_JSON).read_text() == "old" and stat.S_ISFIFO((directory / REPORT_MD).stat().st_mode)
    assert sorted(os.listdir(directory)) == [REPORT_JSON, REPORT_MD]


# --- goldens ---------------------------------------------------------------------------


def test_non_utf8_golden_is_one_line_and_read_before_work(engine, tmp_path, capsys):
    golden = tmp_path / "g.graph.txt"
    golden.write_bytes(b"%in\xff\xfe not text")
    refused_before_work(["diff", FACTORY, "--golden", str(golden)], engine, capsys,
                        f"golden graph {golden} is not UTF-8 text (byte 0xff at offset 3)", "--update")
    assert golden.read_bytes() == b"%in\xff\xfe not text"


def test_golden_that_is_a_fifo_is_refused_instead_of_blocking(engine, fifo, capsys):
    refused_before_work(["diff", FACTORY, "--golden", str(fifo)], engine, capsys,
                        "is a named pipe (FIFO), not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_golden_update_never_replaces_a_device(engine, capsys):
    refused_before_work(["diff", FACTORY, "--golden", "/dev/null", "--update"], engine, capsys,
                        "/dev/null exists and is a character device")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_missing_golden_is_named_before_work(engine, tmp_path, capsys):
    refused_before_work(["diff", FACTORY, "--golden", str(tmp_path / "none.txt")], engine, capsys,
                        "does not exist", "--update")


# --- memory ----------------------------------------------------------------------------


_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
              "to allocate {} bytes. Error code 12 (Cannot allocate memory)")


def test_example_context_too_large_names_the_size_option(tmp_path, capsys):
    """Real engine: vace_in_dim sizes the example vace_context the rule builds (about 1.7 PiB here)."""
    report = tmp_path / "report"
    line = error_line(["apply", "longlive", "--set", "vace_in_dim=10000000000000", "--no-validate",
                       "--report", str(report)], capsys)
    assert line.startswith("surgery: error: not enough memory for surgery on longlive"), line
    assert "tried to allocate 1.7 PiB" in line and "fix: lower the sizes asked for: --set vace_in_dim=10000000000000" in line
    assert "--size (now tiny)" in line and not report.exists()


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(_ALLOCATOR.format(56 * 2 ** 30))],
                         ids=["MemoryError", "allocator"])
def test_building_example_inputs_out_of_memory_names_size(exc, engine, monkeypatch, capsys):
    def too_big(*args, **kwargs):
        raise exc

    monkeypatch.setattr(loading, "_example_call", too_big)
    line = error_line(["apply", "longlive", "--size", "1.3B"], capsys)
    assert "not enough memory to build longlive at --size 1.3B and its example inputs" in line
    assert "fix: use a smaller --size" in line
    if isinstance(exc, RuntimeError):
        assert "(tried to allocate 56.0 GiB)" in line
    assert [c for c in engine.calls if c[0] != "load_model"] == []


def test_memory_error_in_surgery_names_the_set_options(engine, capsys):
    def too_big(*args, **kwargs):
        raise MemoryError

    engine.apply = too_big  # type: ignore[method-assign]
    line = error_line(["apply", FACTORY, "--set", "vace_in_dim=4096"], capsys)
    assert "not enough memory for surgery on" in line and "--set vace_in_dim=4096" in line


def test_out_of_memory_anywhere_else_is_exit_2_not_3(engine, capsys):
    def too_big(*args, **kwargs):
        raise RuntimeError(_ALLOCATOR.format(10 ** 12))

    engine.validation_cases = too_big  # type: ignore[method-assign]
    line = error_line(["apply", FACTORY, "--validate"], capsys)
    assert line.startswith("surgery: error: not enough memory (tried to allocate 931.3 GiB); fix:"), line


def test_internal_error_is_exit_3_with_one_line_pointing_at_debug(engine, capsys):
    def bug(*args, **kwargs):
        raise KeyError("missing")

    engine.apply = bug  # type: ignore[method-assign]
    line = error_line(["apply", FACTORY], capsys, code=3)
    assert line == "surgery: internal error: KeyError: 'missing' (rerun with --debug for the traceback)"


# --- a factory returning only a model --------------------------------------------------


def test_factory_returning_only_a_builtin_model_gets_its_example_inputs(tmp_path, capsys):
    golden = tmp_path / "longlive.graph.txt"
    assert main(["diff", "longlive", "--golden", str(golden), "--update"]) == 0
    # The derived call is the built-in one: the same rewritten graph, node for node.
    assert main(["diff", f"{HERE}:bare_longlive", "--golden", str(golden)]) == 0
    assert "graph matches golden" in capsys.readouterr().out


def test_example_inputs_for_a_subclass_of_a_builtin_model_class():
    from examples import PIPELINES

    pipeline = PIPELINES["memflow"]
    model = type("MyWan", (pipeline.model_class,), {})  # a user's subclass keeps the call convention
    assert loading.pipeline_of(model.__new__(model)) is pipeline
    assert loading.pipeline_of(torch.nn.Linear(2, 2)) is None
