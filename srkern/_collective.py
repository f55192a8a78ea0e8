"""The collectives on validated views: what ``srkern.dist`` runs after its argument checks and
what ``ShardedAdamWCore`` calls every step (no checks here, no cross-rank agreement test).

Reduce-scatter: each rank sends the part of its vector that belongs to rank ``r`` to rank ``r``
(one all-to-all), then one local kernel (``kernels/dist.cu``) sums the ``world`` received chunks
in FP32 in rank order and writes the shard once. All-gather: every rank's shard into the full
vector, with the shards laid out by ``srkern.layout.shard_range``.
"""
from __future__ import annotations

from . import _backend, _contract
from .formats import KERNEL_SUFFIX
from ._tensor import View, as_view, empty_like, stream_of
from .cast import cast
from .comm import Communicator
from .layout import shard_range

# Random-stream id of the SR cast of FP32 inputs to the BF16 wire format. It must differ from
# `collective` (the output rounding), else rank 0's wire draws would equal the output draws.
WIRE_STREAM = _contract.STREAMS["wire"]
COLLECTIVE_STREAM = _contract.STREAMS["collective"]

OPS = ("avg", "sum")
WIRE_DTYPES = ("float32", "bfloat16")


def reduce_scatter_views(xv: View, outv: View, comm: Communicator, *, op: str, rounding: str, seed: int,
                         step: int, stream: int, wire: str) -> None:
    """Sum ``xv`` over ranks into this rank's shard ``outv`` (see ``srkern.dist.reduce_scatter``)."""
    n, world, rank = xv.numel, comm.size, comm.rank
    bounds = [shard_range(n, world, r) for r in range(world)]
    start, stop = bounds[rank]
    m = stop - start
    cs = stream_of(xv)
    if wire != xv.dtype:  # FP32 (or FP16) -> BF16 with SR, each rank with its own indices; FP16 -> FP32 exact
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
    if outv.dtype == "float32":  # a unit is 16 bytes of each chunk (dist_f32_body): 4 FP32, 8 BF16
        _backend.launch("dist", f"dist_reduce_{KERNEL_SUFFIX[wire]}_f32", base, device=xv.device,
                        device_id=xv.device_id, units=-(-m // (4 if wire == "float32" else 8)), stream=cs)
    else:
        kernel = f"dist_reduce_{KERNEL_SUFFIX[wire]}_bf16_{'sr' if rounding == 'stochastic' else 'rn'}"
        _backend.launch("dist", kernel, base + [("Q", start), ("Q", seed), ("Q", step), ("I", stream)],
                        device=xv.device, device_id=xv.device_id, units=-(-m // 8) + 2, stream=cs)


def all_gather_views(sv: View, ov: View, comm: Communicator) -> None:
    """Every rank's shard ``sv`` into the full vector ``ov`` (``sv`` may be ``ov``'s own slice)."""
    bounds = [shard_range(ov.numel, comm.size, r) for r in range(comm.size)]
    comm.allgatherv(sv, ov, [b - a for a, b in bounds], [a for a, _ in bounds], stream=stream_of(ov))
