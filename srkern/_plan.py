"""``srkern.torch.AdamW``'s step plan: the launches of one eager step, kept and re-run while
nothing they were built from has changed.

The full step (``_torch_ops.step_buckets``) checks every buffer of every parameter, builds the
tensor tables and costs ~35 us of host time a tensor. Between two steps of a training loop
almost nothing changes: the gradients are new tensors (``zero_grad`` sets them to None) but
their dtypes, shapes and usually their addresses are not, and the weights and moments are the
same buffers. A plan keeps the full step's prepared launches (``adamw.Prepared``) and, per step,
checks only what can have changed, each as one C-level pass over a list (``map``; a Python loop
costs several times more per tensor):

* the optimizer: the same ``param_groups`` (identity, length, ``params`` list, precision,
  state dtype, seed) and the same ``state`` dict;
* every parameter: the same object and dtype (the dtype picks the mode), and for those without
  a gradient the same shape (every parameter's size sets the flat offsets, and so the draws,
  of those after it);
* each parameter stepped: contiguous, the same data pointer (``.data =``), its version counter
  as the plan's own launches left it (any other in-place write, ``resize_`` or ``set_`` bumps
  it); the same state dict entries (identity); the step count, moment, master or compensation
  buffers at the same addresses, and the buffers' version counters as the launches left them;
* each gradient: present (and absent where it was absent), the same dtype, shape and device,
  contiguous, no negative or conjugate bit, aligned, and overlapping no buffer the step writes
  nor another gradient (one ``searchsorted`` over the sorted written intervals);
* the step counts: uniform within each launch and below 2**24.

Anything else falls back to the full step, which raises the full step's errors or replaces the
plan. The plan runs the same kernels with the same tables, scalars and step counts as the full
step would, so every bit is the same.

Step counts stay torch's layout (``state[p]["step"]``, FP32 0-d CPU tensors), but the plan makes
them views into one flat FP32 tensor, so that reading and advancing every count is one NumPy
operation (``torch._foreach_add_`` over 1,000 CPU scalars costs ~2 ms). A step tensor replaced
by the user is a new object: the plan sees it and the next plan adopts it.
"""
from __future__ import annotations

import operator
import struct
from itertools import chain, repeat
from typing import Any

import numpy as np
import torch

from .adamw import _FIXED_SCALARS, Prepared, _f32, _scalars, _step_scalars
from ._torch_ops import MODES, STEP_LIMIT, Bucket, group_hyper, skipped
from .precisions import PRECISIONS

_grad = operator.attrgetter("grad")
_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_version = operator.attrgetter("_version")
_ptr = torch.Tensor.data_ptr
_contiguous = torch.Tensor.is_contiguous
_neg = torch.Tensor.is_neg
_conj = torch.Tensor.is_conj
_device = torch.Tensor.get_device
_itemsize = operator.attrgetter("itemsize")
_params_of = operator.itemgetter("params")
_STATE = ("step", "exp_avg", "exp_avg_sq")


def groups_signature(opt: torch.optim.Optimizer) -> list[tuple]:
    """What of ``param_groups`` a plan depends on, besides the hyper-parameters read every step."""
    return [(id(g), id(g["params"]), len(g["params"]), g["precision"], g["state_dtype"], g["seed"])
            for g in opt.param_groups]


def _all_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(chain.from_iterable(map(_params_of, opt.param_groups)))


class StepPlan:
    """The prepared launches of a step over ``params`` (those with a gradient, in step order)."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor],
                 modes: list[int], buckets: list[Bucket]) -> None:
        self.groups = groups_signature(opt)
        self.state = opt.state
        self.all_params = _all_params(opt)  # (held: compared by identity, ~40 ns an entry)
        self.params = params
        self.idle = [p for p in self.all_params if p.grad is None]
        # Every parameter's shape and dtype set the flat offsets (and so the draws) of those
        # after it, the idle ones' included; the dtype also picks each one's mode.
        self.idle_shape = list(map(_shape, self.idle))
        self.all_dtype = list(map(_dtype, self.all_params))
        self.pptr = list(map(_ptr, params))
        self.gdtype = list(map(_dtype, grads))
        # Only a complex tensor can carry the conjugate bit (conj() of a real one is itself).
        self.any_complex = any(g.is_complex() for g in grads)
        self.shape = list(map(_shape, params))
        self.device = list(map(_device, params))
        self.gsize = np.array(list(map(_itemsize, grads)), dtype=np.uint64)
        self.nbytes = np.array([p.numel() for p in params], dtype=np.uint64) * self.gsize
        pms = [PRECISIONS[MODES[m]] for m in modes]
        self.extra_names = ["master" if pm.master else "compensation" if pm.compensation else None for pm in pms]
        self.buckets = buckets
        self.steps_flat, self.step_idx = _adopt_steps(opt, params)
        self.steps_np = self.steps_flat.numpy()
        self._capture_state()
        self.member_idx = [np.array(b.members, dtype=np.int64) for b in buckets]
        # The gradient pointers the tables hold (step order; 0 for a parameter in no launch).
        # Read from the tables, not the gradients: a strided or negated gradient was copied.
        gcol = np.zeros(len(params), dtype=np.uint64)
        for b, mi in zip(buckets, self.member_idx):
            gcol[mi] = b.prepared.table[:, Prepared.GRAD_COL]
        self.gptr = gcol.tolist()
        self.hp: tuple | None = None  # ((hyper, grad_scale), checked hyper-parameters)
        # Per group, _scalars' step-independent entries for self.hp's hyper-parameters.
        self.fixed: dict[int, dict[str, float]] = {}
        # The step counts' bytes as the last run left them: equal bytes mean one known count
        # (0.5 us, against ~6 us for NumPy's min and max).
        self.counts_bytes: bytes | None = None
        self.count = 0.0
        # Written intervals of every launch, sorted (disjoint within a launch, checked by the
        # full step; across launches a gradient overlapping one falls back, which the full
        # step decides).
        spans = sorted((int(v.ptr), int(v.ptr) + v.nbytes) for b in buckets for v in b.prepared.written
                       if v.numel > 0)
        self.w_lo = np.array([s[0] for s in spans], dtype=np.uint64)
        self.w_hi = np.array([s[1] for s in spans], dtype=np.uint64)
        self.disjoint = all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        # The parameters as the launches write them (complex ones as real views, which share
        # the counter): their versions catch resize_, set_ and in-place writes by others.
        # The state buffers' versions as well: a set_ keeps the address but may change the size.
        self.bumped = [t for b in buckets for t in b.prepared.bump]
        # Version counters as the last launch left them, and what a launch adds to each: one
        # per tensor bumped, except where parameters are views of one buffer and share a
        # counter, so the first run measures it.
        # (Lists, not arrays: compared in C at ~10 ns an entry, with no fixed cost of ~5 us.)
        self.versions = list(map(_version, self.bumped))
        self.delta: list[int] | None = None

    def _capture_state(self) -> None:
        state = self.state
        # Every entry of the state dict in order, keys and values: a per-parameter dict replaced,
        # added or removed changes one of them. (Iterating costs ~40 ns an entry; looking the
        # parameters up costs ~300, a tensor's __hash__ being a Python method.)
        self.st_keys, self.st_dicts = list(state), list(state.values())
        self.dicts = [state[p] for p in self.params]
        self.entries = {k: list(map(operator.itemgetter(k), self.dicts)) for k in _STATE}
        self.extras = [(d, k, d[k]) for d, k in zip(self.dicts, self.extra_names) if k is not None]
        # The step counts too: the plan counts in the flat tensor they must still view.
        self.bufs = (self.entries["step"] + self.entries["exp_avg"] + self.entries["exp_avg_sq"]
                     + [x for _, _, x in self.extras])
        self.buf_ptrs = list(map(_ptr, self.bufs))

    def _state_holds(self) -> bool:
        """Whether every state entry the plan uses is the object it was, its buffer at the same
        address (a ``.data =`` reassignment keeps the object and its version)."""
        state = self.state
        if (len(state) != len(self.st_keys) or not all(map(operator.is_, state.values(), self.st_dicts))
                or not all(map(operator.is_, state, self.st_keys))):
            return False
        for k, ents in self.entries.items():
            if not all(map(operator.is_, map(operator.itemgetter(k), self.dicts), ents)):
                return False
        if any(d.get(k) is not x for d, k, x in self.extras):
            return False
        return list(map(_ptr, self.bufs)) == self.buf_ptrs

    def run(self, opt: torch.optim.Optimizer, hyper: list[float], lr_tensors: list,
            grad_scale: float, found_inf: torch.Tensor | None) -> bool:
        """Run the step if nothing the plan was built from has changed; False (having checked and
        written nothing) means the caller must run the full step."""
        try:
            grads = self._grads(opt)
        except (AttributeError, RuntimeError, TypeError, KeyError):  # e.g. a None or sparse gradient
            return False
        if grads is None:
            return False
        counts = self.steps_np[self.step_idx]
        if counts.tobytes() == self.counts_bytes:
            lo = hi = self.count
        else:
            lo, hi = (float(counts.min()), float(counts.max())) if counts.size else (0.0, 0.0)
        if not (lo >= 0 and hi < STEP_LIMIT - 1):
            return False
        if lo == hi:  # one count for all (the usual case): no per-launch reductions (~6 us each)
            runs = [(b, int(lo) + 1) for b in self.buckets]
        else:
            runs = []
            for b, mi in zip(self.buckets, self.member_idx):  # one count per launch, as the full step
                c = counts[mi]
                if c[0] != c.max() or c[0] != c.min():
                    return False
                runs.append((b, int(c[0]) + 1))
        # The per-step checks and scalars of the full step, in its order (errors are its errors);
        # the checked hyper-parameters are kept while they are the same numbers (~4 us a group),
        # compared by their bits so that -0.0 is not 0.0.
        key = _pack(hyper, grad_scale)
        if self.hp is not None and key == self.hp[0] and all(map(operator.is_, lr_tensors, repeat(None))):
            hp = self.hp[1]
        else:
            hp = group_hyper(hyper, lr_tensors, grad_scale)
            self.hp = (key, hp)
            self.fixed = {}
        if skipped(found_inf):
            return True  # a skipped step: nothing written, no count advanced
        launches = []
        for b, step in runs:
            (lr, betas, eps, wd, gs), maximize = hp[b.group]
            fixed = self.fixed.get(b.group)
            sc = None if fixed is None else _step_scalars(step, lr, betas, fixed)
            if sc is None:
                try:
                    sc = _scalars(step, lr, betas, eps, wd)
                except ValueError as e:
                    raise ValueError(f"param_groups[{b.group}]: {e}") from None
                self.fixed[b.group] = {k: sc[k] for k in _FIXED_SCALARS}  # (until hp is formed again)
            launches.append((b.prepared, step, sc, _f32(-gs if maximize else gs)))
        # Checked: from here on buffers are written.
        if grads != self.gptr:
            gptr = np.array(grads, dtype=np.uint64)
            for b, mi in zip(self.buckets, self.member_idx):
                b.prepared.set_grads(gptr[mi])
            self.gptr = grads
        for prepared, step, sc, gs in launches:
            prepared.launch(step, sc, gs, 0)
        self.steps_np[self.step_idx] += 1
        if lo == hi:
            self.counts_bytes, self.count = self.steps_np[self.step_idx].tobytes(), lo + 1.0
        # As torch's in-place add would: the counts' views share the flat tensor's counter.
        torch.autograd.graph.increment_version(self.steps_flat)
        if self.delta is None:
            self.delta = list(map(operator.sub, map(_version, self.bumped), self.versions))
        self.versions = list(map(operator.add, self.versions, self.delta))
        return True

    def _grads(self, opt: torch.optim.Optimizer) -> list[int] | None:
        """The gradient pointers (step order) if the plan still holds, else None."""
        if opt.state is not self.state or groups_signature(opt) != self.groups:
            return None
        allp = _all_params(opt)
        if (len(allp) != len(self.all_params) or not all(map(operator.is_, allp, self.all_params))
                or list(map(_dtype, allp)) != self.all_dtype):
            return None
        params = self.params
        grads = list(map(_grad, params))
        if (list(map(_dtype, grads)) != self.gdtype or list(map(_shape, grads)) != self.shape
                or not all(map(_contiguous, grads)) or any(map(_neg, grads))
                or (self.any_complex and any(map(_conj, grads)))
                or not all(map(_contiguous, params))
                or list(map(_device, grads)) != self.device):
            return None
        if self.idle and (not all(map(operator.is_, map(_grad, self.idle), repeat(None)))
                          or list(map(_shape, self.idle)) != self.idle_shape):
            return None
        if list(map(_ptr, params)) != self.pptr or not self._state_holds():
            return None
        versions = list(map(_version, self.bumped))
        if versions != self.versions:
            return None
        self.versions = versions
        gl = list(map(_ptr, grads))
        if gl == self.gptr:  # the same buffers as the last run: checked then, and in the tables
            return gl
        gptr = np.array(gl, dtype=np.uint64)
        if (gptr % self.gsize).any() or not self.disjoint:
            return None
        live = self.nbytes > 0
        lo, hi = gptr[live], gptr[live] + self.nbytes[live]
        if overlaps_written(self.w_lo, self.w_hi, lo, hi).any():
            return None
        order = np.argsort(lo, kind="stable")  # nor another gradient
        if (lo[order][1:] < hi[order][:-1]).any():
            return None
        return gl


def _pack(hyper: list[float], grad_scale: float) -> bytes:
    """The bits of a step's hyper-parameters (so -0.0 is not 0.0): 1 us, against 7 for float.hex."""
    return struct.pack(f"{len(hyper) + 1}d", *hyper, grad_scale)


def overlaps_written(w_lo: np.ndarray, w_hi: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Which intervals ``[lo, hi)`` (non-empty) overlap one of the disjoint intervals
    ``[w_lo, w_hi)`` sorted by start: the written interval starting last below an interval's
    end is the only candidate (disjoint, they are sorted by end as well)."""
    j = np.searchsorted(w_lo, hi, side="left") - 1
    return (j >= 0) & (w_hi[np.maximum(j, 0)] > lo) if len(w_lo) else np.zeros(len(lo), dtype=bool)


def make_plan(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor],
              modes: list[int], buckets: list[Bucket] | None) -> StepPlan | None:
    """The plan of the eager step that just ran ``buckets`` (None: it staged a parameter or
    launched nothing), or None where its step counts are not torch's 0-d FP32 CPU tensors
    (the full step takes any 1-element FP32 tensor; a plan would change their shape)."""
    if not buckets:
        return None
    for p in params:
        s = opt.state[p]["step"]
        if s.dim() != 0 or s.device.type != "cpu" or s.is_inference():
            return None
    # Inference tensors have no version counter to check (the full step writes them).
    if any(t.is_inference() for b in buckets for t in b.prepared.bump):
        return None
    return StepPlan(opt, params, grads, modes, buckets)


def _adopt_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[torch.Tensor, slice | np.ndarray]:
    """One flat FP32 CPU tensor holding the step counts of ``params`` and each one's index in it:
    the tensor their ``state[p]["step"]`` already view when they all do (distinct elements),
    else a new one whose 0-d views replace them (same values, torch's dtype and device)."""
    steps = [opt.state[p]["step"] for p in params]
    base = steps[0]._base if steps else None
    if (base is not None and base.dim() == 1 and base.dtype == torch.float32 and base.device.type == "cpu"
            and base.is_contiguous() and all(s._base is base and s.dim() == 0 for s in steps)):
        idx = np.array([s.storage_offset() for s in steps], dtype=np.int64) - base.storage_offset()
        if len(np.unique(idx)) == len(idx):
            return base, (slice(idx[0], idx[0] + len(idx)) if np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
                          else idx)
    flat = torch.tensor([float(s) for s in steps], dtype=torch.float32)
    for p, view in zip(params, flat.unbind(0)):
        opt.state[p]["step"] = view
    return flat, slice(0, len(params))
