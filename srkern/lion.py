"""``srkern.lion_step``: a fused multi-tensor Lion step (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms") in five precision modes.

One launch updates a whole list of tensors in place (``kernels/lion.cu``, whose header states the
arithmetic, its order, sign(0) and NaN handling). Checks, table and launch are AdamW's, through
``srkern.sgd``'s helpers for the single-state optimizers.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from . import _contract
from .adamw import _checked_scalars, _f32, checked_buffers
from .layout import flat_offsets
from .sgd import check_precision, check_seed_step, launch_table


def lion_scalars(lr: float, betas: tuple[float, float], weight_decay: float) -> dict[str, float]:
    """The FP32 kernel scalars: each formed in float64 and rounded to FP32 once (omb = 1 - beta,
    decay = 1 - lr * weight_decay, lrwd = lr * weight_decay)."""
    b1, b2 = betas
    f = _f32
    sc = {"b1": f(b1), "omb1": f(1.0 - b1), "b2": f(b2), "omb2": f(1.0 - b2), "lr": f(lr),
          "decay": f(1.0 - lr * weight_decay), "lrwd": f(lr * weight_decay)}
    return _checked_scalars(sc, f"lr={lr!r}, weight_decay={weight_decay!r}")


def lion_step(params: Sequence[Any], grads: Sequence[Any], exp_avgs: Sequence[Any], *, lr: float,
              betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
              maximize: bool = False, precision: str = "bf16-sr",
              master_params: Sequence[Any] | None = None, compensation: Sequence[Any] | None = None,
              grad_scale: float = 1.0, found_inf: Any = None, seed: int, step: int,
              offsets: Sequence[int] | None = None) -> None:
    """One Lion step (decoupled weight decay) on lists of tensors, in place.

    Tensors as for :func:`srkern.adamw_step`. ``exp_avgs``: the momentum ``m`` (start at 0),
    BF16 or FP32 in the BF16 modes, FP32 in ``fp32-master`` and ``fp32``. lr >= 0,
    0 <= beta1, beta2 <= 1, weight_decay >= 0; precision one of ``bf16-sr``, ``bf16-nearest``,
    ``bf16-kahan``, ``fp32-master``, ``fp32``; master_params, compensation, grad_scale,
    found_inf, seed, offsets as for ``adamw_step``; step from 1 (only contract v1's ``step``:
    Lion has no bias correction).

    Arithmetic (FP32, this order; scalars rounded to FP32 once on the host):
    ``g = grad * grad_scale`` (negated for maximize); ``c = b1*m + (1-b1)*g``;
    ``p = p*(1 - lr*wd) - lr*sign(c)``; ``m = b2*m + (1-b2)*g`` (from the old m). sign(+-0) = 0;
    sign(NaN) = NaN, so a NaN gradient makes the weight NaN (use found_inf to skip such steps).
    The stored m is the rounding of the FP32 value (SR from stream ``exp_avg`` where BF16 in
    bf16-sr / bf16-kahan).

    Random bits (contract v1): as ``sgd_step``: the 16-bit draw of ``(seed, step, stream,
    offsets[t] + j)`` for streams ``param``, ``compensation`` and ``exp_avg``.

    Every argument is checked before anything is written: a bad call raises ``ValueError`` or
    ``TypeError`` naming the argument and changes no buffer.
    """
    launch = prepare_lion(params, grads, exp_avgs, lr=lr, betas=betas, weight_decay=weight_decay,
                          maximize=maximize, precision=precision, master_params=master_params,
                          compensation=compensation, grad_scale=grad_scale, found_inf=found_inf, seed=seed,
                          step=step, offsets=offsets)
    if launch is not None:
        launch()


def prepare_lion(params: Sequence[Any], grads: Sequence[Any], exp_avgs: Sequence[Any], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 maximize: bool = False, precision: str = "bf16-sr",
                 master_params: Sequence[Any] | None = None, compensation: Sequence[Any] | None = None,
                 grad_scale: float = 1.0, found_inf: Any = None, seed: int, step: int,
                 offsets: Sequence[int] | None = None) -> Callable[[], None] | None:
    """:func:`lion_step`'s checks and tensor table: the launch that writes, ready to call (None
    when there is nothing to update), so that ``srkern.torch.Lion`` checks every bucket first."""
    prec = check_precision(precision, "lion_step")
    seed, step = check_seed_step(seed, step)
    lr = _contract.check_f32("lr", lr, 0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = _contract.check_f32("betas[0]", betas[0], 0.0)
    b2 = _contract.check_f32("betas[1]", betas[1], 0.0)
    for i, b in enumerate((b1, b2)):
        if b > 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1], got {betas[i]!r}")
    weight_decay = _contract.check_f32("weight_decay", weight_decay, 0.0)
    grad_scale = _contract.check_f32("grad_scale", grad_scale, -math.inf)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    pv, gv, (mv,), wv, cv, fi = checked_buffers(prec, params, grads, (("exp_avgs", exp_avgs),),
                                                master_params, compensation, found_inf, "lion_step",
                                                "a Lion step")
    if not pv:
        return None
    offs = flat_offsets([p.numel for p in pv], offsets)
    sc = lion_scalars(lr, (b1, b2), weight_decay)
    prepared = launch_table("lion", prec, pv, gv, mv, wv, cv, offs, seed)
    if prepared is None:
        return None
    gs = _f32(-grad_scale if maximize else grad_scale)
    return functools.partial(prepared.run, step, [
        ("f", sc["b1"]), ("f", sc["omb1"]), ("f", sc["b2"]), ("f", sc["omb2"]), ("f", sc["lr"]),
        ("f", sc["decay"]), ("f", sc["lrwd"]), ("f", gs), ("p", fi.ptr if fi else 0)])
