"""srkern.torch.sr_grad_accumulation on a small BF16 model: autograd's round-to-nearest loses the
small addends of a long gradient accumulation, SR keeps the sum unbiased (within stated standard
errors of the FP32 sum); the hooked accumulation is bit-reproducible and equals srkern.add_ called
by hand; the first micro-batch, parameters without gradients (unused or undefined), zero_grad,
.grad always the running sum (exceptions mid-backward, other post-accumulate hooks), removal,
a dropped handle, a moved model, bad use."""
from __future__ import annotations

import gc
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import srkern  # noqa: E402
import srkern.torch  # noqa: E402
from srkern.testing import assert_same_bits  # noqa: E402

SEED = 0x51A7
# 1024 micro-batches of a gradient whose sign is mostly the same from one micro-batch to the next
# (inputs with mean 1): the running sum grows to ~1000 times one micro-batch's gradient, and from
# ~256 times on (8 significant bits) one addend is below half a BF16 ulp of it, so autograd's
# round-to-nearest addition stalls. Measured on this model (relative L2 error of the accumulated
# .grad against the FP32 sum, per tensor): 64 micro-batches RN 0.7-1.1%, SR 0.9-1.9%; 256: RN
# 2.5-6.7%, SR 1.2-2.4%; 512: RN 12-21%, SR 3.2-3.7%; 1024: RN 45-57%, SR 3.4-4.8%.
N_MICRO = 1024


def make_model(extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    m = m.to(torch.bfloat16)
    if extra:  # an FP32 norm, a frozen weight and a parameter the loss never uses
        m.norm = torch.nn.LayerNorm(4)  # FP32: left to autograd
        m.frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16), requires_grad=False)
        m.unused = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    return m


def micro_batches(n: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g) + 1).to(torch.bfloat16) for _ in range(n)]


def loss_of(m: torch.nn.Module, x) -> torch.Tensor:
    y = m[2](m[1](m[0](x))).float()
    if hasattr(m, "norm"):
        y = m.norm(y)
    return (y - 1.0).pow(2).mean()


def core(m) -> list:
    """The BF16 parameters the loss uses, in make_model()'s parameters() order."""
    return [m[0].weight, m[0].bias, m[2].weight, m[2].bias]


def per_micro_grads(m, xs) -> list[list[torch.Tensor]]:
    """Each micro-batch's BF16 gradients alone (what autograd assigns to a .grad that is None)."""
    out = []
    for x in xs:
        m.zero_grad(set_to_none=True)
        loss_of(m, x).backward()
        out.append([p.grad.clone() for p in core(m)])
    m.zero_grad(set_to_none=True)
    return out


def hooked_run(xs, seed: int = SEED):
    m = make_model()
    with srkern.torch.sr_grad_accumulation(m, seed=seed) as h:
        for x in xs:
            loss_of(m, x).backward()
        offsets, steps = list(h.offsets), list(h.steps)
    return m, offsets, steps


def by_hand(grads, offsets, seed: int = SEED, step0: int = 0):
    """The accumulation done with srkern.add_ explicitly, and the SR variance along that path:
    per element, the sum over additions of |s - T| |U - s|, the variance of one SR of the FP32
    sum s between its BF16 neighbours T (toward zero) and U (p(1 - p)(U - T)^2 with
    p = |s - T| / |U - T|; the 16-bit draw's floor changes p by < 2**-16)."""
    accs = [g.clone() for g in grads[0]]
    var = [torch.zeros(g.shape, dtype=torch.float64) for g in grads[0]]
    for k, gk in enumerate(grads[1:]):
        for i, (a, g) in enumerate(zip(accs, gk)):
            s = a.float() + g.float()
            bits = s.view(torch.int32)
            t = (bits & -65536).view(torch.float32).double()  # truncated toward zero onto BF16
            u = ((bits & -65536) + 65536).view(torch.float32).double()  # the next value away from zero
            var[i] += (s.double() - t).abs() * (u - s.double()).abs()
            srkern.add_(a, g, seed=seed, offset=offsets[i], step=step0 + k)
    return accs, var


@pytest.fixture(scope="module")
def runs():
    """One set of runs shared by the tests below: per-micro-batch gradients, the FP32 sum,
    autograd's RN accumulation, the hooked SR accumulation and the by-hand replay (a second
    hooked run with the same seed and one with another seed: test_sixty_four_micro_batches,
    on 64 micro-batches, the same path at a 16th of the cost)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's CPU kernels are deterministic per thread count
    try:
        xs = micro_batches(N_MICRO)
        grads = per_micro_grads(make_model(), xs)
        exact = [sum(g[i].double() for g in grads) for i in range(len(grads[0]))]
        m = make_model()
        for x in xs:
            loss_of(m, x).backward()
        rn = [p.grad.clone() for p in m.parameters()]
        sr, offsets, steps = hooked_run(xs)
        hand, var = by_hand(grads, offsets)
    finally:
        torch.set_num_threads(n)
    return dict(xs=xs, grads=grads, exact=exact, rn=rn, sr=[p.grad for p in sr.parameters()],
                offsets=offsets, steps=steps, hand=hand, var=var)


def _shrink_z(acc, exact, var) -> float:
    """sum_i sign(F_i) (A_i - F_i) / sqrt(sum_i var_i) over a tensor's elements: the error toward
    (negative) or away from zero, in standard errors of SR along its path. Under SR the terms are
    martingale differences (sign(F) is fixed, each addition's rounding is unbiased given the past,
    independent draws per element and addition), so z is ~N(0, 1) by the martingale CLT."""
    err = (acc.double() - exact) * torch.sign(exact)
    return float(err.sum() / var.sum().sqrt())


def test_rn_loses_the_small_addends_and_sr_does_not(runs):
    # The loss: autograd's RN sum falls short of the FP32 sum by tens of SR standard errors in
    # every tensor (shrunk toward zero: addends below half an ulp are rounded away), 30% or more
    # of it in L2 terms; the SR sum's z lies within 5 (two-sided failure probability ~6e-7 per
    # tensor under correct SR). The reference, the sum of the same BF16 micro-batch gradients in
    # float64, is exact; the kernel's FP32 sum adds at most 2**-24 relative per addition, far
    # below one SR standard error. RN's relative L2 error is more than 5 times SR's.
    report = []
    for i, (rn, sr, f, v) in enumerate(zip(runs["rn"], runs["sr"], runs["exact"], runs["var"])):
        z_rn, z_sr = _shrink_z(rn, f, v), _shrink_z(sr, f, v)
        rel_rn = float((rn.double() - f).norm() / f.norm())
        rel_sr = float((sr.double() - f).norm() / f.norm())
        report.append(f"param {i}: z RN {z_rn:+.1f}, z SR {z_sr:+.2f}; rel. error RN {rel_rn:.3f}, SR {rel_sr:.3f}")
        assert abs(z_sr) <= 5, "\n".join(report)
        assert z_rn < -20 and rel_rn > 0.3, "\n".join(report)
        assert rel_rn > 5 * rel_sr, "\n".join(report)


def test_equals_add_by_hand(runs):
    # The k-th SR addition into parameter i is srkern.add_(grad, g_k, seed, offset=offsets[i],
    # step=k): the hooked run equals that replay bit for bit.
    sizes = [g.numel() for g in runs["grads"][0]]
    assert runs["offsets"] == [sum(sizes[:i]) for i in range(len(sizes))]
    assert runs["steps"] == [N_MICRO - 1] * len(sizes)
    for i, (a, h) in enumerate(zip(runs["sr"], runs["hand"])):
        assert_same_bits(a, h, what=f"hooked vs by hand, param {i}")


def test_sixty_four_micro_batches(one_torch_thread):
    # At 64 micro-batches (each addend 2 ulps of the sum or more) RN's error is ~1% here and
    # SR's similar: the gain is in long accumulations. The hooked run still equals the by-hand
    # replay and stays within 5 standard errors of the FP32 sum; a second run with the same seed
    # equals it bit for bit, one with another seed differs.
    xs = micro_batches(64, seed=3)
    grads = per_micro_grads(make_model(), xs)
    m, offsets, steps = hooked_run(xs)
    assert steps == [63] * len(steps)
    hand, var = by_hand(grads, offsets)
    again, other = hooked_run(xs)[0], hooked_run(xs, seed=SEED + 1)[0]
    for i, (p, h, b, o) in enumerate(zip(m.parameters(), hand, again.parameters(), other.parameters())):
        assert_same_bits(p.grad, h, what=f"64 micro-batches, param {i}")
        f = sum(g[i].double() for g in grads)
        assert abs(_shrink_z(p.grad, f, var[i])) <= 5
        assert_same_bits(p.grad, b.grad, what=f"two runs, same seed, param {i}")
        assert not torch.equal(p.grad.view(torch.int16), o.grad.view(torch.int16)), f"another seed, param {i}"


def test_zero_grad_between_steps_and_parameters_without_grads(one_torch_thread):
    # Two accumulation windows of 5 micro-batches with an optimizer step between, zero_grad with
    # set_to_none True (the next first micro-batch is assigned) and False (its zeros are the
    # running sum: 0 + g is exact, then 4 SR additions). Step counts carry over windows, so no
    # draw repeats. An FP32 parameter accumulates as autograd does; a frozen one and one the loss
    # never uses keep grad None; the same grad tensor object stays in .grad within a window.
    for set_to_none in (True, False):
        xs = micro_batches(10, seed=7)
        m, ref = make_model(extra=True), make_model(extra=True)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        h = srkern.torch.sr_grad_accumulation(m, seed=SEED)
        want_hooked = [p for p in m.parameters() if p.dtype == torch.bfloat16 and p.requires_grad]
        assert [id(p) for p in h.params] == [id(p) for p in want_hooked] and id(m.unused) in map(id, want_hooked)
        where = [next(k for k, q in enumerate(h.params) if q is p) for p in core(m)]
        steps0 = 0
        for w in range(2):
            window = xs[5 * w:5 * w + 5]
            grads = per_micro_grads(ref, window)
            for j, x in enumerate(window):
                loss_of(m, x).backward()
                if j == 1:
                    ids = [id(p.grad) for p in core(m)]
                elif j > 1:
                    assert ids == [id(p.grad) for p in core(m)], "the running sum is the same tensor"
            if w == 1 and not set_to_none:
                grads = [[torch.zeros_like(g) for g in grads[0]]] + grads
            hand, _ = by_hand(grads, [h.offsets[k] for k in where], step0=steps0)
            for i, (p, want) in enumerate(zip(core(m), hand)):
                assert_same_bits(p.grad, want, what=f"window {w} set_to_none={set_to_none} param {i}")
            steps0 += len(grads) - 1
            assert [h.steps[k] for k in where] == [steps0] * 4
            assert h.steps[next(k for k, q in enumerate(h.params) if q is m.unused)] == 0
            if w == 1 and not set_to_none:  # the reference starts from zeros too (0 + -0 is +0)
                for q in ref.parameters():
                    q.grad = torch.zeros_like(q) if q.requires_grad else None
            for x in window:
                loss_of(ref, x).backward()
            assert_same_bits(m.norm.weight.grad, ref.norm.weight.grad, what="FP32 param, autograd's sum")
            assert m.unused.grad is None and m.frozen.grad is None
            for p, q in zip(m.parameters(), ref.parameters()):  # equal weights for the next window
                q.grad = None if p.grad is None else p.grad.clone()
            opt.step()
            ref_opt.step()
            opt.zero_grad(set_to_none=set_to_none)
            ref_opt.zero_grad(set_to_none=True)
        h.remove()


def test_remove_and_context_manager_restore_autograd(one_torch_thread):
    # After remove() (and on leaving a with block) accumulation is autograd's own again, bit for
    # bit; remove() twice is harmless; a removed handle frees its parameters for a new one.
    xs = micro_batches(6, seed=9)
    plain = make_model()
    for x in xs:
        loss_of(plain, x).backward()
    m = make_model()
    h = srkern.torch.sr_grad_accumulation(m.parameters(), seed=1)
    h.remove()
    h.remove()
    for x in xs:
        loss_of(m, x).backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        assert_same_bits(p.grad, q.grad, what="after remove()")
    m = make_model()
    with srkern.torch.sr_grad_accumulation(m, seed=1):
        loss_of(m, xs[0]).backward()
    for x in xs[1:]:
        loss_of(m, x).backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        assert_same_bits(p.grad, q.grad, what="after the with block")
    srkern.torch.sr_grad_accumulation(m, seed=2).remove()


def test_autograd_grad_leaves_dot_grad_alone(one_torch_thread):
    # torch.autograd.grad writes no .grad and runs no AccumulateGrad: the running sum stays.
    m = make_model()
    xs = micro_batches(3, seed=4)
    with srkern.torch.sr_grad_accumulation(m, seed=1):
        loss_of(m, xs[0]).backward()
        loss_of(m, xs[1]).backward()
        before = [p.grad.clone() for p in m.parameters()]
        torch.autograd.grad(loss_of(m, xs[2]), list(m.parameters()))
        for p, b in zip(m.parameters(), before):
            assert_same_bits(p.grad, b, what="after torch.autograd.grad")


def test_fp16_and_non_contiguous_parameters(one_torch_thread):
    # FP16 parameters take 32-bit draws (as srkern.add_ with an FP16 acc); a parameter whose
    # memory is transposed (its grads are too) accumulates by C-order logical index.
    w = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).to(torch.float16).t())
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    assert not w.is_contiguous()
    xs = [torch.randn(3, 6, generator=torch.Generator().manual_seed(k)).to(torch.float16) for k in range(5)]

    def loss(x):
        return (x @ w + b).float().pow(2).sum()
    grads = []
    for x in xs:
        w.grad = b.grad = None
        loss(x).backward()
        grads.append([w.grad.clone(), b.grad.clone()])
    w.grad = b.grad = None
    with srkern.torch.sr_grad_accumulation([w, b], seed=5) as h:
        for x in xs:
            loss(x).backward()
    assert h.offsets == [0, 24]
    hand = [g.contiguous() for g in grads[0]]
    for k, gk in enumerate(grads[1:]):
        for i, g in enumerate(gk):
            srkern.add_(hand[i], g, seed=5, offset=h.offsets[i], step=k)
    assert_same_bits(w.grad.contiguous(), hand[0], what="transposed FP16 weight")
    assert_same_bits(b.grad, hand[1], what="FP16 bias")


def test_seed_none_and_state_dict():
    m = make_model()
    srkern.manual_seed(11)
    want = int(np.random.Generator(np.random.PCG64(11)).integers(0, 2 ** 64, dtype=np.uint64))
    with srkern.torch.sr_grad_accumulation(m) as h:
        assert h.seed == want
        h.steps[0] = 7
        state = h.state_dict()
    with srkern.torch.sr_grad_accumulation(m, seed=1) as h2:
        h2.load_state_dict(state)
        assert h2.seed == want and h2.steps[0] == 7
        with pytest.raises(ValueError, match="steps"):
            h2.load_state_dict({"seed": 1, "steps": [0]})
        # Everything is checked before anything is assigned: a bad step leaves the seed too.
        bad_steps = [0] * len(h2.params)
        bad_steps[-1] = -1
        with pytest.raises(ValueError, match=r"state\['steps'\]\[3\]"):
            h2.load_state_dict({"seed": 5, "steps": bad_steps})
        with pytest.raises(ValueError, match="seed"):
            h2.load_state_dict({"seed": -1, "steps": [1] * len(h2.params)})
        assert h2.seed == want and h2.steps[0] == 7 and h2.steps[1:] == [0] * (len(h2.params) - 1)


def test_bad_use_is_refused():
    m = make_model()
    with srkern.torch.sr_grad_accumulation(m, seed=1):
        with pytest.raises(ValueError, match="already hooked"):
            srkern.torch.sr_grad_accumulation(m, seed=2)
        with pytest.raises(RuntimeError, match="create_graph"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's own note on create_graph=True
            loss_of(m, micro_batches(1)[0]).backward(create_graph=True)
    with pytest.raises(ValueError, match="no BF16 or FP16"):
        srkern.torch.sr_grad_accumulation(torch.nn.Linear(3, 3), seed=1)
    leaf = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf"):
        srkern.torch.sr_grad_accumulation([leaf * 2], seed=1)
    with pytest.raises(TypeError, match="not a tensor"):
        srkern.torch.sr_grad_accumulation([leaf, 3.0], seed=1)
    with pytest.raises(ValueError, match="seed"):
        srkern.torch.sr_grad_accumulation([leaf], seed=-1)


class _NoGradFor(torch.autograd.Function):
    """y = w * x, whose backward returns None (an undefined gradient) for w."""
    @staticmethod
    def forward(ctx, w, x):
        return w.float() * x

    @staticmethod
    def backward(ctx, g):
        return None, g


def test_undefined_gradient_leaves_grad_alone(one_torch_thread):
    # A hooked parameter whose gradient is undefined in a backward (a custom Function returned
    # None for it): autograd runs its AccumulateGrad node (hooks included) with nothing to add,
    # and .grad stays as it was, None or the running sum, as in plain torch.
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    x = torch.ones(4, requires_grad=True)
    with srkern.torch.sr_grad_accumulation([w], seed=3) as h:
        _NoGradFor.apply(w, x).sum().backward()
        assert w.grad is None and h.steps == [0]
        w.float().sum().backward()
        w.float().sum().backward()
        before = w.grad.clone()
        _NoGradFor.apply(w, x).sum().backward()
        assert_same_bits(w.grad, before, what="after an undefined gradient")
        assert h.steps == [1]


def test_tensor_hooks_run_before_the_sr_addition():
    # A parameter's own register_hook hooks (gradient scaling, clipping) run before the node's
    # pre-hooks, so the SR addition adds the gradient they return: 3 x (2 x 1) = 6 exactly, as in
    # plain torch (the doubled gradient added before the hook would give 2 + 1 + 1 = 4).
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with srkern.torch.sr_grad_accumulation([w], seed=1) as h:
        w.register_hook(lambda g: g * 2)
        for _ in range(3):
            w.float().sum().backward()
    assert w.grad.tolist() == [6.0] * 4 and h.steps == [2]


def _raising_hook(when: set, calls: list):
    def hook(p):
        calls.append(len(calls))
        if len(calls) - 1 in when:
            raise RuntimeError("boom")
    return hook


@pytest.mark.parametrize("clear", [True, False])
def test_exception_mid_backward_keeps_the_running_sum(clear):
    # A post-accumulate hook registered before ours raises in the 4th backward (as an OOM inside
    # AccumulateGrad or any other error between our pre-hook and our post-hook would abort it).
    # With gradients of 1 (exact under SR), .grad must be what plain torch gives: after the
    # failed backward either .grad = None then one micro-batch (1), or one more (3 + 1 + 1 = 5).
    results = []
    for hooked in (False, True):
        w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
        w.register_post_accumulate_grad_hook(_raising_hook({3}, []))
        h = srkern.torch.sr_grad_accumulation([w], seed=1) if hooked else None
        for k in range(5):
            if k == 3:
                with pytest.raises(RuntimeError, match="boom"):
                    w.float().sum().backward()
                if clear:
                    w.grad = None
            else:
                w.float().sum().backward()
        results.append(w.grad.clone())
        if h is not None:
            h.remove()
    assert results[0].tolist() == [1.0 if clear else 5.0] * 4
    assert_same_bits(results[1], results[0], what=f"hooked vs torch after a failed backward, clear={clear}")


def test_other_post_accumulate_hooks_see_the_running_sum(one_torch_thread):
    # Post-accumulate hooks registered before and after ours see .grad holding the running sum
    # (the bits the backward leaves), not only the current micro-batch's gradient.
    m = make_model()
    seen: dict[str, list] = {"before": [], "after": []}
    p = m[0].weight
    p.register_post_accumulate_grad_hook(lambda t: seen["before"].append(t.grad.clone()))
    with srkern.torch.sr_grad_accumulation(m, seed=2):
        p.register_post_accumulate_grad_hook(lambda t: seen["after"].append(t.grad.clone()))
        after_backward = []
        for x in micro_batches(4, seed=5):
            loss_of(m, x).backward()
            after_backward.append(p.grad.clone())
    for which, got in seen.items():
        assert len(got) == 4
        for k, (a, b) in enumerate(zip(got, after_backward)):
            assert_same_bits(a, b, what=f"hook registered {which} ours, micro-batch {k}")


def test_dropped_handle_frees_parameters_and_unhooks():
    # A handle dropped without remove() takes its hooks off when collected and keeps nothing
    # alive: the parameters (and their .grad) are freed with the model, and a kept model
    # accumulates as plain autograd again and can be hooked anew.
    m = make_model()
    h = srkern.torch.sr_grad_accumulation(m, seed=1)
    xs = micro_batches(3, seed=6)
    for x in xs[:2]:
        loss_of(m, x).backward()
    wp, wg = weakref.ref(m[0].weight), weakref.ref(m[0].weight.grad)
    del m, h
    gc.collect()
    assert wp() is None and wg() is None, "the parameter or its .grad outlived the model and handle"

    m, plain = make_model(), make_model()
    h = srkern.torch.sr_grad_accumulation(m, seed=1)
    del h
    gc.collect()
    for x in xs:
        loss_of(m, x).backward()
        loss_of(plain, x).backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        assert_same_bits(p.grad, q.grad, what="after the handle was collected")
    srkern.torch.sr_grad_accumulation(m, seed=2).remove()


def test_moving_the_model_after_hooking_is_reported():
    # model.to(dtype) replaces each parameter's AccumulateGrad node (set_data), and the pre-hook
    # with it: the next backward raises instead of silently accumulating to nearest. A to() that
    # changes nothing keeps the node, and the hooks keep working; a new handle works after.
    m = make_model()
    xs = micro_batches(2, seed=8)
    with srkern.torch.sr_grad_accumulation(m, seed=1) as h:
        m.to(torch.bfloat16)
        loss_of(m, xs[0]).backward()
        loss_of(m, xs[1]).backward()
        assert h.steps == [1] * 4
        m.to(torch.float16)
        with pytest.raises(RuntimeError, match="create a new one after moving the model"):
            loss_of(m, xs[0].half()).backward()
    m.zero_grad()
    with srkern.torch.sr_grad_accumulation(m, seed=1) as h:
        loss_of(m, xs[0].half()).backward()
        loss_of(m, xs[1].half()).backward()
        assert h.steps == [1] * 4


def test_grad_sharing_memory_is_refused():
    # A .grad whose elements share memory (an expand()ed tensor) cannot be accumulated into in
    # place: a clear error, and .grad and the step count are unchanged (autograd refuses it too).
    w = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    w.grad = torch.ones(1, 3, dtype=torch.bfloat16).expand(4, 3)
    with srkern.torch.sr_grad_accumulation([w], seed=1) as h:
        with pytest.raises(ValueError, match="share memory"):
            w.float().sum().backward()
        assert h.steps == [0] and w.grad.stride() == (0, 1) and w.grad.tolist() == [[1.0] * 3] * 4
