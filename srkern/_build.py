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

Disk-cache rules: the folder is private to the user (0700); the key is a SHA-256 of the expanded
source, the compiler's path and version (NVRTC's for GPUs), the flags and the machine (the GPU
architecture); writes are atomic (write to
a temporary file, fsync, rename), because several MPI ranks compile at once; an entry that is
not owned by the user, is writable by group or others, or whose bytes do not match the hash
recorded beside it, is rebuilt and never loaded.
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
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise BuildError(f"cache folder {path} is not private to this user "
                         f"(owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); "
                         "fix its permissions or set SRKERN_CACHE_DIR")
    return path


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


def _read_trusted(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file owned by this user and not writable by group
    or others (checked on the open file itself), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


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


def cpu_library_path(name: str, backend: str = "cpu") -> Path:
    """Compile ``kernels/<name>.cu`` for a CPU backend if needed; return the cached shared library."""
    flags = compile_flags(backend)
    cxx, version = cxx_compiler()
    source = emu_source(name, cxx) if backend == "gpu-emu" else expand_source(name)
    key_text = "\0".join([source, cxx, version, " ".join(flags), _machine_id()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    folder = cache_dir()
    stem = name if backend == "cpu" else f"{name}-{backend}"
    lib = folder / f"{stem}-{key}.so"
    digest = folder / f"{stem}-{key}.sha256"
    data, recorded = _read_trusted(lib), _read_trusted(digest)
    if data is not None and recorded is not None and \
            recorded.decode(errors="replace").strip() == hashlib.sha256(data).hexdigest():
        return lib
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / "k.so"
        cmd = [cxx, *flags, "-x", "c++", "-", "-o", str(out)]
        res = subprocess.run(cmd, input=source, capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError(f"compiling kernels/{name}.cu for {backend} failed:\n{' '.join(cmd)}\n{res.stderr}")
        data = out.read_bytes()
    # Library first, digest second: a reader that sees the new digest also sees the new library.
    atomic_write(lib, data)
    atomic_write(digest, hashlib.sha256(data).hexdigest().encode())
    return lib


def cpu_library(name: str, backend: str = "cpu") -> ctypes.CDLL:
    """The loaded library of ``kernels/<name>.cu`` for a CPU backend (compiled on first use)."""
    return _cpu_library(name, backend, compile_flags(backend))


@functools.lru_cache(maxsize=None)
def _cpu_library(name: str, backend: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    # One load per (file, backend, flags): the key check (expanding the source, for gpu-emu also
    # preprocessing it, and hashing the library) runs once, not once per kernel of the file.
    with _lock:
        return ctypes.CDLL(str(cpu_library_path(name, backend)))


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
    digest of both are written atomically; an entry that is not trusted or whose bytes do not match
    its digest is rebuilt. The bytes returned are the very bytes that were checked."""
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
    digest = _read_trusted(digest_path)
    if digest is not None:
        cubin, ptx = _read_trusted(cubin_path), _read_trusted(ptx_path)
        if cubin is not None and ptx is not None and digest.decode(errors="replace").split() == [
                hashlib.sha256(cubin).hexdigest(), hashlib.sha256(ptx).hexdigest()]:
            return GpuBinary(name, arch, cubin, ptx, key)
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
    atomic_write(cubin_path, prog.cubin)
    atomic_write(ptx_path, prog.ptx)
    atomic_write(digest_path, f"{hashlib.sha256(prog.cubin).hexdigest()}\n"
                              f"{hashlib.sha256(prog.ptx).hexdigest()}\n".encode())
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
