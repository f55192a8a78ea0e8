"""Distributed srkern: the SR reduce-scatter and the all-gather (``kernels/dist.cu``), and the
namespace of everything distributed.

Shard layout. A vector of ``n`` elements is split into ``world`` contiguous shards of
``ceil(ceil(n / world) / 8) * 8`` elements (a whole number of Philox blocks of 16-bit draws), the
last shards shorter or empty: ``shard_range(n, world, rank)`` (``srkern.layout``). No padding is
added to any buffer; shards are simply uneven. Element ``i`` of the vector is always logical
index ``i``.

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

Both collectives check their arguments on every rank before any exchange; a bad argument on
one rank, or arguments that differ between ranks, raise on every rank (``srkern.comm``).

Also here, from their own modules: :class:`Communicator` and :func:`abort_on_error`
(``srkern.comm``), :class:`ShardedAdamWCore`, :class:`ShardedSGDCore`, :class:`ShardedLionCore`
(``srkern.sharded``) and :class:`CheckpointError` (``srkern.checkpoint``). The PyTorch optimizers are
``srkern.torch.ShardedAdamW``, ``ShardedSGD`` and ``ShardedLion``.
"""
from __future__ import annotations

from typing import Any

from . import _contract
from .cast import ROUNDINGS
from ._collective import (COLLECTIVE_STREAM, OPS, WIRE_DTYPES, WIRE_STREAM, all_gather_views,
                          reduce_scatter_views)
from ._tensor import View, as_view, contiguous, empty_like, finish, mark_written, unwritable
from .checkpoint import CheckpointCorrupt, CheckpointError, CheckpointMismatch
from .comm import Communicator, abort_on_error, as_communicator
from .layout import SHARD_ALIGN, shard_range
from .sharded import ShardedAdamWCore, ShardedLionCore, ShardedSGDCore

__all__ = ["Communicator", "abort_on_error", "reduce_scatter", "all_gather", "shard_range",
           "SHARD_ALIGN", "ShardedAdamWCore", "ShardedSGDCore", "ShardedLionCore", "CheckpointError", "CheckpointCorrupt",
           "CheckpointMismatch", "OPS", "ROUNDINGS", "WIRE_STREAM", "COLLECTIVE_STREAM"]



def _check_out(out: Any, name: str, dtype: str, n: int, ref: View) -> View:
    ov = as_view(out, name)
    if ov.framework == "jax":
        raise ValueError(f"{name} is read-only (JAX arrays are immutable)")
    why = unwritable(ov)
    if why:
        raise ValueError(f"{name} {why}")
    if ov.dtype != dtype:
        raise TypeError(f"{name} has dtype {ov.dtype}, expected {dtype}")
    if ov.numel != n:
        raise ValueError(f"{name} has {ov.numel} elements, expected {n}")
    if (ov.device, ov.device_id) != (ref.device, ref.device_id):
        raise ValueError(f"{name} is on {ov.device}:{ov.device_id}, input on {ref.device}:{ref.device_id}")
    if not ov.contiguous:
        raise ValueError(f"{name} must be contiguous and aligned to its element size (it is written in place)")
    return ov


def reduce_scatter(x: Any, comm: Communicator | Any, *, op: str = "avg", out: Any = None,
                   out_dtype: str = "bfloat16", rounding: str = "stochastic", seed: int | None = None,
                   step: int = 0, stream: int = COLLECTIVE_STREAM, wire_dtype: str | None = None) -> Any:
    """Sum (or average) ``x`` over ranks and return this rank's shard, rounded once.

    Args:
        x: this rank's full vector (any shape, read in C order), FP32 or BF16, on CPU or CUDA;
            the same number of elements on every rank.
        comm: the :class:`Communicator` (an mpi4py communicator is wrapped in one).
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
    comm = as_communicator(comm)

    def check():
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if out_dtype not in WIRE_DTYPES:
            raise ValueError(f"out_dtype must be 'bfloat16' or 'float32', got {out_dtype!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        xv = as_view(x, "x")
        if xv.dtype not in WIRE_DTYPES:
            raise TypeError(f"x must be float32 or bfloat16, got {xv.dtype}")
        wire = xv.dtype if wire_dtype is None else str(wire_dtype)
        if wire not in WIRE_DTYPES or (xv.dtype == "bfloat16" and wire != "bfloat16"):
            raise ValueError(f"wire_dtype must be None or 'bfloat16' (for float32 x), got {wire_dtype!r}")
        needs_seed = (out_dtype == "bfloat16" and rounding == "stochastic") or wire != xv.dtype
        if needs_seed and seed is None:
            raise ValueError("seed is required for stochastic rounding and must be the same on every rank")
        s = _contract.check_u64("seed", seed or 0)
        t = _contract.check_u64("step", step, _contract.U32)
        st = _contract.check_u64("stream", stream, _contract.U32)
        n = xv.numel
        start, stop = shard_range(n, comm.size, comm.rank)
        outv = _check_out(out, "out", out_dtype, stop - start, xv) if out is not None else None
        codes = {"length": n, "dtype": xv.dtype, "op": str(op), "out_dtype": str(out_dtype),
                 "rounding": str(rounding), "wire_dtype": wire, "seed": s, "step": t, "stream": st}
        return (xv, outv, wire, s, t, st, stop - start), codes

    xv, outv, wire, seed_, step_, stream_, m = comm.check_args(
        check, "reduce_scatter called with different arguments on different ranks")
    if not xv.contiguous:
        xv = as_view(contiguous(x, xv.framework), "x")
    result = out if out is not None else empty_like(xv, out_dtype, (m,))
    if outv is None:
        outv = as_view(result, "out")
    reduce_scatter_views(xv, outv, comm, op=op, rounding=rounding, seed=seed_, step=step_,
                         stream=stream_, wire=wire)
    if out is None:
        return finish(result, xv)
    mark_written([outv])  # autograd's version counter, as after torch's own in-place ops
    return out


def all_gather(shard: Any, comm: Communicator | Any, *, n: int | None = None, out: Any = None) -> Any:
    """Concatenate every rank's shard (laid out by :func:`shard_range`) into the full vector.

    Args:
        shard: this rank's contiguous shard, any dtype; its length must be
            ``len(shard_range(n, world, rank))``. It may be ``out``'s own slice (in place).
        comm: the :class:`Communicator` (an mpi4py communicator is wrapped in one).
        n: the full length (taken from ``out`` if given, else summed over ranks).
        out: optional contiguous 1-D tensor of ``n`` elements and ``shard``'s dtype.

    Returns ``out`` or a new 1-D tensor in ``shard``'s framework. Collective; a bad argument
    on any rank raises on every rank.
    """
    comm = as_communicator(comm)

    def check():
        sv = as_view(shard, "shard")
        if not sv.contiguous:
            sv = as_view(contiguous(shard, sv.framework), "shard")
        size, ov = n, None
        if out is not None:
            size = as_view(out, "out").numel
            ov = _check_out(out, "out", sv.dtype, size, sv)
        if size is not None:
            size = _contract.check_u64("n", size)
        # Whether n is known must agree too: only then do all ranks take part in its allreduce.
        return (sv, ov, size), {"n given": size is not None, "n": size, "itemsize": sv.itemsize}

    sv, ov, size = comm.check_args(check, "all_gather called with different n or dtypes on different ranks")
    if size is None:
        size = int(comm.mpi.allreduce(sv.numel))
    start, stop = shard_range(size, comm.size, comm.rank)
    if not comm.all_ok(sv.numel == stop - start):
        raise ValueError(f"all_gather: shard lengths do not match the layout of n={size} over "
                         f"{comm.size} ranks (rank {comm.rank}: {sv.numel}, expected {stop - start})")
    result = out if out is not None else empty_like(sv, sv.dtype, (size,))
    if ov is None:
        ov = as_view(result, "out")
    all_gather_views(sv, ov, comm)
    if out is None:
        return finish(result, sv)
    mark_written([ov])
    return out
