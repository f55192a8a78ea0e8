"""Philox4x32-10: Random123's known-answer vectors, in the NumPy reference and in the compiled kernel.

The kernel side runs ``kernels/philox.cu:philox_blocks``, which calls the same ``srk_draw_block``
as every cast and optimizer kernel, so a kernel-side Philox bug shows here before it hides inside
a rounding result.
"""
from __future__ import annotations

import numpy as np
import pytest

from srkern import _backend, reference
from srkern._tensor import as_view, stream_of
from srkern.testing import assert_same_bits

# Random123 kat_vectors, "philox4x32 10": (counter words, key words, expected output words).
KAT = [
    pytest.param((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
                 (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), id="kat=zeros"),
    pytest.param((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
                 (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD), id="kat=ones"),
    pytest.param((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                 (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1), id="kat=pi"),
]


def contract_args(ctr: tuple[int, ...], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """(seed, step, stream, q) of contract v1 that put ``ctr`` and ``key`` into Philox."""
    seed = key[0] | key[1] << 32
    q = ctr[0] | ctr[1] << 32
    return seed, ctr[2], ctr[3], q


def kernel_blocks(seed: int, step: int, stream: int, q0: int, n: int, be=None) -> np.ndarray:
    """Blocks q0 .. q0+n-1 (mod 2**64) from the compiled kernel on backend ``be`` (default: the
    current CPU backend), as an (n, 4) uint32 array."""
    host = np.full((n, 4), 0xDEADBEEF, dtype=np.uint32)
    out = host if be is None else be.put(host)
    v = as_view(out, "out")
    _backend.launch("philox", "philox_blocks", [("Q", seed), ("Q", step), ("I", stream),
                                                 ("Q", q0), ("q", n), ("p", v.ptr)],
                    device=v.device, device_id=v.device_id, units=n, stream=stream_of(v))
    return out if be is None else be.get(out)


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_reference_known_answers(ctr, key, want):
    # The oracle's raw Philox and its contract-v1 counter layout both reproduce Random123.
    got = reference.philox4x32_10(np.array([ctr], dtype=np.uint32), key)
    assert_same_bits(got[0], np.array(want, dtype=np.uint32), what="reference.philox4x32_10")
    seed, step, stream, q = contract_args(ctr, key)
    got = reference.blocks(np.array([q], dtype=np.uint64), seed, step, stream)
    assert_same_bits(got[0], np.array(want, dtype=np.uint32), what="reference.blocks")


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_kernel_known_answers(backend, ctr, key, want):
    # srk_draw_block, compiled from the same header on every backend, reproduces Random123.
    seed, step, stream, q = contract_args(ctr, key)
    got = kernel_blocks(seed, step, stream, q, 1, backend)
    assert_same_bits(got[0], np.array(want, dtype=np.uint32), what="kernel philox_blocks")


@pytest.mark.parametrize("q0", [0, 2 ** 32 - 3, 2 ** 64 - 5], ids=["q0=0", "q0=2**32-3", "q0=2**64-5"])
def test_kernel_matches_reference(backend, q0):
    # Many blocks, including a carry into the counter's high word and the wrap at 2**64.
    seed, step, stream, n = 0x0123456789ABCDEF, 0xFEDCBA98, 7, 1000
    q = (np.uint64(q0) + np.arange(n, dtype=np.uint64))  # wraps modulo 2**64 like the kernel
    want = reference.blocks(q, seed, step, stream)
    assert_same_bits(kernel_blocks(seed, step, stream, q0, n, backend), want, what=f"blocks from q0={q0}")


def test_draw_layout():
    # Contract v1 draw layout: 16-bit draw of index i is half (i % 2) of word (i % 8) // 2 of
    # block i // 8; 32-bit draw is word i % 4 of block i // 4.
    seed, step, stream = 99, 3, 1
    w = reference.blocks(np.arange(4, dtype=np.uint64), seed, step, stream)
    d16 = reference.draws16(np.arange(32, dtype=np.uint64), seed, step, stream)
    d32 = reference.draws32(np.arange(16, dtype=np.uint64), seed, step, stream)
    want16 = np.stack([w & 0xFFFF, w >> 16], axis=2).reshape(-1)
    assert_same_bits(d16, want16.astype(np.uint32), what="draws16")
    assert_same_bits(d32, w.reshape(-1), what="draws32")


def test_step_and_stream_change_the_bits(backend):
    # Distinct (step, stream) give unrelated blocks: a bug that dropped one counter word would
    # make these equal (chance of a false failure: 2**-128 per pair).
    base = kernel_blocks(5, 0, 0, 0, 4, backend)
    assert not np.array_equal(base, kernel_blocks(5, 1, 0, 0, 4, backend))
    assert not np.array_equal(base, kernel_blocks(5, 0, 1, 0, 4, backend))
    assert not np.array_equal(base, kernel_blocks(5 + (1 << 32), 0, 0, 0, 4, backend))


def test_streams_are_distinct_and_name_every_purpose():
    # Contract v1: streams separate purposes so that no two roundings reuse a draw. The ids are
    # read from kernels/srk_round.h (the oracle takes them from there too, so this is where a
    # duplicated or missing id shows): one per purpose, all different, each a 32-bit counter word.
    from srkern import STREAMS
    assert set(STREAMS) == {"cast", "param", "exp_avg", "exp_avg_sq", "compensation", "collective", "wire",
                            "param_fp16", "accum", "row_var", "col_var"}
    assert len(set(STREAMS.values())) == len(STREAMS), STREAMS
    assert all(0 <= v < 2 ** 32 for v in STREAMS.values()), STREAMS


def test_stream_ids_are_the_contract_values():
    # The ids are part of bit contract v1 (the README states them): renumbering one would change
    # every random bit drawn for that purpose, so the values are pinned here, not read.
    from srkern import STREAMS
    assert STREAMS == {"cast": 0, "param": 1, "exp_avg": 2, "exp_avg_sq": 3, "compensation": 4,
                       "collective": 5, "wire": 6, "param_fp16": 7, "accum": 8, "row_var": 9, "col_var": 10}
