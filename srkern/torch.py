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
from .adamw import _plan_step
from .checkpoint import (TORCH_FORMAT, TORCH_VERSION, CheckpointCorrupt, CheckpointError,
                         CheckpointMismatch, check_counters, check_format, check_hyper, check_hypers,
                         check_layout, expect_equal, state_sections)
from .formats import dtype_name
from .layout import flat_offsets
from .precisions import PRECISIONS, bytes_per_param, default_state_dtype, mode, param_dtype
from ._torch_sharded import ShardedAdamW  # re-exported: srkern.torch.ShardedAdamW

__all__ = ["AdamW", "ShardedAdamW"]

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) through srkern's fused multi-tensor kernel.

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimizer. Their dtype
            must match ``precision``: BF16 for the BF16 modes and ``fp32-master``, FP32 for
            ``fp32``. CPU and CUDA tensors (one launch per parameter group, device and gradient
            dtype).
        lr, betas, eps, weight_decay: the usual AdamW hyper-parameters, per group.
        precision: ``"bf16-sr"`` (BF16 weights and moments, SR on every write),
            ``"bf16-nearest"``, ``"bf16-kahan"``, ``"fp32-master"`` (FP32 master weights kept
            here, the BF16 model weights written round-to-nearest) or ``"fp32"``; see
            :data:`srkern.precisions.PRECISIONS`.
        seed: 64-bit Philox key (share it across data-parallel replicas); None draws one from
            :func:`srkern.manual_seed`'s generator.
        state_dtype: moment dtype, ``"bfloat16"`` (default in the BF16 modes) or ``"float32"``.
        maximize: ascend instead of descend (per group, as torch keeps it): the kernel's gradient
            is ``-grad``, bit-identical to stepping on negated gradients.
        foreach, fused, capturable: torch.optim.AdamW's keywords, accepted with any value: srkern
            always runs one fused multi-tensor launch per group, device and gradient dtype.
        amsgrad, differentiable: only ``False`` (``True`` is a ``NotImplementedError``).

    Layout (bit contract v1.1): every parameter of every group, in group order, gets a fixed
    position in one logical flat vector (cumulative sizes, no padding); parameters added later
    with ``add_param_group`` go at the end. The Philox ``step`` is the optimizer's step count.
    A parameter whose ``.grad`` is None is skipped at that step (its buffers are untouched; the
    others keep their positions). Bias corrections use the optimizer's step count, so a
    parameter that skips steps is corrected as if it had not (torch's AdamW counts per
    parameter). ``state_dict()`` carries step, seed, precision and layout; saving, loading and
    continuing is bit-identical to an uninterrupted run.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, precision: str = "bf16-sr",
                 seed: int | None = None, *, state_dtype: str | None = None, maximize: bool = False,
                 amsgrad: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        # torch.optim.AdamW's keywords. foreach, fused and capturable name what srkern always
        # does (one fused multi-tensor launch per group, device and gradient dtype; found_inf
        # read on the device), so any value is accepted.
        if amsgrad:
            raise NotImplementedError("srkern.torch.AdamW has no amsgrad variant (it would need a third "
                                      "moment buffer in every precision mode)")
        if differentiable:
            raise NotImplementedError("srkern.torch.AdamW is not differentiable: its step runs outside "
                                      "autograd (differentiable=True is for optimizer-through-optimizer "
                                      "training; use torch.optim.AdamW for that)")
        mode(precision)
        self.precision = precision
        self.state_dtype = state_dtype or default_state_dtype(precision)
        bytes_per_param(precision, self.state_dtype)  # validates state_dtype for the mode
        self.seed = _contract.resolve_seed(seed)
        self._step = 0
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, capturable=capturable, differentiable=False)
        check_hyper(defaults)
        super().__init__(params, defaults)

    # ---- construction checks ----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, all or nothing: a group refused by torch's checks or by
        srkern's (hyper-parameters, parameter dtypes) leaves ``param_groups`` as it was."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyper(group)
            if not isinstance(group["maximize"], bool):
                raise TypeError(f"maximize must be a bool, got {type(group['maximize']).__name__}")
            want = _TORCH_DTYPES[param_dtype(self.precision)]
            for i, p in enumerate(group["params"]):
                if p.dtype != want:
                    raise TypeError(f"precision {self.precision!r} needs {want} parameters; parameter {i} "
                                    f"of group {len(self.param_groups) - 1} is {p.dtype} "
                                    f"(convert the model, e.g. model.to({want}))")
        except BaseException:
            self.param_groups.pop()
            raise

    # ---- copies and pickles -----------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles defaults, state and param_groups only; srkern's settings and
        # its step count travel too, so a deepcopy, a pickle or torch.save(optimizer) continues
        # bit for bit.
        return {**super().__getstate__(), "precision": self.precision, "state_dtype": self.state_dtype,
                "seed": self.seed, "_step": self._step}

    # ---- layout and state -------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def layout(self) -> list[int]:
        """Logical flat offset of every parameter, in group order (cumulative sizes)."""
        return flat_offsets([p.numel() for p in self._params()])

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """``p``'s state; a new one (zero moments) is returned without being stored yet."""
        state = self.state.get(p)
        if not state:
            state = {}
            for name, dtype in state_sections(self.precision, self.state_dtype):
                if name == "master":  # FP32 master weights start as the exact upcast of the model
                    state[name] = p.detach().to(torch.float32, copy=True).contiguous()
                else:
                    state[name] = torch.zeros_like(p, dtype=_TORCH_DTYPES[dtype],
                                                   memory_format=torch.contiguous_format)
        return state

    def bytes_per_param(self) -> int:
        """Bytes per parameter held by the weights and this optimizer (gradient excluded):
        6 for ``bf16-sr`` with BF16 moments, 14 for ``fp32-master``, 12 for ``fp32``."""
        return bytes_per_param(self.precision, self.state_dtype)

    # ---- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float = 1.0,
             found_inf: torch.Tensor | None = None) -> Any:
        """One AdamW step on every parameter that has a gradient.

        ``grad_scale`` multiplies every gradient inside the kernel (unscaling, clipping);
        ``found_inf`` (1-element float32 tensor) makes the step write nothing when non-zero,
        read on the device without a host sync. The step count advances either way.

        Everything (every group's hyper-parameters, ``grad_scale``, ``found_inf``, every buffer)
        is checked before the first launch: a bad call raises and changes no buffer, no state
        and not the step count.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self._step + 1
        for gi, group in enumerate(self.param_groups):
            try:
                check_hyper(group, grad_scale)
            except (TypeError, ValueError) as e:
                raise type(e)(f"param_groups[{gi}]: {e}") from None
        if found_inf is not None and (not isinstance(found_inf, torch.Tensor)
                                      or found_inf.dtype != torch.float32 or found_inf.numel() != 1):
            raise TypeError(f"found_inf must be a 1-element torch.float32 tensor, got "
                            f"{getattr(found_inf, 'dtype', type(found_inf).__name__)} "
                            f"{tuple(getattr(found_inf, 'shape', ()))}")
        offsets = self.layout()
        new_states: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        k = 0
        buckets: dict[tuple, dict[str, list]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                off = offsets[k]
                k += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("srkern.torch.AdamW does not support sparse gradients")
                state = self._init_state(p)
                if not self.state.get(p):
                    new_states[p] = state
                key = (gi, p.device, p.grad.dtype)
                b = buckets.setdefault(key, {"p": [], "g": [], "m": [], "v": [], "w": [], "c": [], "o": []})
                b["p"].append(p)
                g = p.grad  # read in place: a lazy negation (torch's negative bit) is resolved first
                b["g"].append(g if g.is_contiguous() and not g.is_neg() else g.resolve_neg().contiguous())
                b["m"].append(state["exp_avg"])
                b["v"].append(state["exp_avg_sq"])
                if "master" in state:
                    b["w"].append(state["master"])
                if "compensation" in state:
                    b["c"].append(state["compensation"])
                b["o"].append(off)
        prec = PRECISIONS[self.precision]
        launches = []
        for (gi, device, _), b in buckets.items():
            group = self.param_groups[gi]
            fi = found_inf
            if fi is not None and fi.device != device:
                fi = fi.to(device=device)
            try:
                launches.append(_plan_step(
                    b["p"], b["g"], b["m"], b["v"], step=step, lr=group["lr"], betas=group["betas"],
                    eps=group["eps"], weight_decay=group["weight_decay"], precision=self.precision,
                    master_params=b["w"] if prec.master else None,
                    compensation=b["c"] if prec.compensation else None,
                    # maximize: the kernel's gradient is -grad (exactly: FP32 products are sign-symmetric)
                    grad_scale=-grad_scale if group.get("maximize", False) else grad_scale,
                    found_inf=fi, seed=self.seed, offsets=b["o"]))
            except (TypeError, ValueError) as e:
                raise type(e)(f"param_groups[{gi}]: {e}") from None
        # All checks passed: from here on buffers are written.
        self.state.update(new_states)
        for launch in launches:
            if launch is not None:
                launch()
        self._step = step
        return loss

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus an ``"srkern"`` entry: format and version, contract version,
        step, seed, precision, state dtype, and the layout (offset and size of every parameter)."""
        sd = super().state_dict()
        sd["srkern"] = {"format": TORCH_FORMAT, "format_version": TORCH_VERSION,
                        "contract": _contract.CONTRACT_VERSION, "step": self._step, "seed": self.seed,
                        "precision": self.precision, "state_dtype": self.state_dtype,
                        "offsets": self.layout(), "numels": [p.numel() for p in self._params()]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`. Its format, contract, precision, state
        dtype, layout, state buffers (names, dtypes, sizes), hyper-parameters, step and seed are
        checked first: :class:`srkern.checkpoint.CheckpointMismatch` or ``CheckpointCorrupt``
        (both ``ValueError``) names the cause, and nothing is loaded. The parameters stay this
        optimizer's: each group's saved ``params`` must be the positions :meth:`state_dict`
        writes, and every state tensor must have its parameter's shape and the mode's dtype."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("srkern"), dict):
            raise CheckpointMismatch(f"not an {TORCH_FORMAT} state dict (no 'srkern' entry)")
        sd = dict(state_dict)
        meta = sd.pop("srkern")
        params = self._params()
        try:
            saved = self._checked_state(meta, sd, params)
        except CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointCorrupt(f"malformed {TORCH_FORMAT} state dict: {type(e).__name__}: {e}") from None
        # Everything is checked: from here on state is written (torch's own load cannot fail now).
        super().load_state_dict(sd)
        # torch casts floating-point state to each parameter's dtype; keep the saved dtypes
        # (FP32 master weights and moments next to BF16 parameters).
        for i, st in saved.items():
            p = params[i]
            self.state[p] = {k: v.detach().to(device=p.device, dtype=v.dtype, copy=True).contiguous()
                             for k, v in st.items()}
        self._step, self.seed = meta["step"], meta["seed"]  # checked ints: nothing to convert

    def _checked_state(self, meta: dict, sd: dict, params: list[torch.Tensor]) -> dict[int, dict]:
        """The per-parameter state of a state dict, once every check has passed."""
        # State dicts written before the format field existed are version 1.
        check_format({"format": TORCH_FORMAT, "format_version": 1, **meta}, TORCH_FORMAT, TORCH_VERSION,
                     "contract")
        expect_equal("precision", meta["precision"], self.precision)
        expect_equal("state_dtype", meta["state_dtype"], self.state_dtype)
        check_layout(list(zip(meta["offsets"], meta["numels"], strict=True)),
                     list(zip(self.layout(), [p.numel() for p in params], strict=True)))
        check_counters(meta)
        groups = sd["param_groups"]
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise CheckpointCorrupt(f"param_groups must be a list of dicts, got {type(groups).__name__}")
        check_hypers(groups, len(self.param_groups))
        first = 0
        for gi, (g, mine) in enumerate(zip(groups, self.param_groups, strict=True)):
            # torch maps saved state to parameters through these ids: only the positions that
            # state_dict() writes keep that mapping the one checked below.
            want_ids = list(range(first, first + len(mine["params"])))
            if g.get("params") != want_ids or not all(type(i) is int for i in g["params"]):
                raise CheckpointMismatch(f"param_groups[{gi}]['params']: {g.get('params')!r:.80} in the checkpoint, "
                                         f"{want_ids!r:.80} (this optimizer's parameters) here")
            first += len(want_ids)
        if not isinstance(sd["state"], dict):
            raise CheckpointCorrupt(f"state must be a dict, got {type(sd['state']).__name__}")
        want = sorted(state_sections(self.precision, self.state_dtype))
        saved = {}
        for i, st in sd["state"].items():
            if type(i) is not int or not 0 <= i < len(params) or not isinstance(st, dict):
                raise CheckpointCorrupt(f"state entry {i!r}: not a parameter position with a dict of tensors")
            if not st:  # a parameter that never had a gradient
                continue
            for k, v in st.items():
                if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_meta:
                    raise CheckpointCorrupt(f"state[{i}][{k!r}] is not a dense tensor with data: {type(v).__name__}")
            expect_equal(f"state of parameter {i}", sorted((k, dtype_name(v.dtype)) for k, v in st.items()), want)
            for k, v in st.items():
                if v.numel() != params[i].numel():
                    raise CheckpointMismatch(f"state[{i}][{k!r}] has {v.numel()} elements, "
                                             f"parameter {i} has {params[i].numel()}")
                if v.shape != params[i].shape:
                    raise CheckpointMismatch(f"state[{i}][{k!r}] has shape {tuple(v.shape)}, "
                                             f"parameter {i} has {tuple(params[i].shape)}")
            saved[i] = st
        return saved
