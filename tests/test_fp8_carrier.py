"""FP8 carried as uint8: how CuPy (which has no FP8 dtypes) holds FP8 data.

A cast to an FP8 format may write into a ``uint8`` ``out=``; a ``uint8`` input is read as FP8 bit
patterns when ``x_dtype`` names the format; a CuPy cast to FP8 returns a ``uint8`` CuPy array. On
every backend the bits equal those of the same cast with ml_dtypes FP8 arrays.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern import reference

from srkern.formats import FORMATS, FP8_DTYPES, Format
from srkern.testing import all_patterns, assert_same_bits

from conftest import cupy_or_skip, fmt_params, mixed_input

SEED = 4242
FP8 = [FORMATS[name] for name in FP8_DTYPES]


@pytest.mark.parametrize("fmt", fmt_params(FP8))
def test_cast_into_uint8_out(backend, fmt):
    x32 = mixed_input(4099, fmt, seed=1)
    for rounding in ("stochastic", "nearest"):
        want = reference.round_float32(x32, fmt.name, rounding, seed=SEED, offset=7)
        x = backend.put(x32)
        out = backend.put(np.zeros(x32.shape, np.uint8))
        assert srkern.cast(x, fmt.name, rounding=rounding, seed=SEED, offset=7, out=out) is out
        assert_same_bits(backend.get(out), want.view(np.uint8), x32, f"{fmt.name} ({rounding}) into uint8 out=")
    # The ml_dtypes route gives the same bits.
    got = srkern.cast(backend.put(x32), fmt.np_type, seed=SEED, offset=7)
    want = reference.round_float32(x32, fmt.name, seed=SEED, offset=7)
    assert_same_bits(backend.get(got), want, x32, f"{fmt.name} as an FP8 array")


@pytest.mark.parametrize("fmt", fmt_params(FP8))
def test_uint8_input_with_x_dtype(backend, fmt):
    # Every bit pattern of the format, upcast exactly and re-rounded to each other format, through
    # the uint8 carrier and through the ml_dtypes array: the same bits.
    patterns = all_patterns(fmt)
    carrier = backend.put(patterns.view(np.uint8))
    up = srkern.cast(carrier, "float32", x_dtype=fmt.name)
    assert_same_bits(backend.get(up), srkern.cast(patterns, "float32"), what=f"{fmt.name} carrier -> float32")
    for other in FORMATS.values():
        got = srkern.cast(carrier, other.name, x_dtype=fmt.np_type, seed=SEED, offset=3)
        want = srkern.cast(patterns, other.name, seed=SEED, offset=3)
        assert_same_bits(backend.get(got), want, what=f"{fmt.name} carrier -> {other.name}")
    # Into a uint8 out= as well (carrier to carrier).
    other = FP8[1 - FP8.index(fmt)]
    out = backend.put(np.zeros(patterns.shape, np.uint8))
    assert srkern.cast(carrier, other.name, x_dtype=fmt.name, seed=SEED, out=out) is out
    assert_same_bits(backend.get(out), srkern.cast(patterns, other.name, seed=SEED),
                     what=f"{fmt.name} carrier -> {other.name} carrier")


@pytest.mark.parametrize("fmt", fmt_params(FP8))
def test_strided_uint8_input(fmt):
    # A strided carrier is copied to C order and keeps its format.
    patterns = all_patterns(fmt)
    carrier = patterns.view(np.uint8).reshape(16, 16)[:, ::3]
    got = srkern.cast(carrier, "bfloat16", x_dtype=fmt.name, seed=SEED)
    want = srkern.cast(np.ascontiguousarray(patterns.reshape(16, 16)[:, ::3]), "bfloat16", seed=SEED)
    assert got.shape == (16, 6)
    assert_same_bits(got, want, what=f"strided {fmt.name} carrier")


def test_x_dtype_aliases():
    patterns = all_patterns(FP8[0])
    want = srkern.cast(patterns, "float32")
    for alias in ("e4m3", "float8_e4m3fn", ml_dtypes.float8_e4m3fn, np.dtype(ml_dtypes.float8_e4m3fn)):
        assert_same_bits(srkern.cast(patterns.view(np.uint8), "float32", x_dtype=alias), want, what=str(alias))


def test_refusals_are_clear_and_write_nothing():
    x32 = np.linspace(-3, 3, 64, dtype=np.float32)
    bits = np.arange(64, dtype=np.uint8)
    out = np.full(64, 0xA5, np.uint8)
    # uint8 without x_dtype: the message names x_dtype.
    with pytest.raises(TypeError, match=r"uint8.*x_dtype='float8_e4m3fn'"):
        srkern.cast(bits, "float32")
    with pytest.raises(TypeError, match="x_dtype"):
        srkern.cast(bits, "bfloat16", seed=SEED, out=np.empty(64, ml_dtypes.bfloat16))
    # x_dtype with anything but uint8.
    with pytest.raises(TypeError, match=r"x_dtype=.* only for a uint8 x.*float32"):
        srkern.cast(x32, "float8_e5m2", x_dtype="float8_e5m2", seed=SEED, out=out)
    with pytest.raises(TypeError, match=r"only for a uint8 x.*float8_e4m3fn"):
        srkern.cast(bits.view(ml_dtypes.float8_e4m3fn), "float32", x_dtype="float8_e4m3fn")
    # x_dtype must name an FP8 format.
    for bad in ("bfloat16", "uint8", "float16", np.float32):
        with pytest.raises(ValueError, match="x_dtype .*float8_e4m3fn"):
            srkern.cast(bits, "float32", x_dtype=bad)
    # A uint8 out= is for FP8 targets only, and must still match shape and device.
    with pytest.raises(TypeError, match="out has dtype uint8, expected bfloat16"):
        srkern.cast(x32, "bfloat16", seed=SEED, out=out)
    with pytest.raises(TypeError, match="out has dtype uint8, expected float32"):
        srkern.cast(bits, "float32", x_dtype="e4m3", out=out)
    with pytest.raises(ValueError, match="shape"):
        srkern.cast(x32, "float8_e4m3fn", seed=SEED, out=np.empty(63, np.uint8))
    with pytest.raises(TypeError, match=r"expected float8_e5m2 \(or uint8"):
        srkern.cast(x32, "float8_e5m2", seed=SEED, out=np.empty(64, np.int8))
    with pytest.raises(ValueError, match="overlaps"):
        srkern.cast(bits, "float8_e5m2", x_dtype="e4m3", seed=SEED, out=bits)
    assert (out == 0xA5).all() and (bits == np.arange(64)).all()


def test_numpy_results_keep_ml_dtypes():
    # Only CuPy results are carriers: a NumPy uint8 input rounded to FP8 gives an ml_dtypes array.
    bits = all_patterns(FP8[0]).view(np.uint8)
    got = srkern.cast(bits, "float8_e5m2", x_dtype="float8_e4m3fn", seed=SEED)
    assert got.dtype == np.dtype(ml_dtypes.float8_e5m2)


def test_jax_gpu_results_are_bitcast_back_to_fp8():
    # On a GPU a JAX result is made by CuPy as a uint8 carrier; finish() hands it back as FP8.
    # Exercised here through JAX's CPU DLPack import of a NumPy carrier.
    jax = pytest.importorskip("jax")
    from srkern import _tensor
    patterns = all_patterns(FP8[1])
    v = _tensor.View(None, "jax", 0, patterns.shape, (1,), "float8_e5m2", "cuda", 0, False)
    try:
        got = _tensor.finish(patterns.view(np.uint8).copy(), v, "float8_e5m2")
    except Exception as e:  # a JAX without DLPack import of host arrays
        pytest.skip(f"this JAX cannot import a host array through DLPack: {e}")
    assert isinstance(got, jax.Array) and got.dtype == jax.numpy.float8_e5m2
    assert_same_bits(np.asarray(got), patterns, what="jax bitcast")


# ---- CuPy on a GPU --------------------------------------------------------------------------------------



@pytest.mark.cuda  # CUDA interop: run by benchmarks/gpu_check.py on the device
@pytest.mark.parametrize("fmt", fmt_params(FP8))
def test_cupy_fp8_is_carried_as_uint8(fmt: Format):
    cupy = cupy_or_skip()
    x32 = mixed_input(100003, fmt, seed=9)
    x = cupy.asarray(x32)
    for rounding in ("stochastic", "nearest"):
        low = srkern.cast(x, fmt.name, rounding=rounding, seed=SEED, offset=5)
        assert isinstance(low, cupy.ndarray) and low.dtype == np.uint8 and low.shape == x.shape
        want = reference.round_float32(x32, fmt.name, rounding, seed=SEED, offset=5)
        assert_same_bits(cupy.asnumpy(low), want.view(np.uint8), x32, f"cupy -> {fmt.name} ({rounding})")
    out = cupy.zeros(x.shape, dtype=cupy.uint8)
    ptr = out.data.ptr
    with cupy.cuda.Stream(non_blocking=True):
        assert srkern.cast(x, fmt.name, seed=SEED, offset=5, out=out) is out and out.data.ptr == ptr
        assert_same_bits(cupy.asnumpy(out), reference.round_float32(x32, fmt.name, seed=SEED, offset=5)
                         .view(np.uint8), x32, "cupy uint8 out= on a side stream")
    host = cupy.asnumpy(out).view(fmt.np_type)
    up = srkern.cast(out, "float32", x_dtype=fmt.name)
    assert isinstance(up, cupy.ndarray) and up.dtype == np.float32
    assert_same_bits(cupy.asnumpy(up), srkern.cast(host, "float32"), what=f"cupy {fmt.name} carrier upcast")
    bf = srkern.cast(out, "bfloat16", x_dtype=fmt.name, seed=SEED)
    assert isinstance(bf, cupy.ndarray)
    assert_same_bits(cupy.asnumpy(bf), srkern.cast(host, "bfloat16", seed=SEED), what="cupy carrier -> bfloat16")
    with pytest.raises(TypeError, match="x_dtype"):
        srkern.cast(out, "float32")
