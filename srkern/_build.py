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
* GPU (``cuda``): the same expanded text is compiled here by NVRTC (``cuda.bindings.nvrtc``)
  with srkern's flags only, PTX and cubin from one compile (:func:`nvrtc_program`); the cubin is
  cached like the CPU builds and loaded into CuPy from the checked bytes (:func:`gpu_module`).
  Not ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` to every NVRTC compile, so the
  program it loads would flush subnormals and would not be the one ``regs``/``ptx`` check.

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
import ctypes
import errno
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
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ._files import atomic_write

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
if not KERNEL_DIR.is_dir():  # running from a source tree: srkern/ and kernels/ are siblings
    KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"

# Contraction off: fmaf is written where a fused multiply-add is meant, so the CPU and GPU
# results agree bit for bit. -march=native is safe because the cache key includes the CPU.
CPU_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-march=native",
             "-std=c++17", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas")
# gpu-emu: no -march=native (the GPU side has no host SIMD paths to pick), -O2 is plenty for a
# verification backend; with SRKERN_EMU_SANITIZE=1 the sanitizer flags below are appended.
EMU_FLAGS = ("-O2", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-fPIC",
             "-shared", "-Wall", "-Wno-unknown-pragmas")
EMU_SANITIZE_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                      "-fno-sanitize-recover=all")
BACKENDS = ("cpu", "cpu-portable", "gpu-emu")
# No flush-to-zero (said explicitly), no contraction, correctly rounded division and sqrt.
NVRTC_FLAGS = ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*(?://.*)?$', re.M)  # a trailing // comment allowed
_lock = threading.Lock()
# A shared library (or cubin) starts with the ELF magic, and an ELF64 header alone is 64 bytes.
_ELF_MAGIC = b"\x7fELF"
_ELF_MIN_SIZE = 64
# The open file of every library loaded through /proc/self/fd/N stays open while the process
# lives (loaded libraries are never unloaded anyway): glibc's dlopen hands back an already
# loaded library whose path string matches, so a closed and reused N would name the earlier
# library instead of the new one (seen with glibc 2.36).
_loaded_fds: list[int] = []


class BuildError(RuntimeError):
    """A kernel could not be compiled, or a tool it needs is missing."""


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
    _check_ancestors(path, uid)
    try:
        # Each missing folder is made 0700 (os.makedirs would give the ones above the last the
        # umask's mode, which may be group-writable).
        for folder in (*reversed(path.parents), path):
            if not os.path.lexists(folder):
                with contextlib.suppress(FileExistsError):  # another rank made it first
                    os.mkdir(folder, 0o700)
        st = path.stat()
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


def _check_ancestors(path: Path, uid: int) -> None:
    """Refuse ``path`` if another user could rename or replace it or a folder on the way to it:
    every existing folder above it must be owned by ``uid`` or root and writable by nobody else,
    unless it is sticky (then others cannot rename what they do not own)."""
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
        sticky = st.st_mode & stat.S_ISVTX
        if st.st_uid not in (uid, 0) or (st.st_mode & 0o022 and not sticky):
            raise BuildError(f"cache folder {path} is refused: the folder {folder} above it can be "
                             f"written by another user (owner uid {st.st_uid}, mode "
                             f"{oct(st.st_mode & 0o7777)}), who could swap the cached code; set "
                             "SRKERN_CACHE_DIR to a folder below ones only you or root can write")


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


def _open_entry(path: Path) -> tuple[int | None, str | None]:
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


def _read_fd(fd: int) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as f:
        return f.read()


def _read_trusted(path: Path) -> tuple[bytes | None, str | None]:
    """(the bytes of ``path``, None) if :func:`_open_entry` trusts it, else (None, why not)."""
    fd, why = _open_entry(path)
    if fd is None:
        return None, why
    try:
        return _read_fd(fd), None
    finally:
        os.close(fd)


def _is_elf(data: bytes) -> bool:
    return len(data) >= _ELF_MIN_SIZE and data.startswith(_ELF_MAGIC)


def _rebuild_warning(path: Path, why: str) -> None:
    warnings.warn(f"srkern: cache entry {path} {why}; it is not used, and is rebuilt",
                  RuntimeWarning, stacklevel=3)


def _make_room(path: Path) -> None:
    """Remove an empty folder standing where cache entry ``path`` belongs (a rename cannot
    replace a folder); a folder with something in it is not srkern's to delete."""
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            os.rmdir(path)
        except OSError as e:
            raise BuildError(f"{path} is a folder where a cache entry of srkern belongs, and it "
                             f"cannot be removed ({e.strerror}): remove it") from e


def _write_entries(entries: list[tuple[Path, bytes]]) -> None:
    """Write cache entries atomically, in order; a file system error is a BuildError naming the
    entry (a full disk, a read-only file system)."""
    for path, data in entries:
        _make_room(path)
        try:
            atomic_write(path, data)
        except OSError as e:
            raise BuildError(f"cannot write the cache entry {path} ({e.strerror or e}); "
                             "set SRKERN_CACHE_DIR to a folder you can write") from e


def emu_sanitized() -> bool:
    """Whether gpu-emu is built with ASan and UBSan (``SRKERN_EMU_SANITIZE=1``)."""
    return os.environ.get("SRKERN_EMU_SANITIZE", "") not in ("", "0")


def compile_flags(backend: str) -> tuple[str, ...]:
    """The host compiler's flags for one of :data:`BACKENDS`."""
    if backend == "cpu":
        return CPU_FLAGS
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
    folder = cache_dir()
    stem = name if backend == "cpu" else f"{name}-{backend}"
    lib = folder / f"{stem}-{key}.so"
    digest = folder / f"{stem}-{key}.sha256"
    fd, why = _open_entry(lib)
    if fd is not None:
        data = _read_fd(fd)
        recorded, why_digest = _read_trusted(digest)
        if recorded is None:  # missing: a rank that is writing the entry has not got to it yet
            why, bad = why_digest, digest
        elif recorded.decode(errors="replace").strip() != hashlib.sha256(data).hexdigest():
            why, bad = "does not match the digest recorded beside it", lib
        elif not _is_elf(data):
            why, bad = "is not a shared library (no ELF header)", lib
        else:
            return lib, fd
        os.close(fd)
        if why:
            _rebuild_warning(bad, why)
    elif why:
        _rebuild_warning(lib, why)
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
            data = _read_fd(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
            if not _is_elf(data):
                raise BuildError(f"{cxx} exited 0 but wrote {len(data)} bytes that are not a shared "
                                 f"library (no ELF header) for kernels/{name}.cu ({backend}); "
                                 f"nothing was cached: {' '.join(cmd)}")
            # Library first, digest second: a reader that sees the new digest also sees the new library.
            _write_entries([(lib, data), (digest, hashlib.sha256(data).hexdigest().encode())])
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


def nvrtc_include_dirs() -> list[str]:
    """Folders with CUDA headers for NVRTC (from the nvidia-cuda-runtime wheel), if installed."""
    dirs = []
    try:
        import nvidia  # namespace package of NVIDIA's wheels
        for root in nvidia.__path__:
            for sub in ("cu13/include", "cu12/include", "cuda_runtime/include"):
                p = os.path.join(root, sub)
                if os.path.isdir(p):
                    dirs.append(p)
    except ImportError:
        pass
    return dirs


def _nvrtc():
    """``cuda.bindings.nvrtc``, or a BuildError that says what to install."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise BuildError("srkern's GPU compile needs cuda.bindings.nvrtc: pip install 'srkern[cuda13]' "
                         "(or [cuda12]), which brings NVRTC and the CUDA headers") from e
    return nvrtc


def nvrtc_version() -> str:
    """NVRTC's version as this process loads it (``"13.0"``), plus its wheel's version when known."""
    nvrtc = _nvrtc()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # the NVRTC shared library itself cannot be loaded
        raise BuildError(f"NVRTC cannot be loaded ({e}): pip install 'nvidia-cuda-nvrtc==13.0.*'") from e
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise BuildError(f"nvrtcVersion failed: {err}")
    text = f"{major}.{minor}"
    for dist in ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12"):
        try:
            return f"{text} ({dist} {metadata.version(dist)})"
        except metadata.PackageNotFoundError:
            continue
    return text


def nvrtc_supported_archs() -> list[str]:
    """The real architectures this NVRTC compiles for (``["sm_75", ..., "sm_90", ...]``)."""
    nvrtc = _nvrtc()
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise BuildError(f"nvrtcGetSupportedArchs failed: {err}")
    return [f"sm_{a}" for a in archs]


def nvrtc_flags(arch: str) -> tuple[str, ...]:
    """Every NVRTC option of srkern's GPU compile for ``arch`` (``sm_90``): :data:`NVRTC_FLAGS`,
    the architecture, ``--ptxas-options=-v`` (it only adds ptxas' resource lines to the log, which
    ``python -m srkern regs`` reads) and the CUDA header folders. Nothing else: no ``-ftz``."""
    if not re.fullmatch(r"sm_\d+[a-z]?", arch):
        raise BuildError(f"GPU architecture must look like sm_90, got {arch!r}")
    return (*NVRTC_FLAGS, f"--gpu-architecture={arch}", "--ptxas-options=-v",
            *(f"-I{d}" for d in nvrtc_include_dirs()))


@dataclass(frozen=True)
class NvrtcProgram:
    """The result of one NVRTC compile: the PTX and the cubin come from the same compile."""
    ok: bool
    ptx: bytes  # without the trailing NUL; b"" when the compile failed
    cubin: bytes  # b"" when the compile failed
    log: str
    flags: tuple[str, ...]


def _nvrtc_run(source: str, filename: str, flags: tuple[str, ...]) -> NvrtcProgram:
    """Compile ``source`` with exactly ``flags``; PTX and cubin of that one compile."""
    nvrtc = _nvrtc()

    def check(res):
        err = res[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise BuildError(f"NVRTC call failed for {filename}: {err}")
        return res[1] if len(res) == 2 else None

    try:
        prog = check(nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []))
    except BuildError:
        raise
    except Exception as e:  # cuda.bindings could not load the NVRTC library
        raise BuildError(f"NVRTC cannot be loaded ({e}): pip install 'nvidia-cuda-nvrtc==13.0.*'") from e
    try:
        res = nvrtc.nvrtcCompileProgram(prog, len(flags), [f.encode() for f in flags])
        ok = res[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, buf))
        log = buf.decode(errors="replace").rstrip("\0 \n")
        ptx = cubin = b""
        if ok:
            size = check(nvrtc.nvrtcGetPTXSize(prog))
            ptx = b" " * size
            check(nvrtc.nvrtcGetPTX(prog, ptx))
            ptx = ptx.rstrip(b"\0")
            size = check(nvrtc.nvrtcGetCUBINSize(prog))
            cubin = b" " * size
            check(nvrtc.nvrtcGetCUBIN(prog, cubin))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return NvrtcProgram(ok, ptx, cubin, log, flags)


def nvrtc_program(name: str, arch: str, source: str | None = None) -> NvrtcProgram:
    """Compile ``kernels/<name>.cu`` (headers expanded) for ``arch`` with :func:`nvrtc_flags`.

    The one NVRTC compile of srkern: the CUDA backend loads its cubin (through :func:`gpu_binary`),
    ``python -m srkern ptx`` prints its PTX (the same), and ``python -m srkern regs`` and the
    compile test read its log. Needs no GPU. ``source`` is the text of :func:`expand_source`
    when the caller has already read it (the cache hashes the very text that is compiled)."""
    text = expand_source(name) if source is None else source
    return _nvrtc_run(text, f"{name}.cu", nvrtc_flags(arch))


def nvrtc_compile(name: str, arch: str) -> tuple[bool, str]:
    """(ok, log) of :func:`nvrtc_program` for ``kernels/<name>.cu``: the compile check of the
    test suite and ``python -m srkern regs`` (compiled afresh, so the log is NVRTC's own)."""
    prog = nvrtc_program(name, arch)
    return prog.ok, prog.log


@dataclass(frozen=True)
class GpuBinary:
    """What the CUDA backend loads for one kernel file and architecture (hash-checked bytes)."""
    name: str
    arch: str
    cubin: bytes
    ptx: bytes
    key: str


def gpu_binary(name: str, arch: str) -> GpuBinary:
    """The cubin and PTX of :func:`nvrtc_program` for ``kernels/<name>.cu`` and ``arch``, from the
    disk cache when a trusted entry matches, else compiled now and cached.

    Cache rules as for the CPU build: the private :func:`cache_dir`; the key is a SHA-256 of the
    expanded source, NVRTC's version, the flags and the architecture; the cubin, the PTX and then a
    digest of both are written atomically; an entry that is not trusted (a link, a folder, a FIFO,
    someone else's), whose bytes do not match its digest or whose cubin has no ELF header is
    rebuilt, with a warning. The bytes returned are the very bytes that were checked (each file
    read once, from the descriptor its checks were made on)."""
    if not re.fullmatch(r"\w+", name):  # the name becomes part of a cache file name
        raise BuildError(f"kernel name must be a file stem of kernels/*.cu, got {name!r}")
    flags = nvrtc_flags(arch)
    source = expand_source(name)
    key_text = "\0".join([source, nvrtc_version(), " ".join(flags), arch])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    folder = cache_dir()
    stem = f"{name}-{arch}-{key}"
    cubin_path, ptx_path, digest_path = (folder / f"{stem}.cubin", folder / f"{stem}.ptx",
                                         folder / f"{stem}.sha256")
    digest, why = _read_trusted(digest_path)
    bad = digest_path
    if digest is not None:
        (cubin, why_cubin), (ptx, why_ptx) = _read_trusted(cubin_path), _read_trusted(ptx_path)
        if cubin is None or ptx is None:
            why, bad = (why_cubin, cubin_path) if cubin is None else (why_ptx, ptx_path)
            why = why or "is missing"  # the digest is written last, so both were there
        elif digest.decode(errors="replace").split() != [hashlib.sha256(cubin).hexdigest(),
                                                         hashlib.sha256(ptx).hexdigest()]:
            why = "does not match the cubin and PTX beside it"
        elif not _is_elf(cubin):
            why, bad = "is not a cubin (no ELF header)", cubin_path
        else:
            return GpuBinary(name, arch, cubin, ptx, key)
    if why:
        _rebuild_warning(bad, why)
    prog = nvrtc_program(name, arch, source)
    if not prog.ok:
        hint = ""
        try:
            supported = nvrtc_supported_archs()
            if arch not in supported:
                hint = (f"\nNVRTC {nvrtc_version()} does not compile for {arch} (it knows "
                        f"{', '.join(supported)}): install an NVRTC that does")
        except BuildError:
            pass
        raise BuildError(f"compiling kernels/{name}.cu for {arch} through NVRTC failed "
                         f"(flags: {' '.join(flags)}):\n{prog.log}{hint}")
    # Binaries first, digest last: a reader that sees the new digest also sees the new files.
    _write_entries([(cubin_path, prog.cubin), (ptx_path, prog.ptx),
                    (digest_path, f"{hashlib.sha256(prog.cubin).hexdigest()}\n"
                                  f"{hashlib.sha256(prog.ptx).hexdigest()}\n".encode())])
    return GpuBinary(name, arch, prog.cubin, prog.ptx, key)


def gpu_arch(device_id: int) -> str:
    """``sm_XY`` of a CUDA device (its compute capability)."""
    import cupy
    return f"sm_{cupy.cuda.Device(device_id).compute_capability}"


class GpuModule:
    """A kernel file loaded on one device (a CuPy ``Module``); its functions are fetched with that
    device current, as the module belongs to the device's context."""

    def __init__(self, module, device_id: int, binary: GpuBinary) -> None:
        self.module = module
        self.device_id = device_id
        self.binary = binary

    def get_function(self, kernel: str):
        import cupy
        with cupy.cuda.Device(self.device_id):
            return self.module.get_function(kernel)


@functools.lru_cache(maxsize=None)
def gpu_module(name: str, device_id: int) -> GpuModule:
    """``kernels/<name>.cu`` loaded on device ``device_id``: the cubin of :func:`gpu_binary` for the
    device's architecture, loaded by CuPy (``cuModuleLoadData``) from the bytes that were checked.

    srkern compiles with NVRTC itself instead of through ``cupy.RawModule``, which appends
    ``-ftz=true`` to every compile: the program that runs is the one ``regs``, ``ptx`` and the
    compile test check."""
    try:
        import cupy
    except ImportError as e:
        raise BuildError("srkern's GPU backend needs CuPy: pip install 'srkern[cuda13]' "
                         "(or [cuda12]), which also brings NVRTC and the CUDA headers") from e
    with cupy.cuda.Device(device_id):
        binary = gpu_binary(name, gpu_arch(device_id))
        module = cupy.cuda.function.Module()
        try:
            module.load(binary.cubin)
        except Exception as e:  # e.g. a driver older than the cubin needs
            raise BuildError(f"loading the cubin of kernels/{name}.cu ({binary.arch}) on device "
                             f"{device_id} failed: {e}") from e
    return GpuModule(module, device_id, binary)


def kernel_names() -> list[str]:
    """Stems of every kernel source in ``kernels/``."""
    return sorted(p.stem for p in KERNEL_DIR.glob("*.cu"))
