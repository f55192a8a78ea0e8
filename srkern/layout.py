"""The flat layout: where each tensor of a model sits in the one logical vector of all its
parameters, and how that vector is split over ranks.

Element ``j`` of a tensor at flat offset ``o`` has logical index ``o + j``; contract v1 draws
its random bits from that index, so the layout is what makes a result independent of how
tensors are grouped into launches or sharded over ranks. The default layout packs the tensors
in order with no padding; every front end (``adamw_step``, ``srkern.torch.AdamW``,
``ShardedAdamW``, the NumPy oracle) uses these two functions.
"""
from __future__ import annotations

from typing import Sequence

from . import _contract

SHARD_ALIGN = 8
"""Shards are whole Philox blocks of 16-bit draws (8 elements): a block never straddles two
ranks, so each rank computes each of its blocks once."""


def flat_offsets(sizes: Sequence[int], offsets: Sequence[int] | None = None) -> list[int]:
    """Logical flat offset of each tensor: ``offsets`` checked, or the cumulative ``sizes``.

    Given offsets must be one integer in [0, 2**64) per tensor with every tensor's range inside
    the index space, and no two tensors' ranges may overlap (they would share random bits);
    anything else is a ``ValueError`` naming the bad entry.
    """
    n = len(sizes)
    if offsets is None:
        out, acc = [], 0
        for size in sizes:
            out.append(acc)
            acc += size
        return out
    if isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__len__") or len(offsets) != n:
        raise ValueError(f"offsets must be a sequence of {n} integers (one per parameter)")
    out = [_contract.check_offset(f"offsets[{i}]", o, sizes[i]) for i, o in enumerate(offsets)]
    spans = sorted((o, o + size, i) for i, (o, size) in enumerate(zip(out, sizes)) if size)
    for (a0, a1, i), (b0, b1, j) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"offsets give overlapping logical ranges to params[{i}] and "
                             f"params[{j}]: they would share random bits")
    return out


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s shard of an ``n``-element vector split over ``world`` ranks:
    ceil(n / world) rounded up to ``SHARD_ALIGN`` elements each, the last ones short or empty."""
    per = -(-n // world) if world else 0
    per = -(-per // SHARD_ALIGN) * SHARD_ALIGN
    return min(rank * per, n), min((rank + 1) * per, n)
