"""``srkern.torch.AdamW``: the fused SR AdamW step as a ``torch.optim.Optimizer``.

Import it explicitly (``import srkern.torch``); ``import srkern`` does not import torch.

    import torch, srkern.torch
    model = MyModel().to(torch.bfloat16)
    opt = srkern.torch.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, precision="bf16-sr", seed=0)
    loss = model(x).float().pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from . import _contract
from .layout import flat_offsets
from .adamw import PRECISIONS, _plan_step, bytes_per_param, check_hyperparameters, default_state_dtype

__all__ = ["AdamW"]

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
            :data:`srkern.adamw.PRECISIONS`.
        seed: 64-bit Philox key (share it across data-parallel replicas); None draws one from
            :func:`srkern.manual_seed`'s generator.
        state_dtype: moment dtype, ``"bfloat16"`` (default in the BF16 modes) or ``"float32"``.

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
                 seed: int | None = None, *, state_dtype: str | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.state_dtype = state_dtype or default_state_dtype(precision)
        bytes_per_param(precision, self.state_dtype)  # validates state_dtype for the mode
        self.seed = _contract.resolve_seed(seed)
        self._step = 0
        check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # ---- construction checks ----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        want = _TORCH_DTYPES[PRECISIONS[self.precision].param_dtype]
        for i, p in enumerate(group["params"]):
            if p.dtype != want:
                raise TypeError(f"precision {self.precision!r} needs {want} parameters; parameter {i} "
                                f"of group {len(self.param_groups) - 1} is {p.dtype} "
                                f"(convert the model, e.g. model.to({want}))")

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
            sd = _TORCH_DTYPES[self.state_dtype]
            state["exp_avg"] = torch.zeros_like(p, dtype=sd, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.contiguous_format)
            if PRECISIONS[self.precision].master:
                state["master"] = p.detach().to(torch.float32, copy=True).contiguous()
            if PRECISIONS[self.precision].compensation:
                state["compensation"] = torch.zeros_like(p, dtype=torch.bfloat16,
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
                check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                      grad_scale)
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
                b["g"].append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
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
                    compensation=b["c"] if prec.compensation else None, grad_scale=grad_scale,
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
        """torch's state dict plus an ``"srkern"`` entry: contract version, step, seed,
        precision, state dtype, and the layout (offset and size of every parameter)."""
        sd = super().state_dict()
        sd["srkern"] = {"contract": _contract.CONTRACT_VERSION, "step": self._step, "seed": self.seed,
                        "precision": self.precision, "state_dtype": self.state_dtype,
                        "offsets": self.layout(), "numels": [p.numel() for p in self._params()]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; the precision, state dtype and layout must
        match this optimizer's (a clear error otherwise, and nothing is loaded)."""
        sd = dict(state_dict)
        meta = sd.pop("srkern", None)
        if meta is None:
            raise ValueError("not an srkern.torch.AdamW state dict (no 'srkern' entry)")
        if not _contract.contract_compatible(meta.get("contract")):
            raise ValueError(f"state dict is for bit contract {meta.get('contract')}, this is "
                             f"{_contract.CONTRACT_VERSION}")
        for key, mine in (("precision", self.precision), ("state_dtype", self.state_dtype)):
            if meta[key] != mine:
                raise ValueError(f"state dict has {key}={meta[key]!r}, this optimizer {mine!r}")
        numels = [p.numel() for p in self._params()]
        if list(meta["numels"]) != numels or list(meta["offsets"]) != self.layout():
            raise ValueError("state dict layout (parameter sizes and offsets) does not match this "
                             "optimizer's parameters")
        params = self._params()
        saved = {int(i): dict(st) for i, st in sd["state"].items()}
        super().load_state_dict(sd)
        # torch casts floating-point state to each parameter's dtype; keep the saved dtypes
        # (FP32 master weights and moments next to BF16 parameters).
        for i, st in saved.items():
            p = params[i]
            self.state[p] = {k: v.detach().to(device=p.device, dtype=v.dtype, copy=True).contiguous()
                             for k, v in st.items()}
        self._step = int(meta["step"])
        self.seed = int(meta["seed"])

