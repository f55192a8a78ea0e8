"""srkern.lion_step (kernels/lion.cu) on every backend: bit-exact against the NumPy reference in
every mode (weight decay, maximize, grad_scale varied between steps), sign(0) and NaN, odd sizes,
offsets, found_inf, the fp32 mode against a float64 run of the published rule, the stall of
round-to-nearest at a learning rate below half a BF16 ulp that SR does not show, and bad input.
The buffer helpers are tests/test_sgd.py's (the other single-state optimizer)."""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest

import srkern
from srkern import reference as R
from srkern.formats import KERNEL_SUFFIX
from srkern.sgd import ELEMENTWISE_PRECISIONS
from srkern.testing import assert_same_bits
from test_sgd import (BF16, LAYOUTS, NP, assert_stalls_and_tracks, assert_state_equal, assert_unchanged, get_state, make_state,
                      mixed_sizes, put_state, reference_steps, snapshot)


def run_kernel(st: dict, **kw) -> None:
    srkern.lion_step(st["params"], st["grads"], st["states"], master_params=st["master_params"],
                     compensation=st["compensation"], **kw)


def run_reference(st: dict, **kw) -> dict:
    r = R.lion_step(st["params"], st["grads"], st["states"], master_params=st["master_params"],
                    compensation=st["compensation"], **kw)
    return dict(r, states=r["exp_avgs"])


CASES = [(p, g, s) for p in ELEMENTWISE_PRECISIONS for g in srkern.PRECISIONS[p].grad_dtypes
         for s in srkern.PRECISIONS[p].state_dtypes]
IDS = [f"mode={p}-grad={KERNEL_SUFFIX[g]}-state={KERNEL_SUFFIX[s]}" for p, g, s in CASES]
STEPS = [dict(step=1, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
         dict(step=2, lr=3e-3, betas=(0.95, 0.98), grad_scale=0.5, maximize=True),
         dict(step=3, lr=1e-4, betas=(0.0, 1.0), weight_decay=1.0, grad_scale=3.0)]


# The inputs and the oracle's results of a case, computed once for every backend (never written).
@functools.lru_cache(maxsize=None)
def _bit_exact_case(precision, grad_dtype, state_dtype):
    st = make_state(precision, grad_dtype, state_dtype, mixed_sizes(1))
    kws = [dict(kw, precision=precision, seed=0x1234_5678_9ABC) for kw in STEPS]
    return st, kws, reference_steps(st, kws, run_reference)


@pytest.mark.parametrize("precision,grad_dtype,state_dtype", CASES, ids=IDS)
def test_bit_exact_against_reference(backend, precision, grad_dtype, state_dtype):
    # Three steps on 42 tensors of mixed, odd sizes, every buffer equal to the oracle's bits.
    st, kws, wants = _bit_exact_case(precision, grad_dtype, state_dtype)
    dev = put_state(backend, st)
    for kw, want in zip(kws, wants, strict=True):
        run_kernel(dev, **kw)
        assert_state_equal(get_state(backend, dev), want, f"{precision} step {kw['step']}")


@functools.lru_cache(maxsize=None)
def _large_case():
    st = make_state("bf16-sr", "float32", "bfloat16", [2 ** 20 + 3, 1], seed=2)
    kw = dict(STEPS[0], precision="bf16-sr", seed=5, offsets=[5, 2 ** 21])
    return st, kw, run_reference(st, **kw)


@functools.lru_cache(maxsize=None)
def _offsets_case(precision, layout):
    sizes, offsets = LAYOUTS[layout]
    st = make_state(precision, "bfloat16", srkern.PRECISIONS[precision].state_dtypes[0], sizes, seed=3)
    kw = dict(STEPS[1], precision=precision, seed=0xC0FFEE, offsets=offsets)
    return st, kw, run_reference(st, **kw)


def test_large_tensor_at_odd_offset(backend):
    st, kw, want = _large_case()
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    assert_state_equal(get_state(backend, dev), want, "2**20+3")


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=[f"layout={k}" for k in LAYOUTS])
@pytest.mark.parametrize("precision", ELEMENTWISE_PRECISIONS)
def test_offsets_match_reference(backend, precision, layout):
    st, kw, want = _offsets_case(precision, layout)
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    assert_state_equal(get_state(backend, dev), want, layout)


@pytest.mark.parametrize("precision", ["fp32", "bf16-sr"])
def test_sign_of_zero_and_nan(backend, precision):
    # c = 0 (zero gradient and state): sign 0, the weight only decays; -0 weight with no decay
    # stays -0; a NaN gradient makes c and so the weight and the state NaN (canonical: sign(NaN)
    # is NaN here, not torch.sign's 0); +-Inf gradients give sign +-1 and an infinite state.
    mode = srkern.PRECISIONS[precision]
    p = np.array([1.0, -0.0, 2.0, 3.0, -1.0, 0.5, 0.25, 4.0], np.float32)
    g = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0], np.float32)
    m = np.zeros(8, np.float32)
    st = dict(params=[p.astype(NP[mode.param_dtype])], grads=[g], states=[m.astype(NP[mode.state_dtypes[0]])],
              master_params=None, compensation=None)
    kw = dict(step=1, lr=0.125, betas=(0.9, 0.99), precision=precision, seed=1)
    want = run_reference(st, **kw)
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    got = get_state(backend, dev)
    assert_state_equal(got, want, "specials")
    w = got["params"][0].astype(np.float32)
    assert w[0] == 1.0 and np.signbit(w[1]) and w[1] == 0.0
    assert np.isnan(w[2]) and w[3] == 3.0 - 0.125 and w[4] == -1.0 + 0.125 and w[5] == 0.5
    assert w[6] == 0.25 - 0.125 and w[7] == 4.125
    s = got["states"][0].astype(np.float32)
    assert np.isnan(s[2]) and np.isposinf(s[3]) and np.isneginf(s[4])


@pytest.mark.parametrize("precision", ELEMENTWISE_PRECISIONS)
def test_found_inf_changes_nothing(backend, precision):
    sdt = srkern.PRECISIONS[precision].state_dtypes[0]
    st = put_state(backend, make_state(precision, "bfloat16", sdt, [5, 100], seed=6))
    before = snapshot(st, backend)
    run_kernel(st, precision=precision, seed=1, found_inf=backend.put(np.ones(1, np.float32)), **STEPS[0])
    assert_unchanged(before, snapshot(st, backend), "after a skipped step")
    ref = put_state(backend, make_state(precision, "bfloat16", sdt, [5, 100], seed=6))
    run_kernel(st, precision=precision, seed=1, found_inf=backend.put(np.zeros(1, np.float32)), **STEPS[0])
    run_kernel(ref, precision=precision, seed=1, **STEPS[0])
    assert_state_equal(get_state(backend, st), get_state(backend, ref), "found_inf = 0 vs none")


def test_grad_scale_and_maximize_equal_prescaled_grads(backend):
    a = make_state("bf16-sr", "float32", "bfloat16", mixed_sizes(7, 5), seed=8)
    b = make_state("bf16-sr", "float32", "bfloat16", mixed_sizes(7, 5), seed=8)
    b["grads"] = [g * np.float32(-0.37) for g in b["grads"]]
    a, b = put_state(backend, a), put_state(backend, b)
    run_kernel(a, grad_scale=0.37, maximize=True, **dict(STEPS[0], precision="bf16-sr", seed=3))
    run_kernel(b, **dict(STEPS[0], precision="bf16-sr", seed=3))
    assert_state_equal(get_state(backend, a), get_state(backend, b), "grad_scale + maximize vs pre-scaled")


def test_fp32_matches_published_rule_in_float64(backend):
    # K = 8 steps of precision="fp32" against lion_float64 (the paper's rule in float64). Per step
    # the weight takes two FP32 roundings (p * decay, then - lr * sign: lr * sign is exact) plus
    # decay's own rounding (relative 2**-24), each within 2**-24 of a magnitude <= M = the largest
    # |p| of the run, and errors carry on with factor decay <= 1: |p32 - p64| <= K * 3 * 2**-24 * M.
    # The state takes three roundings a step, carried with factor beta2 < 1:
    # |m32 - m64| <= 3 * 2**-24 * Mm * min(K, 1 / (1 - beta2)) (Mm the largest |m| or |g|).
    # Provided the sign of c agrees: each element's gradients keep one sign (random per element)
    # with |g| >= 0.5, so |c| >= (1 - beta1) * 0.5, far beyond its rounding error (checked).
    rng = np.random.default_rng(13)
    n, K, lr, betas, wd = 4099, 8, 0.01, (0.9, 0.99), 0.1
    p0 = rng.standard_normal(n).astype(np.float32)
    p64, m64 = p0.astype(np.float64), np.zeros(n)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    grads = [(sign * (0.5 + np.abs(rng.standard_normal(n)))).astype(np.float32) for _ in range(K)]
    p, m = backend.put(p0), backend.put(np.zeros(n, np.float32))
    big_p, big_m = np.abs(p64), np.zeros(n)
    for t, g in enumerate(grads, start=1):
        c = betas[0] * m64 + (1 - betas[0]) * g
        assert np.abs(c).min() > 1e-3, "a near-zero c: pick other data"
        p64, m64 = R.lion_float64(p64, g, m64, lr=lr, betas=betas, weight_decay=wd)
        big_p = np.maximum(big_p, np.abs(p64))
        big_m = np.maximum.reduce([big_m, np.abs(m64), np.abs(g.astype(np.float64))])
        srkern.lion_step([p], [backend.put(g)], [m], lr=lr, betas=betas, weight_decay=wd, precision="fp32",
                         seed=0, step=t)
    for name, got, want, bound in (("params", backend.get(p), p64, K * 3 * 2.0 ** -24 * big_p),
                                   ("exp_avgs", backend.get(m), m64, 3 * 2.0 ** -24 * big_m * min(K, 1 / (1 - betas[1])))):
        err = np.abs(got.astype(np.float64) - want)
        bad = np.nonzero(err > bound)[0]
        assert bad.size == 0, f"{name}: beyond the bound at {bad[:5]}: {err[bad[:5]]} > {bound[bad[:5]]}"


def test_small_updates_stall_with_nearest_but_not_with_sr(backend):
    # Weights w in [1.5, 1.75) (BF16 ulp 2^-7 = 0.0078), the target 0.5 below, lr = 1e-3: every
    # Lion step moves w by exactly lr (sign(c) = +1 while w is above the target) = 0.13 ulp, below
    # half an ulp. bf16-nearest writes the weights back unchanged and stalls; fp32 moves 0.2 in
    # 200 steps. bf16-sr: with sign(c) fixed the dynamics are w <- w - lr, linear, and each SR
    # write is unbiased, so the final differences d = w_sr - w_fp32 of the 512 elements
    # (independent draws: their own indices) have mean 0; the mean of d must lie within 5
    # standard errors sigma_d / sqrt(512) (a false failure ~6e-7 by the central limit).
    n, steps, lr = 512, 200, 1e-3
    rng = np.random.default_rng(21)
    w0 = (1.5 + 0.25 * rng.random(n)).astype(BF16).astype(np.float32)
    target = w0 - 0.5
    finals = {}
    for prec in ("fp32", "bf16-nearest", "bf16-sr", "bf16-kahan"):
        mode = srkern.PRECISIONS[prec]
        w = backend.put(w0.astype(NP[mode.param_dtype]))
        m = [backend.put(np.zeros(n, NP[mode.state_dtypes[0]]))]
        comp = [backend.put(np.zeros(n, BF16))] if mode.compensation else None
        for t in range(1, steps + 1):
            g = backend.put((backend.get(w).astype(np.float32) - target).astype(np.float32))
            srkern.lion_step([w], [g], m, step=t, lr=lr, precision=prec, seed=5, compensation=comp)
        finals[prec] = backend.get(w).astype(np.float64)
    assert_stalls_and_tracks(finals, w0, 0.19)


def _bad_cases():
    def c(name, fn, exc, frag):
        return pytest.param(fn, exc, frag, id=name)
    return [
        c("lists-differ", lambda d, put: dict(exp_avgs=d["states"][:-1]), ValueError, "exp_avgs has"),
        c("no-state", lambda d, put: dict(exp_avgs=None), TypeError, "exp_avgs must be a list"),
        c("state-dtype", lambda d, put: dict(exp_avgs=[put(np.zeros(10, np.float16)), put(np.zeros(20, np.float16))]),
          TypeError, "exp_avgs[0]"),
        c("lr<0", lambda d, put: dict(lr=-1.0), ValueError, "lr"),
        c("beta>1", lambda d, put: dict(betas=(0.9, 1.5)), ValueError, "betas[1]"),
        c("beta<0", lambda d, put: dict(betas=(-0.1, 0.99)), ValueError, "betas[0]"),
        c("betas-not-pair", lambda d, put: dict(betas=0.9), ValueError, "betas"),
        c("wd<0", lambda d, put: dict(weight_decay=-0.1), ValueError, "weight_decay"),
        c("lr*wd-subnormal", lambda d, put: dict(lr=1e-20, weight_decay=1e-20), ValueError, "['lrwd'] below"),
        c("maximize-not-bool", lambda d, put: dict(maximize=1), TypeError, "maximize"),
        c("fp16-sr", lambda d, put: dict(precision="fp16-sr"), ValueError, "no 'fp16-sr' kernels"),
        c("aliased", lambda d, put: dict(exp_avgs=[d["grads"][0], d["states"][1]]), ValueError, "overlaps"),
        c("kahan-without-compensation", lambda d, put: dict(precision="bf16-kahan"), ValueError, "compensation"),
        c("offset=2**64", lambda d, put: dict(offsets=[0, 2 ** 64]), ValueError, "offsets[1]"),
    ]


@pytest.mark.parametrize("mutate,exc,frag", _bad_cases())
def test_bad_input_raises_and_changes_nothing(backend, mutate, exc, frag):
    st = put_state(backend, make_state("bf16-sr", "bfloat16", "bfloat16", [10, 20], seed=9))
    before = snapshot(st, backend)
    kw = dict(params=st["params"], grads=st["grads"], exp_avgs=st["states"], step=1, seed=1, lr=1e-2,
              precision="bf16-sr")
    kw.update(mutate(st, backend.put))
    with pytest.raises(exc, match=re.escape(frag)):
        srkern.lion_step(**kw)
    assert_unchanged(before, snapshot(st, backend), "after a refused call")


def test_torch_tensors_work_in_place():
    # DLPack path: torch BF16 tensors are updated in place and equal the NumPy run.
    torch = pytest.importorskip("torch")
    st = make_state("bf16-sr", "bfloat16", "bfloat16", [33, 70], seed=14)
    ref = {k: None if v is None else [x.copy() for x in v] for k, v in st.items()}
    ts = {k: None if v is None else [torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16) for x in v]
          for k, v in st.items()}
    run_kernel(ts, **dict(STEPS[0], precision="bf16-sr", seed=2))
    run_kernel(ref, **dict(STEPS[0], precision="bf16-sr", seed=2))
    for key in ("params", "states"):
        for a, b in zip(ts[key], ref[key], strict=True):
            assert_same_bits(a, b, what=key)
