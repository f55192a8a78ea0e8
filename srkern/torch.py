"""srkern's optimizers for PyTorch: ``AdamW`` (the fused SR AdamW step as a
``torch.optim.Optimizer``) and ``ShardedAdamW`` (the same step ZeRO-sharded over MPI ranks).

Import it explicitly (``import srkern.torch``); ``import srkern`` does not import torch.

    import torch, srkern.torch
    model = MyModel().to(torch.bfloat16)
    opt = srkern.torch.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, precision="bf16-sr", seed=0)
    loss = model(x).float().pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()

    # under mpirun: every rank the same model; each keeps 1 / world of the optimizer state
    opt = srkern.torch.ShardedAdamW(model.parameters(), srkern.dist.Communicator(), lr=1e-3, seed=0)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from . import _contract
from ._plan import make_plan
from ._torch_ops import MODE_INDEX, flat_size, param_precision, run_step, seed_arg, state_dtype_for, TORCH_DTYPES
from ._torch_sharded import ShardedAdamW, ShardedLion, ShardedSGD  # re-exported: srkern.torch.Sharded*
from ._torch_accum import SRGradAccumulation, sr_grad_accumulation  # re-exported: SR gradient accumulation
from ._torch_fused import add_group, amp_args, load_checked
from ._torch_optim import SGD, Adafactor, Lion  # re-exported: the single-launch optimizers beyond AdamW
from ._torch_state import checked
from .checkpoint import (TORCH_FORMAT, TORCH_VERSION, CheckpointCorrupt, CheckpointError, check_hyper,
                         state_sections)
from .layout import flat_offsets
from .precisions import PRECISIONS, bytes_per_param, default_state_dtype, mode

__all__ = ["AdamW", "ShardedAdamW", "ShardedSGD", "ShardedLion", "SGD", "Lion", "Adafactor", "sr_grad_accumulation", "SRGradAccumulation"]


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) through srkern's fused multi-tensor kernel, a drop-in for
    ``torch.optim.AdamW``.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer. Each
            parameter's update follows its dtype and its group's ``precision``: BF16 parameters
            take the group's BF16 mode, FP32 parameters ``fp32`` in every mode (a BF16 model with
            FP32 norms is one optimizer), complex64 ``fp32`` on the real pairs (as torch does),
            FP16 parameters ``fp16-sr`` in the stochastic modes. CPU and CUDA tensors;
            non-contiguous and ``channels_last`` parameters are updated through a dense copy
            written back (the same bits as a contiguous parameter with the same values).
        lr, betas, eps, weight_decay: the usual AdamW hyper-parameters, per group; ``lr`` may
            be a 1-element tensor (read once per step: on CUDA one synchronisation).
        precision: ``"bf16-sr"`` (BF16 weights and moments, SR on every write),
            ``"bf16-nearest"``, ``"bf16-kahan"``, ``"fp32-master"`` (FP32 master weights kept
            here, the BF16 model weights written round-to-nearest), ``"fp32"`` or ``"fp16-sr"``;
            see :data:`srkern.precisions.PRECISIONS`. Per group.
        seed: 64-bit Philox key (share it across data-parallel replicas); None draws one from
            :func:`srkern.manual_seed`'s generator. Per group (every group gets this one unless
            it names its own).
        state_dtype: moment dtype, ``"bfloat16"`` (default in the BF16 modes) or ``"float32"``;
            a parameter whose mode does not allow it takes its mode's default. Per group.
        maximize: ascend instead of descend (per group): the kernel's gradient is ``-grad``,
            bit-identical to stepping on negated gradients.
        foreach, fused, capturable: torch.optim.AdamW's keywords, accepted with any value: srkern
            always runs one fused multi-tensor launch per group, device, dtype and step count.
        amsgrad, differentiable: only ``False`` (``True`` is a ``NotImplementedError``).

    State (torch's layout): ``state[p]`` holds ``step`` (an FP32 scalar tensor on the CPU; after
    a step, a view into one flat tensor that later steps advance in one operation),
    ``exp_avg``, ``exp_avg_sq``, and ``master`` (``fp32-master``) or ``compensation``
    (``bf16-kahan``). Step counts are per parameter, as torch keeps them: a parameter's count,
    its bias corrections and the Philox ``step`` of its random draws advance only at steps
    where it has a gradient and the step is not skipped (``found_inf``); a step where no
    parameter has a gradient changes nothing.

    Layout (bit contract v1.1): every parameter of every group, in group order, gets a fixed
    position in one logical flat vector (cumulative sizes, no padding; a complex element is
    two); parameters added later with ``add_param_group`` go at the end. ``state_dict()`` is
    torch's (see :mod:`srkern._torch_state` for what loads); saving, loading and continuing is
    bit-identical to an uninterrupted run, and so are deepcopies, pickles and ``torch.compile``d
    steps (the step is the custom op ``srkern::adamw_step_``). Eager steps after the first re-run
    its prepared launches while nothing they depend on has changed (:mod:`srkern._plan`), with
    the same bits.
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 precision: str = "bf16-sr", seed: int | None = None, *, state_dtype: str | None = None,
                 maximize: bool = False, amsgrad: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False) -> None:
        # torch.optim.AdamW's keywords. foreach, fused and capturable name what srkern always
        # does (one fused multi-tensor launch per group, device, dtype and step count), so any
        # value is accepted.
        if amsgrad:
            raise NotImplementedError("srkern.torch.AdamW has no amsgrad variant (it would need a third "
                                      "moment buffer in every precision mode)")
        if differentiable:
            raise NotImplementedError("srkern.torch.AdamW is not differentiable: its step runs outside "
                                      "autograd (differentiable=True is for optimizer-through-optimizer "
                                      "training; use torch.optim.AdamW for that)")
        mode(precision)
        defaults = dict(_FLAGS, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, precision=precision,
                        state_dtype=state_dtype or default_state_dtype(precision),
                        seed=_contract.resolve_seed(seed))
        _check_group(defaults)
        super().__init__(params, defaults)

    # torch.amp.GradScaler.step then hands the step its scale and inf flag as the attributes
    # grad_scale and found_inf (unscaling happens in the kernel; FP16 gradients are fine).
    _step_supports_amp_scaling = True

    # The optimizer-wide settings are the defaults every new group takes.
    precision = property(lambda self: self.defaults["precision"])
    state_dtype = property(lambda self: self.defaults["state_dtype"])
    seed = property(lambda self: self.defaults["seed"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # As torch's AdamW: groups saved before a flag existed take its default (and srkern's
        # settings those of this optimizer), and a step saved as a number becomes a tensor.
        super().__setstate__(state)
        self.__dict__.pop("_srk_plan", None)  # (load_state_dict too) the next step runs in full
        for group in self.param_groups:
            for k, v in _FLAGS.items():
                group.setdefault(k, v)
            for k in ("precision", "state_dtype", "seed"):
                group.setdefault(k, self.defaults[k])
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    # ---- construction checks ----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, all or nothing: a group refused by torch's checks or by
        srkern's (hyper-parameters, settings, parameter dtypes) leaves ``param_groups`` as it was.
        A group that names its ``precision`` but no ``state_dtype`` takes that mode's default."""
        def check(group: dict[str, Any], gi: int) -> None:
            _check_group(group)
            for i, p in enumerate(group["params"]):
                try:
                    param_precision(group["precision"], p.dtype)
                except TypeError as e:
                    raise TypeError(f"parameter {i} of group {gi}: {e}") from None
        add_group(self, param_group, check)

    # ---- layout and state -------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def layout(self) -> list[int]:
        """Logical flat offset of every parameter, in group order (cumulative sizes)."""
        return flat_offsets([flat_size(p) for p in self._params()])

    @staticmethod
    def _new_state(p: torch.Tensor, prec: str, state_dtype: str) -> dict[str, torch.Tensor]:
        """A parameter's first state: step 0, zero moments, the master weights as the exact upcast."""
        state = {"step": torch.tensor(0.0, dtype=torch.float32)}
        for name, dtype in state_sections(prec, state_dtype_for(prec, state_dtype)):
            if name == "master":
                state[name] = p.detach().to(torch.float32, copy=True).contiguous()
            else:
                want = torch.complex64 if p.is_complex() else TORCH_DTYPES[dtype]
                state[name] = torch.zeros(p.shape, dtype=want, device=p.device)
        return state

    def bytes_per_param(self) -> int:
        """Bytes per parameter held by the weights and this optimizer (gradient excluded) in the
        default precision: 6 for ``bf16-sr`` with BF16 moments, 14 for ``fp32-master``, 12 for
        ``fp32``."""
        return bytes_per_param(self.precision, self.state_dtype)

    # ---- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float = 1.0,
             found_inf: torch.Tensor | None = None) -> Any:
        """One AdamW step on every parameter that has a gradient.

        ``grad_scale`` multiplies every gradient inside the kernel (unscaling, clipping);
        ``found_inf`` (1-element float32 tensor) non-zero makes the step write no buffer and
        advance no step count (a parameter's first step still creates its zero state, as in
        torch's fused AdamW); both are read on the host (on CUDA, one synchronisation). Under
        ``torch.amp.GradScaler.step`` the scaler's scale and inf flag are taken as well, so the
        gradients are unscaled inside the kernel (FP16 gradients included).

        Everything (every group's hyper-parameters, ``grad_scale``, ``found_inf``, every buffer)
        is checked before the first write: a bad call raises and changes no buffer and no state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = amp_args(self, grad_scale, found_inf)
        hyper, lr_tensors, seeds = self._group_args()
        plan = None if torch.compiler.is_compiling() else self.__dict__.get("_srk_plan")
        if plan is not None and plan.run(self, hyper, lr_tensors, grad_scale, found_inf):
            return loss
        lists: tuple[list, ...] = ([], [], [], [], [], [], [], [], [])  # p g m v extra step mode group offset
        new_states: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        precision_of: dict[tuple, str] = {}  # (group precision, dtype) -> the parameter's mode
        offset = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                off, offset = offset, offset + flat_size(p)
                if p.grad is None:
                    continue
                if p.grad.layout != torch.strided:
                    raise RuntimeError(f"param_groups[{gi}]: srkern.torch.AdamW does not support sparse gradients")
                key = (group["precision"], p.dtype)
                prec = precision_of.get(key)
                if prec is None:
                    try:
                        prec = precision_of[key] = param_precision(*key)
                    except TypeError as e:
                        raise TypeError(f"param_groups[{gi}]: {e}") from None
                state = self.state.get(p)
                if not state:
                    state = new_states[p] = self._new_state(p, prec, group["state_dtype"])
                for lst, x in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(x)
                if PRECISIONS[prec].master or PRECISIONS[prec].compensation:
                    lists[4].append(state["master" if PRECISIONS[prec].master else "compensation"])
                lists[5].append(state["step"])
                lists[6].append(MODE_INDEX[prec])
                lists[7].append(gi)
                lists[8].append(off)
        buckets = run_step(*lists, hyper, lr_tensors, seeds, grad_scale, found_inf)
        # Checked and launched: new parameters keep the state the step wrote.
        self.state.update(new_states)
        if not torch.compiler.is_compiling():  # the next eager steps re-run this one's launches
            self._srk_plan = make_plan(self, lists[0], lists[1], lists[6], buckets)
        return loss

    def _group_args(self) -> tuple[list[float], list[torch.Tensor | None], list[int]]:
        """Every group's hyper-parameters as the step carries them (``HYPER`` floats each, a
        tensor lr apart) and its seed as a signed 64-bit int."""
        hyper: list[float] = []
        lr_tensors: list[torch.Tensor | None] = []
        seeds: list[int] = []
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            lr_tensors.append(lr if isinstance(lr, torch.Tensor) else None)
            hyper += [0.0 if isinstance(lr, torch.Tensor) else _number(gi, "lr", lr), _number(gi, "betas[0]", group["betas"][0]),
                      _number(gi, "betas[1]", group["betas"][1]), _number(gi, "eps", group["eps"]),
                      _number(gi, "weight_decay", group["weight_decay"]), 1.0 if group["maximize"] else 0.0]
            try:
                seeds.append(seed_arg(_contract.check_u64("seed", group["seed"])))
            except (TypeError, ValueError) as e:
                raise type(e)(f"param_groups[{gi}]: {e}") from None
        return hyper, lr_tensors, seeds

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (per-parameter ``step``, ``exp_avg``, ``exp_avg_sq``, ``master`` /
        ``compensation``; ``precision``, ``state_dtype``, ``seed`` in every group) plus an
        ``"srkern"`` entry with the format, the contract and the layout (offset and flat size
        of every parameter), checked on load when present."""
        sd = super().state_dict()
        sd["srkern"] = {"format": TORCH_FORMAT, "format_version": TORCH_VERSION,
                        "contract": _contract.CONTRACT_VERSION, "offsets": self.layout(),
                        "numels": [flat_size(p) for p in self._params()]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load srkern's state dict (this format or format 1), or ``torch.optim.AdamW``'s (see
        :mod:`srkern._torch_state` for what each becomes). Everything is checked first:
        :class:`srkern.checkpoint.CheckpointMismatch` or ``CheckpointCorrupt`` (both
        ``ValueError``) names the cause, and nothing is loaded. The parameters stay this
        optimizer's: each group's saved ``params`` must be the positions :meth:`state_dict`
        writes. torch's load pre- and post-hooks run as in ``torch.optim.Optimizer``."""
        def check(sd: Any) -> tuple[list[dict], dict[int, dict[str, torch.Tensor]]]:
            try:
                return checked(self, sd)
            except CheckpointError:
                raise
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointCorrupt(f"malformed {TORCH_FORMAT} state dict: {type(e).__name__}: {e}") from None
        load_checked(self, state_dict, check)


# torch.optim.AdamW's flags and their defaults, for groups saved before a flag existed.
_FLAGS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
              decoupled_weight_decay=True)


def _number(gi: int, name: str, x: Any) -> float:
    """A hyper-parameter as the float the step carries (its range is checked in the step)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"param_groups[{gi}]: {name} must be a number, got {type(x).__name__}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"param_groups[{gi}]: {name}={x!r} does not fit a float") from None


def _check_group(group: dict[str, Any]) -> None:
    """A parameter group's hyper-parameters and srkern settings (``ValueError``/``TypeError``)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.is_complex():
            raise ValueError(f"a tensor lr must be a 1-element real tensor, got shape {tuple(lr.shape)}")
        lr = lr.item()
    betas = group["betas"]
    if isinstance(betas, (tuple, list)) and len(betas) == 2 and len({torch.is_tensor(b) for b in betas}) > 1:
        raise ValueError("betas must be either both floats or both Tensors")  # as torch
    if isinstance(betas, (tuple, list)):  # tensor betas are read as numbers
        betas = tuple(_number(0, f"betas[{i}]", b) for i, b in enumerate(betas))
    check_hyper({**group, "lr": lr, "betas": betas})
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"maximize must be a bool, got {type(group['maximize']).__name__}")
    if group.get("amsgrad"):
        raise NotImplementedError("srkern.torch.AdamW has no amsgrad variant")
    if group.get("decoupled_weight_decay", True) is not True:
        raise NotImplementedError("srkern.torch.AdamW decays weights decoupled (AdamW); "
                                  "decoupled_weight_decay=False (Adam's L2 decay) is not implemented")
    bytes_per_param(group["precision"], group["state_dtype"])  # validates both
    _contract.check_u64("seed", group["seed"])
