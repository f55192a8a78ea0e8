"""``srkern.torch.SGD``, ``Lion`` and ``Adafactor``: ``srkern.sgd_step``, ``srkern.lion_step`` and
``srkern.adafactor_step`` as ``torch.optim.Optimizer`` classes, drop-ins for ``torch.optim.SGD``
and ``torch.optim.Adafactor`` (Lion has no torch class: its published rule, with torch's
conventions). What they share (modes, state, buckets, all-or-nothing steps, AMP, state dicts) is
``srkern._torch_fused.FusedOptimizer``; each class here is its hyper-parameters, its state and
the call of its functional form.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ._torch_fused import FusedOptimizer, _real, _scalar
from .adafactor import prepare_adafactor
from .lion import prepare_lion
from .precisions import PRECISIONS
from .sgd import prepare_sgd


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex() else x


class SGD(FusedOptimizer):
    """SGD (momentum, dampening, Nesterov, coupled weight decay) through srkern's fused
    multi-tensor kernel (:func:`srkern.sgd_step`), a drop-in for ``torch.optim.SGD``.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize: ``torch.optim.SGD``'s,
            with its checks; ``lr`` and ``weight_decay`` may be 1-element tensors (read once per step).
        precision: ``"bf16-sr"`` (BF16 weights and momentum, SR on every write; the default),
            ``"bf16-nearest"``, ``"bf16-kahan"``, ``"fp32-master"`` or ``"fp32"``; per group.
            FP32 parameters take ``fp32`` in every mode, complex64 ``fp32`` on the real pairs.
        seed: 64-bit Philox key (share it across data-parallel replicas); None draws one. Per group.
        state_dtype: momentum dtype in the BF16 modes, ``"bfloat16"`` (default) or ``"float32"``.
        foreach, fused, differentiable: torch's keywords; srkern always runs one fused launch per
            bucket, so foreach and fused take any value; ``differentiable=True`` is refused.

    State: ``momentum_buffer`` (when momentum != 0; made from the first gradient at the
    parameter's first step with momentum, as torch's "buffer is None"), ``step`` (FP32 tensor:
    the Philox step; torch's SGD keeps none), ``master`` / ``compensation`` by mode.
    """
    NAME = "SGD"
    FLAGS = dict(maximize=False, foreach=None, differentiable=False, fused=None, nesterov=False)
    COMPLEX = True  # SGD's update is linear: a complex parameter is its real pairs

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float | torch.Tensor = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, precision: str = "bf16-sr", seed: int | None = None,
                 state_dtype: str | None = None) -> None:
        if differentiable:
            raise NotImplementedError("srkern.torch.SGD is not differentiable: its step runs outside autograd")
        if nesterov and (_plain(momentum) <= 0 or _plain(dampening) != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, foreach=foreach, fused=fused,
                                      differentiable=False), precision, seed, state_dtype)

    def _hyper(self, group: dict[str, Any], gi: int) -> dict[str, Any]:
        if group.get("differentiable"):
            raise NotImplementedError("srkern.torch.SGD is not differentiable")
        momentum = _plain(group["momentum"])
        # Nesterov is checked at construction only, as torch does: with the momentum later set to
        # 0 (a schedule), a step is plain SGD.
        return dict(lr=_scalar(gi, "lr", group["lr"]), momentum=momentum, dampening=_plain(group["dampening"]),
                    weight_decay=_scalar(gi, "weight_decay", group["weight_decay"]),
                    nesterov=group["nesterov"] and _momentum(group), maximize=group["maximize"])

    def _check_hyper(self, h, group):
        pm = PRECISIONS[group["precision"]]
        prepare_sgd([], [], [] if _momentum(h) else None, **h, precision=group["precision"],
                    master_params=[] if pm.master else None, compensation=[] if pm.compensation else None,
                    seed=group["seed"], step=1)

    def _shapes(self, p):
        return {"momentum_buffer": p.shape}

    def _moments(self, group, p, prec):
        return super()._moments(group, p, prec) if _momentum(group) else {}

    def _fresh(self, group, state):
        return _momentum(group) and state.get("momentum_buffer") is None

    def _prepare(self, group, h, prec, b, step, grad_scale):
        pm = PRECISIONS[prec]
        bufs = [_real(st["momentum_buffer"]) for st in b["state"]] if _momentum(h) else None
        return prepare_sgd(b["p"], b["g"], bufs, **h, precision=prec,
                           master_params=[_real(st["master"]) for st in b["state"]] if pm.master else None,
                           compensation=[_real(st["compensation"]) for st in b["state"]] if pm.compensation else None,
                           grad_scale=grad_scale, seed=group["seed"], step=step, first_step=b["fresh"],
                           offsets=b["o"])


def _momentum(h: dict[str, Any]) -> bool:
    m = _plain(h["momentum"])
    return not isinstance(m, bool) and isinstance(m, (int, float)) and m != 0


class Lion(FusedOptimizer):
    """Lion (Chen et al. 2023, decoupled weight decay) through srkern's fused multi-tensor kernel
    (:func:`srkern.lion_step`), with torch's optimizer conventions.

    Args:
        params: parameters or groups. lr (default 1e-4), betas (default (0.9, 0.99)),
            weight_decay (default 0, decoupled: ``p *= 1 - lr * weight_decay``), maximize: the
            published rule's; ``lr`` may be a 1-element tensor.
        precision, seed, state_dtype: as for :class:`SGD` (complex parameters are refused: sign()
            of a complex number is not that of its real pairs).

    State: ``exp_avg`` (the momentum), ``step`` (FP32 tensor: the Philox step),
    ``master`` / ``compensation`` by mode.
    """
    NAME = "Lion"
    FLAGS = dict(maximize=False, foreach=None)

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *, maximize: bool = False,
                 foreach: bool | None = None, precision: str = "bf16-sr", seed: int | None = None,
                 state_dtype: str | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach), precision, seed, state_dtype)

    def _hyper(self, group, gi):
        betas = group["betas"]
        if isinstance(betas, (tuple, list)):
            betas = tuple(_scalar(gi, f"betas[{i}]", b) for i, b in enumerate(betas))
        return dict(lr=_scalar(gi, "lr", group["lr"]), betas=betas,
                    weight_decay=_scalar(gi, "weight_decay", group["weight_decay"]), maximize=group["maximize"])

    def _check_hyper(self, h, group):
        pm = PRECISIONS[group["precision"]]
        prepare_lion([], [], [], **h, precision=group["precision"],
                     master_params=[] if pm.master else None, compensation=[] if pm.compensation else None,
                     seed=group["seed"], step=1)

    def _shapes(self, p):
        return {"exp_avg": p.shape}

    def _prepare(self, group, h, prec, b, step, grad_scale):
        pm = PRECISIONS[prec]
        return prepare_lion(b["p"], b["g"], [st["exp_avg"] for st in b["state"]], **h,
                            precision=prec, master_params=[st["master"] for st in b["state"]] if pm.master else None,
                            compensation=[st["compensation"] for st in b["state"]] if pm.compensation else None,
                            grad_scale=grad_scale, seed=group["seed"], step=step, offsets=b["o"])


class Adafactor(FusedOptimizer):
    """Adafactor as ``torch.optim.Adafactor`` defines it (factored second moments for parameters
    of two or more dimensions, relative step sizes, update clipping), through srkern's fused
    kernels (:func:`srkern.adafactor_step`), a drop-in for ``torch.optim.Adafactor``.

    Args:
        params, lr, beta2_decay, eps, d, weight_decay, maximize, foreach: ``torch.optim.Adafactor``'s,
            with its checks; ``lr`` may be a 1-element tensor.
        precision, seed: as for :class:`SGD` (complex parameters are refused, as torch does).
        state_dtype: dtype of the statistics in the BF16 modes, ``"bfloat16"`` (default: written
            with SR in ``bf16-sr`` and ``bf16-kahan``) or ``"float32"``.

    State (torch's): ``step``, ``row_var`` (..., R, 1) and ``col_var`` (..., 1, C) for a
    parameter (..., R, C), ``variance`` for one of 0 or 1 dimensions; ``master`` /
    ``compensation`` by mode.
    """
    NAME = "Adafactor"
    FLAGS = dict(maximize=False, foreach=None)

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False, precision: str = "bf16-sr",
                 seed: int | None = None, state_dtype: str | None = None) -> None:
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay,
                                      maximize=maximize, foreach=foreach), precision, seed, state_dtype)

    def _hyper(self, group, gi):
        eps = group["eps"]
        if isinstance(eps, (tuple, list)):
            eps = tuple(None if e is None else _plain(e) for e in eps)
        return dict(lr=_scalar(gi, "lr", group["lr"]), beta2_decay=_plain(group["beta2_decay"]), eps=eps,
                    d=_plain(group["d"]), weight_decay=_plain(group["weight_decay"]), maximize=group["maximize"])

    def _check_hyper(self, h, group):
        pm = PRECISIONS[group["precision"]]
        prepare_adafactor([], [], [], [], [], **h, precision=group["precision"],
                          master_params=[] if pm.master else None, compensation=[] if pm.compensation else None,
                          seed=group["seed"], step=1)

    def _shapes(self, p):
        if p.dim() >= 2:
            return {"row_var": (*p.shape[:-1], 1), "col_var": (*p.shape[:-2], 1, p.shape[-1])}
        return {"variance": p.shape}

    def _prepare(self, group, h, prec, b, step, grad_scale):
        pm = PRECISIONS[prec]
        sts = b["state"]
        return prepare_adafactor(b["p"], b["g"], [st.get("row_var") for st in sts], [st.get("col_var") for st in sts],
                                 [st.get("variance") for st in sts], step=step, **h,
                                 precision=prec, master_params=[st["master"] for st in sts] if pm.master else None,
                                 compensation=[st["compensation"] for st in sts] if pm.compensation else None,
                                 grad_scale=grad_scale, seed=group["seed"], offsets=b["o"])
