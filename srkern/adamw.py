"""``srkern.adamw_step``: a fused multi-tensor AdamW step in six precision modes.

One launch updates a whole list of tensors in place (``kernels/adamw.cu``); the kernel header
states the arithmetic and its order. Random bits follow contract v1 with the logical flat index
of every element (see :func:`adamw_step`), so results do not depend on how tensors are grouped
into calls, on thread count or on backend.
"""
from __future__ import annotations

import math
import struct
from typing import Any, Callable, Sequence

import numpy as np

from . import _backend, _contract, _table
from .formats import KERNEL_SUFFIX
from ._tensor import View, as_view, bump_versions, check_disjoint, stream_of
from .layout import flat_offsets
from .precisions import PRECISIONS, bytes_per_param, default_state_dtype, mode as _precision, step_bytes_per_param  # noqa: F401 (re-exported)

# ---- host-side scalars --------------------------------------------------------------------------

_F32 = struct.Struct("f")


def _f32(x: float) -> float:
    """``x`` rounded to FP32 once, as ``np.float32(x)`` does (the same C conversion), or +-inf
    where it overflows. 0.2 us, against ~1 us for ``np.float32`` inside ``np.errstate``: the
    scalars are formed every step."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # finite, beyond FP32's range
        return math.copysign(math.inf, x)


def _scalars(step: int, lr: float, betas: tuple[float, float], eps: float,
             weight_decay: float) -> dict[str, float]:
    """The FP32 kernel scalars: formed in float64 once per call, each rounded to FP32 once."""
    b1, b2 = betas
    bc1 = 1.0 - b1 ** step
    bc2 = 1.0 - b2 ** step
    f = _f32
    sc = {"b1": f(b1), "omb1": f(1.0 - b1), "b2": f(b2), "omb2": f(1.0 - b2),
          "step_size": f(lr / bc1), "inv_sqrt_bc2": f(1.0 / math.sqrt(bc2)), "eps": f(eps),
          "decay": f(1.0 - lr * weight_decay), "lrwd": f(lr * weight_decay)}
    return _checked_scalars(sc, f"lr={lr!r}, weight_decay={weight_decay!r} at step {step}")


def _checked_scalars(sc: dict[str, float], context: str) -> dict[str, float]:
    """``sc`` (kernel scalars already rounded to FP32), or a ``ValueError`` saying which of them
    ``context`` (the hyper-parameters that formed them) makes overflow FP32 or fall below its
    smallest normal number. Every optimizer's host scalars go through it."""
    bad = [k for k, v in sc.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{context} give kernel scalars {bad} that overflow FP32")
    tiny = [k for k, v in sc.items() if v != 0.0 and abs(v) < _contract.FP32_MIN_NORMAL]
    if tiny:
        raise ValueError(f"{context} give kernel scalars {tiny} below FP32's smallest normal number (2**-126)")
    return sc


# The entries of _scalars that do not depend on the step.
_FIXED_SCALARS = ("b1", "omb1", "b2", "omb2", "eps", "decay", "lrwd")


def _step_scalars(step: int, lr: float, betas: tuple[float, float], fixed: dict[str, float]) -> dict[str, float] | None:
    """``_scalars(step, lr, betas, eps, weight_decay)`` from ``fixed``, the step-independent
    entries an earlier call returned for the same lr, betas, eps and weight_decay: only the
    two bias-corrected entries are formed (the same expressions), ~1.5 us against ~4 for the
    whole set (the step plan runs this every step). None where either fails _scalars' checks:
    the caller then calls _scalars for its error."""
    b1, b2 = betas
    try:
        ss, ib = _f32(lr / (1.0 - b1 ** step)), _f32(1.0 / math.sqrt(1.0 - b2 ** step))
    except (ArithmeticError, ValueError):
        return None
    for v in (ss, ib):
        if not math.isfinite(v) or (v != 0.0 and abs(v) < _contract.FP32_MIN_NORMAL):
            return None
    return {**fixed, "step_size": ss, "inv_sqrt_bc2": ib}


def check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any,
                          grad_scale: Any = 1.0) -> tuple[float, tuple[float, float], float, float, float]:
    """Validate AdamW hyper-parameters (the one check used by every optimizer front end).

    lr >= 0, 0 <= beta < 1, eps > 0, weight_decay >= 0, grad_scale any real; all finite in FP32.
    Returns them as floats; raises ``ValueError``/``TypeError`` naming the bad argument.
    """
    lr = _contract.check_f32("lr", lr, 0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = _contract.check_f32("betas[0]", betas[0], 0.0, hi=1.0)
    b2 = _contract.check_f32("betas[1]", betas[1], 0.0, hi=1.0)
    eps = _contract.check_f32("eps", eps, 0.0, lo_open=True)
    weight_decay = _contract.check_f32("weight_decay", weight_decay, 0.0)
    grad_scale = _contract.check_f32("grad_scale", grad_scale, -math.inf)
    return lr, (b1, b2), eps, weight_decay, grad_scale



# ---- public functions ---------------------------------------------------------------------------


def adamw_step(params: Sequence[Any], grads: Sequence[Any], exp_avgs: Sequence[Any],
               exp_avg_sqs: Sequence[Any], *, step: int, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, precision: str = "bf16-sr",
               master_params: Sequence[Any] | None = None,
               compensation: Sequence[Any] | None = None, grad_scale: float = 1.0,
               found_inf: Any = None, seed: int, offsets: Sequence[int] | None = None) -> None:
    """One AdamW step (decoupled weight decay, bias correction) on lists of tensors, in place.

    All tensors are ``__dlpack__`` tensors (PyTorch, CuPy, JAX is refused: immutable) or NumPy
    arrays, contiguous, on one device (CPU or one CUDA device); list ``i`` entries share a shape.
    They are used in place, so memory that does not hold the values as its dtype says (NumPy's
    non-native byte order or packed-field strides, torch's negative bit) is refused. Written
    torch tensors must not require grad while grad mode is on (step under ``torch.no_grad()``,
    as ``srkern.torch.AdamW`` does); their version counters are bumped after the launch, so a
    backward through a graph that saved an old weight raises, as after torch's in-place ops.

    Args:
        params: weights, updated in place. BF16 (FP32 for ``precision="fp32"``, FP16 for
            ``"fp16-sr"``). In
            ``fp32-master`` they are the BF16 model copy: written (round-to-nearest from the
            master), never read.
        grads: gradients, BF16 or FP32 (one dtype per call; ``fp16-sr`` also FP16: the
            mode's ``grad_dtypes``). ``None`` entries are an error:
            pass only parameters that have gradients (``srkern.torch.AdamW`` skips the others).
        exp_avgs, exp_avg_sqs: first and second moments, in place; BF16 or FP32 in the BF16
            modes (one dtype for both lists), FP32 in ``fp32-master`` and ``fp32``, FP32
            (default) or BF16 in ``fp16-sr``. Start at 0.
        step: optimizer step, from 1 (bias corrections use it; it is also contract v1's ``step``).
        lr, betas, eps, weight_decay: AdamW hyper-parameters; lr >= 0, 0 <= beta < 1, eps > 0,
            weight_decay >= 0. May change every call (they are kernel arguments).
        precision: one of :data:`PRECISIONS` (``bf16-sr``, ``bf16-nearest``, ``bf16-kahan``,
            ``fp32-master``, ``fp32``, ``fp16-sr``).
        master_params: FP32 master weights, required in ``fp32-master`` (else must be None).
        compensation: BF16 Kahan buffers, required in ``bf16-kahan`` (start at 0).
        grad_scale: every gradient is multiplied by it (FP32) inside the kernel: loss-scale
            unscaling and clipping, bit-identical to passing pre-multiplied FP32 gradients.
        found_inf: optional 1-element float32 tensor on the same device; if it is non-zero
            when the kernel runs, nothing is written (read on the device: no host sync).
        seed: 64-bit Philox key shared by every replica.
        offsets: logical flat index of each tensor's first element. Default: the cumulative
            sizes of ``params`` in order (no padding). A sharded optimizer passes its shard's
            global offsets; ranges must not overlap.

    Random bits (contract v1): element ``j`` of tensor ``t`` has index ``i = offsets[t] + j``; its
    draw for stream S is the 16-bit draw of ``(seed, step, S, i)`` with S = ``param``,
    ``exp_avg``, ``exp_avg_sq`` or ``compensation`` (:data:`srkern.STREAMS`). The FP16 weight of
    ``fp16-sr`` takes the 32-bit draw of ``(seed, step, param, i)`` instead (word ``i % 4`` of
    Philox block ``i // 4``) and rounds exactly as ``srkern.cast(x, "float16",
    rounding="stochastic", seed=seed, step=step, offset=i, stream=param_fp16)`` would. The result is
    therefore bit-identical however tensors are split into calls, on CPU or GPU.

    The arithmetic, in FP32 and in this order (``kernels/adamw.cu``; scalars formed in float64 on
    the host and rounded to FP32 once): ``g = grad * grad_scale``; ``m = b1*m + (1-b1)*g``;
    ``v = b2*v + (1-b2)*(g*g)``; ``d = sqrt(v) * (1/sqrt(1-b2^step)) + eps``;
    ``u = ((lr/(1-b1^step)) * m) / d``; ``p = p*(1 - lr*wd) - u``. The update uses the FP32
    moments; the stored moments are their rounding.

    Every argument is checked before anything is written: a bad call raises ``ValueError`` or
    ``TypeError`` naming the argument and changes no buffer.
    """
    launch = _plan_step(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, betas=betas, eps=eps,
                        weight_decay=weight_decay, precision=precision, master_params=master_params,
                        compensation=compensation, grad_scale=grad_scale, found_inf=found_inf,
                        seed=seed, offsets=offsets)
    if launch is not None:
        launch()


def _plan_step(*args: Any, **kw: Any) -> Callable[[], None] | None:
    """:func:`adamw_step`'s checks, all of them: returns the launch to run (None when there is
    nothing to update) or raises having written nothing."""
    prepared, step, sc, gs, fi_ptr = _prepare_step(*args, **kw)
    if prepared is None:
        return None
    return lambda: prepared.launch(step, sc, gs, fi_ptr)


def _prepare_step(params: Sequence[Any], grads: Sequence[Any], exp_avgs: Sequence[Any],
               exp_avg_sqs: Sequence[Any], *, step: int, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, precision: str = "bf16-sr",
               master_params: Sequence[Any] | None = None,
               compensation: Sequence[Any] | None = None, grad_scale: float = 1.0,
               found_inf: Any = None, seed: int,
               offsets: Sequence[int] | None = None) -> tuple[Prepared | None, int, dict[str, float], float, int]:
    """:func:`adamw_step`'s checks, all of them, or a raise having written nothing: returns the
    prepared launch (None when there is nothing to update) and its run's step, FP32 scalars,
    FP32 grad_scale and found_inf pointer. ``srkern.torch.AdamW`` prepares every bucket before
    launching any, so that a bad call changes no buffer."""
    prec = _precision(precision)
    seed = _contract.check_u64("seed", seed)
    step = _contract.check_u64("step", step, _contract.U32)
    if step < 1:
        raise ValueError("step must be >= 1 (the first AdamW step is step 1)")
    lr, (b1, b2), eps, weight_decay, grad_scale = check_hyperparameters(lr, betas, eps, weight_decay, grad_scale)

    pv, gv, (mv, vv), wv, cv, fi = checked_buffers(
        prec, params, grads, (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)), master_params,
        compensation, found_inf, "adamw_step", "an AdamW step")
    if not pv:
        return None, step, {}, 0.0, 0
    offs = flat_offsets([p.numel for p in pv], offsets)
    sc = _scalars(step, lr, (b1, b2), eps, weight_decay)
    prepared = Prepared.build(prec.kernel, pv, gv, mv, vv, wv, cv, offs, seed)
    return prepared, step, sc, _f32(grad_scale), fi.ptr if fi else 0


def checked_buffers(prec: Any, params: Sequence[Any], grads: Sequence[Any],
                    states: Sequence[tuple[str, Any]], master_params: Sequence[Any] | None,
                    compensation: Sequence[Any] | None, found_inf: Any, fname: str,
                    what: str) -> tuple[list[View], list[View], list[list[View]], list[View], list[View], View | None]:
    """The buffer checks every fused optimizer makes (``adamw_step``, ``sgd_step``,
    ``lion_step``), in this order, before anything is written: each list is a list of tensors
    of ``params``' length (``states``: (name, list) pairs, the optimizer's state buffers, all of
    one dtype the precision ``prec`` allows); master weights and compensation present exactly
    where the mode has them; dtypes, shapes, one device, contiguity, writability; ``found_inf``
    a 1-element FP32 tensor on that device; no two buffers overlapping. ``fname`` names the
    function in errors, ``what`` the step ("an AdamW step"). Returns the views (params, grads,
    one list per state, master weights, compensation, found_inf or None); empty lists and None
    when there are no tensors (nothing else is checked then)."""
    precision = prec.name
    pv = _table.views("params", params, None)
    n = len(pv)
    gv = _table.views("grads", grads, n)
    svs = [_table.views(name, xs, n) for name, xs in states]
    if prec.master and master_params is None:
        raise ValueError("precision 'fp32-master' needs master_params (FP32 copies of params)")
    if not prec.master and master_params is not None:
        raise ValueError(f"master_params is only used by 'fp32-master', not {precision!r}")
    if prec.compensation and compensation is None:
        raise ValueError("precision 'bf16-kahan' needs compensation (BF16 buffers, zeros at start)")
    if not prec.compensation and compensation is not None:
        raise ValueError(f"compensation is only used by 'bf16-kahan', not {precision!r}")
    wv = _table.views("master_params", master_params, n) if prec.master else []
    cv = _table.views("compensation", compensation, n) if prec.compensation else []
    if n == 0:
        return [], [], [[] for _ in states], [], [], None

    if any(p.framework == "jax" for p in pv):
        raise TypeError(f"params: JAX arrays are immutable; {fname} works in place")
    _table.check_list("params", pv, pv, (prec.param_dtype,), True)
    _table.check_list("grads", gv, pv, prec.grad_dtypes, False)
    for (name, _), sv in zip(states, svs):
        _table.check_list(name, sv, pv, prec.state_dtypes, True)
    for (name, _), sv in zip(states[1:], svs[1:]):
        if sv[0].dtype != svs[0][0].dtype:
            raise TypeError(f"{states[0][0]} are {svs[0][0].dtype} but {name} are {sv[0].dtype}: use one dtype")
    if wv:
        _table.check_list("master_params", wv, pv, ("float32",), True)
    if cv:
        _table.check_list("compensation", cv, pv, ("bfloat16",), True)
    fi = None
    if found_inf is not None:
        fi = as_view(found_inf, "found_inf")
        if fi.dtype != "float32" or fi.numel != 1:
            raise TypeError(f"found_inf must be a 1-element float32 tensor, got {fi.dtype} {fi.shape}")
        if fi.needs_copy:
            raise ValueError(f"found_inf cannot be read in place: it {fi.needs_copy}")
        if (fi.device, fi.device_id) != (pv[0].device, pv[0].device_id):
            raise ValueError(f"found_inf is on {fi.device}:{fi.device_id}, params on "
                             f"{pv[0].device}:{pv[0].device_id}")
    lists = [("params", pv), ("grads", gv)] + [(name, sv) for (name, _), sv in zip(states, svs)] + \
            [("master_params", wv), ("compensation", cv)]
    named = [(f"{name}[{i}]", v) for name, vs in lists for i, v in enumerate(vs)]
    if fi is not None:
        named.append(("found_inf", fi))
    check_disjoint(named, f"every buffer of {what} must be distinct")
    return pv, gv, svs, wv, cv, fi


def pair_table(pv: list[View], cols: list[list[int]], offs: list[int]) -> tuple[np.ndarray, int]:
    """The tensor table of a fused optimizer step over checked views ``pv`` (``cols``: the six
    pointer columns of kernels/srk_table.h, 0 where unused) and its number of work units:
    (tensor, Philox block) pairs; a tensor at offset o with n elements covers blocks
    o // 8 .. (o + n - 1) // 8."""
    blocks = [0 if p.numel == 0 else (o + p.numel - 1) // 8 - o // 8 + 1 for p, o in zip(pv, offs, strict=True)]
    return _table.table(pv, cols, offs, blocks)


class Prepared:
    """One checked AdamW launch with its tensor table, whose step, scalars and gradient pointers
    may change between runs: :func:`_plan_step` makes one per call; ``srkern.torch.AdamW`` keeps
    them across steps (``srkern/_plan.py``), rewriting only the gradient column of ``table``
    after checking the new gradients itself."""
    GRAD_COL = 1  # the table column of the gradient pointers (kernels/srk_table.h)

    def __init__(self, kernel: str, table: np.ndarray, npairs: int, seed: int, device: View,
                 written: list[View], family: str = "adamw") -> None:
        self.kernel, self.table, self.npairs, self.seed, self.device = kernel, table, npairs, seed, device
        self.family = family  # the kernel file: kernels/<family>.cu (sgd.py and lion.py reuse this class)
        self.n = len(table)
        self.written = written
        # The torch tensors to bump after each launch, gathered once (a list of 3,000 views
        # filtered per step costs ~0.1 us a tensor).
        self.bump = [v.obj for v in written if v.framework == "torch"]
        self._dev: tuple[Any, ...] | None = None  # (stream, keep-alive, pointer) of the GPU copy
        self._cpu_ptr: int | None = None

    @classmethod
    def build(cls, kernel: str, pv: list[View], gv: list[View], mv: list[View], vv: list[View],
              wv: list[View], cv: list[View], offs: list[int], seed: int) -> "Prepared | None":
        """From checked views (see :func:`_plan_step`); None when no element is to be updated."""
        n = len(pv)
        zero = [0] * n
        cols = [[p.ptr for p in pv], [g.ptr for g in gv], [m.ptr for m in mv], [v.ptr for v in vv],
                [w.ptr for w in wv] if wv else zero, [c.ptr for c in cv] if cv else zero]
        table, npairs = pair_table(pv, cols, offs)
        if npairs == 0:
            return None
        name = f"adamw_{kernel}_g{KERNEL_SUFFIX[gv[0].dtype]}_s{KERNEL_SUFFIX[mv[0].dtype]}"
        return cls(name, table, npairs, seed, pv[0], pv + mv + vv + wv + cv)

    def set_grads(self, ptrs: np.ndarray) -> None:
        """New gradient pointers, one per row (the caller has checked the gradients)."""
        self.table[:, self.GRAD_COL] = ptrs
        self._dev = None

    def _device_table(self, stream: int) -> tuple[Any, int]:
        if self.device.device == "cpu":  # (set_grads writes the table in place: one address)
            if self._cpu_ptr is None:
                self._cpu_ptr = self.table.ctypes.data  # ~1.5 us a read
            return self.table, self._cpu_ptr
        # On a GPU the table is copied to the device (from pageable memory: on CuPy's default
        # stream a synchronising copy); a run with the same table on the same stream (the same
        # gradient buffers, as the caching allocator usually hands out) reuses that copy, which
        # no kernel writes.
        if self._dev is None or self._dev[0] != stream:
            self._dev = (stream, *_table.device_table(self.table, self.device, stream))
        return self._dev[1], self._dev[2]

    def launch(self, step: int, sc: dict[str, float], grad_scale: float, found_inf_ptr: int) -> None:
        """Run the AdamW update (checked: from here on buffers are written); ``grad_scale`` is FP32.
        Written out rather than through :meth:`run`: the step plan calls it every step, and the
        one list built here is all it costs."""
        stream = stream_of(self.device)
        _, tptr = self._device_table(stream)
        _backend.launch("adamw", self.kernel, [
            ("p", tptr), ("q", self.n), ("q", self.npairs), ("Q", self.seed), ("Q", step),
            ("f", sc["b1"]), ("f", sc["omb1"]), ("f", sc["b2"]), ("f", sc["omb2"]),
            ("f", sc["step_size"]), ("f", sc["inv_sqrt_bc2"]), ("f", sc["eps"]), ("f", sc["decay"]),
            ("f", sc["lrwd"]), ("f", grad_scale), ("p", found_inf_ptr)],
            device=self.device.device, device_id=self.device.device_id, units=self.npairs, stream=stream,
            exact=True)  # sc and grad_scale are FP32 values; the integers were checked at build
        # autograd's version counters (even if found_inf skipped the write)
        bump_versions(self.bump)

    def run(self, step: int, args: list[tuple[str, Any]]) -> None:
        """Launch ``self.kernel`` with (table, ntensors, npairs, seed, step) and then ``args``, the
        family's own arguments (``_backend.launch``'s codes): every ``f`` value already FP32, every
        integer checked. Then bump the written torch tensors' versions."""
        stream = stream_of(self.device)
        _, tptr = self._device_table(stream)
        _backend.launch(self.family, self.kernel, [
            ("p", tptr), ("q", self.n), ("q", self.npairs), ("Q", self.seed), ("Q", step), *args],
            device=self.device.device, device_id=self.device.device_id, units=self.npairs, stream=stream,
            exact=True)  # the f values are FP32 values; the integers were checked at build
        # autograd's version counters (even if found_inf skipped the write)
        bump_versions(self.bump)
