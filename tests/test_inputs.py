"""Tensors and arguments that srkern must not misread or miswrite (issue 11, parts 3, 5 and the
validator fuzz): NumPy arrays in non-native byte order or with byte strides that are not a multiple
of the item size, torch tensors with the negative or conjugate bit, autograd (version counters,
tensors that require grad), hyper-parameters that are fine in float64 but zero or infinite in FP32,
cast's boolean and enum arguments, and a bounded hypothesis fuzz of the argument validators.

Each input case is either read correctly (a copy) or refused; every written buffer of such a kind
is refused with nothing changed. Tests taking ``backend`` run once per backend."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import srkern
import srkern.torch as srt
from srkern import _contract
from srkern.adamw import check_hyperparameters
from srkern.testing import assert_same_bits, bits_of

BF16 = ml_dtypes.bfloat16
SEED = 0x5EED
HYPER = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
rng = np.random.default_rng(11)
VALUES = (rng.standard_normal(100) * 3).astype(np.float32)


def fp32_state(n: int = 100, seed: int = 0) -> dict:
    """params, grads and moments of an fp32 AdamW step, as NumPy arrays."""
    r = np.random.default_rng(seed)
    return {"params": [r.standard_normal(n).astype(np.float32)],
            "grads": [r.standard_normal(n).astype(np.float32)],
            "exp_avgs": [(r.standard_normal(n) * 1e-2).astype(np.float32)],
            "exp_avg_sqs": [(r.random(n) * 1e-4).astype(np.float32)]}


def step(st: dict, **kw) -> None:
    srkern.adamw_step(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"],
                      **{"step": 1, "seed": SEED, "precision": "fp32", **HYPER, **kw})


def snapshot(st: dict) -> dict:
    return {k: [bits_of(a).copy() for a in v] for k, v in st.items()}


def assert_unchanged(st: dict, before: dict) -> None:
    for k, v in st.items():
        for i, a in enumerate(v):
            assert_same_bits(bits_of(a), before[k][i], what=f"{k}[{i}] changed by a refused call")


def packed(dtype: str, n: int = 100) -> np.ndarray:
    """A packed structured array: field ``a`` of ``dtype`` beside a one-byte field ``b`` (7), so
    field ``a`` has byte stride itemsize + 1."""
    rec = np.zeros(n, dtype=[("a", dtype), ("b", "u1")])
    rec["b"] = 7
    return rec


# ---- 1. non-native byte order ------------------------------------------------------------------

@pytest.mark.attack("corruption")
def test_cast_reads_non_native_byte_order(backend):
    # A big-endian float32 array holds the same values: the cast must see them, not the bytes.
    want = srkern.cast(VALUES, "bfloat16", seed=SEED)
    got = srkern.cast(VALUES.astype(">f4"), "bfloat16", seed=SEED)
    assert_same_bits(got, want, VALUES, "cast of a big-endian float32 array")
    big16 = VALUES.astype(np.float16).astype(">f2")  # an upcast reads 16-bit input the same way
    assert_same_bits(srkern.cast(big16, "float32"), VALUES.astype(np.float16).astype(np.float32))
    bf = VALUES.astype(BF16)  # ml_dtypes' BF16 swaps too ('>V2', still named bfloat16)
    big_bf = bf.astype(bf.dtype.newbyteorder(">"))
    assert_same_bits(srkern.cast(big_bf, "float32"), bf.astype(np.float32), what="upcast of big-endian BF16")


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("target,src", [("float32", BF16), ("float16", np.float32)], ids=["to=f32", "to=f16"])
def test_cast_out_non_native_byte_order_refused(backend, target, src):
    out = np.full(100, 1.5, dtype=np.dtype(target).newbyteorder(">"))
    before = bits_of(out).copy()
    with pytest.raises(ValueError, match="out.*byte order"):
        srkern.cast(VALUES.astype(src), target, seed=SEED, out=out)
    assert_same_bits(bits_of(out), before, what="out changed by a refused cast")


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("which", ["params", "grads", "exp_avgs", "exp_avg_sqs"])
def test_adamw_non_native_byte_order_refused(backend, which):
    st = fp32_state()
    st[which] = [st[which][0].astype(">f4")]
    before = snapshot(st)
    with pytest.raises(ValueError, match=rf"{which}\[0\].*byte order"):
        step(st)
    assert_unchanged(st, before)


@pytest.mark.attack("corruption")
def test_grad_norm_non_native_byte_order_refused(backend):
    # Four 3.0 values in big-endian order were read as 4.6e-41 each.
    with pytest.raises(ValueError, match=r"grads\[0\].*byte order"):
        srkern.grad_norm([np.full(4, 3.0, dtype=">f4")])
    assert srkern.grad_norm([np.full(4, 3.0, dtype=np.float32)]).norm == 6.0


@pytest.mark.attack("error")
def test_zero_width_dtype_refused_by_its_dtype():
    # as_view divided the strides by the item size: ZeroDivisionError for a 'V0' array.
    with pytest.raises(TypeError, match="x must be float32"):
        srkern.cast(np.zeros(3, dtype="V0"), "bfloat16", seed=SEED)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype void"):
        srkern.grad_norm([np.zeros(3, dtype="V0")])


# ---- 2. byte strides that are not a multiple of the item size ------------------------------------

@pytest.mark.attack("corruption")
def test_cast_reads_a_packed_field(backend):
    rec = packed("<f4")
    rec["a"] = VALUES
    want = srkern.cast(VALUES, "bfloat16", seed=SEED)
    assert_same_bits(srkern.cast(rec["a"], "bfloat16", seed=SEED), want, VALUES, "cast of a packed field")


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("target,src", [("float32", BF16), ("float16", np.float32)], ids=["to=f32", "to=f16"])
def test_cast_out_packed_field_refused(backend, target, src):
    rec = packed(np.dtype(target).str)
    before = rec.tobytes()
    with pytest.raises(ValueError, match="out.*stride"):
        srkern.cast(VALUES.astype(src), target, seed=SEED, out=rec["a"])
    assert rec.tobytes() == before, "the neighbouring field (or the field) was written"


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("which", ["params", "grads", "exp_avgs"])
def test_adamw_packed_field_refused(backend, which):
    st = fp32_state()
    rec = packed("<f4")
    rec["a"] = st[which][0]
    st[which] = [rec["a"]]
    before = rec.tobytes()
    with pytest.raises(ValueError, match=rf"{which}\[0\].*stride"):
        step(st)
    assert rec.tobytes() == before


@pytest.mark.attack("corruption")
def test_grad_norm_packed_field_refused(backend):
    rec = packed("<f4", 4)
    rec["a"] = 3.0
    with pytest.raises(ValueError, match=r"grads\[0\].*stride"):
        srkern.grad_norm([rec["a"]])


# ---- 3. torch's negative and conjugate bits -----------------------------------------------------

def _neg_inputs(device: str) -> dict:
    t = torch.from_numpy(VALUES.copy()).to(device)
    c = torch.complex(torch.zeros_like(t), t)  # imaginary part = VALUES
    return {"neg_view": torch._neg_view(t), "conj_imag": c.conj().imag}


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("kind", ["neg_view", "conj_imag"])
def test_cast_reads_the_negative_bit(backend, kind):
    x = _neg_inputs(backend.device)[kind]
    assert x.is_neg()
    want = srkern.cast(torch.from_numpy(-VALUES).to(backend.device), "bfloat16", seed=SEED)
    assert_same_bits(srkern.cast(x, "bfloat16", seed=SEED), want, -VALUES, f"cast of {kind}")


@pytest.mark.attack("corruption")
def test_cast_out_with_the_negative_bit_refused(backend):
    buf = torch.full((100,), 1.5, dtype=torch.bfloat16, device=backend.device)
    before = bits_of(buf).copy()
    with pytest.raises(ValueError, match="out.*negative bit"):
        srkern.cast(torch.from_numpy(VALUES).to(backend.device), "bfloat16", seed=SEED,
                    out=torch._neg_view(buf))
    assert_same_bits(bits_of(buf), before, what="out changed by a refused cast")


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("which", ["params", "grads", "exp_avg_sqs"])
def test_adamw_negative_bit_refused(backend, which):
    st = {k: [torch.from_numpy(a[0]).to(backend.device)] for k, a in fp32_state().items()}
    bufs = {k: v[0] for k, v in st.items()}
    st[which] = [torch._neg_view(st[which][0])]
    before = {k: bits_of(t).copy() for k, t in bufs.items()}
    with pytest.raises(ValueError, match=rf"{which}\[0\].*negative bit"):
        step(st)
    for k, t in bufs.items():
        assert_same_bits(bits_of(t), before[k], what=f"{k} changed by a refused step")


# ---- 4. autograd -----------------------------------------------------------------------------

def _x(device: str) -> torch.Tensor:
    return torch.from_numpy(VALUES).to(device)


@pytest.mark.attack("corruption")
def test_cast_out_bumps_the_version_counter(backend):
    # (a) w saved for backward by y = w * w, then overwritten by cast(out=w) under no_grad:
    # backward must raise as it does after w.add_(1).
    w = torch.ones(100, dtype=torch.bfloat16, device=backend.device, requires_grad=True)
    y = w * w
    v0 = w._version
    with torch.no_grad():
        srkern.cast(_x(backend.device), "bfloat16", seed=SEED, out=w)
    assert w._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.attack("corruption")
def test_cast_out_saved_for_backward_raises(backend):
    # (b) t (no grad) saved by y = a * t; cast(out=t) writes 3.0 into it: backward used to give
    # a.grad = 3 instead of 1 silently.
    a = torch.ones(100, device=backend.device, requires_grad=True)
    t = torch.ones(100, device=backend.device)
    y = a * t
    srkern.cast(torch.full((100,), 3.0, dtype=torch.bfloat16, device=backend.device), "float32", out=t)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("what", ["leaf", "view_of_leaf", "non_leaf"])
def test_cast_out_requiring_grad_refused_outside_no_grad(backend, what):
    # (c) torch refuses w.add_(1) on a leaf that requires grad while grad mode is on; srkern's
    # write is invisible to autograd, so it refuses any tensor that requires grad there.
    leaf = torch.full((100,), 1.5, dtype=torch.bfloat16, device=backend.device, requires_grad=True)
    big = torch.full((200,), 1.5, dtype=torch.bfloat16, device=backend.device, requires_grad=True)
    out = {"leaf": leaf, "view_of_leaf": big[50:150], "non_leaf": leaf * 1}[what]
    before = bits_of(out).copy()
    with pytest.raises(ValueError, match="out requires grad.*no_grad"):
        srkern.cast(_x(backend.device), "bfloat16", seed=SEED, out=out)
    assert_same_bits(bits_of(out), before, what="out changed by a refused cast")


@pytest.mark.attack("corruption")
def test_cast_out_inference_tensor_refused_outside_inference_mode(backend):
    with torch.inference_mode():
        out = torch.zeros(100, dtype=torch.bfloat16, device=backend.device)
    with pytest.raises(ValueError, match="out is an inference tensor"):
        srkern.cast(_x(backend.device), "bfloat16", seed=SEED, out=out)
    assert not bits_of(out).any()
    with torch.inference_mode():  # as torch allows: written inside inference mode
        srkern.cast(_x(backend.device), "bfloat16", seed=SEED, out=out)
    assert bits_of(out).any()


def _torch_state(device: str, requires_grad: bool) -> dict:
    st = {k: [torch.from_numpy(a[0]).to(device)] for k, a in fp32_state().items()}
    st["params"][0].requires_grad_(requires_grad)
    return st


@pytest.mark.attack("corruption")
def test_adamw_step_bumps_the_version_counters(backend):
    st = _torch_state(backend.device, True)
    w = st["params"][0]
    y = w * w
    v0 = {k: v[0]._version for k, v in st.items()}
    with torch.no_grad():
        step(st)
    assert [k for k, v in st.items() if v[0]._version <= v0[k]] == ["grads"]  # grads are only read
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.attack("corruption")
def test_adamw_params_requiring_grad_refused_outside_no_grad(backend):
    st = _torch_state(backend.device, True)
    before = {k: bits_of(v[0]).copy() for k, v in st.items()}
    with pytest.raises(ValueError, match=r"params\[0\] requires grad.*no_grad"):
        step(st)
    for k, v in st.items():
        assert_same_bits(bits_of(v[0]), before[k], what=f"{k} changed by a refused step")


@pytest.mark.attack("corruption")
@pytest.mark.parametrize("precision", ["bf16-sr", "fp32-master", "bf16-kahan"])
def test_torch_adamw_step_bumps_every_param_and_state(backend, precision):
    # (d) srkern.torch.AdamW.step goes through adamw's launch: every parameter it wrote (and its
    # state) has a new version, so a graph that saved a weight refuses to backpropagate.
    ps = [torch.nn.Parameter(torch.randn(n, device=backend.device).to(torch.bfloat16)) for n in (3, 70, 1)]
    opt = srt.AdamW(ps, lr=1e-2, precision=precision, seed=SEED)
    for p in ps:
        p.grad = torch.randn_like(p)
    y = ps[1] * ps[1]
    opt.step()  # creates the state
    v0 = [p._version for p in ps]
    s0 = [{k: t._version for k, t in opt.state[p].items()} for p in ps]
    opt.step()
    assert all(p._version > v for p, v in zip(ps, v0))
    for p, s in zip(ps, s0):
        assert all(t._version > s[k] for k, t in opt.state[p].items()), sorted(opt.state[p])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.attack("corruption")
def test_torch_adamw_resolves_a_negative_bit_gradient(backend):
    # A gradient with torch's negative bit (autograd can hand one out: the grad of x.neg() is a
    # lazy negation) is read with its sign: the same bits as the resolved gradient.
    g = torch.randn(70, device=backend.device).to(torch.bfloat16)
    runs = []
    for grad in (torch._neg_view(g), g.neg()):
        p = torch.nn.Parameter(torch.ones(70, device=backend.device, dtype=torch.bfloat16))
        p.grad = grad
        srt.AdamW([p], lr=1e-2, seed=SEED).step()
        runs.append(p.detach())
    assert runs[0].data_ptr() != runs[1].data_ptr()
    assert_same_bits(backend.get(runs[0]), backend.get(runs[1]))


@pytest.mark.attack("corruption")
def test_raw_byte_copies_refuse_memory_that_does_not_hold_its_values():
    # host_bytes / write_host_bytes (checkpoints, broadcasts) copy raw bytes: a byte-swapped or
    # packed-field array would be saved or overwritten as if native.
    from srkern._tensor import host_bytes, write_host_bytes
    swapped = VALUES.astype(">f4")
    with pytest.raises(ValueError, match="non-native byte order"):
        host_bytes(swapped)
    rec = packed("<f4")
    before = rec.tobytes()
    with pytest.raises(ValueError, match="not a multiple of its item size"):
        write_host_bytes(rec["a"], bytes(4 * rec.size))
    assert rec.tobytes() == before
    ro = VALUES.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="is read-only"):
        write_host_bytes(ro, bytes(ro.nbytes))
    assert host_bytes(VALUES) == VALUES.tobytes()


# ---- 5. hyper-parameters valid in float64 but zero or infinite in FP32 -----------------------------

HYPER_CASES = [("lr", 1e-50), ("lr", 1e39), ("eps", 1e-50), ("eps", 1e39), ("eps", -0.0),
               ("eps", 0.0), ("weight_decay", 1e-50), ("weight_decay", 1e39),
               ("betas", (1e-50, 0.99)), ("betas", (0.9, 1e-50)), ("betas", (0.9, 1.0 + 1e-12)),
               ("grad_scale", 1e-50), ("grad_scale", 1e39), ("grad_scale", -1e39),
               ("lr", 3.5e38), ("lr", 2.0 ** -127)]


@pytest.mark.attack("error")
@pytest.mark.parametrize("name,value", HYPER_CASES, ids=[f"{n}={v}" for n, v in HYPER_CASES])
def test_adamw_hyperparameters_outside_fp32_refused(backend, name, value):
    st = fp32_state()
    before = snapshot(st)
    key = "betas" if name == "betas" else name
    with pytest.raises(ValueError, match=rf"{key}(\[\d\])?\b"):
        step(st, **{name: value})
    assert_unchanged(st, before)


@pytest.mark.attack("error")
@pytest.mark.parametrize("name,value", [c for c in HYPER_CASES if c[0] != "grad_scale"],
                         ids=[f"{n}={v}" for n, v in HYPER_CASES if n != "grad_scale"])
def test_torch_adamw_constructor_refuses_fp32_overflow(name, value):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=rf"{name}(\[\d\])?\b"):
        srt.AdamW([p], **{**HYPER, name: value})


@pytest.mark.attack("error")
@pytest.mark.parametrize("value", [1e-50, 1e39, -1e39])
def test_torch_adamw_step_refuses_fp32_overflow_grad_scale(value):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = srt.AdamW([p], **HYPER)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad_scale=value)
    assert torch.equal(p.detach(), torch.ones_like(p)) and not opt.state.get(p)


# ---- 6. cast's boolean and enum arguments ----------------------------------------------------------

BAD_CAST_ARGS = {
    "saturate='no'": ({"saturate": "no"}, TypeError, "saturate"),
    "saturate=1": ({"saturate": 1}, TypeError, "saturate"),
    "saturate=None": ({"saturate": None}, TypeError, "saturate"),
    "rounding=['nearest']": ({"rounding": ["nearest"]}, TypeError, "rounding"),
    "rounding=array": ({"rounding": np.array(["nearest"])}, TypeError, "rounding"),
    "rounding=NEAREST": ({"rounding": "NEAREST"}, ValueError, "rounding"),
    "seed=''-nearest": ({"rounding": "nearest", "seed": ""}, TypeError, "seed"),
    "seed=False-nearest": ({"rounding": "nearest", "seed": False}, TypeError, "seed"),
    "seed=0.0-nearest": ({"rounding": "nearest", "seed": 0.0}, TypeError, "seed"),
    "dtype=None": ({"dtype": None}, ValueError, "dtype"),
    "dtype=float": ({"dtype": float}, ValueError, "dtype"),
    "dtype=3": ({"dtype": 3}, ValueError, "dtype"),
}


@pytest.mark.attack("error")
@pytest.mark.parametrize("case", list(BAD_CAST_ARGS), ids=lambda s: f"bad={s}")
def test_cast_bad_flag_and_enum_arguments(case):
    kw, exc, name = BAD_CAST_ARGS[case]
    kw = {"dtype": "bfloat16", "seed": SEED, **kw}
    out = np.zeros(100, dtype=BF16)
    with pytest.raises(exc, match=name):
        srkern.cast(VALUES, out=out, **kw)
    assert not bits_of(out).any()


@pytest.mark.attack("error")
def test_cast_numpy_bool_saturate(backend):
    # 3.4e38 is above BF16's largest finite value and past the midpoint to the next power of two:
    # nearest rounding gives Inf, or the largest finite value with saturate.
    big = np.full(8, 3.4e38, dtype=np.float32)
    for flag in (True, np.bool_(True)):
        got = srkern.cast(big, "bfloat16", rounding="nearest", saturate=flag)
        assert np.all(np.isfinite(got.astype(np.float32))), flag
    got = srkern.cast(big, "bfloat16", rounding="nearest", saturate=np.bool_(False))
    assert np.all(np.isinf(got.astype(np.float32)))


# ---- 7. a bounded fuzz of the argument validators -----------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

ANY = st.one_of(
    st.integers(), st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.just(10 ** 400),
    st.sampled_from([2 ** 64 - 1, 2 ** 64, 2 ** 32 - 1, 2 ** 32, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from([1e-50, 1e39, -0.0, 2.0 ** -126, 2.0 ** -127, 3.4028235e38, 3.4028236e38, 1.0 - 1e-17]),
    st.booleans(), st.text(max_size=4), st.none(),
    st.sampled_from(["stochastic", "nearest", "bfloat16", "float8_e4m3fn", "float32", "0", "1e-3"]),
    st.builds(np.float32, st.floats(width=32)), st.builds(np.float16, st.floats(width=16)),
    st.builds(np.float64, st.floats()), st.builds(np.int64, st.integers(-2 ** 63, 2 ** 63 - 1)),
    st.builds(np.uint64, st.integers(0, 2 ** 64 - 1)), st.builds(np.bool_, st.booleans()),
    st.builds(np.longdouble, st.floats()), st.complex_numbers(max_magnitude=10),
    st.lists(st.integers(), max_size=2), st.tuples(st.floats(), st.floats()),
    st.builds(np.array, st.floats()), st.just(object()), st.just(np.float32), st.just(torch.bfloat16),
)
OK_EXC = (ValueError, TypeError)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@pytest.mark.attack("fuzz")
@FUZZ
@given(value=ANY, limit=st.sampled_from([_contract.U64, _contract.U32, 1, 5]), n=st.integers(0, 2 ** 65))
def test_fuzz_check_u64_and_offset(value, limit, n):
    try:
        got = _contract.check_u64("arg_x", value, limit)
    except OK_EXC as e:
        assert "arg_x" in str(e)
    else:
        assert type(got) is int and _is_int(value) and got == int(value) and 0 <= got < limit
    try:
        got = _contract.check_offset("offset", value, n)
    except OK_EXC:
        pass
    else:
        assert type(got) is int and _is_int(value) and got == int(value) and 0 <= got and got + max(n, 1) <= 2 ** 64


def _fp32_ok(v: float, lo: float, lo_open: bool, hi) -> bool:
    with np.errstate(over="ignore"):
        f = float(np.float32(v))
    return (type(v) is float and math.isfinite(f) and v >= lo and not (lo_open and v == lo)
            and (hi is None or v < hi) and (v == 0.0 or abs(f) >= 2.0 ** -126))


@pytest.mark.attack("fuzz")
@FUZZ
@given(value=ANY, bounds=st.sampled_from([(0.0, False, None), (0.0, True, None), (0.0, False, 1.0),
                                          (-math.inf, False, None)]))
def test_fuzz_check_f32(value, bounds):
    try:
        got = _contract.check_f32("hyper_h", value, *bounds)
    except OK_EXC as e:
        assert "hyper_h" in str(e)
    else:
        assert _fp32_ok(got, *bounds), (value, got)
        assert got == float(value) and not isinstance(value, (bool, np.bool_, str))


@pytest.mark.attack("fuzz")
@FUZZ
@given(lr=ANY, b1=ANY, b2=ANY, eps=ANY, wd=ANY, gs=ANY, pair=st.booleans())
def test_fuzz_check_hyperparameters(lr, b1, b2, eps, wd, gs, pair):
    betas = (b1, b2) if pair else b1
    try:
        got = check_hyperparameters(lr, betas, eps, wd, gs)
    except OK_EXC:
        return
    lr_, (b1_, b2_), eps_, wd_, gs_ = got
    assert _fp32_ok(lr_, 0.0, False, None) and _fp32_ok(wd_, 0.0, False, None)
    assert _fp32_ok(b1_, 0.0, False, 1.0) and _fp32_ok(b2_, 0.0, False, 1.0)
    assert _fp32_ok(eps_, 0.0, True, None) and _fp32_ok(gs_, -math.inf, False, None)


_CAST_X = VALUES[:17]
_CANON = {}


def _canonical(dtype: str, rounding: str, seed: int, offset: int, step: int, stream: int, saturate: bool):
    key = (dtype, rounding, seed, offset, step, stream, saturate)
    if key not in _CANON:
        _CANON[key] = bits_of(srkern.cast(_CAST_X, dtype, rounding=rounding, seed=seed, offset=offset,
                                          step=step, stream=stream, saturate=saturate)).copy()
    return _CANON[key]


@pytest.mark.attack("fuzz")
@FUZZ
@given(arg=st.sampled_from(["seed", "step", "stream", "offset", "saturate", "rounding", "dtype", "x_dtype"]),
       value=ANY, nearest=st.booleans())
def test_fuzz_cast_arguments(arg, value, nearest):
    # One argument at a time replaced by an arbitrary object: cast either refuses it with
    # ValueError/TypeError or returns exactly the cast that the valid spelling of it gives.
    kw = {"dtype": "bfloat16", "rounding": "nearest" if nearest else "stochastic", "seed": 7,
          "offset": 0, "step": 0, "stream": 0, "saturate": False, arg: value}
    try:
        got = srkern.cast(_CAST_X, kw.pop("dtype"), **kw)
    except OK_EXC:
        return
    valid = {
        "seed": _is_int(value) and 0 <= int(value) < 2 ** 64 or value is None,
        "step": _is_int(value) and 0 <= int(value) < 2 ** 32,
        "stream": _is_int(value) and 0 <= int(value) < 2 ** 32,
        "offset": _is_int(value) and 0 <= int(value) <= 2 ** 64 - _CAST_X.size,
        "saturate": isinstance(value, (bool, np.bool_)),
        "rounding": isinstance(value, str) and value in ("stochastic", "nearest"),
        "dtype": True,  # any spelling of a format; the result's dtype says which
        "x_dtype": value is None,  # x is float32: only a uint8 x takes x_dtype
    }[arg]
    assert valid, f"cast accepted {arg}={value!r}"
    if arg == "x_dtype" or (arg == "seed" and value is None and not nearest):
        return  # the default itself, or a drawn seed: nothing to compare against
    if arg == "seed" and value is None:
        value = 0  # nearest rounding draws no bits: any seed gives the same result
    canon = dict(dtype="bfloat16", rounding="nearest" if nearest else "stochastic", seed=7, offset=0,
                 step=0, stream=0, saturate=False)
    canon[arg] = {"saturate": bool, "rounding": str, "dtype": lambda v: srkern.formats.dtype_name(got.dtype)}.get(arg, int)(value)
    if canon["dtype"] == "float32":
        return  # float32 -> float32 is refused; not reachable
    assert_same_bits(bits_of(got), _canonical(**canon), what=f"cast with {arg}={value!r}")
