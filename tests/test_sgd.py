"""srkern.sgd_step (kernels/sgd.cu) on every backend: bit-exact against the NumPy reference in
every mode with and without momentum (Nesterov, dampening, maximize, weight decay and
grad_scale varied between steps), odd sizes, offsets and grouping, found_inf, the fp32 mode
against torch.optim.SGD and float64, the stall of round-to-nearest at a learning rate below half a
BF16 ulp that SR does not show, and bad input. Tests taking ``backend`` run once per backend
(tests/conftest.py), every buffer they hand to a kernel guarded on both sides.

The helpers at the top are shared with tests/test_lion.py (the other single-state optimizer)."""
from __future__ import annotations

import functools
import re

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern import _build
from srkern import reference as R
from srkern.formats import KERNEL_SUFFIX
from srkern.sgd import ELEMENTWISE_PRECISIONS
from srkern.testing import assert_same_bits, bits_of

BF16 = ml_dtypes.bfloat16
NP = {"bfloat16": BF16, "float32": np.float32}
SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 1023, 4099, 40003]  # 40003: crosses CPU work chunks
KEYS = ("params", "states", "master_params", "compensation")


def mixed_sizes(seed: int, count: int = 30) -> list[int]:
    return SIZES + np.random.default_rng(seed).integers(0, 300, count).tolist()


def make_state(precision: str, grad_dtype: str, state_dtype: str | None, sizes: list[int],
               seed: int = 0) -> dict:
    """Buffers of one single-state optimizer with mid-training values; ``state_dtype`` None: no
    state (SGD without momentum). Gradients spread over six decades."""
    rng = np.random.default_rng(seed)
    mode = srkern.PRECISIONS[precision]
    out = {k: [] for k in KEYS + ("grads",)}
    for n in sizes:
        w = rng.standard_normal(n).astype(np.float32)
        out["params"].append(w.astype(NP[mode.param_dtype]))
        g = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 1, n)
        out["grads"].append(g.astype(np.float32).astype(NP[grad_dtype]))
        if state_dtype is not None:
            out["states"].append((rng.standard_normal(n) * 1e-2).astype(NP[state_dtype]))
        out["master_params"].append(w.copy())
        out["compensation"].append((rng.standard_normal(n) * 1e-4).astype(BF16))
    if state_dtype is None:
        out["states"] = None
    if not mode.master:
        out["master_params"] = None
    if not mode.compensation:
        out["compensation"] = None
    return out


def put_state(be, st: dict) -> dict:
    return {k: None if v is None else [be.put(a) for a in v] for k, v in st.items()}


def assert_stalls_and_tracks(finals: dict, w0: np.ndarray, min_moved: float) -> None:
    """The stall test's verdict (shared with tests/test_lion.py): fp32 moved at least
    ``min_moved`` (else the problem tests nothing), bf16-nearest did not move at all, bf16-sr's
    mean difference from fp32 is within 5 standard errors (the sample spread over the n weights),
    bf16-kahan within 1.5 BF16 ulps of fp32 on average."""
    n = w0.size
    moved = np.abs(finals["fp32"] - w0).mean()
    assert moved > min_moved, f"fp32 moved only {moved}: the problem is not testing anything"
    assert np.array_equal(finals["bf16-nearest"], w0), "bf16-nearest should stall (updates < ulp/2)"
    d = finals["bf16-sr"] - finals["fp32"]
    se = d.std(ddof=1) / np.sqrt(n)
    assert abs(d.mean()) < 5 * se, f"bf16-sr drifts from fp32: mean {d.mean():.2e}, 5 SE = {5 * se:.2e}"
    gap = np.abs(finals["bf16-kahan"] - finals["fp32"]).mean()
    assert gap < 1.5 * 2 ** -7, f"bf16-kahan is {gap:.4f} from fp32 after fp32 moved {moved:.3f}"


def get_state(be, st: dict) -> dict:
    return {k: None if v is None else [be.get(a) for a in v] for k, v in st.items()}


def snapshot(st: dict, be) -> dict:
    return {k: None if v is None else [bits_of(be.get(x)).copy() for x in v] for k, v in st.items()}


def assert_state_equal(got: dict, want: dict, what: str) -> None:
    for key in KEYS:
        if want.get(key) is None:
            assert got.get(key) is None, f"{what}: {key} unexpected"
            continue
        for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
            assert_same_bits(a, b, what=f"{what}: {key}[{i}] (size {np.size(a)})")


def assert_unchanged(before: dict, after: dict, what: str) -> None:
    for k in before:
        if before[k] is not None:
            for i, (a, b) in enumerate(zip(before[k], after[k], strict=True)):
                assert_same_bits(b, a, what=f"{k}[{i}] {what}")


def run_kernel(st: dict, **kw) -> None:
    srkern.sgd_step(st["params"], st["grads"], st["states"], master_params=st["master_params"],
                    compensation=st["compensation"], **kw)


def run_reference(st: dict, **kw) -> dict:
    r = R.sgd_step(st["params"], st["grads"], st["states"], master_params=st["master_params"],
                   compensation=st["compensation"], **kw)
    return dict(r, states=r["momentum_buffers"])


# (precision, grad dtype, state dtype or None = no momentum)
CASES = [(p, g, s) for p in ELEMENTWISE_PRECISIONS for g in srkern.PRECISIONS[p].grad_dtypes
         for s in srkern.PRECISIONS[p].state_dtypes + (None,)]
IDS = [f"mode={p}-grad={KERNEL_SUFFIX[g]}-state={KERNEL_SUFFIX[s] if s else 'none'}" for p, g, s in CASES]

# Three steps that between them set every flag: the first step (fresh buffer), Nesterov, dampening,
# maximize, coupled weight decay and grad_scale.
STEPS = [dict(step=1, lr=3e-2, momentum=0.9, weight_decay=1e-2),
         dict(step=2, lr=1e-2, momentum=0.9, nesterov=True, grad_scale=0.5),
         dict(step=3, lr=5e-3, momentum=0.5, dampening=0.25, maximize=True, weight_decay=0.1, grad_scale=1.7)]


def hyper(kw: dict, with_state: bool) -> dict:
    kw = dict(kw)
    if not with_state:
        kw.update(momentum=0.0, nesterov=False)
    return kw


def reference_steps(st: dict, steps: list[dict], run_ref=None) -> list[dict]:
    """The oracle's state after each step of ``steps``, each step taking the last one's results
    (what a backend that passed the earlier steps holds): computed once per case, shared by the
    backends through the lru_caches below (the inputs and results are never written)."""
    run_ref = run_ref or run_reference
    wants, cur = [], st
    for kw in steps:
        want = run_ref(cur, **kw)
        wants.append(want)
        cur = dict({k: want[k] for k in KEYS}, grads=st["grads"])
    return wants


def bit_exact_kw(precision: str, state_dtype: str | None) -> list[dict]:
    return [dict(hyper(kw, state_dtype is not None), precision=precision, seed=0x1234_5678_9ABC) for kw in STEPS]


@functools.lru_cache(maxsize=None)
def _bit_exact_case(precision, grad_dtype, state_dtype):
    st = make_state(precision, grad_dtype, state_dtype, mixed_sizes(1))
    return st, reference_steps(st, bit_exact_kw(precision, state_dtype))


@pytest.mark.parametrize("precision,grad_dtype,state_dtype", CASES, ids=IDS)
def test_bit_exact_against_reference(backend, precision, grad_dtype, state_dtype):
    # Three steps on 42 tensors of mixed, odd sizes: every buffer equals the NumPy oracle bit for
    # bit (rounding, draws, order of operations, the first-step rule, every flag).
    st, wants = _bit_exact_case(precision, grad_dtype, state_dtype)
    dev = put_state(backend, st)
    for kw, want in zip(bit_exact_kw(precision, state_dtype), wants, strict=True):
        run_kernel(dev, **kw)
        assert_state_equal(get_state(backend, dev), want, f"{precision} step {kw['step']}")


@functools.lru_cache(maxsize=None)
def _large_case(precision):
    st = make_state(precision, "bfloat16", "bfloat16", [7, 2 ** 20 + 3], seed=2)
    kw = dict(STEPS[0], precision=precision, seed=5, offsets=[2 ** 33 + 1, 13])
    return st, kw, run_reference(st, **kw)


@pytest.mark.parametrize("precision", ["bf16-sr", "bf16-kahan"])
def test_large_tensor_at_odd_offset(backend, precision):
    # 2**20 + 3 elements starting inside a Philox block, with a 7-element tensor before it (the
    # oracle's result computed once, for every backend).
    st, kw, want = _large_case(precision)
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    assert_state_equal(get_state(backend, dev), want, "2**20+3")


# (sizes, offsets): where the CPU body switches between its runs of 8 full blocks (Philox words
# drawn 8 blocks at a time, kernels/srk_opt1.h) and single blocks: runs exactly filling tensors,
# one element short or over, starting mid-tensor, cut short by a CPU work chunk's end (a chunk is
# ADAMW_CPU_CHUNK pairs, srk_launch.h), across block 2**32 (the counter's low word wraps inside a
# run); blocks shared by no two tensors, offsets inside blocks, and tensors ending in the last
# Philox block of the 2**64 index space (q * 8 + 8 wraps there).
_CHUNK = _build.kernel_defines("srk_launch.h", "ADAMW_CPU_CHUNK")[0]
LAYOUTS = {
    "runs-at-block-starts": ([64, 63, 65, 127], [0, 64, 128, 200]),
    "run-cut-by-chunk": ([5, 8 * _CHUNK + 100], [0, 13]),
    "run-across-block-2**32": ([200], [(2 ** 32 - 3) * 8 - 3]),
    "mid-block": ([64, 63, 65, 72, 71], [3, 69, 133, 205, 281]),
    "across-block-2**32": ([200, 77], [(2 ** 32 - 4) * 8 - 5, 2 ** 40 + 3]),
    "top-of-index-space": ([5, 2, 9, 13], [2 ** 64 - 8, 2 ** 64 - 19, 2 ** 64 - 30, 2 ** 64 - 43]),
}


@functools.lru_cache(maxsize=None)
def _offsets_case(precision, layout):
    sizes, offsets = LAYOUTS[layout]
    st = make_state(precision, "float32", srkern.PRECISIONS[precision].state_dtypes[0], sizes, seed=3)
    kw = dict(STEPS[2], precision=precision, seed=0xC0FFEE, offsets=offsets, first_step=False)
    return st, kw, run_reference(st, **kw)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=[f"layout={k}" for k in LAYOUTS])
@pytest.mark.parametrize("precision", ELEMENTWISE_PRECISIONS)
def test_offsets_match_reference(backend, precision, layout):
    st, kw, want = _offsets_case(precision, layout)
    dev = put_state(backend, st)
    run_kernel(dev, **kw)
    assert_state_equal(get_state(backend, dev), want, layout)


def test_grouping_invariance(backend):
    # One launch for all tensors or one per tensor (with the global offsets) gives the same bits.
    sizes = mixed_sizes(4, 10)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    results = []
    for groups in ([list(range(len(sizes)))], [[i] for i in range(len(sizes))]):
        st = put_state(backend, make_state("bf16-sr", "bfloat16", "bfloat16", sizes, seed=5))
        for kw in STEPS[:2]:
            for idx in groups:
                sub = {k: None if v is None else [v[i] for i in idx] for k, v in st.items()}
                run_kernel(sub, precision="bf16-sr", seed=77, offsets=[offsets[i] for i in idx], **kw)
        results.append(get_state(backend, st))
    assert_state_equal(results[1], results[0], "one launch per tensor vs one for all")


@pytest.mark.parametrize("precision", ELEMENTWISE_PRECISIONS)
def test_found_inf_changes_nothing(backend, precision):
    # A set flag skips the step without touching a buffer; a clear flag equals no flag.
    sdt = srkern.PRECISIONS[precision].state_dtypes[0]
    st = put_state(backend, make_state(precision, "bfloat16", sdt, [5, 100], seed=6))
    before = snapshot(st, backend)
    run_kernel(st, precision=precision, seed=1, found_inf=backend.put(np.full(1, np.inf, np.float32)), **STEPS[0])
    assert_unchanged(before, snapshot(st, backend), "after a skipped step")
    ref = put_state(backend, make_state(precision, "bfloat16", sdt, [5, 100], seed=6))
    run_kernel(st, precision=precision, seed=1, found_inf=backend.put(np.zeros(1, np.float32)), **STEPS[0])
    run_kernel(ref, precision=precision, seed=1, **STEPS[0])
    assert_state_equal(get_state(backend, st), get_state(backend, ref), "found_inf = 0 vs none")


def test_grad_scale_and_maximize_equal_prescaled_grads(backend):
    # grad_scale multiplies in FP32 inside the kernel and maximize negates: bit-identical to FP32
    # gradients multiplied by -scale beforehand.
    a = make_state("bf16-sr", "float32", "bfloat16", mixed_sizes(7, 5), seed=8)
    b = make_state("bf16-sr", "float32", "bfloat16", mixed_sizes(7, 5), seed=8)
    b["grads"] = [g * np.float32(-0.37) for g in b["grads"]]
    a, b = put_state(backend, a), put_state(backend, b)
    kw = dict(step=2, lr=1e-2, momentum=0.9, weight_decay=1e-2, precision="bf16-sr", seed=3)
    run_kernel(a, grad_scale=0.37, maximize=True, **kw)
    run_kernel(b, **kw)
    assert_state_equal(get_state(backend, a), get_state(backend, b), "grad_scale + maximize vs pre-scaled")


# ---- fp32 against torch.optim.SGD and float64 ----------------------------------------------------

TORCH_CONFIGS = [dict(momentum=0.0), dict(momentum=0.9, weight_decay=1e-2),
                 dict(momentum=0.9, nesterov=True, maximize=True), dict(momentum=0.5, dampening=0.3, weight_decay=0.1)]


def sgd_float64(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    """torch.optim.SGD's rule in float64; also the largest magnitude any intermediate reaches."""
    p, b, big = p.astype(np.float64), None, np.abs(p).astype(np.float64)
    for g in grads:
        g = -g.astype(np.float64) if maximize else g.astype(np.float64)
        g = g + weight_decay * p
        if momentum:
            b = g.copy() if b is None else momentum * b + (1 - dampening) * g
            g = g + momentum * b if nesterov else b
        p = p - lr * g
        big = np.maximum.reduce([big, np.abs(p), np.abs(g), np.abs(b) if b is not None else big])
    return p, big


@pytest.mark.parametrize("cfg", TORCH_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fp32_matches_torch_and_float64(backend, cfg, one_torch_thread):
    # K = 6 steps of precision="fp32" against torch.optim.SGD(foreach=False) and the float64 rule.
    # Bound (first order): each of the <= 8 FP32 operations per element and step errs by at most
    # 2**-24 of a magnitude <= M (the largest intermediate of the float64 run); an error in the
    # buffer is carried on with factor momentum < 1 and reaches p times lr <= 0.1, so after K steps
    # |p32 - p64| <= K * 8 * 2**-24 * M * (1 + lr / (1 - momentum)). torch's own fp32 path must
    # meet the same bound (it is the yardstick), and srkern's must.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    n, K, lr = 4099, 6, 0.05
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(K)]
    mom = cfg.get("momentum", 0.0)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.SGD([tp], lr=lr, foreach=False, **cfg)
    p = backend.put(p0)
    bufs = [backend.put(np.zeros(n, np.float32))] if mom else None
    for t, g in enumerate(grads, start=1):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        srkern.sgd_step([p], [backend.put(g)], bufs, lr=lr, precision="fp32", seed=0, step=t, **cfg)
    p64, big = sgd_float64(p0, grads, lr, **cfg)
    bound = K * 8 * 2.0 ** -24 * big * (1 + lr / (1 - mom))
    for name, got in (("torch", tp.detach().numpy()), ("srkern", backend.get(p))):
        err = np.abs(got.astype(np.float64) - p64)
        bad = np.nonzero(err > bound)[0]
        assert bad.size == 0, f"{name}: |p - p64| beyond the bound at {bad[:5]}: {err[bad[:5]]} > {bound[bad[:5]]}"
    diff = np.abs(backend.get(p).astype(np.float64) - tp.detach().numpy().astype(np.float64))
    assert (diff <= 2 * bound).all()


# ---- below half an ulp: round-to-nearest stalls, SR tracks fp32 ------------------------------------


def test_small_updates_stall_with_nearest_but_not_with_sr(backend):
    # Minimise 0.5 |w - target|^2 from w in [1.5, 1.75) (BF16 ulp 2^-7 = 0.0078) with lr = 1e-3
    # and momentum 0.9: |g| <= 0.1, so every step lr * |b| <= lr * 0.1 / (1 - 0.9) = 1e-3 is
    # below half an ulp (0.0039). Round-to-nearest writes every weight back unchanged, so
    # bf16-nearest stalls; fp32 moves ~0.09 in 300 steps.
    # bf16-sr: the dynamics are linear in w and b and every SR write is unbiased, so E[w_sr] is
    # the fp32 trajectory; the 512 elements draw independent bits (their own indices), so the
    # final differences d = w_sr - w_fp32 are independent with mean 0 and the mean of d lies
    # within 5 standard errors sigma_d / sqrt(512) (sigma_d the sample deviation; a false failure
    # has probability ~6e-7 by the central limit). bf16-kahan (compensated) stays within 1.5 ulps.
    n, steps = 512, 300
    rng = np.random.default_rng(21)
    w0 = (1.5 + 0.25 * rng.random(n)).astype(BF16).astype(np.float32)
    target = w0 - 0.1
    finals = {}
    for prec in ("fp32", "bf16-nearest", "bf16-sr", "bf16-kahan"):
        mode = srkern.PRECISIONS[prec]
        w = backend.put(w0.astype(NP[mode.param_dtype]))
        b = [backend.put(np.zeros(n, NP[mode.state_dtypes[0]]))]
        comp = [backend.put(np.zeros(n, BF16))] if mode.compensation else None
        for t in range(1, steps + 1):
            g = backend.put((backend.get(w).astype(np.float32) - target).astype(np.float32))
            srkern.sgd_step([w], [g], b, step=t, lr=1e-3, momentum=0.9, precision=prec, seed=5,
                            compensation=comp)
        finals[prec] = backend.get(w).astype(np.float64)
    assert_stalls_and_tracks(finals, w0, 0.08)


# ---- bad input ------------------------------------------------------------------------------------


def _bad_cases():
    def c(name, fn, exc, frag):
        return pytest.param(fn, exc, frag, id=name)
    return [
        c("lists-differ", lambda d, put: dict(grads=d["grads"][:-1]), ValueError, "grads has"),
        c("buffers-differ", lambda d, put: dict(momentum_buffers=d["states"][:-1]), ValueError, "momentum_buffers has"),
        c("shape", lambda d, put: dict(momentum_buffers=[d["states"][0], d["states"][1][:-1]]), ValueError, "shape"),
        c("buffer-dtype", lambda d, put: dict(momentum_buffers=[put(np.zeros(10, np.float16)), put(np.zeros(20, np.float16))]),
          TypeError, "momentum_buffers[0]"),
        c("no-buffers", lambda d, put: dict(momentum_buffers=None), ValueError, "momentum_buffers"),
        c("buffers-without-momentum", lambda d, put: dict(momentum=0.0), ValueError, "momentum_buffers is only used"),
        c("lr<0", lambda d, put: dict(lr=-1.0), ValueError, "lr"),
        c("momentum<0", lambda d, put: dict(momentum=-0.1), ValueError, "momentum"),
        c("wd<0", lambda d, put: dict(weight_decay=-0.1), ValueError, "weight_decay"),
        c("dampening-nan", lambda d, put: dict(dampening=float("nan")), ValueError, "dampening"),
        c("nesterov-dampening", lambda d, put: dict(nesterov=True, dampening=0.1), ValueError, "Nesterov"),
        c("nesterov-not-bool", lambda d, put: dict(nesterov=1), TypeError, "nesterov"),
        c("first_step-not-bool", lambda d, put: dict(first_step=1), TypeError, "first_step"),
        c("step=0", lambda d, put: dict(step=0), ValueError, "step"),
        c("fp16-sr", lambda d, put: dict(precision="fp16-sr"), ValueError, "no 'fp16-sr' kernels"),
        c("aliased", lambda d, put: dict(momentum_buffers=[d["params"][0], d["states"][1]]), ValueError, "overlaps"),
        c("master-in-sr", lambda d, put: dict(master_params=[put(np.zeros(10, np.float32)), put(np.zeros(20, np.float32))]),
          ValueError, "master_params"),
        c("found_inf-dtype", lambda d, put: dict(found_inf=put(np.zeros(1, np.float64))), TypeError, "found_inf"),
        c("offsets-overlap", lambda d, put: dict(offsets=[0, 3]), ValueError, "overlapping"),
        c("lr-overflows-with-dampening", lambda d, put: dict(dampening=-1e39), ValueError, "dampening"),
    ]


@pytest.mark.parametrize("mutate,exc,frag", _bad_cases())
def test_bad_input_raises_and_changes_nothing(backend, mutate, exc, frag):
    st = put_state(backend, make_state("bf16-sr", "bfloat16", "bfloat16", [10, 20], seed=9))
    before = snapshot(st, backend)
    kw = dict(params=st["params"], grads=st["grads"], momentum_buffers=st["states"], step=1, seed=1,
              lr=1e-2, momentum=0.9, precision="bf16-sr")
    kw.update(mutate(st, backend.put))
    with pytest.raises(exc, match=re.escape(frag)):
        srkern.sgd_step(**kw)
    assert_unchanged(before, snapshot(st, backend), "after a refused call")
