"""srkern.torch.AdamW's step plan (srkern/_plan.py): eager steps after the first re-run the
first step's prepared launches while nothing they were built from has changed.

What is proved: a cached step writes the same bits as the full step (every precision mode, on
every backend); each change that makes the plan stale (a state dict loaded, a group added, a
parameter or state buffer replaced or reassigned, a gradient of another dtype, a step count
replaced, a gradient gone or new) is noticed, so the full step runs and the bits stay those of
an optimizer without a plan; and a gradient overlapping a buffer the step writes is refused
with nothing written, as by the full step. Host cost is measured by the benchmarks, not here.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import srkern.torch as srt  # noqa: E402
from srkern import _plan  # noqa: E402
from srkern.testing import assert_same_bits  # noqa: E402

from conftest import save_and_load  # noqa: E402

DTYPE = {"fp32": torch.float32, "fp16-sr": torch.float16}
SIZES = (7, 130, 0, 1, 64)  # odd sizes, an empty tensor, one element


def make(precision: str = "bf16-sr", seed: int = 5):
    torch.manual_seed(0)
    dt = DTYPE.get(precision, torch.bfloat16)
    ps = [torch.nn.Parameter(torch.randn(n).to(dt)) for n in SIZES]
    return ps, srt.AdamW(ps, lr=1e-2, weight_decay=0.1, precision=precision, seed=seed)


def set_grads(ps, t: int, dtype=None) -> None:
    g = torch.Generator().manual_seed(100 + t)
    for p in ps:
        if dtype is not None and dtype != p.dtype:
            p.grad_dtype = None  # torch refuses a gradient of another dtype unless told
        p.grad = torch.randn(p.shape, generator=g).to(dtype or p.dtype)


def snapshot(ps, opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in ps]
    for p in ps:
        for k in sorted(opt.state.get(p, {})):
            out.append(opt.state[p][k].detach().clone())
    return out


class FullSteps:
    """Counts the steps that ran in full (the plan was absent or stale)."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        run = srt.run_step

        def counting(*args):
            self.n += 1
            return run(*args)
        monkeypatch.setattr(srt, "run_step", counting)


def run(steps: int, cached: bool, change=None, precision: str = "bf16-sr", grad_dtype=None):
    """``steps`` steps; ``change(t, ps, opt)`` runs before step ``t``'s gradients are set (it may
    return new (ps, opt)). Without ``cached`` the plan is dropped before every step."""
    ps, opt = make(precision)
    for t in range(steps):
        if change is not None:
            got = change(t, ps, opt)
            if got is not None:
                ps, opt = got
        set_grads(ps, t, grad_dtype)
        if not cached:
            opt.__dict__.pop("_srk_plan", None)
        opt.step()
    return snapshot(ps, opt)


def assert_runs_equal(a, b) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert_same_bits(x, y, what=f"tensor {i}")


@pytest.mark.parametrize("precision", ["bf16-sr", "bf16-nearest", "bf16-kahan", "fp32-master", "fp32", "fp16-sr"])
def test_cached_steps_write_the_bits_of_full_steps(backend, precision, monkeypatch):
    # Five steps through the plan against five full steps: the same kernels, tables, scalars and
    # step counts, so the same bits; and only the first step ran in full.
    full = FullSteps(monkeypatch)
    cached = run(5, True, precision=precision)
    assert full.n == 1
    assert_runs_equal(cached, run(5, False, precision=precision))


def test_groups_mixed_dtypes_maximize_and_a_skipped_step_through_the_plan(monkeypatch):
    # Two groups (one maximizing), BF16 and FP32 parameters in one group (two launches), and a
    # step skipped by found_inf at step 2 (nothing written, no count advanced): five steps, one
    # of them in full, with the bits of five full steps.
    def go(cached: bool):
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (9, 33)]
        b = [torch.nn.Parameter(torch.randn(n)) for n in (5, 17)]
        c = [torch.nn.Parameter(torch.randn(12).to(torch.bfloat16))]
        opt = srt.AdamW([{"params": a + b}, {"params": c, "lr": 3e-3, "maximize": True}], lr=1e-2, seed=11)
        ps = a + b + c
        for t in range(5):
            set_grads(ps, t)
            if not cached:
                opt.__dict__.pop("_srk_plan", None)
            opt.step(found_inf=torch.tensor([1.0 if t == 2 else 0.0]))
        assert [float(opt.state[p]["step"]) for p in ps] == [4.0] * len(ps)
        return snapshot(ps, opt)
    full = FullSteps(monkeypatch)
    cached = go(True)
    assert full.n == 1
    assert_runs_equal(cached, go(False))


def test_step_counts_become_views_of_one_flat_tensor_and_stay_torchs_layout(monkeypatch):
    ps, opt = make()
    for t in range(3):
        set_grads(ps, t)
        opt.step()
    steps = [opt.state[p]["step"] for p in ps]
    assert all(s.dtype == torch.float32 and s.shape == () and s.device.type == "cpu" for s in steps)
    assert [float(s) for s in steps] == [3.0] * len(ps)
    base = steps[0]._base
    assert base is not None and all(s._base is base for s in steps)
    # A checkpoint of it loads into a fresh optimizer and continues with the same bits.
    sd = save_and_load(opt.state_dict(), weights_only=True)
    ps2, opt2 = make()
    with torch.no_grad():
        for a, b in zip(ps2, ps):
            a.copy_(b)
    opt2.load_state_dict(sd)
    for o, pp in ((opt, ps), (opt2, ps2)):
        set_grads(pp, 3)
        o.step()
    assert_runs_equal(snapshot(ps2, opt2), snapshot(ps, opt))


def _load_state_dict(t, ps, opt):
    if t == 2:
        opt.load_state_dict(save_and_load(opt.state_dict(), weights_only=True))


def _add_param_group(t, ps, opt):
    if t == 2:
        q = torch.nn.Parameter(torch.randn(9).to(torch.bfloat16))
        opt.add_param_group({"params": [q], "lr": 3e-3})
        ps.append(q)


def _data_reassigned(t, ps, opt):
    if t == 2:
        ps[1].data = ps[1].data.clone() * 0.5  # a new buffer: another address


def _param_resized(t, ps, opt):
    if t == 2:  # a new shape: its state no longer fits, so it starts afresh as torch would not;
        with torch.no_grad():  # here the state is replaced with it, which the plan must notice
            ps[4].data = torch.randn(80).to(torch.bfloat16)
            st = opt.state[ps[4]]
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(ps[4]), torch.zeros_like(ps[4])


def _param_resize_in_place(t, ps, opt):
    if t == 2:
        with torch.no_grad():
            ps[1].set_(ps[1].untyped_storage(), 0, (100,))  # the same address, a new size
            st = opt.state[ps[1]]
            st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"][:100].clone(), st["exp_avg_sq"][:100].clone()


def _param_written_in_place(t, ps, opt):
    if t == 2:
        with torch.no_grad():
            ps[0].mul_(0.5)


def _step_replaced(t, ps, opt):
    if t == 2:
        opt.state[ps[1]]["step"] = torch.tensor(7.0)  # now a launch of its own, at step 8


def _step_edited_in_place(t, ps, opt):
    if t == 2:
        for p in ps:
            opt.state[p]["step"].fill_(11.0)  # the counts move together: every draw at step 12


def _moment_replaced(t, ps, opt):
    if t == 2:
        opt.state[ps[1]]["exp_avg"] = torch.zeros_like(opt.state[ps[1]]["exp_avg"])


def _moment_data_reassigned(t, ps, opt):
    if t == 2:
        m = opt.state[ps[1]]["exp_avg_sq"]
        m.data = m.data.clone()  # same object and version, another address


def _state_dict_of_a_param_replaced(t, ps, opt):
    if t == 2:
        opt.state[ps[0]] = {k: v.clone() for k, v in opt.state[ps[0]].items()}


def _new_optimizer_state(t, ps, opt):
    if t == 2:
        opt.state.clear()


def _step_data_reassigned(t, ps, opt):
    if t == 2:
        for p in ps:
            opt.state[p]["step"].data = torch.tensor(10.0)  # same objects, storage outside the flat tensor


STALE = {"step_data_reassigned": _step_data_reassigned, "load_state_dict": _load_state_dict, "add_param_group": _add_param_group,
         "data_reassigned": _data_reassigned, "param_resized": _param_resized,
         "param_set_in_place": _param_resize_in_place, "param_written_in_place": _param_written_in_place,
         "step_replaced": _step_replaced, "moment_replaced": _moment_replaced,
         "moment_data_reassigned": _moment_data_reassigned,
         "state_dict_of_a_param_replaced": _state_dict_of_a_param_replaced, "state_cleared": _new_optimizer_state}


@pytest.mark.parametrize("case", STALE)
def test_a_stale_plan_falls_back_to_the_full_step(case, monkeypatch):
    # The change at step 2 makes the plan stale: step 2 runs in full (and plans again), and every
    # bit is that of an optimizer that never had a plan.
    full = FullSteps(monkeypatch)
    cached = run(5, True, STALE[case])
    assert full.n == 2, f"{case}: {full.n} full steps (1 expected, plus 1 for the change)"
    assert_runs_equal(cached, run(5, False, STALE[case]))


def test_step_counts_edited_in_place_need_no_full_step(monkeypatch):
    # The counts are read from the flat tensor every step: the plan follows them.
    full = FullSteps(monkeypatch)
    ps, opt = make()
    for t in range(4):
        if t == 2:
            _step_edited_in_place(t, ps, opt)
        set_grads(ps, t)
        opt.step()
    assert full.n == 1 and [float(opt.state[p]["step"]) for p in ps] == [13.0] * len(ps)
    assert_runs_equal(snapshot(ps, opt), run(4, False, _step_edited_in_place))


def test_one_step_count_edited_in_place_is_followed(monkeypatch):
    # One count moved alone: the counts' bytes no longer match what the plan wrote, so it reads
    # them again; the launch holding that parameter now has two counts, so that step runs in full
    # (the full step launches per count) and every bit is that of an optimizer without a plan.
    def one(t, ps, opt):
        if t == 2:
            opt.state[ps[1]]["step"].fill_(7.0)
    full = FullSteps(monkeypatch)
    cached = run(5, True, one)
    assert full.n >= 2
    assert_runs_equal(cached, run(5, False, one))


def test_a_tensor_lr_edited_in_place_is_read_every_step(monkeypatch):
    # The plan keeps the step-independent kernel scalars (decay = 1 - lr * weight_decay among
    # them) only while the hyper-parameters are the same floats; a tensor lr is read every step,
    # so an in-place edit reaches decay as well as the step size.
    def make_tensor_lr(precision="bf16-sr", seed=5):
        ps, opt = make(precision, seed)
        opt.param_groups[0]["lr"] = torch.tensor(1e-2)
        return ps, opt

    def lr(t, ps, opt):
        opt.param_groups[0]["lr"].fill_(1e-2 * (t + 1))

    def steps(cached):
        ps, opt = make_tensor_lr()
        for t in range(4):
            lr(t, ps, opt)
            set_grads(ps, t)
            if not cached:
                opt.__dict__.pop("_srk_plan", None)
            opt.step()
        return snapshot(ps, opt)
    full = FullSteps(monkeypatch)
    cached = steps(True)
    assert full.n == 1
    assert_runs_equal(cached, steps(False))


def test_a_new_lr_needs_no_full_step(monkeypatch):
    def lr(t, ps, opt):
        opt.param_groups[0]["lr"] = 1e-2 / (t + 1)
    full = FullSteps(monkeypatch)
    cached = run(4, True, lr)
    assert full.n == 1
    assert_runs_equal(cached, run(4, False, lr))


def test_gradients_of_another_dtype_fall_back(monkeypatch):
    # BF16 gradients for two steps, then FP32 ones (another kernel): the full step again.
    def dtype_at(t):
        return torch.float32 if t >= 2 else torch.bfloat16
    full = FullSteps(monkeypatch)
    out = []
    for cached in (True, False):
        ps, opt = make()
        for t in range(4):
            set_grads(ps, t, dtype_at(t))
            if not cached:
                opt.__dict__.pop("_srk_plan", None)
            opt.step()
        out.append(snapshot(ps, opt))
    assert full.n == 2 + 4
    assert_runs_equal(*out)


def test_a_gradient_gone_or_new_falls_back(monkeypatch):
    # Step 2 without a gradient for parameter 1 (its count stays), step 3 with it again.
    full = FullSteps(monkeypatch)
    out = []
    for cached in (True, False):
        ps, opt = make()
        for t in range(5):
            set_grads(ps, t)
            if t == 2:
                ps[1].grad = None
            if not cached:
                opt.__dict__.pop("_srk_plan", None)
            opt.step()
        out.append(snapshot(ps, opt))
        assert [float(opt.state[p]["step"]) for p in ps] == [5.0, 4.0, 5.0, 5.0, 5.0]
    assert full.n == 3 + 5
    assert_runs_equal(*out)


def test_parameters_sharing_one_buffer_keep_the_plan(monkeypatch):
    # Two parameters that are views of one buffer share a version counter (a launch bumps it
    # twice): the plan measures that instead of falling back every step.
    base = torch.randn(100).to(torch.bfloat16)
    ps = [torch.nn.Parameter(base[:40]), torch.nn.Parameter(base[40:])]
    opt = srt.AdamW(ps, lr=1e-2, seed=1)
    full = FullSteps(monkeypatch)
    for t in range(4):
        set_grads(ps, t)
        opt.step()
    assert full.n == 1


@pytest.mark.parametrize("target", ["moment", "weight", "inside_a_weight"])
def test_a_gradient_overlapping_a_written_buffer_is_refused(target, monkeypatch):
    # After two planned steps, a gradient that aliases a buffer the step writes: the plan must not
    # launch it (that would read memory the kernel writes), and the full step refuses it with
    # nothing written.
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(256).to(torch.bfloat16))
    small = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    ps = [big, small]
    opt = srt.AdamW(ps, lr=1e-2, seed=3)
    for t in range(2):
        set_grads(ps, t)
        opt.step()
    assert opt.__dict__.get("_srk_plan") is not None
    set_grads(ps, 2)
    if target == "moment":
        small.grad = opt.state[small]["exp_avg"]
    elif target == "weight":
        small.grad = big.detach()[:64]
    else:
        small.grad = big.detach()[100:164]  # starts inside the weight
    before = snapshot(ps, opt)
    with pytest.raises(ValueError, match="overlaps"):
        opt.step()
    assert_runs_equal(snapshot(ps, opt), before)


def test_the_interval_check_finds_every_overlap():
    # The plan's check against random disjoint written intervals and random gradient intervals,
    # against a brute-force test of every pair (touching intervals do not overlap).
    rng = np.random.default_rng(0)
    for _ in range(200):
        edges = np.sort(rng.choice(10_000, size=2 * 8, replace=False)).astype(np.uint64)
        w_lo, w_hi = edges[0::2], edges[1::2]
        lo = rng.integers(0, 10_000, size=16).astype(np.uint64)
        hi = lo + rng.integers(1, 300, size=16).astype(np.uint64)
        got = _plan.overlaps_written(w_lo, w_hi, lo, hi)
        want = ((lo[:, None] < w_hi[None, :]) & (w_lo[None, :] < hi[:, None])).any(axis=1)
        assert np.array_equal(got, want)


# ---- srkern.cast's fast path (the other per-call host cost of issue 13) ---------------------

CAST_CASES = [(t, r, s) for t in ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
              for r in ("stochastic", "nearest") for s in (False, True)]


@pytest.mark.parametrize("n", [0, 1, 7, 1023])
@pytest.mark.parametrize("target,rounding,saturate", CAST_CASES,
                         ids=[f"dtype={t}-{r}-sat={s}" for t, r, s in CAST_CASES])
def test_cast_fast_path_writes_the_general_paths_bits(backend, target, rounding, saturate, n):
    # A contiguous FP32 CPU tensor without out= takes the fast path; out= takes the general one.
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3e4).float()
    kw = dict(rounding=rounding, saturate=saturate, seed=2 ** 64 - 3, step=2 ** 32 - 1, stream=5, offset=12345)
    want = torch.empty(n, dtype=getattr(torch, target))
    srkern_cast(x, target, out=want, **kw)
    assert_same_bits(srkern_cast(x, target, **kw), want)
    assert_same_bits(torch.from_numpy(srkern_cast(x.numpy(), target, **kw).view(np.uint8)), want.view(torch.uint8))


def test_cast_fast_path_draws_one_seed_and_raises_the_general_paths_errors():
    import srkern
    from srkern import _contract
    x = torch.randn(100)
    srkern.manual_seed(9)
    a = srkern_cast(x, "bfloat16")
    srkern.manual_seed(9)
    seed = _contract.next_seed()
    assert_same_bits(a, srkern_cast(x, "bfloat16", seed=seed))
    assert _contract.next_seed() != seed
    for kw, err in ((dict(rounding="up"), ValueError), (dict(step=-1), ValueError), (dict(step=2 ** 32), ValueError),
                    (dict(saturate=1), TypeError), (dict(seed=True), TypeError), (dict(seed=2 ** 64), ValueError),
                    (dict(offset=2 ** 64 - 50), ValueError), (dict(stream=1.0), TypeError)):
        with pytest.raises(err):
            srkern_cast(x, "bfloat16", **kw)


def srkern_cast(*args, **kw):
    import srkern
    return srkern.cast(*args, **kw)


def _bits_of_runs(body, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """``body(cached)`` with and without the plan: (its tensors with the plan, full steps then)."""
    full = FullSteps(monkeypatch)
    cached = body(True)
    n = full.n
    assert_runs_equal(cached, body(False))
    return cached, n


def test_a_parameter_without_gradient_resized_moves_the_offsets_after_it(monkeypatch):
    # The frozen first parameter grows (as transformers' resize_token_embeddings does through
    # .data): the flat offsets of the parameters after it, and so their draws, change.
    def body(cached):
        torch.manual_seed(0)
        a, b = (torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (8, 64))
        opt = srt.AdamW([a, b], lr=1e-2, seed=1)
        for t in range(4):
            if t == 2:
                a.data = torch.randn(24).to(torch.bfloat16)
            b.grad = torch.randn(64, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)
            if not cached:
                opt.__dict__.pop("_srk_plan", None)
            opt.step()
        return [b.detach().clone()] + [opt.state[b][k].clone() for k in ("exp_avg", "exp_avg_sq")]
    assert _bits_of_runs(body, monkeypatch)[1] == 2


def test_a_parameter_made_non_contiguous_in_place_falls_back(monkeypatch):
    # .data = p.data.t() keeps the address, the shape (square) and the version: the full step
    # stages the transposed parameter; updating its memory in gradient order would be wrong.
    def body(cached):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
        opt = srt.AdamW([p], lr=1e-2, seed=1)
        for t in range(4):
            if t == 2:
                p.data = p.data.t()
            p.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)
            if not cached:
                opt.__dict__.pop("_srk_plan", None)
            opt.step()
        return [p.detach().contiguous()]
    assert _bits_of_runs(body, monkeypatch)[1] >= 3  # step 2 in full; a staged step plans nothing


def test_a_lazily_conjugated_complex_gradient_gets_the_full_steps_error():
    p = torch.nn.Parameter(torch.randn(16, dtype=torch.complex64))
    opt = srt.AdamW([p], lr=1e-2, seed=1)
    for t in range(2):
        p.grad = torch.randn(16, dtype=torch.complex64)
        opt.step()
    before = snapshot([p], opt)
    p.grad = torch.randn(16, dtype=torch.complex64).conj()
    with pytest.raises(RuntimeError, match="conj"):
        opt.step()
    assert_runs_equal(snapshot([p], opt), before)


def test_a_moment_set_to_a_smaller_size_at_its_address_gets_the_full_steps_error():
    ps, opt = make()
    for t in range(2):
        set_grads(ps, t)
        opt.step()
    m = opt.state[ps[1]]["exp_avg"]
    with torch.no_grad():
        m.set_(m.untyped_storage(), 0, (100,))  # the same address; the parameter has 130 elements
    set_grads(ps, 2)
    with pytest.raises(ValueError, match="exp_avgs"):
        opt.step()


def test_inference_tensors_step_without_a_plan():
    # Inference tensors have no version counter for a plan to check: every step runs in full.
    with torch.inference_mode():
        p = torch.randn(8).to(torch.bfloat16)
        p.grad = torch.randn(8).to(torch.bfloat16)
        opt = srt.AdamW([p], lr=1e-2, seed=1)
        for _ in range(3):
            opt.step()
        assert opt.__dict__.get("_srk_plan") is None
        assert float(opt.state[p]["step"]) == 3.0
