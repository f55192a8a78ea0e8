"""srkern.adamw_step (kernels/adamw.cu) on every backend: bit-exact against the NumPy reference
in every mode, the boundaries between the CPU's 64-element runs and the shared block body,
grouping invariance, unbiasedness, the end-to-end stall of round-to-nearest, found_inf /
grad_scale, bad input, tensors at the top of the 2^64 index space, and the constants Python
shares with the kernel headers. Tests taking ``backend`` run once per backend
(tests/conftest.py); every buffer they hand to a kernel has guard bytes on both sides, checked
after the test."""
from __future__ import annotations

import re
import subprocess
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern.formats import KERNEL_SUFFIX
from srkern import _backend, _build, _table
from srkern import reference as R
from srkern.precisions import step_bytes_per_param
from srkern.testing import assert_same_bits, bits_of

BF16 = ml_dtypes.bfloat16
NP = {"bfloat16": BF16, "float16": np.float16, "float32": np.float32}
HYPER = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)

# Odd sizes (0, 1, 7, 8, 9, ...) and enough mixed tensors that offsets fall on every lane of a
# Philox block and runs of 64 elements (the CPU vector path) start mid-tensor.
SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 129, 1023, 4099, 40003]  # 40003: crosses CPU work chunks


def mixed_sizes(seed: int, count: int = 40) -> list[int]:
    rng = np.random.default_rng(seed)
    return SIZES + rng.integers(0, 300, count).tolist()


def make_state(precision: str, grad_dtype: str, state_dtype: str, sizes: list[int], seed: int = 0,
               grad_scale: float | None = None) -> dict:
    """Buffers of one optimizer with plausible mid-training values (moments not zero). Gradients
    spread over six decades (10**-6 .. 1), or, with ``grad_scale``, normal values of that scale."""
    rng = np.random.default_rng(seed)
    mode = srkern.PRECISIONS[precision]
    out = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "master_params", "compensation")}
    for n in sizes:
        w = rng.standard_normal(n).astype(np.float32)
        out["params"].append(w.astype(NP[mode.param_dtype]))
        g = rng.standard_normal(n) * (10.0 ** rng.integers(-6, 1, n) if grad_scale is None else grad_scale)
        g = g.astype(np.float32)
        out["grads"].append(g.astype(NP[grad_dtype]))
        out["exp_avgs"].append((rng.standard_normal(n) * 1e-2).astype(NP[state_dtype]))
        out["exp_avg_sqs"].append((rng.random(n) * 1e-4).astype(NP[state_dtype]))
        out["master_params"].append(w.copy())
        out["compensation"].append((rng.standard_normal(n) * 1e-4).astype(BF16))
    if not mode.master:
        out["master_params"] = None
    if not mode.compensation:
        out["compensation"] = None
    return out


def run_kernel(st: dict, **kw) -> None:
    srkern.adamw_step(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"],
                      master_params=st["master_params"], compensation=st["compensation"], **kw)


def put_state(be, st: dict) -> dict:
    """The buffers of ``st`` on backend ``be`` (guarded copies)."""
    return {k: None if v is None else [be.put(a) for a in v] for k, v in st.items()}


def get_state(be, st: dict) -> dict:
    """NumPy copies of a backend state."""
    return {k: None if v is None else [be.get(a) for a in v] for k, v in st.items()}


def run_reference(st: dict, **kw) -> dict:
    return R.adamw_step(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"],
                        master_params=st["master_params"], compensation=st["compensation"], **kw)


BUFFERS = ("params", "exp_avgs", "exp_avg_sqs", "master_params", "compensation")


def assert_state_equal(got: dict, want: dict, what: str) -> None:
    for key in BUFFERS:
        if want[key] is None:
            continue
        for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
            assert_same_bits(a, b, what=f"{what}: {key}[{i}] (size {np.size(a)})")


def snapshot(st: dict, be=None) -> dict:
    get = be.get if be is not None else (lambda x: x)
    return {k: None if v is None else [bits_of(get(x)).copy() for x in v] for k, v in st.items()}


CASES = [(p, g, s) for p, mode in srkern.PRECISIONS.items()
         for g in mode.grad_dtypes for s in mode.state_dtypes]
SHORT = KERNEL_SUFFIX  # kernel-name suffixes, as in test ids


@pytest.mark.parametrize("precision,grad_dtype,state_dtype", CASES,
                         ids=[f"mode={p}-grad={SHORT[g]}-state={SHORT[s]}" for p, g, s in CASES])
def test_bit_exact_against_reference(backend, precision, grad_dtype, state_dtype):
    # Two steps with different hyper-parameters on 53 tensors of mixed, odd sizes: every buffer
    # must equal the NumPy oracle bit for bit (rounding, draws, order of operations).
    st = make_state(precision, grad_dtype, state_dtype, mixed_sizes(1))
    dev = put_state(backend, st)
    for step, lr, gs in ((1, 3e-2, 1.0), (2, 1e-3, 0.5)):
        kw = dict(HYPER, lr=lr, step=step, precision=precision, seed=0x1234_5678_9ABC, grad_scale=gs)
        want = run_reference(st, **kw)
        run_kernel(dev, **kw)
        st = dict(get_state(backend, dev), grads=st["grads"])
        assert_state_equal(st, want, f"{precision} step {step}")


# Where the CPU backends switch between their 64-element runs (kernels/cpu/adamw_tile.h: 8 full
# Philox blocks, SIMD Philox tiles) and the shared block body (adamw.cu: adamw_block, full or
# lane-masked): (sizes, offsets) of one launch, each layout putting a switch somewhere else.
_CHUNK = _build.kernel_defines("srk_launch.h", "ADAMW_CPU_CHUNK")[0]  # pairs per CPU work item
RUN_LAYOUTS = {
    # exactly one run; one element short of it; one over; two runs and one short
    "64-63-65-at-block-starts": ([64, 63, 65, 127], [0, 64, 128, 200]),
    # the same sizes starting inside a block: the head block is partial, runs start at block 1
    "starts-mid-block": ([64, 63, 65, 72, 71], [3, 69, 133, 205, 281]),
    # tensors ending inside a block right after a run, and a run that ends a tensor exactly
    "ends-mid-block": ([64 + 5, 128 + 7, 64 * 3], [8, 80, 216]),
    # a run whose 8 blocks cross the Philox counter's low-word wrap (block 2^32)
    "run-across-block-2**32": ([200], [(2 ** 32 - 3) * 8 - 3]),
    # one pair, then a tensor over a CPU work chunk's end that is not a multiple of 8 blocks of it:
    # the run before the chunk end is cut short and the blocks left take the shared body
    "run-cut-by-chunk": ([5, 8 * _CHUNK + 100], [0, 13]),
    # many small tensors, none long enough for a run, packed with no gaps
    "many-small": ([int(s) for s in np.random.default_rng(23).integers(1, 20, 150)], None),
}


@pytest.mark.parametrize("layout", list(RUN_LAYOUTS), ids=[f"layout={k}" for k in RUN_LAYOUTS])
@pytest.mark.parametrize("precision,grad_dtype,state_dtype", CASES,
                         ids=[f"mode={p}-grad={SHORT[g]}-state={SHORT[s]}" for p, g, s in CASES])
def test_cpu_runs_and_shared_blocks(backend, precision, grad_dtype, state_dtype, layout):
    # The CPU's fast path must equal the shared body bit for bit at every switch between them;
    # both are compared with the NumPy oracle (on gpu-emu and cuda every block is the shared body).
    step_matches_reference(backend, precision, grad_dtype, state_dtype, *RUN_LAYOUTS[layout], layout)


def step_matches_reference(backend, precision, grad_dtype, state_dtype, sizes, offsets, what):
    """One step of tensors of ``sizes`` at ``offsets`` on ``backend`` equals the oracle's, bit for bit."""
    st = make_state(precision, grad_dtype, state_dtype, sizes, seed=31)
    kw = dict(HYPER, step=3, precision=precision, seed=0xC0FFEE, offsets=offsets)
    want = run_reference(st, **kw)
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    assert_state_equal(get_state(backend, dev), want, what)


@pytest.mark.parametrize("precision", ["bf16-sr", "bf16-kahan", "fp32-master", "fp16-sr"])
def test_grouping_invariance(backend, precision):
    # One launch for all tensors, one launch per tensor, and a random split into groups (each
    # with the tensors' global offsets) give identical bits: draws depend on the index only.
    sizes = mixed_sizes(2, 20)
    results = []
    rng = np.random.default_rng(3)
    for grouping in ("all", "each", "random"):
        st = put_state(backend, make_state(precision, "bfloat16", srkern.PRECISIONS[precision].state_dtypes[0], sizes, seed=4))
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        n = len(sizes)
        if grouping == "all":
            groups = [list(range(n))]
        elif grouping == "each":
            groups = [[i] for i in range(n)]
        else:
            perm = rng.permutation(n)
            groups = [sorted(perm[a:b].tolist()) for a, b in ((0, 5), (5, 17), (17, n))]
        for step in (1, 2):
            for idx in groups:
                sub = {k: None if v is None else [v[i] for i in idx] for k, v in st.items()}
                run_kernel(sub, step=step, precision=precision, seed=77, offsets=[offsets[i] for i in idx], **HYPER)
        results.append(get_state(backend, st))
    for other, name in zip(results[1:], ("each", "random"), strict=True):
        assert_state_equal(other, results[0], f"{precision}: grouping {name} vs all")


def test_shard_offsets_equal_whole(backend):
    # A tensor updated as two slices with their offsets equals the whole tensor in one call:
    # the property the sharded optimizer relies on. The second slice starts mid-block and on an
    # address that is not 16-byte aligned (the GPU's scalar fallback of its vector accesses).
    whole = put_state(backend, make_state("bf16-sr", "float32", "bfloat16", [1001], seed=5))
    parts = put_state(backend, make_state("bf16-sr", "float32", "bfloat16", [1001], seed=5))
    run_kernel(whole, step=3, precision="bf16-sr", seed=9, offsets=[500], **HYPER)
    for a, b in ((0, 333), (333, 1001)):
        sub = {k: None if v is None else [v[0][a:b]] for k, v in parts.items()}
        run_kernel(sub, step=3, precision="bf16-sr", seed=9, offsets=[500 + a], **HYPER)
    assert_state_equal(get_state(backend, parts), get_state(backend, whole), "two shards vs whole")


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"], ids=lambda s: f"state={SHORT[s]}")
def test_fp16_sr_weight_is_the_sr_cast_of_the_fp32_update(backend, state_dtype):
    # fp16-sr's weight write consumes the contract's 32-bit draw for its index exactly as
    # srkern.cast to float16 does: the stored weight equals cast(p', float16, stochastic,
    # offset = the element's index, stream = param) of the FP32 update p', which the fp32 mode
    # computes with the same arithmetic. Independent of the oracle (cast's own kernel rounds);
    # offsets on every lane of a Philox block, inside an 8-element block, past 2^32 blocks.
    sizes, offsets = [1, 5, 64, 77, 300, 1031], [3, 9, 21, 161, 2 ** 35 + 6, 2 ** 40 + 1]
    seed, step = 0xABCDEF, 4
    st = make_state("fp16-sr", "float16", state_dtype, sizes, seed=17)
    f32 = make_state("fp32", "float32", "float32", sizes, seed=17)
    f32["params"] = [p.astype(np.float32) for p in st["params"]]
    f32["grads"] = [g.astype(np.float32) for g in st["grads"]]
    f32["exp_avgs"] = [m.astype(np.float32) for m in st["exp_avgs"]]
    f32["exp_avg_sqs"] = [v.astype(np.float32) for v in st["exp_avg_sqs"]]
    kw = dict(HYPER, step=step, seed=seed, offsets=offsets)
    dev, ref = put_state(backend, st), put_state(backend, f32)
    run_kernel(dev, precision="fp16-sr", **kw)
    run_kernel(ref, precision="fp32", **kw)
    for i, (p16, p32) in enumerate(zip(dev["params"], ref["params"], strict=True)):
        want = srkern.cast(backend.get(p32), "float16", rounding="stochastic", seed=seed, step=step,
                           offset=offsets[i], stream=srkern.STREAMS["param_fp16"])
        assert_same_bits(backend.get(p16), np.asarray(want), what=f"params[{i}] vs cast of the FP32 update")


def test_fp16_sr_overflow_and_specials(backend):
    # Weights at +-65504 (FP16's largest finite) pushed outwards by half an ulp (16): the FP16 SR
    # rule rounds to +-Inf with probability 1/2 (the next grid value, 65536, is past the range;
    # no saturation), both outcomes occur; +-Inf weights stay +-Inf, -0 with no update stays -0,
    # and the bits are the oracle's.
    n = 4096
    p = np.full(n, 65504.0, np.float16)
    p[1::2] = -65504.0
    g = np.where(np.arange(n) % 2 == 0, -1.0, 1.0).astype(np.float32)  # grows |p|
    p[:4] = [np.inf, -np.inf, -0.0, 0.0]
    g[2:4] = 0.0
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    st = dict(params=[p], grads=[g], exp_avgs=[m], exp_avg_sqs=[v], master_params=None, compensation=None)
    # step 1, zero moments: |u| = lr * |g| / (|g| + eps) = 16 to FP32 precision
    kw = dict(step=1, lr=16.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, precision="fp16-sr", seed=3)
    want = run_reference(st, **kw)
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    got = get_state(backend, dev)
    assert_state_equal(got, want, "overflow")
    w = got["params"][0].astype(np.float64)
    assert np.isposinf(w[0]) and np.isneginf(w[1]) and bits_of(got["params"][0])[2] == 0x8000
    body = np.abs(w[4:])
    frac_inf = np.isinf(body).mean()
    assert set(np.unique(body)) == {65504.0, np.inf}
    # 4092 Bernoulli(1/2) outcomes: standard error 0.5 / sqrt(4092) = 0.0078; allow 5 of them
    assert abs(frac_inf - 0.5) < 5 * 0.5 / np.sqrt(n - 4), frac_inf


def _mean_over_draws(be, precision: str, seeds: int, tiles: int, n: int = 64):
    """Mean result of one step on ``n`` elements over ``seeds`` seeds x ``tiles`` copies.

    Each copy of the 64-element problem sits at other logical indices, so every (seed, index)
    pair gives an independent draw: seeds x tiles samples per element in ``seeds`` calls."""
    rng = np.random.default_rng(11)
    # in [1, 2): BF16 ulp 2^-7, FP16 ulp 2^-10
    p0 = (1.0 + rng.random(n)).astype(NP[srkern.PRECISIONS[precision].param_dtype])
    g = rng.standard_normal(n).astype(np.float32)
    m0 = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v0 = (rng.random(n) * 0.1 + 0.01).astype(np.float32)
    hyper = dict(step=5, lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)  # updates ~0.05-1 ulp
    acc = np.zeros(n)
    for s in range(seeds):
        p, m, v = (be.put(np.tile(a, tiles)) for a in (p0, m0, v0))
        srkern.adamw_step([p], [be.put(np.tile(g, tiles))], [m], [v], precision=precision, seed=s, **hyper)
        acc += be.get(p).astype(np.float64).reshape(tiles, n).sum(axis=0)
    exact = R.adamw_float64(p0, g, m0, v0, **hyper)
    return acc / (seeds * tiles), exact


def _assert_unbiased(mean: np.ndarray, exact: np.ndarray, ulp: float, n: int) -> np.ndarray:
    """Each result is one of the two neighbours lo, lo + ulp of the target, so the mean of ``n``
    has the binomial standard error sqrt(f (1 - f) / n) ulp, f = (target - lo) / ulp: allow 5
    standard errors, plus 1e-3 ulp for the kernel's FP32 arithmetic (~1e-7 relative). Returns
    the bound, for the power check."""
    lo = np.floor(exact / ulp) * ulp
    f = (exact - lo) / ulp
    bound = 5 * np.sqrt(f * (1 - f) / n) * ulp + 1e-3 * ulp
    err = np.abs(mean - exact)
    bad = err > bound
    assert not bad.any(), f"bias beyond 5 SE at {np.nonzero(bad)[0][:5]}: err {err[bad][:5]}, bound {bound[bad][:5]}"
    return bound


def test_unbiased_over_seeds(backend):
    # The mean over N = 40 seeds x 50 index copies of one bf16-sr step equals the float64 AdamW
    # update within 5 standard errors (BF16 ulp 2^-7 in [1, 2)).
    mean, exact = _mean_over_draws(backend, "bf16-sr", 40, 50)
    bound = _assert_unbiased(mean, exact, 2.0 ** -7, 40 * 50)
    # Power check: round-to-nearest is biased far beyond that bound on the same data.
    near, _ = _mean_over_draws(backend, "bf16-nearest", 1, 1)
    assert (np.abs(near - exact) > bound).mean() > 0.5


def test_fp16_sr_unbiased_over_seeds(backend):
    # The same for fp16-sr's FP16 weights (ulp 2^-10 in [1, 2); the updates are ~0.4-8 ulps).
    mean, exact = _mean_over_draws(backend, "fp16-sr", 40, 50)
    bound = _assert_unbiased(mean, exact, 2.0 ** -10, 40 * 50)
    # Power check: the round-to-nearest FP16 of the same update misses that bound at most elements.
    near = np.asarray(srkern.cast(exact.astype(np.float32), "float16", rounding="nearest")).astype(np.float64)
    assert (np.abs(near - exact) > bound).mean() > 0.5


def test_small_updates_stall_with_nearest_but_not_with_sr(backend):
    # Minimise 0.5 |w - target|^2 from w ~ 1.5 (BF16 ulp 2^-7 = 0.0078) with lr = 1e-3: every
    # update (~lr) is below half an ulp. Round-to-nearest writes the weights back unchanged, so
    # bf16-nearest stalls; bf16-sr (unbiased) and bf16-kahan (compensated) track fp32, which
    # moves the weights ~0.1 in 150 steps. Without SR or compensation this test fails.
    n, steps = 512, 150
    rng = np.random.default_rng(21)
    w0 = (1.5 + 0.25 * rng.random(n)).astype(BF16).astype(np.float32)
    target = w0 - 0.1
    finals = {}
    for prec in ("fp32", "bf16-nearest", "bf16-sr", "bf16-kahan"):
        mode = srkern.PRECISIONS[prec]
        w = backend.put(w0.astype(NP[mode.param_dtype]))
        sd = NP[mode.state_dtypes[0]]
        m, v = backend.put(np.zeros(n, sd)), backend.put(np.zeros(n, sd))
        comp = [backend.put(np.zeros(n, BF16))] if mode.compensation else None
        for t in range(1, steps + 1):
            g = backend.put((backend.get(w).astype(np.float32) - target).astype(np.float32))
            srkern.adamw_step([w], [g], [m], [v], step=t, lr=1e-3, precision=prec, seed=5,
                              compensation=comp)
        finals[prec] = backend.get(w).astype(np.float32)
    moved = np.abs(finals["fp32"] - w0).mean()
    assert moved > 0.09, f"fp32 moved only {moved}: the problem is not testing anything"
    assert np.array_equal(finals["bf16-nearest"], w0), "bf16-nearest should stall (updates < ulp/2)"
    for prec in ("bf16-sr", "bf16-kahan"):
        gap = np.abs(finals[prec] - finals["fp32"]).mean()
        # Tracking: mean distance to fp32 within 1.5 BF16 ulps (0.012) after a 0.1 move.
        assert gap < 1.5 * 2 ** -7, f"{prec} is {gap:.4f} from fp32 after fp32 moved {moved:.3f}"


def test_fp16_small_updates_stall_with_nearest_but_not_with_sr(backend):
    # FP16 weights w ~ 1.5 (ulp 2^-10 ~ 0.00098), lr = 1e-4: every update (~lr) is below half an
    # ulp. The round-to-nearest baseline (the fp32 step on the FP16 values, then the weights
    # rounded to nearest FP16 after every step: what an FP16 RN write does) never moves; fp16-sr
    # follows fp32, which moves ~0.04 in 400 steps. Without SR this test fails.
    # Bound in standard errors: the final differences d = w_sr - w_fp32 of the 512 independent
    # elements (own indices, own draws) have mean 0 (SR is unbiased at every write), so the mean
    # SR move equals fp32's within 5 standard errors std(d) / sqrt(512) (~1.3 ulps here, of a
    # ~37-ulp move). Each d is a sum of 400 independent zero-mean roundings of variance <= 1/4
    # ulp^2, so E|d| <= sqrt(2 / pi) * sqrt(400 / 4) ulp ~ 8 ulps: the spread is SR's noise.
    n, steps, lr = 512, 400, 1e-4
    rng = np.random.default_rng(22)
    w0 = (1.5 + 0.25 * rng.random(n)).astype(np.float16).astype(np.float32)
    target = w0 - 0.1
    finals = {}
    for prec, nearest in (("fp32", False), ("fp32", True), ("fp16-sr", False)):
        dt = np.float16 if prec == "fp16-sr" else np.float32
        w = backend.put(w0.astype(dt))
        m, v = backend.put(np.zeros(n, np.float32)), backend.put(np.zeros(n, np.float32))
        for t in range(1, steps + 1):
            g = backend.put((backend.get(w).astype(np.float32) - target).astype(np.float32))
            srkern.adamw_step([w], [g], [m], [v], step=t, lr=lr, precision=prec, seed=6)
            if nearest:
                w = backend.put(np.asarray(srkern.cast(backend.get(w), "float16", rounding="nearest"))
                                .astype(np.float32))
        finals[(prec, nearest)] = backend.get(w).astype(np.float32)
    fp32, rn, sr = finals[("fp32", False)], finals[("fp32", True)], finals[("fp16-sr", False)]
    moved = np.abs(fp32 - w0).mean()
    assert moved > 0.035, f"fp32 moved only {moved}: the problem is not testing anything"
    assert np.array_equal(rn, w0), "FP16 round-to-nearest should stall (updates < ulp/2)"
    d = (sr - fp32).astype(np.float64)
    se = d.std(ddof=1) / np.sqrt(n)
    assert abs(d.mean()) < 5 * se, f"fp16-sr drifts from fp32: mean {d.mean():.2e}, 5 SE = {5 * se:.2e}"
    spread = np.sqrt(2 / np.pi) * np.sqrt(steps / 4) * 2 ** -10
    assert np.abs(d).mean() < spread, f"fp16-sr is {np.abs(d).mean():.5f} from fp32 (bound {spread:.5f})"


@pytest.mark.parametrize("precision", ["bf16-sr", "bf16-kahan", "fp32-master", "fp32", "fp16-sr"])
def test_found_inf_changes_nothing(backend, precision):
    # A set flag skips the step without touching any buffer; a clear flag equals no flag.
    sdt = srkern.PRECISIONS[precision].state_dtypes[0]
    st = put_state(backend, make_state(precision, "bfloat16", sdt, [5, 100], seed=6))
    before = snapshot(st, backend)
    run_kernel(st, step=1, precision=precision, seed=1, found_inf=backend.put(np.ones(1, np.float32)), **HYPER)
    after = snapshot(st, backend)
    for k in before:
        if before[k] is not None:
            for i, (a, b) in enumerate(zip(before[k], after[k], strict=True)):
                assert_same_bits(b, a, what=f"{k}[{i}] after a skipped step")
    ref = put_state(backend, make_state(precision, "bfloat16", sdt, [5, 100], seed=6))
    run_kernel(st, step=1, precision=precision, seed=1, found_inf=backend.put(np.zeros(1, np.float32)), **HYPER)
    run_kernel(ref, step=1, precision=precision, seed=1, **HYPER)
    assert_state_equal(get_state(backend, st), get_state(backend, ref), "found_inf = 0 vs none")


@pytest.mark.parametrize("grad_dtype,scale", [("float32", 0.37), ("bfloat16", 0.25)],
                         ids=["grad=f32-scale=0.37", "grad=bf16-scale=0.25"])
def test_grad_scale_equals_prescaled_grads(backend, grad_dtype, scale):
    # grad_scale multiplies in FP32 inside the kernel: bit-identical to FP32 gradients multiplied
    # beforehand (for BF16 gradients a power of two keeps the pre-scaled BF16 exact).
    a = make_state("bf16-sr", grad_dtype, "bfloat16", mixed_sizes(7, 5), seed=8)
    b = make_state("bf16-sr", grad_dtype, "bfloat16", mixed_sizes(7, 5), seed=8)
    b["grads"] = [(g.astype(np.float32) * np.float32(scale)).astype(g.dtype) for g in b["grads"]]
    a, b = put_state(backend, a), put_state(backend, b)
    run_kernel(a, step=2, precision="bf16-sr", seed=3, grad_scale=scale, **HYPER)
    run_kernel(b, step=2, precision="bf16-sr", seed=3, **HYPER)
    assert_state_equal(get_state(backend, a), get_state(backend, b), "grad_scale vs pre-scaled")


def _bad_cases():
    """(id, mutate(host state, backend state, put) -> kwargs overrides, error type, message fragment)."""
    def c(name, fn, exc, frag):
        return pytest.param(fn, exc, frag, id=name)
    return [
        c("lists-differ", lambda s, d, put: dict(grads=d["grads"][:-1]), ValueError, "grads has"),
        c("shape-mismatch", lambda s, d, put: dict(exp_avgs=[d["exp_avgs"][0], d["exp_avgs"][1][:-1]]), ValueError, "shape"),
        c("param-dtype", lambda s, d, put: dict(params=[put(p.astype(np.float32)) for p in s["params"]]), TypeError, "params[0]"),
        c("state-dtype", lambda s, d, put: dict(exp_avgs=[put(m.astype(np.float16)) for m in s["exp_avgs"]]), TypeError, "exp_avgs[0]"),
        c("mixed-state", lambda s, d, put: dict(exp_avg_sqs=[put(v.astype(np.float32)) for v in s["exp_avg_sqs"]]), TypeError, "exp_avg_sqs"),
        c("lr<0", lambda s, d, put: dict(lr=-1e-3), ValueError, "lr"),
        c("lr-nan", lambda s, d, put: dict(lr=float("nan")), ValueError, "lr"),
        c("beta1=1", lambda s, d, put: dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
        c("beta2<0", lambda s, d, put: dict(betas=(0.9, -0.1)), ValueError, "betas[1]"),
        c("eps=0", lambda s, d, put: dict(eps=0.0), ValueError, "eps"),
        c("wd<0", lambda s, d, put: dict(weight_decay=-0.1), ValueError, "weight_decay"),
        # Below FP32's smallest normal: zero in FP32 (1e-50), or subnormal (1e-40), which the
        # host's FP32 rounding would flush under the caller's flush-to-zero mode.
        c("eps=1e-50", lambda s, d, put: dict(eps=1e-50), ValueError, "eps=1e-50 is below FP32's smallest normal"),
        c("eps-subnormal", lambda s, d, put: dict(eps=1e-40), ValueError, "eps=1e-40 is below"),
        c("lr*wd-subnormal", lambda s, d, put: dict(lr=1e-20, weight_decay=1e-20), ValueError, "['lrwd'] below"),
        c("grad_scale-overflows-fp32", lambda s, d, put: dict(grad_scale=1e39), ValueError, "grad_scale"),
        c("step=0", lambda s, d, put: dict(step=0), ValueError, "step"),
        c("no-grad", lambda s, d, put: dict(grads=[d["grads"][0], None]), ValueError, "grads[1] is None"),
        c("aliased-moments", lambda s, d, put: dict(exp_avg_sqs=[d["exp_avgs"][0], d["exp_avg_sqs"][1]]), ValueError, "overlaps"),
        c("grad-aliases-param", lambda s, d, put: dict(grads=[d["params"][0], d["grads"][1]]), ValueError, "overlaps"),
        c("non-contiguous", lambda s, d, put: dict(grads=[d["grads"][0], put(np.repeat(s["grads"][1], 2))[::2]]), ValueError, "contiguous"),
        c("misaligned", lambda s, d, put: dict(grads=[d["grads"][0], _misaligned(s["grads"][1], d["grads"][0])]), ValueError, "aligned"),
        c("master-in-sr", lambda s, d, put: dict(master_params=[put(p.astype(np.float32)) for p in s["params"]]), ValueError, "master_params"),
        c("found_inf-dtype", lambda s, d, put: dict(found_inf=put(np.zeros(1, np.float64))), TypeError, "found_inf"),
        c("offsets-overlap", lambda s, d, put: dict(offsets=[0, 3]), ValueError, "overlapping"),
        c("offset=2**64", lambda s, d, put: dict(offsets=[0, 2 ** 64]), ValueError, "offsets[1]"),
        c("offset-past-2**64", lambda s, d, put: dict(offsets=[0, 2 ** 64 - 19]), ValueError, "offsets[1]"),
        c("precision", lambda s, d, put: dict(precision="bf16"), ValueError, "precision"),
        # FP16 gradients have kernels only in fp16-sr; BF16 weights are not fp16-sr's
        c("fp16-grads-in-bf16-sr", lambda s, d, put: dict(grads=[put(g.astype(np.float16)) for g in s["grads"]]),
          TypeError, "grads[0] has dtype float16"),
        c("bf16-params-in-fp16-sr", lambda s, d, put: dict(precision="fp16-sr"), TypeError,
          "params[0] has dtype bfloat16"),
        c("fp16-state-in-fp16-sr", lambda s, d, put: dict(precision="fp16-sr",
                                                          params=[put(p.astype(np.float16)) for p in s["params"]],
                                                          exp_avgs=[put(m.astype(np.float16)) for m in s["exp_avgs"]]),
          TypeError, "exp_avgs[0]"),
        c("read-only", lambda s, d, put: dict(params=[d["params"][0], _readonly(d["params"][1])]), ValueError, "read-only"),
    ]


def _misaligned(a, like):
    """A copy of ``a`` one byte past an element boundary (NumPy allows such views; no GPU
    framework makes them)."""
    if not isinstance(like, np.ndarray):
        pytest.skip("only NumPy makes arrays that are not element-aligned")
    buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
    out = buf[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _readonly(a):
    if not isinstance(a, np.ndarray):
        pytest.skip("only NumPy arrays can be read-only")
    a = a.view()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("mutate,exc,frag", _bad_cases())
def test_bad_input_raises_and_changes_nothing(backend, mutate, exc, frag):
    host = make_state("bf16-sr", "bfloat16", "bfloat16", [10, 20], seed=9)
    st = put_state(backend, host)
    before = snapshot(st, backend)
    kw = dict(params=st["params"], grads=st["grads"], exp_avgs=st["exp_avgs"], exp_avg_sqs=st["exp_avg_sqs"],
              step=1, seed=1, precision="bf16-sr", **HYPER)
    kw.update(mutate(host, st, backend.put))
    with pytest.raises(exc, match=re.escape(frag)):
        srkern.adamw_step(**kw)
    after = snapshot(st, backend)
    for k in before:
        if before[k] is not None:
            for i, (a, b) in enumerate(zip(before[k], after[k], strict=True)):
                assert_same_bits(b, a, what=f"{k}[{i}] after a refused call")


def test_found_inf_aliasing_a_buffer_refused(backend):
    # found_inf (FP32) as a view into exp_avgs[0] (FP32 moments): the kernel would read it while
    # writing that buffer, so it is refused like any other overlap and nothing is written. It is
    # 0.0, so without the check the step would run and change the buffers.
    host = make_state("bf16-sr", "bfloat16", "float32", [10, 20], seed=16)
    host["exp_avgs"][0][0] = 0.0
    st = put_state(backend, host)
    before = snapshot(st, backend)
    with pytest.raises(ValueError, match=r"found_inf overlaps exp_avgs\[0\]|exp_avgs\[0\] overlaps found_inf"):
        run_kernel(st, step=1, seed=1, precision="bf16-sr", found_inf=st["exp_avgs"][0][:1], **HYPER)
    after = snapshot(st, backend)
    for k in before:
        if before[k] is not None:
            for i, (a, b) in enumerate(zip(before[k], after[k], strict=True)):
                assert_same_bits(b, a, what=f"{k}[{i}] after a refused call")


def test_jax_params_refused_with_a_clear_message():
    # JAX arrays are immutable: the error says so (not just "read-only").
    jnp = pytest.importorskip("jax.numpy")
    p = jnp.zeros(8, dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match="JAX arrays are immutable"):
        srkern.adamw_step([p], [np.zeros(8, BF16)], [np.zeros(8, BF16)], [np.zeros(8, BF16)],
                          step=1, seed=0, **HYPER)


def test_bytes_per_param():
    # Memory per parameter (weights + optimizer state, gradient excluded), as the paper counts.
    assert srkern.bytes_per_param("bf16-sr") == 6
    assert srkern.bytes_per_param("bf16-sr", "float32") == 10
    assert srkern.bytes_per_param("bf16-kahan") == 8
    assert srkern.bytes_per_param("fp32-master") == 14
    assert srkern.bytes_per_param("fp32") == 12
    assert srkern.bytes_per_param("fp16-sr") == 10  # 2 (FP16 weight) + 4 + 4 (FP32 moments)
    assert srkern.bytes_per_param("fp16-sr", "bfloat16") == 6
    with pytest.raises(ValueError, match="state_dtype"):
        srkern.bytes_per_param("fp16-sr", "float16")
    # one step: gradient read, moments and weight read and written
    assert step_bytes_per_param("fp16-sr", grad_dtype="float16") == 2 + 2 * 8 + 2 * 2
    assert step_bytes_per_param("fp16-sr", "bfloat16", "float32") == 4 + 2 * 4 + 2 * 2


def test_torch_tensors_work_in_place():
    # DLPack path: torch BF16 tensors are updated in place and equal the NumPy run.
    torch = pytest.importorskip("torch")
    st = make_state("bf16-sr", "bfloat16", "bfloat16", [33, 70], seed=14)
    ref = {k: None if v is None else [x.copy() for x in v] for k, v in st.items()}

    def to_t(a):
        return torch.from_numpy(bits_of(a).view(np.int16).copy()).view(torch.bfloat16)
    ts = {k: None if v is None else [to_t(x) for x in v] for k, v in st.items()}
    run_kernel(ts, step=1, precision="bf16-sr", seed=2, **HYPER)
    run_kernel(ref, step=1, precision="bf16-sr", seed=2, **HYPER)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(ts[key], ref[key], strict=True):
            assert_same_bits(a, b, what=key)


def test_large_offsets_and_counter_wrap(backend):
    # Logical indices past 2^32 * 8: the Philox block counter's low word wraps inside a group
    # of 8 blocks (the CPU path's scalar fallback) and the high word is used; bits still equal
    # the reference.
    sizes = [200, 77]
    offsets = [(2 ** 32 - 4) * 8 - 5, 2 ** 40 + 3]
    st = make_state("bf16-sr", "bfloat16", "bfloat16", sizes, seed=15)
    kw = dict(HYPER, step=1, precision="bf16-sr", seed=99, offsets=offsets)
    want = run_reference(st, **kw)
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    assert_state_equal(get_state(backend, dev), want, "offsets near 2^35 and 2^40")


# Tensors that end inside the last Philox block of the 2^64 index space, where q * 8 + 8 wraps to
# 0: the GPU's full-block test once took such a block as full and read and wrote up to 7
# elements past the tensor's end (caught by the guard bytes on gpu-emu).
TOP_LAYOUTS = {
    "one-tensor-11-at-2**64-16": ([11], [2 ** 64 - 16]),
    "ends-at-2**64": ([13, 4], [2 ** 64 - 13, 0]),
    "three-in-the-last-blocks": ([5, 2, 9], [2 ** 64 - 8, 2 ** 64 - 19, 2 ** 64 - 30]),
}


@pytest.mark.parametrize("layout", list(TOP_LAYOUTS), ids=[f"layout={k}" for k in TOP_LAYOUTS])
@pytest.mark.parametrize("precision,grad_dtype,state_dtype", CASES,
                         ids=[f"mode={p}-grad={SHORT[g]}-state={SHORT[s]}" for p, g, s in CASES])
def test_tensors_at_the_top_of_the_index_space(backend, precision, grad_dtype, state_dtype, layout):
    step_matches_reference(backend, precision, grad_dtype, state_dtype, *TOP_LAYOUTS[layout], layout)


# ---- constants shared with the kernel headers ----------------------------------------------------


def compiler_defines(header: str) -> dict[str, int]:
    """The integer macros of ``kernels/<header>`` as the C++ preprocessor sees them (``-dM``): a
    reading of the header independent of srkern's own."""
    cxx, _ = _build.cxx_compiler()
    res = subprocess.run([cxx, "-dM", "-E", "-x", "c++", "-std=c++17", f"-I{_build.KERNEL_DIR}",
                          str(_build.KERNEL_DIR / header)],
                         capture_output=True, text=True, check=True)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define (\w+) (\d+)u?$", res.stdout, re.M)}


def test_python_uses_the_headers_table_and_launch_constants():
    # The table width and first-unit column srkern.adamw writes, and the launch geometry
    # srkern._backend sizes grids with, are the headers' values: a header changed without
    # Python (or a Python constant typed in by hand) fails here.
    table = compiler_defines("srk_table.h")
    assert (_table.TABLE_COLS, _table.TABLE_UNIT0) == (table["SRK_TABLE_COLS"], table["SRK_TABLE_UNIT0"])
    launch = compiler_defines("srk_launch.h")
    assert (_backend.GPU_BLOCK, _backend.GPU_BLOCKS_PER_SM, _backend.EMU_SMS) == (
        launch["SRK_GPU_BLOCK"], launch["SRK_GPU_BLOCKS_PER_SM"], launch["SRK_EMU_SMS"])
    # The table as built: one row of that width per tensor, the first units in that column.
    two = [SimpleNamespace(numel=3), SimpleNamespace(numel=5)]
    table_rows, units = _table.table(two, [[0, 0]] * 6, [0, 3], [1, 2])
    assert table_rows.shape == (2, table["SRK_TABLE_COLS"]) and units == 3
    assert table_rows[:, table["SRK_TABLE_UNIT0"]].tolist() == [0, 1]


def test_kernel_defines_refuses_a_missing_name(tmp_path, monkeypatch):
    # A constant renamed or turned into an expression in a header is an error at import, not a
    # silently stale value.
    (tmp_path / "x.h").write_text("#define SRK_A 7\n#define SRK_B (SRK_A + 1)\n#define SRK_C 5u\n")
    monkeypatch.setattr(_build, "KERNEL_DIR", tmp_path)
    _build.header_defines.cache_clear()
    try:
        assert _build.kernel_defines("x.h", "SRK_A", "SRK_C") == (7, 5)
        with pytest.raises(_build.BuildError, match="SRK_B"):
            _build.kernel_defines("x.h", "SRK_A", "SRK_B")
    finally:
        _build.header_defines.cache_clear()
