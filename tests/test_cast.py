"""srkern.cast on every backend: bit-exact against srkern.reference, properties, statistics, bad input.

Layers (DESIGN.md section 6): the compiled kernel equals the NumPy oracle bit for bit on every
format, rounding, saturate flag, size and offset; results are one of the two grid neighbours and
representable values pass unchanged; specials behave as contract v1 says; SR is unbiased within
stated binomial bounds; bad calls raise an error naming the argument and write nothing.

Non-contiguous inputs are handled, not refused: they are copied to C order first, and the
logical index of an element is ``offset`` plus its C-order position (tested below).

Tests taking ``backend`` run once per backend (tests/conftest.py): inputs go through
``backend.put`` (guarded, possibly misaligned copies), results come back through ``backend.get``.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern import _contract, reference
from srkern._tensor import View
from srkern.formats import FORMATS, Format
from srkern.testing import all_patterns, assert_same_bits, bits_of, first_difference, format_grid, mismatch_report

from conftest import child_env, f32, fmt_params, mixed_input

ROUNDINGS = [pytest.param("stochastic", id="rounding=sr"), pytest.param("nearest", id="rounding=rn")]
SATURATE = [pytest.param(False, id="sat=0"), pytest.param(True, id="sat=1")]
SEED, STEP, STREAM = 0x9E3779B97F4A7C15, 12345, 3


def offset_value(label: str, fmt: Format) -> int:
    """Logical offsets by name: 0; odd (not block aligned); index crossing 2**32; block index q
    crossing 2**32 (the counter's high word) inside the tensor."""
    return {"0": 0, "odd": 3, "2**32-5": 2 ** 32 - 5, "G*2**32-5": fmt.block * 2 ** 32 - 5}[label]


def _cases() -> list:
    cases = []
    for f in FORMATS.values():
        for rnd in ("stochastic", "nearest"):
            for sat in (False, True):
                sizes = [(n, off) for n in (0, 1, 7, 8, 9, 1023) for off in ("0", "odd", "2**32-5", "G*2**32-5")]
                sizes += [(2 ** 20 + 3, "0"), (2 ** 20 + 3, "G*2**32-5")]
                for n, off in sizes:
                    rid = "sr" if rnd == "stochastic" else "rn"
                    nid = "2**20+3" if n == 2 ** 20 + 3 else n
                    cases.append(pytest.param(f, rnd, sat, n, off,
                                              id=f"dtype={f.short}-rounding={rid}-sat={int(sat)}-n={nid}-offset={off}"))
    return cases


def ref(x, fmt: Format, rounding: str = "stochastic", **kw) -> np.ndarray:
    """The oracle's result for ``x`` (float32, any layout: C order is the logical order), shaped like x."""
    kw.setdefault("seed", SEED)
    x = np.asarray(x, dtype=np.float32)
    return reference.round_float32(x, fmt.name, rounding, **kw).reshape(x.shape)


# ---- bit-exact against the reference -------------------------------------------------------------

@pytest.mark.parametrize("fmt,rounding,saturate,n,off", _cases())
def test_bit_exact(backend, fmt, rounding, saturate, n, off):
    # Every element, every lane of the partial and full blocks, against the NumPy oracle.
    offset = offset_value(off, fmt)
    x = mixed_input(n, fmt, seed=n)
    kw = dict(rounding=rounding, seed=SEED, offset=offset, step=STEP, stream=STREAM, saturate=saturate)
    got = backend.get(srkern.cast(backend.put(x), fmt.name, **kw))
    assert got.dtype == np.dtype(fmt.np_type) and got.shape == x.shape
    want = ref(x, fmt, rounding, offset=offset, step=STEP, stream=STREAM, saturate=saturate)
    assert_same_bits(got, want, x, f"cast to {fmt.name} offset={offset}")
    # Once more into out= prefilled with a pattern no result has: a lane the kernel fails to
    # write cannot pass by holding the right bits from an earlier allocation.
    out = backend.put(_sentinel_out(n, fmt.np_type))
    srkern.cast(backend.put(x), fmt.name, out=out, **kw)
    assert_same_bits(backend.get(out), want, x, f"cast to {fmt.name} offset={offset} out=")


_CHILD = r"""
import json, sys
import numpy as np
import srkern
cases, cuda = json.loads(sys.argv[1]), sys.argv[3] == "cuda"
out = {}
for case in cases:
    print(case["id"], flush=True)  # the parent names the last case started if this process dies
    x = np.load(case["x"])
    if cuda:
        import torch
        x = torch.from_numpy(x).cuda()
    y = srkern.cast(x, case["fmt"], rounding=case["rounding"], seed=case["seed"], offset=case["offset"])
    if cuda:
        y = y.cpu().view(torch.int16 if y.element_size() == 2 else torch.uint8).numpy()
    out[case["id"]] = np.asarray(y).view(np.uint16 if y.itemsize == 2 else np.uint8)
np.savez(sys.argv[2], **out)
"""


@pytest.mark.parametrize("fmt", fmt_params())
def test_bit_exact_offsets_near_2_64(backend, fmt, tmp_path):
    # Offsets up to the last legal one (offset + n == 2**64). Run in a child process, so a kernel
    # that writes out of bounds fails this test instead of killing the whole session.
    cases = []
    for n in (1, 7, 9, 1023):
        x = mixed_input(n, fmt, seed=n)
        np.save(tmp_path / f"x{n}.npy", x)
        for k in (0, 3, fmt.block + 1):  # k = 0: ends exactly at 2**64; k = G + 1: no wrap
            for rnd in ("stochastic", "nearest"):
                cases.append({"id": f"n={n}-offset=2**64-n-{k}-{rnd}", "x": str(tmp_path / f"x{n}.npy"),
                              "fmt": fmt.name, "rounding": rnd, "seed": SEED, "offset": 2 ** 64 - n - k})
    env = dict(child_env(), SRKERN_BACKEND=backend.name if backend.device == "cpu" else "cpu")
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases), str(tmp_path / "y.npz"), backend.name],
                         capture_output=True, text=True, timeout=300, env=env)
    if res.returncode != 0:
        started = res.stdout.split()
        pytest.fail(f"child died with return code {res.returncode} in case "
                    f"{started[-1] if started else '?'}\n{res.stderr[-2000:]}", pytrace=False)
    got = np.load(tmp_path / "y.npz")
    failures = []
    for c in cases:
        x = np.load(c["x"])
        rec = first_difference(got[c["id"]], bits_of(ref(x, fmt, c["rounding"], offset=c["offset"])))
        if not rec["ok"]:
            failures.append(mismatch_report(rec, c["id"], x, fmt.itemsize))
    assert not failures, f"{len(failures)} of {len(cases)} cases differ from the reference:\n" + "\n".join(failures)


# ---- layouts: slices, unaligned pointers, non-contiguous and N-d inputs ----------------------------

@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("start", [1, 3, 5], ids=lambda s: f"start={s}")
def test_slices(backend, fmt, start):
    # A slice at an odd element offset: input and out= pointers are not 16-byte aligned (the
    # GPU's scalar fallback of its vector accesses).
    n = 1023
    host = mixed_input(n + 8, fmt, seed=start)
    x = backend.put(host)[start:start + n]
    want = ref(host[start:start + n], fmt, offset=77)
    assert_same_bits(backend.get(srkern.cast(x, fmt.name, seed=SEED, offset=77)), want, host[start:start + n], "slice")
    sentinel = _sentinel_out(n + 8, fmt.np_type)
    out_base = backend.put(sentinel)
    out = out_base[start:start + n]
    res = srkern.cast(x, fmt.name, seed=SEED, offset=77, out=out)
    assert res is out
    assert_same_bits(backend.get(out), want, host[start:start + n], "slice out=")
    # nothing outside the slice was written
    outside = np.ones(n + 8, dtype=bool)
    outside[start:start + n] = False
    assert_same_bits(bits_of(backend.get(out_base))[outside], bits_of(sentinel)[outside], what="outside the slice")


@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("byte_shift", [1, 2], ids=lambda s: f"byte_shift={s}")
def test_pointer_not_element_aligned(backend, fmt, byte_shift):
    # Input whose address is not a multiple of 4 bytes (NumPy allows such views; on a GPU no
    # framework makes them, so the cuda backend has nothing to test).
    if backend.device != "cpu":
        pytest.skip("no GPU framework makes tensors that are not element-aligned")
    n = 257
    buf = np.zeros(4 * n + 8, dtype=np.uint8)
    x = buf[byte_shift:byte_shift + 4 * n].view(np.float32)
    assert not x.flags.aligned
    x[:] = mixed_input(n, fmt, seed=11)
    want = ref(x, fmt)
    # Copied to an aligned buffer first: a kernel never reads a float at an odd address.
    assert_same_bits(srkern.cast(x, fmt.name, seed=SEED), want, x, f"input at +{byte_shift} bytes")
    if fmt.nbits == 16:  # an out= that is not element-aligned is refused, nothing written
        obuf = np.full(2 * n + 8, 0xA5, dtype=np.uint8)
        out = obuf[1:1 + 2 * n].view(fmt.np_type)
        with pytest.raises(ValueError, match="aligned to its element size"):
            srkern.cast(x, fmt.name, seed=SEED, out=out)
        assert (obuf == 0xA5).all()


@pytest.mark.parametrize("fmt", fmt_params())
def test_torch_slices(fmt):
    torch = pytest.importorskip("torch")
    n = 1023
    base = torch.from_numpy(mixed_input(n + 8, fmt, seed=2))
    for start in (1, 3):
        x = base[start:start + n]
        want = ref(x.numpy(), fmt, offset=5)
        got = srkern.cast(x, fmt.name, seed=SEED, offset=5)
        assert isinstance(got, torch.Tensor) and got.dtype == getattr(torch, fmt.name)
        assert_same_bits(got, want, x.numpy(), f"torch slice start={start}")
        out_base = torch.zeros(n + 8, dtype=getattr(torch, fmt.name))
        out = out_base[start:start + n]
        assert srkern.cast(x, fmt.name, seed=SEED, offset=5, out=out) is out
        assert_same_bits(out, want, x.numpy(), f"torch slice out= start={start}")
        assert not bits_of(out_base[:start]).any() and not bits_of(out_base[start + n:]).any()


@pytest.mark.parametrize("fmt", fmt_params())
def test_slice_with_offset_equals_whole(backend, fmt):
    # Contract v1: casting a piece with its logical offset draws exactly the whole tensor's bits.
    host = mixed_input(1000, fmt, seed=4)
    x = backend.put(host)
    whole = backend.get(srkern.cast(x, fmt.name, seed=SEED, offset=10))
    for a, b in ((0, 13), (13, 500), (500, 1000)):
        piece = backend.get(srkern.cast(x[a:b], fmt.name, seed=SEED, offset=10 + a))
        assert_same_bits(piece, whole[a:b], host[a:b], f"piece {a}:{b}")


NONCONTIG = {
    "step2": lambda a: a[::2],
    "transpose": lambda a: a.reshape(20, 50).T,
    "cols": lambda a: a.reshape(20, 50)[:, 1::3],
    "reversed": lambda a: a[::-1],
}


@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("layout", list(NONCONTIG), ids=lambda s: f"layout={s}")
def test_non_contiguous(backend, fmt, layout):
    # Documented: non-contiguous inputs are copied to C order; logical index = C-order position.
    if layout == "reversed" and backend.device != "cpu":
        pytest.skip("torch has no negative strides")
    host = NONCONTIG[layout](mixed_input(1000, fmt, seed=8))
    x = NONCONTIG[layout](backend.put(mixed_input(1000, fmt, seed=8)))
    assert not host.flags.c_contiguous
    got = srkern.cast(x, fmt.name, seed=SEED, offset=9)
    assert tuple(got.shape) == host.shape
    assert_same_bits(backend.get(got), ref(np.ascontiguousarray(host), fmt, offset=9), host, f"layout {layout}")


@pytest.mark.parametrize("fmt", fmt_params())
def test_non_contiguous_torch(fmt):
    torch = pytest.importorskip("torch")
    base = torch.from_numpy(mixed_input(1000, fmt, seed=8)).reshape(20, 50)
    for x in (base.t(), base[:, 1::3], base[::2]):
        got = srkern.cast(x, fmt.name, seed=SEED)
        assert got.shape == x.shape
        assert_same_bits(got, ref(x.contiguous().numpy(), fmt), x.contiguous().numpy(), "torch non-contiguous")
    # an upcast of a non-contiguous 16/8-bit tensor too
    low = srkern.cast(base, fmt.name, seed=SEED).t()
    up = srkern.cast(low, "float32")
    assert_same_bits(up, low.contiguous().float(), what="non-contiguous upcast", nan="any")


@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (1, 1), (17, 9), (2, 3, 4)],
                         ids=lambda s: "shape=" + "x".join(map(str, s)))
def test_nd_shapes(backend, fmt, shape):
    n = int(np.prod(shape))
    x = mixed_input(n, fmt, seed=n).reshape(shape)
    for rounding in ("stochastic", "nearest"):
        got = backend.get(srkern.cast(backend.put(x), fmt.name, rounding=rounding, seed=SEED))
        assert got.shape == shape
        assert_same_bits(got, ref(x, fmt, rounding), x, f"shape {shape}")


# ---- dtype spellings, mixed formats, seeds --------------------------------------------------------

def test_dtype_spellings():
    torch = pytest.importorskip("torch")
    x = mixed_input(100, FORMATS["bfloat16"], seed=1)
    want = srkern.cast(x, "bfloat16", seed=SEED)
    for spelling in ("bf16", "BFloat16", torch.bfloat16, ml_dtypes.bfloat16, np.dtype(ml_dtypes.bfloat16)):
        assert_same_bits(srkern.cast(x, spelling, seed=SEED), want, x, f"dtype={spelling!r}")
    for spelling in (np.float16, torch.float16, "half"):
        assert srkern.cast(x, spelling, seed=SEED).dtype == np.float16
    assert srkern.cast(x, torch.float8_e4m3fn, seed=SEED).dtype == np.dtype(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("src", fmt_params())
@pytest.mark.parametrize("dst", [pytest.param(f, id=f"to={f.short}") for f in FORMATS.values()])
def test_between_low_precision_formats(backend, src, dst):
    # A 16/8-bit input rounds to another format through its exact FP32 value.
    with np.errstate(over="ignore", invalid="ignore"):
        x = mixed_input(999, src, seed=3).astype(src.np_type)
    got = backend.get(srkern.cast(backend.put(x), dst.name, seed=SEED, offset=1))
    assert_same_bits(got, ref(x.astype(np.float32), dst, offset=1), x.astype(np.float32), f"{src.name}->{dst.name}")


def test_seed_none_uses_manual_seed():
    x = mixed_input(4096, FORMATS["bfloat16"], seed=5)
    srkern.manual_seed(1234)
    a, b = srkern.cast(x, "bfloat16"), srkern.cast(x, "bfloat16")
    srkern.manual_seed(1234)
    a2 = srkern.cast(x, "bfloat16")
    assert_same_bits(a2, a, x, "manual_seed must make seed=None reproducible")
    assert not np.array_equal(bits_of(a), bits_of(b)), "successive seed=None calls must draw new seeds"
    # The seeds themselves are pinned: manual_seed(n) gives the uint64 draws of NumPy's
    # Generator(PCG64(n)) over [0, 2**64), so a run seeded this way repeats across versions.
    srkern.manual_seed(1234)
    want = np.random.Generator(np.random.PCG64(1234)).integers(0, 2 ** 64, 5, dtype=np.uint64)
    assert_same_bits(srkern.cast(x, "bfloat16"), srkern.cast(x, "bfloat16", seed=int(want[0])), x,
                     "seed=None draws the generator's next seed")
    assert [_contract.next_seed() for _ in range(4)] == [int(s) for s in want[1:]]


@pytest.mark.parametrize("fmt", fmt_params())
def test_seed_step_stream_select_the_bits(backend, fmt):
    # Each of seed, step and stream enters the draw (an ignored word would make two results equal;
    # with 4096 values that each round up with p = 1/2, that happens by chance with p = 2**-4096).
    grid = format_grid(fmt)
    k = int(np.searchsorted(grid, 1.0))
    x = backend.put(np.full(4096, (grid[k] + grid[k + 1]) / 2, dtype=np.float32))  # rounds up with p = 1/2
    base = bits_of(backend.get(srkern.cast(x, fmt.name, seed=1)))
    for kw in ({"seed": 2}, {"seed": 1 + 2 ** 32}, {"seed": 1, "step": 1}, {"seed": 1, "stream": 1}):
        assert not np.array_equal(bits_of(backend.get(srkern.cast(x, fmt.name, **kw))), base), kw


# ---- properties ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", fmt_params())
def test_sr_result_is_a_neighbour(backend, fmt):
    # Independent of the oracle: the grid is every finite value of the format (ml_dtypes), and
    # each SR result must be the value just below or just above |x| on it.
    grid = format_grid(fmt)
    rng = np.random.default_rng(6)
    n = 1 << 16
    e = rng.uniform(np.log2(fmt.smallest_subnormal) - 1, np.log2(fmt.max), n)
    x = (np.where(rng.integers(0, 2, n) == 1, -1, 1) * np.exp2(e)).astype(np.float32)
    x = x[np.abs(x) <= fmt.max]
    y = backend.get(srkern.cast(backend.put(x), fmt.name, seed=SEED)).astype(np.float64)
    a = np.abs(x.astype(np.float64))
    k = np.searchsorted(grid, a, side="right") - 1
    lo, hi = grid[k], grid[np.minimum(k + 1, grid.size - 1)]
    ok = (np.abs(y) == lo) | (np.abs(y) == hi)
    ok &= (np.signbit(y) == np.signbit(x)) | (y == 0)
    bad = np.nonzero(~ok)[0]
    assert bad.size == 0, [(float(x[i]), float(y[i]), lo[i], hi[i]) for i in bad[:5]]
    assert np.any(np.abs(y) == hi) and np.any((np.abs(y) == lo) & (lo != hi)), "both neighbours should occur"


@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("saturate", SATURATE)
def test_representable_values_pass_unchanged(backend, fmt, rounding, saturate):
    # Every finite value of the format (both zeros, all subnormals, max) comes back bit for bit.
    pats = all_patterns(fmt)
    vals = pats[np.isfinite(pats.astype(np.float32))]
    got = backend.get(srkern.cast(backend.put(vals.astype(np.float32)), fmt.name, rounding=rounding,
                                  seed=SEED, saturate=saturate))
    assert_same_bits(got, vals, vals.astype(np.float32), "representable values")


def _pattern(fmt: Format, value: float) -> int:
    return int(bits_of(np.array([value], dtype=np.float32).astype(fmt.np_type))[0])


@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_edge_values(backend, fmt, rounding):
    sign_bit = 1 << (fmt.nbits - 1)
    max_p = _pattern(fmt, fmt.max)
    inf_p = _pattern(fmt, np.inf) if fmt.has_inf else None

    def cast1(v, saturate=False):
        x = backend.put(np.array([v], dtype=np.float32))
        return int(bits_of(backend.get(srkern.cast(x, fmt.name, rounding=rounding, seed=SEED,
                                                   saturate=saturate)))[0])

    def is_nan(p):
        return bool(np.isnan(np.array([p], dtype=fmt.uint).view(fmt.np_type).astype(np.float32))[0])

    # zeros keep their sign
    assert cast1(0.0) == 0 and cast1(-0.0) == sign_bit
    # largest finite passes; so does it with saturate
    for sat in (False, True):
        assert cast1(fmt.max, sat) == max_p and cast1(-fmt.max, sat) == max_p | sign_bit
    # infinities: kept where the format has them; e4m3fn has none: NaN, or max with saturate
    for s in (1.0, -1.0):
        sb = sign_bit if s < 0 else 0
        if fmt.has_inf:
            assert cast1(s * np.inf) == inf_p | sb
        else:
            p = cast1(s * np.inf)
            assert is_nan(p) and (p & sign_bit) == sb
        assert cast1(s * np.inf, True) == (inf_p | sb if fmt.has_inf else max_p | sb)
    # NaN payloads and signs: NaN out with the input's sign (BF16: quiet top payload bits)
    for u in (0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF, 0xFFBFFFFF):
        for sat in (False, True):
            p = cast1(f32([u])[0], sat)
            assert is_nan(p), hex(u)
            assert bool(p & sign_bit) == bool(u >> 31), hex(u)
            if fmt.short == "bf16":
                assert p == (u >> 16) | 0x0040, (hex(u), hex(p))
    # just above the largest finite value (one float32 ulp): RN keeps max; SR gives max or
    # overflow; saturate always max
    above = np.nextafter(np.float32(fmt.max), np.float32(np.inf))
    over_p = inf_p if fmt.has_inf else None
    p = cast1(above)
    if rounding == "nearest":
        assert p == max_p
    else:
        assert p == max_p or (p == over_p if fmt.has_inf else is_nan(p))
    assert cast1(above, True) == max_p and cast1(-above, True) == max_p | sign_bit
    # clear overflow (past max + half a quantum for RN, past the next grid point for SR)
    big = min(2 * fmt.max, float(np.finfo(np.float32).max))
    for s in (1.0, -1.0):
        sb = sign_bit if s < 0 else 0
        p = cast1(s * big)
        if fmt.short == "bf16" and rounding == "stochastic":
            # float32 max is below BF16's next grid point (2**128): SR overflows with p = 1 - 2**-16
            assert p in (inf_p | sb, max_p | sb)
        elif fmt.has_inf:
            assert p == inf_p | sb
        else:  # e4m3fn overflow -> NaN
            assert is_nan(p)
        assert cast1(s * big, True) == max_p | sb
    # subnormals of the format
    tiny = fmt.smallest_subnormal
    assert cast1(tiny) == 1 and cast1(-tiny) == sign_bit | 1
    assert cast1(3 * tiny) == 3
    if rounding == "nearest":
        assert cast1(tiny / 2) == 0  # tie to even (zero)
        assert cast1(-tiny / 2) == sign_bit
        assert cast1(0.75 * tiny) == 1 and cast1(2.5 * tiny) == 2 and cast1(3.5 * tiny) == 4
    else:
        assert cast1(tiny / 2) in (0, 1) and cast1(2.5 * tiny) in (2, 3)


# ---- statistics ------------------------------------------------------------------------------------

def _stat_values(fmt: Format) -> list[tuple[float, float, float]]:
    """(x, T, U) triples: x strictly between neighbours T < U, over several binades including
    subnormals, the lowest normal binade, 1.0 and the top binade (U = largest finite)."""
    grid = format_grid(fmt)
    tiny = fmt.smallest_subnormal
    normal_min = float(ml_dtypes.finfo(fmt.np_type).smallest_normal)
    starts = [tiny * 3, normal_min, 1.0, fmt.max / 64, grid[-2]]
    out = []
    for t in starts:
        k = int(np.searchsorted(grid, t))
        lo, hi = grid[k], grid[k + 1]
        for d in (1 / 64, 0.25, 0.5, 0.7, 63 / 64):
            for s in (1.0, -1.0):
                x = np.float32(s * (lo + d * (hi - lo)))
                out.append((float(x), s * lo, s * hi))
    return out


@pytest.mark.parametrize("fmt", fmt_params())
def test_sr_is_unbiased(backend, fmt):
    # The mean of N SR casts of one value (N distinct indices, hence N independent draws) is
    # within 5 binomial standard errors of the value: |mean - x| <= 5 * (U - T) * sqrt(p(1-p)/N).
    # Under a correct kernel each check fails with probability ~6e-7; 50 values per format.
    n = 1 << 14
    triples = _stat_values(fmt)
    x = np.repeat(np.array([t[0] for t in triples], dtype=np.float32), n)
    y = backend.get(srkern.cast(backend.put(x), fmt.name, seed=SEED)).astype(np.float64).reshape(len(triples), n)
    report = []
    for i, (v, lo, hi) in enumerate(triples):
        gap = hi - lo
        d = (v - lo) / gap  # exact in float64
        p = np.floor(d * 2.0 ** fmt.draw_bits) / 2.0 ** fmt.draw_bits  # P(round away from zero)
        assert set(np.unique(y[i])) <= {lo, hi}
        se = abs(gap) * np.sqrt(p * (1 - p) / n)
        err = y[i].mean() - v
        if abs(err) > 5 * se:
            report.append(f"x={v!r}: mean-x={err:.3g}, 5 SE={5 * se:.3g} (p={p})")
    assert not report, "\n".join(report)


# Chi-square critical values at alpha = 1e-6: scipy.stats.chi2.isf(1e-6, df).
CHI2_CRIT = {128: 218.906, 256: 378.288, 2048: 2366.741}


def _chi2(up: np.ndarray, m: int, p: np.ndarray) -> float:
    """Sum over cells of (count - m p)^2 / (m p (1 - p)); ``up`` is (values, cells), p per value."""
    return float((((up - m * p[:, None]) ** 2) / (m * p * (1 - p))[:, None]).sum())


@pytest.mark.parametrize("fmt", fmt_params())
def test_round_up_frequencies_chi_square(backend, fmt):
    # 32 values with random distances D from their lower neighbour, each cast N = 4096 times at
    # consecutive indices. Under contract v1 every round-up count below is binomial, and the sum
    # of squared standardised counts is ~chi-square(df); reject at p < 1e-6 (critical values
    # above). Two groupings:
    #  * cells (value, lane = index % G), df = 32 G: a lane with a biased or wrong draw shows;
    #  * cells (value, run of 64 consecutive indices), df = 32 * 64: draws shared or correlated
    #    between lanes of one Philox block inflate the spread of these sums (by up to G times).
    rng = np.random.default_rng(21)
    grid = format_grid(fmt)
    grid = grid[(grid > 0) & (grid < fmt.max)]
    k_vals, n, run = 32, 4096, 64
    k = rng.integers(0, grid.size - 1, k_vals)
    lo, hi = grid[k], grid[k + 1]
    x = (lo + rng.uniform(0.02, 0.98, k_vals) * (hi - lo)).astype(np.float32)
    d = (x.astype(np.float64) - lo) / (hi - lo)
    p = np.floor(d * 2.0 ** fmt.draw_bits) / 2.0 ** fmt.draw_bits
    y = backend.get(srkern.cast(backend.put(np.repeat(x, n)), fmt.name, seed=SEED)).astype(np.float64).reshape(k_vals, n)
    up = y == hi[:, None]
    assert np.all(up | (y == lo[:, None]))
    by_lane = up.reshape(k_vals, n // fmt.block, fmt.block).sum(axis=1)
    stat = _chi2(by_lane, n // fmt.block, p)
    df = k_vals * fmt.block
    assert stat < CHI2_CRIT[df], f"by lane: chi-square {stat:.1f} >= {CHI2_CRIT[df]} (df={df}, alpha=1e-6)"
    by_run = up.reshape(k_vals, n // run, run).sum(axis=2)
    stat = _chi2(by_run, run, p)
    df = k_vals * (n // run)
    assert stat < CHI2_CRIT[df], f"by run: chi-square {stat:.1f} >= {CHI2_CRIT[df]} (df={df}, alpha=1e-6)"


# ---- exact upcasts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", fmt_params())
def test_upcast_all_patterns(backend, fmt):
    # Every 16/8-bit pattern widens exactly, as ml_dtypes' astype(float32); NaN -> NaN with its sign.
    x = all_patterns(fmt)
    got = backend.get(srkern.cast(backend.put(x), "float32"))
    assert_same_bits(got, x.astype(np.float32), what=f"{fmt.name} -> float32", nan="sign")


@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("n", [1, 7, 15, 17, 1000, 4099], ids=lambda s: f"n={s}")
@pytest.mark.parametrize("lead", [(0, 0), (1, 0), (0, 3), (5, 1)], ids=lambda s: f"lead={s[0]},{s[1]}")
def test_upcast_sizes_and_misaligned_views(backend, fmt, n, lead):
    # The GPU upcast moves 16 bytes per thread: its tail (n % 8 or n % 16 elements) and its
    # element-wise fallback for views that are not 16-byte aligned (input `lead`, out= `lead`
    # elements past an aligned start) must give the same bits as the aligned vector body.
    x = all_patterns(fmt)[np.random.default_rng(n).integers(0, 2 ** fmt.nbits, n)]
    want = x.astype(np.float32)
    got = backend.get(srkern.cast(backend.put(x, lead=lead[0]), "float32"))
    assert_same_bits(got, want, what=f"{fmt.name} -> float32 n={n}", nan="sign")
    out = backend.put(np.full(n, np.float32(-7.0)), lead=lead[1])
    assert srkern.cast(backend.put(x, lead=lead[0]), "float32", out=out) is out
    assert_same_bits(backend.get(out), want, what=f"{fmt.name} -> float32 n={n} out=", nan="sign")


# ---- bad input: a clear error naming the argument, and no buffer changed ---------------------------

def _sentinel_out(n: int = 16, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    return np.full(n, 0xA5, dtype=np.uint8).repeat(np.dtype(dtype).itemsize).view(dtype).copy()


BAD_CALLS = {
    "dtype=unknown": (dict(dtype="float7"), ValueError, "dtype"),
    "dtype=int8": (dict(dtype=np.int8), ValueError, "dtype"),
    "rounding=up": (dict(rounding="up"), ValueError, "rounding"),
    "seed=2**64": (dict(seed=2 ** 64), ValueError, "seed"),
    "seed=-1": (dict(seed=-1), ValueError, "seed"),
    "seed=float": (dict(seed=1.5), TypeError, "seed"),
    "step=2**32": (dict(step=2 ** 32), ValueError, "step"),
    "step=-1": (dict(step=-1), ValueError, "step"),
    "stream=2**32": (dict(stream=2 ** 32), ValueError, "stream"),
    "offset=2**64-15": (dict(offset=2 ** 64 - 15), ValueError, "offset"),
    "offset=-1": (dict(offset=-1), ValueError, "offset"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=lambda s: f"bad={s}")
def test_bad_arguments(backend, case):
    kw, exc, word = BAD_CALLS[case]
    x = backend.put(np.arange(16, dtype=np.float32))
    out = backend.put(_sentinel_out())
    before = backend.get(out)
    kw = {"dtype": "bfloat16", **kw}
    with pytest.raises(exc, match=word):
        srkern.cast(x, kw.pop("dtype"), out=out, **kw)
    assert_same_bits(backend.get(out), before, what="out= after a call that failed")
    assert_same_bits(backend.get(x), np.arange(16, dtype=np.float32), what="x after a call that failed")


@pytest.mark.parametrize("offset", [2 ** 64, 2 ** 64 + 5], ids=lambda o: f"offset={o}")
def test_offset_bound_for_empty_tensors(backend, offset):
    # The same bound on every backend: offset + n <= 2**64 and offset < 2**64, also when n == 0
    # (a uint64 kernel argument cannot hold 2**64; the CUDA launch would raise OverflowError).
    with pytest.raises(ValueError, match="offset"):
        srkern.cast(backend.put(np.zeros(0, np.float32)), "bfloat16", seed=1, offset=offset)
    empty = backend.get(srkern.cast(backend.put(np.zeros(0, np.float32)), "bfloat16", seed=1, offset=2 ** 64 - 1))
    assert empty.size == 0


def test_non_float_input():
    out = _sentinel_out()
    before = out.copy()
    with pytest.raises(TypeError, match="x must be float32"):
        srkern.cast(np.arange(16, dtype=np.int32), "bfloat16", out=out)
    with pytest.raises(TypeError, match="x"):
        srkern.cast([1.0, 2.0], "bfloat16")
    with pytest.raises(ValueError, match="already float32"):
        srkern.cast(np.ones(4, np.float32), "float32")
    assert_same_bits(out, before, what="out= after calls that failed")


def _bad_outs() -> dict:
    ro = _sentinel_out()
    ro.flags.writeable = False
    return {
        "shape": (_sentinel_out(15), ValueError, "out has shape"),
        "shape2d": (_sentinel_out(16).reshape(4, 4), ValueError, "out has shape"),
        "dtype": (_sentinel_out(16, np.float16), TypeError, "out has dtype"),
        "readonly": (ro, ValueError, "read-only"),
        "noncontig": (_sentinel_out(32)[::2], ValueError, "C-contiguous"),
        "list": ([0] * 16, TypeError, "out"),
        # out shares x's memory (x is base[:16], out the bytes of base[8:16] as 16 BF16 values)
        "overlap": (None, ValueError, "overlaps"),
    }


@pytest.mark.parametrize("case", list(_bad_outs()), ids=lambda s: f"out={s}")
def test_bad_out(case):
    out, exc, text = _bad_outs()[case]
    base = np.arange(32, dtype=np.float32)
    if case == "overlap":
        out = base[8:16].view(ml_dtypes.bfloat16)
    x = base[:16]
    before_out = None if isinstance(out, list) else np.array(out, copy=True)
    before_base = base.copy()
    with pytest.raises(exc, match=text):
        srkern.cast(x, "bfloat16", seed=1, out=out)
    if before_out is not None:
        assert_same_bits(out, before_out, what="out= after a call that failed")
    assert_same_bits(base, before_base, what="x's buffer after a call that failed")


def test_out_on_other_device(monkeypatch):
    # No GPU here: present out= as a CUDA buffer by its View, as DLPack would; the device check
    # must refuse it before any kernel runs.
    cast_mod = importlib.import_module("srkern.cast")  # the module; srkern.cast is the function
    out = _sentinel_out()
    before = out.copy()
    real = cast_mod.as_view

    def fake_as_view(obj, name="x"):
        v = real(obj, name)
        if obj is out:
            return View(v.obj, "cupy", v.ptr, v.shape, v.strides, v.dtype, "cuda", 0, False)
        return v

    monkeypatch.setattr(cast_mod, "as_view", fake_as_view)
    with pytest.raises(ValueError, match="out is on cuda:0, x on cpu:0"):
        srkern.cast(np.arange(16, dtype=np.float32), "bfloat16", seed=1, out=out)
    assert_same_bits(out, before, what="out= after a call that failed")


def test_out_unreadable_device():
    torch = pytest.importorskip("torch")
    out = torch.empty(16, dtype=torch.bfloat16, device="meta")
    with pytest.raises(TypeError, match="out"):
        srkern.cast(torch.arange(16, dtype=torch.float32), "bfloat16", out=out)


def test_jax_out_refused():
    jnp = pytest.importorskip("jax.numpy")
    out = jnp.zeros(16, dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match="out: JAX arrays are immutable"):
        srkern.cast(np.arange(16, dtype=np.float32), "bfloat16", out=out)
    assert not np.asarray(out).astype(np.float32).any()


def test_torch_out_unchanged_on_error():
    torch = pytest.importorskip("torch")
    out = torch.full((16,), 3.0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="seed"):
        srkern.cast(torch.ones(16), "bfloat16", seed=-5, out=out)
    with pytest.raises(TypeError, match="out has dtype"):
        srkern.cast(torch.ones(16), "float16", out=out)
    assert torch.equal(out, torch.full((16,), 3.0, dtype=torch.bfloat16))


# ---- the CPU variants against the oracle at their seams --------------------------------------------
#
# Host builds cast full Philox blocks CAST_TILE at a time through kernels/cpu/cast_tile.h (SIMD
# Philox tiles, the 32-bit FP16/FP8 encoder of kernels/cpu/round_small.h) and the at most two
# partial blocks at the ends through the shared per-lane body; a call of SRK_CPU_PAR_TILES tiles
# or more spreads its tiles over the OpenMP team. gpu-emu runs the shared bodies alone (one block
# per thread, 16-byte accesses where aligned). Each case below puts a seam where a mix-up would
# show: one block short of a tile, a tile exactly, one block into the next, a short last tile, the
# thread-count threshold, a head partial block (offsets that are not a multiple of the block), a
# tile whose block counter crosses 2**32, and a pointer one element off 16-byte alignment. The
# tile constants are read from the headers, so the cases follow them if they are retuned.

def _tile_seam_cases(block: int) -> list[tuple[int, int, int]]:
    """(n, offset, lead) triples around the tile and thread-count seams for a block of ``block`` lanes."""
    from srkern import _build
    tile_blocks, par = _build.kernel_defines("srk_launch.h", "CAST_TILE", "SRK_CPU_PAR_TILES")
    tile = tile_blocks * block  # elements per tile; par: tiles from which the team runs
    sizes = [tile - block, tile - 1, tile, tile + 1, tile + block, 2 * tile + block + 1,
             par * tile - block, par * tile, par * tile + tile // 2 + 3]
    offsets = [0, 1, block - 1, block + 3, block * 2 ** 32 - 3 * block - 1]
    return [(n, off, lead) for n in sizes for off in offsets for lead in (0, 1) if lead == 0 or off == 0]


@pytest.mark.parametrize("fmt", fmt_params())
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("saturate", SATURATE)
def test_cpu_tiles_match_the_oracle_at_the_seams(backend, fmt, rounding, saturate):
    # Bit-exact against srkern.reference at every seam between the CPU tile path and the shared
    # partial-block path (and, on gpu-emu, between the aligned and unaligned wide accesses). The
    # output buffer starts as the complement of the expected bits, so a lane that no path writes
    # cannot pass by chance.
    for n, offset, lead in _tile_seam_cases(fmt.block):
        x = mixed_input(n, fmt, seed=n + offset)
        want = reference.round_float32(x, fmt.name, rounding, seed=SEED, offset=offset, step=STEP,
                                       stream=STREAM, saturate=saturate)
        out = backend.put((~bits_of(want)).view(want.dtype), lead=lead)
        srkern.cast(backend.put(x, lead=lead), fmt.name, rounding=rounding, seed=SEED, offset=offset,
                    step=STEP, stream=STREAM, saturate=saturate, out=out)
        assert_same_bits(backend.get(out), want, x, f"cast to {fmt.name} n={n} offset={offset} lead={lead}")
