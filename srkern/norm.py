"""``srkern.grad_norm``: the global L2 norm of a list of gradients, for clipping.

One launch computes FP64 partial sums of squares in a fixed order (``kernels/norm.cu``, whose
header comment states the layout); the host adds them left to right. The result is a function of
the gradients' values only: the same bits on every backend, thread count and launch shape.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import _backend, _build, _contract, _table
from .formats import KERNEL_SUFFIX
from ._tensor import stream_of

# The partial layout, from kernels/norm.cu: spans of _NORM_THREADS partials x _NORM_CHUNK
# elements per tensor, groups of _NORM_LANES elements.
_NORM_LANES, _NORM_THREADS, _NORM_CHUNK = _build.kernel_defines(
    "norm.cu", "NORM_LANES", "NORM_THREADS", "NORM_CHUNK")
_NORM_SPAN = _NORM_THREADS * _NORM_CHUNK  # elements per span (65536)


class GradNorm(NamedTuple):
    """Global L2 norm of a list of gradients, and whether every element was finite."""
    norm: float
    finite: bool


def grad_norm(grads: Sequence[Any], *, grad_scale: float = 1.0) -> GradNorm:
    """The L2 norm of all ``grads`` together (as one flat vector) and a finiteness flag.

    ``grads``: BF16 or FP32 contiguous tensors on one device (one dtype per call), read in place
    (so NumPy's non-native byte order or packed-field strides and torch's negative bit are
    refused). Each element is multiplied by ``grad_scale`` in FP32 (as :func:`srkern.adamw_step`
    does), squared and summed in FP64, in a fixed order that is a function of element indices only, so the result is
    deterministic: the same bits on every backend and thread count.

    The order (``kernels/norm.cu``, its header comment): each tensor is cut from its first
    element into spans of 32 x 2048 = 65536 elements, each span into 32 partial sums; partial
    ``l`` of a span sums, for rows ``k = 0..255`` in order, the 8 elements
    ``span_start + 256*k + 8*l + e`` into 8 accumulators (one per ``e``), which are then added
    as ``((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7))``. The partials of all tensors (32 per span, in
    tensor and span order; a tensor's last span is padded with zero partials) are added left to
    right on the host. A NaN anywhere gives a NaN norm (the canonical quiet NaN, contract v1.1).

    ``finite`` is False iff some element, multiplied by ``grad_scale`` in FP32, is Inf or NaN
    (then ``norm`` is Inf or NaN). For clipping to ``max_norm``, pass
    ``grad_scale = min(1, max_norm / (norm + 1e-6))`` to :func:`srkern.adamw_step`.
    """
    partial = _sumsq_partials(grads, grad_scale=grad_scale)
    if partial.size == 0:
        return GradNorm(0.0, True)
    # Left to right in index order (np.cumsum is a sequential scan; np.sum would add pairwise):
    # the same bits as a Python loop of +=, on every backend.
    total = float(np.cumsum(partial)[-1])
    if math.isnan(total):
        return GradNorm(math.nan, False)  # math.nan: the canonical 0x7ff8000000000000
    return GradNorm(math.sqrt(total), math.isfinite(total))


def _sumsq_partials(grads: Sequence[Any], *, grad_scale: float = 1.0) -> np.ndarray:
    """The kernel's FP64 partial sums of squares (layout: :func:`grad_norm`), as a NumPy array."""
    grad_scale = _contract.check_f32("grad_scale", grad_scale, -math.inf)
    gv = _table.views("grads", grads, None)
    if not gv:
        return np.zeros(0, dtype=np.float64)
    _table.check_list("grads", gv, gv, _table.GRAD_DTYPES, False)
    # Units of the norm: partials, _NORM_THREADS per span of _NORM_SPAN elements (see grad_norm).
    zero = [0] * len(gv)
    table, nparts = _table.table(gv, [zero, [g.ptr for g in gv], zero, zero, zero, zero], zero,
                           [_NORM_THREADS * -(-g.numel // _NORM_SPAN) for g in gv])
    if nparts == 0:
        return np.zeros(0, dtype=np.float64)
    g0 = gv[0]
    stream = stream_of(g0)
    keep, tptr = _table.device_table(table, g0, stream)
    if g0.device == "cpu":
        partial = np.empty(nparts, dtype=np.float64)
        pptr = partial.ctypes.data
    else:
        import cupy
        with cupy.cuda.Device(g0.device_id), _backend.cupy_stream(stream, g0.device_id):
            dpart = cupy.empty(nparts, dtype=np.float64)
        pptr = dpart.data.ptr
    _backend.launch("norm", f"norm_sumsq_g{KERNEL_SUFFIX[g0.dtype]}", [
        ("p", tptr), ("q", len(gv)), ("q", nparts), ("f", float(np.float32(grad_scale))),
        ("p", pptr)], device=g0.device, device_id=g0.device_id, units=nparts, stream=stream)
    if g0.device != "cpu":
        import cupy
        cs = _backend.cupy_stream(stream, g0.device_id)
        with cupy.cuda.Device(g0.device_id), cs:
            partial = cupy.asnumpy(dpart, stream=cs)
            cs.synchronize()
    del keep
    return partial
