"""The tensor table of the multi-tensor kernels (``kernels/srk_table.h``: AdamW and the norm), and
the checks of the tensor lists it is built from.

One launch covers a list of tensors: one row of ``TABLE_COLS`` u64 per tensor (six buffer
pointers, the element count, the logical offset, the first work unit). Both constants are read
from the header, so Python and the kernels cannot disagree on the row.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _backend, _build
from ._tensor import View, as_view, unwritable

TABLE_COLS, TABLE_UNIT0 = _build.kernel_defines("srk_table.h", "SRK_TABLE_COLS", "SRK_TABLE_UNIT0")
GRAD_DTYPES = ("bfloat16", "float32")


def views(name: str, xs: Any, n: int | None, allow_none: bool = False) -> list[View | None]:
    if xs is None or isinstance(xs, (str, bytes)) or not hasattr(xs, "__len__"):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    if n is not None and len(xs) != n:
        raise ValueError(f"{name} has {len(xs)} tensors, params has {n}")
    out: list[View | None] = []
    for i, x in enumerate(xs):
        if x is None:
            if allow_none:
                out.append(None)
                continue
            raise ValueError(f"{name}[{i}] is None (a parameter with no gradient): pass only "
                             "parameters that have gradients")
        out.append(as_view(x, f"{name}[{i}]"))
    return out


def check_list(name: str, views: Sequence[View], params: Sequence[View], dtypes: tuple[str, ...],
                written: bool) -> None:
    for i, (v, p) in enumerate(zip(views, params)):
        if v.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] has dtype {v.dtype}; this precision needs {' or '.join(dtypes)}")
        if v.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {v.shape}, params[{i}] has {p.shape}")
        if (v.device, v.device_id) != (params[0].device, params[0].device_id):
            raise ValueError(f"{name}[{i}] is on {v.device}:{v.device_id}, params[0] on "
                             f"{params[0].device}:{params[0].device_id}: one call runs on one device")
        if v.needs_copy:
            raise ValueError(f"{name}[{i}] cannot be {'written' if written else 'read'} in place: "
                             f"it {v.needs_copy}")
        if not v.contiguous:
            raise ValueError(f"{name}[{i}] must be contiguous and aligned to its element size (it is read/written in place)")
        if written and (why := unwritable(v)):
            raise ValueError(f"{name}[{i}] {why}")
    if views and len({v.dtype for v in views}) > 1:
        raise TypeError(f"{name} mixes dtypes {sorted({v.dtype for v in views})}: one dtype per call")


def table(params: Sequence[View], cols: Sequence[Sequence[int]], offsets: Sequence[int],
           units: Sequence[int]) -> tuple[np.ndarray, int]:
    """The kernels' tensor table (``kernels/srk_table.h``; one row per tensor: the six buffer
    pointers of ``cols``, the size, the logical offset and the first work unit) and the total
    number of work units, where tensor ``t`` has ``units[t]`` of them."""
    # Filled by column: a row at a time cost ~5 us a tensor (1,000 tensors: 5 ms per table).
    n = len(params)
    table = np.zeros((n, TABLE_COLS), dtype=np.uint64)
    if n == 0:
        return table, 0
    for j, c in enumerate(cols):
        table[:, j] = np.array(c, dtype=np.uint64)
    table[:, 6] = np.array([p.numel for p in params], dtype=np.uint64)
    table[:, 7] = np.array(offsets, dtype=np.uint64)
    u = np.array(units, dtype=np.uint64)
    table[1:, TABLE_UNIT0] = np.cumsum(u[:-1], dtype=np.uint64)
    return table, int(u.sum(dtype=np.uint64))


def device_table(table: np.ndarray, v: View, stream: int) -> tuple[Any, int]:
    """The table where the kernel can read it: (keep-alive object, pointer)."""
    if v.device == "cpu":
        return table, table.ctypes.data
    import cupy
    with cupy.cuda.Device(v.device_id), _backend.cupy_stream(stream, v.device_id):
        d = cupy.asarray(table)
    return d, d.data.ptr
