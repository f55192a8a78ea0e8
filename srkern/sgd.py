"""``srkern.sgd_step``: a fused multi-tensor SGD step (torch.optim.SGD's update) in five precision
modes.

One launch updates a whole list of tensors in place (``kernels/sgd.cu``, whose header states the
arithmetic and its order). The checks, the tensor table and the launch are AdamW's
(``srkern.adamw``: ``checked_buffers``, ``pair_table``, ``Prepared``), and the modes' weight side
is the kernels' one ``srk_modes.h``: a mode means the same buffers, streams and roundings here as
in ``adamw_step``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from . import _contract
from .adamw import Prepared, _checked_scalars, _f32, checked_buffers, pair_table
from .formats import KERNEL_SUFFIX
from .layout import flat_offsets
from .precisions import mode as _precision

# The modes with SGD and Lion kernels: every AdamW mode but fp16-sr (kernels/srk_modes.h has its
# weight side; the single-state optimizers have no FP16-gradient kernels yet).
ELEMENTWISE_PRECISIONS = ("bf16-sr", "bf16-nearest", "bf16-kahan", "fp32-master", "fp32")


def check_precision(precision: Any, fname: str):
    """The mode called ``precision`` if ``fname`` has kernels for it, else a ``ValueError``."""
    prec = _precision(precision)
    if prec.name not in ELEMENTWISE_PRECISIONS:
        raise ValueError(f"{fname} has no {prec.name!r} kernels: precision must be one of "
                         f"{ELEMENTWISE_PRECISIONS}")
    return prec


def check_seed_step(seed: Any, step: Any) -> tuple[int, int]:
    """seed a u64; step an integer in [1, 2**32) (contract v1's step; the first step is 1)."""
    seed = _contract.check_u64("seed", seed)
    step = _contract.check_u64("step", step, _contract.U32)
    if step < 1:
        raise ValueError("step must be >= 1 (the first step is step 1)")
    return seed, step


def launch_table(family: str, prec: Any, pv: list, gv: list, sv: list, wv: list, cv: list,
                 offs: list[int], seed: int) -> Prepared | None:
    """The prepared launch of ``kernels/<family>.cu`` (state in the table's m column, ``sv``
    empty for none; the v column unused); None when no element is to be updated."""
    n = len(pv)
    zero = [0] * n
    cols = [[p.ptr for p in pv], [g.ptr for g in gv], [m.ptr for m in sv] if sv else zero, zero,
            [w.ptr for w in wv] if wv else zero, [c.ptr for c in cv] if cv else zero]
    table, npairs = pair_table(pv, cols, offs)
    if npairs == 0:
        return None
    state = KERNEL_SUFFIX[sv[0].dtype] if sv else "none"
    name = f"{family}_{prec.kernel}_g{KERNEL_SUFFIX[gv[0].dtype]}_s{state}"
    return Prepared(name, table, npairs, seed, pv[0], pv + sv + wv + cv, family=family)


def sgd_step(params: Sequence[Any], grads: Sequence[Any], momentum_buffers: Sequence[Any] | None, *,
             lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
             weight_decay: float = 0.0, maximize: bool = False, precision: str = "bf16-sr",
             master_params: Sequence[Any] | None = None, compensation: Sequence[Any] | None = None,
             grad_scale: float = 1.0, found_inf: Any = None, seed: int, step: int,
             first_step: bool | None = None, offsets: Sequence[int] | None = None) -> None:
    """One SGD step, as ``torch.optim.SGD`` defines it, on lists of tensors, in place.

    Tensors as for :func:`srkern.adamw_step` (``__dlpack__`` tensors or NumPy arrays, contiguous,
    one device, list ``i`` entries sharing a shape; torch tensors' versions bumped).

    Args:
        params: weights, BF16 (FP32 for ``precision="fp32"``; in ``fp32-master`` the BF16 model
            copy, written to nearest from the master, never read).
        grads: BF16 or FP32 (one dtype per call).
        momentum_buffers: the momentum buffers when ``momentum > 0`` (BF16 or FP32 in the BF16
            modes, FP32 in ``fp32-master`` and ``fp32``; their content is ignored and overwritten
            on the first step); None when ``momentum == 0`` (SGD keeps no state then).
        lr, momentum, dampening, weight_decay, nesterov, maximize: torch.optim.SGD's meanings
            and checks: lr >= 0, momentum >= 0, weight_decay >= 0 (coupled: ``g += wd * p``),
            dampening finite; nesterov needs momentum > 0 and dampening == 0.
        precision: ``bf16-sr``, ``bf16-nearest``, ``bf16-kahan``, ``fp32-master`` or ``fp32``
            (:data:`ELEMENTWISE_PRECISIONS`; the buffers of :data:`srkern.PRECISIONS`).
        master_params, compensation, grad_scale, found_inf, seed, offsets: as for ``adamw_step``.
        step: the optimizer step, from 1: contract v1's ``step``.
        first_step: whether the momentum buffers are fresh (torch's "buffer is None": the buffer
            becomes a copy of the gradient, no dampening). Default: ``step == 1``.

    Arithmetic (FP32, this order; scalars rounded to FP32 once on the host):
    ``g = grad * grad_scale`` (negated for maximize); ``g += wd * p`` if wd != 0;
    ``b = g`` (first step) or ``b = momentum*b + (1-dampening)*g``; ``g = g + momentum*b``
    (nesterov) or ``g = b``; ``p = p - lr*g``. The update uses the FP32 buffer; the stored
    buffer is its rounding (SR from stream ``exp_avg`` where BF16 in bf16-sr / bf16-kahan).

    Random bits (contract v1): element ``j`` of tensor ``t`` has index ``offsets[t] + j``; its
    16-bit draw for stream ``param`` (weight), ``compensation`` or ``exp_avg`` (buffer) is the
    contract's draw of ``(seed, step, stream, index)``: grouping and backend change no bit.

    Every argument is checked before anything is written: a bad call raises ``ValueError`` or
    ``TypeError`` naming the argument and changes no buffer.
    """
    launch = prepare_sgd(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, precision=precision,
                         master_params=master_params, compensation=compensation, grad_scale=grad_scale,
                         found_inf=found_inf, seed=seed, step=step, first_step=first_step, offsets=offsets)
    if launch is not None:
        launch()


def prepare_sgd(params: Sequence[Any], grads: Sequence[Any], momentum_buffers: Sequence[Any] | None, *,
                lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                weight_decay: float = 0.0, maximize: bool = False, precision: str = "bf16-sr",
                master_params: Sequence[Any] | None = None, compensation: Sequence[Any] | None = None,
                grad_scale: float = 1.0, found_inf: Any = None, seed: int, step: int,
                first_step: bool | None = None, offsets: Sequence[int] | None = None
                ) -> Callable[[], None] | None:
    """:func:`sgd_step`'s checks and tensor table: the launch that writes, ready to call (None
    when there is nothing to update), so that a caller with several lists (``srkern.torch.SGD``'s
    buckets) checks all of them before it writes any.
    """
    prec = check_precision(precision, "sgd_step")
    seed, step = check_seed_step(seed, step)
    lr = _contract.check_f32("lr", lr, 0.0)
    momentum = _contract.check_f32("momentum", momentum, 0.0)
    dampening = _contract.check_f32("dampening", dampening, -math.inf)
    weight_decay = _contract.check_f32("weight_decay", weight_decay, 0.0)
    grad_scale = _contract.check_f32("grad_scale", grad_scale, -math.inf)
    for name, flag in (("nesterov", nesterov), ("maximize", maximize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if first_step is None:
        first_step = step == 1
    elif not isinstance(first_step, bool):
        raise TypeError(f"first_step must be a bool or None, got {type(first_step).__name__}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if momentum > 0 and momentum_buffers is None:
        raise ValueError("momentum > 0 needs momentum_buffers (one per parameter)")
    if momentum == 0 and momentum_buffers is not None:
        raise ValueError("momentum_buffers is only used with momentum > 0 (SGD without momentum keeps no state)")
    states = (("momentum_buffers", momentum_buffers),) if momentum > 0 else ()
    pv, gv, svs, wv, cv, fi = checked_buffers(prec, params, grads, states, master_params, compensation,
                                              found_inf, "sgd_step", "an SGD step")
    if not pv:
        return None
    offs = flat_offsets([p.numel for p in pv], offsets)
    f = _f32
    sc = _checked_scalars({"lr": f(lr), "momentum": f(momentum), "omd": f(1.0 - dampening),
                           "wd": f(weight_decay), "grad_scale": f(-grad_scale if maximize else grad_scale)},
                          f"lr={lr!r}, momentum={momentum!r}, dampening={dampening!r}, "
                          f"weight_decay={weight_decay!r}, grad_scale={grad_scale!r}")
    prepared = launch_table("sgd", prec, pv, gv, svs[0] if svs else [], wv, cv, offs, seed)
    if prepared is None:
        return None
    return functools.partial(prepared.run, step, [
        ("f", sc["lr"]), ("f", sc["momentum"]), ("f", sc["omd"]), ("f", sc["wd"]), ("f", sc["grad_scale"]),
        ("i", int(nesterov)), ("i", int(first_step)), ("p", fi.ptr if fi else 0)])
