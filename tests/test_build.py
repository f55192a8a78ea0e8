"""The CPU compile cache (srkern._build): keys, trust checks, the private folder, clear errors.

Each test points SRKERN_CACHE_DIR at its own tmp_path and compiles the small ``philox`` kernel,
so nothing here touches the user's real cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from srkern import _build, _cache
from srkern._build import BuildError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, private cache folder for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def kernels(tmp_path, monkeypatch) -> Path:
    """A private copy of kernels/ that the build layer reads instead of the real one."""
    path = tmp_path / "kernels"
    shutil.copytree(_build.KERNEL_DIR, path)
    monkeypatch.setattr(_build, "KERNEL_DIR", path)
    return path


def _identity(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_ino, st.st_mtime_ns


def test_second_call_uses_the_cache(cache):
    lib = _build.cpu_library_path("philox")
    first = _identity(lib)
    assert _build.cpu_library_path("philox") == lib
    assert _identity(lib) == first, "the cached library was rewritten"
    # exactly the library and its digest, no temporary files left behind
    assert sorted(p.suffix for p in cache.iterdir()) == [".sha256", ".so"]
    assert (lib.with_suffix(".sha256")).read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert stat.S_IMODE(lib.stat().st_mode) == 0o600


def test_header_edit_changes_the_key(cache, kernels):
    # philox.cu includes srk_philox.h, which includes srk_platform.h: an edit two levels down
    # must give a new cache entry, and an edit to a header it does not include must not.
    before = _build.cpu_library_path("philox")
    with open(kernels / "srk_round.h", "a") as f:
        f.write("\n// not included by philox.cu\n")
    assert _build.cpu_library_path("philox") == before
    with open(kernels / "srk_platform.h", "a") as f:
        f.write("\n// an edit in a nested header\n")
    after = _build.cpu_library_path("philox")
    assert after != before and after.exists() and before.exists()


def test_compiler_flags_are_in_the_key(cache, monkeypatch):
    before = _build.cpu_library_path("philox")
    monkeypatch.setattr(_build, "CPU_FLAGS", _build.CPU_FLAGS + ("-DSRK_TEST_FLAG=1",))
    assert _build.cpu_library_path("philox") != before


def test_entry_with_wrong_hash_is_rebuilt(cache):
    lib = _build.cpu_library_path("philox")
    good = lib.read_bytes()
    with open(lib, "ab") as f:  # same owner and mode, different bytes than recorded
        f.write(b"tampered")
    with pytest.warns(RuntimeWarning, match="does not match the digest recorded beside it"):
        assert _build.cpu_library_path("philox") == lib
    assert lib.read_bytes() != good + b"tampered"
    assert (lib.with_suffix(".sha256")).read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()


@pytest.mark.parametrize("which,mode", [("so", 0o620), ("so", 0o602), ("sha256", 0o660)],
                         ids=["lib=group-writable", "lib=other-writable", "digest=group-writable"])
def test_writable_entry_is_rebuilt(cache, which, mode):
    lib = _build.cpu_library_path("philox")
    target = lib.with_suffix("." + which)
    target.chmod(mode)
    ino = lib.stat().st_ino
    with pytest.warns(RuntimeWarning, match=f"{target.name} is writable by group or others"):
        assert _build.cpu_library_path("philox") == lib
    assert lib.stat().st_ino != ino, "an entry writable by others was loaded instead of rebuilt"
    assert stat.S_IMODE(lib.stat().st_mode) == 0o600
    assert stat.S_IMODE(lib.with_suffix(".sha256").stat().st_mode) == 0o600


def test_cache_folder_is_created_private(tmp_path, monkeypatch):
    path = tmp_path / "new" / "nested" / "cache"
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(path))
    assert _cache.cache_dir() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=["mode=777", "mode=770", "mode=702"])
def test_non_private_folder_is_refused(tmp_path, monkeypatch, mode):
    path = tmp_path / "open"
    path.mkdir()
    path.chmod(mode)
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(path))
    with pytest.raises(BuildError, match="is not private to this user"):
        _build.cpu_library_path("philox")
    assert not any(path.iterdir()), "nothing may be written into a refused folder"


def test_folder_owned_by_someone_else_is_refused(cache, monkeypatch):
    _cache.cache_dir()
    monkeypatch.setattr(_build.os, "getuid", lambda: os.geteuid() + 12345)
    with pytest.raises(BuildError, match="owner uid"):
        _cache.cache_dir()


@pytest.mark.parametrize("cxx", [None, "missing"], ids=["no-compiler-on-PATH", "CXX-names-a-missing-file"])
def test_missing_compiler(cache, tmp_path, monkeypatch, cxx):
    empty = tmp_path / "bin"
    empty.mkdir()
    if cxx:
        # A CXX that names nothing is an error even though g++ exists: never silently swap compilers.
        monkeypatch.setenv("CXX", str(tmp_path / "no" / "such" / "g++"))
        expect = r"CXX=.*is not an executable compiler"
    else:
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setenv("PATH", str(empty))
        expect = r"no C\+\+ compiler found.*install g\+\+"
    _build.cxx_compiler.cache_clear()
    try:
        with pytest.raises(BuildError, match=expect):
            _build.cpu_library_path("philox")
    finally:
        monkeypatch.undo()
        _build.cxx_compiler.cache_clear()


def test_compile_error_is_reported(cache, kernels):
    with open(kernels / "philox.cu", "a") as f:
        f.write("\nthis is not C++;\n")
    with pytest.raises(BuildError, match=r"compiling kernels/philox.cu for cpu failed(.|\n)*error"):
        _build.cpu_library_path("philox")


def test_missing_header_is_reported(kernels):
    (kernels / "srk_philox.h").unlink()
    with pytest.raises(BuildError, match="includes 'srk_philox.h'"):
        _build.expand_source("philox")
