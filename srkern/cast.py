"""``srkern.cast``: FP32 to BF16 / FP16 / FP8 with stochastic or nearest rounding, and back."""
from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

from . import _backend, _contract
from .formats import FLOAT_DTYPES, FORMATS, FP8_DTYPES, NP_DTYPES, dtype_name
from ._tensor import (View, as_view, check_disjoint, contiguous, stream_of,
                      empty_like, finish, fp8_name, mark_written, relabel, unwritable)

ROUNDINGS = ("stochastic", "nearest")


def cast(x: Any, dtype: Any, *, rounding: str = "stochastic", seed: int | None = None,
         offset: int = 0, step: int = 0, stream: int = 0, saturate: bool = False,
         out: Any = None, cuda_stream: Any = None, x_dtype: Any = None) -> Any:
    """Round ``x`` to ``dtype``, or upcast a 16/8-bit tensor exactly to FP32.

    Args:
        x: any ``__dlpack__`` tensor (PyTorch, CuPy, JAX) or NumPy array, of dtype float32, or
            bfloat16 / float16 / float8_e4m3fn / float8_e5m2 (upcast exactly first when the
            target is another 16/8-bit format), or uint8 holding FP8 bit patterns together with
            ``x_dtype``. Non-contiguous inputs are copied to C order first (their logical order
            is C order), and so are inputs whose memory does not hold their values as such:
            NumPy arrays in non-native byte order or with byte strides that are not a multiple
            of the item size (fields of packed structured arrays), torch tensors with the
            negative bit.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float8_e4m3fn"``, ``"float8_e5m2"`` or
            ``"float32"`` (the exact upcast); names or torch / NumPy / ml_dtypes dtype objects.
        rounding: ``"stochastic"`` (contract v1) or ``"nearest"`` (ties to even, as PyTorch).
        seed: 64-bit Philox key; ``None`` draws one from :func:`srkern.manual_seed`'s generator.
        offset: logical index of ``x``'s first element: element ``p`` (C order) uses the draw of
            index ``offset + p``, so casting a slice with its offset equals casting the whole.
        step: 32-bit Philox counter word (for example the training step).
        stream: 32-bit random-stream id (contract v1 ``stream``, not a CUDA stream).
        saturate: a bool (Python or NumPy): finite values beyond the format's range give
            +-max finite instead of +-Inf (NaN for float8_e4m3fn).
        out: optional contiguous tensor of the target dtype, shape and device to write into;
            for an FP8 target it may also be a ``uint8`` tensor (any framework), which receives
            the format's bit patterns. Written in place, so it must also be in native byte
            order, without torch's negative bit, and not require grad while grad mode is on
            (write under ``torch.no_grad()``); a torch ``out``'s version counter is bumped, so
            a backward through a graph that saved it raises as after torch's in-place ops.
        cuda_stream: CUDA stream (pointer or object with ``.ptr`` / ``.cuda_stream``) for GPU
            work; default the producing framework's current stream (asynchronous). Another
            stream is fenced: the call synchronises the current stream before and ``cuda_stream``
            after its launches.
        x_dtype: ``"float8_e4m3fn"`` or ``"float8_e5m2"`` (or the ml_dtypes dtype): the FP8
            format whose bit patterns a ``uint8`` ``x`` holds. Required for a uint8 ``x`` (a
            uint8 ``x`` without it is a TypeError), refused for any other dtype of ``x``.

    FP8 with CuPy: CuPy has no FP8 dtypes, so CuPy FP8 data is carried as ``uint8`` arrays of
    the format's bit patterns. Casting a CuPy array to an FP8 format returns such a ``uint8``
    array; to upcast it or round it to another format, pass it back with ``x_dtype`` naming its
    format. (PyTorch, NumPy with ml_dtypes and JAX have FP8 dtypes and get FP8 results; their
    uint8 tensors are accepted the same way.)

    Returns:
        ``out`` if given, else a new tensor in ``x``'s framework and device (for an FP8 target
        and a CuPy ``x``: a ``uint8`` CuPy array of the bit patterns).
    """
    if out is None and cuda_stream is None and x_dtype is None:
        fast = _fast_cast(x, dtype, rounding, seed, offset, step, stream, saturate)
        if fast is not None:
            return fast
    target = dtype_name(dtype)
    if target not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if not isinstance(rounding, str):
        raise TypeError(f"rounding must be a string, one of {ROUNDINGS}, got {type(rounding).__name__}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if not isinstance(saturate, (bool, np.bool_)):  # 'no' and 0.5 are truthy
        raise TypeError(f"saturate must be a bool, got {type(saturate).__name__} {saturate!r}")
    # Nearest rounding draws no bits, but a given seed is still checked (None means 0).
    seed = (_contract.resolve_seed(seed) if rounding == "stochastic"
            else _contract.check_u64("seed", 0 if seed is None else seed))
    step = _contract.check_u64("step", step, _contract.U32)
    stream = _contract.check_u64("stream", stream, _contract.U32)
    x_fmt = fp8_name(x_dtype) if x_dtype is not None else None
    xv = _label_input(as_view(x, "x"), x_fmt, x_dtype)
    if xv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32 or one of {FLOAT_DTYPES[1:]}, got {xv.dtype}")
    if xv.dtype == "float32" and target == "float32":
        raise ValueError("x is already float32: choose a 16/8-bit dtype to round to")
    offset = _contract.check_offset("offset", offset, xv.numel)
    if not xv.contiguous:
        xv = _label_input(as_view(contiguous(x, xv.framework), "x"), x_fmt, x_dtype)
        if not xv.contiguous:  # a producer with no copy-to-C-order we know how to ask for
            raise ValueError(f"x is a strided {xv.framework} tensor; pass a C-contiguous copy")
    outv = _check_out(out, xv, target) if out is not None else None
    result = out if out is not None else empty_like(xv, target)
    if outv is None:
        outv = as_view(result, "out")
        if outv.dtype == "uint8" and target in FP8_DTYPES:  # CuPy's FP8 carrier (empty_like)
            outv = relabel(outv, target, "out")
    current = stream_of(xv)
    cs = current if cuda_stream is None or xv.device != "cuda" else _stream_ptr(cuda_stream)
    # Buffers made here were allocated on the framework's current stream and temporaries are
    # freed on return: a different cuda_stream is therefore fenced on both sides (synchronised).
    foreign = cs != current
    if foreign:
        _backend.synchronize(current, xv.device_id)

    if xv.dtype != "float32" and target != "float32":  # 16/8-bit -> other format: via exact FP32
        tmp = empty_like(xv, "float32")
        _upcast(xv, as_view(tmp, "tmp"), cs)
        xv = as_view(tmp, "tmp")
    if target == "float32":
        _upcast(xv, outv, cs)
    else:
        kernel = _cast_kernel(target, rounding)
        n = xv.numel
        _backend.launch("cast", kernel, [
            ("p", xv.ptr), ("p", outv.ptr), ("q", n), ("Q", offset), ("Q", seed), ("Q", step),
            ("I", stream), ("i", int(bool(saturate)))],
            device=xv.device, device_id=xv.device_id, units=-(-n // FORMATS[target].block) + 2, stream=cs)
    if foreign:
        _backend.synchronize(cs, xv.device_id)
    if out is None:
        return finish(result, xv, target)
    mark_written([outv])
    return out


def _label_input(xv: View, x_fmt: str | None, x_dtype: Any) -> View:
    """``xv`` with a uint8 FP8 carrier described as its format; refuse uint8 without ``x_dtype``
    and ``x_dtype`` with anything but uint8."""
    if x_fmt is None:
        if xv.dtype == "uint8":
            raise TypeError("x is a uint8 tensor: if it holds FP8 bit patterns (how CuPy carries FP8), "
                            "name the format with x_dtype='float8_e4m3fn' or x_dtype='float8_e5m2'")
        return xv
    if xv.dtype != "uint8":
        raise TypeError(f"x_dtype={x_dtype!r} is only for a uint8 x holding FP8 bit patterns; x has "
                        f"dtype {xv.dtype} (drop x_dtype)")
    return relabel(xv, x_fmt, "x")


def _upcast(xv: View, outv: View, cs: int) -> None:
    fmt = FORMATS[xv.dtype]
    # One GPU thread widens 16 bytes of x (upcast_body, kernels/cast.cu): a grid of numel units
    # would be 8-16 times the threads needed.
    _backend.launch("cast", f"cast_{fmt.short}_f32", [("p", xv.ptr), ("p", outv.ptr), ("q", xv.numel)],
                    device=xv.device, device_id=xv.device_id, units=-(-xv.numel // (16 // fmt.itemsize)),
                    stream=cs)


def _check_out(out: Any, xv: View, target: str) -> View:
    ov = as_view(out, "out")
    if ov.framework == "jax":
        raise TypeError("out: JAX arrays are immutable; call without out= to get a new array")
    if ov.dtype == "uint8" and target in FP8_DTYPES:  # the FP8 carrier: receives the bit patterns
        ov = relabel(ov, target, "out")
    if ov.dtype != target:
        also = " (or uint8 for its bit patterns)" if target in FP8_DTYPES else ""
        raise TypeError(f"out has dtype {ov.dtype}, expected {target}{also}")
    if ov.shape != xv.shape:
        raise ValueError(f"out has shape {ov.shape}, expected {xv.shape} (the shape of x)")
    if (ov.device, ov.device_id) != (xv.device, xv.device_id):
        raise ValueError(f"out is on {ov.device}:{ov.device_id}, x on {xv.device}:{xv.device_id}")
    why = unwritable(ov)
    if why:
        raise ValueError(f"out {why}")
    if not ov.contiguous:
        raise ValueError("out must be C-contiguous and aligned to its element size (it is written in place, without a copy)")
    check_disjoint([("x", xv), ("out", ov)], "casts do not run in place")
    return ov


@functools.lru_cache(maxsize=None)
def _cast_kernel(target: str, rounding: str) -> str:
    """The kernel rounding FP32 to ``target`` (a 16/8-bit format) with ``rounding``."""
    return f"cast_f32_{FORMATS[target].short}_{'sr' if rounding == 'stochastic' else 'rn'}"


def _stream_ptr(cuda_stream: Any) -> int:
    """A stream given as a pointer or as an object with ``.ptr`` (CuPy) / ``.cuda_stream`` (torch)."""
    for attr in ("ptr", "cuda_stream"):
        if hasattr(cuda_stream, attr):
            return int(getattr(cuda_stream, attr))
    return int(cuda_stream)


# ---- the common case, fast ----------------------------------------------------------------------
# A contiguous FP32 CPU tensor (torch or NumPy) rounded to a 16/8-bit format, no out= and no
# streams: the checks above reduced to what that case needs, and the kernel called directly with
# values already checked to fit its parameters (what _backend.launch's conversion would check).
# 1K elements: ~16 us a call through the general path (torch .to: 2.8 us), ~4 us here. Anything
# else, or any argument out of the ordinary, returns None and takes the general path, which
# decides and raises.

_F32 = np.dtype(np.float32)
_CAST_CODES = "ppqQQQIi"
_FAST_FW: dict[type, str] = {np.ndarray: "numpy"}
_TARGETS: dict[Any, str | None] = {}   # dtype argument -> a 16/8-bit format name, or None
_TORCH: list[Any] = []                 # [torch.float32, {format name: torch dtype}] once torch is seen
_U32, _U64 = _contract.U32, _contract.U64


def _fast_target(dtype: Any) -> str | None:
    try:
        return _TARGETS[dtype]
    except KeyError:
        pass
    except TypeError:  # unhashable: the general path says what is wrong
        return None
    try:
        name = dtype_name(dtype)
    except Exception:
        name = None
    _TARGETS[dtype] = name if name in FORMATS else None
    return _TARGETS[dtype]


def _fast_cast(x: Any, dtype: Any, rounding: Any, seed: Any, offset: Any, step: Any, stream: Any,
               saturate: Any) -> Any:
    t = type(x)
    fw = _FAST_FW.get(t)
    if fw is None:
        if t.__module__ != "torch" or t.__name__ != "Tensor":
            return None
        torch = sys.modules["torch"]
        _TORCH[:] = [torch.float32, {name: getattr(torch, name) for name in FORMATS}]
        fw = _FAST_FW[t] = "torch"
    target = _fast_target(dtype)
    if (target is None or type(rounding) is not str or rounding not in ROUNDINGS or type(saturate) is not bool
            or type(step) is not int or not 0 <= step < _U32 or type(stream) is not int or not 0 <= stream < _U32
            or type(offset) is not int or offset < 0
            or (seed is not None and (type(seed) is not int or not 0 <= seed < _U64))):
        return None
    if fw == "torch":
        if x.dtype is not _TORCH[0] or not x.is_cpu or x.is_neg() or not x.is_contiguous():
            return None
        ptr, n = x.data_ptr(), x.numel()
        if ptr % 4:
            return None
    else:
        if x.dtype != _F32 or not (x.flags.c_contiguous and x.flags.aligned):
            return None
        ptr, n = x.ctypes.data, x.size
    if offset + max(n, 1) > _U64:
        return None
    backend = _backend.cpu_backend()  # read at every launch, as _backend.launch does
    if backend == "gpu-emu":  # its grid runner: the general path
        return None
    kernel = _cast_kernel(target, rounding)
    # _backend's own cache of loaded functions (not one here, which its cache_clear would miss)
    fn = _backend._cpu_function("cast", kernel, _CAST_CODES, backend)
    # Every check has passed: only now may a seed be drawn.
    if seed is None:
        seed = _contract.next_seed() if rounding == "stochastic" else 0
    if fw == "torch":
        result = sys.modules["torch"].empty_like(x, dtype=_TORCH[1][target])  # 1.2 us; empty(shape): 2.6
        optr = result.data_ptr()
    else:
        result = np.empty(x.shape, dtype=NP_DTYPES[target])
        optr = result.ctypes.data
    fn(ptr, optr, n, offset, seed, step, stream, int(saturate))
    return result
