"""``srkern.add_``: ``acc += alpha * x`` into a BF16 or FP16 tensor, with stochastic rounding."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _backend, _contract
from .formats import KERNEL_SUFFIX
from ._tensor import View, as_view, contiguous, mark_written, stream_of, unwritable

ROUNDINGS = ("stochastic", "nearest")
ACC_DTYPES = ("bfloat16", "float16")
X_DTYPES = ("float32", "bfloat16", "float16")
STREAM = _contract.STREAMS["accum"]
UNIT = 8  # logical indices per unit of work (kernels/accum.cu): the grid is ceil(n / 8) + 2 units


def add_(acc: Any, x: Any, *, alpha: float = 1.0, rounding: str = "stochastic",
         seed: int | None = None, offset: int = 0, step: int = 0) -> Any:
    """``acc += alpha * x`` in place, the sum computed in FP32 and rounded back into ``acc``.

    Per element, in FP32 and in this order (kernels/accum.cu): ``s = a + alpha * xv`` with ``a``
    and ``xv`` the exact FP32 values of ``acc`` and ``x`` and ``alpha`` rounded to FP32, two IEEE
    operations (no fused multiply-add: with ``alpha == 1`` the product is exact anyway); then
    ``acc = round(s)``, which is exactly ``srkern.cast(s, acc.dtype, rounding=rounding, seed=seed,
    offset=offset + p, step=step, stream=srkern.STREAMS["accum"])`` for the element at C-order
    position ``p``, except that a NaN sum is stored as the canonical NaN of contract v1.1 (BF16
    0x7fc0, FP16 0x7e00). Finite sums beyond the format's range give +-Inf (no saturation).

    Random bits (contract v1.1): stream ``accum`` (8), used by nothing else; element ``p`` has
    logical index ``offset + p``; a BF16 ``acc`` takes that index's 16-bit draw, an FP16 ``acc``
    its 32-bit draw. Repeated accumulation into the same tensor must advance ``step`` (or change
    ``seed``) between calls, or every call draws the same bits.

    Args:
        acc: a C-contiguous ``bfloat16`` or ``float16`` tensor (PyTorch, CuPy, NumPy with
            ml_dtypes, any ``__dlpack__`` producer that can be written), written in place. A
            torch ``acc`` that requires grad must be written under ``torch.no_grad()``; its
            version counter is bumped.
        x: ``float32``, ``bfloat16`` or ``float16``, ``acc``'s shape, on ``acc``'s device; any
            layout (a non-contiguous ``x`` is copied to C order first). ``x`` may be ``acc``
            itself (the same tensor or an identical view: it is copied first, so the result is
            ``acc * (1 + alpha)`` computed as above); a ``x`` that shares only part of ``acc``'s
            memory, or shares it with another dtype or layout, is refused, as torch refuses
            partially overlapping in-place operands.
        alpha: a finite real number (finite in FP32, and zero or normal there: a value that
            would be subnormal in FP32 is refused, as every FP32 scalar srkern takes).
        rounding: ``"stochastic"`` or ``"nearest"`` (ties to even).
        seed: 64-bit Philox key; ``None`` draws one from :func:`srkern.manual_seed`'s generator
            (``"nearest"`` draws none: ``None`` means 0 there), as :func:`srkern.cast` does.
        offset: logical index of the first element (``offset + acc.size <= 2**64``).
        step: 32-bit Philox counter word.

    Returns:
        ``acc``. Every argument is checked before anything is written: a bad call raises an
        error naming the argument and leaves ``acc`` untouched.
    """
    if not isinstance(rounding, str):
        raise TypeError(f"rounding must be a string, one of {ROUNDINGS}, got {type(rounding).__name__}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    alpha = _alpha_f32(alpha)
    if seed is not None:
        _contract.check_u64("seed", seed)
    step = _contract.check_u64("step", step, _contract.U32)

    av = _check_acc(as_view(acc, "acc"))
    xv = as_view(x, "x")
    if xv.dtype not in X_DTYPES:
        raise TypeError(f"x has dtype {xv.dtype}; srkern.add_ adds one of {X_DTYPES}")
    if xv.shape != av.shape:
        raise ValueError(f"x has shape {xv.shape}, acc has {av.shape}: they must be the same")
    if (xv.device, xv.device_id) != (av.device, av.device_id):
        raise ValueError(f"x is on {xv.device}:{xv.device_id}, acc on {av.device}:{av.device_id}")
    offset = _contract.check_offset("offset", offset, av.numel)
    same = _same_memory(av, xv)
    if not xv.contiguous or same:
        # A copy in C order (the logical order), into memory of its own: the kernel's x and acc
        # are restrict, and x must be read in full as it was before any of acc is written.
        xv = as_view(_copy(x, xv, same), "x")
        if not xv.contiguous:  # a producer with no copy-to-C-order we know how to ask for
            raise ValueError(f"x is a strided {xv.framework} tensor; pass a C-contiguous copy")

    # Every check has passed: only now may a seed be drawn (seed=None consumes one draw).
    if rounding == "stochastic":
        seed = _contract.resolve_seed(seed)
    else:
        seed = 0 if seed is None else seed
    n = av.numel
    if n:
        kernel = (f"accum_{KERNEL_SUFFIX[av.dtype]}_{KERNEL_SUFFIX[xv.dtype]}_"
                  f"{'sr' if rounding == 'stochastic' else 'rn'}")
        # exact=True: every value is checked to fit its type above, and alpha is an FP32 value.
        _backend.launch("accum", kernel, [
            ("p", av.ptr), ("p", xv.ptr), ("q", n), ("Q", offset), ("Q", seed), ("Q", step),
            ("f", alpha)], device=av.device, device_id=av.device_id, units=-(-n // UNIT) + 2,
            stream=stream_of(av), exact=True)
        mark_written([av])
    return acc


# alpha -> its FP32 value, for the alphas seen so far (gradient accumulation calls add_ once per
# parameter and micro-batch with the same alpha; the full check costs ~4 us of a ~30 us call).
_ALPHAS: dict[float, float] = {}


def _alpha_f32(alpha: Any) -> float:
    if type(alpha) is float:
        hit = _ALPHAS.get(alpha)
        if hit is not None:
            return hit
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    a32 = float(np.float32(_contract.check_f32("alpha", alpha, -math.inf)))
    if type(alpha) is float and alpha != 0 and len(_ALPHAS) < 64:  # not 0: -0.0 == 0.0 as keys
        _ALPHAS[alpha] = a32
    return a32


def _check_acc(av: View) -> View:
    if av.framework == "jax":
        raise TypeError("acc: JAX arrays are immutable; srkern.add_ writes acc in place")
    if av.dtype not in ACC_DTYPES:
        raise TypeError(f"acc has dtype {av.dtype}; srkern.add_ accumulates into {' or '.join(ACC_DTYPES)} "
                        "(an FP32 accumulator needs no stochastic rounding: use acc += alpha * x)")
    why = unwritable(av)
    if why:
        raise ValueError(f"acc {why}")
    if not av.contiguous:
        raise ValueError("acc must be C-contiguous and aligned to its element size (it is written in "
                         "place, without a copy)")
    return av


def _extent(v: View) -> tuple[int, int]:
    """The bytes [lo, hi) that a view's elements occupy, whatever its strides (negative too)."""
    if v.numel == 0:
        return v.ptr, v.ptr
    lo = sum(min(0, s * (d - 1)) for d, s in zip(v.shape, v.strides))
    hi = sum(max(0, s * (d - 1)) for d, s in zip(v.shape, v.strides))
    return v.ptr + lo * v.itemsize, v.ptr + (hi + 1) * v.itemsize


def _same_memory(av: View, xv: View) -> bool:
    """True when ``x`` is ``acc`` itself (same elements, dtype and layout); False when they share
    no byte; a ValueError for any other overlap."""
    if av.numel == 0 or xv.numel == 0 or (av.device, av.device_id) != (xv.device, xv.device_id):
        return False
    alo, ahi = av.ptr, av.ptr + av.nbytes  # acc is contiguous
    xlo, xhi = (xv.ptr, xv.ptr + xv.nbytes) if xv.contiguous else _extent(xv)
    if xhi <= alo or ahi <= xlo:
        return False
    if (xv.ptr, xv.dtype, xv.contiguous, xv.needs_copy) == (av.ptr, av.dtype, True, ""):
        return True  # same start, dtype and shape, dense: the very elements of acc
    raise ValueError("x overlaps acc in memory but is not acc itself (another view, dtype or offset of "
                     "its memory): pass x.clone() / x.copy(), or x = acc for acc * (1 + alpha)")


def _copy(x: Any, xv: View, always: bool) -> Any:
    """``x`` in C order in memory of its own (``always``: a copy even when ``x`` is contiguous)."""
    fw = xv.framework
    if not always:
        return contiguous(x, fw)
    if fw == "torch":
        import torch
        return x.detach().clone(memory_format=torch.contiguous_format)
    if fw in ("numpy", "cupy"):
        return x.copy(order="C")
    raise TypeError(f"x is acc itself, a {fw} tensor srkern cannot copy: pass a copy of it")
