"""Adafactor step benchmarks: srkern.adafactor_step against torch.optim.Adafactor and the copy
bandwidth of the bytes a step must move, in one run.

Contenders (pytest-benchmark entries recording bytes moved, GB/s, the copy bandwidth of the same
bytes and the baselines' times, all from this run):
  * ``srkern.adafactor_step`` in ``bf16-sr`` (BF16 statistics), ``bf16-nearest`` and
    ``fp32-master`` (BF16 gradients);
  * torch mixed precision: ``torch.optim.Adafactor(foreach=True)`` stepping FP32 masters with
    FP32 gradients, then ``torch._foreach_copy_`` into the BF16 model weights;
  * ``torch.optim.Adafactor(foreach=True)`` on BF16 weights and gradients (pure BF16,
    round-to-nearest writes: the bytes of ``bf16-sr``);
  * torch ``copy_`` of the bytes ``bf16-sr`` must move (the roofline; all cores).

The parameters are ``--adamw-size`` elements (default 16M and 64M on CPU) in 16 matrices of 1024
rows, all factored. Bytes a step must move per parameter (the statistics are O(rows + columns),
left out): the gradient read and the weight read and written, bf16-sr 2 + 2x2 = 6, fp32-master
2 + 2x4 + 2 = 12, torch mixed precision 4 + 2x4 + 2 = 14. srkern's four launches read the
gradient four times and the weight twice (2x4 + 2x2 + 2 = 14 bytes in bf16-sr): the entries' GB/s
count the 6, so their ratio to copy says how far the passes are from one read of everything.

Run:  python -m pytest -rs benchmarks/bench_adafactor.py --benchmark-json=out.json [--adamw-size=16M]
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

import _common
import srkern
from bench_sgd import COPY, bench, copy_fn, split, tensors
from srkern.precisions import PRECISIONS

HYPER = dict(lr=1e-2, weight_decay=1e-4)
SEED = 0x5EED
ROWS = 1024
MODES = ["bf16-sr", "bf16-nearest", "fp32-master"]
MIXED = "torch Adafactor(foreach=True) fp32-master + bf16 copy"
PURE_BF16 = "torch Adafactor(foreach=True) bf16 (round-to-nearest)"
CITED = (MIXED, PURE_BF16)
BYTES = {"bf16-sr": 6, "bf16-nearest": 6, "fp32-master": 12, MIXED: 14, PURE_BF16: 6}


def shapes(n: int) -> list[tuple[int, int]]:
    return [(ROWS, max(1, s // ROWS)) for s in split(n)]


def srkern_step(n: int, precision: str, device: str) -> Callable[[], None]:
    import torch
    mode = PRECISIONS[precision]
    shp = shapes(n)
    sizes = [r * c for r, c in shp]
    params = [w.view(s) for w, s in zip(tensors(sizes, torch.bfloat16, device, 1), shp)]
    grads = [g.view(s) for g, s in zip(tensors(sizes, torch.bfloat16, device, 0, 1e-3), shp)]
    sdt = torch.bfloat16 if mode.state_dtypes[0] == "bfloat16" else torch.float32
    rows = [torch.zeros(r, 1, dtype=sdt, device=device) for r, _ in shp]
    cols = [torch.zeros(1, c, dtype=sdt, device=device) for _, c in shp]
    extra = {"master_params": [p.float() for p in params]} if mode.master else {}
    counter = [0]

    def run() -> None:
        counter[0] += 1
        srkern.adafactor_step(params, grads, rows, cols, [None] * len(params), step=counter[0],
                              precision=precision, seed=SEED, **HYPER, **extra)
    return run


def torch_step(name: str, n: int, device: str) -> Callable[[], None]:
    import torch
    shp = shapes(n)
    sizes = [r * c for r, c in shp]
    dt = torch.bfloat16 if name == PURE_BF16 else torch.float32
    ps = [torch.nn.Parameter(w.view(s)) for w, s in zip(tensors(sizes, dt, device, 1), shp)]
    for p, g, s in zip(ps, tensors(sizes, dt, device, 0, 1e-3), shp):
        p.grad = g.view(s)
    opt = torch.optim.Adafactor(ps, **HYPER, foreach=True)
    if name == PURE_BF16:
        return opt.step
    model = [torch.empty(s, dtype=torch.bfloat16, device=device) for s in shp]

    def run() -> None:
        opt.step()
        with torch.no_grad():
            torch._foreach_copy_(model, ps)
    return run


@pytest.mark.parametrize("name", [COPY, MIXED, PURE_BF16], ids=["copy", "torch-mixed", "torch-bf16"])
def test_adafactor_baseline(benchmark, baselines, device, adamw_size, name):
    benchmark.group = f"adafactor {device} n={adamw_size}"
    nbytes = BYTES["bf16-sr" if name == COPY else name] * adamw_size
    make = (lambda: copy_fn(nbytes, device)) if name == COPY else (lambda: torch_step(name, adamw_size, device))
    bench(benchmark, baselines, name, make, adamw_size, nbytes, device, "torch", (), lambda c: None)


@pytest.mark.parametrize("precision", MODES)
def test_adafactor_srkern(benchmark, baselines, device, adamw_size, precision):
    benchmark.group = f"adafactor {device} n={adamw_size}"
    bench(benchmark, baselines, f"srkern.adafactor_step {precision}", lambda: srkern_step(adamw_size, precision, device),
          adamw_size, BYTES[precision] * adamw_size, device,
          f"{PRECISIONS[precision].param_dtype} weights, {PRECISIONS[precision].state_dtypes[0]} statistics, bf16 grad",
          CITED, lambda c: torch_step(c, adamw_size, device), precision=precision)
