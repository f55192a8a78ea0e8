"""``srkern.torch.ShardedAdamW``, ``ShardedSGD`` and ``ShardedLion``: srkern's optimizers ZeRO-sharded
over ranks, as torch optimizers (re-exported by :mod:`srkern.torch`). One front end
(``_ShardedOptimizer``: the flat layout, the collective checks, step, save and load) drives the
cores of :mod:`srkern.sharded`; each optimizer adds its defaults and its core."""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterable

import torch

from ._tensor import bump_versions
from .checkpoint import OPTIMIZER_HYPER_KEYS, check_hyper
from ._torch_comm import default_communicator
from ._torch_ops import TORCH_DTYPES
from .comm import as_communicator
from .layout import flat_offsets
from .precisions import param_dtype
from .sharded import ShardedAdamWCore, ShardedLionCore, ShardedSGDCore, _ShardedCore, hyper_codes


class _ShardedOptimizer(torch.optim.Optimizer):
    """The one front end of the sharded torch optimizers (see :class:`ShardedAdamW`): a subclass
    names its ``core_class`` and passes its defaults (the hyper-parameters of
    ``OPTIMIZER_HYPER_KEYS[core_class.optimizer]``) and core keywords; :meth:`_rule_kw` adds the
    core keywords that follow from the parameter groups."""

    core_class: type[_ShardedCore]

    def __init__(self, params: Iterable[Any], comm: Any, defaults: dict[str, Any], precision: str,
                 core_kw: dict[str, Any]) -> None:
        comm = default_communicator() if comm is None else as_communicator(comm)
        name, opt = type(self).__name__, self.core_class.optimizer

        def check() -> tuple[tuple[list[torch.Tensor], dict[str, Any]], dict[str, Any]]:
            # This rank's arguments; run through check_args, so that a bad argument on one rank
            # raises on every rank instead of leaving the others waiting in the core's exchanges,
            # and so that ranks with another layout or other hyper-parameters (the same total
            # size: the core could not tell) raise too.
            hyper = {k: (tuple(v) if k == "betas" else v) for k, v in defaults.items()}
            check_hyper(hyper, optimizer=opt)
            torch.optim.Optimizer.__init__(self, params, hyper)
            want = TORCH_DTYPES[param_dtype(precision)]
            plist = [p for g in self.param_groups for p in g["params"]]
            if not plist:
                raise ValueError(f"{name} got no parameters")
            for i, p in enumerate(plist):
                if p.dtype != want:
                    raise TypeError(f"parameter {i} has dtype {p.dtype}; precision {precision!r} "
                                    f"needs {want} parameters")
                if p.device != plist[0].device:
                    raise ValueError(f"parameter {i} is on {p.device}, parameter 0 on {plist[0].device}")
            if len({id(p) for p in plist}) != len(plist):
                raise ValueError("a parameter appears twice")
            codes: dict[str, Any] = {"parameters": len(plist), "dtype": str(want),
                                     "device": plist[0].device.type}
            codes.update({f"parameter {i} shape": tuple(p.shape) for i, p in enumerate(plist)})
            codes["groups"] = len(self.param_groups)
            for j, g in enumerate(self.param_groups):
                check_hyper(g, optimizer=opt)
                codes[f"group {j} parameters"] = len(g["params"])
                codes.update(hyper_codes(j, g, opt))
            return (plist, self._rule_kw()), codes

        plist, extra = comm.check_args(check, f"{name} built with different parameters or settings on "
                                              "different ranks")
        want, dev = plist[0].dtype, plist[0].device
        self._params = plist
        sizes = [p.numel() for p in plist]
        self._offsets = flat_offsets(sizes)
        bounds = self._offsets + [sum(sizes)]
        ends = list(itertools.accumulate(len(g["params"]) for g in self.param_groups))
        groups = [(bounds[a], bounds[b]) for a, b in zip([0] + ends[:-1], ends, strict=True)]
        flat = torch.empty(bounds[-1], dtype=want, device=dev)
        with torch.no_grad():
            for p, o in zip(plist, self._offsets, strict=True):
                flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
                p.data = flat[o:o + p.numel()].view(p.shape)
        self._layout = [{"shape": list(p.shape), "offset": o} for p, o in zip(plist, self._offsets, strict=True)]
        self.core = self.core_class(flat, comm, precision=precision, groups=groups, **core_kw, **extra)

    def _rule_kw(self) -> dict[str, Any]:
        """The core keywords that follow from the (checked) parameter groups; run inside the
        construction's collective check."""
        return {}

    @property
    def flat_params(self) -> torch.Tensor:
        return self.core.flat_params

    def _hypers(self) -> list[dict[str, Any]]:
        keys = OPTIMIZER_HYPER_KEYS[self.core.optimizer]
        return [{k: g[k] for k in keys} for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float = 1.0) -> Any:
        """Reduce-scatter the gradients, the SR step on this rank's shard, all-gather the weights.
        ``grad_scale`` multiplies every reduced gradient inside the kernel (loss-scale unscaling,
        clipping), as in :meth:`srkern.torch.AdamW.step`; every rank must pass the same value."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.core.step(self._hypers(), grad_scale=grad_scale, prepare=self._fill_grads)
        # The parameters are views of the flat buffer the kernels wrote through raw pointers, each
        # with its own version counter: bumped, so a graph that saved a weight raises on backward.
        bump_versions(self._params)
        return loss

    def _fill_grads(self) -> None:
        """Every parameter's gradient into the core's flat_grads; run inside the core's collective
        check, so that a gradient missing on one rank raises on every rank (the others would wait
        in the reduce-scatter)."""
        for i, p in enumerate(self._params):
            if p.grad is None:
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) has no gradient; "
                                 "every rank must supply a gradient for every parameter")
            if p.grad.layout != torch.strided:
                raise TypeError(f"parameter {i} has a {p.grad.layout} gradient; {type(self).__name__} "
                                "needs dense gradients")
        fg = self.core.flat_grads
        for p, o in zip(self._params, self._offsets, strict=True):
            fg[o:o + p.numel()].copy_(p.grad.reshape(-1))

    def optimizer_bytes(self) -> dict[str, int]:
        """Optimizer-state bytes on this rank (see ``ShardedAdamWCore.optimizer_bytes``)."""
        return self.core.optimizer_bytes()

    def bytes_per_param(self) -> float:
        """Optimizer-state bytes this rank holds per model parameter (shrinks as 1 / world)."""
        return sum(self.core.optimizer_bytes().values()) / max(1, self.core.n)

    def save(self, path: str | os.PathLike) -> None:
        """Collective checkpoint of the sharded state (see ``ShardedAdamWCore.save``)."""
        hyper = [{k: (list(v) if k == "betas" else v) for k, v in h.items()} for h in self._hypers()]
        self.core.save(path, layout=self._layout, extra={"hyper": hyper})

    def load(self, path: str | os.PathLike) -> None:
        """Collective load on any world size (re-shards); restores step, seed and hyper-parameters.

        The optimizer, the layout and every group's hyper-parameters are checked with the rest of
        the checkpoint, before anything is loaded; only the optimizer's hyper-parameters (AdamW:
        ``lr``, ``betas``, ``eps``, ``weight_decay``) are taken from it (a hyper entry with any
        other key is refused), never a group's parameters."""
        man = self.core.load(path, layout=self._layout)
        hyper = man["extra"].get("hyper")
        if hyper is not None:
            keys = OPTIMIZER_HYPER_KEYS[self.core.optimizer]
            for g, h in zip(self.param_groups, hyper, strict=True):
                g.update({k: (tuple(h[k]) if k == "betas" else h[k]) for k in keys})
        bump_versions(self._params)  # the weights were overwritten

    def state_dict(self):  # noqa: D102
        raise NotImplementedError(f"{type(self).__name__} state is sharded across ranks: use save(path) / load(path)")

    def load_state_dict(self, state_dict):  # noqa: D102
        raise NotImplementedError(f"{type(self).__name__} state is sharded across ranks: use save(path) / load(path)")


class ShardedAdamW(_ShardedOptimizer):
    """ZeRO-style sharded srkern AdamW for PyTorch (see :class:`srkern.sharded.ShardedAdamWCore`).

    The parameters become views into one flat buffer (of the mode's weight dtype: BF16; FP32
    for ``precision="fp32"``, FP16 for ``"fp16-sr"``),
    laid out in parameter-group order, each tensor at the offset equal to the number of
    elements before it: no padding, so flat index = the logical index :class:`AdamW` uses in
    one process. Each rank keeps the optimizer state of its shard only.

    Args:
        params: parameters or parameter groups (all on one device, dtype as above).
        comm: the ranks to shard over: a ``torch.distributed`` process group (under torchrun;
            gloo for CPU tensors, NCCL for CUDA ones; see ``srkern._torch_comm``), an mpi4py
            communicator (under mpirun), or a :class:`srkern.comm.Communicator`. ``None``: the
            default torch.distributed group if ``torch.distributed.is_initialized()``, else
            ``MPI.COMM_WORLD``.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (per group where given).
        precision: one of ``srkern.precisions.PRECISIONS``.
        state_dtype, seed, reduce_dtype, wire_dtype, op: as in ``ShardedAdamWCore``.

    ``step()`` is collective: every rank must call it, with a gradient for every parameter and
    the same hyper-parameters. Every rank must also build it with the same parameter shapes,
    groups and settings. Each of these is checked on every rank; a difference, or a bad argument
    on one rank, raises on every rank. Use :meth:`save` / :meth:`load` for checkpoints
    (``state_dict`` would hold only this rank's shard).
    """

    core_class = ShardedAdamWCore

    def __init__(self, params: Iterable[Any], comm: Any = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, precision: str = "bf16-sr", *,
                 state_dtype: str | None = None, seed: int | None = None,
                 reduce_dtype: str | None = None, wire_dtype: str | None = None,
                 op: str = "avg") -> None:
        super().__init__(params, comm, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                         precision, dict(state_dtype=state_dtype, seed=seed, reduce_dtype=reduce_dtype,
                                         wire_dtype=wire_dtype, op=op))


class ShardedSGD(_ShardedOptimizer):
    """ZeRO-style sharded srkern SGD for PyTorch (``torch.optim.SGD``'s update, bit-exact with
    ``srkern.sgd_step``; the core is :class:`srkern.sharded.ShardedSGDCore`). Layout, ``comm``,
    collective checks, ``step(closure, grad_scale=)``, :meth:`save` and :meth:`load` as
    :class:`ShardedAdamW`.

    Args:
        lr, momentum, dampening, weight_decay, nesterov, maximize: torch.optim.SGD's (per group).
            Whether SGD uses momentum is fixed at construction: ``momentum`` must be > 0 in every
            group (each rank keeps a momentum buffer for its shard) or 0 in every group (no state
            at all), and stay so at every step; its value may change (a scheduler cycling it).
        precision: ``bf16-sr``, ``bf16-nearest``, ``bf16-kahan``, ``fp32-master`` or ``fp32``.
        state_dtype, seed, reduce_dtype, wire_dtype, op: as in ``ShardedAdamWCore``.
    """

    core_class = ShardedSGDCore

    def __init__(self, params: Iterable[Any], comm: Any = None, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 precision: str = "bf16-sr", *, maximize: bool = False, state_dtype: str | None = None,
                 seed: int | None = None, reduce_dtype: str | None = None, wire_dtype: str | None = None,
                 op: str = "avg") -> None:
        super().__init__(params, comm, dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                            weight_decay=weight_decay, maximize=maximize),
                         precision, dict(state_dtype=state_dtype, seed=seed, reduce_dtype=reduce_dtype,
                                         wire_dtype=wire_dtype, op=op))

    def _rule_kw(self) -> dict[str, Any]:
        used = [g["momentum"] > 0 for g in self.param_groups]  # whether the core keeps momentum buffers
        if len(set(used)) > 1:
            raise ValueError(f"ShardedSGD: momentum must be > 0 in every parameter group or 0 in every one, got "
                             f"{[g['momentum'] for g in self.param_groups]}: the sharded momentum buffers cover "
                             "the whole flat vector or nothing")
        return {"momentum": used[0]}


class ShardedLion(_ShardedOptimizer):
    """ZeRO-style sharded srkern Lion for PyTorch (bit-exact with ``srkern.lion_step``; the core is
    :class:`srkern.sharded.ShardedLionCore`). Layout, ``comm``, collective checks,
    ``step(closure, grad_scale=)``, :meth:`save` and :meth:`load` as :class:`ShardedAdamW`.

    Args:
        lr, betas, weight_decay, maximize: Lion's hyper-parameters (per group; decoupled weight
            decay, as ``srkern.lion_step``).
        precision: ``bf16-sr``, ``bf16-nearest``, ``bf16-kahan``, ``fp32-master`` or ``fp32``.
        state_dtype, seed, reduce_dtype, wire_dtype, op: as in ``ShardedAdamWCore``.
    """

    core_class = ShardedLionCore

    def __init__(self, params: Iterable[Any], comm: Any = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 precision: str = "bf16-sr", *, maximize: bool = False, state_dtype: str | None = None,
                 seed: int | None = None, reduce_dtype: str | None = None, wire_dtype: str | None = None,
                 op: str = "avg") -> None:
        super().__init__(params, comm, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                            maximize=maximize),
                         precision, dict(state_dtype=state_dtype, seed=seed, reduce_dtype=reduce_dtype,
                                         wire_dtype=wire_dtype, op=op))
