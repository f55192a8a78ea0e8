"""srkern.grad_norm (kernels/norm.cu) on every backend: the global L2 norm against NumPy, its
finiteness flag, the partial sums bit-exact against the NumPy oracle where the CPU's span loop
(kernels/cpu/norm_span.h) and the shared per-partial body differ in how they walk a span, and the
layout constants Python reads from the kernel. Tests taking ``backend`` run once per backend
(tests/conftest.py); every buffer they hand to a kernel has guard bytes on both sides. The NaN,
subnormal and longhand-layout checks of the partials are in tests/test_numerics.py."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern.formats import KERNEL_SUFFIX
from srkern import norm as N
from srkern import reference as R
from srkern.testing import assert_same_bits
from test_adamw import compiler_defines, mixed_sizes

BF16 = ml_dtypes.bfloat16
NP = {"bfloat16": BF16, "float32": np.float32}
SHORT = KERNEL_SUFFIX  # kernel-name suffixes, as in test ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_grad_norm(backend, dtype):
    # The global L2 norm (FP64 sums) matches NumPy's float64 norm, scaled by grad_scale, and
    # flags non-finite gradients; the value is the same however often it is computed.
    rng = np.random.default_rng(12)
    host = [(rng.standard_normal(n) * 3).astype(NP[dtype]) for n in mixed_sizes(13, 10) + [5000, 70001]]
    grads = [backend.put(g) for g in host]
    want = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in host))
    got = srkern.grad_norm(grads)
    assert got.finite and abs(got.norm - want) <= 1e-12 * want
    assert srkern.grad_norm(grads) == got
    half = srkern.grad_norm(grads, grad_scale=0.5)
    assert abs(half.norm - want / 2) <= 1e-12 * want
    for scale in (1e39, 1e-40):  # overflows FP32 / subnormal in FP32: refused, not Inf or NaN
        with pytest.raises(ValueError, match="grad_scale"):
            srkern.grad_norm(grads, grad_scale=scale)
    for bad in (np.inf, np.nan):
        host[3][0] = bad
        grads[3] = backend.put(host[3])
        assert not srkern.grad_norm(grads).finite


# Sizes around the places where the CPU span loop (256-element rows, a short last row) and the
# shared body (8-element groups, a short last group) part ways: a row, a group, a span, one
# element either side of each; many small tensors (each its own padded span) between them.
EDGE_SIZES = [1, 7, 8, 9, 255, 256, 257, 263, 2047, 2048, 2049, 65535, 65536, 65537, 65536 + 257]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"], ids=lambda d: f"grad={SHORT[d]}")
def test_partials_at_row_group_and_span_edges(backend, dtype):
    rng = np.random.default_rng(29)
    sizes = [s for e in EDGE_SIZES for s in (e, int(rng.integers(1, 40)))]
    grads = [(rng.standard_normal(n) * 10.0 ** rng.integers(-2, 3, n)).astype(NP[dtype]) for n in sizes]
    # Every third tensor starts one element past a 16-byte boundary (the GPU's lane-by-lane loads).
    got = N._sumsq_partials([backend.put(g, lead=1 if i % 3 == 2 else 0) for i, g in enumerate(grads)],
                            grad_scale=0.75)
    want = R.grad_sumsq_partials(grads, 0.75)
    assert_same_bits(got.view(np.uint32), want.view(np.uint32), what=f"[{backend.name}] partials")


def test_python_uses_the_kernels_layout_constants():
    # srkern.norm reads NORM_LANES / _THREADS / _CHUNK from kernels/norm.cu: they equal what the
    # preprocessor makes of that file, and the oracle's own numbers, so a layout changed on one
    # side only fails here (and in the bit-exact tests).
    defs = compiler_defines("norm.cu")
    want = (defs["NORM_LANES"], defs["NORM_THREADS"], defs["NORM_CHUNK"])
    assert (N._NORM_LANES, N._NORM_THREADS, N._NORM_CHUNK) == want
    assert (R.NORM_LANES, R.NORM_THREADS, R.NORM_CHUNK) == want
    assert N._NORM_SPAN == want[1] * want[2]
