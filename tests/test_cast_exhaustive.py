"""Round-to-nearest-even casts agree with PyTorch and ml_dtypes: every FP32 bit pattern for BF16 and
FP16, and every exponent boundary, grid midpoint and 2**24 random patterns for the FP8 formats.

Contract v1: ``rounding="nearest"`` agrees with PyTorch and ml_dtypes for every non-NaN input;
NaN in gives NaN out (payloads are not compared: libraries choose their own).
"""
from __future__ import annotations

import numpy as np
import pytest

import srkern
from srkern.formats import FORMATS, Format
from srkern.testing import assert_same_bits, first_difference, format_grid

torch = pytest.importorskip("torch")

CHUNK = 1 << 24  # FP32 patterns per chunk (64 MiB of input); the exponent logic below assumes 2**24


def _nan_inputs(x_bits: np.ndarray) -> np.ndarray:
    return (x_bits & 0x7FFFFFFF) > 0x7F800000


def _check_against(x_bits: np.ndarray, ours: np.ndarray, theirs: np.ndarray, fmt: Format, who: str) -> None:
    """Fail unless ``ours`` (an array of ``fmt``) equals ``theirs`` bit for bit wherever the input
    is not NaN, and both are NaN (any payload) where it is."""
    if first_difference(ours, theirs)["ok"]:  # the common case, without splitting the inputs
        return
    nan_in = _nan_inputs(x_bits)
    x = x_bits.view(np.float32)
    what = f"{fmt.name} nearest vs {who}"
    assert_same_bits(ours[~nan_in], theirs[~nan_in], x[~nan_in], f"{what}, non-NaN inputs (indices among them)")
    assert_same_bits(ours[nan_in], theirs[nan_in], x[nan_in], f"{what}, NaN inputs (indices among them)", nan="any")


def _torch_cast(x: np.ndarray, fmt: Format) -> np.ndarray:
    """torch's round-to-nearest cast of ``x``, as an array of ``fmt``."""
    t = torch.from_numpy(x).to(getattr(torch, fmt.name))
    return t.view(torch.uint8 if fmt.nbits == 8 else torch.int16).numpy().view(fmt.np_type)


def _check_nan_out(x_bits: np.ndarray, ours: np.ndarray, fmt: Format) -> None:
    out = ours[_nan_inputs(x_bits)].astype(np.float32)
    assert np.isnan(out).all(), f"{fmt.name}: a NaN input gave a non-NaN output"


@pytest.mark.slow  # every one of the 2**32 FP32 patterns: minutes
@pytest.mark.parametrize("name", ["bfloat16", "float16"], ids=lambda s: f"dtype={s}")
def test_all_fp32_patterns(name):
    # All 2**32 inputs, in 256 chunks of 2**24 consecutive patterns. Against torch on every chunk;
    # against ml_dtypes / NumPy on every chunk for BF16, and for FP16 on the chunks whose results
    # are neither 0 nor +-Inf (NumPy's float16 conversion is ~40x slower than the others here;
    # outside those chunks torch already fixes every bit).
    fmt = FORMATS[name]
    ours = np.empty(CHUNK, dtype=fmt.np_type)
    base = np.arange(CHUNK, dtype=np.uint32)
    x_bits = np.empty(CHUNK, dtype=np.uint32)
    x = x_bits.view(np.float32)
    for c in range(2 ** 32 // CHUNK):  # chunk c: patterns c * 2**24 ... (c + 1) * 2**24 - 1
        np.add(base, np.uint32(c * CHUNK), out=x_bits)
        srkern.cast(x, name, rounding="nearest", out=ours)
        _check_against(x_bits, ours, _torch_cast(x, fmt), fmt, "torch")
        exp_hi = (c & 0x7F) << 1  # a chunk fixes sign and top 7 exponent bits: exponents exp_hi, exp_hi + 1
        if name == "bfloat16" or 127 - 26 <= exp_hi <= 127 + 16:
            with np.errstate(over="ignore", invalid="ignore"):
                _check_against(x_bits, ours, x.astype(fmt.np_type), fmt, "ml_dtypes/numpy")
        if exp_hi == 0xFE:
            _check_nan_out(x_bits, ours, fmt)


def _fp8_inputs(fmt: Format) -> np.ndarray:
    """Exponent boundaries, grid midpoints and random patterns for an FP8 format (float32 bits)."""
    parts = []
    # +-2**e for every FP32 exponent (subnormals included) and their FP32 neighbours
    p2 = np.exp2(np.arange(-149, 128, dtype=np.float64)).astype(np.float32).view(np.uint32).astype(np.int64)
    for delta in (-1, 0, 1):
        parts.append(p2 + delta)
    # every FP8 value, the midpoints between neighbours (RN ties) and their FP32 neighbours
    grid = format_grid(fmt)
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
    fmt = FORMATS[name]
    x_bits = _fp8_inputs(fmt)
    x = x_bits.view(np.float32)
    ob = srkern.cast(x, name, rounding="nearest")
    # torch's .to(float8_e4m3fn) saturates (finite overflow and +-Inf give +-448, measured with
    # torch 2.13 CPU), which is srkern's saturate=True; ml_dtypes gives NaN, srkern's default.
    # e5m2 overflows to +-Inf in all three.
    saturating = name == "float8_e4m3fn"
    ob_torch = srkern.cast(x, name, rounding="nearest", saturate=True) if saturating else ob
    _check_against(x_bits, ob_torch, _torch_cast(x, fmt), fmt, "torch")
    with np.errstate(over="ignore", invalid="ignore"):
        _check_against(x_bits, ob, x.astype(fmt.np_type), fmt, "ml_dtypes")
    _check_nan_out(x_bits, ob, fmt)
