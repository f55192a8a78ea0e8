"""Shared benchmark plumbing: timing, the copy-bandwidth roofline, machine info, and the record
that every benchmark leaves in pytest-benchmark's ``extra_info``.

Every benchmark of srkern states, in the same run and on the same machine:
  * bytes moved (read + written) and GB/s;
  * the copy bandwidth of the same number of bytes (all cores: torch ``copy_`` on CPU, a device
    copy on CUDA) and the kernel's fraction of it;
  * the time of the baseline a user would pick instead, and the speed-up over it;
  * size, dtype, device, and (once per JSON file, in ``machine_info``) the CPU/GPU, library
    versions and git commit.

Times are minima over repeated runs after a warm-up: on a shared machine the minimum is the least
disturbed run. Benchmarks measure; they never assert.

Used by ``benchmarks/conftest.py`` (fixtures and options) and importable from a plain script
(``python benchmarks/bench_x.py``): this file puts the source tree first on ``sys.path``.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 1e9


# ---- timing ---------------------------------------------------------------------------------------

def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for all queued work on ``device`` ("cpu" or "cuda[:i]")."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.synchronize
    return lambda: None


def timings(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Wall times (seconds) of ``repeat`` calls of ``fn`` after ``warmup`` calls; GPU work is
    synchronized before and after each call."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def min_time(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Minimum wall time of ``fn`` (seconds) over ``repeat`` calls after ``warmup`` calls."""
    return min(timings(fn, repeat, warmup, device))


def rounds_for(seconds_per_call: float, budget: float = 1.0, lo: int = 3, hi: int = 200) -> int:
    """How many timed rounds fit in ``budget`` seconds (at least ``lo``, at most ``hi``)."""
    if seconds_per_call <= 0:
        return hi
    return int(max(lo, min(hi, budget / seconds_per_call)))


# ---- pytest-benchmark helpers ---------------------------------------------------------------------

class Baselines:
    """Times of baseline functions, measured once per (name, device, size) in this run."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str, int], float] = {}

    def time(self, name: str, device: str, size: int, make: Callable[[], Callable[[], Any]],
             budget: float = 1.0) -> float:
        """Minimum time of ``make()()``; ``make`` builds the closure (buffers) only when needed."""
        key = (name, device, size)
        if key not in self.seconds:
            fn = make()
            first = min_time(fn, repeat=1, warmup=1, device=device)
            self.seconds[key] = min(first, min_time(
                fn, repeat=rounds_for(first, budget, lo=3, hi=50), warmup=0, device=device))
        return self.seconds[key]

    def note(self, name: str, device: str, size: int, seconds: float | None) -> None:
        """Fold a time measured elsewhere (a baseline's own benchmark) into the cache."""
        if seconds:
            key = (name, device, size)
            self.seconds[key] = min(seconds, self.seconds.get(key, seconds))


def run_benchmark(benchmark: Any, fn: Callable[[], Any], device: str, budget: float = 1.0) -> None:
    """Time ``fn`` with pytest-benchmark: rounds fitted to ``budget`` seconds, and enough calls
    per round (iterations) that a round lasts at least 1 ms, so small sizes are not timer noise."""
    sync = synchronizer(device)

    def target() -> None:
        fn()
        sync()

    t = min_time(target, repeat=1, warmup=1, device=device)
    iterations = max(1, int(1e-3 / max(t, 1e-7)))
    rounds = rounds_for(t * iterations, budget, lo=3, hi=100)
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=1)


# ---- the roofline: copy bandwidth of the same bytes -------------------------------------------------

_copy_cache: dict[tuple[int, str], float] = {}


def copy_time(nbytes: int, device: str = "cpu", repeat: int = 3) -> float:
    """Seconds to move ``nbytes`` bytes in total (read ``nbytes/2`` + write ``nbytes/2``) with an
    all-core copy: ``torch.Tensor.copy_`` of a uint8 buffer on CPU (torch uses every core), a
    device-to-device copy on CUDA. Every call adds ``repeat`` timed copies to the run's samples
    for this (bytes, device) and returns the minimum so far, so the roofline sharpens as a
    benchmark run goes on instead of freezing one noisy first measurement."""
    import torch
    key = (int(nbytes), device)
    half = max(1, int(nbytes) // 2)
    src = torch.ones(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = min_time(lambda: dst.copy_(src), repeat=repeat, warmup=1, device=device)
    del src, dst
    _copy_cache[key] = min(t, _copy_cache.get(key, t))
    return _copy_cache[key]


def copy_bandwidth(nbytes: int, device: str = "cpu", repeat: int = 3) -> float:
    """All-core copy bandwidth in bytes/s (read + write counted) for ``nbytes`` moved in total."""
    return max(2, int(nbytes) // 2 * 2) / copy_time(nbytes, device, repeat)


# ---- machine ---------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The SIMD extensions that decide srkern's CPU path, as /proc/cpuinfo spells them.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_fp16")


def _cpu_simd_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in SIMD_FLAGS if x in have]
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - optional library, any import failure means "absent"
        return None
    return str(getattr(mod, "__version__", "unknown"))


def git_commit() -> str:
    """Short commit of the source tree, with ``+dirty`` when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def simd_path(device: str = "cpu") -> str:
    """The kernel code path that runs for ``device``: ``srkern._backend.simd_path()`` on CPU tensors
    ("avx512", "avx2", "portable" or "gpu-emu", following ``$SRKERN_BACKEND``), "cuda" on a GPU, and
    "unknown" where this srkern has no ``simd_path`` yet (or it fails: the reason is appended), so
    a record never claims a path it cannot name."""
    if device.startswith("cuda"):
        return "cuda"
    try:
        from srkern import _backend
    except Exception as e:  # noqa: BLE001 - no srkern: the record says so instead of failing
        return f"unknown ({type(e).__name__})"
    fn = getattr(_backend, "simd_path", None)
    if fn is None:
        return "unknown"
    try:
        return str(fn(None))
    except Exception as e:  # noqa: BLE001 - a failing probe is recorded, the benchmark goes on
        return f"unknown ({type(e).__name__}: {str(e)[:80]})"


@functools.lru_cache(maxsize=None)
def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model and cores, device name, compiler, library versions and git commit."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_simd_flags": _cpu_simd_flags(),
        "cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "srkern_backend": os.environ.get("SRKERN_BACKEND") or "cpu",
        "simd_path": simd_path(device),
    }
    for lib in ("srkern", "numpy", "ml_dtypes", "torch", "torchao", "cupy", "jax"):
        info[lib] = _version(lib)
    # The AdamW peers by their installed metadata: importing deepspeed costs seconds and logs.
    for lib, dist in (("deepspeed", "deepspeed"), ("optimi", "torch-optimi")):
        try:
            info[lib] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[lib] = None
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            idx = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
            info["device_name"] = torch.cuda.get_device_name(idx)
            info["cuda"] = torch.version.cuda
        else:
            info["device_name"] = info["cpu"]
    except ImportError:
        info["device_name"] = info["cpu"] if device == "cpu" else device
    try:
        from srkern import _build
        info["cxx"] = _build.cxx_compiler()[1]
        info["cxx_flags"] = " ".join(_build.CPU_FLAGS)
    except Exception:  # noqa: BLE001 - no compiler: the record says so instead of failing
        info["cxx"] = None
    return info


# ---- the record -------------------------------------------------------------------------------------

def stats_min(benchmark: Any) -> float | None:
    """Minimum time (seconds) that pytest-benchmark measured, or None (e.g. --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None) if stats is not None else None
    value = getattr(inner, "min", None) if inner is not None else None
    return float(value) if value else None


def record(benchmark: Any, *, kernel: str, size: int, dtype: str, device: str, bytes_moved: int,
           seconds: float | None = None, baselines: dict[str, float] | None = None,
           copy_repeat: int = 3, **extra: Any) -> dict[str, Any]:
    """Fill ``benchmark.extra_info`` with the standard fields and return them.

    Args:
        benchmark: the pytest-benchmark fixture, after it ran (its minimum is the kernel time
            unless ``seconds`` is given).
        kernel: what was measured ("srkern.cast bf16 stochastic", "torch .to(bfloat16)", ...).
        size: elements (or parameters) per call; dtype: e.g. "float32->bfloat16".
        bytes_moved: bytes read plus bytes written by one call (the minimum any implementation
            must move).
        baselines: {name: seconds} of the alternatives, measured in this run; the first is the
            primary baseline (``baseline`` / ``speedup_vs_baseline``), all get ``speedup_vs[name]``
            (baseline time / this time: > 1 means this is faster).
        extra: more fields to store as they are.
    """
    t = seconds if seconds is not None else stats_min(benchmark)
    info: dict[str, Any] = {"kernel": kernel, "size": int(size), "dtype": dtype, "device": device,
                            "bytes_moved": int(bytes_moved)}
    ct = copy_time(bytes_moved, device, repeat=copy_repeat)
    if extra.get("role") == "roofline" and t:  # the copy entry itself is one more copy sample
        ct = _copy_cache[(int(bytes_moved), device)] = min(ct, t)
    info["copy_seconds"] = ct
    info["copy_GBps"] = bytes_moved / ct / GB
    if t:
        info["seconds"] = t
        info["GBps"] = bytes_moved / t / GB
        info["fraction_of_copy"] = ct / t
    if baselines:
        first = next(iter(baselines))
        info["baseline"] = first
        info["baseline_seconds"] = baselines[first]
        info["baselines_seconds"] = dict(baselines)
        if t:
            info["speedup_vs"] = {k: v / t for k, v in baselines.items()}
            info["speedup_vs_baseline"] = baselines[first] / t
    info["device_name"] = machine_info(device).get("device_name")
    info["commit"] = machine_info(device).get("commit")
    # read per record, not from the cached machine info: SRKERN_BACKEND is read at every launch
    info["simd_path"] = simd_path(device)
    info.update(extra)
    benchmark.extra_info.update(info)
    return info


def parse_sizes(text: str) -> list[int]:
    """"1024,2**20,64M,1G" -> [1024, 1048576, 67108864, 1073741824] (K/M/G are powers of 2)."""
    out = []
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if part[-1].upper() in mult:
            out.append(int(float(part[:-1]) * mult[part[-1].upper()]))
        elif "**" in part:
            base, exp = part.split("**")
            out.append(int(base) ** int(exp))
        else:
            out.append(int(part))
    return out


def sweep_sizes(lo: int = 10, hi: int = 28, step: int = 2) -> list[int]:
    """Powers of two 2**lo, 2**(lo+step), ..., 2**hi (hi included)."""
    exps = list(range(lo, hi + 1, step))
    if exps[-1] != hi:
        exps.append(hi)
    return [1 << e for e in exps]

