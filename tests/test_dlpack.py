"""DLPack interop: inputs from PyTorch, NumPy (ml_dtypes BF16/FP8), JAX and CuPy; results in the
caller's framework and dtype, or written into ``out=`` without a copy.

Every result is also checked bit for bit against ``srkern.reference``, so a framework path that
read the wrong bytes (a lost offset, a mislabelled dtype) fails here.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern import reference

from srkern.formats import FORMATS, Format
from srkern.testing import assert_same_bits

from conftest import cupy_or_skip, fmt_params, mixed_input

SEED = 77


def _ref(x32: np.ndarray, fmt: Format, **kw) -> np.ndarray:
    return reference.round_float32(x32, fmt.name, seed=SEED, **kw).reshape(x32.shape)


# ---- PyTorch (CPU) ----------------------------------------------------------------------------------

try:
    import torch
except ImportError:  # the NumPy and JAX tests below still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _tdt(fmt: Format):
    return getattr(torch, fmt.name)


@needs_torch
@pytest.mark.parametrize("fmt", fmt_params())
def test_torch_round_trip(fmt):
    # float32 torch -> low precision torch -> float32 torch: framework and dtype follow the caller.
    x32 = mixed_input(1001, fmt, seed=1).reshape(7, 143)
    x = torch.from_numpy(x32)
    low = srkern.cast(x, _tdt(fmt), seed=SEED, offset=3)
    assert isinstance(low, torch.Tensor) and low.dtype == _tdt(fmt) and low.shape == x.shape
    assert_same_bits(low, _ref(x32, fmt, offset=3), x32, f"torch float32 -> {fmt.name}")
    back = srkern.cast(low, "float32")
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    assert_same_bits(back, low.float(), what=f"torch {fmt.name} -> float32", nan="any")


@needs_torch
@pytest.mark.parametrize("fmt", fmt_params())
def test_torch_low_precision_input(fmt):
    # BF16 and FP8 torch tensors are read through DLPack (FP8 as bytes, re-labelled).
    src = torch.from_numpy(mixed_input(500, fmt, seed=2)).to(_tdt(fmt))
    up = srkern.cast(src, torch.float32)
    assert_same_bits(up, src.float(), what=f"torch {fmt.name} upcast", nan="any")
    order = list(FORMATS.values())
    other = order[(order.index(fmt) + 1) % len(order)]
    got = srkern.cast(src, other.name, seed=SEED)
    assert got.dtype == _tdt(other)
    assert_same_bits(got, _ref(src.float().numpy(), other), what=f"torch {fmt.name} -> {other.name}")


@needs_torch
@pytest.mark.parametrize("fmt", fmt_params())
def test_torch_out_is_written_in_place(fmt):
    x = torch.from_numpy(mixed_input(1024, fmt, seed=3))
    out = torch.empty(1024, dtype=_tdt(fmt))
    ptr = out.data_ptr()
    res = srkern.cast(x, fmt.name, seed=SEED, out=out)
    assert res is out and out.data_ptr() == ptr
    assert_same_bits(out, _ref(x.numpy(), fmt), x.numpy(), "torch out=")
    up = torch.empty(1024, dtype=torch.float32)
    assert srkern.cast(out, "float32", out=up) is up
    assert_same_bits(up, out.float(), what="torch upcast out=", nan="any")


@needs_torch
def test_torch_requires_grad():
    # A leaf that requires grad is read without autograd; the result is a plain tensor.
    x = torch.linspace(-3, 3, 999, requires_grad=True)
    y = srkern.cast(x, torch.bfloat16, seed=SEED)
    assert y.dtype == torch.bfloat16 and not y.requires_grad
    assert_same_bits(y, _ref(x.detach().numpy(), FORMATS["bfloat16"]), x.detach().numpy(), "requires_grad input")
    z = (x * 2)[1:]  # a non-leaf view with a grad_fn
    assert_same_bits(srkern.cast(z, "bfloat16", seed=SEED), _ref(z.detach().numpy(), FORMATS["bfloat16"]),
                     what="non-leaf input")
    assert x.grad is None


# ---- NumPy (ml_dtypes) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", fmt_params())
def test_numpy_round_trip(fmt):
    x = mixed_input(777, fmt, seed=4).reshape(3, 259)
    low = srkern.cast(x, fmt.np_type, seed=SEED)
    assert type(low) is np.ndarray and low.dtype == np.dtype(fmt.np_type) and low.shape == x.shape
    assert_same_bits(low, _ref(x, fmt), x, f"numpy -> {fmt.name}")
    back = srkern.cast(low, np.float32)
    assert type(back) is np.ndarray and back.dtype == np.float32
    assert_same_bits(back, low.astype(np.float32), what=f"numpy {fmt.name} -> float32", nan="any")


@pytest.mark.parametrize("fmt", fmt_params())
def test_numpy_out_is_written_in_place(fmt):
    x = mixed_input(1000, fmt, seed=5)
    out = np.empty(1000, dtype=fmt.np_type)
    ptr = out.ctypes.data
    assert srkern.cast(x, fmt.name, seed=SEED, out=out) is out and out.ctypes.data == ptr
    assert_same_bits(out, _ref(x, fmt), x, "numpy out=")


def test_generic_dlpack_producer():
    # An object that only speaks DLPack (no known framework) gets a NumPy result.
    class Producer:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kw):
            return self.t.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    x32 = mixed_input(100, FORMATS["bfloat16"], seed=6)
    got = srkern.cast(Producer(x32), "bfloat16", seed=SEED)
    assert type(got) is np.ndarray and got.dtype == np.dtype(ml_dtypes.bfloat16)
    assert_same_bits(got, _ref(x32, FORMATS["bfloat16"]), x32, "generic producer")
    # A strided tensor from such a producer cannot be copied to C order by srkern: refused, not
    # misread as dense.
    with pytest.raises(ValueError, match="strided dlpack tensor"):
        srkern.cast(Producer(x32[::2]), "bfloat16", seed=SEED)


# ---- JAX (CPU) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", fmt_params())
def test_jax_round_trip(fmt):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x32 = mixed_input(513, fmt, seed=7)
    x = jnp.asarray(x32)
    low = srkern.cast(x, fmt.name, seed=SEED)
    assert isinstance(low, jax.Array) and low.dtype == jnp.dtype(fmt.np_type)
    assert_same_bits(np.asarray(low), _ref(x32, fmt), x32, f"jax -> {fmt.name}")
    back = srkern.cast(low, "float32")
    assert isinstance(back, jax.Array) and back.dtype == jnp.float32
    assert_same_bits(np.asarray(back), np.asarray(low).astype(np.float32), what=f"jax {fmt.name} -> float32",
                     nan="any")


def test_jax_bf16_input():
    jax = pytest.importorskip("jax")
    x = jax.numpy.linspace(-4, 4, 301, dtype=jax.numpy.bfloat16)
    up = srkern.cast(x, "float32")
    assert_same_bits(np.asarray(up), np.asarray(x).astype(np.float32), what="jax bf16 -> float32")


# ---- CuPy (needs a CUDA device) -------------------------------------------------------------------------



def _cupy_dtype_or_skip(cupy, fmt: Format) -> None:
    try:
        cupy.empty(1, dtype=fmt.np_type)
    except Exception as e:
        pytest.skip(f"this CuPy cannot hold {fmt.name} arrays: {e}")


@pytest.mark.cuda  # CUDA interop: run by benchmarks/gpu_check.py on the device
@pytest.mark.parametrize("fmt", fmt_params())
def test_cupy_round_trip(fmt):
    # Runs only on a CUDA machine: the GPU kernel must give the CPU reference's bits, on the
    # current CuPy stream, and out= must be written in place.
    cupy = cupy_or_skip()
    _cupy_dtype_or_skip(cupy, fmt)
    x32 = mixed_input(100003, fmt, seed=9)
    x = cupy.asarray(x32)
    for rounding in ("stochastic", "nearest"):
        low = srkern.cast(x, fmt.name, rounding=rounding, seed=SEED, offset=5)
        assert isinstance(low, cupy.ndarray) and low.dtype == np.dtype(fmt.np_type)
        want = reference.round_float32(x32, fmt.name, rounding, seed=SEED, offset=5)
        assert_same_bits(cupy.asnumpy(low), want, x32, f"cupy -> {fmt.name} ({rounding})")
    out = cupy.empty(x.shape, dtype=fmt.np_type)
    ptr = out.data.ptr
    with cupy.cuda.Stream(non_blocking=True):
        assert srkern.cast(x, fmt.name, seed=SEED, offset=5, out=out) is out and out.data.ptr == ptr
        assert_same_bits(cupy.asnumpy(out), reference.round_float32(x32, fmt.name, seed=SEED, offset=5),
                         x32, "cupy out= on a side stream")
    up = srkern.cast(out, "float32")
    assert isinstance(up, cupy.ndarray)
    assert_same_bits(cupy.asnumpy(up), cupy.asnumpy(out).astype(np.float32), what="cupy upcast", nan="any")


@pytest.mark.cuda  # CUDA interop: run by benchmarks/gpu_check.py on the device
@needs_torch
def test_torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    x32 = mixed_input(100003, FORMATS["bfloat16"], seed=11)
    low = srkern.cast(torch.from_numpy(x32).cuda(), torch.bfloat16, seed=SEED)
    assert low.is_cuda
    assert_same_bits(low.cpu(), _ref(x32, FORMATS["bfloat16"]), x32, "torch cuda -> bfloat16")


# ---- DLPack stream argument (no GPU needed) ---------------------------------------------------------

class _CudaProducer:
    """Claims to hold CUDA memory; records the ``stream`` it is asked to export on, then refuses."""

    def __init__(self):
        self.streams = []

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, stream=None, **kw):
        self.streams.append(stream)
        raise BufferError("recorded the stream; nothing to export")


def test_dlpack_stream_is_1_for_the_legacy_default_stream():
    # A producer whose current stream is the legacy default one (raw pointer 0, what launches use)
    # must be asked for stream=1: DLPack does not allow 0 for CUDA (1 = legacy, 2 = per-thread).
    from srkern import _tensor
    p = _CudaProducer()
    assert _tensor.current_stream_ptr(p, "dlpack") == 0
    with pytest.raises(TypeError, match="could not read it through DLPack"):
        srkern.cast(p, "bfloat16", seed=SEED)
    assert p.streams == [1]
    assert [_tensor.dlpack_stream(s) for s in (0, 1, 2, 0x7F0012345600)] == [1, 1, 2, 0x7F0012345600]
