"""srkern.add_ on every backend: bit-exact against srkern.reference, the rounding it shares with
srkern.cast, specials, layouts, statistics (SR tracks the exact sum where RN stalls), bad input.

Tests taking ``backend`` run once per backend (tests/conftest.py): inputs go through
``backend.put`` (guarded, possibly misaligned copies), results come back through ``backend.get``.
"""
from __future__ import annotations

import functools
import importlib

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern import _build, _contract, reference
from srkern._tensor import View
from srkern.formats import FORMATS
from srkern.testing import assert_same_bits, bits_of, format_grid

from conftest import f32, mixed_input

SEED, STEP = 0x9E3779B97F4A7C15, 777
ACC = [pytest.param(FORMATS["bfloat16"], id="acc=bf16"), pytest.param(FORMATS["float16"], id="acc=f16")]
XDT = [pytest.param(n, id=f"x={s}") for n, s in (("float32", "f32"), ("bfloat16", "bf16"), ("float16", "f16"))]
ROUNDINGS = [pytest.param("stochastic", id="rounding=sr"), pytest.param("nearest", id="rounding=rn")]
NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# Offsets by name: 0; odd (a head partial unit); index crossing 2**32; unit index q = i / 8 (and
# the FP16 Philox block 2q) crossing 2**32, the counter's high word, inside the tensor.
OFFSETS = {"0": 0, "odd": 3, "2**32-5": 2 ** 32 - 5, "8*2**32-5": 8 * 2 ** 32 - 5}
ALPHAS = (1.0, -1.0, 0.5, -0.3, 3.0, 1e-3)
BIG = 2 ** 20 + 3


def inputs(n: int, acc_fmt, x_dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(acc, x): acc from mixed_input rounded into its format (NaN payloads, +-Inf, -0, subnormals,
    max); x a third each of mixed_input values of its own format, addends below an ulp of acc
    (where SR and RN differ) and addends of acc's own size."""
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"):
        acc = mixed_input(n, acc_fmt, seed).astype(acc_fmt.np_type)
        x_fmt = FORMATS.get(x_dtype, acc_fmt)
        a32 = acc.astype(np.float32)
        kinds = (mixed_input(n, x_fmt, seed + 1),
                 a32 * rng.uniform(-2 ** -6, 2 ** -6, n).astype(np.float32),
                 a32 * rng.standard_normal(n).astype(np.float32))
        pick = rng.integers(0, 3, n)
        x = np.choose(pick, kinds).astype(NP[x_dtype]) if n else np.zeros(0, NP[x_dtype])
    return acc, x


@functools.lru_cache(maxsize=None)
def _case(acc_name, x_dtype, rounding, n, offset, alpha):
    """Inputs and the oracle's result, computed once per case for every backend."""
    acc, x = inputs(n, FORMATS[acc_name], x_dtype, seed=n + offset % 1000)
    want = reference.add_(acc, x, alpha=alpha, rounding=rounding, seed=SEED, offset=offset, step=STEP)
    return acc, x, want


# The 2**20 + 3 cases (full units over many CPU tiles and threads, the counter's high word crossed
# inside the tensor): every acc, x dtype, rounding and offset once, not their product (their oracle
# dominates this file's time). The first two are test_grid_stride_loop_runs_past_its_first_iteration's.
BIG_CASES = (("bfloat16", "float32", "stochastic", "0", 1.0), ("float16", "float32", "stochastic", "0", 1.0),
             ("bfloat16", "bfloat16", "nearest", "8*2**32-5", -0.3), ("float16", "float16", "nearest", "8*2**32-5", 3.0))


def _cases() -> list:
    # Per acc format and rounding (what splits the tensor into units and draws) every small size
    # with every offset; the x dtype (how x is loaded) rotates over them, so each kernel
    # (acc x x x rounding) runs 8 of the 24 and every x dtype meets every size.
    out, k = [], 0

    def param(acc, xd, rnd, n, off, alpha):
        nid = "2**20+3" if n == BIG else n
        rid = "sr" if rnd == "stochastic" else "rn"
        return pytest.param(acc, xd, rnd, n, off, alpha, id=(
            f"acc={FORMATS[acc].short}-x={xd}-rounding={rid}-n={nid}-offset={off}-alpha={alpha}"))
    xds = ("float32", "bfloat16", "float16")
    for acc in ("bfloat16", "float16"):
        for rnd in ("stochastic", "nearest"):
            for p, (n, off) in enumerate((n, off) for n in (0, 1, 7, 8, 9, 1023) for off in OFFSETS):
                out.append(param(acc, xds[p % 3], rnd, n, off, ALPHAS[k % len(ALPHAS)]))
                k += 1
    out += [param(acc, xd, rnd, BIG, off, alpha) for acc, xd, rnd, off, alpha in BIG_CASES]
    return out


def _run(backend, acc, x, lead=(0, 0), **kw):
    a = backend.put(acc, lead=lead[0])
    res = srkern.add_(a, backend.put(x, lead=lead[1]), **kw)
    assert res is a
    return backend.get(a)


# ---- bit-exact against the reference -------------------------------------------------------------

@pytest.mark.parametrize("acc_name,x_dtype,rounding,n,off,alpha", _cases())
def test_bit_exact(backend, acc_name, x_dtype, rounding, n, off, alpha):
    # Every element, the full units (CPU tiles, GPU 16-byte units) and the partial ones at both
    # ends, against the NumPy oracle, with the specials mixed in (canonical NaN, Inf, -0, subnormal).
    offset = OFFSETS[off]
    acc, x, want = _case(acc_name, x_dtype, rounding, n, offset, alpha)
    got = _run(backend, acc, x, alpha=alpha, rounding=rounding, seed=SEED, offset=offset, step=STEP)
    assert_same_bits(got, want, what=f"add_ acc={acc_name} x={x_dtype} offset={offset} alpha={alpha}")


ALPHA_VALUES = [0.0, -0.0, 1.0, -1.0, 0.1, -7.25, 2.0 ** -126, -1e30, 3e38, 5]


# Every alpha with both acc formats; the x dtype (converted to FP32 before alpha multiplies it)
# rotates, so each x dtype meets 6 or 7 of the 20.
@pytest.mark.parametrize("acc_fmt,x_dtype,alpha", [
    pytest.param(FORMATS[acc], xd, alpha, id=f"acc={FORMATS[acc].short}-x={xd}-alpha={alpha}")
    for i, (acc, alpha) in enumerate((acc, a) for acc in ("bfloat16", "float16") for a in ALPHA_VALUES)
    for xd in [("float32", "bfloat16", "float16")[i % 3]]])
def test_alpha_values(backend, acc_fmt, x_dtype, alpha):
    # alpha is rounded to FP32 on the host (0.1 is not an FP32 value); +0 and -0 (-0 + -0 * x
    # keeps -0, -0 + 0 * x does not), the smallest normal FP32, overflow to Inf (alpha * x
    # beyond FP32), an int. Each alpha twice: the second call takes add_'s cache of alphas.
    acc, x = inputs(1023, acc_fmt, x_dtype, seed=42)
    for rounding in ("stochastic", "nearest", "stochastic"):
        want = reference.add_(acc, x, alpha=alpha, rounding=rounding, seed=SEED, offset=11, step=STEP)
        got = _run(backend, acc, x, alpha=alpha, rounding=rounding, seed=SEED, offset=11, step=STEP)
        assert_same_bits(got, want, what=f"alpha={alpha} {rounding}")


@pytest.mark.parametrize("acc_fmt", ACC)
@pytest.mark.parametrize("x_dtype", XDT)
def test_is_the_cast_of_the_fp32_sum(backend, acc_fmt, x_dtype):
    # Independent of the oracle's add_: the result is srkern.cast of the FP32 sum a + alpha * x
    # (two float32 operations) with stream "accum", offset and step, NaN made canonical.
    acc, x = inputs(4099, acc_fmt, x_dtype, seed=3)
    with np.errstate(all="ignore"):
        s = acc.astype(np.float32) + np.float32(-0.75) * x.astype(np.float32)
    for rounding in ("stochastic", "nearest"):
        cast = srkern.cast(s, acc_fmt.name, rounding=rounding, seed=SEED, offset=2 ** 33 + 1, step=9,
                           stream=srkern.STREAMS["accum"])
        got = _run(backend, acc, x, alpha=-0.75, rounding=rounding, seed=SEED, offset=2 ** 33 + 1, step=9)
        assert_same_bits(got, reference.canonical_nan(cast), s, f"add_ vs cast of the sum ({rounding})")


@pytest.mark.parametrize("acc_fmt", ACC)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_specials(backend, acc_fmt, rounding):
    # Contract v1.1 for arithmetic: every NaN sum is the canonical NaN (whatever payload and sign
    # went in, and Inf - Inf); Inf stays Inf; -0 + -0 = -0 and -0 + 0 = +0 (IEEE); subnormal acc
    # and addends are neither flushed nor lost; a finite sum past max overflows to Inf.
    canon = {"bfloat16": 0x7FC0, "float16": 0x7E00}[acc_fmt.name]
    top = acc_fmt.max
    tiny = acc_fmt.smallest_subnormal
    nan_bits = f32([0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFFFFFFF])
    cases = [  # (acc, x, expected result as float, or "nan")
        *[(v, 1.0, "nan") for v in nan_bits], *[(1.0, v, "nan") for v in nan_bits],
        (np.inf, -np.inf, "nan"), (-np.inf, np.inf, "nan"), (np.inf, 1.0, np.inf), (-np.inf, -5.0, -np.inf),
        (1.0, np.inf, np.inf), (-0.0, -0.0, -0.0), (-0.0, 0.0, 0.0), (0.0, -0.0, 0.0),
        (tiny, tiny, 2 * tiny), (-tiny, 0.0, -tiny), (3 * tiny, -tiny, 2 * tiny), (top, top, np.inf),
        (-top, -top, -np.inf), (top, 0.0, top),
    ]
    with np.errstate(all="ignore"):
        acc = np.array([c[0] for c in cases], dtype=np.float32).astype(acc_fmt.np_type)
        acc[:4] = nan_bits.astype(acc_fmt.np_type)  # NaN payloads of acc's own format
        x = np.array([c[1] for c in cases], dtype=np.float32)
    got = _run(backend, acc, x, rounding=rounding, seed=SEED)
    assert_same_bits(got, reference.add_(acc, x, rounding=rounding, seed=SEED), what="specials vs oracle")
    g = bits_of(got)
    for i, (_, _, want) in enumerate(cases):
        if want == "nan":
            assert g[i] == canon, (i, cases[i], hex(int(g[i])))
        else:
            w = bits_of(np.array([want], dtype=np.float32).astype(acc_fmt.np_type))[0]
            assert g[i] == w, (i, cases[i], hex(int(g[i])), hex(int(w)))


# ---- layouts --------------------------------------------------------------------------------------

def _seam_sizes() -> list[tuple[int, int]]:
    """(n, offset) around the CPU tile (ACCUM_TILE units of 8), the OpenMP threshold and the head
    and tail partial units."""
    par = _build.kernel_defines("srk_launch.h", "SRK_CPU_PAR_TILES")[0]
    tile = 32 * 8
    sizes = [tile - 8, tile - 1, tile, tile + 1, 2 * tile + 9, par * tile, par * tile + tile // 2 + 3]
    return [(n, off) for n in sizes for off in (0, 1, 7, 8 * 2 ** 32 - 17)]


@functools.lru_cache(maxsize=None)
def _seam_cases(acc_name: str, x_dtype: str) -> list:
    """(n, offset, lead, acc, x, oracle's result) per seam, computed once for every backend."""
    out = []
    for k, (n, off) in enumerate(_seam_sizes()):
        acc, x = inputs(n, FORMATS[acc_name], x_dtype, seed=k)
        lead = [(0, 0), (1, 0), (0, 3), (5, 1)][k % 4]
        out.append((n, off, lead, acc, x, reference.add_(acc, x, alpha=-0.5, seed=SEED, offset=off, step=1)))
    return out


@pytest.mark.parametrize("acc_fmt", ACC)
@pytest.mark.parametrize("x_dtype", XDT)
def test_seams_and_misaligned_views(backend, acc_fmt, x_dtype):
    # Tile and thread-count seams, and acc / x one element off 16-byte alignment (the GPU's
    # element-wise fallback of its wide accesses); acc starts as the complement of the expected
    # bits' inputs, so a lane no path writes cannot pass.
    for n, off, lead, acc, x, want in _seam_cases(acc_fmt.name, x_dtype):
        got = _run(backend, acc, x, lead=lead, alpha=-0.5, seed=SEED, offset=off, step=1)
        assert_same_bits(got, want, what=f"n={n} offset={off} lead={lead}")


@pytest.mark.parametrize("acc_fmt", ACC)
def test_pieces_with_offsets_equal_the_whole(backend, acc_fmt):
    # Contract: a slice added with its logical offset draws exactly the whole tensor's bits.
    acc, x = inputs(1000, acc_fmt, "float32", seed=4)
    whole = _run(backend, acc, x, seed=SEED, offset=10)
    a = backend.put(acc)
    xb = backend.put(x)
    for lo, hi in ((0, 13), (13, 500), (500, 1000)):
        srkern.add_(a[lo:hi], xb[lo:hi], seed=SEED, offset=10 + lo)
    assert_same_bits(backend.get(a), whole, what="pieces vs whole")


@pytest.mark.parametrize("acc_fmt", ACC)
def test_non_contiguous_x_and_nd_shapes(backend, acc_fmt):
    # x in any layout is read in C order (a copy first); N-d shapes index in C order.
    acc, x = inputs(1000, acc_fmt, "float32", seed=8)
    acc2 = acc.reshape(20, 50)
    xt = np.ascontiguousarray(x.reshape(50, 20).T)  # the values x.T will show
    want = reference.add_(acc2, xt, alpha=2.0, seed=SEED, offset=9)
    a = backend.put(acc2)
    srkern.add_(a, backend.put(x.reshape(50, 20)).T, alpha=2.0, seed=SEED, offset=9)
    assert_same_bits(backend.get(a), want, what="transposed x")
    a = backend.put(acc2)
    xs = backend.put(np.repeat(xt.reshape(-1), 2))[::2].reshape(20, 50)  # strided, not transposed
    srkern.add_(a, xs, alpha=2.0, seed=SEED, offset=9)
    assert_same_bits(backend.get(a), want, what="strided x")


def test_x_is_acc(backend):
    # x = acc itself: copied first, so every element reads its own value as it was: a * (1 + alpha).
    acc, _ = inputs(777, FORMATS["bfloat16"], "float32", seed=6)
    want = reference.add_(acc, acc.copy(), alpha=0.25, seed=SEED, offset=3)
    a = backend.put(acc)
    srkern.add_(a, a, alpha=0.25, seed=SEED, offset=3)
    assert_same_bits(backend.get(a), want, what="add_(a, a)")


# ---- seeds and draws --------------------------------------------------------------------------------

def test_seed_none_uses_manual_seed_and_failed_calls_draw_none():
    acc, x = inputs(4096, FORMATS["bfloat16"], "float32", seed=5)
    srkern.manual_seed(99)
    with pytest.raises(ValueError, match="step"):
        srkern.add_(acc.copy(), x, step=-1)  # fails before drawing: the next draw is still seed #1
    a = srkern.add_(acc.copy(), x)
    want = np.random.Generator(np.random.PCG64(99)).integers(0, 2 ** 64, 2, dtype=np.uint64)
    assert_same_bits(a, reference.add_(acc, x, seed=int(want[0])), what="seed=None draws the next seed")
    assert _contract.next_seed() == int(want[1])
    # nearest draws none: seed=None means 0 and leaves the generator alone
    srkern.manual_seed(99)
    srkern.add_(acc.copy(), x, rounding="nearest")
    assert _contract.next_seed() == int(want[0])


@pytest.mark.parametrize("acc_fmt", ACC)
def test_seed_step_offset_select_the_bits(backend, acc_fmt):
    # Each of seed (both words), step and offset enters the draw: 4096 sums that each round up
    # with p = 1/2 agree by chance with probability 2**-4096.
    grid = format_grid(acc_fmt)
    k = int(np.searchsorted(grid, 1.0))
    acc = np.full(4096, grid[k], dtype=np.float32).astype(acc_fmt.np_type)
    x = np.full(4096, (grid[k + 1] - grid[k]) / 2, dtype=np.float32)
    base = bits_of(_run(backend, acc, x, seed=1))
    for kw in ({"seed": 2}, {"seed": 1 + 2 ** 32}, {"seed": 1, "step": 1}, {"seed": 1, "offset": 8}):
        assert not np.array_equal(bits_of(_run(backend, acc, x, **kw)), base), kw
    cast = srkern.cast(np.full(4096, grid[k] + (grid[k + 1] - grid[k]) / 2, np.float32), acc_fmt.name, seed=1)
    assert not np.array_equal(bits_of(cast), base), "stream accum must not be the cast stream"


# ---- statistics: accumulating addends below half an ulp ----------------------------------------------

@pytest.mark.parametrize("acc_fmt", ACC)
@pytest.mark.parametrize("frac", [0.3, 1 / 8], ids=lambda f: f"addend={f:.3g}ulp")
def test_sr_tracks_the_exact_sum_where_rn_stalls(backend, acc_fmt, frac):
    # M elements start at 1.0 and receive the same addend d = frac * ulp (ulp of [1, 2), d below
    # half an ulp) N times, step k for the k-th add. RN: 1 + d rounds back to 1 every time (the
    # sum stalls at 1.0, N d short). SR: each add lands on the grid, at the same D = d / ulp
    # above acc, and rounds up with p = floor(D * 2^bits) / 2^bits (fresh draws: new step), so
    # acc_N = 1 + ulp * Binomial(N, p) per element (it stays in [1, 2): N ulp < 1), independent
    # over elements. The mean over M elements has sigma = ulp * sqrt(N p (1 - p) / M); it must lie
    # within 5 sigma of the exact sum 1 + N d (failure probability ~6e-7 under a correct kernel).
    # |1 + N p ulp - (1 + N d)| <= N 2^-bits ulp (the draw's resolution: <= 2^-10 ulp here) and
    # the FP32 sum's own rounding (<= 2^-24 of 1 per add) are far below sigma (~0.03 ulp).
    M, N = 1 << 14, 64
    grid = format_grid(acc_fmt)
    ulp = float(grid[np.searchsorted(grid, 1.0) + 1] - 1.0)
    d = np.float32(frac * ulp)
    bits = acc_fmt.draw_bits
    p = np.floor(float(d) / ulp * 2.0 ** bits) / 2.0 ** bits
    exact = 1.0 + N * float(d)
    for rounding in ("stochastic", "nearest"):
        a = backend.put(np.ones(M, dtype=acc_fmt.np_type))
        xd = backend.put(np.full(M, d, dtype=np.float32))
        for k in range(N):
            srkern.add_(a, xd, rounding=rounding, seed=SEED, step=k)
        got = backend.get(a).astype(np.float64)
        if rounding == "nearest":
            assert np.all(got == 1.0), "RN must stall: 1 + d rounds back to 1"
            assert exact - 1.0 > 5 * ulp * np.sqrt(N * p * (1 - p) / M), "the stall must be visible"
            continue
        units = (got - 1.0) / ulp
        assert np.all(units == np.round(units)) and units.min() >= 0 and units.max() <= N
        sigma = ulp * np.sqrt(N * p * (1 - p) / M)
        err = got.mean() - exact
        assert abs(err) <= 5 * sigma, f"SR mean - exact = {err:.3g}, 5 sigma = {5 * sigma:.3g}"


# ---- the GPU grid beyond one pass -------------------------------------------------------------------

def test_grid_stride_loop_runs_past_its_first_iteration(monkeypatch):
    # gpu-emu with one SM: 32 blocks x 256 threads = 8192 threads, fewer than the 131073 units of
    # 2**20 + 3 elements, so each thread's grid-stride loop takes several units.
    from srkern import _backend
    monkeypatch.setenv("SRKERN_BACKEND", "gpu-emu")
    monkeypatch.setenv("SRKERN_EMU_SMS", "1")
    assert _backend.grid_blocks(BIG // 8 + 2, _backend.emu_sms()) == 32
    for acc_name in ("bfloat16", "float16"):
        acc, x, want = _case(acc_name, "float32", "stochastic", BIG, 0, 1.0)
        got = acc.copy()
        srkern.add_(got, x, seed=SEED, step=STEP)
        assert_same_bits(got, want, what=f"gpu-emu, 1 SM, acc={acc_name}")


# ---- bad input: a clear error naming the argument, and nothing written --------------------------------

def _bad_calls() -> dict:
    ro = np.ones(16, ml_dtypes.bfloat16)
    ro.flags.writeable = False
    base = np.zeros(32, ml_dtypes.bfloat16)
    return {  # name: (acc or None for the default, x or None, kwargs, exception, text)
        "acc=float32": (np.ones(16, np.float32), None, {}, TypeError, "acc has dtype float32"),
        "acc=int16": (np.ones(16, np.int16), None, {}, TypeError, "acc has dtype int16"),
        "acc=list": ([1.0] * 16, None, {}, TypeError, "acc"),
        "acc=readonly": (ro, None, {}, ValueError, "acc is read-only"),
        "acc=strided": (np.ones(32, ml_dtypes.bfloat16)[::2], None, {}, ValueError, "acc must be C-contiguous"),
        "acc=byteswapped": (np.ones(16, np.float16).astype(">f2"), None, {}, ValueError, "acc cannot be written"),
        "x=float64": (None, np.ones(16), {}, TypeError, "x has dtype float64"),
        "x=int32": (None, np.ones(16, np.int32), {}, TypeError, "x has dtype int32"),
        "x=fp8": (None, np.ones(16, ml_dtypes.float8_e4m3fn), {}, TypeError, "x has dtype"),
        "x=shape": (None, np.ones(15, np.float32), {}, ValueError, "x has shape"),
        "x=shape2d": (None, np.ones((4, 4), np.float32), {}, ValueError, "x has shape"),
        "x=overlap": (base[:16], base[8:24], {}, ValueError, "x overlaps acc"),
        "x=other-dtype-view": (base[:16], base[:16].view(np.float16), {}, ValueError, "x overlaps acc"),
        "x=reversed": (base[:16], base[15::-1], {}, ValueError, "x overlaps acc"),
        "alpha=inf": (None, None, {"alpha": float("inf")}, ValueError, "alpha"),
        "alpha=nan": (None, None, {"alpha": float("nan")}, ValueError, "alpha"),
        "alpha=1e39": (None, None, {"alpha": 1e39}, ValueError, "alpha"),
        "alpha=subnormal": (None, None, {"alpha": 1e-40}, ValueError, "alpha"),
        "alpha=str": (None, None, {"alpha": "1"}, TypeError, "alpha"),
        "alpha=bool": (None, None, {"alpha": True}, TypeError, "alpha"),
        "alpha=None": (None, None, {"alpha": None}, TypeError, "alpha"),
        "rounding=up": (None, None, {"rounding": "up"}, ValueError, "rounding"),
        "rounding=int": (None, None, {"rounding": 1}, TypeError, "rounding"),
        "seed=-1": (None, None, {"seed": -1}, ValueError, "seed"),
        "seed=2**64": (None, None, {"seed": 2 ** 64}, ValueError, "seed"),
        "seed=float": (None, None, {"seed": 1.5}, TypeError, "seed"),
        "seed=nearest-bad": (None, None, {"seed": -1, "rounding": "nearest"}, ValueError, "seed"),
        "step=2**32": (None, None, {"step": 2 ** 32}, ValueError, "step"),
        "offset=-1": (None, None, {"offset": -1}, ValueError, "offset"),
        "offset=2**64-15": (None, None, {"offset": 2 ** 64 - 15}, ValueError, "offset"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()), ids=lambda s: f"bad={s}")
def test_bad_arguments_change_nothing(case):
    acc, x, kw, exc, text = _bad_calls()[case]
    acc = np.full(16, 3.0, ml_dtypes.bfloat16) if acc is None else acc
    x = np.full(16, 0.5, np.float32) if x is None else x
    before = None if isinstance(acc, list) else np.array(acc, copy=True)
    x_before = np.array(x, copy=True)
    with pytest.raises(exc, match=text):
        srkern.add_(acc, x, **{"seed": 1, **kw})
    if before is not None:
        assert_same_bits(acc, before, what="acc after a call that failed")
    assert_same_bits(x, x_before, what="x after a call that failed")


def test_x_on_another_device_is_refused(monkeypatch):
    # No GPU here: present x as a CUDA buffer by its View, as DLPack would; the device check must
    # refuse it before any kernel runs.
    mod = importlib.import_module("srkern.accum")
    acc = np.full(16, 3.0, ml_dtypes.bfloat16)
    x = np.ones(16, np.float32)
    real = mod.as_view

    def fake(obj, name="x"):
        v = real(obj, name)
        return View(v.obj, "cupy", v.ptr, v.shape, v.strides, v.dtype, "cuda", 0, False) if obj is x else v

    monkeypatch.setattr(mod, "as_view", fake)
    with pytest.raises(ValueError, match="x is on cuda:0, acc on cpu:0"):
        srkern.add_(acc, x, seed=1)
    assert (acc.astype(np.float32) == 3.0).all()


def test_torch_tensors():
    # torch in, torch out (acc itself); the version counter is bumped; a leaf that requires grad
    # is refused while grad mode is on and accepted under no_grad; JAX acc is refused.
    torch = pytest.importorskip("torch")
    acc0, x0 = inputs(1000, FORMATS["bfloat16"], "float32", seed=12)
    acc = torch.from_numpy(acc0.view(np.int16).copy()).view(torch.bfloat16)
    x = torch.from_numpy(x0)
    v = acc._version
    assert srkern.add_(acc, x, alpha=-2.0, seed=SEED, step=3) is acc
    assert acc._version > v
    assert_same_bits(acc, reference.add_(acc0, x0, alpha=-2.0, seed=SEED, step=3), what="torch")
    leaf = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="acc requires grad"):
        srkern.add_(leaf, torch.ones(8), seed=1)
    assert not leaf.detach().any()
    with torch.no_grad():
        srkern.add_(leaf, torch.ones(8), seed=1)
    assert (leaf.detach() == 1).all()


def test_jax_acc_refused():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="acc: JAX arrays are immutable"):
        srkern.add_(jnp.zeros(16, dtype=jnp.bfloat16), np.ones(16, np.float32), seed=1)
