"""Lion step benchmarks: srkern.lion_step in every precision mode against a torch foreach Lion and
against the copy bandwidth of the bytes the step must move, in one run.

torch has no Lion optimizer, so the baseline is the published update written with torch's
multi-tensor ops (``torch_lion_foreach`` below: ``_foreach_mul_`` for the decoupled decay,
``_foreach_mul`` / ``_foreach_add_`` / ``_foreach_sign_`` for sign(b1*m + (1-b1)*g), then the
weight and moment updates; the order of lucidrains/lion-pytorch), run
  * on FP32 masters with FP32 gradients, then ``torch._foreach_copy_`` into the BF16 model weights
    (mixed precision: what (BF16, FP32) training runs), and
  * on BF16 weights, gradients and moments (pure BF16, round-to-nearest writes).
Contenders, bytes and timing otherwise as benchmarks/bench_sgd.py (its helpers): per parameter
bf16-sr / bf16-nearest with a BF16 moment 10 (FP32 moment 14), bf16-kahan 14, fp32-master 20,
fp32 20, torch mixed precision 22, torch pure BF16 10 (the minimum: the foreach version also
writes and reads its temporary c, 2 more passes, not counted).

Run:  python -m pytest -rs benchmarks/bench_lion.py --benchmark-json=out.json [--adamw-size=16M]
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

import srkern
from bench_sgd import MODES, PRECISIONS, bench, copy_fn, grad_dtype, label, split, srkern_step, step_bytes, tensors

HYPER = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
COPY = "torch copy_ (roofline)"
FOREACH = "torch foreach Lion (torch ops) fp32-master + bf16 copy"
PURE_BF16 = "torch foreach Lion (torch ops) bf16 (round-to-nearest)"
CITED = (FOREACH, PURE_BF16)
TORCH_BYTES = {FOREACH: 4 + 8 + 8 + 2, PURE_BF16: 10}


def torch_lion_foreach(params: list, grads: list, exp_avgs: list, lr: float, betas: tuple[float, float],
                       weight_decay: float) -> None:
    """One Lion step with torch's foreach ops (no grad tracking needed: plain tensors)."""
    import torch
    b1, b2 = betas
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    c = torch._foreach_mul(exp_avgs, b1)
    torch._foreach_add_(c, grads, alpha=1.0 - b1)
    torch._foreach_sign_(c)
    torch._foreach_add_(params, c, alpha=-lr)
    torch._foreach_mul_(exp_avgs, b2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - b2)


def torch_step(name: str, sizes: list[int], device: str) -> Callable[[], None]:
    import torch
    dt = torch.bfloat16 if name == PURE_BF16 else torch.float32
    params = tensors(sizes, dt, device, 1)
    grads = tensors(sizes, dt, device, 0, 1e-3)
    m = [torch.zeros(s, dtype=dt, device=device) for s in sizes]
    if name == PURE_BF16:
        return lambda: torch_lion_foreach(params, grads, m, **HYPER)
    model = [torch.empty(s, dtype=torch.bfloat16, device=device) for s in sizes]

    def run() -> None:
        torch_lion_foreach(params, grads, m, **HYPER)
        torch._foreach_copy_(model, params)
    return run


@pytest.mark.parametrize("name", [COPY, FOREACH, PURE_BF16], ids=["copy", "torch-foreach", "torch-bf16"])
def test_lion_baseline(benchmark, baselines, device, adamw_size, name):
    benchmark.group = f"lion {device} n={adamw_size}"
    sizes = split(adamw_size)
    nbytes = step_bytes("bf16-sr", "bfloat16") * adamw_size if name == COPY else TORCH_BYTES[name] * adamw_size
    make: Callable[[], Any] = (lambda: copy_fn(nbytes, device)) if name == COPY else (lambda: torch_step(name, sizes, device))
    bench(benchmark, baselines, name, make, adamw_size, nbytes, device, "torch", (), lambda c: None)


@pytest.mark.parametrize("precision,state_dtype", MODES, ids=[f"{p}-{s[:4]}" for p, s in MODES])
def test_lion_srkern(benchmark, baselines, device, adamw_size, precision, state_dtype):
    benchmark.group = f"lion {device} n={adamw_size}"
    sizes = split(adamw_size)
    nbytes = step_bytes(precision, state_dtype) * adamw_size
    bench(benchmark, baselines, label("lion", precision, state_dtype),
          lambda: srkern_step(sizes, precision, state_dtype, device, srkern.lion_step, HYPER), adamw_size, nbytes, device,
          f"{PRECISIONS[precision].param_dtype} weights, {state_dtype} exp_avg, {grad_dtype(precision)} grad",
          CITED, lambda c: torch_step(c, sizes, device), precision=precision, state_dtype=state_dtype)
