"""Round-to-nearest-even casts agree with PyTorch and ml_dtypes: every FP32 bit pattern for BF16 and
FP16, and every exponent boundary, grid midpoint and 2**24 random patterns for the FP8 formats.

Contract v1: ``rounding="nearest"`` agrees with PyTorch and ml_dtypes for every non-NaN input;
NaN in gives NaN out (payloads are not compared: libraries choose their own).
"""
from __future__ import annotations

import numpy as np
import pytest

import srkern

from conftest import FORMAT_BY_NAME, Fmt, bits_of

torch = pytest.importorskip("torch")

CHUNK = 1 << 24  # FP32 patterns per chunk (64 MiB of input); the exponent logic below assumes 2**24


def _is_nan_bits(b: np.ndarray, fmt: Fmt) -> np.ndarray:
    """NaN test on raw bits of ``fmt``."""
    if fmt.nbits == 16:
        exp_mask = 0x7F80 if fmt.name == "bfloat16" else 0x7C00
        return (b & 0x7FFF) > exp_mask
    if fmt.name == "float8_e4m3fn":
        return (b & 0x7F) == 0x7F
    return (b & 0x7F) > 0x7C  # e5m2


def _check_against(x_bits: np.ndarray, ours: np.ndarray, theirs: np.ndarray, fmt: Fmt, who: str) -> None:
    """Fail unless ours == theirs bit for bit wherever the input is not NaN, and both are NaN where it is."""
    diff = np.nonzero(ours != theirs)[0]
    if diff.size == 0:
        return
    u = x_bits[diff]
    x_nan = (u & 0x7FFFFFFF) > 0x7F800000
    ok = x_nan & _is_nan_bits(ours[diff], fmt) & _is_nan_bits(theirs[diff], fmt)
    bad = diff[~ok]
    if bad.size:
        w = 2 * ours.itemsize
        lines = [f"{fmt.name} nearest vs {who}: {bad.size} non-NaN mismatches; first ones:"]
        for i in bad[:10]:
            lines.append(f"  x=0x{int(x_bits[i]):08x} ({float(x_bits[i:i + 1].view(np.float32)[0])!r}) "
                         f"srkern 0x{int(ours[i]):0{w}x} {who} 0x{int(theirs[i]):0{w}x}")
        pytest.fail("\n".join(lines), pytrace=False)


def _torch_bits(x: np.ndarray, fmt: Fmt) -> np.ndarray:
    return bits_of(torch.from_numpy(x).to(getattr(torch, fmt.torch_name)))


def _check_nan_out(x_bits: np.ndarray, ours: np.ndarray, fmt: Fmt) -> None:
    nan_in = (x_bits & 0x7FFFFFFF) > 0x7F800000
    assert _is_nan_bits(ours[nan_in], fmt).all(), f"{fmt.name}: a NaN input gave a non-NaN output"


@pytest.mark.slow  # every one of the 2**32 FP32 patterns: minutes
@pytest.mark.parametrize("name", ["bfloat16", "float16"], ids=lambda s: f"dtype={s}")
def test_all_fp32_patterns(name):
    # All 2**32 inputs, in 256 chunks of 2**24 consecutive patterns. Against torch on every chunk;
    # against ml_dtypes / NumPy on every chunk for BF16, and for FP16 on the chunks whose results
    # are neither 0 nor +-Inf (NumPy's float16 conversion is ~40x slower than the others here;
    # outside those chunks torch already fixes every bit).
    fmt = FORMAT_BY_NAME[name]
    ours = np.empty(CHUNK, dtype=fmt.np_dtype)
    base = np.arange(CHUNK, dtype=np.uint32)
    x_bits = np.empty(CHUNK, dtype=np.uint32)
    x = x_bits.view(np.float32)
    for c in range(2 ** 32 // CHUNK):  # chunk c: patterns c * 2**24 ... (c + 1) * 2**24 - 1
        np.add(base, np.uint32(c * CHUNK), out=x_bits)
        srkern.cast(x, name, rounding="nearest", out=ours)
        ob = bits_of(ours)
        _check_against(x_bits, ob, _torch_bits(x, fmt), fmt, "torch")
        exp_hi = (c & 0x7F) << 1  # a chunk fixes sign and top 7 exponent bits: exponents exp_hi, exp_hi + 1
        if name == "bfloat16" or 127 - 26 <= exp_hi <= 127 + 16:
            with np.errstate(over="ignore", invalid="ignore"):
                _check_against(x_bits, ob, bits_of(x.astype(fmt.np_dtype)), fmt, "ml_dtypes/numpy")
        if exp_hi == 0xFE:
            _check_nan_out(x_bits, ob, fmt)


def _fp8_inputs(fmt: Fmt) -> np.ndarray:
    """Exponent boundaries, grid midpoints and random patterns for an FP8 format (float32 bits)."""
    parts = []
    # +-2**e for every FP32 exponent (subnormals included) and their FP32 neighbours
    p2 = np.exp2(np.arange(-149, 128, dtype=np.float64)).astype(np.float32).view(np.uint32).astype(np.int64)
    for delta in (-1, 0, 1):
        parts.append(p2 + delta)
    # every FP8 value, the midpoints between neighbours (RN ties) and their FP32 neighbours
    grid = fmt.grid()
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    above = np.float32(grid[-1] + (grid[-1] - grid[-2]) / 2)  # the overflow threshold of RN
    for v in (grid.astype(np.float32), mids, np.array([above], dtype=np.float32)):
        b = v.view(np.uint32).astype(np.int64)
        for delta in (-1, 0, 1):
            parts.append(b + delta)
    pos = np.concatenate(parts)
    pos = pos[(pos >= 0) & (pos <= 0x7FFFFFFF)]
    rng = np.random.default_rng(8)
    # 2**24 uniformly random patterns, and 2**24 more with exponents near the format's range
    rand = rng.integers(0, 1 << 32, 1 << 24, dtype=np.uint64)
    near = rng.integers(0, 1 << 32, 1 << 24, dtype=np.uint64)
    near = (near & 0x807FFFFF) | (rng.integers(127 - 25, 127 + 18, 1 << 24, dtype=np.uint64) << 23)
    bits = np.concatenate([pos, pos | 0x80000000]).astype(np.uint64)
    return np.concatenate([bits, rand, near]).astype(np.uint32)


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"], ids=lambda s: f"dtype={s}")
def test_fp8_boundaries_and_random(name):
    fmt = FORMAT_BY_NAME[name]
    x_bits = _fp8_inputs(fmt)
    x = x_bits.view(np.float32)
    ob = bits_of(srkern.cast(x, name, rounding="nearest"))
    # torch's .to(float8_e4m3fn) saturates (finite overflow and +-Inf give +-448, measured with
    # torch 2.13 CPU), which is srkern's saturate=True; ml_dtypes gives NaN, srkern's default.
    # e5m2 overflows to +-Inf in all three.
    saturating = name == "float8_e4m3fn"
    ob_torch = bits_of(srkern.cast(x, name, rounding="nearest", saturate=True)) if saturating else ob
    _check_against(x_bits, ob_torch, _torch_bits(x, fmt), fmt, "torch")
    with np.errstate(over="ignore", invalid="ignore"):
        _check_against(x_bits, ob, bits_of(x.astype(fmt.np_dtype)), fmt, "ml_dtypes")
    _check_nan_out(x_bits, ob, fmt)
