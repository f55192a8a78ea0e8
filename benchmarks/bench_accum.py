"""SR accumulation benchmarks: srkern.add_ against copy bandwidth and against what a PyTorch user
would run.

Contenders (each a pytest-benchmark entry; every entry records bytes moved, GB/s, the copy
bandwidth of the same bytes and the baselines' times, all measured in this run):
  * srkern.add_ into a BF16 accumulator, x FP32 or BF16, stochastic and nearest rounding;
  * torch ``copy_`` of the same number of bytes (the roofline; all cores);
  * torch's own ``acc.add_(x, alpha=alpha)`` into the BF16 tensor (round-to-nearest: what
    autograd's gradient accumulation does), the primary baseline;
  * the PyTorch-ops SR recipe a user would write instead: the FP32 sum, 16 random bits added
    below the BF16 cut (``torch.randint``), masked, cast, copied back into ``acc``.

Bytes moved by one call on n elements: acc read and written (2n + 2n) plus x read (4n FP32, 2n
BF16): 8n or 6n. The accumulation is memory-bound like a cast; the target is the cast's: SR close
to copy bandwidth and no slower than torch's round-to-nearest ``add_``.

Per-call cost: 1K elements, where the call's host work is nearly all of the time (gradient
accumulation calls add_ once per parameter per micro-batch), against torch's ``add_``.

Run:  python -m pytest benchmarks/bench_accum.py --benchmark-json=out.json
      (--size=64M for the headline size, --device=cpu,cuda)
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

import _common
import srkern

SEED = 0x5EED
ALPHA = 0.5
X_DTYPES = ("float32", "bfloat16")


def _bytes(n: int, x_dtype: str) -> int:
    return n * (4 + (4 if x_dtype == "float32" else 2))


def _buffers(inputs, device: str, n: int, x_dtype: str):
    """(acc, x): a BF16 accumulator and the addend, from the run's cached FP32 input."""
    import torch
    x32 = inputs(device, n)
    acc = x32.to(torch.bfloat16)
    x = x32 if x_dtype == "float32" else x32.to(torch.bfloat16)
    return acc, (x * 1e-3)


# ---- the contenders, as closures over preallocated buffers -------------------------------------------

def srkern_add(acc, x, rounding: str) -> Callable[[], Any]:
    """srkern.add_ with a fixed seed (the step does not change the work)."""
    return lambda: srkern.add_(acc, x, alpha=ALPHA, rounding=rounding, seed=SEED)


def torch_add(acc, x) -> Callable[[], Any]:
    """torch's in-place add into the BF16 tensor: FP32 arithmetic, round-to-nearest-even."""
    return lambda: acc.add_(x, alpha=ALPHA)


def torch_sr_recipe(acc, x) -> Callable[[], Any]:
    """SR accumulation from PyTorch ops: the FP32 sum, 16 random bits below the BF16 cut, masked."""
    import torch

    def run():
        s = acc.float().add_(x, alpha=ALPHA)
        r = torch.randint(0, 1 << 16, s.shape, dtype=torch.int32, device=s.device)
        acc.copy_(((s.view(torch.int32) + r) & -65536).view(torch.float32))
    return run


def copy_fn(nbytes: int, device: str) -> Callable[[], Any]:
    import torch
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _baselines(baselines: _common.Baselines, inputs, device: str, n: int, x_dtype: str,
               rounding: str) -> dict[str, float]:
    """Baselines of one accumulation, primary first: torch's RN add_, then (SR) the recipe."""
    out = {"torch add_ (RN)": baselines.time(f"torch add_ x={x_dtype}", device, n,
                                             lambda: torch_add(*_buffers(inputs, device, n, x_dtype)))}
    if rounding == "stochastic":
        out["torch SR recipe"] = baselines.time(f"torch SR recipe x={x_dtype}", device, n,
                                                lambda: torch_sr_recipe(*_buffers(inputs, device, n, x_dtype)))
    return out


# ---- headline size: roofline and baselines first, then srkern ---------------------------------------

@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_copy(benchmark, device, size, x_dtype):
    """Roofline entry: torch ``copy_`` of as many bytes as the accumulation moves."""
    benchmark.group = f"accum {device} n={size} x={x_dtype}"
    nbytes = _bytes(size, x_dtype)
    _common.run_benchmark(benchmark, copy_fn(nbytes, device), device)
    _common.record(benchmark, kernel="torch copy_ (roofline)", size=size, dtype="uint8",
                   device=device, bytes_moved=nbytes, role="roofline")


@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_torch_add(benchmark, inputs, baselines, device, size, x_dtype):
    """Baseline entry: torch's ``acc.add_(x, alpha=alpha)`` into BF16 (round-to-nearest)."""
    benchmark.group = f"accum {device} n={size} x={x_dtype}"
    _common.run_benchmark(benchmark, torch_add(*_buffers(inputs, device, size, x_dtype)), device)
    baselines.note(f"torch add_ x={x_dtype}", device, size, _common.stats_min(benchmark))
    _common.record(benchmark, kernel="torch add_ (RN) bf16", size=size, dtype=f"bfloat16+={x_dtype}",
                   device=device, bytes_moved=_bytes(size, x_dtype), role="baseline")


@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_torch_sr_recipe(benchmark, inputs, baselines, device, size, x_dtype):
    """Baseline entry: SR accumulation written with PyTorch ops (allocates, as user code does)."""
    benchmark.group = f"accum {device} n={size} x={x_dtype}"
    _common.run_benchmark(benchmark, torch_sr_recipe(*_buffers(inputs, device, size, x_dtype)), device)
    baselines.note(f"torch SR recipe x={x_dtype}", device, size, _common.stats_min(benchmark))
    _common.record(benchmark, kernel="torch SR recipe bf16", size=size, dtype=f"bfloat16+={x_dtype}",
                   device=device, bytes_moved=_bytes(size, x_dtype), role="baseline")


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_srkern_add(benchmark, inputs, baselines, device, size, x_dtype, rounding):
    """srkern.add_ into BF16; baselines: torch's RN add_ and (SR) the PyTorch-ops recipe."""
    benchmark.group = f"accum {device} n={size} x={x_dtype}"
    _common.run_benchmark(benchmark, srkern_add(*_buffers(inputs, device, size, x_dtype), rounding), device)
    _common.record(benchmark, kernel=f"srkern.add_ bf16 {rounding}", size=size, dtype=f"bfloat16+={x_dtype}",
                   device=device, bytes_moved=_bytes(size, x_dtype),
                   baselines=_baselines(baselines, inputs, device, size, x_dtype, rounding))


# ---- per-call cost: 1K elements ------------------------------------------------------------------------

CALL_N = 1 << 10


@pytest.mark.parametrize("contender", ["torch add_ (RN)", "srkern.add_ stochastic"])  # torch first
def test_accum_call(benchmark, baselines, device, contender):
    """Time per call (``call_us``) of a 1K-element accumulation, FP32 x into BF16."""
    import torch
    benchmark.group = f"accum per call {device} n={CALL_N}"
    x = torch.randn(CALL_N, generator=torch.Generator(device=device).manual_seed(0), device=device)
    acc = x.to(torch.bfloat16)
    fn = torch_add(acc, x) if contender.startswith("torch") else srkern_add(acc, x, "stochastic")
    _common.run_benchmark(benchmark, fn, device, budget=0.5)
    t = _common.stats_min(benchmark)
    base = None
    if contender.startswith("torch"):
        baselines.note("torch add_ [1K call]", device, CALL_N, t)
    else:
        base = {"torch add_ (RN)": baselines.time("torch add_ [1K call]", device, CALL_N,
                                                  lambda: torch_add(x.to(torch.bfloat16), x))}
    _common.record(benchmark, kernel=f"{contender} [1K call]", size=CALL_N, dtype="bfloat16+=float32",
                   device=device, bytes_moved=_bytes(CALL_N, "float32"), baselines=base,
                   role="kernel" if base else "baseline", **({"call_us": t * 1e6} if t else {}))
