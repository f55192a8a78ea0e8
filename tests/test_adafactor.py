"""srkern.adafactor_step (kernels/adafactor.cu) on every backend: bit-exact against the NumPy
reference (srkern/reference_adafactor.py) in every mode, for factored (2-D and batched 3-D) and
unfactored (0-D, 1-D, longer than one row unit) tensors in one call, with offsets, maximize,
weight decay and grad_scale; the fp32 mode against torch.optim.Adafactor and float64; the stall of
round-to-nearest that SR does not show; bad input changes nothing. Tests taking ``backend`` run
once per backend, every buffer they hand to a kernel guarded on both sides."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import srkern
from srkern import reference_adafactor as RA
from srkern.testing import assert_same_bits

BF16 = ml_dtypes.bfloat16
NP = {"bfloat16": BF16, "float32": np.float32}
MODES = ("bf16-sr", "bf16-nearest", "bf16-kahan", "fp32-master", "fp32")
# 2-D, batched 3-D, a vector over two row units (AF_CHUNK = 2048), odd vectors, a scalar, empty.
# Rows of 70, 130 and 64 columns hold CPU runs of 64 elements (kernels/cpu/adafactor_tile.h) at some
# offsets and not others; 4099 and 3000 elements run in 64-element pieces with tails.
SHAPES = [(33, 70), (2, 5, 9), (4099,), (7,), (1,), (), (0,), (3, 0), (0, 5), (1, 130), (64, 64), (3000,)]


def stat_shapes(shape):
    if len(shape) >= 2:
        return (*shape[:-1], 1), (*shape[:-2], 1, shape[-1]), None
    return None, None, shape


def make(precision: str, state_dtype: str, grad_dtype: str = "bfloat16", seed: int = 0, shapes=SHAPES) -> dict:
    rng = np.random.default_rng(seed)
    mode = srkern.PRECISIONS[precision]
    st = {k: [] for k in ("params", "grads", "row_vars", "col_vars", "variances", "master_params", "compensation")}
    for shape in shapes:
        w = rng.standard_normal(shape).astype(np.float32)
        st["params"].append(w.astype(NP[mode.param_dtype]))
        g = rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 1, shape)
        st["grads"].append(np.asarray(g, np.float32).astype(NP[grad_dtype]))
        for key, s in zip(("row_vars", "col_vars", "variances"), stat_shapes(shape)):
            st[key].append(None if s is None else (rng.random(s) * 1e-3).astype(NP[state_dtype]))
        st["master_params"].append(w.copy())
        st["compensation"].append((rng.standard_normal(shape) * 1e-4).astype(BF16))
    if not mode.master:
        st["master_params"] = None
    if not mode.compensation:
        st["compensation"] = None
    return st


def put(be, st):
    return {k: None if v is None else [None if a is None else be.put(a) for a in v] for k, v in st.items()}


WRITTEN = ("params", "row_vars", "col_vars", "variances", "master_params", "compensation")


def assert_state_equal(be, got, want, what):
    for key in WRITTEN:
        if want[key] is None:
            continue
        for i, (a, b) in enumerate(zip(got[key], want[key])):
            if b is None:
                continue
            # (a 0-d array comes back from be.put with shape (1,): np.ascontiguousarray)
            assert_same_bits(be.get(a), np.asarray(b), what=f"{what} {key}[{i}] shape {np.shape(b)}",
                             shape_free=np.ndim(b) == 0)


_REFERENCE_RUNS: dict = {}


def reference_run(st, key, **kw) -> list[dict]:
    """The reference's state after each of the three steps; with ``key`` computed once for every
    backend (``st`` is then the same inputs each time: make() is deterministic; nothing writes them)."""
    if key is not None and key in _REFERENCE_RUNS:
        return _REFERENCE_RUNS[key]
    ref, out = {k: v for k, v in st.items()}, []
    for step in (1, 2, 3):
        new = RA.adafactor_step(ref["params"], ref["grads"], ref["row_vars"], ref["col_vars"], ref["variances"],
                                master_params=ref["master_params"], compensation=ref["compensation"], **kw, step=step)
        ref = dict(ref, **{k: v for k, v in new.items() if v is not None})
        out.append(ref)
    if key is not None:
        _REFERENCE_RUNS[key] = out
    return out


def run_both(be, st, key=None, **kw):
    """Three steps on the backend and in the reference, each seeing the last one's results (the
    lerp weight step**-0.8 is 1, 0.57, 0.42: both of torch's lerp branches run)."""
    dev = put(be, st)
    for step, ref in zip((1, 2, 3), reference_run(st, key, **kw), strict=True):
        args = dict(kw, step=step)
        srkern.adafactor_step(dev["params"], dev["grads"], dev["row_vars"], dev["col_vars"], dev["variances"],
                              master_params=dev["master_params"], compensation=dev["compensation"], **args)
        assert_state_equal(be, dev, ref, f"[{be.name}] step {step}")


@pytest.mark.parametrize("precision", MODES)
def test_every_mode_matches_the_reference_bit_for_bit(backend, precision):
    # All shapes in one call (factored and not, empty ones among them), two steps: the sums of
    # squares, statistics, means, update norms and weight writes all equal the oracle's bits.
    sd = srkern.PRECISIONS[precision].state_dtypes[0]
    run_both(backend, make(precision, sd), key=("mode", precision), precision=precision, lr=1e-2,
             weight_decay=0.1, seed=7)


@pytest.mark.parametrize("state_dtype,grad_dtype", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_fp32_statistics_fp32_gradients_maximize_offsets(backend, state_dtype, grad_dtype):
    st = make("bf16-sr", state_dtype, grad_dtype, seed=3)
    offsets = [10_000 * (i + 1) + 3 for i in range(len(SHAPES))]
    run_both(backend, st, key=("stats", state_dtype, grad_dtype), precision="bf16-sr", lr=3e-2, maximize=True, grad_scale=0.5,
             eps=(1e-3, 1e-3), d=1.5, beta2_decay=-0.5, seed=11, offsets=offsets)


def test_a_tensor_split_into_calls_draws_the_same_bits(backend):
    # Offsets make two calls of one tensor each equal one call of both: the contract's indexing.
    st = make("bf16-sr", "bfloat16", shapes=[(9, 17), (300,)], seed=5)
    both = put(backend, st)
    one, two = put(backend, st), put(backend, st)
    kw = dict(step=3, precision="bf16-sr", lr=1e-2, seed=2)
    srkern.adafactor_step(both["params"], both["grads"], both["row_vars"], both["col_vars"], both["variances"], **kw)
    for i, part in enumerate((one, two)):
        pick = lambda k: [part[k][i]]  # noqa: E731
        srkern.adafactor_step(pick("params"), pick("grads"), pick("row_vars"), pick("col_vars"), pick("variances"),
                              offsets=[[0, 9 * 17][i]], **kw)
    for i, part in enumerate((one, two)):
        for key in WRITTEN[:4]:
            if both[key] is not None and both[key][i] is not None:
                assert_same_bits(backend.get(part[key][i]), backend.get(both[key][i]), what=f"{key}[{i}]")


def test_fp32_mode_tracks_torch_adafactor_as_closely_as_torch_tracks_float64():
    # Ten steps of srkern's fp32 mode and of torch.optim.Adafactor on the same data, both against
    # a float64 run of torch's algorithm: per tensor, srkern's worst error is at most twice
    # torch's own (srkern sums squares in FP64, torch in FP32; the rest is the same FP32
    # arithmetic), so srkern's fp32 path is as close to float64 as torch's is.
    torch = pytest.importorskip("torch")
    shapes = [(40, 30), (3, 8, 5), (257,)]
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(10)]

    def torch_run(dtype):
        ps = [torch.nn.Parameter(torch.tensor(w, dtype=dtype)) for w in init]
        opt = torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1, foreach=False, eps=(1e-3, 1e-3))
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = torch.tensor(g, dtype=dtype)
            opt.step()
        return [p.detach().double().numpy() for p in ps]

    exact, ref32 = torch_run(torch.float64), torch_run(torch.float32)
    ps = [torch.tensor(w) for w in init]
    rows = [torch.zeros(*s[:-1], 1) if len(s) >= 2 else None for s in shapes]
    cols = [torch.zeros(*s[:-2], 1, s[-1]) if len(s) >= 2 else None for s in shapes]
    var = [torch.zeros(s) if len(s) < 2 else None for s in shapes]
    for k, gs in enumerate(grads):
        srkern.adafactor_step(ps, [torch.tensor(g) for g in gs], rows, cols, var, step=k + 1, lr=1e-2,
                              weight_decay=0.1, eps=(1e-3, 1e-3), precision="fp32", seed=0)
    for i, (p, e, t) in enumerate(zip(ps, exact, ref32)):
        err_sr, err_t = np.abs(p.double().numpy() - e).max(), np.abs(t - e).max()
        assert 0 < err_t and err_sr <= 2 * err_t, f"tensor {i}: worst srkern error {err_sr:.3g} vs torch {err_t:.3g}"


def test_round_to_nearest_stalls_where_sr_follows_fp32():
    # A vector whose updates are ~1/16 of a BF16 ulp: bf16-nearest rounds every one away, bf16-sr
    # keeps their mean. With n = 4096 weights each starting at 1.0 (ulp 2**-7) and T = 16 steps,
    # the fp32 run moves each weight by D; an SR weight is a sum of T independent unbiased
    # roundings, so its mean over n weights is within 5 standard errors of D: the spread of one
    # rounding is at most ulp / 2, so sigma <= (ulp / 2) * sqrt(T / n).
    n, T = 4096, 16
    ones = np.ones(n, np.float32)
    g = np.full(n, 1.0, np.float32)
    lr = 2.0 ** -7 / 16  # scale = lr (rho = min(lr, 1/sqrt(t)) = lr, alpha = 1 * lr, RMS(u) = 1)
    runs = {}
    for prec in ("fp32", "bf16-nearest", "bf16-sr"):
        dt = NP[srkern.PRECISIONS[prec].param_dtype]
        p, v = ones.astype(dt), np.zeros(n, np.float32 if prec == "fp32" else BF16)
        for t in range(1, T + 1):
            srkern.adafactor_step([p], [g.astype(dt)], [None], [None], [v], step=t, lr=lr, precision=prec,
                                  eps=(1e-30, 0.0), seed=4)
        runs[prec] = p.astype(np.float64)
    drift = 1.0 - runs["fp32"].mean()
    assert drift > 0.5 * 2.0 ** -7, drift  # the fp32 run moves by more than half an ulp...
    assert (runs["bf16-nearest"] == 1.0).all()  # ...which round-to-nearest loses every time
    sigma = (2.0 ** -7 / 2) * math.sqrt(T / n)
    assert abs((1.0 - runs["bf16-sr"].mean()) - drift) < 5 * sigma


@pytest.mark.parametrize("case", ["stat_shape", "stat_for_vector", "missing_stat", "dtype_mix", "bad_eps",
                                  "bad_d", "overlap", "lr", "readonly_stat", "grad_scale_beyond_fp32"])
def test_bad_input_raises_and_writes_nothing(case):
    st = make("bf16-sr", "bfloat16", shapes=[(4, 6), (5,)])
    before = {k: [None if a is None else a.copy() for a in v] for k, v in st.items() if v is not None}
    kw = dict(step=1, precision="bf16-sr", seed=0)
    args = [st["params"], st["grads"], st["row_vars"], st["col_vars"], st["variances"]]
    if case == "stat_shape":
        args[2] = [np.zeros((4, 6), BF16), None]
    elif case == "stat_for_vector":
        args[2] = [st["row_vars"][0], np.zeros((5, 1), BF16)]
    elif case == "missing_stat":
        args[3] = [None, None]
    elif case == "dtype_mix":
        args[3] = [st["col_vars"][0].astype(np.float32), None]
    elif case == "bad_eps":
        kw["eps"] = (-1.0, 1e-3)
    elif case == "bad_d":
        kw["d"] = 0.5
    elif case == "overlap":
        args[4] = [None, st["params"][1]]
    elif case == "lr":
        kw["lr"] = -1.0
    elif case == "readonly_stat":  # the statistics are written: a read-only one is refused
        st["variances"][1].flags.writeable = False
    elif case == "grad_scale_beyond_fp32":  # finite in float64, Inf in the kernels' FP32
        kw["grad_scale"] = 1e39
    with pytest.raises((ValueError, TypeError)):
        srkern.adafactor_step(*args, **kw)
    for k, v in before.items():
        for a, b in zip(st[k], v):
            if a is not None:
                assert_same_bits(a, b, what=k)
