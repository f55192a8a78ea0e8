"""``srkern.torch.AdamW.load_state_dict``'s checks and conversions: which state dicts it loads
and what each becomes, decided before anything is written.

Three kinds load:
- srkern's own (torch's layout: per-parameter ``step``, ``exp_avg``, ``exp_avg_sq`` and
  ``master`` / ``compensation`` where the mode has them; ``precision``, ``state_dtype`` and
  ``seed`` in every group), with or without the top-level ``"srkern"`` entry (the layout
  check): ``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``;
- srkern's format 1 (one optimizer-wide step and the settings in the ``"srkern"`` entry): every
  parameter with state takes that step, which is what format 1's updates used;
- ``torch.optim.AdamW``'s (no ``precision`` in its groups): the groups keep this optimizer's
  srkern settings. A state tensor already of the wanted dtype is taken as it is, a 16-bit one
  wanted in FP32 is upcast (exactly), an FP32 moment wanted in BF16/FP16 is rounded with
  :func:`srkern.cast` (SR, ``seed`` = the group's, ``step`` = the parameter's step count,
  ``offset`` = its flat offset, ``stream`` = ``exp_avg`` or ``exp_avg_sq``: the draws the step
  that wrote it would have used in that stream); master weights are the exact upcast of the
  parameter and compensation starts at zero. ``amsgrad`` state is refused.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from . import _contract
from .cast import cast
from .checkpoint import (TORCH_FORMAT, TORCH_VERSION, CheckpointCorrupt, CheckpointMismatch, check_counters,
                         check_format, check_hypers, check_layout, expect_equal, state_sections)
from ._torch_ops import STEP_LIMIT, TORCH_DTYPES, flat_size, param_precision, state_dtype_for

SETTINGS = ("precision", "state_dtype", "seed")


def _as_float(x: Any) -> Any:
    return float(x) if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex() else x


def checked(opt: Any, sd: Any) -> tuple[list[dict], dict[int, dict[str, torch.Tensor]]]:
    """The parameter groups (saved settings, this optimizer's ``params``) and the per-parameter
    state (position -> tensors of the dtypes and devices the step uses) a state dict loads as;
    a ``CheckpointError`` naming the first problem otherwise."""
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) or not isinstance(sd.get("state"), dict):
        raise CheckpointMismatch("not an optimizer state dict (needs 'state' (a dict) and 'param_groups' (a list))")
    groups, state = sd["param_groups"], sd["state"]
    if not all(isinstance(g, dict) for g in groups):
        raise CheckpointCorrupt("param_groups must be a list of dicts")
    if len(groups) != len(opt.param_groups):
        raise CheckpointMismatch(f"parameter groups: {len(groups)} in the checkpoint, {len(opt.param_groups)} here")
    # The saved groups' settings are copied (tensor lr and betas included), as torch does.
    groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) | {"params": g.get("params")}
              for g in groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    offsets = opt.layout()
    meta = sd.get("srkern")
    old_step = None
    if meta is not None:
        if not isinstance(meta, dict):
            raise CheckpointCorrupt(f"the 'srkern' entry must be a dict, got {type(meta).__name__}")
        m = {"format": TORCH_FORMAT, "format_version": 1, **meta}  # format 1 had no such fields at first
        version = m["format_version"] if m["format_version"] in (1, TORCH_VERSION) else TORCH_VERSION
        check_format(m, TORCH_FORMAT, version, "contract")
        check_layout(list(zip(meta["offsets"], meta["numels"], strict=True)),
                     list(zip(offsets, [flat_size(p) for p in params], strict=True)))
        if version == 1:
            check_counters(meta)
            old_step = meta["step"]
            groups = [{**g, **{k: meta[k] for k in SETTINGS}} for g in groups]
    for gi, g in enumerate(groups):
        if g.get("amsgrad"):
            raise CheckpointMismatch(f"param_groups[{gi}] has amsgrad=True: srkern's AdamW has no amsgrad")
        if g.get("decoupled_weight_decay", True) is not True:
            raise CheckpointMismatch(f"param_groups[{gi}] has decoupled_weight_decay=False (Adam's L2 decay): "
                                     "srkern's AdamW decays decoupled")
    foreign = not any("precision" in g for g in groups)
    if foreign:  # torch.optim.AdamW's: this optimizer's settings
        groups = [{**g, **{k: mine[k] for k in SETTINGS}} for g, mine in zip(groups, opt.param_groups, strict=True)]
    check_hypers([{k: _as_float(v) for k, v in g.items()} for g in groups], len(opt.param_groups))
    first = 0
    position: dict[Any, int] = {}  # saved parameter id -> position here
    for gi, (g, mine) in enumerate(zip(groups, opt.param_groups, strict=True)):
        expect_equal(f"param_groups[{gi}] precision", g.get("precision"), mine["precision"])
        expect_equal(f"param_groups[{gi}] state_dtype", g.get("state_dtype"), mine["state_dtype"])
        check_counters({"seed": g.get("seed"), "step": 0})
        # torch maps saved state to parameters through these ids, by position. Integer ids must
        # be the positions state_dict() writes (so that mapping is the one checked below);
        # torch.distributed.checkpoint writes parameter names instead, mapped by position.
        ids, want_ids = g.get("params"), list(range(first, first + len(mine["params"])))
        names = (isinstance(ids, list) and len(ids) == len(want_ids) and all(isinstance(i, str) for i in ids)
                 and len(set(ids)) == len(ids) and not set(ids) & set(position))
        if not names and (ids != want_ids or not all(type(i) is int for i in ids)):
            raise CheckpointMismatch(f"param_groups[{gi}]['params']: {ids!r:.80} in the checkpoint, "
                                     f"{want_ids!r:.80} (this optimizer's parameters) here")
        position.update(zip(ids, want_ids))
        first += len(want_ids)
    group_of = [gi for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
    out = {}
    for key, st in state.items():
        i = position.get(key) if isinstance(key, (int, str)) and type(key) is not bool else None
        if i is None or not isinstance(st, dict):
            raise CheckpointCorrupt(f"state entry {key!r}: not a parameter position with a dict of tensors")
        if not st:  # a parameter that never had a gradient
            continue
        if old_step is not None:
            st = {**st, "step": old_step}
        g = groups[group_of[i]]
        out[i] = _entry(i, st, params[i], g, offsets[i], foreign)
    return [{**g, "params": mine["params"]} for g, mine in zip(groups, opt.param_groups, strict=True)], out


def _entry(i: int, st: dict, p: torch.Tensor, g: dict, offset: int, foreign: bool) -> dict[str, torch.Tensor]:
    """Parameter ``i``'s state: checked, and converted where a torch.optim.AdamW state allows."""
    prec = param_precision(g["precision"], p.dtype)
    sections = dict(state_sections(prec, state_dtype_for(prec, g["state_dtype"])))
    step = _as_float(st.get("step"))
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if type(step) is not int or not 0 <= step < STEP_LIMIT:
        raise CheckpointCorrupt(f"state[{i}]['step'] must be a whole number in [0, 2**24), got {st.get('step')!r:.60}")
    extra = sorted(set(st) - set(sections) - {"step"})
    missing = sorted(set(sections) - set(st) - ({"master", "compensation"} if foreign else set()))
    if extra or missing:
        raise CheckpointMismatch(f"state of parameter {i}: {sorted(st)} in the checkpoint; a {prec} parameter "
                                 f"keeps {['step', *sections]}" + (" (amsgrad state is refused)" if
                                                                    "max_exp_avg_sq" in extra else ""))
    out = {"step": torch.tensor(float(step), dtype=torch.float32)}
    for name, dtype in sections.items():
        v = st.get(name)
        want = torch.complex64 if p.is_complex() else TORCH_DTYPES[dtype]
        if v is None:  # foreign: master weights from the parameter, compensation zero
            v = p.detach().to(torch.float32) if name == "master" else torch.zeros_like(p, dtype=want)
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_meta:
            raise CheckpointCorrupt(f"state[{i}][{name!r}] is not a dense tensor with data: {type(v).__name__}")
        if v.shape != p.shape:
            raise CheckpointMismatch(f"state[{i}][{name!r}] has shape {tuple(v.shape)}, parameter {i} has {tuple(p.shape)}")
        if v.dtype != want:
            v = _convert(i, name, v, want, foreign, g["seed"], step, offset)
        out[name] = v.detach().to(device=p.device, copy=True).contiguous()
    return out


def _convert(i: int, name: str, v: torch.Tensor, want: torch.dtype, foreign: bool, seed: int, step: int,
             offset: int) -> torch.Tensor:
    if not foreign:
        raise CheckpointMismatch(f"state[{i}][{name!r}] is {v.dtype}; this optimizer keeps it as {want}")
    if want == torch.float32 and v.dtype in (torch.bfloat16, torch.float16):
        return v.to(torch.float32)  # exact
    if v.dtype == torch.float32 and want in (torch.bfloat16, torch.float16) and name in _contract.STREAMS:
        return cast(v.detach().cpu().contiguous(), want, rounding="stochastic", seed=seed, step=step,
                    offset=offset, stream=_contract.STREAMS[name])
    raise CheckpointMismatch(f"state[{i}][{name!r}] is {v.dtype}; this optimizer keeps it as {want} and does "
                             "not convert between those")
