"""Compile-and-cache for ``kernels/*.cu``: one source, every backend.

* ``cpu``: the source (with its ``#include "..."`` headers expanded) is compiled by the system
  C++ compiler for this CPU (``-march=native``: the SIMD paths of ``kernels/``), cached on disk
  and loaded through ctypes.
* ``cpu-portable``: the same without ``-march=native``, so the portable fallbacks that stand in
  for the AVX2 / AVX-512 / F16C paths are what runs.
* ``gpu-emu``: the GPU side of the same source (``SRK_GPU``, the text NVRTC compiles) built by the
  host compiler after ``kernels/srk_cuda_shim.h``, plus one ``srk_emu_<kernel>`` entry per kernel
  that runs it for every (block, thread) of a CUDA grid (``kernels/srk_emu_run.h``).
  ``SRKERN_EMU_SANITIZE=1`` builds it with AddressSanitizer and UndefinedBehaviorSanitizer.
* GPU (``cuda``): the same expanded text, compiled by NVRTC (``srkern._nvrtc``).

The cache folder and the checks of its entries are ``srkern._cache``; the NVRTC compile and
the CUDA module are ``srkern._nvrtc``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

from . import _cache
from ._cache import BuildError  # noqa: F401 (re-exported: the family error of the build)

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
if not KERNEL_DIR.is_dir():  # running from a source tree: srkern/ and kernels/ are siblings
    KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"

# Contraction off: fmaf is written where a fused multiply-add is meant, so the CPU and GPU
# results agree bit for bit. -march=native is safe because the cache key includes the CPU.
# Not -mprefer-vector-width=512: g++ keeps the `omp simd` loops at 256 bits on AVX-512 CPUs, and
# that is faster here. Measured (2-core Xeon, AVX-512, SR BF16 cast of 64M elements, kernel
# only, 2 threads): 1.0-1.5 ns per element with 512-bit loops against 0.48-0.57 with 256-bit
# ones (one thread: 1.1 against 0.9). The Philox tile (kernels/cpu/philox_tile.h) is 512-bit
# intrinsics either way.
CPU_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-march=native",
             "-std=c++17", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas")
# SRKERN_CPU_ISA narrows the cpu backend's target below the host's: "avx2" builds the AVX2
# paths of kernels/cpu/ on an AVX-512 machine (-mno-avx512f turns off every AVX-512 subset), so
# that they run and are tested there (tests/test_simd.py). Unset or "native": the host's best.
CPU_ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f",)}
# gpu-emu: no -march=native (the GPU side has no host SIMD paths to pick), -O2 is plenty for a
# verification backend; with SRKERN_EMU_SANITIZE=1 the sanitizer flags below are appended.
EMU_FLAGS = ("-O2", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-fPIC",
             "-shared", "-Wall", "-Wno-unknown-pragmas")
EMU_SANITIZE_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                      "-fno-sanitize-recover=all")
BACKENDS = ("cpu", "cpu-portable", "gpu-emu")

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*(?://.*)?$', re.M)  # a trailing // comment allowed
_lock = threading.Lock()
# The open file of every library loaded through /proc/self/fd/N stays open while the process
# lives (loaded libraries are never unloaded anyway): glibc's dlopen hands back an already
# loaded library whose path string matches, so a closed and reused N would name the earlier
# library instead of the new one (seen with glibc 2.36).
_loaded_fds: list[int] = []



_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\d+)u?\b", re.M)


@functools.lru_cache(maxsize=None)
def header_defines(header: str) -> dict[str, int]:
    """Every integer ``#define`` of ``kernels/<header>`` (a ``u`` suffix allowed), by name."""
    return {m.group(1): int(m.group(2)) for m in _DEFINE.finditer((KERNEL_DIR / header).read_text())}


def kernel_defines(header: str, *names: str) -> tuple[int, ...]:
    """The values of the integer ``#define`` lines named ``names`` in ``kernels/<header>``, in order.

    Constants that kernels and Python share (table columns, launch geometry, the norm's layout)
    are written once, in the kernel headers, and read here; a name that is missing (renamed, or
    no longer a plain integer) raises ``BuildError`` instead of going out of sync."""
    found = header_defines(header)
    missing = [n for n in names if n not in found]
    if missing:
        raise BuildError(f"kernels/{header} has no integer #define {', '.join(missing)}")
    return tuple(found[n] for n in names)


def expand_source(name: str, prelude: str = "") -> str:
    """The text of ``kernels/<name>.cu`` with every quoted include expanded once, in order
    (``prelude``, for example an include of the CUDA shim, goes first)."""
    seen: set[str] = set()

    def expand(text: str, where: str) -> str:
        def repl(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            target = KERNEL_DIR / inc
            if not target.is_file():
                raise BuildError(f"{where} includes {inc!r}, which is not in {KERNEL_DIR}")
            return f"// ---- begin {inc}\n{expand(target.read_text(), inc)}\n// ---- end {inc}"
        # Headers are spliced in once each, so their include guards are not needed (and
        # `#pragma once` would warn in the single expanded file).
        text = re.sub(r"^\s*#\s*pragma\s+once\s*$", "", text, flags=re.M)
        return _INCLUDE.sub(repl, text)

    src = KERNEL_DIR / f"{name}.cu"
    if not src.is_file():
        raise BuildError(f"no kernel source {src}")
    return expand(prelude + src.read_text(), src.name)


@functools.lru_cache(maxsize=None)
def cxx_compiler() -> tuple[str, str]:
    """(path, version line) of the C++ compiler: $CXX, else g++, else c++."""
    env = os.environ.get("CXX")
    if env and not shutil.which(env):
        raise BuildError(f"CXX={env!r} is not an executable compiler: fix CXX or unset it to use g++")
    for cand in (env, "g++", "c++"):
        if cand and shutil.which(cand):
            path = shutil.which(cand)
            out = subprocess.run([path, "--version"], capture_output=True, text=True)
            return path, out.stdout.splitlines()[0] if out.stdout else "unknown"
    raise BuildError("no C++ compiler found for srkern's CPU backend: install g++ "
                     "(Debian: apt-get install g++) or set CXX")


@functools.lru_cache(maxsize=None)
def _machine_id() -> str:
    """The CPU as -march=native sees it: architecture plus the flags line of /proc/cpuinfo."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + "\n" + flags


def emu_sanitized() -> bool:
    """Whether gpu-emu is built with ASan and UBSan (``SRKERN_EMU_SANITIZE=1``)."""
    return os.environ.get("SRKERN_EMU_SANITIZE", "") not in ("", "0")


def cpu_isa() -> str:
    """The cpu backend's target (``$SRKERN_CPU_ISA``, read at every build lookup): a key of
    :data:`CPU_ISA_FLAGS`, default ``native``."""
    name = os.environ.get("SRKERN_CPU_ISA") or "native"
    if name not in CPU_ISA_FLAGS:
        raise BuildError(f"SRKERN_CPU_ISA={name!r} is not a CPU target: choose one of {tuple(CPU_ISA_FLAGS)}")
    return name


def compile_flags(backend: str) -> tuple[str, ...]:
    """The host compiler's flags for one of :data:`BACKENDS`."""
    if backend == "cpu":
        return CPU_FLAGS + CPU_ISA_FLAGS[cpu_isa()]
    if backend == "cpu-portable":
        return tuple(f for f in CPU_FLAGS if not f.startswith(("-march=", "-mtune=")))
    if backend == "gpu-emu":
        return EMU_FLAGS + (EMU_SANITIZE_FLAGS if emu_sanitized() else ())
    raise BuildError(f"unknown backend {backend!r}: expected one of {BACKENDS}")


_EMU_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def emu_source(name: str, cxx: str) -> str:
    """The gpu-emu translation unit of ``kernels/<name>.cu``: the CUDA shim, the kernel source
    exactly as NVRTC sees it (headers expanded), the grid runner and one entry per kernel.

    The kernels are listed by running the preprocessor with ``__global__`` kept as a marker, so
    kernels defined through macros are found too."""
    body = expand_source(name, prelude='#include "srk_cuda_shim.h"\n')
    res = subprocess.run([cxx, "-E", "-P", "-x", "c++", "-std=c++17", "-D__global__=__global__", "-"],
                         input=body, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"preprocessing kernels/{name}.cu for gpu-emu failed:\n{res.stderr}")
    kernels = _EMU_KERNEL.findall(res.stdout)
    runner = (KERNEL_DIR / "srk_emu_run.h").read_text()
    entries = "".join(f"SRK_EMU_ENTRY({k})\n" for k in kernels)
    return f"{body}\n// ---- begin srk_emu_run.h\n{runner}\n// ---- end srk_emu_run.h\n{entries}"


def _cpu_open(name: str, backend: str) -> tuple[Path, int]:
    """Compile ``kernels/<name>.cu`` for a CPU backend unless a trusted cache entry matches;
    (the entry's path, an open file descriptor of the very bytes that were checked), which the
    caller closes or loads."""
    flags = compile_flags(backend)
    cxx, version = cxx_compiler()
    source = emu_source(name, cxx) if backend == "gpu-emu" else expand_source(name)
    key_text = "\0".join([source, cxx, version, " ".join(flags), _machine_id()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    folder = _cache.cache_dir()
    stem = name if backend == "cpu" else f"{name}-{backend}"
    lib = folder / f"{stem}-{key}.so"
    digest = folder / f"{stem}-{key}.sha256"
    fd, why = _cache.open_entry(lib)
    if fd is not None:
        data = _cache.read_fd(fd)
        recorded, why_digest = _cache.read_trusted(digest)
        if recorded is None:  # missing: a rank that is writing the entry has not got to it yet
            why, bad = why_digest, digest
        elif recorded.decode(errors="replace").strip() != hashlib.sha256(data).hexdigest():
            why, bad = "does not match the digest recorded beside it", lib
        elif not _cache.is_elf(data, _cache.ELF_SHARED):
            why, bad = "is not a shared library (no ELF header of type ET_DYN)", lib
        else:
            return lib, fd
        os.close(fd)
        if why:
            _cache.rebuild_warning(bad, why)
    elif why:
        _cache.rebuild_warning(lib, why)
    return lib, _cpu_compile(name, backend, cxx, flags, source, (lib, digest))


def _cpu_compile(name: str, backend: str, cxx: str, flags: tuple[str, ...], source: str,
                 entry: tuple[Path, Path]) -> int:
    """Compile, cache as ``entry`` (library, digest) and return an open file descriptor of the
    compiler's output, whose bytes were checked and cached (the file itself is unlinked with its
    private temporary folder; the descriptor keeps it)."""
    lib, digest = entry
    try:
        tmp = tempfile.TemporaryDirectory(dir=lib.parent)
    except OSError as e:
        raise BuildError(f"cannot write in the cache folder {lib.parent} ({e.strerror}); "
                         "set SRKERN_CACHE_DIR to a folder you can write") from e
    with tmp:
        out = Path(tmp.name) / "k.so"
        cmd = [cxx, *flags, "-x", "c++", "-", "-o", str(out)]
        res = subprocess.run(cmd, input=source, capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError(f"compiling kernels/{name}.cu for {backend} failed:\n{' '.join(cmd)}\n{res.stderr}")
        try:
            fd = os.open(out, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise BuildError(f"{cxx} exited 0 but wrote no library for kernels/{name}.cu ({backend}); "
                             f"nothing was cached: {' '.join(cmd)}") from e
        try:
            data = _cache.read_fd(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
            if not _cache.is_elf(data, _cache.ELF_SHARED):
                raise BuildError(f"{cxx} exited 0 but wrote {len(data)} bytes that are not a shared "
                                 f"library (no ELF header of type ET_DYN) for kernels/{name}.cu ({backend}); "
                                 f"nothing was cached: {' '.join(cmd)}")
            # Library first, digest second: a reader that sees the new digest also sees the new library.
            _cache.write_entries([(lib, data), (digest, hashlib.sha256(data).hexdigest().encode())])
        except BaseException:
            os.close(fd)
            raise
    return fd


def cpu_library_path(name: str, backend: str = "cpu") -> Path:
    """Compile ``kernels/<name>.cu`` for a CPU backend if needed; return the cached shared library.

    For callers that want the file (to build ahead, to show it): to run it, use
    :func:`cpu_library` or :func:`load_cpu_library`, which load the bytes they checked; loading
    this path by name would be a second lookup, after the check."""
    lib, fd = _cpu_open(name, backend)
    os.close(fd)
    return lib


def load_cpu_library(name: str, backend: str = "cpu") -> ctypes.CDLL:
    """Compile ``kernels/<name>.cu`` for a CPU backend if needed and load it from the very open
    file whose bytes were checked (``/proc/self/fd/N``). Not cached: see :func:`cpu_library`."""
    lib, fd = _cpu_open(name, backend)
    try:
        handle = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError as e:
        os.close(fd)
        raise BuildError(f"loading the cached library {lib} failed: {e}") from e
    _loaded_fds.append(fd)
    return handle


def cpu_library(name: str, backend: str = "cpu") -> ctypes.CDLL:
    """The loaded library of ``kernels/<name>.cu`` for a CPU backend (compiled on first use)."""
    return _cpu_library(name, backend, compile_flags(backend))


@functools.lru_cache(maxsize=None)
def _cpu_library(name: str, backend: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    # One load per (file, backend, flags): the key check (expanding the source, for gpu-emu also
    # preprocessing it, and hashing the library) runs once, not once per kernel of the file.
    with _lock:
        return load_cpu_library(name, backend)


def kernel_names() -> list[str]:
    """Stems of every kernel source in ``kernels/``."""
    return sorted(p.stem for p in KERNEL_DIR.glob("*.cu"))
