"""Kernel launch on either backend: the backend follows the tensor's device.

Arguments are given as ``(code, value)`` pairs, one code per C parameter type:
``p`` pointer, ``q`` int64, ``Q`` uint64, ``I`` uint32, ``i`` int32, ``f`` float32.
"""
from __future__ import annotations

import ctypes
import functools
import warnings
from typing import Any, Sequence

import numpy as np

from . import _build

_CTYPES = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "Q": ctypes.c_uint64,
           "I": ctypes.c_uint32, "i": ctypes.c_int32, "f": ctypes.c_float}
_NUMPY = {"p": np.uint64, "q": np.int64, "Q": np.uint64, "I": np.uint32, "i": np.int32,
          "f": np.float32}

# 256 threads per block, grids capped at 32 blocks per SM (grid-stride over the rest): a common
# starting point for memory-bound grid-stride kernels, NOT yet tuned by measurement, since no GPU
# has been available to this project so far (a block-size sweep on a GPU is still to do).
GPU_BLOCK = 256
GPU_BLOCKS_PER_SM = 32


@functools.lru_cache(maxsize=None)
def _cpu_function(module: str, kernel: str, codes: str):
    fn = getattr(_build.cpu_library(module), kernel)
    fn.argtypes = [_CTYPES[c] for c in codes]
    fn.restype = None
    return fn


@functools.lru_cache(maxsize=None)
def _gpu_function(module: str, kernel: str, device_id: int):
    return _build.gpu_module(module, device_id).get_function(kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


def cupy_stream(ptr: int, device_id: int):
    """A CuPy stream object for a raw ``cudaStream_t`` (0: the legacy default stream).

    ``cupy.cuda.ExternalStream`` is the form that works on CuPy 13 and 14 alike; CuPy 14 marks it
    deprecated in favour of ``Stream.from_external``, which wants a stream-protocol object, so the
    warning is silenced here, in the one place that wraps raw pointers.
    """
    import cupy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_id)


def launch(module: str, kernel: str, args: Sequence[tuple[str, Any]], *, device: str = "cpu",
           device_id: int = 0, units: int = 1, stream: int = 0) -> None:
    """Run ``kernel`` from ``kernels/<module>.cu``.

    ``units`` is the size of the kernel's outermost SRK_LOOP (it sets the GPU grid); ``stream``
    is a CUDA stream pointer (GPU only).
    """
    codes = "".join(c for c, _ in args)
    if device == "cpu":
        _cpu_function(module, kernel, codes)(*[v for _, v in args])
        return
    import cupy
    fn = _gpu_function(module, kernel, device_id)
    blocks = max(1, min((units + GPU_BLOCK - 1) // GPU_BLOCK, _sm_count(device_id) * GPU_BLOCKS_PER_SM))
    values = tuple(_NUMPY[c](v) for c, v in args)
    # RawKernel launches on CuPy's current stream: make the caller's stream current for the call.
    with cupy.cuda.Device(device_id), cupy_stream(stream, device_id):
        fn((blocks,), (GPU_BLOCK,), values)
