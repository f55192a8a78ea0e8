"""The kernel cache on disk: the private folder and the checks of its entries, shared by the host
compiler's builds (``srkern._build``) and NVRTC's (``srkern._nvrtc``).

Disk-cache rules:

* The folder is private to the user (0700, owned by the user), and so is the way to it: every
  folder above it must be the user's or root's and writable by nobody else, except a sticky
  folder owned by root or by the user (``/tmp``), where others cannot rename what is not theirs.
  Anything else is refused with a ``BuildError`` naming the folder, before anything is created,
  as is a cache path that is not a folder, cannot be made, or is not writable by its owner.
  Whoever can write the cache folder itself (the user, root) can replace the code: by design.
* The key is a SHA-256 of the expanded source, the compiler's path and version (NVRTC's for
  GPUs), the flags and the machine (the GPU architecture); writes are atomic (write to a
  temporary file, fsync, rename), because several MPI ranks compile at once.
* An entry is opened once, without following links and without blocking (a FIFO at its name
  does not hang), checked on that open file (a regular file, owned by the user, not writable by
  group or others), and its bytes are hashed; a CPU library is then loaded from that same open
  file (``/proc/self/fd/N``), never looked up by name again, so a file swapped in after the
  check is not what runs. Linux only, as ``/proc`` is.
* An entry that fails a check (a symbolic link, a folder, a FIFO, someone else's file, bytes that
  do not match the digest recorded beside it, or no ELF header) is never loaded: it is rebuilt,
  with a ``RuntimeWarning`` saying why (a missing entry is rebuilt silently). An empty folder at
  an entry's name is removed first; a folder with something in it is not srkern's to delete, so
  that is a ``BuildError`` naming it.
* A compiler that exits 0 without writing a shared library (no file, or no ELF header) is a
  ``BuildError`` naming the compiler and the kernel, and nothing is cached.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import warnings
from pathlib import Path

from ._files import atomic_write

# A shared library (or cubin) starts with the ELF magic, and an ELF64 header alone is 64 bytes.
_ELF_MAGIC = b"\x7fELF"
_ELF_MIN_SIZE = 64
ELF_SHARED = 3  # e_type of a shared library (ET_DYN)


class BuildError(RuntimeError):
    """A kernel could not be compiled, or a tool it needs is missing."""



def cache_dir() -> Path:
    """The private cache folder: $SRKERN_CACHE_DIR, else $XDG_CACHE_HOME/srkern, else ~/.cache/srkern."""
    root = os.environ.get("SRKERN_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "srkern"
    # Resolved once: the checks below hold for this path, which has no symbolic link left that
    # someone could later point elsewhere.
    path = Path(os.path.realpath(path))
    uid = os.getuid()
    check_ancestors(path, uid)
    try:
        # Each missing folder is made 0700 (os.makedirs would give the ones above the last the
        # umask's mode, which may be group-writable).
        for folder in (*reversed(path.parents), path):
            if not os.path.lexists(folder):
                with contextlib.suppress(FileExistsError):  # another rank made it first
                    os.mkdir(folder, 0o700)
        st = os.lstat(path)  # not followed: a link put in its place after realpath is refused
    except OSError as e:
        raise BuildError(f"cache folder {path} cannot be made ({e.strerror}: {e.filename}); "
                         "set SRKERN_CACHE_DIR to a folder you can write") from e
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"cache folder {path} is not a folder; remove it or set SRKERN_CACHE_DIR")
    if st.st_uid != uid or st.st_mode & 0o022:
        raise BuildError(f"cache folder {path} is not private to this user "
                         f"(owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); "
                         "fix its permissions or set SRKERN_CACHE_DIR")
    if st.st_mode & 0o700 != 0o700:
        raise BuildError(f"cache folder {path} is not readable, writable and searchable by its "
                         f"owner (mode {oct(st.st_mode & 0o777)}): chmod 700 it or set SRKERN_CACHE_DIR")
    return path


def check_ancestors(path: Path, uid: int) -> None:
    """Refuse ``path`` if another user could rename or replace it or a folder on the way to it:
    every existing folder above it must be owned by ``uid`` or root and writable by nobody else,
    unless it is sticky (then others cannot rename what they do not own). The walk ends at the
    first such folder that nobody else may even enter (no group or other search bit, like a
    0700 home): what lies below it is out of everyone else's reach, so a group-writable
    ``~/.cache`` inside it (umask 002) is fine; below it only a file where a folder belongs is
    refused (by name, not as a raw OSError)."""
    private = False
    for folder in reversed(path.parents):  # from / down
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            return  # this one and those below it are made by cache_dir, 0700
        except OSError as e:
            raise BuildError(f"cache folder {path} cannot be checked: {folder}: {e.strerror}; "
                             "set SRKERN_CACHE_DIR") from e
        if not stat.S_ISDIR(st.st_mode):
            raise BuildError(f"cache folder {path} cannot be made: {folder} is not a folder; "
                             "set SRKERN_CACHE_DIR")
        if private:
            continue
        sticky = st.st_mode & stat.S_ISVTX
        if st.st_uid not in (uid, 0) or (st.st_mode & 0o022 and not sticky):
            raise BuildError(f"cache folder {path} is refused: the folder {folder} above it can be "
                             f"written by another user (owner uid {st.st_uid}, mode "
                             f"{oct(st.st_mode & 0o7777)}), who could swap the cached code; set "
                             "SRKERN_CACHE_DIR to a folder below ones only you or root can write")
        private = not st.st_mode & 0o011


def open_entry(path: Path) -> tuple[int | None, str | None]:
    """(an open file descriptor of ``path``, None) if it is a regular file owned by this user and
    not writable by group or others (checked on the open file itself), else (None, why not);
    why is None for a missing entry, which is nothing to warn about."""
    try:
        # No link followed; non-blocking, so a FIFO at the name cannot hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
    st = os.fstat(fd)
    why = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
           f"is owned by uid {st.st_uid}" if st.st_uid != os.getuid() else
           "is writable by group or others" if st.st_mode & 0o022 else None)
    if why:
        os.close(fd)
        return None, why
    return fd, None


def read_fd(fd: int) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as f:
        return f.read()


def read_trusted(path: Path) -> tuple[bytes | None, str | None]:
    """(the bytes of ``path``, None) if :func:`open_entry` trusts it, else (None, why not)."""
    fd, why = open_entry(path)
    if fd is None:
        return None, why
    try:
        return read_fd(fd), None
    finally:
        os.close(fd)


def is_elf(data: bytes, kind: int | None = None) -> bool:
    """Whether ``data`` is an ELF file, of type ``kind`` (``e_type``: 3 for a shared library)
    when given: a compiler's object file or executable is not a library dlopen can load."""
    if len(data) < _ELF_MIN_SIZE or not data.startswith(_ELF_MAGIC):
        return False
    return kind is None or int.from_bytes(data[16:18], "little" if data[5] == 1 else "big") == kind


def rebuild_warning(path: Path, why: str) -> None:
    warnings.warn(f"srkern: cache entry {path} {why}; it is not used, and is rebuilt",
                  RuntimeWarning, stacklevel=3)


def make_room(path: Path) -> None:
    """Remove an empty folder standing where cache entry ``path`` belongs (a rename cannot
    replace a folder); a folder with something in it is not srkern's to delete."""
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            os.rmdir(path)
        except OSError as e:
            raise BuildError(f"{path} is a folder where a cache entry of srkern belongs, and it "
                             f"cannot be removed ({e.strerror}): remove it") from e


def write_entries(entries: list[tuple[Path, bytes]]) -> None:
    """Write cache entries atomically, in order; a file system error is a BuildError naming the
    entry (a full disk, a read-only file system)."""
    for path, data in entries:
        make_room(path)
        try:
            atomic_write(path, data)
        except OSError as e:
            raise BuildError(f"cannot write the cache entry {path} ({e.strerror or e}); "
                             "set SRKERN_CACHE_DIR to a folder you can write") from e


