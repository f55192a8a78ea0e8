"""srkern.torch.SGD, Lion and Adafactor (srkern/_torch_optim.py): the classes against their
functional forms bit for bit (buckets, groups, layout offsets, step counts), against torch's own
optimizers in ``fp32``, torch's conventions (state dicts both ways, GradScaler, found_inf, tensor
lr, non-contiguous and complex parameters), and all-or-nothing steps.

The functional forms are bit-exact against the NumPy oracle on every backend (tests/test_sgd.py,
test_lion.py, test_adafactor.py); here the classes are checked to call them with the arguments the
bit contract fixes, so these run on the default backend only.
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import srkern  # noqa: E402
import srkern.torch as srt  # noqa: E402
from srkern.testing import assert_same_bits  # noqa: E402

from conftest import save_and_load  # noqa: E402

MODES = ("bf16-sr", "bf16-nearest", "bf16-kahan", "fp32-master", "fp32")
SEED = 77
# (class, class hyper-parameters, the functional form, its state lists from a parameter's state)
SGD_H = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True)
LION_H = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
AF_H = dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.01)
CLASSES = {"sgd": (srt.SGD, SGD_H), "lion": (srt.Lion, LION_H), "adafactor": (srt.Adafactor, AF_H)}


def model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3)).to(dtype)


def backward(m: torch.nn.Module, t: int) -> None:
    g = torch.Generator().manual_seed(500 + t)
    dtype = next(m.parameters()).dtype
    x = torch.randn(32, 12, generator=g).to(dtype)
    m.zero_grad(set_to_none=True)
    m(x).float().pow(2).mean().backward()


def functional_step(name: str, prec: str, params, grads, states, step: int, offsets, first: bool, h: dict) -> None:
    """The functional form on one list: what one bucket of the class must run."""
    masters = [st["master"] for st in states] if prec == "fp32-master" else None
    comp = [st["compensation"] for st in states] if prec == "bf16-kahan" else None
    common = dict(precision=prec, master_params=masters, compensation=comp, seed=SEED, step=step, offsets=offsets)
    with torch.no_grad():
        _functional(name, params, grads, states, first, h, common)


def _functional(name, params, grads, states, first, h, common):
    if name == "sgd":
        srkern.sgd_step(params, grads, [st["momentum_buffer"] for st in states], **h, first_step=first, **common)
    elif name == "lion":
        srkern.lion_step(params, grads, [st["exp_avg"] for st in states], **h, **common)
    else:
        srkern.adafactor_step(params, grads, [st.get("row_var") for st in states],
                              [st.get("col_var") for st in states], [st.get("variance") for st in states],
                              **h, **common)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CLASSES))
def test_class_is_its_functional_form(name, mode):
    # Two groups (the second with other hyper-parameters), three steps, the first parameter
    # without a gradient at step 2 (its count lags): every bit equals the functional form run on
    # each parameter with its flat offset, its own step count and its own state.
    cls, h = CLASSES[name]
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    m1, m2 = model(dtype), model(dtype)
    h2 = {**h, "lr": h["lr"] / 2}
    p1, p2 = list(m1.parameters()), list(m2.parameters())
    opt = cls([{"params": p1[:2]}, {"params": p1[2:], "lr": h2["lr"]}], **h, precision=mode, seed=SEED)
    ref = cls(p2, **h, precision=mode, seed=SEED)  # only for fresh states of the same layout
    offsets = [0]
    for p in p1[:-1]:
        offsets.append(offsets[-1] + p.numel())
    counts = [0] * len(p2)
    for t in range(3):
        backward(m1, t)
        backward(m2, t)
        if t == 1:
            p1[0].grad = None
            p2[0].grad = None
        opt.step()
        for i, p in enumerate(p2):
            if p.grad is None:
                continue
            group_h = h if i < 2 else h2
            prec = mode
            st = ref.state.get(p) or ref._fill_state(ref.param_groups[0], p, prec, {})
            ref.state[p] = st
            first = name == "sgd" and counts[i] == 0
            functional_step(name, prec, [p], [p.grad], [st], counts[i] + 1, [offsets[i]], first, group_h)
            counts[i] += 1
    for i, (a, b) in enumerate(zip(p1, p2)):
        assert_same_bits(a.detach(), b.detach(), f"{name} {mode} parameter {i}")
        assert int(opt.state[a]["step"]) == counts[i]
        for k, v in opt.state[a].items():
            if k != "step":
                assert_same_bits(v, ref.state[b][k], f"{name} {mode} parameter {i} state {k}")


@pytest.mark.parametrize("name", ["sgd", "adafactor"])
def test_fp32_tracks_torch(name):
    # fp32 on FP32 parameters against torch's own optimizer, 5 steps: within a small multiple of
    # FP32 rounding of the weights' scale (the functional tests bound the per-step error against
    # float64; here the classes are checked to carry torch's hyper-parameter meanings).
    cls, h = CLASSES[name]
    torch_cls = torch.optim.SGD if name == "sgd" else torch.optim.Adafactor
    m1, m2 = model(torch.float32), model(torch.float32)
    a = cls(m1.parameters(), **h, precision="fp32", seed=SEED)
    b = torch_cls(m2.parameters(), **h)
    for t in range(5):
        backward(m1, t)
        backward(m2, t)
        a.step()
        b.step()
    for x, y in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip_continues_bit_identically(name):
    # fp32-master: the FP32 master copy must come back FP32 (torch's loader alone casts state to
    # the BF16 parameter's dtype); save after 2 steps, load into a fresh optimizer, 2 more.
    cls, h = CLASSES[name]
    m1, m2 = model(torch.bfloat16), model(torch.bfloat16)
    a = cls(m1.parameters(), **h, precision="fp32-master", seed=SEED)
    b = cls(m2.parameters(), **h, precision="fp32-master", seed=SEED)
    for t in range(2):
        for m, o in ((m1, a), (m2, b)):
            backward(m, t)
            o.step()
    sd = save_and_load(b.state_dict(), weights_only=True)
    b2 = cls(m2.parameters(), **h, precision="bf16-sr", seed=1)  # settings come from the dict
    b2.load_state_dict(sd)
    assert b2.param_groups[0]["precision"] == "fp32-master" and b2.param_groups[0]["seed"] == SEED
    for st in b2.state.values():
        assert st["master"].dtype == torch.float32
    for t in range(2, 4):
        backward(m1, t)
        a.step()
        backward(m2, t)
        b2.step()
    for x, y in zip(m1.parameters(), m2.parameters()):
        assert_same_bits(x.detach(), y.detach(), name)


@pytest.mark.parametrize("name", ["sgd", "adafactor"])
def test_loads_torch_optimizer_state_dict(name):
    # torch's own optimizer's state dict loads (its FP32 statistics kept FP32, the missing step
    # count and master made at the next step), and the next step runs.
    cls, h = CLASSES[name]
    torch_cls = torch.optim.SGD if name == "sgd" else torch.optim.Adafactor
    m = model(torch.float32)
    t_opt = torch_cls(m.parameters(), **h)
    backward(m, 0)
    t_opt.step()
    mb = model(torch.bfloat16)
    opt = cls(mb.parameters(), **h, precision="bf16-sr", seed=SEED)
    opt.load_state_dict(t_opt.state_dict())
    st = opt.state[next(mb.parameters())]
    key = "momentum_buffer" if name == "sgd" else "row_var"
    assert st[key].dtype == torch.float32
    backward(mb, 1)
    opt.step()
    assert torch.isfinite(next(mb.parameters())).all()


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_group_changes_nothing(name):
    # The second group's lr made invalid after construction: the step raises naming the group,
    # and the first group's parameters and every state are as before.
    cls, h = CLASSES[name]
    m = model(torch.bfloat16)
    ps = list(m.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:]}], **h, seed=SEED)
    backward(m, 0)
    before = [p.detach().clone() for p in ps]
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.step()
    for p, q in zip(ps, before):
        assert_same_bits(p.detach(), q)
    assert not opt.state


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_state_in_a_later_bucket_changes_nothing(name):
    # The second group's state refused inside its bucket's checks (after the first bucket's
    # passed): no parameter and no state of either group changes.
    cls, h = CLASSES[name]
    m = model(torch.bfloat16)
    ps = list(m.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:]}], **h, seed=SEED)
    backward(m, 0)
    opt.step()
    backward(m, 1)
    key = {"sgd": "momentum_buffer", "lion": "exp_avg", "adafactor": "row_var"}[name]
    st = opt.state[ps[2]]
    st[key] = st[key].to(torch.float16)
    before = [p.detach().clone() for p in ps]
    states = copy.deepcopy({i: opt.state[p] for i, p in enumerate(ps)})
    with pytest.raises(TypeError, match=r"param_groups\[1\]"):
        opt.step()
    for i, (p, q) in enumerate(zip(ps, before)):
        assert_same_bits(p.detach(), q)
        for k, v in states[i].items():
            assert_same_bits(opt.state[p][k], v, f"parameter {i} state {k}")


@pytest.mark.parametrize("name", list(CLASSES))
def test_found_inf_and_grad_scale(name):
    # found_inf non-zero: nothing changes, no count advances; grad_scale=s on gradients times 1/s
    # is bit-identical to the plain step (power-of-two scale: exact).
    cls, h = CLASSES[name]
    m1, m2 = model(torch.bfloat16), model(torch.bfloat16)
    a = cls(m1.parameters(), **h, seed=SEED)
    b = cls(m2.parameters(), **h, seed=SEED)
    backward(m1, 0)
    before = [p.detach().clone() for p in m1.parameters()]
    a.step(found_inf=torch.ones(1))
    for p, q in zip(m1.parameters(), before):
        assert_same_bits(p.detach(), q)
    assert not a.state
    a.step()
    backward(m2, 0)
    for p in m2.parameters():
        p.grad.mul_(8.0)
    b.step(grad_scale=0.125)
    for x, y in zip(m1.parameters(), m2.parameters()):
        assert_same_bits(x.detach(), y.detach(), name)


def test_sgd_complex_is_real_pairs_and_lion_refuses_complex():
    torch.manual_seed(1)
    z = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    z.grad = torch.randn(5, dtype=torch.complex64)
    r.grad = torch.view_as_real(z.grad).clone()
    a = srt.SGD([z], **SGD_H, seed=SEED)
    b = srt.SGD([r], **SGD_H, seed=SEED)
    for _ in range(2):
        a.step()
        b.step()
    assert_same_bits(torch.view_as_real(z.detach()), r.detach())
    with pytest.raises(TypeError, match="complex"):
        srt.Lion([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="complex"):
        srt.Adafactor([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


@pytest.mark.parametrize("name", list(CLASSES))
def test_noncontiguous_parameter_same_bits(name):
    cls, h = CLASSES[name]
    torch.manual_seed(2)
    base = torch.randn(6, 8).to(torch.bfloat16)
    a = torch.nn.Parameter(base.t())  # non-contiguous
    b = torch.nn.Parameter(base.t().contiguous())
    oa, ob = cls([a], **h, seed=SEED), cls([b], **h, seed=SEED)
    for t in range(2):
        g = torch.randn(8, 6, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert not a.is_contiguous()
    assert_same_bits(a.detach().contiguous(), b.detach())


def test_errors_name_the_argument():
    p = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="Nesterov"):
        srt.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        srt.SGD(p, lr=-0.1)
    with pytest.raises(ValueError, match="fp16-sr"):
        srt.Lion(p, precision="fp16-sr")
    with pytest.raises(TypeError, match="float16"):
        srt.SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], lr=0.1)
    with pytest.raises(ValueError, match="beta2_decay"):
        srt.Adafactor(p, beta2_decay=0.5)
    with pytest.raises(NotImplementedError):
        srt.SGD(p, lr=0.1, differentiable=True)
    opt = srt.Lion(p)
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))],
                             "betas": (0.9, 1.5)})
    assert len(opt.param_groups) == 1  # refused: all or nothing


@pytest.mark.parametrize("name", list(CLASSES))
def test_grad_scaler_and_tensor_lr_and_deepcopy(name):
    # GradScaler on the CPU: its scale divides inside the kernel; a tensor lr equals the float;
    # a deepcopy steps to the same bits.
    cls, h = CLASSES[name]
    m1, m2 = model(torch.bfloat16), model(torch.bfloat16)
    a = cls(m1.parameters(), **{**h, "lr": torch.tensor(h["lr"])}, seed=SEED)
    b = cls(m2.parameters(), **h, seed=SEED)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(32, 12, generator=g).to(torch.bfloat16)
    scaler.scale(m1(x).float().pow(2).mean()).backward()
    scaler.step(a)
    scaler.update()
    m2(x).float().pow(2).mean().backward()
    b.step()
    for x1, x2 in zip(m1.parameters(), m2.parameters()):
        assert_same_bits(x1.detach(), x2.detach(), name)
    c = copy.deepcopy(b)
    assert c.state and all(k in c.state[next(iter(c.state))] for k in ("step",))


def _stepped(name: str, steps: int = 2, **kw):
    cls, h = CLASSES[name]
    m = model(torch.bfloat16)
    ps = list(m.parameters())
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "precision": "fp32-master", "seed": 123}], **h,
              seed=SEED, **kw)
    for t in range(steps):
        backward(m, t)
        opt.step()
    return m, opt


def _snapshot(opt):
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})


BAD_DICTS = {
    "group lr": lambda sd: sd["param_groups"][1].update(lr=-1.0),
    "group seed": lambda sd: sd["param_groups"][0].update(seed=-5),
    "state_dtype": lambda sd: sd["param_groups"][0].update(state_dtype="int8"),
    "step shape": lambda sd: sd["state"][3].update(step=torch.zeros(2)),
    "step None": lambda sd: sd["state"][3].update(step=None),
    "step too big": lambda sd: sd["state"][3].update(step=torch.tensor(2.0 ** 25)),
    "unknown entry": lambda sd: sd["state"][0].update(exp_avg_sq=torch.zeros(1)),
    "bad shape": lambda sd: sd["state"][0].update(master=torch.zeros(7)),
    "group size": lambda sd: sd["param_groups"][0]["params"].pop(),
}


@pytest.mark.parametrize("bad", list(BAD_DICTS))
@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_state_dict_loads_nothing(name, bad):
    m, opt = _stepped(name)
    sd = copy.deepcopy(opt.state_dict())
    BAD_DICTS[bad](sd)
    before = _snapshot(opt)
    with pytest.raises((ValueError, TypeError)):
        opt.load_state_dict(sd)
    after = _snapshot(opt)
    assert after[0] == before[0]
    for pid, st in before[1].items():
        for k, v in st.items():
            assert_same_bits(after[1][pid][k], v, f"{bad}: state {k}")


@pytest.mark.parametrize("name", list(CLASSES))
def test_load_copies_state_and_keeps_group_settings(name):
    # The loaded optimizer owns its state (step counts included: a shared step tensor would
    # advance with the source); a state dict without srkern's settings (torch's) keeps each
    # group's own; load hooks run, a pre-hook's replacement dict is the one loaded.
    m, opt = _stepped(name)
    cls, h = CLASSES[name]
    m2 = model(torch.bfloat16)
    ps = list(m2.parameters())
    o2 = cls([{"params": ps[:2]}, {"params": ps[2:], "precision": "fp32-master", "seed": 123}], **h, seed=SEED)
    sd = opt.state_dict()
    # (the same state tensors: a load must copy them)
    torch_like = {"state": sd["state"], "param_groups": [
        {k: v for k, v in g.items() if k not in ("precision", "state_dtype", "seed")} for g in sd["param_groups"]]}
    seen = []
    o2.register_load_state_dict_pre_hook(lambda o, d: (seen.append("pre"), torch_like)[1])
    o2.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    o2.load_state_dict(sd)
    assert seen == ["pre", "post"]
    assert [(g["precision"], g["seed"]) for g in o2.param_groups] == [("bf16-sr", SEED), ("fp32-master", 123)]
    p0 = next(iter(opt.state))
    q0 = list(o2.state)[0]
    assert o2.state[q0]["step"] is not opt.state[p0]["step"]
    backward(m, 5)
    opt.step()
    assert int(o2.state[q0]["step"]) == 2 and int(opt.state[p0]["step"]) == 3


def test_sgd_loads_torch_dict_with_missing_buffers_and_momentum_schedules():
    # torch.optim.SGD's dict where one parameter had no gradient: FP32 buffers kept, the missing
    # one made in the group's dtype at the next step; the launches split by state dtype. Then
    # momentum scheduled to 0 with nesterov=True: plain SGD steps (torch checks nesterov only
    # at construction), and the optimizer reloads its own dict.
    m = model(torch.float32)
    t_opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    backward(m, 0)
    list(m.parameters())[-1].grad = None
    t_opt.step()
    mb = model(torch.bfloat16)
    opt = srt.SGD(mb.parameters(), lr=0.05, momentum=0.9, nesterov=True, seed=SEED)
    opt.load_state_dict(t_opt.state_dict())
    for t in range(1, 3):
        backward(mb, t)
        opt.step()
    dtypes = [opt.state[p]["momentum_buffer"].dtype for p in mb.parameters()]
    assert dtypes == [torch.float32] * 3 + [torch.bfloat16]
    opt.param_groups[0]["momentum"] = 0.0
    backward(mb, 3)
    opt.step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    backward(mb, 4)
    opt.step()
