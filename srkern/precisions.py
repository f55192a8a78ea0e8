"""The AdamW precision modes: the one table of which buffers each mode holds, in which dtype,
and how its 16-bit writes are rounded (``kernels/adamw.cu`` states the update each mode runs)."""
from __future__ import annotations

from dataclasses import dataclass

from .formats import NP_DTYPES

_ITEMSIZE = {name: NP_DTYPES[name].itemsize for name in ("bfloat16", "float16", "float32")}
_GRADS = ("bfloat16", "float32")  # the gradient dtypes of the BF16 and FP32 modes


@dataclass(frozen=True)
class Precision:
    """Buffers of one precision mode: the weight dtype, allowed moment dtypes, extra buffers."""
    name: str
    param_dtype: str
    state_dtypes: tuple[str, ...]  # allowed moment dtypes; the first is the default
    master: bool        # FP32 master weights (``master_params``)
    compensation: bool  # BF16 Kahan compensation (``compensation``)
    stochastic: bool    # 16-bit writes of weights/moments/compensation use SR
    kernel: str         # kernel name stem in kernels/adamw.cu
    grad_dtypes: tuple[str, ...] = _GRADS  # gradient dtypes it has kernels for


PRECISIONS: dict[str, Precision] = {
    p.name: p for p in (
        Precision("bf16-sr", "bfloat16", ("bfloat16", "float32"), False, False, True, "bf16_sr"),
        Precision("bf16-nearest", "bfloat16", ("bfloat16", "float32"), False, False, False, "bf16_nearest"),
        Precision("bf16-kahan", "bfloat16", ("bfloat16", "float32"), False, True, True, "bf16_kahan"),
        Precision("fp32-master", "bfloat16", ("float32",), True, False, False, "fp32_master"),
        Precision("fp32", "float32", ("float32",), False, False, False, "fp32"),
        Precision("fp16-sr", "float16", ("float32", "bfloat16"), False, False, True, "fp16_sr",
                  ("float16", "bfloat16", "float32")),
    )
}
"""The modes. ``bf16-sr``: BF16 weights and moments, every BF16 write stochastically rounded (the
paper). ``bf16-nearest``: the same buffers, round-to-nearest writes (the baseline that stalls).
``bf16-kahan``: BF16 weights written to nearest plus a BF16 compensation buffer holding what
the rounding dropped (written with SR), moments as in ``bf16-sr``. ``fp32-master``: FP32 master
weights and moments, the BF16 model copy written to nearest. ``fp32``: everything FP32.
``fp16-sr``: FP16 weights (for FP16 models), every weight write stochastically rounded by the FP16
rule of ``srkern.cast(x, "float16", rounding="stochastic")`` with the contract's 32-bit draw for
the element's index in stream ``param_fp16`` (so the same bits as that cast with ``offset`` =
index; a stream of its own, so no BF16 weight shares those draws);
subnormals kept, overflow to +-Inf, a NaN stored as 0x7e00. FP32 moments by default, or BF16
moments written with SR as in ``bf16-sr``; FP16, BF16 or FP32 gradients (the other modes take
BF16 or FP32 gradients only). No master weights, no compensation."""

def mode(name: str) -> Precision:
    """The mode called ``name``; a ``ValueError`` naming the modes for any other value."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def default_state_dtype(precision: str) -> str:
    """The moment dtype a mode uses unless told otherwise (BF16 for the BF16 modes)."""
    return mode(precision).state_dtypes[0]


def bytes_per_param(precision: str, state_dtype: str | None = None) -> int:
    """Bytes of memory per parameter held by the weights and the optimizer, gradient excluded.

    ``bf16-sr`` with BF16 moments: 2 (weight) + 2 + 2 (moments) = 6; ``fp32-master``:
    2 + 4 (master) + 4 + 4 = 14; ``bf16-kahan``: 8 (compensation 2); ``fp32``: 12;
    ``fp16-sr``: 2 + 4 + 4 = 10 (6 with BF16 moments).
    """
    p = mode(precision)
    s = state_dtype or p.state_dtypes[0]
    if s not in p.state_dtypes:
        raise ValueError(f"state_dtype for {precision!r} must be one of {p.state_dtypes}, got {s!r}")
    return _ITEMSIZE[p.param_dtype] + 2 * _ITEMSIZE[s] + 4 * p.master + 2 * p.compensation


def step_bytes_per_param(precision: str, state_dtype: str | None = None,
                         grad_dtype: str = "bfloat16") -> int:
    """Bytes one step moves per parameter (each buffer read once and written once; the BF16 copy
    of ``fp32-master`` is only written): the figure the benchmarks divide by time. ``fp16-sr``
    with FP16 gradients and FP32 moments: 2 + 2 * 8 + 2 * 2 = 22."""
    p = mode(precision)
    s = state_dtype or p.state_dtypes[0]
    moved = _ITEMSIZE[grad_dtype] + 2 * 2 * _ITEMSIZE[s]
    if p.master:
        moved += 2 * 4 + 2
    else:
        moved += 2 * _ITEMSIZE[p.param_dtype]
    if p.compensation:
        moved += 2 * 2
    return moved


def param_dtype(name: str) -> str:
    """The dtype of the weights a mode updates (BF16; FP32 for ``fp32``, FP16 for ``fp16-sr``)."""
    return mode(name).param_dtype
