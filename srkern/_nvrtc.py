"""The GPU build: ``kernels/*.cu`` compiled by NVRTC (``cuda.bindings.nvrtc``) with srkern's flags
only, PTX and cubin from one compile (:func:`nvrtc_program`), the cubin cached by the rules of
``srkern._cache`` and loaded into CuPy from the checked bytes (:func:`gpu_module`).

Not ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` to every NVRTC compile, so the
program it loads would flush subnormals and would not be the one ``regs``/``ptx`` check.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from importlib import metadata

from . import _build, _cache
from ._cache import BuildError

# No flush-to-zero (said explicitly), no contraction, correctly rounded division and sqrt.
NVRTC_FLAGS = ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")

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
    text = _build.expand_source(name) if source is None else source
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
    source = _build.expand_source(name)
    key_text = "\0".join([source, nvrtc_version(), " ".join(flags), arch])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    folder = _cache.cache_dir()
    stem = f"{name}-{arch}-{key}"
    cubin_path, ptx_path, digest_path = (folder / f"{stem}.cubin", folder / f"{stem}.ptx",
                                         folder / f"{stem}.sha256")
    digest, why = _cache.read_trusted(digest_path)
    bad = digest_path
    if digest is not None:
        (cubin, why_cubin), (ptx, why_ptx) = _cache.read_trusted(cubin_path), _cache.read_trusted(ptx_path)
        if cubin is None or ptx is None:
            why, bad = (why_cubin, cubin_path) if cubin is None else (why_ptx, ptx_path)
            why = why or "is missing"  # the digest is written last, so both were there
        elif digest.decode(errors="replace").split() != [hashlib.sha256(cubin).hexdigest(),
                                                         hashlib.sha256(ptx).hexdigest()]:
            why = "does not match the cubin and PTX beside it"
        elif not _cache.is_elf(cubin):
            why, bad = "is not a cubin (no ELF header)", cubin_path
        else:
            return GpuBinary(name, arch, cubin, ptx, key)
    if why:
        _cache.rebuild_warning(bad, why)
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
    _cache.write_entries([(cubin_path, prog.cubin), (ptx_path, prog.ptx),
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


