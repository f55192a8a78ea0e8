"""Shared test helpers: the backend fixture, the format parameters and input generators.

The NumPy oracle lives in ``srkern.reference``, the format table in ``srkern.formats`` and the one
bit comparator in ``srkern.testing`` (all three shared with the benchmarks and ``gpu_check``); this
file only holds what several test files need to *drive* them.

One test body, every backend (CuPy's ``numpy_cupy_array_equal`` idea): a test that takes the
``backend`` fixture runs once per backend, ``cpu``, ``cpu-portable``, ``gpu-emu`` and, where a
CUDA device is present, ``cuda``. It moves its NumPy inputs with ``backend.put`` (a guarded copy:
CPU memory for the CPU backends, a torch CUDA tensor for ``cuda``) and reads results back with
``backend.get``; every buffer ``put`` made is checked at teardown for writes past either end.
``SRKERN_TEST_BACKENDS=gpu-emu,cuda`` restricts the list (the sanitizer job and the GPU check use it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from srkern.formats import FORMATS, NP_DTYPES, Format, dtype_name
from srkern.testing import format_grid

# The markers (slow, mpi, backend, cuda) are declared once, in pyproject.toml.


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if {"backend", "mpi_backend"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.backend)


# ---- the adversarial cases (issue 11): a tally per area at the end of the run ------------------------

_ATTACK: dict[str, dict[str, int]] = {}  # area -> outcome -> count


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    area = next((m.args[0] for m in getattr(report, "_attack_marks", ())), None)
    if area is None:
        return
    # One outcome per test: its call, or its setup when that failed or skipped.
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        tally = _ATTACK.setdefault(area, {})
        tally[report.outcome] = tally.get(report.outcome, 0) + 1


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    report._attack_marks = list(item.iter_markers("attack"))
    return report


def pytest_terminal_summary(terminalreporter) -> None:
    if not _ATTACK:
        return
    terminalreporter.section("adversarial cases (pytest -m attack): held = passed")
    for area in sorted(_ATTACK):
        t = _ATTACK[area]
        tried = sum(t.values())
        terminalreporter.write_line(f"{area:16} {tried:4} tried, {t.get('passed', 0):4} held"
                                    + "".join(f", {v} {k}" for k, v in sorted(t.items()) if k != "passed"))


# ---- backends -------------------------------------------------------------------------------------

CPU_BACKENDS = ("cpu", "cpu-portable", "gpu-emu")
GUARD = 64  # guard bytes on each side of every buffer a test hands to a kernel (keeps 64-byte alignment)


def cuda_available() -> bool:
    """Whether a CUDA device and torch's CUDA build are here (then the ``cuda`` backend runs)."""
    try:
        import torch
        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def cupy_or_skip():
    """CuPy, or skip the test: not installed, or no usable CUDA device."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or no device
        pytest.skip(f"CuPy is installed but no CUDA device is usable here: {e}")
    if count == 0:
        pytest.skip("CuPy is installed but no CUDA device is present")
    return cupy


def backend_names() -> list[str]:
    names = list(CPU_BACKENDS) + (["cuda"] if cuda_available() else [])
    want = os.environ.get("SRKERN_TEST_BACKENDS")
    if want:
        chosen = [w.strip() for w in want.split(",") if w.strip()]
        unknown = [w for w in chosen if w not in CPU_BACKENDS + ("cuda",)]
        if unknown:
            raise pytest.UsageError(f"SRKERN_TEST_BACKENDS names unknown backends {unknown}")
        names = [n for n in chosen if n != "cuda" or cuda_available()]
    return names


class Backend:
    """What a test body needs to run on one backend: inputs in, results out, guards checked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.device = "cuda" if name == "cuda" else "cpu"
        self._guarded: list[tuple[Any, np.ndarray, int, int, str]] = []
        self._rng = np.random.default_rng(0x5EED)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def put(self, a: Any, lead: int = 0) -> Any:
        """A copy of NumPy array ``a`` on this backend, with guard bytes around it.

        ``lead`` shifts the data by that many elements from the buffer's 64-byte-aligned start
        (a misaligned tensor). On ``cuda`` the result is a torch CUDA tensor (torch has every
        dtype srkern uses; CuPy has no FP8).
        """
        a = np.ascontiguousarray(a)
        nbytes, isz = a.nbytes, a.itemsize
        pre = GUARD + lead * isz
        guard = self._rng.integers(0, 256, pre + nbytes + GUARD, dtype=np.uint8)
        if self.device == "cpu":
            raw = np.empty(pre + nbytes + GUARD + 64, dtype=np.uint8)
            start = (-raw.ctypes.data) % 64
            buf = raw[start:start + guard.size]
            buf[:] = guard
            buf[pre:pre + nbytes] = a.reshape(-1).view(np.uint8)
            out = buf[pre:pre + nbytes].view(a.dtype).reshape(a.shape)
            self._guarded.append((buf, guard, pre, nbytes, f"buffer of shape {a.shape} dtype {a.dtype}"))
            return out
        import torch
        host = guard.copy()
        host[pre:pre + nbytes] = a.reshape(-1).view(np.uint8)
        buf = torch.from_numpy(host).cuda()
        data = buf[pre:pre + nbytes]
        tdt = getattr(torch, a.dtype.name) if a.dtype.name != "float32" else torch.float32
        out = data.view(tdt).reshape(a.shape)
        self._guarded.append((buf, guard, pre, nbytes, f"buffer of shape {a.shape} dtype {a.dtype}"))
        return out

    def get(self, t: Any) -> np.ndarray:
        """A NumPy copy of a result (torch tensors through their bits, BF16/FP8 as ml_dtypes)."""
        if type(t).__module__.split(".")[0] == "torch":
            import torch
            name = dtype_name(t.dtype)
            c = t.detach().cpu().contiguous()
            width = c.element_size()
            raw = c.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]).numpy()
            npdt = NP_DTYPES.get(name, np.dtype(name) if name != "bool" else np.bool_)
            return raw.view(npdt).copy()
        if type(t).__module__.split(".")[0] == "cupy":
            import cupy
            return cupy.asnumpy(t)
        return np.array(t, copy=True)

    def check_guards(self) -> None:
        for buf, guard, pre, nbytes, what in self._guarded:
            host = self.get(buf).view(np.uint8)
            changed = host != guard
            changed[pre:pre + nbytes] = False  # the data itself may change
            bad = np.nonzero(changed)[0]
            if bad.size:
                side = "before" if bad[0] < pre else "after"
                where = pre - int(bad[0]) if side == "before" else int(bad[0]) - (pre + nbytes) + 1
                pytest.fail(f"[{self.name}] a kernel wrote outside its {what}: {bad.size} guard bytes "
                            f"changed, the first {where} byte(s) {side} the data", pytrace=False)
        self._guarded.clear()


@pytest.fixture(params=backend_names(), ids=lambda n: f"be={n}")
def backend(request, monkeypatch) -> Backend:
    """One backend per test instance; CPU tensors run on it through ``SRKERN_BACKEND``."""
    name = request.param
    monkeypatch.setenv("SRKERN_BACKEND", name if name in CPU_BACKENDS else "cpu")
    be = Backend(name)
    yield be
    be.check_guards()


def fmt_params(formats: list[Format] | None = None) -> list:
    """``pytest.param`` per format (default: all of ``srkern.formats.FORMATS``) with a readable
    id (``dtype=bf16``, from ``Format.short``)."""
    return [pytest.param(f, id=f"dtype={f.short}") for f in (FORMATS.values() if formats is None else formats)]


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: torch's own CPU kernels (forward, backward, the reference
    optimizers) are deterministic per thread count, so bit-exact comparisons fix it."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_and_load(obj: Any, *, weights_only: bool) -> Any:
    """``obj`` through ``torch.save`` into memory and ``torch.load`` back (a checkpoint round trip)."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def child_env() -> dict[str, str]:
    """Environment for a child Python that must import the same srkern as this process."""
    import srkern
    root = str(Path(srkern.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_mpi(k: int, script: Path | str, *args: str, timeout: float = 60, backend: str = "cpu",
            env: dict[str, str] | None = None):
    """``mpirun -n k python script args...`` with a hard limit: ``MPIEXEC_TIMEOUT`` makes mpirun
    end a hung job after ``timeout`` seconds, and the subprocess itself is killed 15 s later, so a
    hang fails the one test that launched it. One OpenMP thread per rank (the ranks share the
    cores). Returns the ``CompletedProcess`` (stdout and stderr as text); skips without mpirun."""
    import subprocess
    import sys

    from srkern.testing import find_mpirun
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found beside this Python nor on PATH (pip install mpich)")
    full = dict(child_env(), MPIEXEC_TIMEOUT=str(int(timeout)), OMP_NUM_THREADS="1", SRKERN_BACKEND=backend)
    full.update(env or {})
    cmd = [mpirun, "-n", str(k), sys.executable, str(script), *args]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout + 15)


def f32(bits) -> np.ndarray:
    """float32 array from uint32 bit patterns."""
    return np.asarray(bits, dtype=np.uint64).astype(np.uint32).view(np.float32)


def mixed_input(n: int, fmt: Format, seed: int = 0) -> np.ndarray:
    """``n`` float32 values that exercise every branch of a cast to ``fmt``.

    A quarter each: random bit patterns (NaN payloads, infinities, everything), values spread
    over the format's exponent range, format values nudged by a few float32 ulps, and exact
    midpoints between neighbouring format values (round-to-nearest ties) nudged by 0 or 1 ulp;
    then, when ``n >= 32``, the specials (+-0, +-Inf, NaNs, largest finite and just above,
    smallest subnormal, overflow) overwrite random slots.
    """
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, n)
    out = np.empty(n, dtype=np.float32)
    values = format_grid(fmt)
    fi = ml_dtypes.finfo(fmt.np_type)
    sign = np.where(rng.integers(0, 2, n) == 1, -1.0, 1.0)

    raw = f32(rng.integers(0, 2 ** 32, n, dtype=np.uint64))
    e = rng.integers(int(fi.minexp) - int(fi.nmant) - 3, int(fi.maxexp) + 2, n)
    with np.errstate(over="ignore"):  # the top of BF16's range overflows float32 to Inf: fine
        spread = (sign * rng.uniform(1.0, 2.0, n) * np.exp2(e.astype(np.float64))).astype(np.float32)
    on_grid = (sign * values[rng.integers(0, values.size, n)]).astype(np.float32)
    nudged = (on_grid.view(np.uint32).astype(np.int64) + rng.integers(-3, 4, n)).astype(np.uint32).view(np.float32)
    k = rng.integers(0, values.size - 1, n)
    mid = (sign * (values[k] + values[k + 1]) / 2).astype(np.float32)  # exact: one more bit than the format
    mid = (mid.view(np.uint32).astype(np.int64) + rng.integers(-1, 2, n)).astype(np.uint32).view(np.float32)
    for kd, src in enumerate((raw, spread, nudged, mid)):
        out[kind == kd] = src[kind == kd]

    specials = f32([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
                    0x7F800001, 0xFFA5A5A5])
    top = np.float32(fmt.max)
    specials = np.concatenate([specials, np.array(
        [top, -top, np.nextafter(top, np.float32(np.inf)), fmt.smallest_subnormal,
         -fmt.smallest_subnormal / 2, min(2 * fmt.max, float(np.finfo(np.float32).max))],
        dtype=np.float32)])
    if n >= 32:  # short inputs keep only draw-dependent values, so lane mix-ups show
        out[rng.choice(n, specials.size, replace=False)] = specials
    return out
