"""Bit contract v1.1 numerics on every backend: canonical NaNs, subnormals, the FP environment,
and the partial layout of grad_norm.

* Every NaN that arithmetic produces (AdamW's stored buffers, the reduce-scatter kernels,
  grad_norm's partials) is one canonical quiet NaN per format, FP32 0x7fc00000, BF16 0x7fc0,
  FP16 0x7e00 (fp16-sr's weights), FP64 0x7ff8000000000000, whatever NaN payloads and signs
  went in (x86 keeps them, GPUs return their own NaN: the kernels canonicalise).
* Subnormal inputs and results are never flushed, and the CPU kernels do not depend on the
  caller's floating-point control state: ``torch.set_flush_denormal(True)`` (MXCSR FTZ and DAZ)
  in the calling thread, or FTZ/DAZ left set in the OpenMP worker threads, changes no bit.
* grad_norm's partials are bit-equal to an independent NumPy float64 model of their layout.

Each test takes the ``backend`` fixture (cpu, cpu-portable, gpu-emu, and cuda where present) and
compares with the NumPy oracle ``srkern.reference`` bit for bit.
"""
from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern.formats import KERNEL_SUFFIX
from srkern import _backend, _build
from srkern import norm as N
from srkern import reference as R
from srkern._tensor import as_view
from srkern.formats import NP_DTYPES as NP, dtype_name
from srkern.testing import assert_same_bits, bits_of

from conftest import CPU_BACKENDS
from test_adamw import make_state

BF16 = ml_dtypes.bfloat16
SHORT = KERNEL_SUFFIX  # kernel-name suffixes, as in test ids
CANON = R.CANONICAL_NAN

# NaNs of both signs, quiet and signalling, with payloads (the canonical ones are there too, so
# that "already canonical" inputs are covered; the others must all change).
F32_NANS = np.array([0x7FA00001, 0xFFC12345, 0x7F800001, 0xFFFFFFFF, 0xFF800001, 0x7FFFFFFF,
                     0x7FC00000, 0xFFC00000], dtype=np.uint32)
BF16_NANS = np.array([0xFFA1, 0x7F81, 0xFFC1, 0x7FFF, 0xFFFF, 0xFF81, 0x7FC0, 0xFFC0], dtype=np.uint16)
F16_NANS = np.array([0xFD01, 0x7C01, 0xFE01, 0x7FFF, 0xFFFF, 0xFC01, 0x7E00, 0xFE00], dtype=np.uint16)
NANS = {"float32": F32_NANS, "bfloat16": BF16_NANS, "float16": F16_NANS}

CASES = [(p, g, s) for p, mode in srkern.PRECISIONS.items()
         for g in mode.grad_dtypes for s in mode.state_dtypes]
CASE_IDS = [f"mode={p}-grad={SHORT[g]}-state={SHORT[s]}" for p, g, s in CASES]
BUFFERS = ("params", "exp_avgs", "exp_avg_sqs", "master_params", "compensation")
# Odd sizes, full 64-element CPU runs, partial Philox blocks, and one tensor past a CPU work chunk
# (16K elements) so that the OpenMP path runs too.
SIZES = [1, 7, 9, 64, 65, 129, 1000, 17000]


def sprinkle_nans(a: np.ndarray, rng: np.random.Generator, frac: float) -> np.ndarray:
    """A copy of float32 / bfloat16 / float16 ``a`` with NaN payloads of both signs at random positions."""
    a = np.array(a, copy=True)
    n = a.size
    if n == 0:
        return a
    k = max(1, int(n * frac))
    pos = rng.choice(n, size=min(n, k), replace=False)
    pats = NANS[dtype_name(a.dtype)]
    a.reshape(-1).view(pats.dtype)[pos] = pats[rng.integers(0, pats.size, pos.size)]
    return a


def assert_nans_canonical(a: Any, what: str) -> int:
    """Every NaN of ``a`` is the canonical NaN of its format; returns how many NaNs there are."""
    a = np.asarray(a)
    name = dtype_name(a.dtype)
    bits = bits_of(a)
    with np.errstate(invalid="ignore"):
        nan = np.isnan(a.reshape(-1))
    bad = np.nonzero(nan & (bits != CANON[name]))[0]
    if bad.size:
        width = 2 * a.itemsize
        pytest.fail(f"{what}: {bad.size} NaNs are not the canonical 0x{CANON[name]:0{width}x}, "
                    f"e.g. [{bad[0]}] = 0x{int(bits[bad[0]]):0{width}x}", pytrace=False)
    return int(nan.sum())


def noncanonical_nans_of_both_signs(arrays: list[np.ndarray]) -> bool:
    """Whether the inputs hold non-canonical NaNs with the sign bit set and clear (not vacuous)."""
    pos = neg = False
    for a in arrays:
        a = np.asarray(a).reshape(-1)
        b = bits_of(a).astype(np.uint64)
        top = np.uint64(1 << (8 * a.itemsize - 1))
        with np.errstate(invalid="ignore"):  # signalling NaNs
            odd = np.isnan(a) & (b != CANON[dtype_name(a.dtype)])
        neg |= bool((odd & ((b & top) != 0)).any())
        pos |= bool((odd & ((b & top) == 0)).any())
    return pos and neg


# ---- AdamW ------------------------------------------------------------------------------------------


def run_adamw(backend, st: dict, **kw) -> dict:
    """One step on ``backend`` copies of ``st``; returns the buffers as NumPy arrays."""
    dev = {k: None if v is None else [backend.put(x) for x in v] for k, v in st.items()}
    if "found_inf" in kw and kw["found_inf"] is not None:
        kw = dict(kw, found_inf=backend.put(kw["found_inf"]))
    srkern.adamw_step(dev["params"], dev["grads"], dev["exp_avgs"], dev["exp_avg_sqs"],
                      master_params=dev["master_params"], compensation=dev["compensation"], **kw)
    return {k: None if dev[k] is None else [backend.get(x) for x in dev[k]] for k in BUFFERS}


def reference_adamw(st: dict, **kw) -> dict:
    kw = {k: v for k, v in kw.items() if k != "found_inf"}
    return R.adamw_step(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"],
                        master_params=st["master_params"], compensation=st["compensation"], **kw)


def assert_state_equal(got: dict, want: dict, what: str) -> int:
    """Bit-equal buffers, every NaN canonical; returns the number of NaNs stored."""
    nans = 0
    for key in BUFFERS:
        if want[key] is None:
            continue
        for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
            assert_same_bits(a, b, what=f"{what}: {key}[{i}] (size {np.size(a)})")
            nans += assert_nans_canonical(a, f"{what}: {key}[{i}]")
    return nans


@pytest.mark.parametrize("precision,grad_dtype,state_dtype", CASES, ids=CASE_IDS)
def test_adamw_nans_are_canonical(backend, precision, grad_dtype, state_dtype):
    # NaN payloads of both signs in every input buffer (gradients, weights, moments, master
    # weights, compensation), plus +-Inf gradients and weights (Inf/Inf and Inf - Inf make NaNs
    # by arithmetic: x86's own is the negative 0xffc00000): every stored NaN is the canonical
    # one and every buffer equals the oracle bit for bit.
    rng = np.random.default_rng(31)
    st = make_state(precision, grad_dtype, state_dtype, SIZES, seed=32, grad_scale=1e-2)
    for key in ("grads",) + BUFFERS:
        if st[key] is not None:
            st[key] = [sprinkle_nans(x, rng, 0.04) for x in st[key]]
    for g, p in zip(st["grads"], st["params"], strict=True):
        g.reshape(-1)[rng.integers(0, g.size, max(1, g.size // 50))] = np.inf
        g.reshape(-1)[rng.integers(0, g.size, max(1, g.size // 50))] = -np.inf
        p.reshape(-1)[rng.integers(0, p.size, max(1, p.size // 100))] = -np.inf
    inputs = [x for key in ("grads",) + BUFFERS if st[key] is not None for x in st[key]]
    assert noncanonical_nans_of_both_signs(inputs)
    kw = dict(step=3, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, precision=precision,
              seed=0xFEED_1234, grad_scale=0.5)
    want = reference_adamw(st, **kw)
    got = run_adamw(backend, st, **kw)
    nans = assert_state_equal(got, want, f"[{backend.name}] {precision}")
    assert nans > 0
    if srkern.PRECISIONS[precision].param_dtype == "float16":  # FP16 NaNs really stored (0x7e00)
        assert sum(assert_nans_canonical(x, "params") for x in got["params"]) > 0


@pytest.mark.parametrize("precision,grad_dtype,state_dtype", CASES, ids=CASE_IDS)
def test_adamw_subnormals_not_flushed(backend, precision, grad_dtype, state_dtype):
    # Subnormal gradients, moments, weights, master weights and compensation (FP32 ~1e-45..1e-38,
    # BF16 and FP16 with a zero exponent), with eps = 1 so that the updates stay subnormal too: the
    # oracle's bits, and subnormal results really occur (nothing was flushed to zero; a result
    # counts as subnormal in its own format, so fp16-sr's FP16 weights ~6e-8..6e-5 count).
    st = subnormal_state(precision, grad_dtype, state_dtype, SIZES, seed=41)
    kw = dict(step=1, lr=1e-3, betas=(0.9, 0.999), eps=1.0, weight_decay=0.1, precision=precision,
              seed=77)
    want = reference_adamw(st, **kw)
    got = run_adamw(backend, st, **kw)
    assert_state_equal(got, want, f"[{backend.name}] {precision} subnormal")
    sub = sum(int(count_subnormal(x)) for key in BUFFERS if want[key] is not None for x in want[key])
    assert sub > 1000, f"only {sub} subnormal results: the test is not testing subnormals"
    if srkern.PRECISIONS[precision].param_dtype == "float16":  # the SR-rounded FP16 weights themselves
        wsub = sum(count_subnormal(x) for x in want["params"])
        assert wsub > 1000, f"only {wsub} subnormal FP16 weights"


def random_subnormal(n: int, dtype: str, rng: np.random.Generator, normal_frac: float = 0.1) -> np.ndarray:
    """Subnormal values of ``dtype`` with random signs (a fraction small normals and zeros)."""
    if dtype == "float32":
        bits = rng.integers(1, 1 << 23, n, dtype=np.uint64).astype(np.uint32)
        bits |= (rng.integers(0, 2, n).astype(np.uint32) << 31)
        out = bits.view(np.float32).copy()
        k = rng.random(n) < normal_frac
        out[k] = (rng.standard_normal(int(k.sum())) * 1e-37).astype(np.float32)
        return out
    if dtype == "float16":  # zero exponent, 10 mantissa bits; "small normals" just above 2**-14
        bits = rng.integers(1, 0x400, n).astype(np.uint16) | (rng.integers(0, 2, n).astype(np.uint16) << 15)
        out = bits.view(np.float16).copy()
        k = rng.random(n) < normal_frac
        out[k] = (rng.standard_normal(int(k.sum())) * 1e-4).astype(np.float16)
        return out
    bits = rng.integers(1, 0x80, n).astype(np.uint16) | (rng.integers(0, 2, n).astype(np.uint16) << 15)
    out = bits.view(BF16).copy()
    k = rng.random(n) < normal_frac
    out[k] = (rng.standard_normal(int(k.sum())) * 1e-37).astype(BF16)
    return out


def count_subnormal(a: Any) -> int:
    """Non-zero elements below the smallest normal number of ``a``'s own format (FP32's for
    float32 and bfloat16, 2**-14 for float16)."""
    a = np.asarray(a)
    tiny = float(np.finfo(np.float16).tiny if a.dtype == np.float16 else np.finfo(np.float32).tiny)
    a = a.astype(np.float64)
    return int(((a != 0) & (np.abs(a) < tiny)).sum())


def subnormal_state(precision: str, grad_dtype: str, state_dtype: str, sizes: list[int], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mode = srkern.PRECISIONS[precision]
    st: dict = {k: [] for k in BUFFERS + ("grads",)}
    for n in sizes:
        st["params"].append(random_subnormal(n, mode.param_dtype, rng))
        st["grads"].append(random_subnormal(n, grad_dtype, rng))
        st["exp_avgs"].append(random_subnormal(n, state_dtype, rng))
        st["exp_avg_sqs"].append(np.abs(random_subnormal(n, state_dtype, rng)))
        st["master_params"].append(random_subnormal(n, "float32", rng))
        st["compensation"].append(random_subnormal(n, "bfloat16", rng))
    if not mode.master:
        st["master_params"] = None
    if not mode.compensation:
        st["compensation"] = None
    return st


# ---- reduce-scatter kernels (launched directly, as benchmarks/gpu_check.py does) ------------------------


def launch_reduce(backend, chunks: np.ndarray, wire: str, variant: str, world: int, m: int, start: int,
                  div: float, seed: int, step: int, stream: int) -> np.ndarray:
    """dist_reduce_<wire>_<variant> on ``backend`` over ``world`` chunks of ``m`` elements."""
    odt = "float32" if variant == "f32" else "bfloat16"
    c, o = backend.put(chunks), backend.put(np.zeros(m, NP[odt]))
    cv, ov = as_view(c, "chunks"), as_view(o, "out")
    args = [("p", cv.ptr), ("q", m), ("i", world), ("f", div), ("p", ov.ptr), ("q", m)]
    units = m
    if variant != "f32":
        args += [("Q", start), ("Q", seed), ("Q", step), ("I", stream)]
        units = -(-m // 8) + 2
    _backend.launch("dist", f"dist_reduce_{SHORT[wire]}_{variant}", args, device=cv.device,
                    device_id=cv.device_id, units=units, stream=0)
    return backend.get(o)


def reference_reduce(chunks: np.ndarray, wire: str, variant: str, world: int, m: int, start: int,
                     op: str, seed: int, step: int, stream: int) -> np.ndarray:
    """The oracle's reduce-scatter of vectors whose elements [start, start + m) are the chunks."""
    xs = [np.concatenate([np.zeros(start, NP[wire]), chunks[r * m:(r + 1) * m]]) for r in range(world)]
    out_dtype = "float32" if variant == "f32" else "bfloat16"
    rounding = "nearest" if variant == "bf16_rn" else "stochastic"
    return R.reduce_scatter_full(xs, op, out_dtype, rounding, seed=seed, step=step, stream=stream)[start:]


REDUCE_CASES = [(w, v, world) for w in ("float32", "bfloat16") for v in ("bf16_sr", "bf16_rn", "f32")
                for world in (1, 3)]
REDUCE_IDS = [f"wire={SHORT[w]}-out={v}-world={k}" for w, v, k in REDUCE_CASES]


@pytest.mark.parametrize("wire,variant,world", REDUCE_CASES, ids=REDUCE_IDS)
def test_reduce_nans_are_canonical(backend, wire, variant, world):
    # NaN payloads of both signs in the rank chunks, and +Inf / -Inf meeting at one index (NaN by
    # arithmetic); world 1 with op="sum" passes each input only through the division by 1.
    rng = np.random.default_rng(51 + world)
    m, start = 4099, 8 * 1000 + 3
    chunks = sprinkle_nans(rng.standard_normal(world * m).astype(np.float32).astype(NP[wire]), rng, 0.05)
    if world > 1:
        idx = rng.choice(m, 40, replace=False)
        chunks[idx] = np.inf
        chunks[m + idx] = -np.inf
    assert noncanonical_nans_of_both_signs([chunks])
    op = "avg" if world > 1 else "sum"
    div = float(world) if op == "avg" else 1.0
    got = launch_reduce(backend, chunks, wire, variant, world, m, start, div, 11, 7, 5)
    want = reference_reduce(chunks, wire, variant, world, m, start, op, 11, 7, 5)
    assert_same_bits(got, want, what=f"[{backend.name}] reduce {wire}->{variant} world={world}")
    assert assert_nans_canonical(got, f"[{backend.name}] reduce output") > 0


@pytest.mark.parametrize("wire,variant,world", REDUCE_CASES, ids=REDUCE_IDS)
def test_reduce_subnormals_not_flushed(backend, wire, variant, world):
    # Rank chunks of subnormals (~1e-45 .. 1e-38): their FP32 sums and quotients are subnormal and
    # equal the oracle's; nothing is flushed to zero.
    rng = np.random.default_rng(61 + world)
    m, start = 4099, 5
    chunks = random_subnormal(world * m, wire, rng, normal_frac=0.0)
    chunks[:8] = np.array([1e-45, -1e-45, 1e-39, -1e-39, 3e-45, 1.1754942e-38, -1.1754942e-38, 0],
                          dtype=np.float32).astype(NP[wire])
    op = "avg" if world > 1 else "sum"
    div = float(world) if op == "avg" else 1.0
    got = launch_reduce(backend, chunks, wire, variant, world, m, start, div, 12, 8, 5)
    want = reference_reduce(chunks, wire, variant, world, m, start, op, 12, 8, 5)
    assert_same_bits(got, want, what=f"[{backend.name}] reduce subnormal {wire}->{variant} world={world}")
    assert count_subnormal(want) > m // 4


# ---- grad_norm ----------------------------------------------------------------------------------


def norm_partials(backend, grads: list[np.ndarray], grad_scale: float = 1.0, lead: int = 0) -> np.ndarray:
    return N._sumsq_partials([backend.put(g, lead=lead if i % 2 else 0) for i, g in enumerate(grads)],
                            grad_scale=grad_scale)


NORM_SIZES = [0, 1, 7, 8, 9, 255, 256, 257, 2048, 2049, 65535, 65536, 65537, 2 * 65536 + 300]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"], ids=["grad=bf16", "grad=f32"])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37, -3.0], ids=lambda s: f"scale={s}")
def test_grad_norm_partials_match_layout(backend, dtype, grad_scale):
    # The kernel's partials equal the oracle's NumPy float64 model of the layout bit for bit (every
    # tensor boundary, short rows, partial groups, padded spans; odd tensors misaligned by one
    # element so the GPU takes its scalar loads), and grad_norm is their left-to-right sum.
    rng = np.random.default_rng(71)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(NP[dtype]) for n in NORM_SIZES]
    got = norm_partials(backend, grads, grad_scale, lead=1)
    want = R.grad_sumsq_partials(grads, grad_scale)
    assert_same_bits(got, want, what=f"[{backend.name}] partials")
    spans = sum(-(-n // 65536) for n in NORM_SIZES)
    assert got.size == 32 * spans
    # One partial written out longhand (partial l = 5 of span 0 of the last tensor): rows k in
    # order, one accumulator per lane e, then the fixed tree.
    t = len(NORM_SIZES) - 1
    x = (grads[t].astype(np.float32) * np.float32(grad_scale)).astype(np.float64)
    acc = [0.0] * 8
    for k in range(256):
        for e in range(8):
            j = 256 * k + 8 * 5 + e
            acc[e] += x[j] * x[j]
    by_hand = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    first_t = 32 * sum(-(-n // 65536) for n in NORM_SIZES[:t])
    assert got[first_t + 5] == by_hand
    norm = srkern.grad_norm([backend.put(g) for g in grads], grad_scale=grad_scale)
    total = 0.0
    for p in want.tolist():
        total += p
    assert norm == (math.sqrt(total), True) == R.grad_norm(grads, grad_scale)


def test_grad_norm_layout_probe(backend):
    # The layout on this backend (its constants are checked against kernels/norm.cu in
    # tests/test_norm.py): a single non-zero element at position p lands in partial
    # 32 * (p // 65536) + (p % 256) // 8 and nowhere else.
    n = 3 * 65536 - 77
    for p in (0, 7, 8, 255, 256, 300, 2047, 2048, 65535, 65536, 65536 + 8 * 31 + 7, n - 1):
        x = np.zeros(n, np.float32)
        x[p] = 3.0
        got = norm_partials(backend, [x])
        want_at = 32 * (p // 65536) + (p % 256) // 8
        assert got.size == 96 and np.nonzero(got)[0].tolist() == [want_at] and got[want_at] == 9.0, p


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"], ids=["grad=bf16", "grad=f32"])
def test_grad_norm_nans_are_canonical(backend, dtype):
    # NaN payloads of both signs in the gradients: every NaN partial is 0x7ff8000000000000, the
    # partials equal the oracle's, and the norm is NaN and not finite. With grad_scale = 0 an
    # infinite gradient makes its NaN by arithmetic (0 * Inf) and a NaN stays NaN.
    rng = np.random.default_rng(81)
    grads = [rng.standard_normal(n).astype(NP[dtype]) for n in (5, 300, 70000)]
    grads = [grads[0], sprinkle_nans(grads[1], rng, 0.02), sprinkle_nans(grads[2], rng, 0.0005)]
    assert noncanonical_nans_of_both_signs(grads)
    got = norm_partials(backend, grads)
    want = R.grad_sumsq_partials(grads)
    assert_same_bits(got, want, what=f"[{backend.name}] NaN partials")
    assert assert_nans_canonical(got, f"[{backend.name}] partials") > 0
    norm = srkern.grad_norm([backend.put(g) for g in grads])
    assert math.isnan(norm.norm) and not norm.finite
    assert np.float64(norm.norm).view(np.uint64) == CANON["float64"]

    inf = [np.array([1.0, np.inf, -np.inf, 2.0] * 100, dtype=NP[dtype])]
    got0 = norm_partials(backend, inf, grad_scale=0.0)
    assert_same_bits(got0, R.grad_sumsq_partials(inf, 0.0),
                     what=f"[{backend.name}] 0 * Inf partials")
    assert assert_nans_canonical(got0, "0 * Inf partials") == 32  # every partial holds an Inf
    assert not srkern.grad_norm([backend.put(inf[0])], grad_scale=0.0).finite
    assert srkern.grad_norm([backend.put(inf[0])]) == (math.inf, False)


def test_grad_norm_subnormals_not_flushed(backend):
    # Subnormal FP32 gradients times grad_scale 0.5 (a subnormal FP32 product), squared in FP64:
    # the partials equal the oracle's and are not zero.
    rng = np.random.default_rng(91)
    grads = [random_subnormal(n, "float32", rng, normal_frac=0.0) for n in (1000, 70000)]
    got = norm_partials(backend, grads, grad_scale=0.5)
    want = R.grad_sumsq_partials(grads, 0.5)
    assert_same_bits(got, want, what=f"[{backend.name}] subnormal partials")
    assert (want[:1] > 0).all() and srkern.grad_norm([backend.put(g) for g in grads], grad_scale=0.5).norm > 0


# ---- the caller's floating-point control state ---------------------------------------------------------


def subnormal_workload(seed: int = 101) -> list[tuple[str, Callable[[Any], list[np.ndarray]], list[np.ndarray]]]:
    """(name, run(backend) -> outputs, oracle outputs) for every kernel family on subnormal data.

    The oracle is evaluated here, by NumPy, so call this while the FP state is the default one.
    Sizes pass every serial cutoff, so the OpenMP worker threads take part.
    """
    rng = np.random.default_rng(seed)
    cases = []

    def adamw_case(precision, grad_dtype, state_dtype, found_inf=None):
        st = subnormal_state(precision, grad_dtype, state_dtype, [40000, 77], seed=int(rng.integers(1 << 30)))
        kw = dict(step=2, lr=1e-3, betas=(0.9, 0.999), eps=1.0, weight_decay=0.1, precision=precision, seed=5)
        if found_inf is None:
            ref = reference_adamw(st, **kw)
        else:  # a set flag: nothing may change
            ref = {k: st[k] for k in BUFFERS}
            kw["found_inf"] = found_inf

        def run(backend, st=st, kw=kw):
            out = run_adamw(backend, st, **kw)
            return [x for k in BUFFERS if out[k] is not None for x in out[k]]
        want = [x for k in BUFFERS if ref[k] is not None for x in ref[k]]
        cases.append((f"adamw {precision} grad={grad_dtype} state={state_dtype}"
                      + (" found_inf=1e-45" if found_inf is not None else ""), run, want))

    adamw_case("bf16-sr", "float32", "bfloat16")
    adamw_case("bf16-kahan", "bfloat16", "float32")
    adamw_case("fp32-master", "float32", "float32")
    adamw_case("fp32", "bfloat16", "float32")
    adamw_case("fp32", "float32", "float32", found_inf=np.array([1e-45], np.float32))
    adamw_case("fp16-sr", "float16", "float32")
    adamw_case("fp16-sr", "float32", "bfloat16")

    for wire, variant in (("float32", "f32"), ("float32", "bf16_sr"), ("bfloat16", "bf16_rn")):
        world, m, start = 3, 20000, 3
        chunks = random_subnormal(world * m, wire, rng, normal_frac=0.0)
        want = reference_reduce(chunks, wire, variant, world, m, start, "avg", 3, 4, 5)

        def run(backend, chunks=chunks, wire=wire, variant=variant, m=m, start=start):
            return [launch_reduce(backend, chunks, wire, variant, 3, m, start, 3.0, 3, 4, 5)]
        cases.append((f"reduce {wire}->{variant}", run, [want]))

    x = random_subnormal(70000, "float32", rng, normal_frac=0.0)
    want_cast = R.round_float32(x, "bfloat16", seed=9, offset=1, step=2, stream=0)
    cases.append(("cast f32->bf16 sr", lambda be, x=x: [be.get(srkern.cast(be.put(x), "bfloat16", seed=9, offset=1, step=2))],
                  [want_cast]))
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = np.tile(h[~np.isnan(h)], 5)  # every non-NaN FP16 (subnormals included), past the serial cutoff
    want_up = h.astype(np.float32)
    cases.append(("cast f16->f32", lambda be, h=h: [be.get(srkern.cast(be.put(h), "float32"))], [want_up]))

    grads = [random_subnormal(n, "float32", rng, normal_frac=0.0) for n in (200000, 33)]
    want_p = R.grad_sumsq_partials(grads, 0.5)
    cases.append(("grad_norm partials", lambda be, g=grads: [norm_partials(be, g, 0.5)], [want_p]))
    return cases


def compare_workload(cases, results, what: str) -> None:
    # strict: a case that returned fewer buffers than the oracle (or a run that stopped early)
    # must fail, not compare the prefix
    for (name, _, want), got in zip(cases, results, strict=True):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_bits(a, b, what=f"{what}: {name} [{i}]")


def test_flush_denormal_changes_nothing(backend):
    # torch.set_flush_denormal(True) sets FTZ and DAZ in this thread's MXCSR (the calling thread,
    # which runs a share of every OpenMP loop and the code before it, such as the found_inf test).
    # AdamW, the reduce kernels, casts and grad_norm must give the same bits as without it.
    torch = pytest.importorskip("torch")
    cases = subnormal_workload()
    results = []
    try:
        if not torch.set_flush_denormal(True):
            pytest.skip("torch.set_flush_denormal is not supported on this CPU")
        # FTZ/DAZ really act on this thread: NumPy's FP32 multiply now flushes.
        assert np.float32(1e-39) * np.float32(0.5) == 0.0
        for _, run, _ in cases:
            results.append(run(backend))
    finally:
        torch.set_flush_denormal(False)
    assert np.float32(1e-39) * np.float32(0.5) != 0.0
    compare_workload(cases, results, f"[{backend.name}] under set_flush_denormal(True)")


# A helper in the same OpenMP runtime as srkern's kernels (g++ -fopenmp: libgomp), so that its
# parallel regions run on the very threads srkern's regions reuse: it turns flush-to-zero on or
# off in every thread of the team (the calling thread included), as a library that leaves FTZ set
# on its workers would, and counts the threads that have it.
FLUSH_HELPER = r"""
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
typedef unsigned reg;
static reg get_fp() { return _mm_getcsr(); }
static void set_fp(reg v) { _mm_setcsr(v); }
static const reg FLUSH = 0x8040u;  // MXCSR FTZ | DAZ
#elif defined(__aarch64__)
typedef unsigned long long reg;
static reg get_fp() { reg v; __asm__ __volatile__("mrs %0, fpcr" : "=r"(v)); return v; }
static void set_fp(reg v) { __asm__ __volatile__("msr fpcr, %0" : : "r"(v)); }
static const reg FLUSH = 1ull << 24;  // FPCR FZ
#else
#error "no flush-to-zero control known for this CPU"
#endif
extern "C" int srk_test_set_flush(int on) {
  int n = 0;
  #pragma omp parallel reduction(+ : n)
  { set_fp(on ? (get_fp() | FLUSH) : (get_fp() & ~FLUSH)); n = 1; }
  return n;
}
extern "C" int srk_test_count_flush() {
  int n = 0;
  #pragma omp parallel reduction(+ : n)
  { n = (get_fp() & FLUSH) == FLUSH; }
  return n;
}
extern "C" void srk_test_set_threads(int k) { omp_set_num_threads(k); }
extern "C" int srk_test_max_threads() { return omp_get_max_threads(); }
"""


def flush_helper(folder: Path):
    import ctypes
    cxx = _build.cxx_compiler()[0]
    lib = folder / "flush_helper.so"
    res = subprocess.run([cxx, "-O2", "-fopenmp", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(lib)],
                         input=FLUSH_HELPER, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build the flush-to-zero helper for this CPU: {res.stderr[-500:]}")
    return ctypes.CDLL(str(lib))


def test_flush_to_zero_in_openmp_worker_threads(backend, tmp_path):
    # Every thread of the OpenMP team (3 threads, so that workers run on any machine) has FTZ
    # and DAZ set before the kernels run, as if inherited: results are the oracle's bits, and
    # afterwards every thread still has its FTZ (the kernels restore each thread's state).
    if backend.name not in CPU_BACKENDS:
        pytest.skip("the host threads' FP state concerns the CPU backends only")
    helper = flush_helper(tmp_path)
    cases = subnormal_workload(202)
    threads = helper.srk_test_max_threads()
    helper.srk_test_set_threads(3)
    results = []
    try:
        assert helper.srk_test_set_flush(1) == 3 and helper.srk_test_count_flush() == 3
        for _, run, _ in cases:
            results.append(run(backend))
        assert helper.srk_test_count_flush() == 3, "a kernel did not restore a thread's FP state"
    finally:
        helper.srk_test_set_flush(0)
        helper.srk_test_set_threads(threads)
    assert helper.srk_test_count_flush() == 0
    compare_workload(cases, results, f"[{backend.name}] FTZ/DAZ on every OpenMP thread")


# ---- contract version -------------------------------------------------------------------------------


def test_contract_version_minor_compatible(backend):
    # v1.1 changes no random bit: checkpoints written under 1 or "1.1" load (same major version),
    # others are refused. (The backend changes nothing here; the check is the same everywhere.)
    from srkern import _contract
    assert srkern.CONTRACT_VERSION == "1.1"
    assert all(_contract.contract_compatible(v) for v in (1, "1", "1.0", "1.1"))
    assert not any(_contract.contract_compatible(v) for v in (2, "2.0", "x", None, True, 1.1))
