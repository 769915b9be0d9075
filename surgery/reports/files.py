"""Atomic file writes for reports and goldens.

A report that CI reads must never be half-written: each file is written to a temporary
file in the same directory, flushed and fsynced, and only then moved over the final name
with ``os.replace`` (atomic on POSIX and Windows when source and target share a volume).
When several files form one report, all of them are staged before any is replaced, so a
failure while writing leaves every final file untouched; if a rename fails (or is
interrupted) after others succeeded, those are rolled back from backups, so the set of
files is either all old or all new.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

from surgery.errors import ReportError

#: Writes a file's content into an open binary handle (for content too large to build as bytes).
Writer = Callable[[BinaryIO], None]


def _fix_for(directory: Path) -> str:
    return f"make {directory} writable or write somewhere else (e.g. another --report DIR), and check free disk space"


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_kind(path: str | os.PathLike[str]) -> str | None:
    """What is at ``path`` (links followed): ``"a regular file"``, ``"a directory"``, ``"a named pipe (FIFO)"``,
    ``"a character device"``, ... or ``None`` when nothing is there (or it cannot be looked at)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a file as a parent, no permission to look; ValueError: a NUL byte
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


_DIRECTORY_FIX = "name a directory (it is created if missing) or a path where one can be created"


def _not_a_directory(directory: Path, what: str = "report path") -> ReportError:
    # mkdir would say "File exists", which reads as if the directory were fine.
    return ReportError(f"{what} {directory} exists and is not a directory", _DIRECTORY_FIX)


def _refuse_special(path: Path) -> None:
    """Only a regular file may be replaced: a device node, FIFO or socket is never swapped for a file."""
    kind = path_kind(path)
    if kind not in (None, "a regular file"):
        raise ReportError(f"{path} exists and is {kind}, not a regular file",
                          f"write to a file path instead; {path} is left as it is")


def _creatable_in(directory: Path, what: str) -> None:
    """Refuse ``directory`` unless files can be created in it, or it can be created (probed, nothing left behind)."""
    ancestor = directory
    while path_kind(ancestor) is None and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if path_kind(ancestor) != "a directory":
        raise ReportError(f"cannot create {what} {directory}: Not a directory ({ancestor} is {path_kind(ancestor)})",
                          _DIRECTORY_FIX)
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".surgery-probe-")
    except OSError as exc:
        where = "" if ancestor == directory else f" (in {ancestor})"
        raise ReportError(f"cannot write in {what} {directory}{where}: {exc.strerror or exc}",
                          _fix_for(ancestor)) from exc
    os.close(fd)
    _remove_quietly(Path(probe))


def check_writable(files: Iterable[str | os.PathLike[str]], what: str = "directory") -> None:
    """Check, before any work, that :func:`atomic_write_many` could write ``files``.

    Each existing target must be a regular file (a device node, FIFO, socket or directory is
    refused, never replaced), and each parent must exist as a directory that accepts new
    files, or be creatable. ``what`` names the parent in messages (e.g. ``"report directory"``).
    """
    parents: list[Path] = []
    for file in map(Path, files):
        _refuse_special(file)
        if file.parent not in parents:
            parents.append(file.parent)
    for parent in parents:
        if path_kind(parent) not in (None, "a directory"):
            raise _not_a_directory(parent, what)
        _creatable_in(parent, what)


def _ensure_dir(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise _not_a_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(
            f"cannot create report directory {directory}: {exc.strerror or exc}", _fix_for(directory)
        ) from exc
    if not directory.is_dir():
        raise _not_a_directory(directory)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _target_mode(path: Path) -> int:
    """The permissions the final file should have: the old file's, else the umask default."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _stage(path: Path, data: bytes | Writer) -> Path:
    """Write ``data`` (bytes, or a writer called with the handle) to a fsynced temporary file next to
    ``path``; return the temp path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                # mkstemp creates 0600 files; a report or golden should look like any other file.
                os.fchmod(handle.fileno(), _target_mode(path))
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        _remove_quietly(Path(tmp))
        raise
    return Path(tmp)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _backup(path: Path) -> Path | None:
    """A copy of ``path``'s current content next to it (``None`` if it does not exist yet)."""
    if not path.exists():
        return None
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".bak")
    os.close(fd)
    try:
        shutil.copyfile(path, name)
    except BaseException:
        _remove_quietly(Path(name))
        raise
    return Path(name)


def _roll_back(replaced: list[Path], backups: dict[Path, Path | None]) -> None:
    """Undo finished renames of a multi-file write: old content back, new files removed."""
    for path in reversed(replaced):
        backup = backups.get(path)
        try:
            if backup is not None:
                os.replace(backup, path)
            else:
                path.unlink()
        except OSError:
            pass


def atomic_write_many(files: Mapping[str | os.PathLike[str], str | bytes | Writer]) -> list[Path]:
    """Write several files so that either all of them have their complete new content or none changed.

    Every file is staged first; replacement starts only once all temporaries are on disk.
    With more than one file, each existing target is backed up first, and a failure (or
    an interrupt) between two renames restores the ones already done. Raises
    :class:`ReportError` naming the directory and the fix; no temporary is left behind on
    failure. Returns the final paths.
    """
    targets = [(Path(p), data.encode("utf-8") if isinstance(data, str) else data if callable(data) else bytes(data))
               for p, data in files.items()]
    staged: list[tuple[Path, Path]] = []
    backups: dict[Path, Path | None] = {}
    replaced: list[Path] = []
    current = targets[0][0] if targets else Path(".")
    try:
        try:
            for path, data in targets:
                current = path
                _refuse_special(path)
                _ensure_dir(path.parent)
                staged.append((_stage(path, data), path))
            if len(staged) > 1:
                for _, path in staged:
                    current = path
                    backups[path] = _backup(path)
            for tmp, path in staged:
                current = path
                os.replace(tmp, path)
                replaced.append(path)
        except BaseException:
            _roll_back(replaced, backups)
            for tmp, _ in staged:
                _remove_quietly(tmp)
            raise
        finally:
            for backup in backups.values():
                if backup is not None:
                    _remove_quietly(backup)
    except OSError as exc:
        failed = current.parent
        raise ReportError(f"cannot write {current.name} in {failed}: {exc.strerror or exc}", _fix_for(failed)) from exc
    for directory in {path.parent for _, path in staged}:
        _fsync_dir(directory)
    return [path for path, _ in targets]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``, creating parent directories."""
    return atomic_write_many({path: text})[0]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``path``, creating parent directories."""
    return atomic_write_many({path: data})[0]


def atomic_write_stream(path: str | os.PathLike[str], write: Writer) -> Path:
    """Atomically write what ``write(handle)`` writes to ``path`` (large files, never held in memory whole)."""
    return atomic_write_many({path: write})[0]


__all__ = ["Writer", "atomic_write_bytes", "atomic_write_many", "atomic_write_stream", "atomic_write_text",
           "check_writable", "path_kind"]
