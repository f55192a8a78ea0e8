"""The one bit-exact comparator, shared by the test suite, the ``mpirun`` test workers and
``benchmarks/gpu_check.py`` (as ``torch.testing`` / ``cupy.testing`` are for their projects).

A comparison is of raw bit patterns, never of values: ``-0.0`` differs from ``0.0`` and a NaN
matches only the identical NaN, unless ``nan`` relaxes that for a reference whose NaN encoding
the contract does not fix (``"sign"``: any two NaNs of the same sign; ``"any"``: any two NaNs).

Beside it, the few helpers that the tests and ``gpu_check`` both need and that are not facts of
a format: every bit pattern of a format, its grid of values, and where ``mpirun`` is.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .formats import NP_DTYPES, Format, dtype_name

NAN_RULES = ("exact", "sign", "any")
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def host_array(a: Any) -> np.ndarray:
    """A NumPy array with ``a``'s bytes: NumPy / ml_dtypes as is; torch and CuPy copied to the host
    (a torch float tensor as the NumPy / ml_dtypes dtype of the same name, so NaNs stay NaNs)."""
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        import torch
        t = a.detach().cpu().contiguous()
        width = t.element_size()
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
        raw = t.view(as_int).numpy().view(_UINT[width])  # through integers: torch.numpy() has no BF16/FP8
        np_dt = NP_DTYPES.get(dtype_name(t.dtype))
        return raw if np_dt is None else raw.view(np_dt)
    if mod == "cupy":
        return a.get()
    return np.asarray(a)


def bits_of(a: Any) -> np.ndarray:
    """The raw bits of an array of any framework, flat, as unsigned integers of its width (a view
    of ``a`` when it is a C-contiguous NumPy array, so writing into it writes ``a``)."""
    a = np.ascontiguousarray(host_array(a))
    return a.view(_UINT[a.itemsize]).reshape(-1)


def _nan_mask(a: np.ndarray) -> np.ndarray:
    """Which elements are NaNs (all False for integer data, which has none)."""
    if a.dtype.kind in "iub":
        return np.zeros(a.size, dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.isnan(np.ascontiguousarray(a).astype(np.float64 if a.itemsize == 8 else np.float32)).reshape(-1)


def first_difference(got: Any, want: Any, nan: str = "exact", limit: int = 10, shape_free: bool = False) -> dict:
    """Compare bit for bit. Returns ``{"ok", "n", "mismatches", "first": [(index, got, want)],
    "error"}``: ``first`` lists up to ``limit`` differing flat indices with both bit patterns;
    ``error`` is set (and ``ok`` false) when the shapes (unless ``shape_free``: the flat bits
    alone), sizes or widths differ."""
    if nan not in NAN_RULES:
        raise ValueError(f"nan must be one of {NAN_RULES}, got {nan!r}")
    ga, wa = np.asarray(host_array(got)), np.asarray(host_array(want))
    g, w = bits_of(ga), bits_of(wa)
    if ga.shape != wa.shape and not shape_free:
        return {"ok": False, "n": int(w.size), "mismatches": None, "first": [],
                "error": f"shape {ga.shape}, expected {wa.shape}"}
    if g.shape != w.shape or g.itemsize != w.itemsize:
        return {"ok": False, "n": int(w.size), "mismatches": None, "first": [],
                "error": f"{g.size} elements of {g.itemsize} bytes, expected {w.size} of {w.itemsize}"}
    diff = g != w
    if nan != "exact" and diff.any():
        both = _nan_mask(ga) & _nan_mask(wa)
        if nan == "sign":
            top = np.array(8 * g.itemsize - 1, dtype=g.dtype)
            both &= (g >> top) == (w >> top)
        diff &= ~both
    idx = np.nonzero(diff)[0]
    return {"ok": idx.size == 0, "n": int(g.size), "mismatches": int(idx.size),
            "first": [(int(i), int(g[i]), int(w[i])) for i in idx[:limit]], "error": None}


def mismatch_report(rec: dict, what: str = "", x: Any = None, width: int | None = None) -> str:
    """Lines naming the first differing indices and their bit patterns (``x``: the FP32 input,
    printed beside each index when given)."""
    if rec["error"]:
        return f"{what}: {rec['error']}"
    digits = 2 * (width or 4)
    xb = None if x is None else np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    lines = [f"{what}: {rec['mismatches']} of {rec['n']} elements differ; first ones:"]
    for i, g, w in rec["first"]:
        src = "" if xb is None else f" x=0x{int(xb[i]):08x} ({float(xb.view(np.float32)[i])!r})"
        lines.append(f"  [{i}]{src} got 0x{g:0{digits}x} want 0x{w:0{digits}x}")
    return "\n".join(lines)


def assert_same_bits(got: Any, want: Any, x: Any = None, what: str = "", nan: str = "exact",
                     shape_free: bool = False) -> None:
    """Raise ``AssertionError`` with the first differing indices and bit patterns unless ``got``
    and ``want`` have the same shape and bits (any framework; ``nan`` and ``shape_free`` as in
    :func:`first_difference`)."""
    rec = first_difference(got, want, nan, shape_free=shape_free)
    if not rec["ok"]:
        raise AssertionError(mismatch_report(rec, what, x, bits_of(want).itemsize))


def all_patterns(fmt: Format) -> np.ndarray:
    """Every bit pattern of ``fmt``, in order, as an array of the format."""
    return np.arange(2 ** fmt.nbits, dtype=np.uint64).astype(fmt.uint).view(fmt.np_type)


def format_grid(fmt: Format) -> np.ndarray:
    """The sorted non-negative finite values of ``fmt`` (float64), 0 first."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = all_patterns(fmt).astype(np.float64)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


def find_mpirun() -> str | None:
    """The ``mpirun`` to launch test processes with: the one beside ``sys.executable`` first (a
    virtual environment's MPICH wheel, which matches its mpi4py), else the first on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")
