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
from typing import Any, Sequence

import numpy as np

from . import _build, _nvrtc

_CTYPES = {"p": ctypes.c_uint64, "q": ctypes.c_int64, "Q": ctypes.c_uint64,
           "I": ctypes.c_uint32, "i": ctypes.c_int32, "f": ctypes.c_float}
_NUMPY = {"p": np.uint64, "q": np.int64, "Q": np.uint64, "I": np.uint32, "i": np.int32,
          "f": np.float32}
# The bits of each converted value as an unsigned integer, for the gpu-emu argument slots.
_SLOT_BITS = {"p": None, "q": np.uint64, "Q": None, "I": None, "i": np.uint32, "f": np.uint32}

BACKENDS = _build.BACKENDS
DEFAULT_BACKEND = "cpu"

# The launch geometry of every backend, from kernels/srk_launch.h (where the choice is explained).
GPU_BLOCK, GPU_BLOCKS_PER_SM, EMU_SMS = _build.kernel_defines(
    "srk_launch.h", "SRK_GPU_BLOCK", "SRK_GPU_BLOCKS_PER_SM", "SRK_EMU_SMS")


def _env_reader(name: str):
    """A function that returns ``os.environ.get(name)``, faster: for a name that is not set,
    ``os.environ.get`` raises and catches a KeyError inside (~1.5 us, more than the rest of a 1K
    cast's checks together), while CPython keeps ``os.environ``'s contents in the dict
    ``os.environ._data`` under the encoded names, updated by every write through ``os.environ``
    (``monkeypatch.setenv`` included)."""
    try:
        data, key, decode = os.environ._data, os.environ.encodekey(name), os.environ.decodevalue
    except AttributeError:  # not CPython's os._Environ
        return lambda: os.environ.get(name)

    def read() -> str | None:
        value = data.get(key)
        return None if value is None else decode(value)
    return read


_backend_env = _env_reader("SRKERN_BACKEND")


def cpu_backend() -> str:
    """The backend for CPU tensors: ``$SRKERN_BACKEND`` (read at every launch), default ``cpu``."""
    name = _backend_env() or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise _build.BuildError(f"SRKERN_BACKEND={name!r} is not a backend: choose one of {BACKENDS}")
    return name


def emu_sms() -> int:
    """Multiprocessors gpu-emu sizes its grids for (``$SRKERN_EMU_SMS``, default EMU_SMS, 132)."""
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


def simd_path(backend: str | None = None) -> str:
    """The SIMD path the CPU kernels of ``backend`` run (default: :func:`cpu_backend`):
    ``"avx512"``, ``"avx2"`` or ``"portable"``, as the compiled cast library reports it
    (``srk_simd_path`` of kernels/cpu/philox_tile.h, the #if that picks the Philox tile), so the
    flags of the build, ``SRKERN_CPU_ISA`` included, decide it. ``"gpu-emu"`` and ``"cuda"``
    run the shared GPU bodies, no host SIMD path: their own names come back."""
    name = backend or cpu_backend()
    if name in ("gpu-emu", "cuda"):
        return name
    if name not in BACKENDS:
        raise _build.BuildError(f"backend {name!r} is not one of {BACKENDS + ('cuda',)}")
    fn = _build.cpu_library("cast", name).srk_simd_path
    fn.argtypes = []
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _check_asan_loaded() -> None:
    """A sanitized build loaded into a process without the ASan runtime kills the interpreter
    ("ASan runtime does not come first"): say what to do instead."""
    if not hasattr(ctypes.CDLL(None), "__asan_init"):
        raise _build.BuildError(
            "SRKERN_EMU_SANITIZE=1 needs the AddressSanitizer runtime loaded before Python: run with "
            "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 (make test-sanitize "
            "does), or unset SRKERN_EMU_SANITIZE")


@functools.lru_cache(maxsize=None)
def _emu_function(module: str, kernel: str, codes: str, sanitized: bool):
    """The emulated kernel's entry, once its C parameter sizes are checked against the argument
    codes (the sizes CuPy packs them with on a GPU)."""
    if sanitized:
        _check_asan_loaded()
    lib = _build.cpu_library(module, "gpu-emu")
    fn = getattr(lib, f"srk_emu_{kernel}")
    fn.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    fn.restype = None
    sig = (ctypes.c_uint32 * 65)()
    getattr(lib, f"srk_emu_sig_{kernel}")(sig)
    sizes = tuple(sig[1:1 + sig[0]])
    want = tuple(np.dtype(_NUMPY[c]).itemsize for c in codes)
    if sizes != want:
        raise _build.BuildError(f"{module}.cu:{kernel} takes parameters of {list(sizes)} bytes, but is "
                                f"launched with argument codes {codes!r} ({list(want)} bytes)")
    return fn


@functools.lru_cache(maxsize=None)
def _gpu_function(module: str, kernel: str, device_id: int):
    return _nvrtc.gpu_module(module, device_id).get_function(kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


class _RawStream:
    """A raw ``cudaStream_t`` speaking the CUDA stream protocol (for ``Stream.from_external``)."""
    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


# CuPy stream objects for raw stream pointers, made once per (pointer, device): a wrapper holds
# no CUDA resource, only the pointer, so it stays valid as long as the stream does. Bounded,
# because a program may create and destroy streams without end.
_STREAMS: dict[tuple[int, int], Any] = {}
_STREAMS_MAX = 1024


def _wrap_stream(ptr: int, device_id: int):
    import cupy
    stream_cls = cupy.cuda.Stream
    if hasattr(stream_cls, "from_external"):  # CuPy 14: the CUDA stream protocol, no warning
        with cupy.cuda.Device(device_id):  # from_external may record the current device
            return stream_cls.from_external(_RawStream(ptr))
    return cupy.cuda.ExternalStream(ptr, device_id)  # CuPy 13 (not deprecated there)


def cupy_stream(ptr: int, device_id: int):
    """A CuPy stream object for a raw ``cudaStream_t`` (0: the legacy default stream) on device
    ``device_id``: for ``with``-blocks, ``synchronize()`` and CuPy calls that take ``stream=``.

    Cached per (pointer, device), so a launch allocates nothing and touches no warning filters
    (which are process-wide, hence not thread-safe to change around each call). CuPy 14 wraps
    through ``Stream.from_external`` (the stream protocol), CuPy 13 through ``ExternalStream``.
    """
    key = (int(ptr), int(device_id))
    s = _STREAMS.get(key)
    if s is None:
        if len(_STREAMS) >= _STREAMS_MAX:
            _STREAMS.clear()
        s = _STREAMS.setdefault(key, _wrap_stream(*key))
    return s


def synchronize(ptr: int, device_id: int) -> None:
    """Wait for the work queued on CUDA stream ``ptr`` of device ``device_id`` (made current:
    the legacy default stream 0 is per device)."""
    import cupy
    with cupy.cuda.Device(device_id):
        cupy_stream(ptr, device_id).synchronize()


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
           device_id: int = 0, units: int = 1, stream: int = 0, exact: bool = False) -> None:
    """Run ``kernel`` from ``kernels/<module>.cu``.

    ``units`` is the size of the kernel's outermost SRK_LOOP (it sets the GPU grid, and the
    emulated one); ``stream`` is a CUDA stream pointer (GPU only). ``exact``: the caller has
    checked that every value is in its type's range and, for ``f``, already a float32 value, so
    on the cpu backends the values go to ctypes as they are (the conversion costs ~6 us for the
    16 arguments of an AdamW launch; ctypes' own conversion then changes no bit).
    """
    codes = "".join([a[0] for a in args])  # (a list: a generator costs ~2 us more for 16 arguments)
    if device == "cpu":
        backend = cpu_backend()
        if backend == "gpu-emu":
            slots = emu_slots(codes, convert_args(args))
            _emu_function(module, kernel, codes, _build.emu_sanitized())(
                grid_blocks(units, emu_sms()), GPU_BLOCK, slots.ctypes.data)
        else:
            values = [a[1] for a in args] if exact else convert_args(args)
            _cpu_function(module, kernel, codes, backend)(*values)
        return
    values = convert_args(args)
    import cupy
    fn = _gpu_function(module, kernel, device_id)
    blocks = grid_blocks(units, _sm_count(device_id))
    # cupy.cuda.function.Function.__call__(grid, block, args, shared_mem=0, stream=None) launches
    # on ``stream.ptr`` (None: CuPy's current stream), so the caller's stream is passed, not made
    # current. The device is made current because the module belongs to its context.
    with cupy.cuda.Device(device_id):
        fn((blocks,), (GPU_BLOCK,), values, shared_mem=0, stream=cupy_stream(stream, device_id))
