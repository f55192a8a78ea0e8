""":class:`FusedOptimizer`: the body that ``srkern.torch.SGD``, ``Lion`` and ``Adafactor``
(``srkern/_torch_optim.py``) share with each other and with ``srkern.torch.AdamW``'s conventions:

- each parameter's mode follows its dtype and its group's ``precision`` (BF16 parameters the
  group's mode, FP32 ones ``fp32``; complex64 as real pairs where the update is linear, SGD);
- per-parameter state in torch's layout, with an FP32 ``step`` tensor (the Philox ``step`` of
  the parameter's draws: it advances only when the parameter has a gradient and the step is not
  skipped), plus ``master`` (``fp32-master``) or ``compensation`` (``bf16-kahan``);
- one logical flat vector over every parameter of every group, in group order (bit contract
  v1.1), so grouping, bucketing and world size change no bit;
- a step checks every bucket (group, device, mode, gradient and state dtype, step count) before
  it writes any: a bad call raises and changes no buffer and no state;
- ``torch.amp.GradScaler`` support (``grad_scale`` / ``found_inf`` read on the host);
- ``state_dict`` is torch's; ``load_state_dict`` takes srkern's or torch's own optimizer's
  (``torch.optim.SGD``, ``torch.optim.Adafactor``) and keeps each state tensor's dtype where the
  mode allows it (torch's loader would cast an FP32 master copy to the BF16 parameter's dtype).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from . import _contract
from ._torch_ops import TORCH_DTYPES, _real, flat_size, param_precision, skipped, state_dtype_for
from .precisions import PRECISIONS, default_state_dtype
from .sgd import ELEMENTWISE_PRECISIONS, check_precision

_SETTINGS = ("precision", "state_dtype", "seed")


def _scalar(gi: int, name: str, x: Any) -> Any:
    """A hyper-parameter as the number the functional step takes (a 1-element tensor is read:
    on CUDA one synchronisation); its range is checked there."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex():
            raise ValueError(f"param_groups[{gi}]: a tensor {name} must be a 1-element real tensor, "
                             f"got shape {tuple(x.shape)}")
        return x.item()
    return x


def amp_args(opt: torch.optim.Optimizer, grad_scale: Any, found_inf: Any) -> tuple[float, Any]:
    """``step``'s ``grad_scale`` (a float, or a 1-element tensor read here) and ``found_inf``
    (None or a tensor), combined with what ``torch.amp.GradScaler.step`` set on the optimizer: its
    scale divides ``grad_scale`` (the kernels unscale) and its inf flag adds to ``found_inf``."""
    if torch.is_tensor(grad_scale) and grad_scale.numel() == 1 and not grad_scale.is_complex():
        grad_scale = grad_scale.item()
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)):
        raise TypeError(f"grad_scale must be a float, got {type(grad_scale).__name__}")
    if found_inf is not None and not isinstance(found_inf, torch.Tensor):
        raise TypeError(f"found_inf must be a 1-element torch.float32 tensor, got {type(found_inf).__name__}")
    amp_scale, amp_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    if amp_scale is not None:  # GradScaler's scale S: the gradients are S times the true ones
        grad_scale = grad_scale / float(amp_scale)
    if amp_inf is not None:
        found_inf = amp_inf if found_inf is None else found_inf + amp_inf.to(found_inf.device)
    return float(grad_scale), found_inf


def add_group(opt: torch.optim.Optimizer, param_group: dict[str, Any],
              check: Callable[[dict[str, Any], int], None]) -> None:
    """torch's ``add_param_group`` for srkern's optimizers, all or nothing: a group refused by
    torch's checks or by ``check(group, index)`` (hyper-parameters, settings, parameter dtypes)
    leaves ``param_groups`` as it was. A group that names its ``precision`` but no
    ``state_dtype`` takes that mode's default."""
    if isinstance(param_group, dict) and "precision" in param_group and "state_dtype" not in param_group \
            and param_group["precision"] in PRECISIONS:
        param_group = {**param_group, "state_dtype": default_state_dtype(param_group["precision"])}
    torch.optim.Optimizer.add_param_group(opt, param_group)
    try:
        check(opt.param_groups[-1], len(opt.param_groups) - 1)
    except BaseException:
        opt.param_groups.pop()
        raise


def load_checked(opt: torch.optim.Optimizer, state_dict: Any,
                 checked: Callable[[Any], tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]]) -> None:
    """``load_state_dict`` for srkern's optimizers: torch's pre-hooks (one may replace the dict),
    then ``checked(state_dict)`` (the groups and the per-parameter states by position in group
    order, every value checked and converted: it raises before anything is written), then the
    state installed, the optimizer-wide seed taken from the first group (groups added later take
    it), and torch's post-hooks."""
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        out = hook(opt, state_dict)
        state_dict = state_dict if out is None else out
    groups, states = checked(state_dict)
    params = [p for g in opt.param_groups for p in g["params"]]
    state = defaultdict(dict, {params[k]: st for k, st in states.items()})
    opt.__setstate__({"state": state, "param_groups": groups})
    if groups:
        opt.defaults["seed"] = groups[0]["seed"]
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


class FusedOptimizer(torch.optim.Optimizer):
    """The shared body of srkern's single-launch torch optimizers (see the module docstring).

    A subclass names itself (``NAME``), its torch flags (``FLAGS``, defaults for groups saved
    before a flag existed), whether complex parameters are updated as real pairs (``COMPLEX``),
    and implements :meth:`_check_hyper` (a group's hyper-parameters, raising ``ValueError`` /
    ``TypeError``), :meth:`_moments` (the parameter's state tensors other than ``step``,
    ``master`` and ``compensation``) and :meth:`_prepare` (one bucket's checked launch).
    """
    NAME = ""
    FLAGS: dict[str, Any] = {}
    COMPLEX = False
    # torch.amp.GradScaler.step hands the step its scale and inf flag as attributes.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], precision: str, seed: int | None,
                 state_dtype: str | None) -> None:
        check_precision(precision, f"srkern.torch.{self.NAME}")
        defaults = dict(self.FLAGS, **defaults, precision=precision,
                        state_dtype=state_dtype or default_state_dtype(precision), seed=_contract.resolve_seed(seed))
        self._check_settings(defaults, 0)
        super().__init__(params, defaults)

    precision = property(lambda self: self.defaults["precision"])
    state_dtype = property(lambda self: self.defaults["state_dtype"])
    seed = property(lambda self: self.defaults["seed"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Groups saved by torch's own optimizer (or before a flag existed) take the defaults.
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.FLAGS.items():
                group.setdefault(k, v)
            for k in _SETTINGS:
                group.setdefault(k, self.defaults[k])
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    # ---- checks --------------------------------------------------------------------------------

    def _check_settings(self, group: dict[str, Any], gi: int) -> dict[str, Any]:
        """Group ``gi``'s settings and hyper-parameters checked (``ValueError`` / ``TypeError``
        naming the group); returns the hyper-parameters as the functional form takes them (a
        tensor lr read here, once)."""
        try:
            check_precision(group["precision"], f"srkern.torch.{self.NAME}")
            sd = group["state_dtype"]
            if sd not in ("bfloat16", "float32"):
                raise ValueError(f"state_dtype must be 'bfloat16' or 'float32', got {sd!r}")
            _contract.check_u64("seed", group["seed"])
            h = self._hyper(group, gi)
            self._check_hyper(h, group)
            return h
        except (TypeError, ValueError) as e:
            msg = str(e)
            raise type(e)(msg if msg.startswith("param_groups[") else f"param_groups[{gi}]: {msg}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, all or nothing (see :func:`add_group`)."""
        def check(group: dict[str, Any], gi: int) -> None:
            self._check_settings(group, gi)
            for i, p in enumerate(group["params"]):
                self._mode_of(group, p, gi, f"parameter {i} of group {gi}")
        add_group(self, param_group, check)

    def _mode_of(self, group: dict[str, Any], p: torch.Tensor, gi: int, who: str) -> str:
        """The mode parameter ``p`` takes in ``group`` (``TypeError`` naming ``who`` if none)."""
        try:
            if p.is_complex() and not self.COMPLEX:
                raise TypeError(f"srkern.torch.{self.NAME} does not support complex parameters")
            prec = param_precision(group["precision"], p.dtype)
            if prec not in ELEMENTWISE_PRECISIONS:
                raise TypeError(f"srkern.torch.{self.NAME} has no {prec!r} kernels: {p.dtype} parameters "
                                f"are not supported (BF16 and FP32 are)")
        except TypeError as e:
            raise TypeError(f"{who}: {e}") from None
        return prec

    # ---- state -----------------------------------------------------------------------------------

    def _shapes(self, p: torch.Tensor) -> dict[str, tuple]:
        """name -> shape of every state tensor of its own this optimizer may keep for ``p``."""
        raise NotImplementedError

    def _moments(self, group: dict[str, Any], p: torch.Tensor, prec: str) -> dict[str, tuple]:
        """name -> (shape, dtype) of the state tensors a step of ``group`` uses (zeros at start)."""
        dtype = self._state_dtype(group, p, prec)
        return {k: (shape, dtype) for k, shape in self._shapes(p).items()}

    def _fill_state(self, group: dict[str, Any], p: torch.Tensor, prec: str,
                    state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with every entry the step needs added (step 0, zero moments, the master as
        the exact upcast, zero compensation), as a new dict: the optimizer's state is replaced
        only after the step's checks pass."""
        want = {k: v for k, v in self._moments(group, p, prec).items() if state.get(k) is None}
        pm = PRECISIONS[prec]
        new = dict(state)
        if not torch.is_tensor(new.get("step")):
            new["step"] = torch.tensor(0.0, dtype=torch.float32)
        for name, (shape, dtype) in want.items():
            new[name] = torch.zeros(shape, dtype=dtype, device=p.device)
        if pm.master and new.get("master") is None:
            new["master"] = p.detach().to(torch.float32, copy=True).contiguous()
        if pm.compensation and new.get("compensation") is None:
            new["compensation"] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        return new

    def _state_dtype(self, group: dict[str, Any], p: torch.Tensor, prec: str) -> torch.dtype:
        if p.is_complex():
            return torch.complex64
        return TORCH_DTYPES[state_dtype_for(prec, group["state_dtype"])]

    def bytes_per_param(self) -> float:
        """Bytes per parameter held now by the weights and this optimizer's state (gradient and
        step counts excluded), over every parameter; 0 before anything is held."""
        params = [p for g in self.param_groups for p in g["params"]]
        n = sum(p.numel() for p in params)
        held = sum(p.numel() * p.element_size() for p in params)
        for st in self.state.values():
            held += sum(t.numel() * t.element_size() for k, t in st.items() if k != "step" and torch.is_tensor(t))
        return held / n if n else 0.0

    # ---- the step --------------------------------------------------------------------------------

    def _hyper(self, group: dict[str, Any], gi: int) -> dict[str, Any]:
        """The group's hyper-parameters as keywords of the functional form."""
        raise NotImplementedError

    def _check_hyper(self, h: dict[str, Any], group: dict[str, Any]) -> None:
        """Raise ``ValueError`` / ``TypeError`` for bad hyper-parameters ``h`` (the functional
        form's own checks, run on empty lists)."""
        raise NotImplementedError

    def _prepare(self, group: dict[str, Any], h: dict[str, Any], prec: str, b: dict[str, list], step: int,
                 grad_scale: float) -> Callable[[], None] | None:
        """One bucket's checked launch (the functional form's ``prepare_*``)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float = 1.0,
             found_inf: torch.Tensor | None = None) -> Any:
        """One step on every parameter that has a gradient.

        ``grad_scale`` multiplies every gradient inside the kernel; ``found_inf`` (1-element
        float32 tensor) non-zero makes the step change nothing (no buffer, no state, no step
        count). Both are read on the host (on CUDA, one synchronisation); under
        ``torch.amp.GradScaler.step`` the scaler's scale and inf flag are taken as well.
        Everything is checked before the first write: a bad call raises and changes nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = amp_args(self, grad_scale, found_inf)
        _contract.check_f32("grad_scale", grad_scale, -math.inf)
        hypers = [self._check_settings(group, gi) for gi, group in enumerate(self.param_groups)]
        if skipped(found_inf):
            return loss
        self._run(hypers, grad_scale)
        return loss

    @torch.compiler.disable  # a compiled training step runs this part eagerly (NumPy pointer tables)
    def _run(self, hypers: list[dict[str, Any]], grad_scale: float) -> None:
        buckets: dict[tuple, dict[str, list]] = {}
        new_states: dict[torch.Tensor, dict[str, Any]] = {}
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        offset = 0
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                off, offset = offset, offset + flat_size(p)
                if p.grad is None:
                    continue
                if p.grad.layout != torch.strided or p.grad.is_sparse:
                    raise RuntimeError(f"param_groups[{gi}]: srkern.torch.{self.NAME} does not support "
                                       "sparse gradients")
                prec = self._mode_of(group, p, gi, f"param_groups[{gi}]")
                old = self.state.get(p, {})
                state = self._fill_state(group, p, prec, old)
                if state.keys() != old.keys() or any(state[k] is not old[k] for k in state):
                    new_states[p] = state
                s = state["step"]
                if s.dtype != torch.float32 or s.numel() != 1:
                    raise TypeError(f"param_groups[{gi}]: state 'step' must be a 1-element torch.float32 "
                                    f"tensor (torch's layout), got {s.dtype} of shape {tuple(s.shape)}")
                count = int(s.item())
                if not 0 <= count < 2 ** 24 - 1:
                    raise ValueError(f"param_groups[{gi}]: step count {count}: FP32 step counts are exact "
                                     "only below 2**24")
                g = p.grad
                g = g if g.is_contiguous() and not g.is_neg() else g.resolve_neg().contiguous()
                pw = p
                if not p.is_contiguous():  # updated as a dense copy, written back after the launch
                    pw = p.contiguous()
                    staged.append((p, pw))
                fresh = self._fresh(group, old)
                dtypes = tuple(state[k].dtype for k in self._moments(group, p, prec))
                key = (gi, p.device, g.dtype, prec, dtypes, count + 1, fresh)
                b = buckets.setdefault(key, {"p": [], "g": [], "state": [], "o": [], "steps": [], "i": []})
                b["i"].append(i)
                b["p"].append(_real(pw))
                b["g"].append(_real(g))
                b["state"].append(state)
                b["o"].append(off)
                b["steps"].append(s)
        if len({id(s) for b in buckets.values() for s in b["steps"]}) != sum(len(b["steps"]) for b in buckets.values()):
            raise ValueError("two parameters share one state 'step' tensor: each keeps its own count")
        launches = []
        for (gi, _, _, prec, _, step, fresh), b in buckets.items():
            b["fresh"] = fresh
            try:
                launches.append(self._prepare(self.param_groups[gi], hypers[gi], prec, b, step, grad_scale))
            except (TypeError, ValueError) as e:  # list index k of the bucket is the group's b["i"][k]
                which = ", ".join(f"[{k}] = parameter {i}" for k, i in enumerate(b["i"][:8]))
                raise type(e)(f"param_groups[{gi}]: {e} (this launch's lists: {which}"
                              f"{', ...' if len(b['i']) > 8 else ''})") from None
        # Every bucket is checked: from here on buffers are written.
        self.state.update(new_states)
        for launch in launches:
            if launch is not None:
                launch()
        for p, pw in staged:
            p.copy_(pw)
        steps = [s for b in buckets.values() for s in b["steps"]]
        if steps:
            torch._foreach_add_(steps, 1.0)

    def _fresh(self, group: dict[str, Any], state: dict[str, Any]) -> bool:
        """Whether the parameter's state starts at this step (SGD: its momentum buffer)."""
        return False

    # ---- checkpoints -----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load srkern's state dict or the torch optimizer's (``torch.optim.SGD``,
        ``torch.optim.Adafactor``), all or nothing.

        Everything is checked before anything is written: the groups (their sizes; every saved
        hyper-parameter and setting, a group saved by torch keeping this optimizer's
        ``precision``, ``state_dtype`` and ``seed``), and every state entry (known names,
        shapes, floating dtypes, whole step counts in [0, 2**24)). A bad dict raises
        ``ValueError`` / ``TypeError`` naming the group, parameter and entry, and nothing changes.
        Each state tensor is copied and keeps its dtype where the parameter's mode allows it (else
        the mode's: a 16-bit moment wanted in FP32 is upcast exactly; torch's own loader would
        cast an FP32 master copy to the BF16 parameter's dtype); steps become fresh FP32 tensors.
        Entries a mode needs and the dict lacks (a master copy, a compensation buffer, a step
        count) are made at the next step, as for a new parameter. torch's load pre- and
        post-hooks run as in ``torch.optim.Optimizer``."""
        load_checked(self, state_dict, self._checked_load)

    def _checked_load(self, sd: Any) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
        """The groups and the per-parameter states (by position in group order) that ``sd``
        loads as, every value checked and converted; raises before anything is written."""
        if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) \
                or not isinstance(sd.get("state"), dict):
            raise ValueError("a state dict has 'state' (a dict) and 'param_groups' (a list)")
        saved = sd["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        groups, where = [], {}
        k0 = 0
        for gi, (sg, group) in enumerate(zip(saved, self.param_groups)):
            if not isinstance(sg, dict) or len(sg.get("params", ())) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                                 f"of optimizer's group (param_groups[{gi}])")
            g = {**self.FLAGS, **{k: group[k] for k in _SETTINGS}, **sg, "params": group["params"]}
            self._check_settings(g, gi)
            groups.append(g)
            for i, (pid, p) in enumerate(zip(sg["params"], group["params"])):
                where[pid] = (gi, i, k0 + i, p, g)
            k0 += len(group["params"])
        states: dict[int, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            if pid not in where:
                raise ValueError(f"the state dict has state for parameter id {pid!r}, which no group lists")
            gi, i, k, p, g = where[pid]
            who = f"param_groups[{gi}] parameter {i}"
            if not isinstance(st, dict):
                raise TypeError(f"{who}: its state must be a dict, got {type(st).__name__}")
            prec = self._mode_of(g, p, gi, who)
            shapes = {**self._shapes(p), "master": p.shape, "compensation": p.shape}
            out: dict[str, Any] = {}
            for name, v in st.items():
                if name == "step":
                    out["step"] = _checked_count(who, v)
                    continue
                if v is None and name in shapes:  # (torch's "no buffer yet")
                    continue
                if name not in shapes:
                    raise ValueError(f"{who}: state {name!r} is not kept by srkern.torch.{self.NAME}")
                if not torch.is_tensor(v) or not (v.is_floating_point() or v.is_complex()):
                    raise TypeError(f"{who}: state {name!r} must be a floating-point tensor, got "
                                    f"{getattr(v, 'dtype', type(v).__name__)}")
                if tuple(v.shape) != tuple(shapes[name]):
                    raise ValueError(f"{who}: state {name!r} has shape {tuple(v.shape)}, the parameter needs "
                                     f"{tuple(shapes[name])}")
                if name == "master":
                    want = torch.float32
                elif name == "compensation":
                    want = p.dtype
                elif p.is_complex():
                    want = torch.complex64
                elif str(v.dtype).removeprefix("torch.") in PRECISIONS[prec].state_dtypes:
                    want = v.dtype
                else:
                    want = self._state_dtype(g, p, prec)
                if p.is_complex() != v.is_complex():
                    raise TypeError(f"{who}: state {name!r} is {v.dtype}, the parameter {p.dtype}")
                out[name] = v.to(device=p.device, dtype=want, copy=True).contiguous()
            states[k] = out
        return groups, states


def _checked_count(who: str, v: Any) -> torch.Tensor:
    """A saved step count (a number or a 1-element real tensor, any dtype) as a fresh FP32 scalar
    tensor: a whole number in [0, 2**24) (FP32 counts are exact there)."""
    if torch.is_tensor(v):
        if v.numel() != 1 or v.is_complex():
            raise ValueError(f"{who}: state 'step' must be a number or a 1-element real tensor, got shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() \
            or not 0 <= v < 2 ** 24 - 1:
        raise ValueError(f"{who}: state 'step' must be a whole number in [0, 2**24), got {v!r}")
    return torch.tensor(float(v), dtype=torch.float32)
