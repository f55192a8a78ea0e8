"""Command line: ``python -m srkern info``, ``python -m srkern regs`` and ``python -m srkern ptx``.

``info``  versions, which backends work here (and why not), the compiler, CUDA devices, the cache.
``regs``  registers, stack and spills per kernel function for every ``kernels/*.cu``, from NVRTC's
          ptxas log (no GPU needed): ``python -m srkern regs --arch sm_80``.
``ptx``   the PTX of exactly what the CUDA backend loads for one kernel file and architecture
          (the same NVRTC compile as its cubin, no GPU needed): ``python -m srkern ptx cast --arch sm_90``.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import re
import sys
import tempfile
from importlib import metadata

from . import _backend, _build, _cache, _contract, _nvrtc
from . import __version__

# Distribution names to try per module (CuPy ships as cupy-cudaXXx wheels).
_DISTRIBUTIONS = {
    "numpy": ("numpy",), "ml_dtypes": ("ml_dtypes", "ml-dtypes"), "torch": ("torch",),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"), "jax": ("jax",), "mpi4py": ("mpi4py",),
    "cuda-bindings": ("cuda-bindings",), "cuda-core": ("cuda-core",),
    "nvidia-cuda-nvrtc": ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12"),
}

# Random123 known-answer vector (counter 0, key 0) used as the CPU backend's smoke test.
_KAT_ZERO = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


def package_version(module: str) -> str:
    """Installed version of ``module``'s distribution, or 'not installed'."""
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return f"{metadata.version(dist)}" + (f" ({dist})" if dist != module else "")
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def cpu_backend_status() -> tuple[bool, str]:
    """(works, description): compile the philox kernel in a throwaway cache and check Random123's KAT."""
    try:
        cxx, version = _build.cxx_compiler()
    except _build.BuildError as e:
        return False, str(e)
    old = os.environ.get("SRKERN_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="srkern-info-") as tmp:
        os.environ["SRKERN_CACHE_DIR"] = os.path.join(tmp, "cache")
        try:
            lib = _build.load_cpu_library("philox")
            fn = lib.philox_blocks
            fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64,
                           ctypes.c_int64, ctypes.c_void_p]
            out = (ctypes.c_uint32 * 4)()
            fn(0, 0, 0, 0, 1, ctypes.addressof(out))
            if tuple(out) != _KAT_ZERO:
                return False, f"{cxx} ({version}): test kernel compiled but Philox gave wrong bits"
        except Exception as e:  # BuildError, OSError from dlopen
            return False, f"{cxx} ({version}): test compile failed: {e}"
        finally:
            if old is None:
                os.environ.pop("SRKERN_CACHE_DIR", None)
            else:
                os.environ["SRKERN_CACHE_DIR"] = old
    return True, f"works: {cxx} ({version}); test compile of kernels/philox.cu passes Random123's KAT"


def nvrtc_status() -> tuple[bool, str]:
    """(available, description) of NVRTC through cuda.bindings (what the compile check uses)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        return False, f"cuda.bindings.nvrtc cannot be imported ({e}): pip install 'srkern[cuda13]'"
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # the NVRTC shared library itself is missing
        return False, f"NVRTC library not loadable ({e}): pip install 'nvidia-cuda-nvrtc==13.0.*'"
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return False, f"nvrtcVersion failed: {err}"
    return True, f"NVRTC {major}.{minor}"


def gpu_backend_status() -> tuple[bool, str, list[str]]:
    """(works, why, device descriptions) of the CuPy backend."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed: pip install 'srkern[cuda13]' (or [cuda12])", []
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"no usable CUDA device: {e}", []
    if count == 0:
        return False, "no CUDA device", []
    devices = []
    for i in range(count):
        p = cupy.cuda.runtime.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        devices.append(f"{i}: {name}, sm_{p['major']}{p['minor']}, {p['totalGlobalMem'] / 2 ** 30:.1f} GiB, "
                       f"{p['multiProcessorCount']} SMs")
    ok, text = nvrtc_status()
    if not ok:
        return False, text, devices
    return True, f"CuPy with {count} device(s); {text}", devices


def cmd_info(args: argparse.Namespace) -> int:
    print(f"srkern {__version__}  (bit contract v{_contract.CONTRACT_VERSION})")
    print("random streams: " + ", ".join(f"{k}={v}" for k, v in _contract.STREAMS.items()))
    print(f"python {sys.version.split()[0]} on {sys.platform}")
    print("packages:")
    for mod in _DISTRIBUTIONS:
        print(f"  {mod:18s} {package_version(mod)}")
    print(f"kernels: {_build.KERNEL_DIR} ({', '.join(_build.kernel_names())})")
    try:
        print(f"cache folder: {_cache.cache_dir()}")
    except _build.BuildError as e:
        print(f"cache folder: UNUSABLE: {e}")
    ok, text = cpu_backend_status()
    print(f"CPU backend: {'yes' if ok else 'NO'}: {text}")
    try:
        chosen = _backend.cpu_backend()
    except _build.BuildError as e:
        chosen = f"UNUSABLE: {e}"
    print(f"backend for CPU tensors: {chosen} (SRKERN_BACKEND; one of {', '.join(_backend.BACKENDS)}; "
          f"gpu-emu runs the GPU code over the grid of {_backend.emu_sms()} SMs"
          f"{', with ASan and UBSan' if _build.emu_sanitized() else ''})")
    if ok:
        try:
            simd = _backend.simd_path("cpu")
        except _build.BuildError as e:
            simd = f"UNKNOWN: {e}"
        isa = os.environ.get("SRKERN_CPU_ISA") or "native"
        print(f"CPU SIMD path: {simd} (cpu backend, SRKERN_CPU_ISA={isa}; cpu-portable: portable)")
    ok, text, devices = gpu_backend_status()
    print(f"GPU backend: {'yes' if ok else 'NO'}: {text}")
    print("CUDA devices: " + ("none" if not devices else ""))
    for d in devices:
        print(f"  {d}")
    ok, text = nvrtc_status()
    print(f"NVRTC compile check (no GPU needed): {'yes' if ok else 'NO'}: {text}")
    return 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> list[dict]:
    """Per-function resource use from a ``ptxas -v`` log: name, registers, stack, spill stores/loads."""
    rows: list[dict] = []
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            rows.append({"function": m.group(1), "registers": None, "stack": None,
                         "spill_stores": None, "spill_loads": None})
            continue
        if not rows:
            continue
        m = _FRAME.search(line)
        if m:
            rows[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            rows[-1]["registers"] = int(m.group(1))
    return rows


def cmd_regs(args: argparse.Namespace) -> int:
    ok, text = nvrtc_status()
    if not ok:
        print(f"cannot compile through NVRTC: {text}", file=sys.stderr)
        return 2
    names = args.kernels or _build.kernel_names()
    status = 0
    rows, failed = [], []
    for name in names:
        try:
            ok, log = _nvrtc.nvrtc_compile(name, args.arch)
        except _build.BuildError as e:
            ok, log = False, str(e)
        if not ok:
            failed.append((name, log))
            continue
        rows += [(name + ".cu", r) for r in sorted(parse_ptxas_log(log), key=lambda r: r["function"])]
    wf = max([len("file")] + [len(f) for f, _ in rows])
    wn = max([len("function")] + [len(r["function"]) for _, r in rows])
    header = f"{'file':{wf}s}  {'function':{wn}s}  {'regs':>5s}  {'stack':>6s}  {'spill st':>9s}  {'spill ld':>9s}"
    print(f"# {args.arch}, {text}, flags {' '.join(_shown_flags(args.arch))}")
    print(header)
    print("-" * len(header))
    for f, r in rows:
        print(f"{f:{wf}s}  {r['function']:{wn}s}  {r['registers']!s:>5s}  {r['stack']!s:>6s}  "
              f"{r['spill_stores']!s:>9s}  {r['spill_loads']!s:>9s}")
    for name, log in failed:
        print(f"{name}.cu: COMPILE FAILED\n{log}", file=sys.stderr)
        status = 1
    return status


def _shown_flags(arch: str) -> list[str]:
    """srkern's NVRTC options for ``arch`` without the (long, machine-specific) header folders."""
    return [f for f in _nvrtc.nvrtc_flags(arch) if not f.startswith("-I")]


def cmd_ptx(args: argparse.Namespace) -> int:
    ok, text = nvrtc_status()
    if not ok:
        print(f"cannot compile through NVRTC: {text}", file=sys.stderr)
        return 2
    try:
        binary = _nvrtc.gpu_binary(args.kernel, args.arch)
    except _build.BuildError as e:
        print(f"{args.kernel}.cu: {e}", file=sys.stderr)
        return 1
    # What the backend loads is the cubin of this same compile; say which, on stderr, so that
    # stdout is the PTX alone (ready for ptxas or a diff).
    print(f"# kernels/{args.kernel}.cu for {args.arch}, {text}, flags {' '.join(_shown_flags(args.arch))}; "
          f"cubin {len(binary.cubin)} bytes, sha256 {hashlib.sha256(binary.cubin).hexdigest()}",
          file=sys.stderr)
    sys.stdout.write(binary.ptx.decode())
    if not binary.ptx.endswith(b"\n"):
        sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m srkern", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, backends and why not, compiler, CUDA devices, cache folder")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("regs", help="registers and spills per kernel (NVRTC, no GPU needed)")
    p.add_argument("--arch", default="sm_90", help="GPU architecture, e.g. sm_80 or sm_90 (default sm_90)")
    p.add_argument("kernels", nargs="*", help="kernel file stems (default: every kernels/*.cu)")
    p.set_defaults(func=cmd_regs)
    p = sub.add_parser("ptx", help="PTX of exactly what the CUDA backend loads for one kernel file (no GPU needed)")
    p.add_argument("kernel", help="kernel file stem, e.g. cast (see kernels/*.cu)")
    p.add_argument("--arch", default="sm_90", help="GPU architecture, e.g. sm_80 or sm_90 (default sm_90)")
    p.set_defaults(func=cmd_ptx)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
