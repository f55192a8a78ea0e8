"""Distributed srkern: SR reduce-scatter, all-gather and a ZeRO-style sharded AdamW over mpi4py.

Transport. :class:`Communicator` wraps an mpi4py communicator. CPU buffers (NumPy, PyTorch CPU)
go through MPI itself. CUDA buffers go through NCCL (``cupy.cuda.nccl``; the unique id is made on
rank 0 and broadcast over MPI), on the producing framework's current stream; with
``cuda="mpi"`` they go through a CUDA-aware MPI instead, after the stream is synchronized.
Every transfer is bytes: no reduction ever happens inside MPI or NCCL, so the sums are srkern's.

Shard layout. A vector of ``n`` elements is split into ``world`` contiguous shards of
``ceil(ceil(n / world) / 8) * 8`` elements (a whole number of Philox blocks of 16-bit draws), the
last shards shorter or empty: ``shard_range(n, world, rank)``. No padding is added to any
buffer; shards are simply uneven. Element ``i`` of the vector is always logical index ``i``.

Reduce-scatter, with no more bytes than a plain reduce-scatter of the wire dtype. Each rank
sends the part of its vector that belongs to rank ``r`` to rank ``r`` (MPI ``Alltoallv``, or
grouped NCCL send/recv): it sends ``n - len(own shard)`` elements and receives
``(world - 1) * len(own shard)``, what a ring reduce-scatter moves. One local kernel
(``kernels/dist.cu``) then reads the ``world`` received chunks, sums them in FP32 in rank order
0, 1, ..., world - 1 (divided by ``world`` for ``op="avg"``) and writes the shard once: BF16 with
SR (contract v1: index = the element's position in the full vector, shared seed, stream
``collective``) or nearest, or FP32 unrounded. The result is bit-identical on every backend and
independent of how the work is spread over threads.

FP32 inputs may travel as BF16 (``wire_dtype="bfloat16"``): each rank rounds its vector with SR
before sending (half the bytes); the draws use stream ``wire`` and index ``rank * n + i``, the
element's position in the stack of all ranks' inputs, so different ranks round independently.
The sum is still accumulated in FP32.

Failure. A rank that raises inside :func:`abort_on_error` (used by the example and the tests)
prints its traceback and calls ``MPI_Abort``; the launcher then ends every rank at once, so no
rank waits forever in a collective. Against a rank that hangs without raising, run under a
launcher timeout: MPICH's ``MPIEXEC_TIMEOUT=<seconds> mpirun ...`` (the tests use 120 s).
Invalid arguments are checked on every rank before any exchange; if any rank's check fails,
every rank raises (the first failing rank's message), so bad input never leaves ranks waiting.

Limit (not lifted yet): MPI counts and displacements are 32-bit, so on the MPI path a single
message of more than 2**31 - 1 elements (one rank's part of a reduce-scatter, or ``n``) is not supported.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import _backend, _contract
from .adamw import PRECISIONS as _ADAMW_PRECISIONS
from .adamw import bytes_per_param, check_hyperparameters, default_state_dtype
from ._files import atomic_write
from ._tensor import NP_DTYPES, View, as_view, contiguous, empty_like, finish, stream_of

# Shards are a whole number of Philox blocks of 16-bit draws (8 elements): a block never
# straddles two ranks, so each rank computes each of its blocks once.
SHARD_ALIGN = 8

# Random-stream id of the SR cast of FP32 inputs to the BF16 wire format. It must differ from
# `collective` (the output rounding), else rank 0's wire draws would equal the output draws.
WIRE_STREAM = _contract.STREAMS["wire"]
COLLECTIVE_STREAM = _contract.STREAMS["collective"]

OPS = ("avg", "sum")
ROUNDINGS = ("stochastic", "nearest")
_WIRE_DTYPES = ("float32", "bfloat16")
_KSUFFIX = {"float32": "f32", "bfloat16": "bf16"}


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s shard of an ``n``-element vector split over ``world`` ranks."""
    per = -(-n // world) if world else 0
    per = -(-per // SHARD_ALIGN) * SHARD_ALIGN
    return min(rank * per, n), min((rank + 1) * per, n)


# ---- the communicator ----------------------------------------------------------------------------

def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - mpi4py is a test dependency
        raise ImportError("srkern.dist needs mpi4py and an MPI library: pip install 'srkern[mpi]'") from e
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

    def all_agree(self, values: Sequence[int]) -> bool:
        """Whether every rank passed the same integers (one MIN and one MAX allreduce).

        Each value is taken modulo 2**64 and compared as its two 32-bit halves, so values that
        differ in any of the 64 bits (bit 63 included) disagree."""
        MPI = _mpi()
        a = np.array([h for v in values for h in ((int(v) >> 32) & 0xFFFFFFFF, int(v) & 0xFFFFFFFF)],
                     dtype=np.int64)
        lo, hi = np.empty_like(a), np.empty_like(a)
        self.mpi.Allreduce(a, lo, op=MPI.MIN)
        self.mpi.Allreduce(a, hi, op=MPI.MAX)
        return bool(np.array_equal(lo, hi))

    def all_ok(self, ok: bool) -> bool:
        """Logical AND of ``ok`` over ranks."""
        MPI = _mpi()
        return bool(self.mpi.allreduce(int(bool(ok)), op=MPI.MIN))

    def raise_together(self, err: BaseException | None) -> None:
        """Collective: if ``err`` is set on any rank, raise on every rank.

        Every rank raises the first failing rank's error, as ``TypeError`` if that was one and
        else ``ValueError``, with the message ``"rank R: <message>"``. One allreduce when no rank
        failed (plus one allgather of the messages when one did).
        """
        if self.all_ok(err is None):
            return
        mine = None if err is None else (type(err).__name__, str(err))
        r, (kind, msg) = next((r, m) for r, m in enumerate(self.mpi.allgather(mine)) if m is not None)
        raise (TypeError if kind == "TypeError" else ValueError)(f"rank {r}: {msg}") from err

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (NCCL communicators first, then ``MPI_Abort``)."""
        for c in self._nccl.values():
            with contextlib.suppress(Exception):
                c.abort()
        self.mpi.Abort(code)

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

    # -- the two exchanges everything is built on (counts and displacements in elements)
    def alltoallv(self, send: View, counts: Sequence[int], displs: Sequence[int],
                  recv: View, rcounts: Sequence[int], rdispls: Sequence[int], stream: int = 0) -> None:
        """Send ``counts[r]`` elements at ``displs[r]`` of ``send`` to rank r; receive
        ``rcounts[r]`` elements from rank r at ``rdispls[r]`` of ``recv``. Same dtype both sides."""
        isz = send.itemsize
        self.bytes_sent += isz * (sum(counts) - counts[self.rank])
        self.bytes_received += isz * (sum(rcounts) - rcounts[self.rank])
        if send.device == "cuda" and self.cuda == "nccl":
            from cupy.cuda import nccl
            c = self._nccl_comm(send.device_id)
            nccl.groupStart()
            for peer in range(self.size):
                if peer == self.rank:
                    continue
                if counts[peer]:
                    c.send(send.ptr + displs[peer] * isz, counts[peer] * isz, nccl.NCCL_UINT8, peer, stream)
                if rcounts[peer]:
                    c.recv(recv.ptr + rdispls[peer] * isz, rcounts[peer] * isz, nccl.NCCL_UINT8, peer, stream)
            nccl.groupEnd()
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
            from cupy.cuda import nccl
            c = self._nccl_comm(out.device_id)
            nccl.groupStart()
            for peer in range(self.size):
                if peer == self.rank:
                    continue
                if mine:
                    c.send(shard.ptr, mine * isz, nccl.NCCL_UINT8, peer, stream)
                if counts[peer]:
                    c.recv(out.ptr + displs[peer] * isz, counts[peer] * isz, nccl.NCCL_UINT8, peer, stream)
            nccl.groupEnd()
            if not in_place:
                self._device_copy(out, displs[self.rank], shard, 0, mine, stream)
            return
        MPI = _mpi()
        self._sync(out, stream)
        t = _mpi_type(isz)
        sendbuf = MPI.IN_PLACE if in_place else [_mpi_buf(shard), mine, t]
        self.mpi.Allgatherv(sendbuf, [_mpi_buf(out), (list(counts), list(displs)), t])

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


def _mpi_type(itemsize: int):
    MPI = _mpi()
    return {1: MPI.UINT8_T, 2: MPI.UINT16_T, 4: MPI.UINT32_T, 8: MPI.UINT64_T}[itemsize]


def _mpi_buf(v: View):
    return _mpi().buffer.fromaddress(v.ptr, v.nbytes) if v.nbytes else _mpi().buffer.fromaddress(0, 0)


@contextlib.contextmanager
def abort_on_error(comm: "Communicator | Any" = None) -> Iterator[None]:
    """Run the body; if it raises on any rank, print the error with the rank and abort the job.

    Without this, an exception on one rank leaves the others blocked in their next collective.
    ``MPI_Abort`` makes the launcher (mpirun) kill every rank and exit non-zero at once.
    """
    try:
        yield
    except BaseException as e:  # SystemExit(0) and KeyboardInterrupt abort too: the job is over
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        c = comm if isinstance(comm, Communicator) else None
        mpi = c.mpi if c else (comm if comm is not None else _mpi().COMM_WORLD)
        rank = mpi.Get_rank()
        sys.stdout.flush()
        sys.stderr.write(f"srkern.dist: rank {rank} of {mpi.Get_size()} raised "
                         f"{type(e).__name__}: {e}; aborting all ranks\n")
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        if c is not None:
            c.abort(1)  # NCCL communicators first, then MPI_Abort
        else:
            mpi.Abort(1)


# ---- reduce-scatter and all-gather ---------------------------------------------------------------

def _check_out(out: Any, name: str, dtype: str, n: int, ref: View) -> View:
    ov = as_view(out, name)
    if ov.framework == "jax" or ov.readonly:
        raise ValueError(f"{name} is read-only (JAX arrays are immutable)")
    if ov.dtype != dtype:
        raise TypeError(f"{name} has dtype {ov.dtype}, expected {dtype}")
    if ov.numel != n:
        raise ValueError(f"{name} has {ov.numel} elements, expected {n}")
    if (ov.device, ov.device_id) != (ref.device, ref.device_id):
        raise ValueError(f"{name} is on {ov.device}:{ov.device_id}, input on {ref.device}:{ref.device_id}")
    if not ov.contiguous:
        raise ValueError(f"{name} must be contiguous and aligned to its element size (it is written in place)")
    return ov


def reduce_scatter(x: Any, comm: Communicator, *, op: str = "avg", out: Any = None,
                   out_dtype: str = "bfloat16", rounding: str = "stochastic", seed: int | None = None,
                   step: int = 0, stream: int = COLLECTIVE_STREAM, wire_dtype: str | None = None) -> Any:
    """Sum (or average) ``x`` over ranks and return this rank's shard, rounded once.

    Args:
        x: this rank's full vector (any shape, read in C order), FP32 or BF16, on CPU or CUDA;
            the same number of elements on every rank.
        comm: the :class:`Communicator`.
        op: ``"avg"`` or ``"sum"``; the sum runs in FP32 in rank order 0..world-1, then
            ``"avg"`` divides by ``world`` (correctly rounded FP32 division).
        out: optional contiguous tensor of ``out_dtype`` with the shard's length.
        out_dtype: ``"bfloat16"`` (rounded by ``rounding``) or ``"float32"`` (unrounded).
        rounding: ``"stochastic"`` (contract v1; index = position in the full vector) or ``"nearest"``.
        seed: 64-bit Philox key, the same on every rank (required when any SR happens).
        step: 32-bit counter word (the training step); stream: 32-bit stream id.
        wire_dtype: ``None`` (x's dtype) or ``"bfloat16"`` for FP32 ``x``: SR to BF16 before
            sending (stream ``WIRE_STREAM``, index ``rank * n + i``), half the bytes.

    Returns:
        The shard ``[start, stop) = shard_range(n, world, rank)``, in ``x``'s framework.
        All ranks must call it with the same arguments (checked: a mismatch raises everywhere,
        and so does a bad argument on any one rank).
    """
    err: Exception | None = None
    try:  # local checks first; every rank then learns whether any rank failed, before any exchange
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if out_dtype not in _WIRE_DTYPES:
            raise ValueError(f"out_dtype must be 'bfloat16' or 'float32', got {out_dtype!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        xv = as_view(x, "x")
        if xv.dtype not in _WIRE_DTYPES:
            raise TypeError(f"x must be float32 or bfloat16, got {xv.dtype}")
        wire = xv.dtype if wire_dtype is None else str(wire_dtype)
        if wire not in _WIRE_DTYPES or (xv.dtype == "bfloat16" and wire != "bfloat16"):
            raise ValueError(f"wire_dtype must be None or 'bfloat16' (for float32 x), got {wire_dtype!r}")
        needs_seed = (out_dtype == "bfloat16" and rounding == "stochastic") or wire != xv.dtype
        if needs_seed and seed is None:
            raise ValueError("seed is required for stochastic rounding and must be the same on every rank")
        seed = _contract.check_u64("seed", seed or 0)
        step = _contract.check_u64("step", step, _contract.U32)
        stream = _contract.check_u64("stream", stream, _contract.U32)
        n = xv.numel
        start, stop = shard_range(n, comm.size, comm.rank)
        outv = _check_out(out, "out", out_dtype, stop - start, xv) if out is not None else None
    except (ValueError, TypeError) as e:
        err = e
    comm.raise_together(err)
    codes = [n, _WIRE_DTYPES.index(xv.dtype), OPS.index(op), _WIRE_DTYPES.index(out_dtype),
             ROUNDINGS.index(rounding), _WIRE_DTYPES.index(wire), seed, step, stream]
    if not comm.all_agree(codes):
        raise ValueError("reduce_scatter called with different arguments on different ranks "
                         "(length, dtype, op, out_dtype, rounding, wire_dtype, seed, step or stream)")
    if not xv.contiguous:
        xv = as_view(contiguous(x, xv.framework), "x")
    result = out if out is not None else empty_like(xv, out_dtype, (stop - start,))
    if outv is None:
        outv = as_view(result, "out")
    _reduce_scatter(xv, outv, comm, op=op, rounding=rounding, seed=seed, step=step, stream=stream,
                    wire=wire)
    return out if out is not None else finish(result, xv)


def _reduce_scatter(xv: View, outv: View, comm: Communicator, *, op: str, rounding: str, seed: int,
                    step: int, stream: int, wire: str) -> None:
    """reduce_scatter on validated views (no checks, no cross-rank agreement test)."""
    from .cast import cast
    n, world, rank = xv.numel, comm.size, comm.rank
    bounds = [shard_range(n, world, r) for r in range(world)]
    start, stop = bounds[rank]
    m = stop - start
    cs = stream_of(xv)
    if wire != xv.dtype:  # FP32 -> BF16 on the wire, each rank with its own indices
        tmp = empty_like(xv, wire, (n,))
        if n:
            cast(xv.obj.reshape(-1) if xv.shape != (n,) else xv.obj, wire, seed=seed, offset=rank * n,
                 step=step, stream=WIRE_STREAM, out=tmp, cuda_stream=cs)
        xv = as_view(tmp, "wire")
    recv = empty_like(xv, wire, (world * m,))
    rv = as_view(recv, "recv")
    comm.alltoallv(xv, [b - a for a, b in bounds], [a for a, _ in bounds],
                   rv, [m] * world, [r * m for r in range(world)], stream=cs)
    div = float(world) if op == "avg" else 1.0
    base = [("p", rv.ptr), ("q", m), ("i", world), ("f", div), ("p", outv.ptr), ("q", m)]
    if outv.dtype == "float32":
        _backend.launch("dist", f"dist_reduce_{_KSUFFIX[wire]}_f32", base, device=xv.device,
                        device_id=xv.device_id, units=m, stream=cs)
    else:
        kernel = f"dist_reduce_{_KSUFFIX[wire]}_bf16_{'sr' if rounding == 'stochastic' else 'rn'}"
        _backend.launch("dist", kernel, base + [("Q", start), ("Q", seed), ("Q", step), ("I", stream)],
                        device=xv.device, device_id=xv.device_id, units=-(-m // 8) + 2, stream=cs)


def all_gather(shard: Any, comm: Communicator, *, n: int | None = None, out: Any = None) -> Any:
    """Concatenate every rank's shard (laid out by :func:`shard_range`) into the full vector.

    Args:
        shard: this rank's contiguous shard, any dtype; its length must be
            ``len(shard_range(n, world, rank))``. It may be ``out``'s own slice (in place).
        n: the full length (taken from ``out`` if given, else summed over ranks).
        out: optional contiguous 1-D tensor of ``n`` elements and ``shard``'s dtype.

    Returns ``out`` or a new 1-D tensor in ``shard``'s framework. Collective; a bad argument
    on any rank raises on every rank.
    """
    err: Exception | None = None
    try:  # local checks first; every rank then learns whether any rank failed, before any exchange
        sv = as_view(shard, "shard")
        if not sv.contiguous:
            sv = as_view(contiguous(shard, sv.framework), "shard")
        ov = None
        if out is not None:
            n = as_view(out, "out").numel
            ov = _check_out(out, "out", sv.dtype, n, sv)
        if n is not None:
            n = _contract.check_u64("n", n)
    except (ValueError, TypeError) as e:
        err = e
    comm.raise_together(err)
    if n is None:
        n = int(comm.mpi.allreduce(sv.numel))
    start, stop = shard_range(n, comm.size, comm.rank)
    ok = sv.numel == stop - start
    if not comm.all_agree([n, sv.itemsize]) or not comm.all_ok(ok):
        raise ValueError(f"all_gather: shard lengths or dtypes do not match the layout of n={n} "
                         f"over {comm.size} ranks (rank {comm.rank}: {sv.numel}, expected {stop - start})")
    result = out if out is not None else empty_like(sv, sv.dtype, (n,))
    if ov is None:
        ov = as_view(result, "out")
    _all_gather(sv, ov, comm)
    return out if out is not None else finish(result, sv)


def _all_gather(sv: View, ov: View, comm: Communicator) -> None:
    bounds = [shard_range(ov.numel, comm.size, r) for r in range(comm.size)]
    comm.allgatherv(sv, ov, [b - a for a, b in bounds], [a for a, _ in bounds], stream=stream_of(ov))


# ---- sharded AdamW: the framework-neutral core ---------------------------------------------------

PRECISIONS = tuple(_ADAMW_PRECISIONS)  # the modes of srkern.adamw_step
CHECKPOINT_FORMAT = "srkern.ShardedAdamW"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not match the model; nothing was loaded."""


def param_dtype(precision: str) -> str:
    """dtype of the flat parameter buffer in ``precision``: FP32 for "fp32", else BF16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return _ADAMW_PRECISIONS[precision].param_dtype


def _zeros(like: View, dtype: str, n: int) -> Any:
    z = empty_like(like, dtype, (n,))
    if like.framework == "torch":
        z.zero_()
    elif like.device == "cuda":
        z.fill(0)
    else:
        z[...] = 0
    return z


def _host_bytes(x: Any) -> bytes:
    """The raw bytes of a contiguous tensor (copied to the host)."""
    v = as_view(x, "x")
    if v.nbytes == 0:
        return b""
    if v.device == "cuda":
        import cupy
        with cupy.cuda.Device(v.device_id):
            cupy.cuda.Device(v.device_id).synchronize()
            host = np.empty(v.nbytes, dtype=np.uint8)
            cupy.cuda.runtime.memcpy(host.ctypes.data, v.ptr, v.nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
        return host.tobytes()
    return ctypes.string_at(v.ptr, v.nbytes)


def _write_host_bytes(x: Any, data: bytes | memoryview) -> None:
    """Overwrite a contiguous tensor with raw bytes of exactly its size."""
    v = as_view(x, "x")
    if len(data) != v.nbytes:
        raise ValueError(f"expected {v.nbytes} bytes, got {len(data)}")
    if v.nbytes == 0:
        return
    src = np.frombuffer(data, dtype=np.uint8)
    if v.device == "cuda":
        import cupy
        with cupy.cuda.Device(v.device_id):
            cupy.cuda.Device(v.device_id).synchronize()
            cupy.cuda.runtime.memcpy(v.ptr, src.ctypes.data, v.nbytes, cupy.cuda.runtime.memcpyHostToDevice)
    else:
        ctypes.memmove(v.ptr, src.ctypes.data, v.nbytes)


def _check_hyper(h: dict, grad_scale: Any = 1.0) -> None:
    """One group's hyper-parameters (and ``grad_scale``): srkern.adamw's check, finite in FP32."""
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in h]
    if missing:
        raise ValueError(f"hyper-parameters {missing} missing")
    check_hyperparameters(h["lr"], h["betas"], h["eps"], h["weight_decay"], grad_scale)


@dataclass
class GroupRange:
    """A parameter group's slice [start, stop) of the flat vector."""
    start: int
    stop: int


class ShardedAdamWCore:
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
            the same on every rank (rank 0's values are broadcast at construction).
        comm: :class:`Communicator`.
        precision: one of ``PRECISIONS`` (see ``srkern.adamw_step``).
        groups: ``[(start, stop), ...]`` flat slices with their own hyper-parameters, in order,
            covering ``[0, n)``; default one group.
        state_dtype: dtype of the moments in the BF16 modes (``"bfloat16"`` default or
            ``"float32"``); FP32 in ``"fp32-master"`` and ``"fp32"``.
        seed: 64-bit seed shared by all ranks (``None``: rank 0 draws one and broadcasts it).
        grad_dtype: dtype of ``flat_grads`` (default: the parameters' dtype).
        reduce_dtype: dtype of the reduced gradient shard: ``"bfloat16"`` (SR) or ``"float32"``
            (unrounded; default for ``"fp32"``).
        wire_dtype: ``None`` or ``"bfloat16"`` to send FP32 gradients as SR-rounded BF16.
        op: ``"avg"`` (default) or ``"sum"`` over ranks.
    """

    def __init__(self, flat_params: Any, comm: Communicator, *, precision: str = "bf16-sr",
                 groups: Sequence[tuple[int, int]] | None = None, state_dtype: str | None = None,
                 seed: int | None = None, grad_dtype: str | None = None, reduce_dtype: str | None = None,
                 wire_dtype: str | None = None, op: str = "avg") -> None:
        err: Exception | None = None
        try:  # local checks first; every rank then learns whether any rank failed
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
            if op not in OPS:
                raise ValueError(f"op must be one of {OPS}, got {op!r}")
            pv = as_view(flat_params, "flat_params")
            if pv.dtype != param_dtype(precision) or len(pv.shape) != 1 or not pv.contiguous:
                raise ValueError(f"flat_params must be a contiguous 1-D {param_dtype(precision)} tensor "
                                 f"for precision {precision!r}, got {pv.dtype} of shape {pv.shape}")
            state_dtype = state_dtype or default_state_dtype(precision)
            bytes_per_param(precision, state_dtype)  # raises if the mode does not allow state_dtype
            grad_dtype = grad_dtype or pv.dtype
            reduce_dtype = reduce_dtype or ("float32" if precision == "fp32" else "bfloat16")
            if grad_dtype not in _WIRE_DTYPES or reduce_dtype not in _WIRE_DTYPES:
                raise ValueError("grad_dtype and reduce_dtype must be 'bfloat16' or 'float32'")
            if wire_dtype not in (None, grad_dtype, "bfloat16"):
                raise ValueError(f"wire_dtype must be None or 'bfloat16', got {wire_dtype!r}")
            n = pv.numel
            groups = [(0, n)] if groups is None else [(int(a), int(b)) for a, b in groups]
            if groups and (groups[0][0] != 0 or groups[-1][1] != n
                           or any(a > b for a, b in groups)
                           or any(groups[i][1] != groups[i + 1][0] for i in range(len(groups) - 1))):
                raise ValueError(f"groups must be consecutive flat slices covering [0, {n}), got {groups}")
        except (ValueError, TypeError) as e:
            err = e
        comm.raise_together(err)
        self.comm, self.precision, self.op = comm, precision, op
        self.n = n
        self.state_dtype, self.grad_dtype, self.reduce_dtype = state_dtype, grad_dtype, reduce_dtype
        self.wire_dtype = wire_dtype or grad_dtype
        self.groups = [GroupRange(a, b) for a, b in groups]
        dts = list(_WIRE_DTYPES)
        if not comm.all_agree([n, PRECISIONS.index(precision), len(groups), OPS.index(op),
                               dts.index(state_dtype), dts.index(grad_dtype), dts.index(reduce_dtype),
                               dts.index(self.wire_dtype)]):
            raise ValueError("ShardedAdamW built with different sizes or settings on different ranks")
        seed = _contract.resolve_seed(seed) if comm.rank == 0 else 0
        self.seed = comm.bcast_int(seed)
        self.step_count = 0
        self.flat_params = flat_params
        self.start, self.stop = shard_range(n, comm.size, comm.rank)
        m = self.stop - self.start
        self.flat_grads = _zeros(pv, grad_dtype, n)
        self.grad_shard = _zeros(pv, reduce_dtype, m)
        self.exp_avg = _zeros(pv, state_dtype, m)
        self.exp_avg_sq = _zeros(pv, state_dtype, m)
        self.master = _zeros(pv, "float32", m) if precision == "fp32-master" else None
        self.compensation = _zeros(pv, "bfloat16", m) if precision == "bf16-kahan" else None
        # One set of weights for all: rank 0's.
        self._bcast_params()
        if self.master is not None:  # FP32 master weights start as the exact upcast of the model
            from .cast import cast
            if m:
                cast(self.param_shard, "float32", out=self.master)

    # -- views
    @property
    def param_shard(self) -> Any:
        return self.flat_params[self.start:self.stop]

    def _bcast_params(self) -> None:
        v = as_view(self.flat_params, "flat_params")
        if v.device == "cuda" and self.comm.cuda == "nccl":
            data = _host_bytes(self.flat_params)  # once, at construction or load: not a hot path
            data = self.comm.mpi.bcast(data, root=0)
            _write_host_bytes(self.flat_params, data)
            return
        self.comm._sync(v, stream_of(v))
        self.comm.mpi.Bcast([_mpi_buf(v), v.nbytes, _mpi().BYTE], root=0)

    def state_sections(self) -> list[tuple[str, Any]]:
        """(name, shard tensor) of everything this rank owns, in checkpoint order."""
        out = [("param", self.param_shard), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)]
        if self.master is not None:
            out.append(("master", self.master))
        if self.compensation is not None:
            out.append(("compensation", self.compensation))
        return out

    def optimizer_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state on this rank (moments, master, compensation, reduced-gradient shard)."""
        sizes = {name: as_view(t, name).nbytes for name, t in self.state_sections() if name != "param"}
        sizes["grad_shard"] = as_view(self.grad_shard, "grad_shard").nbytes
        return sizes

    # -- the step
    def step(self, hypers: Sequence[dict], *, grad_scale: float = 1.0) -> None:
        """One optimizer step: reduce-scatter ``flat_grads``, AdamW on the shard, all-gather weights.

        ``hypers[i]`` holds group i's ``lr``, ``betas``, ``eps``, ``weight_decay``. Collective.
        """
        from . import adamw_step
        # On every rank, before any exchange: a rank with an empty shard never calls adamw_step,
        # so it would not notice bad values and would wait for the others forever.
        err: Exception | None = None
        try:
            if len(hypers) != len(self.groups):
                raise ValueError(f"hypers: expected {len(self.groups)} groups, got {len(hypers)}")
            for h in hypers:
                _check_hyper(h, grad_scale)
        except (ValueError, TypeError) as e:
            err = e
        self.comm.raise_together(err)
        t = self.step_count + 1
        gv = as_view(self.flat_grads, "flat_grads")
        _reduce_scatter(gv, as_view(self.grad_shard, "grad_shard"), self.comm, op=self.op,
                        rounding="stochastic", seed=self.seed, step=t, stream=COLLECTIVE_STREAM,
                        wire=self.wire_dtype)
        s = self.start
        for g, h in zip(self.groups, hypers):
            a, b = max(g.start, s), min(g.stop, self.stop)
            if a >= b:
                continue
            sl = slice(a - s, b - s)
            adamw_step([self.flat_params[a:b]], [self.grad_shard[sl]], [self.exp_avg[sl]],
                       [self.exp_avg_sq[sl]], step=t, lr=h["lr"], betas=tuple(h["betas"]),
                       eps=h["eps"], weight_decay=h["weight_decay"], precision=self.precision,
                       master_params=None if self.master is None else [self.master[sl]],
                       compensation=None if self.compensation is None else [self.compensation[sl]],
                       grad_scale=grad_scale, seed=self.seed, offsets=[a])
        pv = as_view(self.flat_params, "flat_params")
        _all_gather(as_view(self.param_shard, "param_shard"), pv, self.comm)
        self.step_count = t

    # -- checkpoints
    def save(self, path: str | os.PathLike, layout: Any = None, extra: dict | None = None) -> None:
        """Write the sharded state to folder ``path`` (collective).

        One raw ``.bin`` per rank (sections ``param, exp_avg, exp_avg_sq[, master][, compensation]``
        of its shard, little-endian, back to back) and ``manifest.json`` (world size, step, seed,
        precision, dtypes, ``layout``, ``extra`` and per shard its range, size and SHA-256). Every
        file is written atomically; the manifest goes last, so the folder switches from the old
        checkpoint to the new one in one rename; older shard files are removed afterwards.
        """
        comm = self.comm
        folder = Path(path)
        name = f"step-{self.step_count:010d}-rank-{comm.rank:05d}-of-{comm.size:05d}.bin"
        err = ""
        if comm.rank == 0:  # every rank takes part in the bcast, whether or not the mkdir worked
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except Exception as e:
                err = f"rank 0: {type(e).__name__}: {e}"
        err = comm.mpi.bcast(err, root=0)  # also: nobody writes before the folder exists
        if err:
            raise CheckpointError(f"saving checkpoint to {folder} failed: {err}")
        info = None
        try:
            data = b"".join(_host_bytes(t) for _, t in self.state_sections())
            atomic_write(folder / name, data)
            info = {"rank": comm.rank, "start": self.start, "stop": self.stop, "file": name,
                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        except Exception as e:  # reported on every rank below
            err = f"rank {comm.rank}: {type(e).__name__}: {e}"
        infos = comm.mpi.gather((info, err), root=0)
        if comm.rank == 0:
            errs = [e for _, e in infos if e]
            if not errs:
                try:
                    manifest = self._manifest([i for i, _ in infos], layout, extra)
                    atomic_write(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
                    keep = {i["file"] for i, _ in infos}
                    for old in folder.glob("step-*-rank-*-of-*.bin"):
                        if old.name not in keep:
                            old.unlink()
                except Exception as e:
                    errs.append(f"rank 0: {type(e).__name__}: {e}")
            err = "; ".join(errs)
        err = comm.mpi.bcast(err, root=0)
        if err:
            raise CheckpointError(f"saving checkpoint to {folder} failed: {err}")

    def _manifest(self, shards: list[dict], layout: Any, extra: dict | None) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "contract_version": _contract.CONTRACT_VERSION,
            "world_size": self.comm.size, "step": self.step_count, "seed": self.seed,
            "precision": self.precision, "n": self.n,
            "groups": [[g.start, g.stop] for g in self.groups],
            "sections": [{"name": nm, "dtype": as_view(t, nm).dtype} for nm, t in self.state_sections()],
            "layout": layout, "extra": extra or {}, "shards": shards,
        }

    def load(self, path: str | os.PathLike, layout: Any = None) -> dict:
        """Load a checkpoint written by :meth:`save` on any world size (collective); re-shards.

        Everything is checked first on every rank (manifest fields against this model,
        presence, size and SHA-256 of every shard file); on any problem every rank raises
        :class:`CheckpointError` and no buffer is changed. Returns the manifest.
        """
        comm = self.comm
        folder = Path(path)
        text, err = None, ""
        if comm.rank == 0:
            try:
                text = (folder / "manifest.json").read_text()
            except OSError as e:
                err = f"cannot read {folder / 'manifest.json'}: {e}"
        text, err = comm.mpi.bcast((text, err), root=0)
        if err:
            raise CheckpointError(err)
        try:
            man = json.loads(text)
            self._check_manifest(man, layout)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / 'manifest.json'}: {e}") from None
        # Read and verify: the files overlapping this rank's new shard, plus every world-th file,
        # so that each file is verified by some rank before anyone loads anything.
        sec = [(s["name"], NP_DTYPES[s["dtype"]].itemsize) for s in man["sections"]]
        per_elem = sum(sz for _, sz in sec)
        blobs: dict[int, bytes] = {}
        err = ""
        for k, sh in enumerate(man["shards"]):
            overlaps = sh["start"] < self.stop and self.start < sh["stop"]
            if not (overlaps or k % comm.size == comm.rank):
                continue
            f = folder / sh["file"]
            try:
                data = f.read_bytes()
            except OSError as e:
                err = err or f"shard {k}: cannot read {f}: {e}"
                continue
            want = (sh["stop"] - sh["start"]) * per_elem
            if len(data) != want or sh["bytes"] != want:
                err = err or f"shard {k}: {f} has {len(data)} bytes, expected {want} (truncated?)"
            elif hashlib.sha256(data).hexdigest() != sh["sha256"]:
                err = err or f"shard {k}: {f} fails its SHA-256 check (corrupted)"
            elif overlaps:
                blobs[k] = data
        errs = [e for e in comm.mpi.allgather(err) if e]
        if errs:
            raise CheckpointError(f"checkpoint {folder} refused, nothing loaded: {errs[0]}")
        # All verified everywhere: now copy the overlapping ranges into this rank's state.
        mine = dict(self.state_sections())
        for k, data in blobs.items():
            sh = man["shards"][k]
            cnt = sh["stop"] - sh["start"]
            a, b = max(sh["start"], self.start), min(sh["stop"], self.stop)
            pos = 0
            for name, sz in sec:
                lo = pos + (a - sh["start"]) * sz
                _write_host_bytes(mine[name][a - self.start:b - self.start], memoryview(data)[lo:lo + (b - a) * sz])
                pos += cnt * sz
        pv = as_view(self.flat_params, "flat_params")
        _all_gather(as_view(self.param_shard, "param_shard"), pv, self.comm)
        self.step_count = int(man["step"])
        self.seed = int(man["seed"])
        return man

    def _check_manifest(self, man: dict, layout: Any) -> None:
        if man.get("format") != CHECKPOINT_FORMAT or man.get("format_version") != CHECKPOINT_VERSION:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} manifest "
                             f"(format {man.get('format')!r}, version {man.get('format_version')!r})")
        if not _contract.contract_compatible(man["contract_version"]):  # any 1.x loads under 1.1
            raise ValueError(f"written under bit contract v{man['contract_version']}, "
                             f"this srkern uses v{_contract.CONTRACT_VERSION}")
        if man["n"] != self.n:
            raise ValueError(f"holds {man['n']} parameters, the model has {self.n}")
        if man["precision"] != self.precision:
            raise ValueError(f"precision {man['precision']!r}, the optimizer uses {self.precision!r}")
        want = [{"name": nm, "dtype": as_view(t, nm).dtype} for nm, t in self.state_sections()]
        if man["sections"] != want:
            raise ValueError(f"state sections {man['sections']}, the optimizer has {want}")
        if man["groups"] != [[g.start, g.stop] for g in self.groups]:
            raise ValueError(f"parameter groups {man['groups']} differ from the optimizer's")
        if layout is not None and man["layout"] != layout:
            raise ValueError("the parameter layout (names, shapes, offsets) differs from the model's")
        w = int(man["world_size"])
        shards = man["shards"]
        for sh in shards:
            if not (isinstance(sh.get("file"), str) and Path(sh["file"]).name == sh["file"]
                    and isinstance(sh.get("bytes"), int) and isinstance(sh.get("sha256"), str)):
                raise ValueError(f"bad shard entry {sh!r}")
        if len(shards) != w or [(s["start"], s["stop"]) for s in shards] != \
                [shard_range(self.n, w, r) for r in range(w)]:
            raise ValueError(f"shard table does not tile {self.n} elements over {w} ranks")
        _contract.check_u64("seed", man["seed"])
        _contract.check_u64("step", man["step"], _contract.U32)


# ---- sharded AdamW: the PyTorch optimizer --------------------------------------------------------

def _make_torch_class():
    import torch

    class ShardedAdamW(torch.optim.Optimizer):
        """ZeRO-style sharded srkern AdamW for PyTorch (see :class:`ShardedAdamWCore`).

        The parameters become views into one flat buffer (BF16; FP32 for ``precision="fp32"``),
        laid out in parameter-group order, each tensor at the offset equal to the number of
        elements before it: no padding, so flat index = the logical index ``srkern.torch.AdamW``
        uses in one process. Each rank keeps the optimizer state of its shard only.

        Args:
            params: parameters or parameter groups (all on one device, dtype as above).
            comm: :class:`Communicator`, or an mpi4py communicator to wrap (default ``MPI.COMM_WORLD``).
            lr, betas, eps, weight_decay: AdamW hyper-parameters (per group where given).
            precision: one of ``PRECISIONS``.
            state_dtype, seed, reduce_dtype, wire_dtype, op: as in :class:`ShardedAdamWCore`.

        ``step()`` is collective: every rank must call it. Use :meth:`save` / :meth:`load` for
        checkpoints (``state_dict`` would hold only this rank's shard).
        """

        def __init__(self, params, comm: Communicator | None = None, lr: float = 1e-3,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 0.01, precision: str = "bf16-sr", *,
                     state_dtype: str | None = None, seed: int | None = None,
                     reduce_dtype: str | None = None, wire_dtype: str | None = None,
                     op: str = "avg") -> None:
            defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
            _check_hyper(defaults)
            super().__init__(params, defaults)
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
            comm = comm if isinstance(comm, Communicator) else Communicator(comm)
            want = getattr(torch, param_dtype(precision))
            plist = [p for g in self.param_groups for p in g["params"]]
            if not plist:
                raise ValueError("ShardedAdamW got no parameters")
            dev = plist[0].device
            for i, p in enumerate(plist):
                if p.dtype != want:
                    raise TypeError(f"parameter {i} has dtype {p.dtype}; precision {precision!r} "
                                    f"needs {want} parameters")
                if p.device != dev:
                    raise ValueError(f"parameter {i} is on {p.device}, parameter 0 on {dev}")
            if len({id(p) for p in plist}) != len(plist):
                raise ValueError("a parameter appears twice")
            self._params = plist
            self._offsets, off = [], 0
            groups = []
            for g in self.param_groups:
                g0 = off
                for p in g["params"]:
                    self._offsets.append(off)
                    off += p.numel()
                groups.append((g0, off))
            flat = torch.empty(off, dtype=want, device=dev)
            with torch.no_grad():
                for p, o in zip(plist, self._offsets):
                    flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = flat[o:o + p.numel()].view(p.shape)
            self._layout = [{"shape": list(p.shape), "offset": o} for p, o in zip(plist, self._offsets)]
            self.core = ShardedAdamWCore(flat, comm, precision=precision, groups=groups,
                                         state_dtype=state_dtype, seed=seed, reduce_dtype=reduce_dtype,
                                         wire_dtype=wire_dtype, op=op)

        @property
        def flat_params(self):
            return self.core.flat_params

        @torch.no_grad()
        def step(self, closure=None):
            """Reduce-scatter the gradients, SR AdamW on this rank's shard, all-gather the weights."""
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            fg = self.core.flat_grads
            for i, (p, o) in enumerate(zip(self._params, self._offsets)):
                if p.grad is None:
                    raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) has no gradient; "
                                     "every rank must supply a gradient for every parameter")
            for p, o in zip(self._params, self._offsets):
                fg[o:o + p.numel()].copy_(p.grad.reshape(-1))
            self.core.step([{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")}
                            for g in self.param_groups])
            return loss

        def optimizer_bytes(self) -> dict[str, int]:
            """Optimizer-state bytes on this rank (see :meth:`ShardedAdamWCore.optimizer_bytes`)."""
            return self.core.optimizer_bytes()

        def bytes_per_param(self) -> float:
            """Optimizer-state bytes this rank holds per model parameter (shrinks as 1 / world)."""
            return sum(self.core.optimizer_bytes().values()) / max(1, self.core.n)

        def save(self, path) -> None:
            """Collective checkpoint of the sharded state (see :meth:`ShardedAdamWCore.save`)."""
            hyper = [{k: (list(g[k]) if k == "betas" else g[k]) for k in ("lr", "betas", "eps", "weight_decay")}
                     for g in self.param_groups]
            self.core.save(path, layout=self._layout, extra={"hyper": hyper})

        def load(self, path) -> None:
            """Collective load on any world size (re-shards); restores step, seed and hyper-parameters."""
            man = self.core.load(path, layout=self._layout)
            for g, h in zip(self.param_groups, man["extra"].get("hyper", [])):
                g.update({k: (tuple(v) if k == "betas" else v) for k, v in h.items()})

        def state_dict(self):  # noqa: D102
            raise NotImplementedError("ShardedAdamW state is sharded across ranks: use save(path) / load(path)")

        def load_state_dict(self, state_dict):  # noqa: D102
            raise NotImplementedError("ShardedAdamW state is sharded across ranks: use save(path) / load(path)")

    ShardedAdamW.__module__, ShardedAdamW.__qualname__ = __name__, "ShardedAdamW"
    return ShardedAdamW


def __getattr__(name: str):
    # The PyTorch class is built on first use, so that srkern.dist imports without torch.
    if name == "ShardedAdamW":
        cls = _make_torch_class()
        globals()["ShardedAdamW"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
