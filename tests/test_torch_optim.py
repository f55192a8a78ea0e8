"""srkern.torch.AdamW: agreement with torch.optim.AdamW, parameter groups, skipped parameters,
checkpoints (bit-exact continuation) and refused state dicts."""
from __future__ import annotations

import copy
import re

import pytest

torch = pytest.importorskip("torch")
import srkern.torch as srt  # noqa: E402
from srkern.checkpoint import CheckpointCorrupt, CheckpointMismatch  # noqa: E402
from srkern._torch_ops import TORCH_DTYPES  # noqa: E402
from srkern.precisions import PRECISIONS, param_dtype  # noqa: E402
from srkern.testing import assert_same_bits  # noqa: E402

from conftest import save_and_load  # noqa: E402

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def steps(opt) -> set[int]:
    """The distinct per-parameter step counts of an optimizer's state."""
    return {int(st["step"]) for st in opt.state.values() if st}


def small_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def batch(t: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(64, 16, generator=g)
    y = torch.sin(x[:, :4] * 2.0) + 0.1 * x[:, 4:8]
    return x.to(dtype), y.to(dtype)


def loss_of(model: torch.nn.Module, t: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    x, y = batch(t, dtype)
    return (model(x).float() - y.float()).pow(2).mean()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps) -> None:
    """Steps ``t`` of ``steps`` on batch ``t``."""
    for t in steps:
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()


def trained(dtype, precision: str, steps: int) -> tuple[torch.nn.Module, "srt.AdamW"]:
    """``small_model`` and its srkern AdamW (seed 42, ``HYPER``) after ``steps`` steps."""
    model = small_model(dtype)
    opt = srt.AdamW(model.parameters(), precision=precision, seed=42, **HYPER)
    train(model, opt, range(steps))
    return model, opt


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # bit-exact against torch's CPU kernels


def test_fp32_matches_torch_adamw_over_100_steps():
    # Same model, data and hyper-parameters: srkern "fp32" and torch.optim.AdamW (FP32) differ
    # only in the last-bit order of operations (1/sqrt(bc2) multiplied, not divided; lerp vs
    # b1*m + (1-b1)*g), so after 100 steps the weights agree to 1e-4 absolute (lr 1e-2; the
    # weights moved by ~0.8). Measured gap ~4e-7; the bound leaves room for chaotic growth.
    a, b = small_model(), small_model()
    opt_a = srt.AdamW(a.parameters(), precision="fp32", seed=0, **HYPER)
    opt_b = torch.optim.AdamW(b.parameters(), foreach=False, **HYPER)
    start = flat(a)
    for t in range(100):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            loss_of(m, t).backward()
            o.step()
    gap = (flat(a) - flat(b)).abs().max().item()
    moved = (flat(a) - start).abs().max().item()
    assert moved > 0.1, f"weights moved only {moved}"
    assert gap < 1e-4, f"srkern fp32 vs torch AdamW: max |diff| {gap} after 100 steps"


def test_fp32_master_matches_torch_mixed_precision_over_100_steps():
    # (BF16, FP32) mixed precision over 100 steps of the BF16 model: srkern "fp32-master" against
    # torch.optim.AdamW stepping FP32 master weights. Both get the same gradients each step (the
    # BF16 model's, from srkern's run), so any gap is the optimizers' arithmetic, not the chaos of
    # a BF16 weight flipping: masters agree to 1e-5 absolute (measured ~1e-7; lr 1e-2).
    a = small_model(torch.bfloat16)
    opt_a = srt.AdamW(a.parameters(), precision="fp32-master", seed=0, **HYPER)
    masters = [p.detach().float().clone().requires_grad_(True) for p in a.parameters()]
    opt_b = torch.optim.AdamW(masters, foreach=False, **HYPER)
    for t in range(100):
        opt_a.zero_grad()
        loss_of(a, t).backward()
        for w, p in zip(masters, a.parameters(), strict=True):
            w.grad = p.grad.float()
        opt_a.step()
        opt_b.step()
    ma = torch.cat([opt_a.state[p]["master"].reshape(-1) for p in a.parameters()])
    mb = torch.cat([w.detach().reshape(-1) for w in masters])
    gap = (ma - mb).abs().max().item()
    assert gap < 1e-5, f"fp32-master vs torch mixed precision: max |diff| {gap}"
    # The BF16 model copy is the master rounded to nearest.
    assert_same_bits(torch.cat([p.detach().reshape(-1) for p in a.parameters()]), ma.to(torch.bfloat16),
                     what="BF16 weights vs rn(master)")


MODES = list(PRECISIONS)


@pytest.mark.parametrize("precision", MODES, ids=[f"mode={m}" for m in MODES])
def test_state_dict_round_trip_continues_bit_exact(precision):
    # Save model + optimizer after 4 steps (through torch.save, weights_only load), restore
    # into fresh objects, run 4 more steps: bit-identical to 8 uninterrupted steps.
    dtype = TORCH_DTYPES[param_dtype(precision)]  # FP16 weights for fp16-sr

    ref, _ = trained(dtype, precision, 8)

    m1, o1 = trained(dtype, precision, 4)
    ck = save_and_load({"model": m1.state_dict(), "opt": o1.state_dict()}, weights_only=True)
    m2 = small_model(dtype)
    m2.load_state_dict(ck["model"])
    o2 = srt.AdamW(m2.parameters(), precision=precision, seed=None, **HYPER)  # seed from checkpoint
    o2.load_state_dict(ck["opt"])
    assert o2.seed == 42 and all(float(o2.state[p]["step"]) == 4 for p in m2.parameters())
    if precision == "fp32-master":
        assert o2.state[next(m2.parameters())]["master"].dtype == torch.float32
    train(m2, o2, range(4, 8))
    for (name, p), q in zip(ref.named_parameters(), m2.parameters(), strict=True):
        assert_same_bits(q, p, what=f"{precision}: {name} after resume")


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("precision", ["bf16-sr", "fp32-master"], ids=lambda m: f"mode={m}")
def test_copies_and_pickles_continue_bit_exact(precision, how):
    # torch's Optimizer.__getstate__ keeps defaults, state and param_groups only: srkern's step
    # count, seed and precision must travel too. Model and optimizer copied together (so the
    # copy's groups hold the copied parameters), 4 more steps: the bits of 8 uninterrupted ones.
    import pickle
    dtype = torch.bfloat16

    ref, _ = trained(dtype, precision, 8)
    m1, o1 = trained(dtype, precision, 4)
    if how == "deepcopy":
        m2, o2 = copy.deepcopy((m1, o1))
    elif how == "pickle":
        m2, o2 = pickle.loads(pickle.dumps((m1, o1)))
    else:
        m2, o2 = save_and_load((m1, o1), weights_only=False)
    assert (o2.seed, steps(o2), o2.precision) == (42, {4}, precision)
    train(m2, o2, range(4, 8))
    train(m1, o1, range(4, 8))  # the original goes on unchanged by the copy
    for (name, p), q, r in zip(ref.named_parameters(), m2.parameters(), m1.parameters(), strict=True):
        assert_same_bits(q, p, what=f"{precision}, {how}: {name} of the copy")
        assert_same_bits(r, p, what=f"{precision}, {how}: {name} of the original")


def test_refused_add_param_group_leaves_the_groups_as_they_were():
    # A group refused by srkern's checks (lr=-1; an FP32 parameter in a bf16 mode) used to stay
    # in param_groups, so every later step raised.
    m = small_model(torch.bfloat16)
    opt = srt.AdamW(list(m.parameters())[:2], seed=1, **HYPER)
    rest = list(m.parameters())[2:]
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": rest, "lr": -1.0})
    with pytest.raises(TypeError, match="no update for torch.int64 parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)]})
    assert len(opt.param_groups) == 1 and opt.layout() == [0, 512]
    loss_of(m, 0).backward()
    opt.step()  # the optimizer still works
    opt.add_param_group({"params": rest})
    assert len(opt.param_groups) == 2


def test_torch_keywords_and_maximize():
    # torch.optim.AdamW's keywords at their defaults (and foreach/fused/capturable at any value)
    # are accepted; maximize=True is the step on negated gradients, bit for bit; amsgrad and
    # differentiable are refused clearly.
    kw = dict(foreach=None, fused=None, maximize=False, capturable=False, differentiable=False, amsgrad=False)
    runs = []
    for maximize, sign in ((True, 1.0), (False, -1.0)):
        m = small_model(torch.bfloat16)
        opt = srt.AdamW(m.parameters(), seed=3, **HYPER, **dict(kw, maximize=maximize, fused=True))
        assert opt.param_groups[0]["maximize"] is maximize
        for t in range(3):
            opt.zero_grad()
            loss_of(m, t).backward()
            for p in m.parameters():
                p.grad.mul_(sign)
            opt.step()
        runs.append(list(m.parameters()))
    for a, b in zip(*runs, strict=True):
        assert_same_bits(a, b, what="maximize vs negated gradients")
    with pytest.raises(NotImplementedError, match="amsgrad"):
        srt.AdamW(small_model(torch.bfloat16).parameters(), amsgrad=True)
    with pytest.raises(NotImplementedError, match="not differentiable"):
        srt.AdamW(small_model(torch.bfloat16).parameters(), differentiable=True)
    with pytest.raises(TypeError, match="maximize must be a bool"):
        srt.AdamW(small_model(torch.bfloat16).parameters(), maximize="yes")


def test_param_groups_skip_and_layout():
    # Two groups with their own lr; a parameter without a gradient is skipped (unchanged, no
    # state) but keeps its place in the layout, so the others equal the functional call with
    # the same offsets.
    import srkern
    torch.manual_seed(3)
    p1 = torch.nn.Parameter(torch.randn(37).to(torch.bfloat16))
    p2 = torch.nn.Parameter(torch.randn(5, 3).to(torch.bfloat16))
    p3 = torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))
    opt = srt.AdamW([{"params": [p1, p2]}, {"params": [p3], "lr": 1e-3}], lr=1e-2, seed=7)
    assert opt.layout() == [0, 37, 52]
    before2 = p2.detach().clone()
    g1, g3 = torch.randn(37).to(torch.bfloat16), torch.randn(100).to(torch.bfloat16)
    p1.grad, p3.grad = g1.clone(), g3.clone()
    q1, q3 = p1.detach().clone(), p3.detach().clone()
    opt.step()
    assert_same_bits(p2, before2, what="skipped parameter")
    assert len(opt.state[p2]) == 0
    z = lambda n: torch.zeros(n, dtype=torch.bfloat16)  # noqa: E731
    m1, v1, m3, v3 = z(37), z(37), z(100), z(100)
    srkern.adamw_step([q1], [g1], [m1], [v1], step=1, lr=1e-2, weight_decay=0.01, seed=7, offsets=[0])
    srkern.adamw_step([q3], [g3], [m3], [v3], step=1, lr=1e-3, weight_decay=0.01, seed=7, offsets=[52])
    assert_same_bits(p1, q1, what="group 0 vs functional")
    assert_same_bits(p3, q3, what="group 1 vs functional")
    opt.zero_grad()
    assert p1.grad is None and p3.grad is None


def test_bytes_per_param_and_checks():
    model = small_model(torch.bfloat16)
    assert srt.AdamW(model.parameters(), seed=0).bytes_per_param() == 6
    assert srt.AdamW(model.parameters(), seed=0, state_dtype="float32").bytes_per_param() == 10
    assert srt.AdamW(model.parameters(), seed=0, precision="fp32-master").bytes_per_param() == 14
    with pytest.raises(TypeError, match="precision 'fp32' has no update for torch.bfloat16 parameters"):
        srt.AdamW(model.parameters(), precision="fp32")
    with pytest.raises(ValueError, match="lr"):
        srt.AdamW(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="precision"):
        srt.AdamW(model.parameters(), precision="fp8")


def _saved_state_dict() -> dict:
    """The state dict of a bf16-sr AdamW (seed 1) after one step of the small BF16 model."""
    a = small_model(torch.bfloat16)
    oa = srt.AdamW(a.parameters(), seed=1, **HYPER)
    loss_of(a, 0).backward()
    oa.step()
    return copy.deepcopy(oa.state_dict())


def _set(*path, value):
    """A damage that sets ``sd[path[0]][path[1]]... = value``."""
    def hurt(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(d[path[-1]]) if callable(value) else value
    return hurt


# name: (the damage, the loading optimizer's settings, the error class, the message naming the cause)
REFUSED = {
    "not a state dict": (lambda sd: sd.pop("state"), {}, CheckpointMismatch,
                         "not an optimizer state dict (needs 'state' (a dict) and 'param_groups' (a list))"),
    "format version": (_set("srkern", "format_version", value=3), {}, CheckpointMismatch,
                       "not a srkern.torch.AdamW v2 checkpoint (format 'srkern.torch.AdamW', version 3)"),
    "contract": (_set("srkern", "contract", value="2.0"), {}, CheckpointMismatch, "written under bit contract v2.0"),
    "precision": (lambda sd: None, {"precision": "bf16-kahan"}, CheckpointMismatch,
                  "param_groups[0] precision: 'bf16-sr' in the checkpoint, 'bf16-kahan' here"),
    "state dtype": (lambda sd: None, {"state_dtype": "float32"}, CheckpointMismatch,
                    "param_groups[0] state_dtype: 'bfloat16' in the checkpoint, 'float32' here"),
    "fewer parameters": (lambda sd: None, {"first": 2}, CheckpointMismatch,
                         "layout: 4 parameters in the checkpoint, 2 here"),
    "layout": (_set("srkern", "offsets", 1, value=lambda o: o + 8), {}, CheckpointMismatch,
               "layout differs at parameter 1: (520, 32) in the checkpoint, (512, 32) here"),
    "moment dtype": (_set("state", 0, "exp_avg", value=lambda t: t.float()), {}, CheckpointMismatch,
                     "state[0]['exp_avg'] is torch.float32; this optimizer keeps it as torch.bfloat16"),
    "moment size": (_set("state", 2, "exp_avg_sq", value=lambda t: t.reshape(-1)[:-1]), {}, CheckpointMismatch,
                    "state[2]['exp_avg_sq'] has shape (127,), parameter 2 has (4, 32)"),
    "hyper-parameter": (_set("param_groups", 0, "lr", value=float("nan")), {}, CheckpointCorrupt,
                        "parameter group 0: lr"),
    "step": (_set("state", 1, "step", value=torch.tensor(2.0**24)), {}, CheckpointCorrupt,
             "state[1]['step'] must be a whole number in [0, 2**24)"),
    "seed": (_set("param_groups", 0, "seed", value=-1), {}, CheckpointCorrupt, "seed"),
    "missing field": (lambda sd: sd["srkern"].pop("numels"), {}, CheckpointCorrupt,
                      "malformed srkern.torch.AdamW state dict: KeyError: 'numels'"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=[f"damage={c.replace(' ', '-')}" for c in REFUSED])
def test_mismatched_state_dict_refused_and_nothing_loaded(case):
    # Each damage is refused for its own cause (the error class and the message that names it;
    # both classes are ValueErrors), before anything is loaded: the target has taken a step of
    # its own, and its seed, step count, weights and every state tensor keep their bits.
    hurt, settings, cls, words = REFUSED[case]
    sd = _saved_state_dict()
    hurt(sd)
    settings = dict(settings)
    model = small_model(torch.bfloat16)
    params = list(model.parameters())[:settings.pop("first", None)]
    target = srt.AdamW(params, seed=2, **HYPER, **settings)
    loss_of(model, 1).backward()
    target.step()

    def snapshot():
        tensors = [p.detach().clone() for p in params]
        tensors += [t.clone() for p in params for t in target.state[p].values() if torch.is_tensor(t)]
        return target.seed, steps(target), tensors

    before = snapshot()
    with pytest.raises(cls, match=re.escape(words)) as err:
        target.load_state_dict(sd)
    assert isinstance(err.value, ValueError)
    after = snapshot()
    assert after[:2] == before[:2] == (2, {1})
    for a, b in zip(after[2], before[2], strict=True):
        assert_same_bits(a, b, what=f"{case}: a buffer changed")


def test_format_1_state_dict_loads():
    # Format 1 (srkern before torch's layout) kept one step count and the settings in the
    # "srkern" entry, and early ones had no format fields: both still load, and every parameter
    # with state takes that step (what format 1's updates used), bit-identically continuing.
    sd = _saved_state_dict()
    meta = sd["srkern"]
    for with_fields in (True, False):
        old = copy.deepcopy(sd)
        old["srkern"] = {"contract": meta["contract"], "offsets": meta["offsets"], "numels": meta["numels"],
                         "step": 1, "seed": 1, "precision": "bf16-sr", "state_dtype": "bfloat16"}
        if with_fields:
            old["srkern"].update(format="srkern.torch.AdamW", format_version=1)
        old["param_groups"] = [{k: v for k, v in g.items() if k not in ("precision", "state_dtype", "seed")}
                               for g in old["param_groups"]]
        old["state"] = {i: {k: v for k, v in st.items() if k != "step"} for i, st in old["state"].items()}
        target = srt.AdamW(small_model(torch.bfloat16).parameters(), seed=2, **HYPER)
        target.load_state_dict(old)
        assert target.seed == 1 and steps(target) == {1} and len(target.state) == 4
        fresh = srt.AdamW(small_model(torch.bfloat16).parameters(), seed=2, **HYPER)
        fresh.load_state_dict(sd)
        for a, b in zip(target.state.values(), fresh.state.values(), strict=True):
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_found_inf_and_grad_scale_through_the_optimizer():
    # found_inf set: weights, moments and step counts unchanged (torch's fused AdamW rolls its back);
    # grad_scale=0.5 equals gradients halved beforehand (exact in BF16), bit for bit.
    a, b = small_model(torch.bfloat16), small_model(torch.bfloat16)
    oa = srt.AdamW(a.parameters(), seed=5, **HYPER)
    ob = srt.AdamW(b.parameters(), seed=5, **HYPER)
    loss_of(a, 0).backward()
    loss_of(b, 0).backward()
    before = [p.detach().clone() for p in a.parameters()]
    oa.step(found_inf=torch.ones(1))
    ob.step(found_inf=torch.ones(1))
    for p, q in zip(a.parameters(), before, strict=True):
        assert_same_bits(p, q, what="weights after a skipped step")
    assert all(torch.all(oa.state[p]["exp_avg"] == 0) for p in a.parameters()) and steps(oa) == {0}
    for p in b.parameters():
        p.grad = p.grad * 0.5
    oa.step(grad_scale=0.5)
    ob.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert_same_bits(p, q, what="grad_scale vs pre-scaled gradients")


def _snapshot(opt: srt.AdamW) -> tuple[list[torch.Tensor], dict]:
    params = opt._params()
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state})


def _assert_unchanged(opt: srt.AdamW, before: tuple[list[torch.Tensor], dict], what: str) -> None:
    weights, state = before  # the state holds the step counts
    params = opt._params()
    for i, (p, q) in enumerate(zip(params, weights, strict=True)):
        assert_same_bits(p, q, what=f"{what}: param {i}")
    now = {i: opt.state[p] for i, p in enumerate(params) if p in opt.state and opt.state[p]}
    assert sorted(now) == sorted(i for i, st in state.items() if st), f"{what}: state entries changed"
    for i, st in state.items():
        for k, v in st.items():
            assert_same_bits(now[i][k], v, what=f"{what}: state[{i}][{k!r}]")


def test_bad_group_changes_nothing():
    # A bad hyper-parameter in group 1, or a bad buffer in group 1's bucket, must raise before
    # group 0 is launched: no weight, no state entry or value and not the step count changes
    # (neither on the first step, when the state does not exist yet, nor later).
    model = small_model(torch.bfloat16)
    layers = [model[0], model[2]]
    opt = srt.AdamW([{"params": layers[0].parameters()}, {"params": layers[1].parameters(), "lr": 1e-3}],
                    seed=4, **HYPER)
    loss_of(model, 0).backward()
    for when in ("first step", "after a good step"):
        opt.param_groups[1]["lr"] = float("nan")
        before = _snapshot(opt)
        with pytest.raises(ValueError, match=r"param_groups\[1\].*lr"):
            opt.step()
        _assert_unchanged(opt, before, f"lr=nan in group 1, {when}")
        opt.param_groups[1]["lr"] = 1e-3
        opt.step()
    assert steps(opt) == {2}
    # A wrong-dtype moment in group 1's bucket: caught before group 0's launch.
    p1 = layers[1].weight
    opt.state[p1]["exp_avg"] = opt.state[p1]["exp_avg"].to(torch.float16)
    before = _snapshot(opt)
    with pytest.raises(TypeError, match=r"param_groups\[1\].*exp_avgs\[0\]"):
        opt.step()
    _assert_unchanged(opt, before, "float16 exp_avg in group 1")
    # A bad grad_scale or found_inf: nothing changes either.
    opt.state[p1]["exp_avg"] = opt.state[p1]["exp_avg"].to(torch.bfloat16)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad_scale=float("inf"))
    with pytest.raises(TypeError, match="found_inf"):
        opt.step(found_inf=torch.zeros(1, dtype=torch.float64))
    _assert_unchanged(opt, before, "bad grad_scale / found_inf")


def test_sharded_grad_scale_equals_prescaled_gradients():
    # ShardedAdamW.step(grad_scale=0.5) in one process (world 1) equals stepping on gradients
    # halved beforehand (exact in BF16), bit for bit; grad_scale=0.25 differs (the test can fail).
    pytest.importorskip("mpi4py")
    runs = {}
    for how in ("scaled", "prescaled", "other"):
        m = small_model(torch.bfloat16)
        opt = srt.ShardedAdamW(m.parameters(), seed=6, **HYPER)
        for t in range(3):
            opt.zero_grad()
            loss_of(m, t).backward()
            if how == "prescaled":
                for p in m.parameters():
                    p.grad.mul_(0.5)
            opt.step(grad_scale={"scaled": 0.5, "prescaled": 1.0, "other": 0.25}[how])
        runs[how] = [p.detach().clone() for p in m.parameters()]
    for a, b in zip(runs["scaled"], runs["prescaled"], strict=True):
        assert_same_bits(a, b, what="ShardedAdamW grad_scale vs pre-scaled gradients")
    assert any(not torch.equal(a, b) for a, b in zip(runs["scaled"], runs["other"], strict=True))


# ---- what the review of the drop-in found ---------------------------------------------------------

def _bits(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_group_precision_takes_its_modes_state_dtype():
    # A group naming its precision and no state_dtype takes that mode's default (it used to take
    # the optimizer's, which fp32 refuses and fp16-sr would silently use).
    p32, p16 = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
    opt = srt.AdamW([{"params": [p32], "precision": "fp32"}, {"params": [p16], "precision": "fp16-sr"}], seed=1)
    assert [g["state_dtype"] for g in opt.param_groups] == ["float32", "float32"]
    p32.grad, p16.grad = torch.ones(8), torch.ones(8, dtype=torch.float16)
    opt.step()
    assert opt.state[p16]["exp_avg"].dtype == torch.float32 and opt.state[p32]["exp_avg"].dtype == torch.float32


def test_grad_scaler_unscales_fp16_gradients_in_the_kernel():
    # torch.amp.GradScaler with an FP16 model: the scaler hands srkern its scale and inf flag
    # (torch's own unscale refuses FP16 gradients); the step equals step(grad_scale=1/S) on the
    # scaled gradients, bit for bit, and a step with an inf gradient changes no weight or count.
    runs = []
    for how in ("scaler", "by hand"):
        m = small_model(torch.float16)
        opt = srt.AdamW(m.parameters(), precision="fp16-sr", seed=8, **HYPER)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for t in range(3):
            opt.zero_grad()
            scaler.scale(loss_of(m, t)).backward()
            if how == "scaler":
                scaler.step(opt)
                scaler.update()
            else:
                opt.step(grad_scale=2.0 ** -10)
        runs.append(_bits(m))
        if how == "scaler":
            before, steps_before = _bits(m), steps(opt)
            opt.zero_grad()
            scaler.scale(loss_of(m, 9)).backward()
            next(m.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            assert steps(opt) == steps_before and scaler.get_scale() == 2.0 ** 9
            for a, b in zip(_bits(m), before, strict=True):
                assert_same_bits(a, b, what="weights after a step with an inf gradient")
    for a, b in zip(*runs, strict=True):
        assert_same_bits(a, b, what="GradScaler vs grad_scale=1/S")


def test_load_refuses_other_group_counts_and_copies_tensor_settings():
    m = small_model(torch.float32)
    params = list(m.parameters())
    src = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3)
    mine = srt.AdamW(params, precision="fp32", seed=0)
    with pytest.raises(CheckpointMismatch, match="parameter groups: 2 in the checkpoint, 1 here"):
        mine.load_state_dict(src.state_dict())
    assert len(mine.param_groups) == 1
    a = srt.AdamW(params, lr=torch.tensor(1e-3), precision="fp32", seed=0)
    b = srt.AdamW(params, lr=torch.tensor(1e-3), precision="fp32", seed=0)
    b.load_state_dict(a.state_dict())
    a.param_groups[0]["lr"].fill_(5.0)  # a scheduler on a must not move b
    assert float(b.param_groups[0]["lr"]) == pytest.approx(1e-3)


def test_adam_l2_decay_and_bad_step_tensors_are_refused():
    m = small_model(torch.bfloat16)
    params = list(m.parameters())
    opt = srt.AdamW(params[:2], seed=3, **HYPER)
    with pytest.raises(NotImplementedError, match="decoupled_weight_decay=False"):
        opt.add_param_group({"params": params[2:], "decoupled_weight_decay": False})
    assert len(opt.param_groups) == 1
    sd = opt.state_dict()
    sd["param_groups"][0]["decoupled_weight_decay"] = False
    with pytest.raises(CheckpointMismatch, match="L2 decay"):
        opt.load_state_dict(sd)
    loss_of(m, 0).backward()
    opt.step()
    p0, p1 = params[:2]
    for hurt, cls, words in ((lambda: opt.state[p0].__setitem__("step", torch.tensor(1)), TypeError, "float32"),
                             (lambda: opt.state[p1].__setitem__("step", opt.state[p0]["step"]), ValueError, "share"),
                             (lambda: opt.param_groups[0].__setitem__("seed", 2 ** 64 + 5), ValueError, "seed")):
        keep = {p: dict(opt.state[p]) for p in (p0, p1)}
        seed = opt.param_groups[0]["seed"]
        hurt()
        before = _snapshot(opt)
        with pytest.raises(cls, match=words):
            opt.step()
        _assert_unchanged(opt, before, words)
        for p in (p0, p1):
            opt.state[p] = keep[p]
        opt.param_groups[0]["seed"] = seed


def test_compiled_step_with_aot_autograd_same_bits():
    # aot_eager runs the functionalization of the custom op's declared mutations (what inductor
    # sees), without a C++ compiler: the bits and step counts of eager steps, with a parameter
    # missing its gradient at one step, a transposed (non-contiguous) parameter and a tensor lr.
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        m = small_model(torch.bfloat16)
        w = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).t())
        opt = srt.AdamW([*m.parameters(), w], lr=torch.tensor(1e-2), seed=9)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for t in range(4):
            opt.zero_grad()
            (loss_of(m, t) + w.float().square().sum()).backward()
            if t == 1:
                next(m.parameters()).grad = None
            step()
        runs.append(([*_bits(m), w.detach().clone()], sorted(int(st["step"]) for st in opt.state.values())))
    (a, sa), (b, sb) = runs
    assert sa == sb and 3 in sa and 4 in sa
    for x, y in zip(a, b, strict=True):
        assert_same_bits(x, y, what="aot_eager compiled step vs eager")
