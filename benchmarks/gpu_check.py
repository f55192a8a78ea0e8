"""One-command GPU check of srkern, sized for one short lease on a bare, offline GPU machine.

    python benchmarks/gpu_check.py OUT_DIR             # the real check: one CUDA GPU
    python benchmarks/gpu_check.py OUT_DIR --dry-run   # no GPU: gpu-emu plays the device

Needs, and installs nothing: Python, NumPy, ml_dtypes, torch with CUDA, CuPy, cuda-core,
cuda-bindings (NVRTC) and pytest, run from the source tree. Optional: g++ (the expected side, see
below), matplotlib (plots), compute-sanitizer (on PATH, under /usr/local/cuda*, or in an NVIDIA
wheel). No network, no torchao.

Stages. Each runs in a child process under its own time budget (the parity families share one
child; one that crashes, hangs past its budget or loses the CUDA context is recorded as failed, with
the case it was running, and a fresh child takes the next family), and writes its results under
OUT_DIR as it goes, so a stage that crashes or times out loses nothing written before it;
OUT_DIR/stages.json (status, seconds and budget of every stage) is rewritten after every stage.
The parent imports neither torch nor CuPy; only the report runs in it.

  env                  device (name, SMs, memory), versions, whether g++ works, srkern's backend
                       information; compiles every kernel file (cast, adamw, norm, dist, accum, sgd,
                       lion, adafactor; with --stages naming parity families only, just theirs) for
                       the device (NVRTC cubins, or the gpu-emu build) so that compile errors show
                       here                                                     -> env.json
  parity_cast          device vs expected, bit for bit: every format x SR/RN x saturate, sizes 0,
                       1, 7, 8, 9, 1023, 4099, 2**20+3, offsets 0, odd, near 2**32/2**34/2**35,
                       2**64-n-5 and 2**64-n (ends in the last Philox block), input and output
                       slices 0..3 elements past an aligned address, guard bytes around every
                       device buffer                                            -> parity.jsonl
  parity_upcast        the exact upcasts over every bit pattern of each format, misaligned too
  parity_adamw         every precision mode x grad dtype x moment dtype, 3 steps, 7 tensors of odd
                       sizes; default offsets; offsets near 2**32, 2**35, 2**63 and a tensor
                       ending at 2**64 (``offsets=``) with misaligned buffers; NaN payloads of
                       both signs and Inf; found_inf
  parity_grad_norm     BF16/FP32 gradients: subnormal-only, Inf, NaN, grad_scale overflow, empty
  parity_dist_reduce   the reduce kernels of the reduce-scatter, launched directly through
                       srkern._backend.launch: every wire x output kernel, world 1..7, shard
                       starts near 2**32, 2**35 and 2**64, subnormals, NaN payloads, misaligned
                       (every case is one line of parity.jsonl as soon as it finishes; an
                       exception is a failed case with its message, never a crashed stage)
  parity_optim         the kernels beyond AdamW: add_ (BF16/FP16 acc x FP32/BF16 x x SR/RN, two
                       calls on 6 tensors of 1..65537 elements at offsets near 2**32, 2**35 and
                       ending at 2**64, NaN payloads and Inf, acc and x misaligned); sgd_step
                       (momentum 0.9 with Nesterov, then dampening and maximize; and momentum 0),
                       lion_step and adafactor_step (a factored 2-D tensor and two 1-D ones in one
                       call): every precision mode x BF16/FP32 grads, 3 steps, the state dtypes
                       and the variants (plain; high offsets with misaligned buffers; NaN/Inf,
                       not for Adafactor) rotating over the cases; every buffer compared
  tests                the backend-parametrized pytest suite on the device only:
                       SRKERN_TEST_BACKENDS=cuda (dry run: gpu-emu) python -m pytest -m
                       "(backend or cuda) and not slow and not mpi": the backend tests and the
                       CuPy / torch-CUDA interop tests (mpirun tests take minutes; the
                       reduce kernels are covered by parity_dist_reduce); on its budget pytest gets
                       SIGINT and still writes its JUnit XML    -> tests.log, tests.xml, tests.json
  bench                casts (2**20, 2**24, 2**26, 2**28), upcast, AdamW in every mode (2**20, 2**24,
                       2**26 parameters in 16 tensors), grad_norm and a reduce kernel, each timed
                       with CUDA events (minimum over repetitions after a warm-up) against a
                       device-to-device copy_ of the same bytes measured in the same run, torch's
                       round-to-nearest ``.to()`` and torch's AdamW(fused=True) on FP32 masters plus
                       the BF16 copy; written after every entry -> bench.json (read by report.py)
  sanitizer            ``compute-sanitizer --tool memcheck`` over a small payload (one cast of each
                       format, every AdamW mode, grad_norm, two reduce kernels, misaligned exact-size
                       buffers, no caching allocators); skipped when no compute-sanitizer is found.
                       Dry run: the payload on gpu-emu built with ASan+UBSan    -> sanitizer.log
  report               report.md (stage table, parity summary with the first mismatches, tests,
                       benchmark tables, sanitizer), summary.json, PNG plots if matplotlib imports

The expected side is srkern's CPU backend (SRKERN_BACKEND=cpu) when g++ works, else the NumPy
oracle srkern.reference (round_float32, upcast, adamw_step, the reduce written with
round_float32); env.json and the report say which. Without g++: the parity stages still run, against
the reference (slower, so the 2**20+3 casts use 2 of their 8 offset variants; NaN results are
compared as "both NaN" where the reference does not fix NaN bits, and grad_norm to 1e-12
relative); tests that compute something on CPU tensors fail with srkern's "no C++ compiler"
error; bench and sanitizer are unaffected (CUDA only). A dry run cannot run without g++ (gpu-emu
is built by it).

Dry run: the device is gpu-emu (NumPy buffers laid out as on the GPU: misaligned starts, guard
bytes) and the expected side the CPU backend, so the parity stages compare the GPU code with the
CPU code; the tests run on gpu-emu, the benchmarks at 2**10 and 2**14 on CPU torch tensors (they
only exercise the code), the sanitizer stage runs the payload on gpu-emu built with
AddressSanitizer and UBSan (LD_PRELOAD=libasan). About 2.5 minutes on two cores.

Time. Budgets in seconds (``--budget STAGE=SECONDS`` changes one): env 25 (a cold cache compiles
every kernel file here, g++ and NVRTC side by side), parity 82 (cast 22, upcast 8, adamw 25,
grad_norm 7, dist_reduce 12, optim 8; soft: a family stops starting cases when its budget is spent
and the cases not reached count as failures) plus 10 for the parity child's start, tests 60, bench 23
(soft: entries not reached are listed, not failures), sanitizer 30, report 5; and
``--total-budget`` (235 s) over all of them: a stage gets at most what is left, and one that
cannot start any more is reported as not run. A child past its budget is stopped (pytest with
SIGINT first, so that it still writes its XML; then SIGTERM, SIGKILL). So a real run ends within
4 minutes of its start whatever happens, leaving room in a 15-minute lease for the machine's
start and a rerun. A dry run uses ``DRY_BUDGETS`` (sized for two cores) and a 30-minute total.

Exit status: 0 when every stage ran and passed; 1 when a parity case differs, a test fails, or a
stage could not run or ran out of time.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

from _common import _cpu_model  # noqa: E402  (benchmarks/_common.py: the machine description)
from srkern.formats import FORMATS, FORMATS_BY_SHORT, NP_DTYPES  # noqa: E402  (imports neither torch nor CuPy)
from srkern.testing import all_patterns, bits_of, first_difference, format_grid  # noqa: E402

FAMILIES = ("cast", "upcast", "adamw", "grad_norm", "dist_reduce", "optim")
PARITY_STAGES = tuple(f"parity_{f}" for f in FAMILIES)
STAGES = ("env", *PARITY_STAGES, "tests", "bench", "sanitizer", "report")

# 235 s in all with PARITY_STARTUP. parity_optim's 8 s came from parity_cast (28 -> 22) and bench
# (25 -> 23; soft): no budget has been measured on a GPU yet. The family's 48 cases take ~9 s in a
# dry run on two cores (gpu-emu emulates every thread); on a GPU the CPU side dominates.
BUDGETS = {"env": 25, "parity_cast": 22, "parity_upcast": 8, "parity_adamw": 25, "parity_grad_norm": 7,
           "parity_dist_reduce": 12, "parity_optim": 8, "tests": 60, "bench": 23, "sanitizer": 30, "report": 5}
# Dry run on a 2-core CI machine (gpu-emu is the device, everything runs on two cores).
DRY_BUDGETS = {"env": 240, "parity_cast": 200, "parity_upcast": 60, "parity_adamw": 120,
               "parity_grad_norm": 60, "parity_dist_reduce": 60, "parity_optim": 60, "tests": 400, "bench": 120,
               "sanitizer": 300, "report": 60}
TOTAL_BUDGET = 235
DRY_TOTAL_BUDGET = 1800
PARITY_STARTUP = 10  # seconds for the parity child's imports and CUDA start, on top of its families
REPORT_RESERVE = 5  # seconds kept back for the report
TEST_MARKERS = "(backend or cuda) and not slow and not mpi"

CAST_SIZES = (0, 1, 7, 8, 9, 1023, 4099, (1 << 20) + 3)
SEED = 0x1234_5678_9ABC_DEF0
DIST_SEED, DIST_STEP, DIST_STREAM = 7, 3, 5
GUARD = 64  # guard bytes on each side of every device buffer of a parity case

U64 = 1 << 64
OUTPUT_FILES = ("env.json", "env.log", "parity.jsonl", "parity.json", "parity.log", "tests.log", "tests.xml",
                "tests.json", "bench.json", "bench.log", "sanitizer.json", "sanitizer.log", "stages.json",
                "summary.json", "report.md", "bandwidth.png", "optimizer_bytes.png")


# ---- small helpers -----------------------------------------------------------------------------

def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


@contextlib.contextmanager
def backend_env(name: str):
    """SRKERN_BACKEND=name for the duration (srkern reads it at every launch)."""
    old = os.environ.get("SRKERN_BACKEND")
    os.environ["SRKERN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SRKERN_BACKEND", None)
        else:
            os.environ["SRKERN_BACKEND"] = old


def np_dtype(name: str) -> np.dtype:
    return NP_DTYPES[name] if name in NP_DTYPES else np.dtype(name)


def compare(name: str, cpu: np.ndarray, dev: np.ndarray, nan: str = "exact") -> dict:
    """Compare the expected result (``cpu``: the CPU backend, or the NumPy reference) with the
    device's, bit for bit, through ``srkern.testing.first_difference``. ``nan``: "exact"
    (default), "sign" (any two NaNs of the same sign match) or "any" (any two NaNs match): for a
    reference that does not fix NaN bits.
    Returns the case record: ok, n, mismatches and the first differing bits."""
    cpu, dev = np.asarray(cpu), np.asarray(dev)
    if cpu.dtype != dev.dtype or cpu.size != dev.size:
        return {"case": name, "ok": False,
                "error": f"expected {cpu.dtype} {cpu.shape}, device gave {dev.dtype} {dev.shape}"}
    diff = first_difference(dev, cpu, nan, limit=5)
    rec = {"case": name, "ok": diff["ok"], "n": diff["n"], "mismatches": diff["mismatches"]}
    if nan != "exact":
        rec["nan"] = nan
    if diff["first"]:
        rec["first"] = [{"index": i, "cpu": hex(want), "device": hex(got)} for i, got, want in diff["first"]]
    return rec


def compare_buffers(name: str, pairs: list[tuple[str, np.ndarray, np.ndarray]], nan: str = "exact") -> dict:
    """:func:`compare` over several labelled buffers, as one case record."""
    recs = [(label, compare(label, e, g, nan)) for label, e, g in pairs]
    bad = [(label, r) for label, r in recs if not r["ok"]]
    rec = {"case": name, "ok": not bad, "n": sum(r.get("n", 0) for _, r in recs),
           "mismatches": sum(r.get("mismatches", 0) for _, r in recs), "buffers": len(pairs)}
    if nan != "exact":
        rec["nan"] = nan
    if bad:
        rec["failed_buffers"] = [label for label, _ in bad][:20]
        rec["first"] = [dict(f, buffer=label) for label, r in bad for f in r.get("first", [])][:5]
        errors = [f"{label}: {r['error']}" for label, r in bad if "error" in r]
        if errors:
            rec["error"] = "; ".join(errors[:3])
    return rec


# ---- inputs --------------------------------------------------------------------------------------

F32_SPECIALS = (
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
    0x7FA00001, 0xFFA5A5A5, 0x7FC12345, 0xFFE00001,              # NaN payloads, both signs, quiet and signalling
    0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00400000,  # FP32 subnormals
    0x00800000, 0x7F7FFFFF, 0xFF7FFFFF)                          # smallest normal, largest finite
SPECIAL_VALUES = (65504.0, 65519.996, 65520.0, -65520.0, 448.0, 464.0, 480.0, -480.0, 57344.0,
                  61440.0, -61440.0, 2.0 ** -9, 2.0 ** -10, 2.0 ** -16, 2.0 ** -17, 2.0 ** -24,
                  2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -133, 2.0 ** -134, 3.3895314e38, 3.3961776e38)


@functools.lru_cache(maxsize=None)
def _grid(fmt: str) -> np.ndarray:
    """Non-negative finite values of a 16/8-bit format (float64)."""
    return format_grid(FORMATS[fmt])


def test_inputs(n: int, rng: np.random.Generator, fmt: str | None = None) -> np.ndarray:
    """``n`` float32 inputs for the cast parity.

    A mix of random bit patterns (every class: NaN payloads of both signs, infinities,
    subnormals), values spread over every binade from FP32 subnormals to overflow, and (with
    ``fmt``) values of that format's grid nudged by -3..3 FP32 ulps. When ``n >= 64`` the specials
    (zeros, infinities, NaN payloads of both signs, FP32 subnormals, the formats' largest finite
    values and overflow thresholds, their smallest subnormals) overwrite random positions; shorter
    inputs keep only draw-dependent values, so a lane mix-up shows.
    """
    kind = rng.integers(0, 4, n)
    raw = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    with np.errstate(over="ignore"):
        spread = (rng.standard_normal(n) * np.exp2(rng.integers(-150, 129, n).astype(np.float64)))
        spread = spread.astype(np.float32).view(np.uint32)
    if fmt is not None and fmt in FORMATS:
        grid = _grid(fmt)
        sign = np.where(rng.integers(0, 2, n) == 1, -1.0, 1.0)
        on = (sign * grid[rng.integers(0, grid.size, n)]).astype(np.float32).view(np.uint32)
        nudged = (on.astype(np.int64) + rng.integers(-3, 4, n)).astype(np.uint32)
    else:
        nudged = spread
    u = np.where(kind == 0, raw, np.where(kind == 3, nudged, spread)).astype(np.uint32)
    if n >= 64:
        sp = np.concatenate([np.array(F32_SPECIALS, dtype=np.uint32),
                             np.array(SPECIAL_VALUES, dtype=np.float32).view(np.uint32),
                             (-np.array(SPECIAL_VALUES, dtype=np.float32)).view(np.uint32)])
        k = min(sp.size, n)
        u[rng.choice(n, k, replace=False)] = sp[:k]
    return u.view(np.float32)


# Per dtype: signed zeros and subnormals (the smallest, the largest, others); NaNs (signalling and
# quiet payloads of both signs, the canonical quiet NaN last); the infinities. float16: the FP16
# weights and gradients of fp16-sr (exponent 0x7C00, 10 fraction bits, quiet bit 0x0200).
SUB_BITS = {"float32": (0x00000000, 0x80000000, 0x00000001, 0x80000003, 0x007FFFFF, 0x00012345, 0x80400000),
            "bfloat16": (0x0000, 0x8000, 0x0001, 0x8003, 0x007F, 0x0012, 0x8040),
            "float16": (0x0000, 0x8000, 0x0001, 0x8003, 0x03FF, 0x0012, 0x8200)}
NAN_BITS = {"float32": (0x7FA00001, 0xFFA5A5A5, 0x7FC12345, 0xFFC00000, 0x7FC00000),
            "bfloat16": (0x7FA1, 0xFFA5, 0x7FC1, 0xFFC0, 0x7FC0),
            "float16": (0x7D01, 0xFCA5, 0x7E01, 0xFE00, 0x7E00)}
INF_BITS = {"float32": (0x7F800000, 0xFF800000), "bfloat16": (0x7F80, 0xFF80), "float16": (0x7C00, 0xFC00)}


def values(rng: np.random.Generator, n: int, dtype: str, scale: float, kind: str = "x",
           specials: str | None = "sub") -> np.ndarray:
    """``n`` values of ``dtype`` (float32 / bfloat16 / float16): normal(0, scale), absolute for ``kind="v"``
    (second moments). With ``n >= 64`` and ``specials``: subnormals and signed zeros overwrite
    random positions ("sub"), plus NaN payloads of both signs and (for gradients, ``kind="g"``)
    infinities with "nan"."""
    x = rng.standard_normal(n) * scale
    if kind == "v":
        x = np.abs(x)
    a = np.ascontiguousarray(x.astype(np.float32).astype(np_dtype(dtype)))
    if n >= 64 and specials:
        table = list(SUB_BITS[dtype])
        if specials == "nan":
            table += list(NAN_BITS[dtype]) + (list(INF_BITS[dtype]) if kind == "g" else [])
        if kind == "v":  # no negative second moments (negative NaNs and -0 are kept)
            top = 1 << (8 * a.itemsize - 1)
            table = [b for b in table if not b & top or b == top or b in NAN_BITS[dtype]]
        b = bits_of(a)  # a view: writing it writes a
        b[rng.choice(n, len(table), replace=False)] = np.array(table, dtype=b.dtype)
    return a


def random_fill(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """Random bytes as ``n`` elements of ``dtype``: an output buffer's prior contents, so that an
    element the kernel fails to write shows as a mismatch."""
    dt = np_dtype(dtype)
    return rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8).view(dt)


# ---- the device: torch CUDA tensors, or NumPy arrays run by gpu-emu in a dry run -----------------

class Device:
    """Where the checked kernels run and how data gets there.

    On a GPU every device buffer is a torch CUDA tensor (torch has every dtype, FP8 included; CuPy
    14 has no FP8), carved from a larger uint8 buffer so that it starts ``lead`` elements past an
    aligned address and has ``GUARD`` random guard bytes on each side, checked after every case.
    In a dry run the buffers are NumPy arrays laid out the same way and kernels run on gpu-emu
    (the GPU side of the kernel source built by g++, run over the CUDA grid); with
    ``torch_tensors`` they are torch CPU tensors, so that the real run's torch data path (views
    with storage offsets, bit-exact reads of BF16/FP8, torch results) runs without a GPU."""

    def __init__(self, dry_run: bool, torch_tensors: bool = False) -> None:
        self.dry_run = dry_run
        self._guarded: list[tuple[Any, np.ndarray, int, int]] = []
        self._rng = np.random.default_rng(0x6A4D)
        self.torch = None
        self.where = "cuda"
        if dry_run:
            from srkern import _backend
            self.name = f"gpu-emu ({_backend.emu_sms()} emulated SMs; dry run)"
            if torch_tensors:
                import torch
                self.torch, self.where = torch, "cpu"
                self.name += ", torch CPU tensors"
        else:
            import torch
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device (torch.cuda.is_available() is False)")
            self.torch = torch
            self.name = torch.cuda.get_device_name(0)

    def run(self):
        """Context for device-side launches (gpu-emu in a dry run; CUDA tensors pick CUDA)."""
        return backend_env("gpu-emu") if self.dry_run else contextlib.nullcontext()

    def put(self, a: np.ndarray, lead: int = 0, guard: bool = True) -> Any:
        """A device copy of ``a`` starting ``lead`` elements past an aligned address (guarded)."""
        a = np.ascontiguousarray(a)
        isz, nbytes = a.itemsize, a.nbytes
        g = GUARD if guard else 0
        pre = g + lead * isz
        total = pre + nbytes + g
        host = self._rng.integers(0, 256, total, dtype=np.uint8)
        pattern = host.copy()
        host[pre:pre + nbytes] = a.reshape(-1).view(np.uint8)
        if self.torch is None:
            if guard:
                raw = np.empty(total + 64, dtype=np.uint8)
                start = (-raw.ctypes.data) % 64
                buf = raw[start:start + total]
            else:  # exact size, for the sanitizer payload
                buf = np.empty(total, dtype=np.uint8)
            buf[:] = host
            out = buf[pre:pre + nbytes].view(a.dtype).reshape(a.shape)
        else:
            torch = self.torch
            buf = torch.from_numpy(host).to(self.where)  # torch's CUDA allocations are 512-byte aligned
            if self.where == "cpu" and guard:  # a 64-byte aligned copy, as the NumPy path makes
                raw = torch.empty(total + 64, dtype=torch.uint8)
                start = (-raw.data_ptr()) % 64
                raw[start:start + total] = buf
                buf = raw[start:start + total]
            out = buf[pre:pre + nbytes].view(getattr(torch, a.dtype.name)).reshape(a.shape)
        if guard:
            self._guarded.append((buf, pattern, pre, nbytes))
        return out

    def get(self, t: Any) -> np.ndarray:
        """A NumPy copy of a device result (BF16/FP8 as ml_dtypes), after the device finished."""
        if self.torch is not None and isinstance(t, self.torch.Tensor):
            torch = self.torch
            c = t.detach().cpu().contiguous()
            name = str(c.dtype).removeprefix("torch.")
            raw = c.reshape(-1).view(torch.uint8).numpy()
            return raw.view(np_dtype(name)).reshape(tuple(c.shape)).copy()
        return np.array(t, copy=True)

    def check_guards(self) -> list[str]:
        """Guard bytes changed since the buffers were made (a write outside a buffer); clears."""
        problems = []
        guarded, self._guarded = self._guarded, []
        for buf, pattern, pre, nbytes in guarded:
            host = self.get(buf).view(np.uint8)
            changed = host != pattern
            changed[pre:pre + nbytes] = False
            idx = np.nonzero(changed)[0]
            if idx.size:
                first = int(idx[0])
                side, dist = ("before", pre - first) if first < pre else ("after", first - (pre + nbytes) + 1)
                problems.append(f"{idx.size} guard byte(s) changed around a {nbytes}-byte buffer, "
                                f"the first {dist} byte(s) {side} the data")
        return problems

    def healthy(self) -> bool:
        """False once the CUDA context is unusable (a sticky error: later cases would all fail)."""
        if self.torch is None or self.where != "cuda":
            return True
        try:
            self.torch.cuda.synchronize()
            return True
        except Exception:  # noqa: BLE001 - any failure means the context is gone
            return False

    def sync(self) -> None:
        if self.torch is not None and self.where == "cuda":
            self.torch.cuda.synchronize()


class Ctx:
    """What a parity case needs: the device, the expected side, a random generator, timers."""

    def __init__(self, dev: Device, expected: str) -> None:
        self.dev = dev
        self.expected = expected
        self.rng = np.random.default_rng(2025)
        self.t = {"expected": 0.0, "device": 0.0}

    @property
    def ref(self) -> bool:
        return self.expected == "reference"

    @contextlib.contextmanager
    def timing(self, which: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[which] += time.perf_counter() - t0


# ---- parity: casts ---------------------------------------------------------------------------------

def cast_variants(n: int) -> list[tuple[int, int, int | None]]:
    """(offset, input lead, output lead; None: srkern allocates the output) for ``n`` elements."""
    return [(0, 0, None), (0, 1, 3), (5, 0, 0), ((1 << 32) - 3, 2, 1), ((1 << 34) - 3, 3, 2),
            ((1 << 35) - 5, 1, 1), (U64 - n - 5, 3, 0), (U64 - max(n, 1), 2, 3)]


def cast_one(ctx: Ctx, fmt: str, rounding: str, sat: bool, n: int, offset: int, lead: int,
             olead: int | None) -> dict:
    import srkern
    from srkern import reference
    x = test_inputs(n, ctx.rng, fmt)
    kw = dict(rounding=rounding, seed=SEED, offset=offset, step=11, stream=2, saturate=sat)
    with ctx.timing("expected"):
        if ctx.ref:
            exp = reference.round_float32(x, fmt, rounding, seed=SEED, offset=offset, step=11, stream=2,
                                          saturate=sat)
        else:
            with backend_env("cpu"):
                exp = srkern.cast(x, fmt, **kw)
    with ctx.timing("device"):
        xd = ctx.dev.put(x, lead)
        out = None if olead is None else ctx.dev.put(random_fill(ctx.rng, n, fmt), olead)
        with ctx.dev.run():
            res = srkern.cast(xd, fmt, out=out, **kw)
        got = ctx.dev.get(res)
    return compare("", exp, got)


def cast_cases(ctx: Ctx) -> list[tuple[str, Callable[[], dict]]]:
    cases = []
    for fmt in FORMATS:
        for rounding in ("stochastic", "nearest"):
            for sat in (False, True):
                for n in CAST_SIZES:
                    variants = cast_variants(n)
                    if ctx.ref and n > 65536:  # the NumPy reference takes ~0.4 s per 2**20 case
                        variants = [variants[0], variants[-1]]
                    for off, lead, olead in variants:
                        name = (f"cast fmt={fmt} rounding={rounding} sat={int(sat)} n={n} offset={off} "
                                f"lead={lead} out_lead={olead}")
                        cases.append((name, functools.partial(cast_one, ctx, fmt, rounding, sat, n, off,
                                                              lead, olead)))
    return cases


def upcast_one(ctx: Ctx, fmt: str, lead: int, olead: int | None) -> dict:
    import srkern
    from srkern import reference
    pats = all_patterns(FORMATS[fmt])
    with ctx.timing("expected"):
        if ctx.ref:
            exp = reference.upcast(pats)
        else:
            with backend_env("cpu"):
                exp = srkern.cast(pats, "float32")
    with ctx.timing("device"):
        xd = ctx.dev.put(pats, lead)
        out = None if olead is None else ctx.dev.put(random_fill(ctx.rng, pats.size, "float32"), olead)
        with ctx.dev.run():
            res = srkern.cast(xd, "float32", out=out)
        got = ctx.dev.get(res)
    # The reference widens NaNs with NumPy/ml_dtypes, which keep the sign but not the payload.
    return compare("", exp, got, nan="sign" if ctx.ref else "exact")


def upcast_cases(ctx: Ctx) -> list[tuple[str, Callable[[], dict]]]:
    return [(f"upcast fmt={fmt} all patterns lead={lead} out_lead={olead}",
             functools.partial(upcast_one, ctx, fmt, lead, olead))
            for fmt in FORMATS for lead, olead in ((0, None), (1, 3), (3, 1))]


# ---- parity: AdamW ---------------------------------------------------------------------------------

ADAMW_SIZES = (1, 7, 8, 9, 1023, 4099, 65537)
# Logical offsets for the "high" layout: across 2**32 (index), across block 2**32 (index 2**35),
# across 2**63, and a last tensor that ends at 2**64, in the last Philox block.
ADAMW_HIGH_OFFSETS = (3, (1 << 32) - 5, (1 << 35) - 4, (1 << 40) + 1, (1 << 63) - 500,
                      U64 - 65537 - 4099 - 11, U64 - 65537)
ADAMW_VARIANTS = ("plain", "high-offsets-misaligned", "nan-inf")


def _adamw_buffers(ctx: Ctx, precision: str, sdt: str, sizes: tuple[int, ...], specials: str) -> dict:
    import srkern
    mode = srkern.PRECISIONS[precision]
    rng = ctx.rng
    host = {"params": [values(rng, s, mode.param_dtype, 1.0, "p", specials) for s in sizes],
            "exp_avgs": [values(rng, s, sdt, 1e-3, "m", specials) for s in sizes],
            "exp_avg_sqs": [values(rng, s, sdt, 1e-5, "v", specials) for s in sizes]}
    if mode.master:
        host["master_params"] = [values(rng, s, "float32", 1.0, "p", specials) for s in sizes]
    if mode.compensation:
        host["compensation"] = [values(rng, s, "bfloat16", 1e-4, "c", specials) for s in sizes]
    return host


def adamw_one(ctx: Ctx, precision: str, gdt: str, sdt: str, variant: str, found_inf: float | None = None,
              sizes: tuple[int, ...] = ADAMW_SIZES, steps: int = 3) -> dict:
    import srkern
    from srkern import reference
    high = variant == "high-offsets-misaligned"
    offsets = list(ADAMW_HIGH_OFFSETS) if high else None
    leads = (1, 2, 3, 1, 2, 3, 1)[:len(sizes)] if high else (0,) * len(sizes)
    specials = "nan" if variant == "nan-inf" else "sub"
    host = _adamw_buffers(ctx, precision, sdt, sizes, specials)
    extra = [k for k in ("master_params", "compensation") if k in host]
    exp = {k: [a.copy() for a in v] for k, v in host.items()}
    with ctx.timing("device"):
        dev = {k: [ctx.dev.put(a, lead) for a, lead in zip(v, leads, strict=True)] for k, v in host.items()}
        dfi = None if found_inf is None else ctx.dev.put(np.array([found_inf], dtype=np.float32))
    hfi = None if found_inf is None else np.array([found_inf], dtype=np.float32)
    for step in range(1, steps + 1):
        grads = [values(ctx.rng, s, gdt, 1e-2, "g", specials) for s in sizes]
        kw = dict(step=step, lr=1e-3 * step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                  precision=precision, grad_scale=0.5, seed=SEED, offsets=offsets)
        with ctx.timing("expected"):
            if ctx.ref:
                if hfi is None or hfi[0] == 0:  # a set found_inf: nothing is written
                    r = reference.adamw_step(exp["params"], grads, exp["exp_avgs"], exp["exp_avg_sqs"],
                                             **kw, **{k: exp[k] for k in extra})
                    exp = {k: [np.asarray(a) for a in r[k]] for k in exp}
            else:
                with backend_env("cpu"):
                    srkern.adamw_step(exp["params"], grads, exp["exp_avgs"], exp["exp_avg_sqs"], **kw,
                                      found_inf=hfi, **{k: exp[k] for k in extra})
        with ctx.timing("device"):
            gd = [ctx.dev.put(g, lead) for g, lead in zip(grads, leads, strict=True)]
            with ctx.dev.run():
                srkern.adamw_step(dev["params"], gd, dev["exp_avgs"], dev["exp_avg_sqs"], **kw,
                                  found_inf=dfi, **{k: dev[k] for k in extra})
    with ctx.timing("device"):
        pairs = [(f"{k}[{i}]", e, ctx.dev.get(d)) for k in host for i, (e, d) in enumerate(zip(exp[k], dev[k], strict=True))]
    # reference.adamw_step stores the canonical NaN of contract v1.1, as the backends do.
    return compare_buffers("", pairs, nan="exact")


def adamw_cases(ctx: Ctx) -> list[tuple[str, Callable[[], dict]]]:
    import srkern
    cases = []
    for precision, mode in srkern.PRECISIONS.items():
        for gdt in mode.grad_dtypes:  # BF16 and FP32; fp16-sr FP16 too
            for sdt in mode.state_dtypes:
                for variant in ADAMW_VARIANTS:
                    name = f"adamw prec={precision} grad={gdt} state={sdt} {variant} sizes={len(ADAMW_SIZES)} steps=3"
                    cases.append((name, functools.partial(adamw_one, ctx, precision, gdt, sdt, variant)))
    for flag in (1.0, 0.0):
        cases.append((f"adamw prec=bf16-sr grad=bfloat16 state=bfloat16 found_inf={flag}",
                      functools.partial(adamw_one, ctx, "bf16-sr", "bfloat16", "bfloat16", "plain",
                                        found_inf=flag, sizes=(9, 1023), steps=1)))
    return cases


# ---- parity: grad_norm -----------------------------------------------------------------------------

GN_SIZES = (1, 7, 2048, 2049, 4099, 65537)


def grad_norm_reference(grads: list[np.ndarray], grad_scale: float) -> tuple[float, bool]:
    """The norm by its definition (FP32 product, FP64 squares and sum; summation order free)."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for g in grads:
            x = (np.asarray(g).astype(np.float32).reshape(-1) * np.float32(grad_scale)).astype(np.float64)
            total += float(np.sum(x * x))
    return math.sqrt(total) if not math.isnan(total) else math.nan, math.isfinite(total)


def _gn_inputs(ctx: Ctx, gdt: str, variant: str) -> tuple[list[np.ndarray], float, tuple[int, ...]]:
    rng = ctx.rng
    sizes, scale, leads = GN_SIZES, 0.25, (0,) * len(GN_SIZES)
    if variant == "empty-list":
        return [], 1.0, ()
    if variant == "zero-size":
        sizes = (0, 5, 0)
        return [values(rng, s, gdt, 1.0, "g") for s in sizes], 1.0, (0, 1, 2)
    if variant == "misaligned":
        leads, scale = (1, 2, 3, 1, 2, 3), 3.0
    if variant == "subnormal-only":  # squares of subnormals are normal in FP64: zero means a flush
        dt = np_dtype(gdt)
        top = 0x007FFFFF if gdt == "float32" else 0x007F
        gs = []
        for s in (5000, 3):
            b = rng.integers(1, top + 1, s).astype(np.uint32 if gdt == "float32" else np.uint16)
            b |= (rng.integers(0, 2, s) << (8 * dt.itemsize - 1)).astype(b.dtype)
            gs.append(b.view(dt))
        return gs, 1.0, (1, 0)
    specials = {"with-inf": "nan", "with-nan": "nan"}.get(variant, "sub")
    gs = [values(rng, s, gdt, 1.0, "g" if variant == "with-inf" else "x", specials) for s in sizes]
    if variant == "scale-overflow":  # 4.0 * 1e38 overflows FP32: the norm is Inf, not finite
        scale = 1e38
        gs[3][5] = np.float32(4.0)
    return gs, scale, leads


def grad_norm_one(ctx: Ctx, gdt: str, variant: str) -> dict:
    import srkern
    grads, scale, leads = _gn_inputs(ctx, gdt, variant)
    with ctx.timing("expected"):
        if ctx.ref:
            e_norm, e_fin = grad_norm_reference(grads, scale)
        else:
            with backend_env("cpu"):
                r = srkern.grad_norm(grads, grad_scale=scale)
            e_norm, e_fin = r.norm, r.finite
    with ctx.timing("device"):
        gd = [ctx.dev.put(g, lead) for g, lead in zip(grads, leads, strict=True)]
        with ctx.dev.run():
            r = srkern.grad_norm(gd, grad_scale=scale)
        d_norm, d_fin = r.norm, r.finite
    if ctx.ref:  # the reference sums in another order: 1e-12 relative, same NaN/Inf/finite
        same = (math.isnan(e_norm) and math.isnan(d_norm)) or e_norm == d_norm or \
            (math.isfinite(e_norm) and abs(d_norm - e_norm) <= 1e-12 * abs(e_norm))
        rec = {"case": "", "ok": bool(same and e_fin == d_fin), "n": 1, "mismatches": int(not (same and e_fin == d_fin)),
               "tolerance": 1e-12}
        if not rec["ok"]:
            rec["first"] = [{"index": 0, "cpu": repr((e_norm, e_fin)), "device": repr((d_norm, d_fin))}]
        return rec
    rec = compare_buffers("", [("norm", np.array([e_norm]), np.array([d_norm])),
                               ("finite", np.array([e_fin], np.uint8), np.array([d_fin], np.uint8))])
    rec["norm"] = {"expected": repr(e_norm), "device": repr(d_norm)}
    return rec


def grad_norm_cases(ctx: Ctx) -> list[tuple[str, Callable[[], dict]]]:
    variants = ("finite", "misaligned", "subnormal-only", "with-inf", "with-nan", "scale-overflow",
                "empty-list", "zero-size")
    return [(f"grad_norm grad={gdt} {v}", functools.partial(grad_norm_one, ctx, gdt, v))
            for gdt in ("bfloat16", "float32") for v in variants]


# ---- parity: the reduce kernels of the reduce-scatter ---------------------------------------------

# (world, shard elements m, shard start in the full vector, op, NaN/Inf specials)
DIST_COMBOS = ((1, 1023, 0, "avg", False), (3, 4099, 8003, "avg", False), (4, 7, 5, "sum", False),
               (2, 65537, U64 - 65537, "avg", False), (5, 1, (1 << 32) - 1, "sum", False),
               (3, 0, 0, "avg", False), (7, 1025, (1 << 35) - 3, "avg", False),
               (3, 4099, 11, "sum", True), (2, 1023, U64 - 1023, "avg", True))
DIST_OUTPUTS = ("bf16_sr", "bf16_rn", "f32")


def dist_launch(chunks: Any, out: Any, world: int, m: int, div: float, wire: str, output: str, start: int) -> None:
    """One reduce kernel over ``world`` received chunks of ``m`` elements, as srkern.dist does."""
    from srkern import _backend
    from srkern._tensor import as_view, stream_of
    cv, ov = as_view(chunks, "chunks"), as_view(out, "out")
    kernel = f"dist_reduce_{'f32' if wire == 'float32' else 'bf16'}_{output}"
    args = [("p", cv.ptr), ("q", m), ("i", world), ("f", div), ("p", ov.ptr), ("q", m)]
    units = m
    if output != "f32":
        args += [("Q", start), ("Q", DIST_SEED), ("Q", DIST_STEP), ("I", DIST_STREAM)]
        units = -(-m // 8) + 2
    _backend.launch("dist", kernel, args, device=cv.device, device_id=cv.device_id, units=units,
                    stream=stream_of(cv))


def dist_reference(chunks: np.ndarray, world: int, m: int, div: float, output: str, start: int) -> np.ndarray:
    """FP32 sum in rank order, one division, then contract-v1 rounding (reference.round_float32) at
    the shard's position in the full vector: reference.reduce_scatter_full for one shard."""
    from srkern import reference
    c = np.asarray(chunks).astype(np.float32).reshape(world, m)
    with np.errstate(all="ignore"):
        acc = c[0].copy()
        for r in range(1, world):
            acc = (acc + c[r]).astype(np.float32)
        acc = reference.canonical_nan((acc / np.float32(div)).astype(np.float32))  # contract v1.1
    if output == "f32":
        return acc
    return reference.round_float32(acc, "bfloat16", "stochastic" if output == "bf16_sr" else "nearest",
                                   seed=DIST_SEED, offset=start, step=DIST_STEP, stream=DIST_STREAM)


def dist_one(ctx: Ctx, wire: str, output: str, world: int, m: int, start: int, op: str, specials: bool,
             lead: int, olead: int) -> dict:
    chunks = values(ctx.rng, world * m, wire, 1.0, "g", "nan" if specials else "sub")
    odt = "float32" if output == "f32" else "bfloat16"
    div = float(world) if op == "avg" else 1.0
    init = random_fill(ctx.rng, m, odt)
    with ctx.timing("expected"):
        if ctx.ref:
            exp = dist_reference(chunks, world, m, div, output, start)
        else:
            exp = init.copy()
            with backend_env("cpu"):
                dist_launch(chunks, exp, world, m, div, wire, output, start)
    with ctx.timing("device"):
        cd, od = ctx.dev.put(chunks, lead), ctx.dev.put(init, olead)
        with ctx.dev.run():
            dist_launch(cd, od, world, m, div, wire, output, start)
        got = ctx.dev.get(od)
    return compare("", exp, got, nan="exact")


def dist_cases(ctx: Ctx) -> list[tuple[str, Callable[[], dict]]]:
    cases = []
    for wire in ("float32", "bfloat16"):
        for output in DIST_OUTPUTS:
            for i, (world, m, start, op, specials) in enumerate(DIST_COMBOS):
                lead, olead = i % 4, (3 * i + 1) % 4
                name = (f"dist_reduce wire={wire} out={output} world={world} m={m} start={start} op={op}"
                        f"{' nan-inf' if specials else ''} lead={lead} out_lead={olead}")
                cases.append((name, functools.partial(dist_one, ctx, wire, output, world, m, start, op,
                                                      specials, lead, olead)))
    return cases


# ---- parity: add_ (kernels/accum.cu), sgd_step, lion_step, adafactor_step -----------------------------

# Tensor sizes of the SGD / Lion cases (partial Philox blocks at both ends of most) and, for the
# "high-offsets-misaligned" variant, their logical offsets: across index 2**32, across block
# 2**32 (index 2**35), across 2**63, and a last tensor that ends at 2**64, in the last Philox block.
OPT1_SIZES = (1, 9, 1023, 4099, 65537)
OPT1_HIGH_OFFSETS = (3, (1 << 32) - 5, (1 << 35) - 4, (1 << 63) - 500, U64 - 65537)
OPT1_LEADS = (1, 2, 3, 1, 2)
# Three steps: SGD with momentum takes the first-step rule, Nesterov, then dampening and maximize.
SGD_STEPS = (dict(lr=3e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
             dict(lr=1e-2, momentum=0.9, nesterov=True, grad_scale=0.5),
             dict(lr=5e-3, momentum=0.5, dampening=0.25, maximize=True, weight_decay=0.1, grad_scale=1.7))
LION_STEPS = (dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
              dict(lr=3e-3, betas=(0.95, 0.98), grad_scale=0.5, maximize=True),
              dict(lr=1e-4, betas=(0.0, 1.0), weight_decay=1.0, grad_scale=3.0))
# Adafactor: a factored 2-D tensor (row and column statistics; rows of 70 leave the CPU's 64-element
# runs partial), a 1-D one longer than a row unit (AF_CHUNK = 2048) and a short 1-D one.
AF_SHAPES = ((33, 70), (4099,), (7,))
AF_OFFSETS = (5, (1 << 35) - 100, U64 - 7)
# add_: (n, offset) of the separate tensors of one case; acc and x leads cycle through 0..3.
ADD_LAYOUTS = ((1, 0), (7, 3), (9, (1 << 32) - 5), (1023, 8 * (1 << 32) - 5), (4099, 11), (65537, U64 - 65537))


def _opt1_host(ctx: Ctx, precision: str, sdt: str | None, specials: str) -> dict:
    """Buffers of a single-state optimizer (SGD: ``sdt`` None without momentum; Lion)."""
    import srkern
    mode, rng = srkern.PRECISIONS[precision], ctx.rng
    host = {"params": [values(rng, s, mode.param_dtype, 1.0, "p", specials) for s in OPT1_SIZES]}
    if sdt is not None:
        host["states"] = [values(rng, s, sdt, 1e-2, "m", specials) for s in OPT1_SIZES]
    if mode.master:
        host["master_params"] = [values(rng, s, "float32", 1.0, "p", specials) for s in OPT1_SIZES]
    if mode.compensation:
        host["compensation"] = [values(rng, s, "bfloat16", 1e-4, "c", specials) for s in OPT1_SIZES]
    return host


def opt1_one(ctx: Ctx, opt: str, precision: str, gdt: str, sdt: str | None, variant: str) -> dict:
    """Three steps of sgd_step (``opt="sgd"``; ``sdt`` None: momentum 0, no buffers) or
    lion_step on 5 tensors of odd sizes, the device against the expected side, every buffer."""
    import srkern
    from srkern import reference
    high = variant == "high-offsets-misaligned"
    offsets = list(OPT1_HIGH_OFFSETS) if high else None
    leads = OPT1_LEADS if high else (0,) * len(OPT1_SIZES)
    specials = "nan" if variant == "nan-inf" else "sub"
    host = _opt1_host(ctx, precision, sdt, specials)
    exp = {k: [a.copy() for a in v] for k, v in host.items()}
    with ctx.timing("device"):
        dev = {k: [ctx.dev.put(a, lead) for a, lead in zip(v, leads, strict=True)] for k, v in host.items()}
    fn = srkern.sgd_step if opt == "sgd" else srkern.lion_step
    ref_fn, state_key = (reference.sgd_step, "momentum_buffers") if opt == "sgd" else (reference.lion_step, "exp_avgs")
    for step, hyper in enumerate(SGD_STEPS if opt == "sgd" else LION_STEPS, start=1):
        hyper = dict(hyper)
        if opt == "sgd" and sdt is None:
            hyper.update(momentum=0.0, nesterov=False, dampening=0.0)
        # |lr * g| mostly above half a BF16 ulp of the weights (round-to-nearest writes a change)
        grads = [values(ctx.rng, s, gdt, 1.0, "g", specials) for s in OPT1_SIZES]
        kw = dict(hyper, step=step, precision=precision, seed=SEED, offsets=offsets)

        def call(f, b, g):
            f(b["params"], g, b.get("states"), master_params=b.get("master_params"),
              compensation=b.get("compensation"), **kw)
        with ctx.timing("expected"):
            if ctx.ref:
                r = ref_fn(exp["params"], grads, exp.get("states"), master_params=exp.get("master_params"),
                           compensation=exp.get("compensation"), **kw)
                r["states"] = r[state_key]
                exp = {k: [np.asarray(a) for a in r[k]] for k in exp}
            else:
                with backend_env("cpu"):
                    call(fn, exp, grads)
        with ctx.timing("device"):
            gd = [ctx.dev.put(g, lead) for g, lead in zip(grads, leads, strict=True)]
            with ctx.dev.run():
                call(fn, dev, gd)
    with ctx.timing("device"):
        pairs = [(f"{k}[{i}]", e, ctx.dev.get(d)) for k in host for i, (e, d) in enumerate(zip(exp[k], dev[k], strict=True))]
    return compare_buffers("", pairs, nan="exact")


def adafactor_one(ctx: Ctx, precision: str, gdt: str, sdt: str, variant: str) -> dict:
    """Three steps of adafactor_step on AF_SHAPES (factored 2-D and unfactored 1-D tensors in one
    call): weights, row / column statistics, variances, masters and compensation, bit for bit."""
    import srkern
    from srkern import reference_adafactor
    mode, rng = srkern.PRECISIONS[precision], ctx.rng
    high = variant == "high-offsets-misaligned"
    offsets = list(AF_OFFSETS) if high else None
    lead_of = (lambda i: (1, 3, 2)[i]) if high else (lambda i: 0)
    host: dict[str, list] = {"params": [], "row_vars": [], "col_vars": [], "variances": []}
    if mode.master:
        host["master_params"] = []
    if mode.compensation:
        host["compensation"] = []
    for shape in AF_SHAPES:
        n = math.prod(shape)
        host["params"].append(values(rng, n, mode.param_dtype, 1.0, "p").reshape(shape))
        fact = len(shape) >= 2
        stats = ((*shape[:-1], 1), (*shape[:-2], 1, shape[-1]), None) if fact else (None, None, shape)
        for key, s in zip(("row_vars", "col_vars", "variances"), stats):
            host[key].append(None if s is None else values(rng, math.prod(s), sdt, 1e-3, "v").reshape(s))
        if mode.master:
            host["master_params"].append(values(rng, n, "float32", 1.0, "p").reshape(shape))
        if mode.compensation:
            host["compensation"].append(values(rng, n, "bfloat16", 1e-4, "c").reshape(shape))
    exp = {k: [None if a is None else a.copy() for a in v] for k, v in host.items()}
    with ctx.timing("device"):
        dev = {k: [None if a is None else ctx.dev.put(a, lead_of(i)) for i, a in enumerate(v)] for k, v in host.items()}
    extra = [k for k in ("master_params", "compensation") if k in host]
    for step in (1, 2, 3):  # the lerp weight step**-0.8: 1, 0.57, 0.42
        grads = [values(rng, math.prod(s), gdt, 1e-2 * (1 + step), "g").reshape(s) for s in AF_SHAPES]
        kw = dict(step=step, lr=1e-2 * step, weight_decay=0.1, maximize=step == 2, grad_scale=0.5 if step == 3 else 1.0,
                  precision=precision, seed=SEED, offsets=offsets)
        with ctx.timing("expected"):
            if ctx.ref:
                r = reference_adafactor.adafactor_step(exp["params"], grads, exp["row_vars"], exp["col_vars"],
                                                       exp["variances"], **kw, **{k: exp[k] for k in extra})
                exp = {k: [None if a is None else np.asarray(a) for a in r[k]] for k in exp}
            else:
                with backend_env("cpu"):
                    srkern.adafactor_step(exp["params"], grads, exp["row_vars"], exp["col_vars"], exp["variances"],
                                          **kw, **{k: exp[k] for k in extra})
        with ctx.timing("device"):
            gd = [ctx.dev.put(g, lead_of(i)) for i, g in enumerate(grads)]
            with ctx.dev.run():
                srkern.adafactor_step(dev["params"], gd, dev["row_vars"], dev["col_vars"], dev["variances"],
                                      **kw, **{k: dev[k] for k in extra})
    with ctx.timing("device"):
        pairs = [(f"{k}[{i}]", e, ctx.dev.get(d)) for k in host for i, (e, d) in enumerate(zip(exp[k], dev[k], strict=True))
                 if e is not None]
    return compare_buffers("", pairs, nan="exact")


def add_one(ctx: Ctx, acc_dt: str, x_dt: str, rounding: str) -> dict:
    """srkern.add_ twice (steps 0 and 1, two alphas) on each tensor of ADD_LAYOUTS, NaN payloads,
    infinities and subnormals mixed into acc and x, acc and x misaligned by different leads."""
    import srkern
    from srkern import reference
    pairs = []
    for i, (n, offset) in enumerate(ADD_LAYOUTS):
        acc = values(ctx.rng, n, acc_dt, 1.0, "g", "nan")
        lead, xlead = i % 4, (3 * i + 1) % 4
        exp = acc.copy()
        with ctx.timing("device"):
            ad = ctx.dev.put(acc, lead)
        for step, alpha in ((0, 1.0), (1, -0.3)):
            # addends of acc's size and below its ulp (where SR and RN differ)
            x = values(ctx.rng, n, x_dt, 1.0 if step == 0 else 1e-3, "g", "nan")
            kw = dict(alpha=alpha, rounding=rounding, seed=SEED, offset=offset, step=step)
            with ctx.timing("expected"):
                if ctx.ref:
                    exp = reference.add_(exp, x, **kw)
                else:
                    with backend_env("cpu"):
                        srkern.add_(exp, x, **kw)
            with ctx.timing("device"):
                xd = ctx.dev.put(x, xlead)
                with ctx.dev.run():
                    srkern.add_(ad, xd, **kw)
        with ctx.timing("device"):
            pairs.append((f"acc n={n} offset={offset}", exp, ctx.dev.get(ad)))
    return compare_buffers("", pairs, nan="exact")


def optim_cases(ctx: Ctx) -> list[tuple[str, Callable[[], dict]]]:
    """Every precision mode x BF16 / FP32 gradients for SGD (with and without momentum), Lion and
    Adafactor; the state dtypes and variants (plain; high offsets with misaligned buffers; NaN
    payloads and infinities) rotate over the cases, so each mode meets each of them once or more."""
    import srkern
    from srkern.sgd import ELEMENTWISE_PRECISIONS
    cases, k = [], 0
    for acc_dt in ("bfloat16", "float16"):
        for x_dt in ("float32", "bfloat16"):
            for rounding in ("stochastic", "nearest"):
                cases.append((f"optim add_ acc={acc_dt} x={x_dt} rounding={rounding} tensors={len(ADD_LAYOUTS)} steps=2",
                              functools.partial(add_one, ctx, acc_dt, x_dt, rounding)))
    for opt in ("sgd", "lion", "adafactor"):
        for precision in ELEMENTWISE_PRECISIONS:
            mode = srkern.PRECISIONS[precision]
            for j, gdt in enumerate(mode.grad_dtypes):
                sdt = mode.state_dtypes[j % len(mode.state_dtypes)]
                moms = (("momentum=0.9 nesterov", sdt), ("momentum=0", None)) if opt == "sgd" else (("", sdt),)
                for tag, state in moms:
                    if opt == "adafactor":  # no NaN variant: one NaN poisons a whole row's statistics
                        variant = ADAMW_VARIANTS[k % 2]
                        fn = functools.partial(adafactor_one, ctx, precision, gdt, sdt, variant)
                        what = f"shapes={len(AF_SHAPES)}"
                    else:
                        variant = ADAMW_VARIANTS[k % 3]
                        fn = functools.partial(opt1_one, ctx, opt, precision, gdt, state, variant)
                        what = f"tensors={len(OPT1_SIZES)}"
                    k += 1
                    name = (f"optim {opt} prec={precision} grad={gdt} state={state or 'none'}{' ' + tag if tag else ''} "
                            f"{variant} {what} steps=3")
                    cases.append((name, fn))
    return cases


BUILDERS = {"cast": cast_cases, "upcast": upcast_cases, "adamw": adamw_cases, "grad_norm": grad_norm_cases,
            "dist_reduce": dist_cases, "optim": optim_cases}


# ---- children: each stage's work, in its own process ---------------------------------------------

def _apply_kernel_dir(kernel_dir: str | None) -> None:
    """Point srkern at another kernels/ folder (the test that breaks a GPU-only line uses it)."""
    if kernel_dir:
        from srkern import _build
        _build.KERNEL_DIR = Path(kernel_dir).resolve()


def child_parity(args: argparse.Namespace) -> int:
    """Run the parity families in order; one JSON line per event in parity.jsonl."""
    path = args.out / "parity.jsonl"
    budgets = json.loads(args.budgets)
    with open(path, "a", buffering=1) as log:
        def emit(obj: dict) -> None:
            log.write(json.dumps(obj, default=str) + "\n")
            log.flush()

        try:
            dev = Device(args.dry_run, args.torch_tensors)
        except Exception as e:  # noqa: BLE001 - no device: every family fails with the reason
            for fam in args.families.split(","):
                emit({"event": "start", "family": fam})
                emit({"event": "end", "family": fam, "ok": False, "cases": 0, "failed": 0, "not_run": 0,
                      "error": f"device unavailable: {type(e).__name__}: {e}"})
            return 1
        emit({"event": "device", "name": dev.name, "expected": args.expected})
        for fam in args.families.split(","):
            emit({"event": "start", "family": fam, "time": time.time()})
            ctx = Ctx(dev, args.expected)
            ctx.rng = np.random.default_rng([2025, FAMILIES.index(fam)])  # the same cases on a rerun
            t0 = time.monotonic()
            budget = float(budgets.get(fam, 60))
            try:
                cases = BUILDERS[fam](ctx)
            except Exception as e:  # noqa: BLE001
                emit({"event": "end", "family": fam, "ok": False, "cases": 0, "failed": 0, "not_run": 0,
                      "error": f"could not build the cases: {type(e).__name__}: {e}"})
                continue
            failed = ran = raised = 0
            for name, fn in cases:
                if time.monotonic() - t0 > budget:
                    break
                emit({"event": "begin", "case": name})  # names the case if it never returns
                te, td, tc = ctx.t["expected"], ctx.t["device"], time.perf_counter()
                broken = False
                try:
                    rec = fn()
                except Exception as e:  # noqa: BLE001 - a failed case, with its message
                    rec = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                           "where": traceback.format_exc(limit=-3)[-1500:]}
                    broken = not dev.healthy()
                try:
                    problems = dev.check_guards()
                except Exception as e:  # noqa: BLE001
                    problems = [f"guard check failed: {type(e).__name__}: {e}"]
                    broken = broken or not dev.healthy()
                if problems:
                    rec["ok"] = False
                    rec["guard"] = problems
                rec.update(case=name, family=fam, seconds=round(time.perf_counter() - tc, 4),
                           t_expected=round(ctx.t["expected"] - te, 4), t_device=round(ctx.t["device"] - td, 4))
                emit({"event": "case", **rec})
                ran += 1
                failed += not rec["ok"]
                raised += "error" in rec
                if broken:  # the CUDA context is lost: a fresh process takes the next family
                    emit({"event": "abort", "family": fam, "error": rec.get("error", "CUDA context lost"),
                          "cases": ran, "failed": failed, "not_run": len(cases) - ran})
                    return 3
            not_run = len(cases) - ran
            emit({"event": "end", "family": fam, "ok": failed == 0 and not_run == 0 and ran > 0, "cases": ran,
                  "failed": failed, "raised": raised, "not_run": not_run, "seconds": round(time.monotonic() - t0, 2),
                  "t_expected": round(ctx.t["expected"], 2), "t_device": round(ctx.t["device"], 2),
                  **({"error": f"time budget of {budget:.0f} s spent: {not_run} case(s) not run"} if not_run else {})})
    return 0


def _dist_version(*names: str) -> str | None:
    from importlib import metadata
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return None


def find_sanitizer() -> str | None:
    """compute-sanitizer: on PATH, in a CUDA toolkit folder, or inside an NVIDIA wheel."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*")), "/opt/nvidia"]
    cands = []
    for r in roots:
        if r:
            cands += [os.path.join(r, "bin", "compute-sanitizer"),
                      os.path.join(r, "compute-sanitizer", "compute-sanitizer")]
    try:
        import nvidia  # namespace package of NVIDIA's wheels (nvidia-cuda-sanitizer-api, ...)
        for root in list(nvidia.__path__):
            cands += sorted(glob.glob(os.path.join(root, "**", "compute-sanitizer"), recursive=True))
    except ImportError:
        pass
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


# The kernel files of each parity family; env compiles those of the stages that run (all of them
# unless --stages names parity families only: a break test then builds only what it checks).
KERNEL_FILES = ("cast", "adamw", "norm", "dist", "accum", "sgd", "lion", "adafactor")
FAMILY_KERNELS = {"cast": ("cast",), "upcast": ("cast",), "adamw": ("adamw",), "grad_norm": ("norm",),
                  "dist_reduce": ("dist",), "optim": ("accum", "sgd", "lion", "adafactor")}


def env_kernels(stages: str | None) -> list[str]:
    """The kernel files the env stage compiles for ``--stages`` (None: every stage)."""
    if not stages:
        return list(KERNEL_FILES)
    want: set[str] = set()
    for s in (s.strip() for s in stages.split(",")):
        if s == "parity":
            fams: tuple[str, ...] = FAMILIES
        elif s.startswith("parity_") and s[len("parity_"):] in FAMILY_KERNELS:
            fams = (s[len("parity_"):],)
        elif s in ("", "env", "report"):
            fams = ()
        else:  # tests, bench, sanitizer: every file
            return list(KERNEL_FILES)
        for f in fams:
            want.update(FAMILY_KERNELS[f])
    return [k for k in KERNEL_FILES if k in want]


def child_env(args: argparse.Namespace) -> int:
    """The environment record (env.json); compiles the kernel files of the stages that run."""
    info: dict[str, Any] = {"dry_run": args.dry_run, "python": sys.version.split()[0],
                            "executable": sys.executable, "platform": platform.platform(),
                            "cpu": _cpu_model(), "cores": os.cpu_count(),
                            "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    ok = True
    info["versions"] = {k: _dist_version(*v) for k, v in {
        "numpy": ("numpy",), "ml_dtypes": ("ml_dtypes", "ml-dtypes"), "torch": ("torch",),
        "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"), "cuda-core": ("cuda-core",),
        "cuda-bindings": ("cuda-bindings",), "nvidia-cuda-nvrtc": ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12"),
        "nvidia-cuda-runtime": ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12"), "pytest": ("pytest",),
        "pytest-benchmark": ("pytest-benchmark",), "matplotlib": ("matplotlib",), "torchao": ("torchao",),
        "mpi4py": ("mpi4py",)}.items()}
    import srkern
    from srkern import _backend, _build, _cache, _contract, _nvrtc
    info["srkern"] = {"version": srkern.__version__, "contract": _contract.CONTRACT_VERSION,
                      "streams": dict(_contract.STREAMS), "kernel_dir": str(_build.KERNEL_DIR),
                      "backends": list(_build.BACKENDS), "gpu_block": _backend.GPU_BLOCK,
                      "gpu_blocks_per_sm": _backend.GPU_BLOCKS_PER_SM, "emu_sms": _backend.emu_sms(),
                      "nvrtc_flags": list(_nvrtc.NVRTC_FLAGS), "cpu_flags": list(_build.CPU_FLAGS)}
    try:
        info["srkern"]["cache_dir"] = str(_cache.cache_dir())
    except Exception as e:  # noqa: BLE001
        info["srkern"]["cache_dir"] = f"UNUSABLE: {e}"
        ok = False
    try:
        path, version = _build.cxx_compiler()
        info["cxx"] = {"path": path, "version": version}
    except Exception as e:  # noqa: BLE001 - no g++: the reference is the expected side
        info["cxx"] = {"path": None, "error": str(e)}
    try:
        from srkern.__main__ import cpu_backend_status
        works, text = cpu_backend_status()
    except Exception as e:  # noqa: BLE001
        works, text = False, f"{type(e).__name__}: {e}"
    info["cpu_backend"] = {"works": works, "detail": text}
    info["expected"] = args.expected if args.expected != "auto" else ("cpu" if works else "reference")
    info["sanitizer"] = find_sanitizer()
    dev: dict[str, Any] = {}
    if args.dry_run:
        dev = {"kind": "gpu-emu", "name": f"gpu-emu ({_backend.emu_sms()} emulated SMs; dry run)",
               "sms": _backend.emu_sms()}
    else:
        try:
            import torch
            dev["torch_cuda"] = torch.version.cuda
            dev["available"] = torch.cuda.is_available()
            if not dev["available"]:
                raise RuntimeError("torch.cuda.is_available() is False")
            p = torch.cuda.get_device_properties(0)
            dev.update(kind="cuda", name=p.name, count=torch.cuda.device_count(), sms=p.multi_processor_count,
                       capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1))
            import cupy
            dev["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            dev["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
            dev["cupy_sms"] = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
            dev["nvrtc"] = _nvrtc.nvrtc_version()
        except Exception as e:  # noqa: BLE001
            dev["error"] = f"{type(e).__name__}: {e}"
            ok = False
    info["device"] = dev
    write_json(args.out / "env.json", info)
    # Compile every kernel file as the later stages load it, all at once (g++ and NVRTC run side by
    # side; the cache writes are atomic): compile errors show here, and the caches are warm after.
    from concurrent.futures import ThreadPoolExecutor
    jobs: dict[str, Callable[[], Any]] = {}
    arch = None
    if not args.dry_run and "error" not in dev:
        try:
            arch = _nvrtc.gpu_arch(0)
        except Exception as e:  # noqa: BLE001
            dev["error"] = f"compute capability: {e}"
            ok = False
    for name in env_kernels(args.stages):
        if args.dry_run:
            jobs[f"{name} gpu-emu"] = functools.partial(_build.cpu_library_path, name, "gpu-emu")
        elif arch:
            jobs[f"{name} {arch}"] = functools.partial(_nvrtc.gpu_binary, name, arch)
        if info["expected"] == "cpu":
            jobs[f"{name} cpu"] = functools.partial(_build.cpu_library_path, name, "cpu")

    def timed(fn: Callable[[], Any]) -> dict:
        t0 = time.perf_counter()
        try:
            fn()
            return {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "seconds": round(time.perf_counter() - t0, 2), "error": str(e)[-3000:]}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = {k: pool.submit(timed, fn) for k, fn in jobs.items()}
    compiled = {k: f.result() for k, f in futures.items()}
    ok = ok and all(c["ok"] for c in compiled.values())
    info["compile"] = compiled
    info["compile_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(args.out / "env.json", info)
    print(json.dumps({k: info[k] for k in ("device", "expected", "cxx", "compile")}, indent=1), flush=True)
    return 0 if ok else 1


def child_bench(args: argparse.Namespace) -> int:
    """Short benchmarks on the device; bench.json (pytest-benchmark layout) after every entry."""
    import statistics

    import torch

    import _common
    import bench_adamw as ba
    import bench_cast as bc
    import srkern
    from srkern._tensor import as_view

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        os.environ["SRKERN_BACKEND"] = "gpu-emu"
        cast_sizes = adamw_sizes = other_sizes = [1 << 10, 1 << 14]
    else:
        cast_sizes, adamw_sizes, other_sizes = [1 << 20, 1 << 24, 1 << 26, 1 << 28], [1 << 20, 1 << 24, 1 << 26], [1 << 24, 1 << 26]
    t_start, budget = time.monotonic(), float(args.stage_budget)
    machine = dict(_common.machine_info(device))
    if args.dry_run:
        machine["device_name"] = f"gpu-emu on {machine.get('cpu')} (dry run)"
    records: list[dict] = []
    errors: list[dict] = []
    not_run: list[str] = []
    state = {"failed": False}

    def save() -> None:
        write_json(args.out / "bench.json", {
            "machine_info": {"srkern": machine},
            "gpu_check": {"device": device, "dry_run": args.dry_run, "timing": "CUDA events" if device == "cuda"
                          else "perf_counter", "errors": errors, "not_run": not_run,
                          "seconds": round(time.monotonic() - t_start, 1)},
            "benchmarks": records})

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timer(fn: Callable[[], Any]) -> tuple[float, float, int]:
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t0
        reps = int(max(3, min(20, 0.05 / max(first, 1e-6))))
        if device == "cuda":
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for s, e in evs:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            ts = [s.elapsed_time(e) / 1e3 for s, e in evs]
        else:
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return min(ts), statistics.median(ts), reps

    copies: dict[int, float] = {}

    def copy_seconds(nbytes: int) -> float:
        if nbytes not in copies:
            fn = bc.copy_fn(nbytes, device)
            copies[nbytes] = timer(fn)[0]
            del fn
        return copies[nbytes]

    def entry(group: str, kernel: str, size: int, dtype: str, nbytes: int, make: Callable[[], Callable[[], Any]],
              baselines: dict[str, float | None] | None = None, role: str = "kernel", **extra: Any) -> float | None:
        if time.monotonic() - t_start > budget:
            not_run.append(f"{kernel} n={size}")
            return None
        try:
            fn = make()
            t, med, reps = timer(fn)
            del fn
            if role == "roofline":  # the copy entry is one more sample of the same-bytes copy
                copies[nbytes] = min(t, copies.get(nbytes, t))
            ct = copy_seconds(nbytes)
        except Exception as e:  # noqa: BLE001 - recorded; an srkern failure fails the stage
            errors.append({"kernel": kernel, "size": size, "error": f"{type(e).__name__}: {e}"[:1500]})
            state["failed"] |= role == "kernel"
            save()
            return None
        info = {"kernel": kernel, "size": int(size), "dtype": dtype, "device": device, "bytes_moved": int(nbytes),
                "seconds": t, "median_seconds": med, "GBps": nbytes / t / 1e9, "copy_seconds": ct,
                "copy_GBps": nbytes / ct / 1e9, "fraction_of_copy": ct / t, "role": role,
                "device_name": machine.get("device_name"), "commit": machine.get("commit"), **extra}
        base = {k: v for k, v in (baselines or {}).items() if v}
        if base:
            first = next(iter(base))
            info.update(baseline=first, baseline_seconds=base[first], baselines_seconds=base,
                        speedup_vs={k: v / t for k, v in base.items()}, speedup_vs_baseline=base[first] / t)
        records.append({"name": f"{kernel} [n={size}]", "group": group,
                        "stats": {"min": t, "median": med, "rounds": reps}, "extra_info": info})
        save()
        return t

    save()
    gen = torch.Generator(device=device).manual_seed(0)
    for n in cast_sizes:
        group = f"cast {device} n={n}"
        x = torch.randn(n, generator=gen, device=device)
        entry(group, "torch copy_ (roofline)", n, "uint8", bc._cast_bytes(n, "bf16"),
              lambda: bc.copy_fn(bc._cast_bytes(n, "bf16"), device), role="roofline")
        for short, fmt in FORMATS_BY_SHORT.items():
            if short != "bf16" and n not in (cast_sizes[0], cast_sizes[-2]):
                continue  # the other formats at two sizes only
            tdt = getattr(torch, fmt.name)
            base = f"torch .to({fmt.name})"
            tb = entry(group, base, n, f"float32->{fmt.name}", bc._cast_bytes(n, short),
                       lambda: bc.torch_to(x, tdt), role="baseline")
            for rounding in (("stochastic", "nearest") if short == "bf16" else ("stochastic",)):
                entry(group, f"srkern.cast {short} {rounding}", n, f"float32->{fmt.name}",
                      bc._cast_bytes(n, short), lambda: bc.srkern_cast(x, short, rounding), baselines={base: tb})
        del x
    for n in other_sizes:
        group = f"upcast {device} n={n}"
        x16 = torch.randn(n, generator=gen, device=device).to(torch.bfloat16)
        tb = entry(group, "torch .to(float32)", n, "bfloat16->float32", 6 * n,
                   lambda: bc.torch_to(x16, torch.float32), role="baseline")
        entry(group, "srkern.cast bf16->float32", n, "bfloat16->float32", 6 * n, lambda: bc.srkern_upcast(x16),
              baselines={"torch .to(float32)": tb})
        del x16
    for n in adamw_sizes:
        group = f"adamw {device} n={n}"
        sizes = ba.split(n, ba.HEADLINE_TENSORS)
        entry(group, ba.COPY, n, "uint8", ba.moved(ba.COPY, n), lambda: bc.copy_fn(ba.moved(ba.COPY, n), device),
              role="roofline")
        tf = entry(group, ba.FUSED, n, ba._dtype(ba.FUSED), ba.moved(ba.FUSED, n),
                   lambda: ba.torch_mixed_step(sizes, "fused", device), role="baseline", tensors=len(sizes))
        for prec, sd in ba.MODES:
            label = ba.srkern_label(prec, sd)
            entry(group, label, n, ba._dtype(label), ba.moved(label, n),
                  lambda: ba.srkern_step(sizes, prec, sd, device), baselines={ba.FUSED: tf},
                  precision=prec, state_dtype=sd, tensors=len(sizes))
    for n in other_sizes:
        group = f"grad_norm {device} n={n}"
        grads = [torch.randn(s, generator=gen, device=device).to(torch.bfloat16) for s in ba.split(n, ba.HEADLINE_TENSORS)]
        if hasattr(torch.nn.utils, "get_total_norm"):
            tb = entry(group, "torch get_total_norm (foreach)", n, "bfloat16", 2 * n,
                       lambda: (lambda: torch.nn.utils.get_total_norm(grads, foreach=True)), role="baseline")
        else:
            tb = None
        entry(group, "srkern.grad_norm", n, "bfloat16", 2 * n, lambda: (lambda: srkern.grad_norm(grads)),
              baselines={"torch get_total_norm (foreach)": tb})
        del grads
        group = f"dist_reduce {device} n={n}"
        world, m = 4, n // 4
        chunks = torch.randn(n, generator=gen, device=device).to(torch.bfloat16)
        out = torch.empty(m, dtype=torch.bfloat16, device=device)
        as_view(chunks)  # warm the view path

        def reduce_fn() -> Callable[[], None]:  # (a dry run has SRKERN_BACKEND=gpu-emu already)
            return lambda: dist_launch(chunks, out, world, m, float(world), "bfloat16", "bf16_sr", 0)
        tb = entry(group, "torch sum(dim=0, fp32) .to(bfloat16)", n, "bfloat16 x4 -> bfloat16", 2 * n + 2 * m,
                   lambda: (lambda: torch.sum(chunks.view(world, m), 0, dtype=torch.float32).to(torch.bfloat16)),
                   role="baseline")
        entry(group, "srkern dist_reduce_bf16_bf16_sr (world 4)", n, "bfloat16 x4 -> bfloat16", 2 * n + 2 * m,
              reduce_fn, baselines={"torch sum(dim=0, fp32) .to(bfloat16)": tb})
        del chunks, out
    save()
    print(f"bench: {len(records)} entries, {len(errors)} errors, {len(not_run)} not run "
          f"in {time.monotonic() - t_start:.1f} s", flush=True)
    return 1 if state["failed"] else 0


def child_sanitize_payload(args: argparse.Namespace) -> int:
    """A small run of every kernel family on exact-size, misaligned buffers (for memcheck/ASan)."""
    import srkern
    dev = Device(args.dry_run)
    if not args.dry_run:
        import cupy
        cupy.cuda.set_allocator(None)  # plain cudaMalloc for srkern's tables: memcheck sees their bounds
    rng = np.random.default_rng(7)

    def put(a: np.ndarray, lead: int = 0) -> Any:
        return dev.put(a, lead, guard=False)

    with dev.run():
        for fmt in FORMATS:
            x = test_inputs(1027, rng, fmt)
            srkern.cast(put(x, 1), fmt, seed=SEED, offset=5, out=put(np.zeros(1027, np_dtype(fmt)), 3))
            srkern.cast(put(x, 2), fmt, rounding="nearest", saturate=True)
            srkern.cast(put(random_fill(rng, 1029, fmt), 3), "float32")
        placed = list(zip((1, 9, 1031), (1, 2, 3), strict=True))  # (size, lead) of each tensor
        for precision, mode in srkern.PRECISIONS.items():
            sdt = mode.state_dtypes[0]
            bufs = {"params": [put(values(rng, s, mode.param_dtype, 1.0, "p"), lead) for s, lead in placed],
                    "exp_avgs": [put(values(rng, s, sdt, 1e-3, "m"), lead) for s, lead in placed],
                    "exp_avg_sqs": [put(values(rng, s, sdt, 1e-5, "v"), lead) for s, lead in placed]}
            if mode.master:
                bufs["master_params"] = [put(values(rng, s, "float32", 1.0, "p"), lead) for s, lead in placed]
            if mode.compensation:
                bufs["compensation"] = [put(values(rng, s, "bfloat16", 1e-4, "c"), lead) for s, lead in placed]
            # the mode's first gradient dtype: BF16 (FP16 in fp16-sr, the FP16 loads)
            grads = [put(values(rng, s, mode.grad_dtypes[0], 1e-2, "g"), lead) for s, lead in placed]
            srkern.adamw_step(bufs.pop("params"), grads, bufs.pop("exp_avgs"), bufs.pop("exp_avg_sqs"), step=1,
                              lr=1e-3, weight_decay=0.1, precision=precision, seed=SEED,
                              offsets=[U64 - 1031 - 20, U64 - 1031 - 11, U64 - 1031], **bufs)
        srkern.grad_norm([put(values(rng, s, "bfloat16", 1.0, "g"), lead) for s, lead in ((2049, 1), (7, 3))])
        for wire, output in (("bfloat16", "bf16_sr"), ("float32", "f32")):
            world, m = 3, 1029
            dist_launch(put(values(rng, world * m, wire, 1.0, "g"), 1), put(np.zeros(m, np_dtype(
                "float32" if output == "f32" else "bfloat16")), 2), world, m, 3.0, wire, output, U64 - m)
    dev.sync()
    print("sanitizer payload: ok", flush=True)
    return 0


# ---- the parent: stages, budgets, records ----------------------------------------------------------

class Runner:
    """Runs the stages in order under their budgets and the total budget; keeps stages.json."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.total_budget
        self.budgets = dict(DRY_BUDGETS if args.dry_run else BUDGETS)
        for item in args.budget or []:
            k, _, v = item.partition("=")
            if k not in self.budgets:
                raise SystemExit(f"--budget {item!r}: unknown stage {k!r} (stages: {', '.join(STAGES)})")
            self.budgets[k] = float(v)
        if args.test_timeout:
            self.budgets["tests"] = float(args.test_timeout)
        if args.bench_timeout:
            self.budgets["bench"] = float(args.bench_timeout)
        self.stages: dict[str, dict] = {}
        self.expected = args.expected
        for name in OUTPUT_FILES:  # a stage that does not run this time leaves nothing stale
            (self.out / name).unlink(missing_ok=True)

    def save(self) -> None:
        write_json(self.out / "stages.json", self.stages)

    def left(self, reserve: float = REPORT_RESERVE) -> float:
        return self.deadline - time.monotonic() - reserve

    def allowed(self, name: str) -> float:
        return max(0.0, min(self.budgets[name], self.left()))

    def spent(self, name: str, budget: float) -> bool:
        """Whether stage ``name``'s ``budget`` is under 5 s; if so the stage is recorded as not run."""
        if budget >= 5:
            return False
        self.record(name, {"ok": False, "seconds": 0.0, "error": "not run: the total time budget was spent"})
        return True

    def record(self, name: str, rec: dict) -> None:
        rec.setdefault("budget", self.budgets.get(name))
        self.stages[name] = rec
        self.save()
        status = "skipped" if rec.get("skipped") else ("ok" if rec["ok"] else "FAILED")
        note = rec.get("skipped") or rec.get("error") or rec.get("note") or ""
        print(f"[gpu_check] {name}: {status} in {rec.get('seconds', 0):.1f} s (budget {rec.get('budget')})"
              f"{': ' + str(note)[:300] if note else ''}", flush=True)

    def child_cmd(self, child: str, *extra: str) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), str(self.out), "--child", child,
               "--expected", self.expected]
        if self.args.dry_run:
            cmd.append("--dry-run")
        if self.args.kernel_dir:
            cmd += ["--kernel-dir", str(self.args.kernel_dir)]
        if self.args.torch_tensors:
            cmd.append("--torch-tensors")
        if self.args.stages:  # (env compiles only the kernel files of these)
            cmd += ["--stages", self.args.stages]
        return cmd + list(extra)

    def run_child(self, cmd: list[str], timeout: float, log: Path, env: dict | None = None,
                  poll: Callable[[], str | None] | None = None,
                  interrupt_first: bool = False) -> tuple[int | None, bool]:
        """Run a child (own session) with output to ``log``; (returncode, timed_out). ``poll`` runs
        every 0.2 s; a non-empty answer stops the child as a timeout does (the reason is logged)."""
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            end = time.monotonic() + timeout
            timed_out = False
            while proc.poll() is None:
                why = poll() if poll else None
                if why or time.monotonic() > end:
                    timed_out = True
                    f.write(f"[gpu_check] stopping the child: {why or f'{timeout:.0f} s budget spent'}\n".encode())
                    f.flush()
                    break
                time.sleep(0.2)
            if timed_out:
                sigs = ([signal.SIGINT] if interrupt_first else []) + [signal.SIGTERM, signal.SIGKILL]
                for sig in sigs:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=5 if sig == signal.SIGINT else 2)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                proc.wait()
            if poll:
                poll()
            return proc.returncode, timed_out

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def selected(self, name: str) -> bool:
        if not self.args.stages:
            return True
        if name in ("env", "report"):
            return True
        return any(name == s or name.startswith(s + "_") or (s == "parity" and name.startswith("parity_"))
                   for s in self.args.stages.split(","))

    # -- stages --

    def stage_env(self) -> None:
        t0 = time.monotonic()
        budget = self.allowed("env")
        rc, to = self.run_child(self.child_cmd("env"), budget, self.out / "env.log")
        info = read_json(self.out / "env.json", {})
        if self.expected == "auto":
            self.expected = info.get("expected") or ("cpu" if shutil.which(os.environ.get("CXX") or "g++") else "reference")
        rec = {"ok": rc == 0 and not to, "seconds": round(time.monotonic() - t0, 1),
               "device": (info.get("device") or {}).get("name"), "expected": self.expected,
               "cxx": (info.get("cxx") or {}).get("version")}
        if to:
            rec["error"] = f"timed out after {budget:.0f} s (see env.log)"
        elif rc != 0:
            errs = [f"{k}: {v.get('error', '')[:300]}" for k, v in (info.get("compile") or {}).items() if not v.get("ok")]
            dev_err = (info.get("device") or {}).get("error")
            rec["error"] = "; ".join(([f"device: {dev_err}"] if dev_err else []) + errs) or f"exit {rc} (see env.log)"
        self.record("env", rec)

    def stage_parity(self) -> None:
        fams = [f for f in FAMILIES if self.selected(f"parity_{f}")]
        path = self.out / "parity.jsonl"
        path.write_text("")
        events: list[dict] = []
        pos = [0]
        family_t0: dict[str, float] = {}
        ended: set[str] = set()

        budgets: dict[str, float] = {}
        in_flight: list[str | None] = [None]  # the case that began and has not ended

        def poll() -> str | None:
            """Read new events; a family past its budget by 10 s (a case that hangs) stops the child."""
            try:
                with open(path) as f:
                    f.seek(pos[0])
                    chunk = f.read()
            except OSError:
                return None
            lines = chunk.split("\n")
            pos[0] += len(chunk) - len(lines[-1])
            for line in lines[:-1]:
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                events.append(ev)
                if ev.get("event") == "start":
                    family_t0[ev["family"]] = time.monotonic()
                if ev.get("event") in ("begin", "case"):
                    in_flight[0] = ev["case"] if ev["event"] == "begin" else None
                if ev.get("event") in ("end", "abort"):
                    ended.add(ev["family"])
                    self.record(f"parity_{ev['family']}", self._family_record(ev, family_t0))
            for fam, t in family_t0.items():
                if fam not in ended and fam in budgets and time.monotonic() - t > budgets[fam] + 10:
                    return f"parity_{fam} is {budgets[fam]:.0f} + 10 s old"
            return None

        remaining = list(fams)
        while remaining:
            left = self.left()
            if left < 5:
                break
            budgets.clear()
            budgets.update({f: min(self.budgets[f"parity_{f}"], left) for f in remaining})
            timeout = min(left, sum(budgets.values()) + PARITY_STARTUP)
            rc, to = self.run_child(self.child_cmd("parity", "--families", ",".join(remaining),
                                                   "--budgets", json.dumps(budgets)),
                                    timeout, self.out / "parity.log", poll=poll)
            started = [e["family"] for e in events if e.get("event") == "start"]
            for fam in remaining:
                if fam in started and fam not in ended:  # it was running when the child died
                    cases = [e for e in events if e.get("event") == "case" and e.get("family") == fam]
                    ended.add(fam)
                    why = ("stopped by its time budget (a case did not return)" if to else f"child exited {rc}")
                    self.record(f"parity_{fam}", {
                        "ok": False, "seconds": round(time.monotonic() - family_t0.get(fam, time.monotonic()), 1),
                        "cases": len(cases), "failed": sum(not c.get("ok") for c in cases),
                        "error": f"{why} during this family (see parity.log); {len(cases)} case(s) recorded"
                                 + (f"; running: {in_flight[0]}" if in_flight[0] else "")})
                    in_flight[0] = None
            progressed = any(f in ended for f in remaining)
            remaining = [f for f in remaining if f not in ended]
            if (rc == 0 and not to) or not progressed:
                break
        for fam in remaining:
            why = "the total time budget was spent" if self.left() < 5 else "the parity child failed before it (see parity.log)"
            self.record(f"parity_{fam}", {"ok": False, "seconds": 0.0, "cases": 0, "error": f"not run: {why}"})
        self._write_parity(events)

    def _family_record(self, ev: dict, family_t0: dict) -> dict:
        fam = ev["family"]
        rec = {"ok": bool(ev.get("ok")) and ev.get("event") == "end",
               "seconds": ev.get("seconds") or round(time.monotonic() - family_t0.get(fam, time.monotonic()), 1),
               **{k: ev[k] for k in ("cases", "failed", "not_run", "t_expected", "t_device") if k in ev}}
        if ev.get("event") == "abort":
            rec["error"] = f"CUDA context lost: {ev.get('error', '')[:500]}"
        elif ev.get("error"):
            rec["error"] = ev["error"]
        elif ev.get("failed"):
            raised = ev.get("raised", 0)
            rec["error"] = (f"{ev['failed'] - raised} of {ev['cases']} case(s) differ"
                            + (f", {raised} raised an exception" if raised else ""))
        return rec

    def _write_parity(self, events: list[dict]) -> None:
        cases = [{k: v for k, v in e.items() if k != "event"} for e in events if e.get("event") == "case"]
        dev = next((e for e in events if e.get("event") == "device"), {})
        fams = {}
        for fam in FAMILIES:
            cs = [c for c in cases if c.get("family") == fam]
            if cs or f"parity_{fam}" in self.stages:
                fams[fam] = {"cases": len(cs), "failed": sum(not c.get("ok") for c in cs),
                             "ok": self.stages.get(f"parity_{fam}", {}).get("ok", False)}
        write_json(self.out / "parity.json", {"device": dev.get("name"), "expected": self.expected,
                                              "dry_run": self.args.dry_run, "families": fams, "cases": cases})

    def stage_tests(self) -> None:
        t0 = time.monotonic()
        budget = self.allowed("tests")
        if self.spent("tests", budget):
            return
        xml = self.out / "tests.xml"
        if xml.exists():
            xml.unlink()
        env = self.env()
        env["SRKERN_TEST_BACKENDS"] = "gpu-emu" if self.args.dry_run else "cuda"
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests"), "-m", self.args.test_markers, "-q", "-rfE",
               "-p", "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={xml}", "--durations=10"]
        rc, to = self.run_child(cmd, budget, self.out / "tests.log", env=env, interrupt_first=True)
        summary = parse_junit(xml)
        summary.update(returncode=rc, timed_out=to, markers=self.args.test_markers,
                       backends=env["SRKERN_TEST_BACKENDS"])
        write_json(self.out / "tests.json", summary)
        rec = {"ok": False, "seconds": round(time.monotonic() - t0, 1),
               **{k: summary.get(k) for k in ("tests", "passed", "failed", "errors", "skipped")}}
        if to:
            rec["error"] = f"timed out after {budget:.0f} s: {summary.get('tests', 0)} test(s) finished"
        elif rc == 5:
            rec.update(ok=True, note="no test selected (none carries the backend marker)")
        elif rc != 0 or summary.get("failed") or summary.get("errors"):
            rec["error"] = (f"pytest exited {rc}: {summary.get('failed', 0)} failed, {summary.get('errors', 0)} "
                            f"error(s)" + (f"; first: {summary['failures'][0]['name']}" if summary.get("failures") else ""))
        elif summary.get("tests") and not summary.get("passed"):
            rec["error"] = "every selected test was skipped (is the device visible to torch?)"
        else:
            rec["ok"] = True
        self.record("tests", rec)

    def stage_bench(self) -> None:
        t0 = time.monotonic()
        budget = self.allowed("bench")
        if self.spent("bench", budget):
            return
        soft = max(1.0, budget - 8)  # the child stops starting entries here; the rest is for its start
        rc, to = self.run_child(self.child_cmd("bench", "--stage-budget", str(soft)), budget, self.out / "bench.log")
        data = read_json(self.out / "bench.json", {}) or {}
        gc = data.get("gpu_check", {})
        rec = {"ok": rc == 0 and not to, "seconds": round(time.monotonic() - t0, 1),
               "entries": len(data.get("benchmarks", [])), "errors": len(gc.get("errors", [])),
               "not_run": len(gc.get("not_run", []))}
        if to:
            rec["error"] = f"timed out after {budget:.0f} s ({rec['entries']} entries written)"
        elif rc != 0:
            first = (gc.get("errors") or [{}])[0]
            rec["error"] = f"exit {rc}" + (f": {first.get('kernel')} n={first.get('size')}: {first.get('error')}" if first else "")
        elif rec["not_run"]:
            rec["note"] = f"{rec['not_run']} entries not run (budget)"
        self.record("bench", rec)

    def stage_sanitizer(self) -> None:
        t0 = time.monotonic()
        budget = self.allowed("sanitizer")
        log = self.out / "sanitizer.log"
        res: dict[str, Any] = {"dry_run": self.args.dry_run}
        env = self.env()
        if self.args.dry_run:
            asan = _libasan()
            if not asan:
                self._sanitizer_skip(t0, res, "no libasan.so next to g++ (ASan build of gpu-emu impossible)")
                return
            env.update(SRKERN_EMU_SANITIZE="1", LD_PRELOAD=asan,
                       ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86",
                       UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=86")
            cmd = self.child_cmd("sanitize-payload")
            res["tool"] = f"gpu-emu built with -fsanitize=address,undefined, LD_PRELOAD={asan}"
        else:
            tool = find_sanitizer()
            if not tool:
                self._sanitizer_skip(t0, res, "compute-sanitizer not found (PATH, /usr/local/cuda*, NVIDIA wheels)")
                return
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # one cudaMalloc per tensor: exact bounds
            cmd = [tool, "--tool", "memcheck", "--leak-check", "no", "--error-exitcode", "86",
                   "--print-limit", "30", *self.child_cmd("sanitize-payload")]
            res["tool"] = tool
        if self.spent("sanitizer", budget):
            return
        rc, to = self.run_child(cmd, budget, log, env=env)
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        first = next((ln.strip() for ln in text.splitlines()
                      if re.search(r"ERROR: AddressSanitizer|runtime error:|=========\s+(Invalid|Program hit|Error)", ln)), None)
        res.update(returncode=rc, timed_out=to, error_summary=m[-1] if m else None, first_error=first,
                   payload_ok="sanitizer payload: ok" in text,
                   tail=text.strip().splitlines()[-15:])
        write_json(self.out / "sanitizer.json", res)
        ok = rc == 0 and not to and res["payload_ok"] and (self.args.dry_run or (m and m[-1] == "0"))
        rec = {"ok": bool(ok), "seconds": round(time.monotonic() - t0, 1), "tool": res["tool"]}
        if not ok:
            rec["error"] = (f"timed out after {budget:.0f} s" if to else
                            f"exit {rc}, error summary {res['error_summary']}, first error {first!r}, payload "
                            f"{'finished' if res['payload_ok'] else 'did not finish'} (see sanitizer.log)")
        self.record("sanitizer", rec)

    def _sanitizer_skip(self, t0: float, res: dict, why: str) -> None:
        res["skipped"] = why
        write_json(self.out / "sanitizer.json", res)
        self.record("sanitizer", {"ok": True, "skipped": why, "seconds": round(time.monotonic() - t0, 1)})

    def stage_report(self) -> None:
        t0 = time.monotonic()
        try:
            failed = write_report(self.out, self.stages, self.args.dry_run, time.monotonic() - self.t0)
            self.record("report", {"ok": True, "seconds": round(time.monotonic() - t0, 1),
                                   **({"note": failed} if failed else {})})
        except Exception as e:  # noqa: BLE001
            self.record("report", {"ok": False, "seconds": round(time.monotonic() - t0, 1),
                                   "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc()[-1500:]})

    def run(self) -> int:
        a = self.args
        self.stage_env()
        if any(self.selected(s) for s in PARITY_STAGES):
            self.stage_parity()
        for name, skip, fn in (("tests", a.skip_tests, self.stage_tests), ("bench", a.skip_bench, self.stage_bench),
                               ("sanitizer", a.skip_sanitizer, self.stage_sanitizer)):
            if not self.selected(name):
                continue
            if skip:
                self.record(name, {"ok": True, "skipped": f"--skip-{name}", "seconds": 0.0})
                continue
            fn()
        self.stage_report()
        ok = all(s.get("ok") for s in self.stages.values())
        total = time.monotonic() - self.t0
        write_json(self.out / "summary.json", {"ok": ok, "seconds": round(total, 1), "dry_run": a.dry_run,
                                               "failed_stages": [k for k, v in self.stages.items() if not v.get("ok")],
                                               "stages": self.stages})
        print(f"[gpu_check] {'OK' if ok else 'FAILED'} in {total:.1f} s; report: {self.out / 'report.md'}", flush=True)
        return 0 if ok else 1


def _libasan() -> str | None:
    cxx = shutil.which(os.environ.get("CXX") or "g++")
    if not cxx:
        return None
    try:
        p = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return p if os.path.isabs(p) and os.path.exists(p) else None


def parse_junit(path: Path) -> dict:
    """Counts and failures from pytest's JUnit XML (empty counts when it is missing)."""
    out: dict[str, Any] = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        out["junit_error"] = str(e)
        return out
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = [c.tag for c in case]
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            out["failed" if tag == "failure" else "errors"] += 1
            el = case.find(tag)
            msg = (el.get("message") or el.text or "").strip().splitlines()
            out["failures"].append({"name": name, "kind": tag, "message": (msg[0] if msg else "")[:400]})
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    for suite in root.iter("testsuite"):
        out["time"] = float(suite.get("time", 0) or 0)
    return out


# ---- the report ------------------------------------------------------------------------------------

def write_report(out: Path, stages: dict, dry_run: bool, elapsed: float) -> str:
    """report.md from the stage files; returns a note on what could not be rendered."""
    env = read_json(out / "env.json", {}) or {}
    parity = read_json(out / "parity.json", {}) or {}
    tests = read_json(out / "tests.json", {}) or {}
    san = read_json(out / "sanitizer.json", {}) or {}
    dev = env.get("device") or {}
    ok = all(s.get("ok") for k, s in stages.items() if k != "report")
    lines = [f"# srkern GPU check: {'PASSED' if ok else 'FAILED'}", ""]
    lines += [f"Device: **{dev.get('name', '?')}**" + (f", {dev.get('sms')} SMs" if dev.get("sms") else "")
              + (f", compute capability {dev['capability']}" if dev.get("capability") else "")
              + (f", {dev['memory_gib']} GiB" if dev.get("memory_gib") else "")
              + (" (dry run: gpu-emu, the GPU side of the kernels built by g++, plays the device)" if dry_run else ""),
              f"Expected side: **{'srkern CPU backend (SRKERN_BACKEND=cpu)' if env.get('expected', parity.get('expected')) == 'cpu' else 'srkern.reference (NumPy oracle)'}**"
              f"; compiler: {(env.get('cxx') or {}).get('version') or 'none: ' + str((env.get('cxx') or {}).get('error'))}",
              f"Versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
              + (f"; NVRTC {dev['nvrtc']}" if dev.get("nvrtc") else "")
              + (f"; CUDA runtime {dev['cuda_runtime']}, driver {dev['cuda_driver']}" if dev.get("cuda_runtime") else ""),
              f"Python {env.get('python', '?')} on {env.get('platform', '?')}, CPU {env.get('cpu', '?')} "
              f"({env.get('cores', '?')} cores); started {env.get('time_utc', '?')} UTC; total {elapsed:.1f} s",
              "", "## Stages", "", "| stage | status | seconds | budget | note |", "|---|---|---:|---:|---|"]
    for name, s in stages.items():
        if name == "report":
            continue
        status = "skipped" if s.get("skipped") else ("ok" if s.get("ok") else "**FAILED**")
        note = s.get("skipped") or s.get("error") or s.get("note") or ""
        extra = ", ".join(f"{k} {s[k]}" for k in ("cases", "failed", "not_run", "tests", "passed", "skipped",
                                                   "entries") if isinstance(s.get(k), int))
        note = "; ".join(p for p in (extra, str(note).replace("|", "/").replace("\n", " ")[:300]) if p)
        lines.append(f"| {name} | {status} | {s.get('seconds', 0):.1f} | {s.get('budget') or ''} | {note} |")
    lines += ["", "## Parity (device vs expected, bit for bit)", ""]
    cases = parity.get("cases", [])
    if cases:
        lines += ["| family | cases | differ | expected-side s | device-side s |", "|---|---:|---:|---:|---:|"]
        for fam in FAMILIES:
            cs = [c for c in cases if c.get("family") == fam]
            if cs:
                lines.append(f"| {fam} | {len(cs)} | {sum(not c.get('ok') for c in cs)} | "
                             f"{sum(c.get('t_expected', 0) for c in cs):.1f} | {sum(c.get('t_device', 0) for c in cs):.1f} |")
        bad = [c for c in cases if not c.get("ok")]
        if bad:
            lines += ["", f"First of {len(bad)} differing case(s) (index, expected bits, device bits):", ""]
            for fam in FAMILIES:
                for c in [c for c in bad if c.get("family") == fam][:8]:
                    what = c.get("error") or "; ".join(
                        f"{f.get('buffer', '')}[{f['index']}] {f['cpu']} vs {f['device']}" for f in c.get("first", []))
                    if c.get("guard"):
                        what += " guard: " + "; ".join(c["guard"])
                    lines.append(f"- `{c['case']}`: {c.get('mismatches', '?')} of {c.get('n', '?')} differ: {what[:400]}")
    else:
        lines.append("(no parity case ran)")
    lines += ["", "## Tests", ""]
    if tests:
        lines.append(f"`SRKERN_TEST_BACKENDS={tests.get('backends')} python -m pytest -m \"{tests.get('markers')}\"`: "
                     f"{tests.get('tests', 0)} run, {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                     f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped"
                     + (" (timed out: interrupted)" if tests.get("timed_out") else "") + " (tests.log, tests.xml)")
        for f in tests.get("failures", [])[:15]:
            lines.append(f"- {f['kind']}: `{f['name']}`: {f['message'][:200]}")
    else:
        lines.append(str((stages.get("tests") or {}).get("skipped") or "(not run)"))
    lines += ["", "## Benchmarks", ""]
    note = ""
    bench = out / "bench.json"
    if bench.exists():
        import report as bench_report
        records, machine = bench_report.load([bench])
        if records:
            lines += [f"Machine: {bench_report.machine_line(machine)}. Minimum over repetitions after a warm-up "
                      f"({'CUDA events' if not dry_run else 'wall clock; dry run sizes only exercise the code'}); "
                      "GB/s counts bytes read plus written; 'of copy' is against a device-to-device copy_ of the "
                      "same bytes in this run.", "", "### Targets", "", bench_report.targets(records), "",
                      bench_report.tables(records)]
            try:
                if bench_report.plot_bandwidth(records, out / "bandwidth.png"):
                    lines += ["", "![bandwidth](bandwidth.png)"]
                lines += ["", "### Optimizer memory", "", bench_report.plot_optimizer_bytes(out / "optimizer_bytes.png"),
                          "", "![optimizer bytes](optimizer_bytes.png)"]
            except ImportError as e:
                note = f"no plots: {e}"
                lines += ["", f"(no plots: {e})"]
        gc = (read_json(bench, {}) or {}).get("gpu_check", {})
        for e in gc.get("errors", []):
            lines.append(f"- error: {e.get('kernel')} n={e.get('size')}: {e.get('error', '')[:300]}")
        if gc.get("not_run"):
            lines.append(f"- not run (budget): {', '.join(gc['not_run'][:20])}")
    else:
        lines.append(str((stages.get("bench") or {}).get("skipped") or "(not run)"))
    lines += ["", "## Sanitizer", ""]
    if san.get("skipped"):
        lines.append(f"Skipped: {san['skipped']}.")
    elif san:
        lines.append(f"{san.get('tool')}: exit {san.get('returncode')}, error summary {san.get('error_summary')}, "
                     f"payload {'finished' if san.get('payload_ok') else 'did NOT finish'}"
                     + (", timed out" if san.get("timed_out") else "") + " (sanitizer.log).")
        lines += ["", "```", *[str(t) for t in san.get("tail", [])[-8:]], "```"]
    else:
        lines.append(str((stages.get("sanitizer") or {}).get("skipped") or "(not run)"))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return note


# ---- command line ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", type=Path, help="folder for env.json, parity.json, tests.*, bench.json, report.md")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: gpu-emu (the GPU side of the kernels, built by g++) is the device")
    ap.add_argument("--stages", default=None,
                    help="comma list of stages to run (env and report always run): e.g. parity, parity_adamw, tests")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest stage")
    ap.add_argument("--skip-bench", action="store_true", help="skip the benchmark stage")
    ap.add_argument("--skip-sanitizer", action="store_true", help="skip the sanitizer stage")
    ap.add_argument("--budget", action="append", metavar="STAGE=SECONDS", help="change one stage's budget")
    ap.add_argument("--total-budget", type=float, default=None,
                    help=f"seconds for everything (default {TOTAL_BUDGET}; dry run {DRY_TOTAL_BUDGET})")
    ap.add_argument("--test-timeout", type=float, default=None, help="same as --budget tests=SECONDS")
    ap.add_argument("--bench-timeout", type=float, default=None, help="same as --budget bench=SECONDS")
    ap.add_argument("--test-markers", default=TEST_MARKERS, help=f"pytest -m expression (default {TEST_MARKERS!r})")
    ap.add_argument("--expected", choices=("auto", "cpu", "reference"), default="auto",
                    help="expected side: auto (CPU backend when g++ works, else the NumPy reference)")
    # Hidden: children, and the test that breaks a GPU-only line in a copy of kernels/.
    ap.add_argument("--kernel-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--torch-tensors", action="store_true", help=argparse.SUPPRESS)  # dry run: torch CPU buffers
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--families", default=",".join(FAMILIES), help=argparse.SUPPRESS)
    ap.add_argument("--budgets", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--stage-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        _apply_kernel_dir(args.kernel_dir)
        fn = {"env": child_env, "parity": child_parity, "bench": child_bench,
              "sanitize-payload": child_sanitize_payload}[args.child]
        return fn(args)
    if args.total_budget is None:
        args.total_budget = DRY_TOTAL_BUDGET if args.dry_run else TOTAL_BUDGET
    print(f"[gpu_check] {'dry run' if args.dry_run else 'GPU run'} into {args.out}, total budget "
          f"{args.total_budget:.0f} s", flush=True)
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
