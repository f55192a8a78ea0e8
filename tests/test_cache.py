"""The kernel cache under attack (issue 11, parts 1 and 5): foreign code must never be loaded,
and an unusable cache must be a BuildError naming the path.

* The way to the cache folder: a folder above it that another user can write is refused before
  anything is made (a sticky folder of root's or the user's, such as /tmp, is fine).
* The load: the library is loaded from the open file whose bytes were hashed, so a file swapped
  in by name after the check is not what runs (told apart by a marker library).
* A compiler that exits 0 without writing a library caches nothing.
* A damaged entry (a link, a folder, a FIFO, a non-library with a matching digest) is rebuilt
  with a warning, for the CPU libraries and for the GPU cubins.

Tests that need a folder owned by another user chown one, which takes root (CI runs as root);
elsewhere they are skipped. philox is compiled once for this file; the tests that rebuild an
entry use a stand-in compiler that copies that build (``copy_cxx``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from srkern import _build, _cache, _nvrtc
from srkern._build import BuildError

OTHER_UID = 4242  # a uid that is neither root nor the user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's takes root (chown)")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def copy_cxx(tmp_path_factory) -> Path:
    """A stand-in compiler that "compiles" philox by copying one real build of it (made here,
    once): the tests that rebuild entries take milliseconds, not a compile each."""
    folder = tmp_path_factory.mktemp("copy-cxx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRKERN_CACHE_DIR", str(folder / "cache"))
        genuine = _build.cpu_library_path("philox").read_bytes()
    (folder / "philox.so").write_bytes(genuine)
    script = folder / "copy-cxx"
    script.write_text("#!/bin/sh\n"
                      '[ "$1" = --version ] && { echo "copy-cxx 1.0"; exit 0; }\n'
                      'out=; while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
                      f'cat >/dev/null\ncp "{folder / "philox.so"}" "$out"\n')
    script.chmod(0o755)
    return script


@pytest.fixture
def fast_cxx(copy_cxx, monkeypatch) -> Path:
    monkeypatch.setenv("CXX", str(copy_cxx))
    _build.cxx_compiler.cache_clear()
    yield copy_cxx
    _build.cxx_compiler.cache_clear()  # the next test finds the real compiler again


@pytest.fixture(scope="module")
def built(copy_cxx, tmp_path_factory) -> dict[str, bytes]:
    """philox's cache entry made by ``copy_cxx``: {file name: bytes} of its .so and .sha256."""
    folder = tmp_path_factory.mktemp("built") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRKERN_CACHE_DIR", str(folder))
        mp.setenv("CXX", str(copy_cxx))
        _build.cxx_compiler.cache_clear()
        try:
            _build.cpu_library_path("philox")
        finally:
            _build.cxx_compiler.cache_clear()
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def cached(cache, fast_cxx, built) -> Path:
    """The philox entry of ``built`` in this test's cache folder (CXX is ``copy_cxx``, so the
    key matches and a rebuild is a copy); the library's path."""
    cache.mkdir(mode=0o700)
    for name, data in built.items():
        (cache / name).write_bytes(data)
        (cache / name).chmod(0o600)
    (lib,) = cache.glob("*.so")
    return lib


@pytest.fixture(scope="module")
def marker_library(tmp_path_factory) -> Path:
    """A library that is not philox: it exports srk_test_marker, which no kernel has."""
    folder = tmp_path_factory.mktemp("marker")
    (folder / "marker.cc").write_text('extern "C" int srk_test_marker(void) { return 1234; }\n')
    subprocess.run([_build.cxx_compiler()[0], "-shared", "-fPIC", str(folder / "marker.cc"),
                    "-o", str(folder / "marker.so")], check=True)
    return folder / "marker.so"


@pytest.fixture
def fake_cxx(tmp_path, monkeypatch):
    """make(action): CXX becomes a script that answers --version, then runs ``action`` (shell,
    with the output file in $out) and exits 0 whatever it wrote."""
    def make(action: str) -> Path:
        script = tmp_path / "fake-cxx"
        script.write_text("#!/bin/sh\n"
                          '[ "$1" = --version ] && { echo "fake-cxx 1.0"; exit 0; }\n'
                          'out=; while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
                          f"cat >/dev/null\n{action}\nexit 0\n")
        script.chmod(0o755)
        monkeypatch.setenv("CXX", str(script))
        _build.cxx_compiler.cache_clear()
        return script
    yield make
    _build.cxx_compiler.cache_clear()  # the next test finds the real compiler again


def _load(name: str = "philox", backend: str = "cpu"):
    """The uncached load that ``cpu_library`` does once per kernel file and backend."""
    return _build._cpu_library.__wrapped__(name, backend, _build.compile_flags(backend))


def _within(fn, seconds: float = 30.0, fifo: Path | None = None):
    """fn() in a thread: a call that blocks (a FIFO opened for reading waits for a writer
    forever) fails this test instead of hanging the run; ``fifo`` is then opened for writing
    once, so that the blocked call ends (and frees the build lock it may hold)."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            result["error"] = e
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    blocked = worker.is_alive()
    if blocked and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(seconds)
    assert not blocked, f"still blocked after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".so", ".sha256"))


# ---- the way to the cache folder ------------------------------------------------------------------

@pytest.fixture
def open_tmp():
    """A fresh folder under /tmp that everyone may enter (0755), unlike pytest's 0700 tmp_path
    (where the ancestor walk ends: nobody else can reach below it)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="srk-cache-test-"))
    path.chmod(0o755)
    yield path
    for p in sorted(path.rglob("*"), reverse=True):
        with contextlib.suppress(OSError):
            p.chmod(0o700)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.attack("cache")
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757], ids=["mode=777", "mode=770", "mode=757"])
def test_ancestor_writable_by_others_is_refused(open_tmp, monkeypatch, mode):
    # Whoever can write a folder above the cache can rename the cache folder away and put their
    # own in its place between the check and the load: refused before anything is made.
    shared = open_tmp / "shared"
    shared.mkdir()
    shared.chmod(mode)
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(shared / "sub" / "cache"))
    with pytest.raises(BuildError, match=rf"the folder {re.escape(str(shared))} above it can be written by another user"):
        _cache.cache_dir()
    assert not any(shared.iterdir()), "nothing may be made below a refused folder"


@pytest.mark.attack("cache")
@needs_root
@pytest.mark.parametrize("mode", [0o755, 0o1777], ids=["mode=755", "mode=1777-sticky"])
def test_ancestor_owned_by_another_user_is_refused(open_tmp, monkeypatch, mode):
    # Its owner can rename anything in it, even when it is sticky.
    theirs = open_tmp / "theirs"
    theirs.mkdir()
    (theirs / "cache").mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, -1)
    theirs.chmod(mode)
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(theirs / "cache"))
    with pytest.raises(BuildError, match=rf"{re.escape(str(theirs))} above it .*owner uid {OTHER_UID}"):
        _build.cpu_library_path("philox")
    assert not any((theirs / "cache").iterdir())


@pytest.mark.attack("cache")
def test_group_writable_folder_inside_a_private_home_is_allowed(open_tmp, monkeypatch):
    # umask 002 gives ~/.cache mode 0775; inside a 0700 home nobody else can reach it. The same
    # folder with the home open to others (0755) is refused.
    home = open_tmp / "home"
    (home / ".cache").mkdir(parents=True)
    (home / ".cache").chmod(0o775)
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(home / ".cache" / "srkern"))
    home.chmod(0o700)
    assert _cache.cache_dir() == home / ".cache" / "srkern"
    home.chmod(0o755)
    with pytest.raises(BuildError, match=rf"the folder {re.escape(str(home / '.cache'))} above it can be written"):
        _cache.cache_dir()


@pytest.mark.attack("cache")
def test_sticky_ancestor_of_the_user_is_allowed(tmp_path, monkeypatch):
    # Like /tmp: others can add names to a sticky folder but not rename the user's.
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(sticky / "cache"))
    assert _cache.cache_dir() == sticky / "cache"


@pytest.mark.attack("cache")
@needs_root
@pytest.mark.parametrize("mode,allowed", [(0o1777, True), (0o755, True), (0o777, False)],
                         ids=["root-sticky=allowed", "root-755=allowed", "root-777=refused"])
def test_root_owned_ancestor_for_another_user(open_tmp, monkeypatch, mode, allowed):
    # The user is not root here (os.getuid says OTHER_UID, who owns the cache folder): root's
    # folders on the way are fine unless anyone can write them without the sticky bit.
    parent = open_tmp / "parent"
    parent.mkdir()
    parent.chmod(mode)
    (parent / "cache").mkdir(mode=0o700)
    os.chown(parent / "cache", OTHER_UID, -1)
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(parent / "cache"))
    monkeypatch.setattr(_build.os, "getuid", lambda: OTHER_UID)
    if allowed:
        assert _cache.cache_dir() == parent / "cache"
    else:
        with pytest.raises(BuildError, match=f"{re.escape(str(parent))} above it can be written by another user"):
            _cache.cache_dir()


@pytest.mark.attack("error")
@pytest.mark.parametrize("case", ["path-is-a-file", "parent-is-a-file", "read-only-folder"])
def test_unusable_cache_path_is_a_build_error(tmp_path, monkeypatch, case):
    # Not FileExistsError / NotADirectoryError / PermissionError from deep inside the build.
    # (A read-only folder is refused by its mode, which also holds for root, whom the kernel
    # would let write it anyway.)
    thing = tmp_path / "thing"
    if case == "read-only-folder":
        thing.mkdir(mode=0o700)
        thing.chmod(0o500)
        path, expect = thing, r"is not readable, writable and searchable by its owner \(mode 0o500\)"
    else:
        thing.write_bytes(b"user data")
        if case == "path-is-a-file":
            path, expect = thing, "is not a folder"
        else:
            path, expect = thing / "cache", f"{re.escape(str(thing))} is not a folder"
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(path))
    with pytest.raises(BuildError, match=rf"cache folder {re.escape(str(path))} .*{expect}"):
        _build.cpu_library_path("philox")
    if case == "read-only-folder":
        assert not any(thing.iterdir())
    else:
        assert thing.read_bytes() == b"user data"


@pytest.mark.attack("error")
def test_full_disk_is_a_build_error(cache, fast_cxx, monkeypatch):
    # A write that fails (ENOSPC here, EROFS alike) names the entry; nothing half-written stays.
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(_cache, "atomic_write", full)
    with pytest.raises(BuildError, match=rf"cannot write the cache entry {re.escape(str(cache))}/philox-\w+\.so "
                                         r"\(No space left on device\)"):
        _build.cpu_library_path("philox")
    assert list(cache.iterdir()) == []


# ---- what is loaded -------------------------------------------------------------------------------

@pytest.mark.attack("cache")
@pytest.mark.parametrize("entry", ["cached", "just-built"])
def test_entry_swapped_after_the_check_is_not_loaded(cache, fast_cxx, built, marker_library, monkeypatch, entry):
    # The attack of the issue, made certain instead of 2 tries in 60: right after the checks,
    # just before dlopen, another library is renamed over the entry. What is loaded must be the
    # bytes that were checked (philox), not the marker library now at the entry's name.
    if entry == "cached":
        cache.mkdir(mode=0o700)
        for name, data in built.items():
            (cache / name).write_bytes(data)
            (cache / name).chmod(0o600)
    real_cdll = _build.ctypes.CDLL
    swapped = []

    def swap_then_load(path, *args, **kwargs):
        (lib,) = cache.glob("philox-*.so")
        foreign = cache / "foreign.so"
        foreign.write_bytes(marker_library.read_bytes())
        os.replace(foreign, lib)
        swapped.append(lib)
        return real_cdll(path, *args, **kwargs)
    monkeypatch.setattr(_build.ctypes, "CDLL", swap_then_load)
    handle = _load()
    assert swapped, "the swap did not happen: the test proves nothing"
    assert swapped[0].read_bytes() == marker_library.read_bytes()
    assert not hasattr(handle, "srk_test_marker"), "the library swapped in after the check was loaded"
    assert hasattr(handle, "philox_blocks")


@pytest.mark.attack("cache")
@pytest.mark.parametrize("action,size", [(': > "$out"', 0), ('echo "not a library" > "$out"', 14),
                                          ("printf '\\177ELF' > \"$out\"", 4), ("", None),
                                          ('gcc -c -x c /dev/null -o "$out"', -1)],
                         ids=["empty-file", "text-file", "elf-magic-only", "no-file", "object-file"])
def test_compiler_that_writes_no_library_caches_nothing(cache, fake_cxx, action, size):
    # Exit status 0 is not proof of a library: without an ELF header nothing is cached (else
    # every later run would load it, or fail with "invalid ELF header").
    script = fake_cxx(action)
    wrote = ("no library" if size is None else
             rf"{size if size >= 0 else '[0-9]+'} bytes that are not a shared library")
    with pytest.raises(BuildError, match=rf"{re.escape(str(script))} exited 0 but wrote {wrote}.*kernels/philox\.cu \(cpu\)"):
        _build.cpu_library_path("philox")
    assert _entries(cache) == []


def _damage(lib: Path, how: str) -> None:
    digest = lib.with_suffix(".sha256")
    if how == "symlink":  # to a genuine copy, with the right digest: still not loaded
        away = lib.parent.parent / "elsewhere.so"
        away.write_bytes(lib.read_bytes())
        lib.unlink()
        lib.symlink_to(away)
    elif how in ("folder", "fifo"):
        lib.unlink()
        lib.mkdir() if how == "folder" else os.mkfifo(lib, 0o600)
    elif how == "not-elf":  # a non-library whose digest matches
        lib.write_bytes(b"#!/bin/sh\n" * 10)
        digest.write_text(hashlib.sha256(lib.read_bytes()).hexdigest())
    elif how == "digest=folder":
        digest.unlink()
        digest.mkdir()


_WHY = {"symlink": "is a symbolic link", "folder": "is not a regular file", "fifo": "is not a regular file",
        "not-elf": r"is not a shared library \(no ELF header of type ET_DYN\)", "digest=folder": "is not a regular file"}


@pytest.mark.attack("cache")
@pytest.mark.parametrize("how", list(_WHY))
def test_damaged_entry_is_rebuilt_with_a_warning(cached, how):
    # Never loaded, never an OSError (invalid ELF header, IsADirectoryError) and never a hang
    # (a FIFO): rebuilt, with a warning that names the entry and says why.
    _damage(cached, how)
    bad = cached.with_suffix(".sha256") if how.startswith("digest") else cached
    with pytest.warns(RuntimeWarning, match=rf"cache entry {re.escape(str(bad))} {_WHY[how]}; .*rebuilt"):
        handle = _within(_load, fifo=cached if how == "fifo" else None)
    assert hasattr(handle, "philox_blocks")
    st = os.lstat(cached)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    data = cached.read_bytes()
    assert data.startswith(b"\x7fELF")
    assert cached.with_suffix(".sha256").read_text().strip() == hashlib.sha256(data).hexdigest()


@pytest.mark.attack("error")
def test_folder_with_files_at_an_entry_is_a_build_error(cached):
    # Not srkern's to delete: the user is told to remove it, and it is left as it was.
    cached.unlink()
    cached.mkdir()
    (cached / "notes.txt").write_text("mine")
    with pytest.warns(RuntimeWarning, match="is not a regular file"), \
            pytest.raises(BuildError, match=rf"{re.escape(str(cached))} is a folder where a cache entry .*remove it"):
        _build.cpu_library_path("philox")
    assert [p.name for p in cached.iterdir()] == ["notes.txt"]
    assert (cached / "notes.txt").read_text() == "mine"


# ---- the GPU cache --------------------------------------------------------------------------------

CUBIN = b"\x7fELF" + bytes(range(200))  # what the fake NVRTC below returns


@pytest.fixture
def fake_nvrtc(monkeypatch) -> list[str]:
    """NVRTC replaced by a stand-in that counts its compiles (no CUDA needed: the cache logic is
    under test, not the compile)."""
    compiles: list[str] = []

    def program(name, arch, source=None):
        compiles.append(name)
        return _nvrtc.NvrtcProgram(True, b"// ptx of " + name.encode(), CUBIN, "", _nvrtc.nvrtc_flags(arch))
    monkeypatch.setattr(_nvrtc, "nvrtc_version", lambda: "fake 1.0")
    monkeypatch.setattr(_nvrtc, "nvrtc_program", program)
    return compiles


@pytest.mark.attack("cache")
@pytest.mark.parametrize("how", ["symlink", "folder", "fifo", "not-elf"])
def test_damaged_gpu_entry_is_rebuilt_with_a_warning(cache, fake_nvrtc, how):
    first = _nvrtc.gpu_binary("philox", "sm_80")
    assert _nvrtc.gpu_binary("philox", "sm_80") == first and fake_nvrtc == ["philox"]  # cached
    (cubin,) = cache.glob("*.cubin")
    if how == "not-elf":
        cubin.write_bytes(b"not a cubin")
        ptx = cubin.with_suffix(".ptx")
        cubin.with_suffix(".sha256").write_text(f"{hashlib.sha256(b'not a cubin').hexdigest()}\n"
                                                f"{hashlib.sha256(ptx.read_bytes()).hexdigest()}\n")
    else:
        _damage(cubin, how)
    why = {"symlink": "is a symbolic link", "not-elf": r"is not a cubin \(no ELF header\)"}.get(how, "is not a regular file")
    with pytest.warns(RuntimeWarning, match=rf"cache entry {re.escape(str(cubin))} {why}"):
        again = _within(lambda: _nvrtc.gpu_binary("philox", "sm_80"), fifo=cubin if how == "fifo" else None)
    assert again.cubin == CUBIN and fake_nvrtc == ["philox", "philox"]
    assert stat.S_ISREG(os.lstat(cubin).st_mode) and cubin.read_bytes() == CUBIN


@pytest.mark.attack("cache")
def test_gpu_cache_under_an_open_folder_is_refused(open_tmp, monkeypatch, fake_nvrtc):
    shared = open_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(shared / "cache"))
    with pytest.raises(BuildError, match=f"{re.escape(str(shared))} above it can be written by another user"):
        _nvrtc.gpu_binary("philox", "sm_80")
    assert not any(shared.iterdir()) and fake_nvrtc == []
