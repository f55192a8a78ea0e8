"""Kernel launch on every backend: the tensor's device picks CUDA, ``SRKERN_BACKEND`` the rest.

Backends for CPU tensors (``SRKERN_BACKEND``, default ``cpu``):

* ``cpu``: the host build with this CPU's SIMD paths (``-march=native``).
* ``cpu-portable``: the same sources without SIMD intrinsics (the portable fallbacks).
* ``gpu-emu``: the kernels' GPU code built by the host compiler, run over every (block, thread)
  of the grid a CUDA launch would use (``SRKERN_EMU_SMS`` multiprocessors, default 132 as on an
  H200). For verification, not speed.

Arguments are given as ``(code, value)`` pairs, one code per C parameter type:
``p`` pointer, ``q`` int64, ``Q`` uint64, ``I`` uint32, ``i`` int32, ``f`` float32. Every backend
converts them the same way, through the NumPy scalar types CuPy is handed on a GPU, so an
out-of-range value raises the same ``OverflowError`` everywhere.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from typing import Any, Sequence

import numpy as np

from . import _build

_CTYPES = {"p": ctypes.c_uint64, "q": ctypes.c_int64, "Q": ctypes.c_uint64,
           "I": ctypes.c_uint32, "i": ctypes.c_int32, "f": ctypes.c_float}
_NUMPY = {"p": np.uint64, "q": np.int64, "Q": np.uint64, "I": np.uint32, "i": np.int32,
          "f": np.float32}
# The bits of each converted value as an unsigned integer, for the gpu-emu argument slots.
_SLOT_BITS = {"p": None, "q": np.uint64, "Q": None, "I": None, "i": np.uint32, "f": np.uint32}

BACKENDS = _build.BACKENDS
DEFAULT_BACKEND = "cpu"

# 256 threads per block, grids capped at 32 blocks per SM (grid-stride over the rest): a common
# starting point for memory-bound grid-stride kernels; a block-size sweep on a GPU may change it.
GPU_BLOCK = 256
GPU_BLOCKS_PER_SM = 32
EMU_SMS = 132  # an H200's multiprocessors: the grid gpu-emu runs unless SRKERN_EMU_SMS says otherwise


def cpu_backend() -> str:
    """The backend for CPU tensors: ``$SRKERN_BACKEND`` (read at every launch), default ``cpu``."""
    name = os.environ.get("SRKERN_BACKEND") or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise _build.BuildError(f"SRKERN_BACKEND={name!r} is not a backend: choose one of {BACKENDS}")
    return name


def emu_sms() -> int:
    """Multiprocessors gpu-emu sizes its grids for (``$SRKERN_EMU_SMS``, default 132)."""
    text = os.environ.get("SRKERN_EMU_SMS")
    if not text:
        return EMU_SMS
    if not text.isdigit() or int(text) < 1:
        raise _build.BuildError(f"SRKERN_EMU_SMS={text!r} must be a positive integer")
    return int(text)


def grid_blocks(units: int, sms: int) -> int:
    """Blocks of a CUDA launch over ``units`` loop iterations: one per GPU_BLOCK units, at most
    GPU_BLOCKS_PER_SM per multiprocessor (the grid-stride loop covers the rest)."""
    return max(1, min((units + GPU_BLOCK - 1) // GPU_BLOCK, sms * GPU_BLOCKS_PER_SM))


@functools.lru_cache(maxsize=None)
def _cpu_function(module: str, kernel: str, codes: str, backend: str):
    fn = getattr(_build.cpu_library(module, backend), kernel)
    fn.argtypes = [_CTYPES[c] for c in codes]
    fn.restype = None
    return fn


@functools.lru_cache(maxsize=None)
def _emu_function(module: str, kernel: str, sanitized: bool):
    fn = getattr(_build.cpu_library(module, "gpu-emu"), f"srk_emu_{kernel}")
    fn.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
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


def convert_args(args: Sequence[tuple[str, Any]]) -> tuple:
    """Each value as the NumPy scalar a CUDA launch passes (raises OverflowError out of range)."""
    return tuple(_NUMPY[c](v) for c, v in args)


def emu_slots(codes: str, values: tuple) -> np.ndarray:
    """gpu-emu's argument block: one uint64 per parameter holding the converted value's bytes."""
    slots = np.zeros(len(codes), dtype=np.uint64)
    for i, (c, v) in enumerate(zip(codes, values)):
        bits = _SLOT_BITS[c]
        slots[i] = v if bits is None else np.uint64(v.view(bits))
    return slots


def launch(module: str, kernel: str, args: Sequence[tuple[str, Any]], *, device: str = "cpu",
           device_id: int = 0, units: int = 1, stream: int = 0) -> None:
    """Run ``kernel`` from ``kernels/<module>.cu``.

    ``units`` is the size of the kernel's outermost SRK_LOOP (it sets the GPU grid, and the
    emulated one); ``stream`` is a CUDA stream pointer (GPU only).
    """
    codes = "".join(c for c, _ in args)
    values = convert_args(args)
    if device == "cpu":
        backend = cpu_backend()
        if backend == "gpu-emu":
            slots = emu_slots(codes, values)
            _emu_function(module, kernel, _build.emu_sanitized())(
                grid_blocks(units, emu_sms()), GPU_BLOCK, slots.ctypes.data)
        else:
            _cpu_function(module, kernel, codes, backend)(*values)
        return
    import cupy
    fn = _gpu_function(module, kernel, device_id)
    blocks = grid_blocks(units, _sm_count(device_id))
    # RawKernel launches on CuPy's current stream: make the caller's stream current for the call.
    with cupy.cuda.Device(device_id), cupy_stream(stream, device_id):
        fn((blocks,), (GPU_BLOCK,), values)
