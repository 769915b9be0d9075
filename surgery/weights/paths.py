"""Files are what they claim: regular files only, opened without blocking, confined shards.

A named pipe, a device or a socket given as a weights file (or as a place to write to)
is refused from ``os.stat`` alone, before anything opens it: opening a FIFO for reading
blocks until a writer appears, and opening a device can have side effects. The one open
that follows uses ``O_NONBLOCK`` and checks ``fstat`` of the descriptor, so a path
swapped for a FIFO between the check and the open is still refused instead of hanging.

:func:`require_regular_file` is the reusable check (also for output paths such as
``--save`` and ``--report`` targets, with ``missing_ok=True``); :func:`confined_shard`
keeps the shards a ``*.safetensors.index.json`` names inside the index's directory.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

from surgery.errors import SurgeryError, WeightsError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class FileStamp(NamedTuple):
    """Which version of a file was read: device, inode, size and modification time."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def kind_of(mode: int) -> str:
    """``'a named pipe (FIFO)'``, ``'a directory'``, ... for a non-regular ``st_mode``."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def stat_path(path: str | Path, purpose: str, *, error: type[SurgeryError] = WeightsError) -> os.stat_result:
    """``os.stat`` (following links) with one-line errors that tell a loop from a missing file."""
    try:
        return os.stat(path)
    except OSError as exc:
        raise _stat_error(Path(path), purpose, exc, error) from exc


def require_regular_file(
    path: str | Path,
    purpose: str,
    *,
    missing_ok: bool = False,
    error: type[SurgeryError] = WeightsError,
) -> os.stat_result | None:
    """Refuse anything at ``path`` that is not a regular file, without opening it.

    Args:
        path: the file to read, or the target to write (symbolic links are followed).
        purpose: what the path is for, first in the message: ``"weights file"``,
            ``"--save target"``, ``"report file"``.
        missing_ok: for write targets: a missing path is fine and returns ``None``
            (a broken symbolic link is not: writing through it would create a file elsewhere).
        error: the :class:`SurgeryError` subclass to raise (``ReportError`` for reports ...).

    Returns:
        The ``os.stat`` result of the regular file (``None`` if missing and ``missing_ok``).

    Raises:
        ``error``: the path is a directory, FIFO, device, socket or symbolic link loop,
        is missing (unless ``missing_ok``), or cannot be examined.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        if missing_ok and exc.errno == errno.ENOENT and not os.path.islink(path):
            return None
        raise _stat_error(Path(path), purpose, exc, error) from exc
    if not stat.S_ISREG(st.st_mode):
        raise error(
            f"{purpose} {path} is {kind_of(st.st_mode)}, not a regular file",
            "pass the path of a regular file; pipes, devices and sockets are never opened",
        )
    return st


def open_regular(path: Path, purpose: str) -> tuple[int, os.stat_result]:
    """Open a regular file read-only without ever blocking on it; the descriptor and its ``fstat``.

    The path is checked by :func:`require_regular_file` first; the descriptor is checked
    again with ``fstat``, so a file swapped for a FIFO or device in between is refused.
    """
    require_regular_file(path, purpose)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise WeightsError(
            f"cannot open {purpose} {path}: {exc.strerror or exc}", "check the path and permissions"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WeightsError(
                f"{purpose} {path} became {kind_of(st.st_mode)} while it was being opened",
                "do not replace weights files while loading them",
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _stat_error(path: Path, purpose: str, exc: OSError, error: type[SurgeryError]) -> SurgeryError:
    if exc.errno == errno.ELOOP:
        return error(
            f"{purpose} {path} is a symbolic link loop (too many levels of symbolic links)",
            "replace the link with the file, or with a link to the file itself",
        )
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return error(
            f"{purpose} {path} is a broken symbolic link (to {os.readlink(path)})",
            "point the link at an existing file, or pass the file itself",
        )
    if exc.errno == errno.ENOENT:
        return error(f"{purpose} {path} does not exist", "check the path")
    if exc.errno == errno.ENOTDIR:
        return error(
            f"{purpose} {path} cannot exist: a parent in the path is a file, not a directory", "check the path"
        )
    return error(f"cannot examine {purpose} {path}: {exc.strerror or exc}", "check the path and its permissions")


def confined_shard(index: Path, name: object) -> Path:
    """The shard file an index entry names, refused unless it lies in the index's directory.

    An index is downloaded data: an absolute path, a ``..`` step or a symbolic link out of
    the directory would make it read any file the user can read. The one accepted link out
    is the Hugging Face hub cache layout, where ``snapshots/<revision>/<shard>`` links to
    ``../../blobs/<hash>`` of the same repository.
    """
    directory = index.absolute().parent
    fix = f"put the shards in {directory} and name them relative to it in the index"
    if not isinstance(name, str) or not name:
        raise WeightsError(f"{index} names a shard by {name!r}, not a file name", fix)
    relative = Path(name)
    if relative.is_absolute():
        raise WeightsError(f"{index} names shard {name!r} by an absolute path, not relative to its directory", fix)
    if ".." in relative.parts:
        raise WeightsError(
            f"{index} names shard {name!r}, which leaves the index's directory {directory} with '..'", fix
        )
    shard = directory / relative
    root = os.path.realpath(directory)
    target = os.path.realpath(shard)
    if _inside(target, root) or _hub_blob(target, root):
        return shard
    raise WeightsError(
        f"{index} names shard {name!r}, a symbolic link to {target} outside the index's directory {directory}",
        "copy the shard into the index's directory instead of linking to it",
    )


def _inside(target: str, root: str) -> bool:
    return os.path.commonpath([target, root]) == root and target != root


def _hub_blob(target: str, root: str) -> bool:
    """``root`` is ``<repo>/snapshots/<revision>`` and ``target`` a file directly in ``<repo>/blobs``."""
    snapshots = os.path.dirname(root)
    if os.path.basename(snapshots) != "snapshots":
        return False
    return os.path.dirname(target) == os.path.join(os.path.dirname(snapshots), "blobs")
