"""Tensor plumbing: read any framework's tensor as a raw view, and make results in its framework.

DLPack is read by ``cuda.core``'s ``StridedMemoryView`` (a maintained reader of any
``__dlpack__`` producer, BF16 included). Two gaps are filled here: NumPy refuses to export BF16
and FP8 through DLPack, so NumPy arrays are read through their array interface; and the DLPack
reader does not know the FP8 type codes, so FP8 tensors are read as bytes and re-labelled.
"""
from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .formats import FLOAT_DTYPES, FP8_DTYPES, NP_DTYPES, dtype_name  # noqa: F401 (re-exported)

_FRAMEWORK_BY_TYPE: dict[type, str] = {}
_TORCH_DTYPE_NAMES: dict[Any, str] = {}


def framework_of(x: Any) -> str:
    """"numpy", "torch", "cupy", "jax" or "dlpack" (any other producer); cached per type."""
    t = type(x)
    fw = _FRAMEWORK_BY_TYPE.get(t)
    if fw is None:
        mod = t.__module__.split(".")[0]
        if isinstance(x, np.ndarray):
            fw = "numpy"
        elif mod in ("torch", "cupy", "jax", "jaxlib"):
            fw = "jax" if mod == "jaxlib" else mod
        else:
            fw = "dlpack"
        _FRAMEWORK_BY_TYPE[t] = fw
    return fw


@dataclass
class View:
    """A raw, framework-free description of a tensor: where it is and how it is laid out."""
    obj: Any
    framework: str
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    dtype: str
    device: str  # "cpu" or "cuda"
    device_id: int
    readonly: bool
    # Why the memory does not hold the values as ``dtype`` describes them, in C-contiguous
    # elements ("" when it does): NumPy's non-native byte order or byte strides that are not a
    # multiple of the item size, torch's negative bit (a lazy negation). Such a view is
    # neither read nor written in place (``contiguous`` is False); :func:`contiguous` copies it.
    needs_copy: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return NP_DTYPES[self.dtype].itemsize if self.dtype in NP_DTYPES else np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def contiguous(self) -> bool:
        """Dense in C order and aligned to the element size: what a kernel may read or write in
        place (a float at an odd address is undefined behaviour in C++ and a fault on a GPU)."""
        if self.needs_copy:
            return False
        if self.numel == 0:  # nothing to lay out (NumPy reports stride 0 for empty arrays)
            return True
        if self.ptr % self.itemsize:
            return False
        expect = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expect:
                return False
            expect *= size
        return True


def check_disjoint(named: list[tuple[str, View]], why: str) -> None:
    """The one overlap check: no two of the named views may share a byte of memory (a sweep over
    their address intervals, per device). Raises ``ValueError`` "<a> overlaps <b> in memory: <why>"."""
    spans = sorted((v.device, v.device_id, v.ptr, v.ptr + v.nbytes, name) for name, v in named if v.numel > 0)
    prev = None  # (device, device_id, end, owner) of the furthest-reaching span so far
    for dev, dev_id, lo, hi, name in spans:
        if prev is not None and prev[:2] == (dev, dev_id) and lo < prev[2]:
            raise ValueError(f"{name} overlaps {prev[3]} in memory: {why}")
        if prev is None or prev[:2] != (dev, dev_id) or hi > prev[2]:
            prev = (dev, dev_id, hi, name)


def as_view(x: Any, name: str = "x") -> View:
    """Describe ``x`` (any ``__dlpack__`` tensor or NumPy array) without copying it."""
    fw = framework_of(x)
    if fw == "numpy":
        isz, why = x.itemsize or 1, ""  # 0 for 'V0': refused by every caller's dtype check
        if not x.dtype.isnative:  # the dtype's name says float32 for '>f4' too
            why = (f"has non-native byte order ({x.dtype.str!r}): srkern reads and writes native "
                   "order only (a.astype(a.dtype.newbyteorder('=')) is a native copy)")
        elif any(s % isz for s, n in zip(x.strides, x.shape) if n > 1):
            why = (f"has byte strides {x.strides} that are not a multiple of its item size {isz} "
                   "(a field of a packed structured array?): srkern needs whole-element strides "
                   "(np.ascontiguousarray(a) is such a copy)")
        return View(x, fw, x.__array_interface__["data"][0], tuple(x.shape),
                    tuple(s // isz for s in x.strides), x.dtype.name, "cpu", 0,
                    not x.flags.writeable, why)
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be a tensor with __dlpack__ (PyTorch, CuPy, NumPy, JAX), "
                        f"got {type(x).__name__}")
    if fw == "torch":
        dev = x.device
        if dev.type in ("cpu", "cuda"):
            # torch's own accessors: reading through DLPack costs ~100 us a tensor, which
            # dominates small casts and optimizer steps over many small tensors.
            dname = _TORCH_DTYPE_NAMES.get(x.dtype)
            if dname is None:
                dname = _TORCH_DTYPE_NAMES.setdefault(x.dtype, dtype_name(x.dtype))
            # A lazy negation: the memory holds the other sign. (The conjugate bit exists only on
            # complex tensors, which every kernel's dtype check refuses: not tested here.)
            why = _NEG_BIT if x.is_neg() else ""
            return View(x, fw, x.data_ptr(), tuple(x.shape), x.stride(), dname, dev.type,
                        (dev.index or 0) if dev.type == "cuda" else 0, False, why)
    src, label = x, None
    if fw == "torch":
        src = x.detach()
        if dtype_name(x.dtype) in FP8_DTYPES:
            import torch
            src, label = src.view(torch.uint8), dtype_name(x.dtype)
    from cuda.core.utils import StridedMemoryView

    try:
        dev_type, dev_id = x.__dlpack_device__()
    except Exception as e:  # e.g. torch's meta device: name the argument, not just the device
        raise TypeError(f"{name}: its device cannot be read through DLPack: {e}") from e
    on_gpu = int(dev_type) in (2, 13)  # kDLCUDA, kDLCUDAManaged
    if fw == "jax" and not on_gpu and dtype_name(x.dtype) in FP8_DTYPES:
        # The DLPack reader does not know FP8 codes and JAX has no in-place byte view: read the
        # host buffer through NumPy (ml_dtypes), keeping that array alive in the View.
        a = np.asarray(x)
        return View(a, fw, a.__array_interface__["data"][0], tuple(a.shape),
                    tuple(st // a.itemsize for st in a.strides), a.dtype.name, "cpu", 0, True)
    # The consumer's stream for the producer to order its work before (DLPack protocol): -1 for
    # host memory (no synchronisation); on CUDA 0 is not allowed, 1 is the legacy default stream
    # and 2 the per-thread default, so a current stream of 0 (legacy default) is passed as 1.
    stream_ptr = dlpack_stream(current_stream_ptr(x, fw)) if on_gpu else -1
    try:
        v = StridedMemoryView.from_dlpack(src, stream_ptr=stream_ptr)
    except Exception as e:
        raise TypeError(f"{name}: could not read it through DLPack: {e}") from e
    shape = tuple(v.shape)
    strides = tuple(v.strides) if v.strides is not None else _c_strides(shape)
    try:
        dtype = label or dtype_name(v.dtype)
    except Exception as e:  # a DLPack type code the reader does not know
        raise TypeError(f"{name}: unsupported dtype: {e}") from e
    readonly = bool(v.readonly) or fw == "jax"  # JAX arrays are immutable
    return View(x, fw, int(v.ptr), shape, strides, dtype, "cuda" if on_gpu else "cpu",
                int(dev_id) if on_gpu else 0, readonly)


_NEG_BIT = ("has torch's negative bit set (a lazy negation, as from torch._neg_view or c.conj().imag): "
            "its memory holds the negated values (.resolve_neg() is a tensor without it)")


def unwritable(v: View) -> str:
    """Why ``v`` may not be written in place, as a phrase that follows its name ("" when it may):
    read-only, memory that does not hold the values as its dtype says, or a write torch would
    refuse (srkern writes through raw pointers, which autograd does not see; see also
    :func:`mark_written`). Callers name the tensor, so this costs no formatting per tensor."""
    if v.readonly:
        return "is read-only"
    if v.needs_copy:
        return f"cannot be written in place: it {v.needs_copy}"
    if v.framework == "torch":
        t = v.obj
        if t.requires_grad and sys.modules["torch"].is_grad_enabled():
            return ("requires grad and grad mode is on: srkern's in-place write is invisible to "
                    "autograd (torch refuses in-place writes into leaves that require grad); write "
                    "under torch.no_grad(), as optimizers do")
        if t.is_inference() and not sys.modules["torch"].is_inference_mode_enabled():
            return ("is an inference tensor: torch allows writing it only inside "
                    "torch.inference_mode() (or write into a clone)")
    return ""


def mark_written(views: list[View]) -> None:
    """Bump the version counter of every torch tensor among ``views``, which a kernel has just
    written: a backward through a graph that saved one then raises, as after torch's own
    in-place ops."""
    bump_versions([v.obj for v in views if v.framework == "torch"])


def bump_versions(tensors: list) -> None:
    """:func:`mark_written` for torch tensors given as such (one call for the whole list)."""
    if not tensors:
        return
    import torch
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # a torch whose increment_version takes one tensor, none inference-only
        for t in tensors:
            if not t.is_inference():
                torch.autograd.graph.increment_version(t)


def host_bytes(x: Any) -> bytes:
    """The raw bytes of a contiguous tensor (copied to the host): checkpoints, broadcasts."""
    v = as_view(x, "x")
    if not v.contiguous:  # its bytes would not be its values in C order
        raise ValueError("host_bytes needs a C-contiguous tensor in native byte order"
                         + (f": it {v.needs_copy}" if v.needs_copy else ""))
    if v.nbytes == 0:
        return b""
    if v.device == "cuda":
        import cupy
        with cupy.cuda.Device(v.device_id):
            cupy.cuda.Device(v.device_id).synchronize()
            host = np.empty(v.nbytes, dtype=np.uint8)
            cupy.cuda.runtime.memcpy(host.ctypes.data, v.ptr, v.nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
        return host.tobytes()
    return ctypes.string_at(v.ptr, v.nbytes)


def write_host_bytes(x: Any, data: bytes | memoryview) -> None:
    """Overwrite a contiguous tensor with raw bytes of exactly its size."""
    v = as_view(x, "x")
    why = unwritable(v) or ("" if v.contiguous else "is not C-contiguous")
    if why:
        raise ValueError(f"write_host_bytes: the tensor {why}")
    if len(data) != v.nbytes:
        raise ValueError(f"expected {v.nbytes} bytes, got {len(data)}")
    if v.nbytes == 0:
        return
    src = np.frombuffer(data, dtype=np.uint8)
    if v.device == "cuda":
        import cupy
        with cupy.cuda.Device(v.device_id):
            cupy.cuda.Device(v.device_id).synchronize()
            cupy.cuda.runtime.memcpy(v.ptr, src.ctypes.data, v.nbytes, cupy.cuda.runtime.memcpyHostToDevice)
    else:
        ctypes.memmove(v.ptr, src.ctypes.data, v.nbytes)


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def current_stream_ptr(x: Any, fw: str) -> int:
    """The producing framework's current CUDA stream for ``x``'s device (0: legacy default)."""
    if fw == "torch":
        import torch
        return torch.cuda.current_stream(x.device).cuda_stream
    if fw == "cupy":
        import cupy
        return cupy.cuda.get_current_stream().ptr
    return 0


def dlpack_stream(ptr: int) -> int:
    """A raw CUDA stream pointer as the ``stream=`` of ``__dlpack__``: 0 (the legacy default
    stream, which DLPack does not allow) becomes 1, its DLPack spelling; others pass unchanged."""
    return 1 if ptr == 0 else ptr


def stream_of(v: View) -> int:
    """The CUDA stream GPU work on ``v`` runs on by default: its framework's current stream
    (0 on CPU, where there are no streams)."""
    return current_stream_ptr(v.obj, v.framework) if v.device == "cuda" else 0


def contiguous(x: Any, fw: str) -> Any:
    """A C-contiguous version of ``x`` in its own framework (a copy only when needed)."""
    if fw == "torch":
        return x.resolve_conj().resolve_neg().contiguous()  # each a no-op without its bit
    if fw == "cupy":
        import cupy
        return cupy.ascontiguousarray(x)
    if fw == "numpy":  # dense, element-aligned and native byte order (a copy if not)
        return np.require(x, None if x.dtype.isnative else x.dtype.newbyteorder("="), ("C", "A"))
    return x  # JAX and other DLPack producers hand out dense tensors


def empty_like(v: View, dtype: str, shape: tuple[int, ...] | None = None) -> Any:
    """A new uninitialised tensor in ``v``'s framework and on its device.

    On a GPU outside torch the tensor is a CuPy array, and CuPy has no FP8 dtypes: an FP8 result
    is a ``uint8`` CuPy array holding the format's bit patterns (see :func:`relabel`)."""
    shape = v.shape if shape is None else shape
    fw = v.framework
    if fw == "torch":
        import torch
        return torch.empty(shape, dtype=getattr(torch, dtype), device=v.obj.device)
    np_dtype = NP_DTYPES[dtype] if dtype in NP_DTYPES else np.dtype(dtype)
    if v.device == "cuda":
        import cupy
        with cupy.cuda.Device(v.device_id):
            return cupy.empty(shape, dtype=np.uint8 if dtype in FP8_DTYPES else np_dtype)
    return np.empty(shape, dtype=np_dtype)


def fp8_name(dtype: Any) -> str:
    """The canonical name of an FP8 format given as a name or dtype object, else ValueError."""
    name = dtype_name(dtype)
    if name not in FP8_DTYPES:
        raise ValueError(f"x_dtype names the FP8 format a uint8 array holds: one of {FP8_DTYPES}, got {dtype!r}")
    return name


def relabel(v: View, dtype: str, name: str = "x") -> View:
    """``v``, a ``uint8`` view holding FP8 bit patterns, described as FP8 format ``dtype``."""
    if v.dtype != "uint8":
        raise TypeError(f"{name}: only a uint8 tensor carries FP8 bit patterns, got {v.dtype}")
    return replace(v, dtype=fp8_name(dtype))


def finish(result: Any, v: View, dtype: str | None = None) -> Any:
    """Hand ``result`` (made by :func:`empty_like` for ``dtype``) back in ``v``'s framework.

    JAX has FP8 dtypes: an FP8 result carried as ``uint8`` on a GPU is bit-cast back to FP8
    there. CuPy has none, so a CuPy result stays the ``uint8`` carrier."""
    if v.framework == "jax":
        import jax
        import jax.numpy as jnp
        if v.device == "cuda":
            out = jax.dlpack.from_dlpack(result)
            if dtype in FP8_DTYPES and out.dtype == jnp.uint8:
                out = jax.lax.bitcast_convert_type(out, jnp.dtype(NP_DTYPES[dtype]))
            return out
        return jnp.asarray(result)
    return result
