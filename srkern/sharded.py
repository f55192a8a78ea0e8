"""ZeRO-style sharded srkern optimizers on one flat parameter vector, for any framework (NumPy,
PyTorch, CuPy buffers): ``ShardedAdamWCore``, ``ShardedSGDCore`` and ``ShardedLionCore``, one
class body (``_ShardedCore``: the exchanges, the shard's state, checkpoints) with a small rule per
optimizer (its state, its hyper-parameters, the call of its functional step on a shard slice).
``srkern.torch.ShardedAdamW``, ``ShardedSGD`` and ``ShardedLion`` are the PyTorch optimizers built
on them; checkpoints are ``srkern.checkpoint``'s sharded folders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import _contract
from ._collective import COLLECTIVE_STREAM, OPS, WIRE_DTYPES, all_gather_views, reduce_scatter_views
from ._tensor import (View, as_view, empty_like, host_bytes, mark_written, stream_of, unwritable,
                      write_host_bytes)
from .adamw import adamw_step
from .cast import cast
from .checkpoint import OPTIMIZER_HYPER_KEYS, check_hyper, load_sharded, save_sharded, state_sections
from .comm import Communicator, as_communicator
from .layout import shard_range
from .lion import lion_step
from .precisions import bytes_per_param, default_state_dtype, mode, param_dtype
from .sgd import check_precision, sgd_step


def _zeros(like: View, dtype: str, n: int) -> Any:
    z = empty_like(like, dtype, (n,))
    if like.framework == "torch":
        z.zero_()
    elif like.device == "cuda":
        z.fill(0)
    else:
        z[...] = 0
    return z


def hyper_codes(i: int, h: dict, optimizer: str = "adamw") -> dict[str, Any]:
    """Group ``i``'s checked hyper-parameters (of ``optimizer``, see
    ``srkern.checkpoint.OPTIMIZER_HYPER_KEYS``) as named codes for ``Communicator.check_args``:
    the float64 values the FP32 kernel scalars are formed from (``lr / (1 - beta1**t)`` is
    formed in float64, so values equal in FP32 can still give different kernel scalars); the
    flags (``nesterov``, ``maximize``) as bools."""
    def code(k: str, v: Any) -> Any:
        return tuple(map(float, v)) if k == "betas" else v if isinstance(v, bool) else float(v)
    return {f"group {i} {k}": code(k, h[k]) for k in OPTIMIZER_HYPER_KEYS[optimizer]}


@dataclass
class GroupRange:
    """A parameter group's slice [start, stop) of the flat vector."""
    start: int
    stop: int


class _ShardedCore:
    """The one body of the sharded cores (the contract is :class:`ShardedAdamWCore`'s): the
    construction and its checks, the reduce-scatter, the shard's state, the all-gather and the
    checkpoints. A subclass is one optimizer's rule: ``optimizer`` (the checkpoint's name, the key
    of its hyper-parameters in ``srkern.checkpoint.OPTIMIZER_HYPER_KEYS``), ``states`` (its
    per-element state, in ``state_dtype``, checkpoint order), :meth:`_check_precision`,
    :meth:`_settings`, :meth:`_check_group` and :meth:`_update` (its functional step on a shard slice)."""

    optimizer: str  # "adamw", "sgd", "lion"
    states: tuple[str, ...] = ()

    # -- the rule: what each optimizer (subclass) brings; the defaults serve where they fit
    def _check_precision(self, precision: str) -> None:
        mode(precision)  # every mode of srkern.precisions (AdamW's)

    def _settings(self) -> dict[str, Any]:
        """The rule's own construction settings, checked (run inside the construction's collective
        check), as named codes compared across ranks."""
        return {}

    def _check_group(self, i: int, h: dict, grad_scale: float) -> dict[str, Any]:
        """Group ``i``'s hyper-parameters ``h`` checked for a step (on every rank, before any
        exchange); their codes compared across ranks."""
        check_hyper(h, grad_scale, self.optimizer)
        return hyper_codes(i, h, self.optimizer)

    def _update(self, p: Any, g: Any, sl: slice, h: dict, t: int, kw: dict) -> None:
        """The functional step on weights ``p`` (flat ``[a, b)``), reduced gradients ``g`` and the
        state slice ``sl``; ``kw``: precision, master_params, compensation, grad_scale, seed, offsets."""
        raise NotImplementedError

    def __init__(self, flat_params: Any, comm: Communicator | Any, *, precision: str = "bf16-sr",
                 groups: Sequence[tuple[int, int]] | None = None, state_dtype: str | None = None,
                 seed: int | None = None, grad_dtype: str | None = None, reduce_dtype: str | None = None,
                 wire_dtype: str | None = None, op: str = "avg") -> None:
        comm = as_communicator(comm)

        def check():
            self._check_precision(precision)
            if op not in OPS:
                raise ValueError(f"op must be one of {OPS}, got {op!r}")
            pv = as_view(flat_params.detach() if hasattr(flat_params, "detach") else flat_params, "flat_params")
            if pv.dtype != param_dtype(precision) or len(pv.shape) != 1 or not pv.contiguous:
                raise ValueError(f"flat_params must be a contiguous 1-D {param_dtype(precision)} tensor "
                                 f"for precision {precision!r}, got {pv.dtype} of shape {pv.shape}")
            why = unwritable(pv)  # checked here, on every rank: not by adamw_step, after an exchange
            if why:
                raise ValueError(f"flat_params {why}")
            sd = state_dtype or default_state_dtype(precision)
            bytes_per_param(precision, sd)  # raises if the mode does not allow state_dtype
            gd = grad_dtype or pv.dtype
            # Reduced to BF16 (SR) where the weights are BF16, else unrounded FP32 (fp32; fp16-sr,
            # whose FP16 gradients BF16 would round further and no reduce kernel writes as FP16).
            rd = reduce_dtype or ("bfloat16" if pv.dtype == "bfloat16" else "float32")
            grads_ok = WIRE_DTYPES + (("float16",) if "float16" in mode(precision).grad_dtypes else ())
            if gd not in grads_ok or rd not in WIRE_DTYPES:
                raise ValueError("grad_dtype and reduce_dtype must be 'bfloat16' or 'float32' "
                                 "(grad_dtype also 'float16' in the modes with FP16 gradients, "
                                 f"fp16-sr), got {gd!r} and {rd!r} for precision {precision!r}")
            # The wire: the gradients' dtype, or BF16 (SR). FP16 gradients go as their exact FP32
            # upcast (the default) or BF16: the reduce kernel reads FP32 or BF16 chunks only.
            wires = (gd, "bfloat16") if gd in WIRE_DTYPES else ("float32", "bfloat16")
            if wire_dtype is not None and wire_dtype not in wires:
                allowed = "None or 'bfloat16'" if gd in WIRE_DTYPES else \
                    "None, 'float32' or 'bfloat16' for float16 gradients"
                raise ValueError(f"wire_dtype must be {allowed}, got {wire_dtype!r}")
            wd = wire_dtype or wires[0]
            n = pv.numel
            gs = [(0, n)] if groups is None else [(int(a), int(b)) for a, b in groups]
            if gs and (gs[0][0] != 0 or gs[-1][1] != n or any(a > b for a, b in gs)
                       or any(gs[i][1] != gs[i + 1][0] for i in range(len(gs) - 1))):
                raise ValueError(f"groups must be consecutive flat slices covering [0, {n}), got {gs}")
            # Checked here, on every rank: rank 0 alone draws or uses it, after this check.
            sv = None if seed is None else _contract.check_u64("seed", seed)
            codes = {"optimizer": self.optimizer, **self._settings(), "size": n, "precision": str(precision),
                     "groups": len(gs),
                     **{f"group {i} range": g for i, g in enumerate(gs)}, "op": str(op),
                     "state_dtype": str(sd), "grad_dtype": str(gd), "reduce_dtype": str(rd),
                     "wire_dtype": str(wd), "device": pv.device, "seed": sv}
            return (pv, sd, gd, rd, wd, gs, sv), codes

        pv, state_dtype, grad_dtype, reduce_dtype, wire_dtype, groups, seed = comm.check_args(
            check, f"{type(self).__name__.removesuffix('Core')} built with different sizes or settings on "
                   "different ranks")
        self.comm, self.precision, self.op = comm, precision, op
        self.n = pv.numel
        self.state_dtype, self.grad_dtype, self.reduce_dtype = state_dtype, grad_dtype, reduce_dtype
        self.wire_dtype = wire_dtype
        self.groups = [GroupRange(a, b) for a, b in groups]
        seed = _contract.resolve_seed(seed) if comm.rank == 0 else 0
        self.seed = comm.bcast_int(seed)
        self.step_count = 0
        self.flat_params = pv.obj  # for torch the detached tensor: the same memory and version counter
        self.start, self.stop = shard_range(self.n, comm.size, comm.rank)
        m = self.stop - self.start
        self._flat_grads = _zeros(pv, grad_dtype, self.n)
        self.grad_shard = _zeros(pv, reduce_dtype, m)
        self.master = self.compensation = None
        for name, dtype in state_sections(precision, state_dtype, self.states):  # states[, master][, compensation]
            setattr(self, name, _zeros(pv, dtype, m))
        # One set of weights for all: rank 0's.
        self._bcast_params()
        if self.master is not None and m:  # FP32 master weights start as the exact upcast of the model
            cast(self.param_shard, "float32", out=self.master)

    # -- views
    @property
    def flat_grads(self) -> Any:
        """The gradient vector :meth:`step` reduces (``grad_dtype``, ``n`` elements): write into
        it, ``core.flat_grads[...] = g``; it cannot be replaced (read-only attribute)."""
        return self._flat_grads

    @flat_grads.setter
    def flat_grads(self, value: Any) -> None:
        # A replacement of another length or layout ran the reduce-scatter past the heap.
        raise AttributeError(f"{type(self).__name__}.flat_grads cannot be replaced: write into it "
                             "(core.flat_grads[...] = g)")

    @property
    def param_shard(self) -> Any:
        return self.flat_params[self.start:self.stop]

    def _bcast_params(self) -> None:
        v = as_view(self.flat_params, "flat_params")
        if v.device == "cuda" and self.comm.cuda == "nccl":
            data = host_bytes(self.flat_params)  # once, at construction or load: not a hot path
            data = self.comm.mpi.bcast(data, root=0)
            write_host_bytes(self.flat_params, data)
            return
        self.comm.bcast_view(v, stream_of(v))

    def _gather_params(self) -> None:
        all_gather_views(as_view(self.param_shard, "param_shard"), as_view(self.flat_params, "flat_params"),
                         self.comm)

    def state_sections(self) -> list[tuple[str, Any]]:
        """(name, shard tensor) of everything this rank owns, in checkpoint order."""
        return [("param", self.param_shard)] + [
            (name, getattr(self, name)) for name, _ in state_sections(self.precision, self.state_dtype, self.states)]

    def optimizer_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state on this rank (``states``, master, compensation, reduced-gradient shard)."""
        sizes = {name: as_view(t, name).nbytes for name, t in self.state_sections() if name != "param"}
        sizes["grad_shard"] = as_view(self.grad_shard, "grad_shard").nbytes
        return sizes

    # -- the step
    def step(self, hypers: Sequence[dict], *, grad_scale: float = 1.0,
             prepare: Callable[[], None] | None = None) -> None:
        """One optimizer step: reduce-scatter ``flat_grads``, the optimizer on the shard, all-gather
        the weights.

        ``hypers[i]`` holds group i's hyper-parameters, the keys of
        ``srkern.checkpoint.OPTIMIZER_HYPER_KEYS[optimizer]`` (AdamW: ``lr``, ``betas``, ``eps``,
        ``weight_decay``; extra keys are ignored). Collective:
        every rank must pass the same hyper-parameters and ``grad_scale`` (checked). ``prepare``,
        if given, runs first inside the step's argument check (a front end fills ``flat_grads``
        there): a ``ValueError`` or ``TypeError`` it raises on any rank raises on every rank.
        """
        # On every rank, before any exchange, in one allreduce: a rank with an empty shard never
        # calls the step, so it would not notice bad values and would wait for the others
        # forever; and ranks stepping with different values would each update their shard their
        # own way.
        def check():
            if prepare is not None:
                prepare()
            if len(hypers) != len(self.groups):
                raise ValueError(f"hypers: expected {len(self.groups)} groups, got {len(hypers)}")
            codes: dict[str, Any] = {"step": self.step_count, "groups": len(hypers)}
            for i, h in enumerate(hypers):
                codes.update(self._check_group(i, h, grad_scale))
            codes["grad_scale"] = float(grad_scale)
            self._check_writable()
            return (self._checked("flat_grads", self._flat_grads, self.grad_dtype),
                    self._checked("flat_params", self.flat_params, param_dtype(self.precision))), codes

        gv, pv = self.comm.check_args(check, f"{type(self).__name__}.step called with different settings "
                                             "on different ranks")
        t = self.step_count + 1
        reduce_scatter_views(gv, as_view(self.grad_shard, "grad_shard"),
                             self.comm, op=self.op, rounding="stochastic", seed=self.seed, step=t,
                             stream=COLLECTIVE_STREAM, wire=self.wire_dtype)
        s = self.start
        for g, h in zip(self.groups, hypers, strict=True):
            a, b = max(g.start, s), min(g.stop, self.stop)
            if a >= b:
                continue
            sl = slice(a - s, b - s)
            kw = dict(precision=self.precision, master_params=None if self.master is None else [self.master[sl]],
                      compensation=None if self.compensation is None else [self.compensation[sl]],
                      grad_scale=grad_scale, seed=self.seed, offsets=[a])  # global offsets: the same bits
            self._update(self.flat_params[a:b], self.grad_shard[sl], sl, h, t, kw)
        all_gather_views(as_view(self.param_shard, "param_shard"), pv, self.comm)
        mark_written([pv])  # every rank's copy of the weights changed, shard or not
        self.step_count = t

    def _check_writable(self) -> None:
        """Every buffer a step or a load writes, checked on every rank before any exchange: a rank
        whose shard is empty writes nothing locally, so a refusal inside the step on the
        others would leave it waiting in the all-gather."""
        for name, t in self.state_sections():
            why = unwritable(as_view(t, name))
            if why:
                raise ValueError(f"{name} {why}")

    def _checked(self, name: str, t: Any, dtype: str) -> View:
        """The view of buffer ``t`` if it is still what the construction made: a tensor resized
        or restrided in place (``torch.Tensor.resize_``) would send the exchanges past its end."""
        v = as_view(t, name)
        if v.dtype != dtype or v.shape != (self.n,) or not v.contiguous:
            raise ValueError(f"{name} must stay a contiguous 1-D {dtype} tensor of {self.n} elements, now "
                             f"{v.dtype} of shape {v.shape}: write into it ({name}[...] = values), do not "
                             "resize or replace it")
        return v

    # -- checkpoints
    def save(self, path: str | os.PathLike, layout: Any = None, extra: dict | None = None) -> None:
        """Write the sharded state to folder ``path`` (collective; format in ``srkern.checkpoint``).

        One raw ``.bin`` per rank (sections ``param``, ``states``[, ``master``][, ``compensation``]
        of its shard) and ``manifest.json`` (optimizer, world size, step, seed, precision, dtypes, ``layout``,
        ``extra``, per shard its range, size and SHA-256, and its own checksum). Each save is a new
        generation that replaces the folder's checkpoint in one rename of the manifest, so a crash
        leaves the old checkpoint or the new one. Every rank must see the same folder (a shared
        file system): that is checked first, and :class:`srkern.checkpoint.CheckpointError` raised
        on every rank, before anything is written.
        """
        save_sharded(self, path, layout, extra)

    def load(self, path: str | os.PathLike, layout: Any = None) -> dict:
        """Load a checkpoint written by :meth:`save` on any world size (collective); re-shards.

        Everything is checked first on every rank (the manifest's checksum and every field,
        against this model and optimizer too; type, size and SHA-256 of every shard file); on any
        problem every rank raises :class:`srkern.checkpoint.CheckpointError` (its subclass names
        the cause) and no buffer is changed. Returns the manifest.
        """
        self.comm.check_args(lambda: (self._check_writable(), None))
        man = load_sharded(self, path, layout)
        self._gather_params()
        mark_written([as_view(self.flat_params, "flat_params")])
        self.step_count, self.seed = man["step"], man["seed"]  # checked ints: nothing to convert
        return man


class ShardedAdamWCore(_ShardedCore):
    """ZeRO-style sharded srkern AdamW on one flat parameter vector, for any framework.

    Every rank holds the whole flat parameter vector ``flat_params`` (and a gradient vector
    ``flat_grads`` of the same length that the caller fills before :meth:`step`). Rank ``r``
    owns ``[start, stop) = shard_range(n, world, r)``: only there does it keep the moments (and
    FP32 master weights in ``"fp32-master"``, the BF16 compensation in ``"bf16-kahan"``).

    :meth:`step` is: reduce-scatter of ``flat_grads`` (``op``, FP32 sum in rank order, rounded
    to ``reduce_dtype`` with SR by contract v1, stream ``collective``), then
    ``srkern.adamw_step`` on the owned shard with ``offsets`` = the shard's global flat offsets
    (so every random bit equals the single-process run's), then an all-gather of the weights
    in place. Hence, for the same reduced gradient, the weights are bit-identical for every
    world size and to ``srkern.torch.AdamW`` in one process.

    Args:
        flat_params: contiguous 1-D tensor (NumPy, PyTorch, CuPy), dtype ``param_dtype(precision)``,
            the same on every rank (rank 0's values are broadcast at construction); written in
            place, as an optimizer writes its parameters (a torch tensor is used detached, so
            one that requires grad is updated as under ``torch.no_grad()``, and its version
            counter is bumped).
        comm: :class:`srkern.comm.Communicator` (an mpi4py communicator is wrapped in one).
        precision: one of ``srkern.precisions.PRECISIONS`` (see ``srkern.adamw_step``).
        groups: ``[(start, stop), ...]`` flat slices with their own hyper-parameters, in order,
            covering ``[0, n)``; default one group.
        state_dtype: dtype of the moments in the BF16 modes (``"bfloat16"`` default or
            ``"float32"``); FP32 in ``"fp32-master"`` and ``"fp32"``; in ``"fp16-sr"``
            ``"float32"`` (default) or ``"bfloat16"``.
        seed: 64-bit seed shared by all ranks (``None``: rank 0 draws one and broadcasts it).
        grad_dtype: dtype of ``flat_grads`` (default: the parameters' dtype): ``"bfloat16"`` or
            ``"float32"``, and ``"float16"`` in ``"fp16-sr"``.
        reduce_dtype: dtype of the reduced gradient shard: ``"bfloat16"`` (SR; default for the
            modes with BF16 weights) or ``"float32"`` (unrounded; default for ``"fp32"`` and
            ``"fp16-sr"``: there is no FP16 reduce kernel, and BF16 would drop 3 of the FP16
            gradients' 11 significand bits).
        wire_dtype: ``None`` or ``"bfloat16"`` to send FP32 (or FP16) gradients as SR-rounded
            BF16. FP16 gradients travel as their exact FP32 upcast by default (``None`` or
            ``"float32"``; the reduce kernel reads FP32 or BF16 chunks), so they are summed as
            FP32 gradients are, at twice the bytes of FP16.
        op: ``"avg"`` (default) or ``"sum"`` over ranks.

    Every rank must pass the same settings (size, precision, groups, dtypes, op, device kind,
    seed), and the same hyper-parameters and ``grad_scale`` to every :meth:`step`: else each
    rank would update its shard its own way. Both are checked, and a difference raises
    ``ValueError`` on every rank, naming it.
    """

    optimizer = "adamw"
    states = ("exp_avg", "exp_avg_sq")

    def _update(self, p: Any, g: Any, sl: slice, h: dict, t: int, kw: dict) -> None:
        adamw_step([p], [g], [self.exp_avg[sl]], [self.exp_avg_sq[sl]], step=t, lr=h["lr"],
                   betas=tuple(h["betas"]), eps=h["eps"], weight_decay=h["weight_decay"], **kw)


def _elementwise_precision(self: _ShardedCore, precision: str) -> None:
    check_precision(precision, type(self).__name__)  # SGD's and Lion's modes: no fp16-sr kernels


class ShardedSGDCore(_ShardedCore):
    """ZeRO-style sharded srkern SGD (``torch.optim.SGD``'s update, :func:`srkern.sgd_step`) on one
    flat parameter vector: :class:`ShardedAdamWCore`'s contract (layout, exchanges, checks on every
    rank, world-size invariance, checkpoints), with SGD's state and hyper-parameters.

    Args:
        momentum: whether the steps use momentum, fixed at construction (keyword, a bool).
            ``True``: each rank keeps a momentum buffer (section ``momentum_buffer``, in
            ``state_dtype``) for its shard, and every group's ``momentum`` must be > 0 at every
            step; ``False``: SGD keeps no state at all and every group's ``momentum`` must be 0.
            The value may change between steps (a scheduler cycling it); its being zero may not.
        precision: ``bf16-sr``, ``bf16-nearest``, ``bf16-kahan``, ``fp32-master`` or ``fp32``
            (no ``fp16-sr`` kernels).
        groups, state_dtype, seed, grad_dtype, reduce_dtype, wire_dtype, op: as ``ShardedAdamWCore``.

    :meth:`step`'s ``hypers[i]``: ``lr``, ``momentum``, ``dampening``, ``nesterov``,
    ``weight_decay``, ``maximize`` (``srkern.sgd_step``'s meanings and checks). The first step
    (``step_count == 0``) is torch's fresh buffer (``first_step=True``: the buffer becomes the
    gradient, undampened); steps after a loaded checkpoint continue its buffers.
    """

    optimizer = "sgd"
    _check_precision = _elementwise_precision

    def __init__(self, flat_params: Any, comm: Communicator | Any, *, momentum: bool, **kwargs: Any) -> None:
        self.momentum = momentum  # checked in _settings, inside the construction's collective check
        super().__init__(flat_params, comm, **kwargs)

    @property
    def states(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("momentum_buffer",) if self.momentum else ()

    def _settings(self) -> dict[str, Any]:
        if not isinstance(self.momentum, bool):
            raise TypeError(f"momentum must be a bool (whether the steps use momentum; each step's value is "
                            f"hypers[i]['momentum']), got {type(self.momentum).__name__}")
        return {"momentum": self.momentum}

    def _check_group(self, i: int, h: dict, grad_scale: float) -> dict[str, Any]:
        codes = super()._check_group(i, h, grad_scale)
        if (h["momentum"] > 0) != self.momentum:
            raise ValueError(f"hypers[{i}]: momentum={h['momentum']!r}, but this {type(self).__name__} was built "
                             f"with momentum={self.momentum}: whether SGD uses momentum (keeps momentum buffers) "
                             "is fixed at construction")
        return codes

    def _update(self, p: Any, g: Any, sl: slice, h: dict, t: int, kw: dict) -> None:
        sgd_step([p], [g], [self.momentum_buffer[sl]] if self.momentum else None, step=t,
                 first_step=self.step_count == 0, **{k: h[k] for k in OPTIMIZER_HYPER_KEYS["sgd"]}, **kw)


class ShardedLionCore(_ShardedCore):
    """ZeRO-style sharded srkern Lion (:func:`srkern.lion_step`) on one flat parameter vector:
    :class:`ShardedAdamWCore`'s contract, with Lion's state (section ``exp_avg``, the momentum,
    in ``state_dtype``) and hyper-parameters: :meth:`step`'s ``hypers[i]`` holds ``lr``,
    ``betas``, ``weight_decay``, ``maximize`` (``srkern.lion_step``'s meanings and checks).
    Precisions: ``bf16-sr``, ``bf16-nearest``, ``bf16-kahan``, ``fp32-master``, ``fp32``. The
    arguments are ``ShardedAdamWCore``'s.
    """

    optimizer = "lion"
    states = ("exp_avg",)
    _check_precision = _elementwise_precision

    def _update(self, p: Any, g: Any, sl: slice, h: dict, t: int, kw: dict) -> None:
        lion_step([p], [g], [self.exp_avg[sl]], step=t, lr=h["lr"], betas=tuple(h["betas"]),
                  weight_decay=h["weight_decay"], maximize=h["maximize"], **kw)
