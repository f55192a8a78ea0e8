"""Plain NumPy implementation of srkern's contracts: the test oracle, not a backend.

Written for clarity over speed: Philox rounds as in Random123, and rounding by the definition in
the contract (truncate onto the grid, compare the scaled remainder with the draw) using
float64/integer arithmetic rather than the kernels' bit tricks, so that the two can disagree if
either is wrong.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)

STREAM_CAST, STREAM_PARAM, STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, STREAM_COMPENSATION, STREAM_COLLECTIVE = range(6)


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on an (n, 4) uint32 counter array with a 2-word key; returns (n, 4) uint32."""
    c = [np.asarray(ctr[:, i], dtype=np.uint64) for i in range(4)]
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0, p1 = M0 * c[0], M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return np.stack(c, axis=1).astype(np.uint32)


def blocks(q: np.ndarray, seed: int, step: int, stream: int) -> np.ndarray:
    """The four words of Philox block ``q`` (uint64 array) under contract v1."""
    q = np.asarray(q, dtype=np.uint64)
    ctr = np.stack([q & MASK32, q >> np.uint64(32), np.full_like(q, step & 0xFFFFFFFF),
                    np.full_like(q, stream & 0xFFFFFFFF)], axis=1)
    return philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))


def draws16(index: np.ndarray, seed: int, step: int, stream: int) -> np.ndarray:
    """16-bit draws for logical indices (BF16 targets): block index // 8, lane index % 8."""
    index = np.asarray(index, dtype=np.uint64)
    w = blocks(index // np.uint64(8), seed, step, stream)
    lane = (index % np.uint64(8)).astype(np.int64)
    word = w[np.arange(len(index)), lane // 2].astype(np.uint64)
    return ((word >> (16 * (lane % 2)).astype(np.uint64)) & np.uint64(0xFFFF)).astype(np.uint32)


def draws32(index: np.ndarray, seed: int, step: int, stream: int) -> np.ndarray:
    """32-bit draws for logical indices (FP16 / FP8 targets): block index // 4, word index % 4."""
    index = np.asarray(index, dtype=np.uint64)
    w = blocks(index // np.uint64(4), seed, step, stream)
    return w[np.arange(len(index)), (index % np.uint64(4)).astype(np.int64)]


# ---- formats ------------------------------------------------------------------------------------

FORMATS = {
    # name: (mantissa bits, min normal exponent, largest finite, has inf, draw bits, ml_dtypes type)
    "bfloat16": (7, -126, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), True, 16, ml_dtypes.bfloat16),
    "float16": (10, -14, 65504.0, True, 32, np.float16),
    "float8_e4m3fn": (3, -6, 448.0, False, 32, ml_dtypes.float8_e4m3fn),
    "float8_e5m2": (2, -14, 57344.0, True, 32, ml_dtypes.float8_e5m2),
}


def _grid(a: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(T, quantum) for finite |x| = a (float64): T = a truncated onto the format's grid."""
    mant, emin, _, _, _, _ = FORMATS[fmt]
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    # log2 can be off by one at binade edges in float64; fix with an exact comparison.
    e = np.where(np.exp2(e) > a, e - 1, e)
    e = np.where(np.exp2(e + 1) <= a, e + 1, e)
    quantum = np.exp2(np.maximum(e, emin) - mant)
    return np.floor(a / quantum) * quantum, quantum


def round_float32(x: np.ndarray, fmt: str, rounding: str = "stochastic", *, seed: int = 0,
                  offset: int = 0, step: int = 0, stream: int = 0, saturate: bool = False) -> np.ndarray:
    """Contract v1 rounding of a float32 array (C order) into ``fmt``; returns the ml_dtypes array."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    mant, emin, fmax, has_inf, bits, npt = FORMATS[fmt]
    n = x.size
    a = np.abs(x.astype(np.float64))
    finite = np.isfinite(x)
    af = np.where(finite, a, 0.0)
    t, quantum = _grid(af, fmt)
    d = (af - t) / quantum  # exact: both are short binary fractions
    if rounding == "stochastic":
        index = np.uint64(offset) + np.arange(n, dtype=np.uint64)
        r = (draws16 if bits == 16 else draws32)(index, seed, step, stream).astype(np.float64)
        up = np.floor(d * 2.0 ** bits) + r >= 2.0 ** bits
    else:
        units = t / quantum
        up = (d > 0.5) | ((d == 0.5) & (np.mod(units, 2) == 1))
    mag = t + np.where(up, quantum, 0.0)
    over = mag > fmax
    if saturate:
        over_val = fmax
    else:
        over_val = np.inf if has_inf else np.nan
    mag = np.where(over, over_val, mag)
    out = np.copysign(mag, x.astype(np.float64))
    out = np.where(np.isinf(x), (np.copysign(np.inf, x) if has_inf else
                                 (np.copysign(fmax, x) if saturate else np.nan)), out)
    out = np.where(np.isnan(x), np.nan, out)
    res = out.astype(npt)  # every value is representable: this conversion is exact
    # NaN: keep the input's sign (ml_dtypes' float64 -> format conversion drops it).
    if np.isnan(x).any():
        u = res.view(np.uint16 if res.itemsize == 2 else np.uint8).copy()
        sign_bit = 0x8000 if res.itemsize == 2 else 0x80
        neg_nan = np.isnan(x) & np.signbit(x)
        u[np.isnan(x)] &= ~np.array(sign_bit, dtype=u.dtype)
        u[neg_nan] |= np.array(sign_bit, dtype=u.dtype)
        res = u.view(npt)
    return res


def upcast(x: np.ndarray) -> np.ndarray:
    """Exact widening of a 16/8-bit float array to float32."""
    return np.asarray(x).astype(np.float32)
