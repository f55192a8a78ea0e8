"""Transport for srkern's collectives: :class:`Communicator` over mpi4py (and NCCL for CUDA
buffers), the collective argument check, and :func:`abort_on_error`.

CPU buffers (NumPy, PyTorch CPU) go through MPI itself. CUDA buffers go through NCCL
(``cupy.cuda.nccl``; the unique id is made on rank 0 and broadcast over MPI), on the producing
framework's current stream; with ``cuda="mpi"`` they go through a CUDA-aware MPI instead, after
the stream is synchronized. Every transfer is bytes: no reduction ever happens inside MPI or
NCCL, so the sums are srkern's (``srkern.dist``).

Failure. Invalid arguments are checked on every rank before any exchange
(:meth:`Communicator.check_args`); if any rank's check fails, every rank raises (the first
failing rank's message), so bad input never leaves ranks waiting; settings that must be the
same everywhere are compared in the same single allreduce, as a 64-bit digest. A rank that
leaves the body of :func:`abort_on_error` by any exception (``SystemExit`` and
``KeyboardInterrupt`` included) prints its traceback and calls ``MPI_Abort``; the launcher
then ends every rank at once, so no rank waits forever in a collective. Against a rank that hangs without
raising, run under a launcher timeout: MPICH's ``MPIEXEC_TIMEOUT=<seconds> mpirun ...``.

MPI counts and displacements are 32-bit, so on the MPI path a single message of more than
2**31 - 1 elements (one rank's part of a reduce-scatter, or a whole all-gathered vector) is
not supported.

mpi4py is imported on first use, so ``import srkern`` works without it. The same interface runs
over a torch.distributed process group (gloo, NCCL): ``srkern._torch_comm.TorchCommunicator``,
which registers itself here (:func:`register_adapter`) so that :func:`as_communicator` accepts
process groups without this module importing torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from . import _backend
from ._tensor import View

T = TypeVar("T")


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - mpi4py is a test dependency
        raise ImportError("srkern's collectives need mpi4py and an MPI library: pip install 'srkern[mpi]'") from e
    return MPI


class Communicator:
    """Collective transport for srkern over an mpi4py communicator.

    Args:
        mpi_comm: an ``mpi4py.MPI.Comm`` (default ``MPI.COMM_WORLD``).
        cuda: how CUDA buffers travel: ``"nccl"`` (default; ``cupy.cuda.nccl``, one NCCL
            communicator per device, created on first use, collectively) or ``"mpi"``
            (CUDA-aware MPI; the tensor's stream is synchronized before MPI touches it).

    ``bytes_sent`` / ``bytes_received`` count payload bytes exchanged with other ranks.
    """

    def __init__(self, mpi_comm: Any = None, *, cuda: str = "nccl") -> None:
        MPI = _mpi()
        if cuda not in ("nccl", "mpi"):
            raise ValueError(f"cuda must be 'nccl' or 'mpi', got {cuda!r}")
        if mpi_comm is not None and not isinstance(mpi_comm, MPI.Comm):
            raise TypeError(f"mpi_comm must be an mpi4py communicator, got {type(mpi_comm).__name__}")
        self.mpi = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank: int = self.mpi.Get_rank()
        self.size: int = self.mpi.Get_size()
        self.cuda = cuda
        self._nccl: dict[int, Any] = {}
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- small helpers
    def barrier(self) -> None:
        self.mpi.Barrier()

    def bcast_int(self, value: int, root: int = 0) -> int:
        buf = np.array([value], dtype=np.uint64)
        self.mpi.Bcast(buf, root=root)
        return int(buf[0])

    def all_ok(self, ok: bool) -> bool:
        """Logical AND of ``ok`` over ranks."""
        MPI = _mpi()
        return bool(self.mpi.allreduce(int(bool(ok)), op=MPI.MIN))

    def first(self, value: Any) -> Any:
        """Collective: the lowest rank's ``value`` among those that are set (truthy), else None:
        how every rank learns the same first error."""
        return next((v for v in self.mpi.allgather(value) if v), None)

    def _raise_first(self, err: BaseException | None) -> None:
        """Collective, once some rank failed: every rank raises the first failing rank's error,
        ``"rank R: <message>"``, as ``TypeError`` or ``ValueError`` if it was one, else as
        ``RuntimeError`` naming its type."""
        r, kind, msg = self.first(None if err is None else (self.rank, type(err).__name__, str(err)))
        cls = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
        raise cls(f"rank {r}: {msg}" if cls is not RuntimeError else f"rank {r}: {kind}: {msg}") from err

    def check_args(self, check: Callable[[], tuple[T, Sequence[int] | Mapping[str, Any] | None]],
                   mismatch: str = "") -> T:
        """Collective argument check, run before any exchange; returns ``check``'s value.

        ``check()`` validates this rank's arguments and returns ``(value, codes)``. If it raises on
        any rank, every rank raises the first failing rank's error (:meth:`_raise_first`).
        Else every rank must have returned the same codes, else every rank raises
        ``ValueError(mismatch)``: integers (compared modulo 2**64), or a mapping from a setting's
        name to its value (ints, floats, strings, tuples of these; compared by ``repr``), in
        which case the message names the first setting that differs and two ranks' values.
        One allreduce in all (of a 64-bit digest of the codes) unless a check failed.
        """
        err: Exception | None = None
        value, codes = None, None
        try:
            value, codes = check()
        except Exception as e:  # any kind: a rank that raised alone would leave the others waiting
            err = e
        # One MAX allreduce answers both questions: did any rank fail, and are the digests the
        # same (the max of each 32-bit half equals minus the max of its negation).
        d = 0 if err is not None else _digest(codes)
        halves = [d >> 32, d & 0xFFFFFFFF]
        top = self._allreduce_max(np.array([err is not None, *halves, *(-h for h in halves)], dtype=np.int64))
        if top[0]:
            self._raise_first(err)
        if top[1] != -top[3] or top[2] != -top[4]:
            raise ValueError(self._mismatch(mismatch, codes))
        return value

    def _allreduce_max(self, a: np.ndarray) -> np.ndarray:
        """Collective: the element-wise maximum over ranks of the int64 vector ``a``."""
        top = np.empty_like(a)
        self.mpi.Allreduce(a, top, op=_mpi().MAX)
        return top

    def _mismatch(self, mismatch: str, codes: Sequence[int] | Mapping[str, Any] | None) -> str:
        """Collective, once the digests differ: ``mismatch`` and, for named codes, the first
        setting that differs, as rank 0's value and the first other value (rank order)."""
        every = self.mpi.allgather(dict(codes) if isinstance(codes, Mapping) else None)
        if not all(isinstance(c, dict) for c in every):
            return mismatch
        names = list(dict.fromkeys(k for c in every for k in c))
        shown = [{k: repr(c[k]) if k in c else "<not set>" for k in names} for c in every]
        differ = [k for k in names if len({s[k] for s in shown}) > 1]
        if not differ:  # the same settings in another order: still not the same call
            return mismatch
        k = differ[0]
        r = next(r for r, s in enumerate(shown) if s[k] != shown[0][k])
        rest = differ[1:]
        also = f" (also {', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''})" if rest else ""
        return (f"{mismatch}: {k} is {_short(shown[0][k])} on rank 0 but {_short(shown[r][k])} "
                f"on rank {r}{also}")

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (NCCL communicators first, then ``MPI_Abort``)."""
        for c in self._nccl.values():
            with contextlib.suppress(Exception):
                c.abort()
        _mpi_abort(self.mpi, code)

    # -- NCCL
    def _nccl_comm(self, device_id: int):
        if device_id not in self._nccl:
            from cupy.cuda import nccl
            import cupy
            if not nccl.available:
                raise RuntimeError("CUDA buffers need NCCL: pip install nvidia-nccl-cu13 "
                                   "(or use Communicator(..., cuda='mpi') with a CUDA-aware MPI)")
            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self.mpi.bcast(uid, root=0)
            with cupy.cuda.Device(device_id):
                self._nccl[device_id] = nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._nccl[device_id]

    def _nccl_exchange(self, device_id: int, sends: Sequence[tuple[int, int]],
                       recvs: Sequence[tuple[int, int]], stream: int) -> None:
        """One NCCL group on ``stream``: to every other rank ``peer`` send ``sends[peer]`` and from
        it receive ``recvs[peer]``, each (device pointer, bytes); empty ones are skipped."""
        from cupy.cuda import nccl
        c = self._nccl_comm(device_id)
        nccl.groupStart()
        for peer in range(self.size):
            if peer == self.rank:
                continue
            for (ptr, nbytes), op in ((sends[peer], c.send), (recvs[peer], c.recv)):
                if nbytes:
                    op(ptr, nbytes, nccl.NCCL_UINT8, peer, stream)
        nccl.groupEnd()

    # -- the two exchanges everything is built on (counts and displacements in elements)
    def alltoallv(self, send: View, counts: Sequence[int], displs: Sequence[int],
                  recv: View, rcounts: Sequence[int], rdispls: Sequence[int], stream: int = 0) -> None:
        """Send ``counts[r]`` elements at ``displs[r]`` of ``send`` to rank r; receive
        ``rcounts[r]`` elements from rank r at ``rdispls[r]`` of ``recv``. Same dtype both sides."""
        isz = send.itemsize
        self.bytes_sent += isz * (sum(counts) - counts[self.rank])
        self.bytes_received += isz * (sum(rcounts) - rcounts[self.rank])
        if send.device == "cuda" and self.cuda == "nccl":
            self._nccl_exchange(send.device_id, [(send.ptr + d * isz, c * isz) for c, d in zip(counts, displs)],
                                [(recv.ptr + d * isz, c * isz) for c, d in zip(rcounts, rdispls)], stream)
            self._device_copy(recv, rdispls[self.rank], send, displs[self.rank], counts[self.rank], stream)
            return
        self._sync(send, stream)
        t = _mpi_type(isz)
        self.mpi.Alltoallv([_mpi_buf(send), (list(counts), list(displs)), t],
                           [_mpi_buf(recv), (list(rcounts), list(rdispls)), t])

    def allgatherv(self, shard: View, out: View, counts: Sequence[int], displs: Sequence[int],
                   stream: int = 0) -> None:
        """Gather every rank's ``shard`` (``counts[r]`` elements) into ``out`` at ``displs[r]``.
        ``shard`` may be ``out``'s own slice (then nothing is copied locally)."""
        isz = out.itemsize
        mine = counts[self.rank]
        self.bytes_sent += isz * mine * (self.size - 1)
        self.bytes_received += isz * (sum(counts) - mine)
        in_place = shard.ptr == out.ptr + displs[self.rank] * isz
        if out.device == "cuda" and self.cuda == "nccl":
            self._nccl_exchange(out.device_id, [(shard.ptr, mine * isz)] * self.size,
                                [(out.ptr + d * isz, c * isz) for c, d in zip(counts, displs)], stream)
            if not in_place:
                self._device_copy(out, displs[self.rank], shard, 0, mine, stream)
            return
        MPI = _mpi()
        self._sync(out, stream)
        t = _mpi_type(isz)
        sendbuf = MPI.IN_PLACE if in_place else [_mpi_buf(shard), mine, t]
        self.mpi.Allgatherv(sendbuf, [_mpi_buf(out), (list(counts), list(displs)), t])

    def bcast_view(self, v: View, stream: int = 0, root: int = 0) -> None:
        """Overwrite ``v`` on every rank with rank ``root``'s bytes, through MPI (host memory,
        or device memory with a CUDA-aware MPI once ``stream`` is synchronized)."""
        self._sync(v, stream)
        self.mpi.Bcast([_mpi_buf(v), v.nbytes, _mpi().BYTE], root=root)

    # -- device helpers
    def _sync(self, v: View, stream: int) -> None:
        """Finish pending GPU work on ``stream`` before MPI reads or writes device memory."""
        if v.device == "cuda":
            _backend.synchronize(stream, v.device_id)

    @staticmethod
    def _device_copy(dst: View, doff: int, src: View, soff: int, count: int, stream: int) -> None:
        if count == 0:
            return
        import cupy
        isz = dst.itemsize
        d, s = dst.ptr + doff * isz, src.ptr + soff * isz
        if d != s:
            with cupy.cuda.Device(dst.device_id):
                cupy.cuda.runtime.memcpyAsync(d, s, count * isz, cupy.cuda.runtime.memcpyDeviceToDevice, stream)


def _digest(codes: Sequence[int] | Mapping[str, Any] | None) -> int:
    """64 bits of BLAKE2b over the canonical text of ``codes`` (0 for None)."""
    if codes is None:
        return 0
    if isinstance(codes, Mapping):
        text = repr(dict(codes))  # in insertion order: the call site's order
    else:
        text = repr([int(v) % (1 << 64) for v in codes])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# One Communicator per mpi4py communicator passed raw, so that its NCCL communicators are made
# once, not at every call (the mpi4py object is kept alive with it, so its id is not reused).
_WRAPPED: dict[int, tuple[Any, Communicator]] = {}


# Transports beside MPI register here, without this module importing them (they sit in a higher
# layer): ``srkern._torch_comm`` adds torch.distributed process groups when it is imported. Each
# adapter returns the Communicator for an object it recognises (the same one each time), else None.
_ADAPTERS: list[tuple[Callable[[Any], "Communicator | None"], str]] = []


def register_adapter(adapt: Callable[[Any], "Communicator | None"], what: str) -> None:
    """Make :func:`as_communicator` and :func:`abort_on_error` accept the objects ``adapt``
    recognises (``what`` names them in the ``TypeError`` for anything else)."""
    if all(a is not adapt for a, _ in _ADAPTERS):
        _ADAPTERS.append((adapt, what))


def _adapted(comm: Any) -> "Communicator | None":
    for adapt, _ in _ADAPTERS:
        c = adapt(comm)
        if c is not None:
            return c
    return None


def as_communicator(comm: Any, name: str = "comm") -> Communicator:
    """``comm`` itself if it is a :class:`Communicator`; an mpi4py communicator wrapped in one
    (the same wrapper each time that communicator is passed), or an object a registered adapter
    recognises (a torch.distributed process group once ``srkern.torch`` is imported); anything
    else (None included) is a ``TypeError`` naming ``name``, raised on this rank before any
    collective."""
    if isinstance(comm, Communicator):
        return comm
    adapted = None if comm is None else _adapted(comm)
    if adapted is not None:
        return adapted
    if comm is not None and isinstance(comm, _mpi().Comm):
        held = _WRAPPED.get(id(comm))
        if held is None or held[0] is not comm:
            held = _WRAPPED[id(comm)] = (comm, Communicator(comm))
        return held[1]
    kinds = ["a srkern.dist.Communicator", "an mpi4py communicator"] + [w for _, w in _ADAPTERS]
    raise TypeError(f"{name} must be {', '.join(kinds[:-1])} or {kinds[-1]}, got {type(comm).__name__}")


def _mpi_type(itemsize: int):
    MPI = _mpi()
    return {1: MPI.UINT8_T, 2: MPI.UINT16_T, 4: MPI.UINT32_T, 8: MPI.UINT64_T}[itemsize]


def _mpi_buf(v: View):
    return _mpi().buffer.fromaddress(v.ptr, v.nbytes) if v.nbytes else _mpi().buffer.fromaddress(0, 0)


# MPICH's launcher kills every rank as soon as one calls MPI_Abort, and what that rank wrote to
# its stderr just before may still sit in the pipe: about 1 launch in 40 lost the whole message
# (tests/test_dist_attack.py, 2 ranks). A pause this long lost none in 200.
ABORT_FLUSH_S = 0.05


def _mpi_abort(mpi, code: int) -> None:
    """``MPI_Abort`` after the launcher has had time to forward this rank's last output."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_FLUSH_S)
    mpi.Abort(code)


@contextlib.contextmanager
def abort_on_error(comm: "Communicator | Any" = None) -> Iterator[None]:
    """Run the body; if it raises on any rank, print the error with the rank and abort the job.

    Without this, an exception on one rank leaves the others blocked in their next collective.
    ``MPI_Abort`` makes the launcher (mpirun) kill every rank and exit non-zero at once (over a
    torch.distributed group, ``comm`` a ``TorchCommunicator`` or the group itself, the rank
    exits and torchrun ends the others: see ``srkern._torch_comm``; ``None`` means MPI). Any
    exception counts, ``SystemExit`` (``sys.exit(0)``, ``sys.exit()``) and ``KeyboardInterrupt``
    included: the other ranks cannot know this one is gone. To end the job normally, leave the
    body normally on every rank. A rank that raised never returns from the ``with``.
    """
    try:
        yield
    except BaseException as e:  # SystemExit(0) and KeyboardInterrupt abort too: the job is over
        c = comm if isinstance(comm, Communicator) else None if comm is None else _adapted(comm)
        mpi = c.mpi if c else (comm if comm is not None else _mpi().COMM_WORLD)
        rank = mpi.Get_rank()
        sys.stdout.flush()
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__  # sys.exit(): no text
        sys.stderr.write(f"srkern: rank {rank} of {mpi.Get_size()} raised {what}; aborting all ranks\n")
        if isinstance(e, SystemExit) and e.code in (0, None):  # a clean exit, in the wrong place
            sys.stderr.write("srkern: to end the job normally, leave the `with abort_on_error()` block "
                             "on every rank before calling sys.exit\n")
        else:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        if c is not None:
            c.abort(1)  # NCCL communicators first, then MPI_Abort
        else:
            _mpi_abort(mpi, 1)
        # MPICH's MPI_Abort can return before the launcher kills this process: leaving the
        # generator now would swallow the exception and run the code after the with block.
        os._exit(1)
