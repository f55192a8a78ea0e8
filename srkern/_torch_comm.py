"""``TorchCommunicator``: srkern's collective transport over a ``torch.distributed`` process group
(a job started by ``torchrun``), beside the mpi4py :class:`srkern.comm.Communicator`.

Importing this module (``srkern.torch`` does) registers it with ``srkern.comm``, so that
``as_communicator`` and with it ``ShardedAdamWCore``, ``srkern.dist`` and ``abort_on_error``
accept a ``torch.distributed.ProcessGroup`` (``torch.distributed.group.WORLD``, a ``new_group``)
wherever they accept an mpi4py communicator; the same group gives the same wrapper each time.

Backends: CPU buffers travel through gloo, CUDA buffers through NCCL; a group made with
``backend="cpu:gloo,cuda:nccl"`` carries both. The small control messages (the argument check,
the seed, the first error, the checkpoint's bookkeeping) use CPU tensors, or CUDA ones on an
NCCL-only group (then set the device first: ``torch.cuda.set_device(local_rank)``).

How each exchange maps onto torch.distributed (every transfer is bytes: ``uint8`` tensors laid
over the caller's memory without a copy, so the transport cannot change a bit, and no reduction
ever happens inside torch; the sums stay srkern's):

* ``alltoallv`` (the reduce-scatter) -> one ``all_to_all_single`` with byte split sizes (packed
  into a temporary only if the displacements are not the running sums of the counts);
* ``allgatherv`` (the weights after each step; counts may differ, and gloo's ``all_gather``
  wants equal sizes) -> one ``broadcast`` per rank with a non-empty shard, from that rank,
  straight into the output at its offset: no padding and no temporary, each rank receives
  exactly the bytes ``MPI_Allgatherv`` would deliver;
* ``bcast_view`` / ``bcast_int`` -> ``broadcast``; the single allreduce of ``check_args`` (and
  ``all_ok``, ``barrier``) -> ``all_reduce(MAX)`` of an int64 vector;
* the object messages srkern sends through ``comm.mpi`` (``first``, the mismatch report, the
  checkpoint's tokens and manifests) -> ``all_gather_object`` / ``broadcast_object_list``.

Failure, as over MPI: ``check_args`` runs every rank's check and spreads any exception, or a
difference of the named settings, to every rank in one collective, before any exchange.
``abort`` (what ``abort_on_error`` calls) aborts the group's NCCL communicators where it has
them and ends this process with ``os._exit``: torchrun's agent sees a worker fail and terminates
the others, so the job exits non-zero at once. Without such an agent, a rank left waiting in a
collective gets gloo's closed-connection error or the group's timeout
(``init_process_group(timeout=...)``). The NCCL path is written to the same rules but is not
exercised by the CPU test suite.
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref
from typing import Any, Sequence

import numpy as np
import torch

from ._tensor import View
from .comm import Communicator, register_adapter

_tdist = torch.distributed


class _HostBytes:
    """``nbytes`` bytes of host memory at ``ptr`` (its array interface, for NumPy)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class _DeviceBytes:
    """``nbytes`` bytes of device memory at ``ptr`` (its CUDA array interface, for torch)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 2}


def _device(v: View) -> torch.device:
    return torch.device("cuda", v.device_id) if v.device == "cuda" else torch.device("cpu")


def _bytes(v: View, off: int, count: int) -> torch.Tensor:
    """A ``uint8`` tensor over elements ``[off, off + count)`` of ``v``'s memory (no copy)."""
    n = count * v.itemsize
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=_device(v))
    t = v.obj
    if v.framework == "torch" and t.is_contiguous() and t.data_ptr() == v.ptr:
        # A view of the torch tensor itself: its storage needs no Python object to be freed.
        # Tensors over NumPy memory do, and gloo's worker threads may free the last reference of
        # an asynchronous exchange's tensor during interpreter teardown, where taking the GIL
        # aborts the process ("terminate called without an active exception").
        return t.detach().reshape(-1)[off:off + count].view(torch.uint8)
    ptr = v.ptr + off * v.itemsize
    if v.device == "cuda":
        return torch.as_tensor(_DeviceBytes(ptr, n), device=_device(v))
    return torch.from_numpy(np.asarray(_HostBytes(ptr, n)))


def _packed(counts: Sequence[int], displs: Sequence[int]) -> bool:
    """Whether the pieces lie back to back in rank order (then one slice holds them all)."""
    at = displs[0] if displs else 0
    for c, d in zip(counts, displs, strict=True):
        if c and d != at:
            return False
        at += c
    return True


def _carriers(backend: str) -> dict[str, str]:
    """Device kind ("cpu", "cuda") -> the backend that carries its tensors in the group."""
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        return dict(part.split(":", 1) for part in backend.split(","))
    return {"gloo": {"cpu": "gloo"}, "nccl": {"cuda": "nccl"}}.get(backend, {"cpu": backend, "cuda": backend})


class _GroupObjects:
    """The mpi4py-style calls srkern makes on ``Communicator.mpi`` (object collectives,
    ``Get_rank``, ``Get_size``, ``Barrier``, ``Abort``), answered over the torch group: what
    ``srkern.checkpoint``, ``srkern.dist`` and ``check_args``'s error report call."""

    def __init__(self, comm: "TorchCommunicator") -> None:
        self._c = comm

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names)
        return self._c.rank

    def Get_size(self) -> int:  # noqa: N802
        return self._c.size

    def Barrier(self) -> None:  # noqa: N802
        self._c.barrier()

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        self._c.abort(code)

    def allgather(self, obj: Any) -> list:
        every: list = [None] * self._c.size
        _tdist.all_gather_object(every, obj, group=self._c.group)
        return every

    def bcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj if self._c.rank == root else None]
        _tdist.broadcast_object_list(box, src=self._c.global_rank(root), group=self._c.group)
        return box[0]

    def gather(self, obj: Any, root: int = 0) -> list | None:
        every = self.allgather(obj)  # checkpoints only: small objects, once per save
        return every if self._c.rank == root else None

    def allreduce(self, value: Any, op: str = "sum") -> Any:
        """Sum (in rank order), ``"min"`` or ``"max"`` of Python numbers over ranks."""
        every = self.allgather(value)
        if op == "sum":
            total = every[0]
            for v in every[1:]:
                total = total + v
            return total
        if op in ("min", "max"):
            return min(every) if op == "min" else max(every)
        raise ValueError(f"op must be 'sum', 'min' or 'max', got {op!r}")


class TorchCommunicator(Communicator):
    """:class:`srkern.comm.Communicator`'s interface over a ``torch.distributed`` process group.

    Args:
        group: a ``torch.distributed.ProcessGroup`` this process belongs to (default: the
            default group, ``torch.distributed.group.WORLD``); ``init_process_group`` must
            have run (torchrun sets the environment it reads).

    ``rank`` / ``size`` are within the group; ``group`` is the group; ``mpi`` answers the
    mpi4py-style object calls srkern makes (see ``_GroupObjects``); ``cuda`` is ``"torch"``
    (CUDA buffers go through the group's NCCL backend). ``bytes_sent`` / ``bytes_received``
    count payload bytes exchanged with other ranks, as over MPI. Every collective must be
    called by every rank of the group in the same order, as over MPI.
    """

    def __init__(self, group: Any = None) -> None:  # no super().__init__: that one opens MPI
        if not _tdist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        if not _tdist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group(...) first (under torchrun)")
        group = _tdist.group.WORLD if group is None else group
        if not isinstance(group, _tdist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
        # Held weakly: torch holds every live group until destroy_process_group, and a group kept
        # alive past it (by an optimizer at module level) is destroyed at interpreter exit,
        # where gloo's threads abort the process ("terminate called without an active exception").
        self._group = weakref.ref(group)
        self.rank: int = _tdist.get_rank(group)
        self.size: int = _tdist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the process group")
        self._globals = [_tdist.get_global_rank(group, r) for r in range(self.size)]
        self.backend = str(_tdist.get_backend(group))
        self._carriers = _carriers(self.backend)
        self._control = (torch.device("cpu") if "cpu" in self._carriers
                         else torch.device("cuda", torch.cuda.current_device()))
        self.mpi: Any = _GroupObjects(self)
        self.cuda = "torch"
        self._nccl: dict[int, Any] = {}  # unused: torch owns the NCCL communicators
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def group(self) -> Any:
        """The process group (a ``RuntimeError`` once ``destroy_process_group`` has freed it)."""
        g = self._group()
        if g is None:
            raise RuntimeError("the torch.distributed process group of this communicator was destroyed")
        return g

    def global_rank(self, rank: int) -> int:
        """The default group's rank of this group's ``rank`` (what torch's ``src=`` takes)."""
        return self._globals[rank]

    # -- small helpers
    def _allreduce_max(self, a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64).copy()).to(self._control)
        _tdist.all_reduce(t, op=_tdist.ReduceOp.MAX, group=self.group)
        return t.cpu().numpy()

    def barrier(self) -> None:
        self._allreduce_max(np.zeros(1, dtype=np.int64))

    def bcast_int(self, value: int, root: int = 0) -> int:
        t = torch.from_numpy(np.array([value], dtype=np.uint64).view(np.int64)).to(self._control)
        _tdist.broadcast(t, src=self.global_rank(root), group=self.group)
        return int(t.cpu().numpy().view(np.uint64)[0])

    def all_ok(self, ok: bool) -> bool:
        return not self._allreduce_max(np.array([not ok], dtype=np.int64))[0]

    def abort(self, code: int = 1) -> None:
        """End this rank now (its NCCL communicators first); torchrun then ends the others."""
        if "nccl" in self._carriers.values():
            with contextlib.suppress(Exception):  # the group may be gone, or have no abort
                self.group.abort()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    # -- the exchanges (counts and displacements in elements, as in Communicator)
    def _carried(self, v: View) -> None:
        """Refuse a buffer the group's backend cannot carry (every rank has the same device kind,
        checked before, so every rank refuses alike)."""
        if v.device not in self._carriers:
            raise ValueError(f"process group backend {self.backend!r} does not carry {v.device} tensors: "
                             "CPU tensors need gloo, CUDA tensors NCCL (backend='cpu:gloo,cuda:nccl' has both)")

    @staticmethod
    def _on(v: View, stream: int):
        """Run torch's collectives ordered on ``stream`` (CUDA buffers; host ones are synchronous)."""
        if v.device != "cuda":
            return contextlib.nullcontext()
        s = (torch.cuda.ExternalStream(stream, device=_device(v)) if stream
             else torch.cuda.default_stream(v.device_id))
        return torch.cuda.stream(s)

    def alltoallv(self, send: View, counts: Sequence[int], displs: Sequence[int],
                  recv: View, rcounts: Sequence[int], rdispls: Sequence[int], stream: int = 0) -> None:
        isz = send.itemsize
        self.bytes_sent += isz * (sum(counts) - counts[self.rank])
        self.bytes_received += isz * (sum(rcounts) - rcounts[self.rank])
        self._carried(send)
        with self._on(send, stream):
            if _packed(counts, displs):
                src = _bytes(send, displs[0], sum(counts))
            else:
                src = torch.cat([_bytes(send, d, c) for c, d in zip(counts, displs, strict=True)])
            direct = _packed(rcounts, rdispls)
            dst = (_bytes(recv, rdispls[0], sum(rcounts)) if direct
                   else torch.empty(sum(rcounts) * isz, dtype=torch.uint8, device=_device(recv)))
            _tdist.all_to_all_single(dst, src, [c * isz for c in rcounts], [c * isz for c in counts],
                                     group=self.group)
            if not direct:
                at = 0
                for c, d in zip(rcounts, rdispls, strict=True):
                    _bytes(recv, d, c).copy_(dst[at:at + c * isz])
                    at += c * isz

    def allgatherv(self, shard: View, out: View, counts: Sequence[int], displs: Sequence[int],
                   stream: int = 0) -> None:
        isz = out.itemsize
        mine = counts[self.rank]
        self.bytes_sent += isz * mine * (self.size - 1)
        self.bytes_received += isz * (sum(counts) - mine)
        self._carried(out)
        with self._on(out, stream):
            own = _bytes(out, displs[self.rank], mine)
            if mine and shard.ptr != own.data_ptr():
                own.copy_(_bytes(shard, 0, mine))
            # One broadcast per rank that has a shard: every rank knows the counts, so all skip
            # the same empty ones; all are in flight before the first wait.
            works = [_tdist.broadcast(_bytes(out, d, c), src=self.global_rank(r), group=self.group,
                                      async_op=True)
                     for r, (c, d) in enumerate(zip(counts, displs, strict=True)) if c and self.size > 1]
            for w in works:
                w.wait()

    def bcast_view(self, v: View, stream: int = 0, root: int = 0) -> None:
        self._carried(v)
        with self._on(v, stream):
            _tdist.broadcast(_bytes(v, 0, v.numel), src=self.global_rank(root), group=self.group)

    def _nccl_comm(self, device_id: int):  # pragma: no cover - never reached: torch owns NCCL here
        raise RuntimeError("TorchCommunicator sends CUDA buffers through the process group's NCCL backend")


# One TorchCommunicator per live process group; neither keeps the group alive (see __init__).
_WRAPPED: "weakref.WeakKeyDictionary[Any, TorchCommunicator]" = weakref.WeakKeyDictionary()


def _adapt(obj: Any) -> TorchCommunicator | None:
    if not (_tdist.is_available() and isinstance(obj, _tdist.ProcessGroup)):
        return None
    comm = _WRAPPED.get(obj)
    if comm is None:
        comm = _WRAPPED[obj] = TorchCommunicator(obj)
    return comm


def default_communicator() -> Communicator:
    """What ``comm=None`` means for ``srkern.torch.ShardedAdamW``: the default torch.distributed
    group when ``torch.distributed.is_initialized()`` (a torchrun job), else a
    :class:`srkern.comm.Communicator` over ``MPI.COMM_WORLD`` (an mpirun job)."""
    if _tdist.is_available() and _tdist.is_initialized():
        return _adapt(_tdist.group.WORLD)
    return Communicator()


register_adapter(_adapt, "a torch.distributed ProcessGroup")
