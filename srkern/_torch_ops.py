"""The body of ``srkern.torch.AdamW.step``: which precision each parameter takes, and the one
step over every parameter that has a gradient, registered as the torch custom op
``srkern::adamw_step_`` so that ``torch.compile`` sees one opaque op (with declared mutations)
instead of the NumPy pointer tables behind it.

Eager steps call :func:`adamw_step_` directly (the op's dispatch costs tens of microseconds per
step and changes nothing); compiled ones go through the op. Both run the same function.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .adamw import Prepared, _prepare_step, check_hyperparameters
from .precisions import PRECISIONS, mode

MODES = tuple(PRECISIONS)          # a parameter's precision travels to the op as its index here
MODE_INDEX = {name: i for i, name in enumerate(MODES)}
HYPER = 6                          # per group: lr, beta1, beta2, eps, weight_decay, maximize
STEP_LIMIT = 2 ** 24               # torch keeps step counts as FP32: exact integers up to here
_U64 = 2 ** 64

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- which precision a parameter takes --------------------------------------------------------

def _mapped(precision: str, dtype: torch.dtype) -> str | None:
    p = mode(precision)
    if dtype in (torch.float32, torch.complex64):
        return "fp32"
    if dtype == torch.bfloat16:
        return precision if p.param_dtype == "bfloat16" else "bf16-sr" if precision == "fp16-sr" else None
    if dtype == torch.float16 and p.stochastic:  # every stochastic mode, fp16-sr included
        return "fp16-sr"
    return None


def param_precision(precision: str, dtype: torch.dtype) -> str:
    """The precision mode a parameter of ``dtype`` takes in a group whose ``precision`` is given.

    FP32 parameters (and complex64, as real pairs) take ``fp32`` in every mode; BF16 parameters
    the group's BF16 mode (``bf16-sr`` when the group is ``fp16-sr``); FP16 parameters
    ``fp16-sr`` in the stochastic modes and in ``fp16-sr``. Anything else is a ``TypeError``.
    """
    got = _mapped(precision, dtype)
    if got is None:
        takes = [str(d) for d in (torch.float32, torch.complex64, torch.bfloat16, torch.float16)
                 if _mapped(precision, d) is not None]
        raise TypeError(f"precision {precision!r} has no update for {dtype} parameters "
                        f"(it takes {', '.join(takes)})")
    return got


def state_dtype_for(precision: str, state_dtype: str | None) -> str:
    """The moment dtype of a parameter taking ``precision`` in a group asking for ``state_dtype``:
    the group's where the mode allows it, else the mode's default."""
    allowed = mode(precision).state_dtypes
    return state_dtype if state_dtype in allowed else allowed[0]


def flat_size(p: torch.Tensor) -> int:
    """Elements a parameter takes in the logical flat vector (a complex number is two)."""
    return p.numel() * (2 if p.is_complex() else 1)


def seed_arg(seed: int) -> int:
    """A u64 seed as the signed 64-bit int a custom op's ``int`` carries (and back: ``% 2**64``)."""
    return seed - _U64 if seed >= 2 ** 63 else seed


# ---- the step ----------------------------------------------------------------------------------

def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], extras: list[torch.Tensor], steps: list[torch.Tensor],
                modes: list[int], groups: list[int], offsets: list[int], hyper: list[float],
                lr_tensors: list[Optional[torch.Tensor]], seeds: list[int], grad_scale: float,
                found_inf: Optional[torch.Tensor]) -> None:
    """One AdamW step of every listed parameter (those that have a gradient), in place.

    Per parameter: its tensors, its precision (``modes``, an index into :data:`MODES`), its group
    and its logical flat offset; ``extras`` holds the master weights or compensation buffers of
    the parameters whose mode has one, in order; ``steps`` the per-parameter step counts (FP32
    scalar tensors, torch's layout), advanced here. Per group: ``HYPER`` floats in ``hyper``,
    an optional tensor lr, the seed. Everything is checked before anything is written, and a
    non-zero ``found_inf`` (read on the host: on CUDA one synchronisation) changes nothing.

    The Philox ``step`` of a parameter's draws, and its bias corrections, are its own step
    count after this step; parameters that share a step count (the usual case: one launch)
    are launched together per group, device, precision and dtype.
    """
    step_buckets(params, grads, exp_avgs, exp_avg_sqs, extras, steps, modes, groups, offsets, hyper,
                 lr_tensors, seeds, grad_scale, found_inf)


class Bucket(NamedTuple):
    """One launch of a step: its group, the Philox step, the prepared launch, and the positions
    (in the step's parameter list) of its parameters."""
    group: int
    step: int
    prepared: Prepared
    members: list[int]


def group_hyper(hyper: list[float], lr_tensors: list[Optional[torch.Tensor]],
                grad_scale: float) -> list[tuple[tuple, bool]]:
    """Each group's checked (lr, betas, eps, weight_decay, grad_scale) and maximize flag; a
    tensor lr is read here (on CUDA one synchronisation)."""
    hp = []
    for gi in range(len(lr_tensors)):
        lr, b1, b2, eps, wd, maximize = hyper[HYPER * gi:HYPER * gi + HYPER]
        t = lr_tensors[gi]
        if t is not None:
            lr = float(t)
        try:
            hp.append((check_hyperparameters(lr, (b1, b2), eps, wd, grad_scale), maximize != 0.0))
        except (TypeError, ValueError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None
    return hp


def skipped(found_inf: Optional[torch.Tensor]) -> bool:
    """Whether ``found_inf`` (checked) is non-zero: read on the host (on CUDA one synchronisation)."""
    if found_inf is None:
        return False
    if found_inf.dtype != torch.float32 or found_inf.numel() != 1:
        raise TypeError(f"found_inf must be a 1-element torch.float32 tensor, got "
                        f"{found_inf.dtype} {tuple(found_inf.shape)}")
    return float(found_inf) != 0.0


def step_buckets(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], extras: list[torch.Tensor], steps: list[torch.Tensor],
                 modes: list[int], groups: list[int], offsets: list[int], hyper: list[float],
                 lr_tensors: list[Optional[torch.Tensor]], seeds: list[int], grad_scale: float,
                 found_inf: Optional[torch.Tensor]) -> list[Bucket] | None:
    """:func:`adamw_step_`, returning the launches it ran (None if it staged a non-contiguous
    parameter or launched nothing) for ``srkern/_plan.py`` to keep."""
    hp = group_hyper(hyper, lr_tensors, grad_scale)
    if skipped(found_inf):
        return None  # a skipped step: no buffer, no step count changes (torch's fused AdamW too)
    if not params:
        return None
    counts = []
    for k, s in enumerate(steps):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.numel() != 1:
            raise TypeError(f"parameter {k} of this step: its state 'step' must be a 1-element torch.float32 "
                            f"tensor (torch's layout), got {getattr(s, 'dtype', type(s).__name__)}")
        counts.append(int(s.item()))  # a CPU scalar in torch's layout: no synchronisation
    if len({id(s) for s in steps}) != len(steps):
        raise ValueError("two parameters share one state 'step' tensor: each keeps its own count")
    buckets: dict[tuple, dict[str, list]] = {}
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    xi = 0
    for k, p in enumerate(params):
        if not 0 <= counts[k] < STEP_LIMIT - 1:
            raise ValueError(f"parameter {k} of this step has step count {counts[k]}: torch's FP32 step "
                             f"counts are exact only below 2**24")
        prec = MODES[modes[k]]
        pm = PRECISIONS[prec]
        g = grads[k]
        g = g if g.is_contiguous() and not g.is_neg() else g.resolve_neg().contiguous()
        pw = p
        if not p.is_contiguous():  # staged: updated as a dense copy, written back after the launch
            pw = p.contiguous()
            staged.append((p, pw))
        key = (groups[k], p.device, g.dtype, prec, exp_avgs[k].dtype, counts[k] + 1)
        b = buckets.setdefault(key, {"p": [], "g": [], "m": [], "v": [], "x": [], "o": [], "k": []})
        b["p"].append(_real(pw))
        b["g"].append(_real(g))
        b["m"].append(_real(exp_avgs[k]))
        b["v"].append(_real(exp_avg_sqs[k]))
        if pm.master or pm.compensation:
            b["x"].append(extras[xi])
            xi += 1
        b["o"].append(offsets[k])
        b["k"].append(k)
    launches = []
    for (gi, _, _, prec, _, step), b in buckets.items():
        (lr, betas, eps, wd, gs), maximize = hp[gi]
        pm = PRECISIONS[prec]
        try:
            launches.append((gi, b["k"]) + _prepare_step(
                b["p"], b["g"], b["m"], b["v"], step=step, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                precision=prec, master_params=b["x"] if pm.master else None,
                compensation=b["x"] if pm.compensation else None,
                # maximize: the kernel's gradient is -grad (exactly: FP32 products are sign-symmetric)
                grad_scale=-gs if maximize else gs, seed=seeds[gi] % _U64, offsets=b["o"]))
        except (TypeError, ValueError) as e:
            raise type(e)(f"param_groups[{gi}]: {e}") from None
    # Every check has passed: from here on buffers are written.
    for _, _, prepared, step, sc, gs, fi_ptr in launches:
        if prepared is not None:
            prepared.launch(step, sc, gs, fi_ptr)
    for p, pw in staged:
        p.copy_(pw)
    torch._foreach_add_(steps, 1.0)
    if staged:
        return None
    return [Bucket(gi, step, prepared, members) for gi, members, prepared, step, *_ in launches
            if prepared is not None] or None


@torch.library.custom_op("srkern::adamw_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "extras", "steps"))
def _adamw_op(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
              exp_avg_sqs: list[torch.Tensor], extras: list[torch.Tensor], steps: list[torch.Tensor],
              modes: list[int], groups: list[int], offsets: list[int], hyper: list[float],
              lr_tensors: list[Optional[torch.Tensor]], seeds: list[int], grad_scale: float,
              found_inf: Optional[torch.Tensor]) -> None:
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, extras, steps, modes, groups, offsets, hyper,
                lr_tensors, seeds, grad_scale, found_inf)


@_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, extras, steps, modes, groups, offsets, hyper, lr_tensors,
      seeds, grad_scale, found_inf) -> None:
    return None


def run_step(*args) -> list[Bucket] | None:
    """The step: through the custom op when compiling, directly otherwise (the same function);
    an eager step returns its launches (see :func:`step_buckets`)."""
    if torch.compiler.is_compiling():
        _adamw_op(*args)
        return None
    return step_buckets(*args)

