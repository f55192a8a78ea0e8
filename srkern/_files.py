"""Atomic file writes, shared by the kernel cache and the checkpoints, and the guarded open that
checkpoints read their files through."""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part, and
    the new one survives a crash once this returns (:func:`replace_file`, then
    :func:`sync_folder`)."""
    replace_file(path, data)
    sync_folder(Path(path).parent)


def replace_file(path: Path, data: bytes) -> None:
    """A temporary file in ``path``'s folder (mode 0600, from mkstemp) is written and fsynced,
    then renamed over ``path``: from the rename on, readers see the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that the renames in it survive a crash."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading (a buffered binary file), or ``OSError`` unless it is a regular file.

    The open uses ``O_NONBLOCK``, so a FIFO (or a device) in the file's place is refused instead of
    blocking the open or the first read forever; the caller sizes the file with ``fstat`` on the
    returned file before reading, so a huge or sparse file is refused before any memory is taken.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise OSError(f"not a regular file but {_KINDS.get(kind, f'file type {kind:o}')}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of regular file ``path`` (opened by :func:`open_regular`); ``OSError`` if it is
    not one, or holds more than ``limit`` bytes (checked before anything is read)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise OSError(f"{size} bytes, more than the {limit} expected")
        return f.read(size)
