"""Cast benchmarks: srkern.cast against copy bandwidth and against what a PyTorch user would run.

Contenders (each a pytest-benchmark entry; every entry records bytes moved, GB/s, the copy
bandwidth of the same bytes and the baselines' times, all measured in this run):
  * srkern.cast FP32 -> BF16 / FP16 / FP8 e4m3fn / FP8 e5m2, stochastic and nearest rounding,
    and the exact upcasts back to FP32;
  * torch ``copy_`` of the same number of bytes (the roofline; all cores);
  * torch's round-to-nearest cast ``.to(dtype)``;
  * the PyTorch-ops SR recipe that torchao-style code runs: 16-bit random integers
    (``torch.randint``) added to the FP32 bits, masked with 0xFFFF0000, viewed back and cast.

Bytes moved by a cast of n elements: 4n read + (2n or n) written. Targets for SR to BF16 on CPU
at 64M elements: >= 0.8x copy bandwidth, >= 10x the recipe, no slower than torch's
round-to-nearest cast.

Per-call cost (issue 13): SR to BF16 of 1K elements, where the data is 6 KB and the call's host
work (argument checks, DLPack views, the launch) is nearly all of the time, as ``x.to(dtype)``
and as ``srkern.cast(x, "bfloat16")`` are called (each allocates its output), and into a
preallocated output (``out=`` against torch's ``copy_``). Target: srkern.cast of 1K at most 5 us
per call.

Run:  python -m pytest benchmarks/bench_cast.py --benchmark-json=out.json
      (--size=64M for the headline size, --sweep for 2**10..2**28, --device=cpu,cuda)
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

import _common
import srkern
from srkern.formats import FORMATS_BY_SHORT  # keyed by the short names (bf16, f16, e4m3, e5m2) used as ids

SEED = 0x5EED


def _torch_dtype(short: str):
    import torch
    return getattr(torch, FORMATS_BY_SHORT[short].name)  # torch spells every format as srkern does


def _cast_bytes(n: int, short: str) -> int:
    return n * (4 + FORMATS_BY_SHORT[short].itemsize)


# ---- the contenders, as closures over preallocated buffers -------------------------------------------

def srkern_cast(x, short: str, rounding: str) -> Callable[[], Any]:
    """srkern.cast of ``x`` into a preallocated output (no allocation inside the timed call)."""
    import torch
    out = torch.empty(x.shape, dtype=_torch_dtype(short), device=x.device)
    name = FORMATS_BY_SHORT[short].name
    return lambda: srkern.cast(x, name, rounding=rounding, seed=SEED, out=out)


def srkern_upcast(x16) -> Callable[[], Any]:
    import torch
    out = torch.empty(x16.shape, dtype=torch.float32, device=x16.device)
    return lambda: srkern.cast(x16, "float32", out=out)


def torch_to(x, dtype) -> Callable[[], Any]:
    """torch's own conversion into a preallocated output (``out.copy_(x)`` is ``x.to(dtype)``
    without the allocation)."""
    import torch
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    return lambda: out.copy_(x)


def torch_sr_recipe(x) -> Callable[[], Any]:
    """SR to BF16 from PyTorch ops, as torchao-style code writes it: add 16 random bits below the
    BF16 cut, drop them, cast (the cast is then exact)."""
    import torch

    def run():
        bits = x.view(torch.int32)
        r = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
        return ((bits + r) & -65536).view(torch.float32).to(torch.bfloat16)
    return run


def copy_fn(nbytes: int, device: str) -> Callable[[], Any]:
    import torch
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _baselines(baselines: _common.Baselines, inputs, device: str, n: int, short: str,
               rounding: str) -> dict[str, float]:
    """Baselines of one cast, primary first: the recipe for SR to BF16, torch's RN cast otherwise."""
    x = inputs(device, n)
    tdt = _torch_dtype(short)
    out = {}
    if short == "bf16" and rounding == "stochastic":
        out["torch SR recipe"] = baselines.time("torch SR recipe", device, n, lambda: torch_sr_recipe(x))
    out[f"torch .to({FORMATS_BY_SHORT[short].name})"] = baselines.time(f"torch .to({short})", device, n,
                                                          lambda: torch_to(x, tdt))
    return out


# ---- headline size (64M elements on CPU): roofline and baselines first, then srkern ------------------

def test_copy(benchmark, device, size):
    """Roofline entry: torch ``copy_`` of as many bytes as the BF16 cast moves (6 bytes/element)."""
    benchmark.group = f"cast {device} n={size}"
    nbytes = _cast_bytes(size, "bf16")
    _common.run_benchmark(benchmark, copy_fn(nbytes, device), device)
    _common.record(benchmark, kernel="torch copy_ (roofline)", size=size, dtype="uint8",
                   device=device, bytes_moved=nbytes, role="roofline")


@pytest.mark.parametrize("short", list(FORMATS_BY_SHORT))
def test_torch_to(benchmark, inputs, baselines, device, size, short):
    """Baseline entry: torch's round-to-nearest ``.to(dtype)`` (into a preallocated output)."""
    benchmark.group = f"cast {device} n={size}"
    x = inputs(device, size)
    _common.run_benchmark(benchmark, torch_to(x, _torch_dtype(short)), device)
    baselines.note(f"torch .to({short})", device, size, _common.stats_min(benchmark))
    _common.record(benchmark, kernel=f"torch .to({FORMATS_BY_SHORT[short].name})", size=size,
                   dtype=f"float32->{FORMATS_BY_SHORT[short].name}", device=device,
                   bytes_moved=_cast_bytes(size, short), role="baseline")


def test_torch_sr_recipe(benchmark, inputs, baselines, device, size):
    """Baseline entry: the PyTorch-ops SR recipe to BF16 (allocates, as user code does)."""
    benchmark.group = f"cast {device} n={size}"
    x = inputs(device, size)
    _common.run_benchmark(benchmark, torch_sr_recipe(x), device)
    baselines.note("torch SR recipe", device, size, _common.stats_min(benchmark))
    _common.record(benchmark, kernel="torch SR recipe bf16", size=size, dtype="float32->bfloat16",
                   device=device, bytes_moved=_cast_bytes(size, "bf16"), role="baseline")


ROUNDINGS = [("bf16", "stochastic"), ("bf16", "nearest"), ("f16", "stochastic"), ("f16", "nearest"),
             ("e4m3", "stochastic"), ("e4m3", "nearest"), ("e5m2", "stochastic"), ("e5m2", "nearest")]


@pytest.mark.parametrize("short,rounding", ROUNDINGS, ids=[f"{s}-{r[:2]}" for s, r in ROUNDINGS])
def test_srkern_cast(benchmark, inputs, baselines, device, size, short, rounding):
    """srkern.cast FP32 -> 16/8-bit; baselines: the SR recipe (BF16 SR) and torch's RN cast."""
    benchmark.group = f"cast {device} n={size}"
    x = inputs(device, size)
    fn = srkern_cast(x, short, rounding)
    _common.run_benchmark(benchmark, fn, device)
    _common.record(benchmark, kernel=f"srkern.cast {short} {rounding}", size=size,
                   dtype=f"float32->{FORMATS_BY_SHORT[short].name}", device=device,
                   bytes_moved=_cast_bytes(size, short),
                   baselines=_baselines(baselines, inputs, device, size, short, rounding))


@pytest.mark.parametrize("short", list(FORMATS_BY_SHORT))
def test_srkern_upcast(benchmark, inputs, baselines, device, size, short):
    """srkern.cast 16/8-bit -> FP32 (exact); baseline: torch's ``.to(torch.float32)``."""
    import torch
    benchmark.group = f"upcast {device} n={size}"
    x16 = inputs(device, size).to(_torch_dtype(short))
    fn = srkern_upcast(x16)
    _common.run_benchmark(benchmark, fn, device)
    base = baselines.time(f"torch upcast {short}", device, size, lambda: torch_to(x16, torch.float32))
    _common.record(benchmark, kernel=f"srkern.cast {short}->float32", size=size,
                   dtype=f"{FORMATS_BY_SHORT[short].name}->float32", device=device,
                   bytes_moved=_cast_bytes(size, short), baselines={"torch .to(float32)": base})


# ---- size sweep: SR to BF16 and its baselines --------------------------------------------------------

# Roofline and baselines first, so the srkern entries of a size cite the baselines' own entries.
SWEEP = ["torch copy_", "torch .to(bfloat16)", "torch SR recipe", "srkern bf16 stochastic",
         "srkern bf16 nearest"]


@pytest.mark.parametrize("contender", SWEEP)
def test_sweep_bf16(benchmark, inputs, baselines, device, sweep_size, contender):
    """GB/s against size, launch overhead included (small sizes) for SR/RN to BF16 and baselines."""
    import torch
    n = sweep_size
    benchmark.group = f"sweep bf16 {device}"
    x = inputs(device, n)
    nbytes = _cast_bytes(n, "bf16")
    fn = {"srkern bf16 stochastic": lambda: srkern_cast(x, "bf16", "stochastic"),
          "srkern bf16 nearest": lambda: srkern_cast(x, "bf16", "nearest"),
          "torch .to(bfloat16)": lambda: torch_to(x, torch.bfloat16),
          "torch SR recipe": lambda: torch_sr_recipe(x),
          "torch copy_": lambda: copy_fn(nbytes, device)}[contender]()
    _common.run_benchmark(benchmark, fn, device, budget=0.5)
    base = None
    if contender.startswith("srkern"):
        base = _baselines(baselines, inputs, device, n, "bf16", contender.split()[-1])
    elif contender.startswith("torch ."):
        baselines.note("torch .to(bf16)", device, n, _common.stats_min(benchmark))
    elif contender == "torch SR recipe":
        baselines.note("torch SR recipe", device, n, _common.stats_min(benchmark))
    role = "roofline" if contender == "torch copy_" else ("kernel" if base else "baseline")
    _common.record(benchmark, kernel=contender, size=n, dtype="float32->bfloat16", device=device,
                   bytes_moved=nbytes, baselines=base, sweep=True, role=role)


# ---- per-call cost: 1K elements, where the call's host work is nearly the whole time -------------------

CALL_N = 1 << 10
CALLS = {"torch .to(bfloat16)": "allocating", "srkern.cast bf16 stochastic": "allocating",
         "torch copy_ into out": "out", "srkern.cast bf16 stochastic out=": "out"}
CALL_BASELINE = {"allocating": "torch .to(bfloat16)", "out": "torch copy_ into out"}


def _call_fn(contender: str, x) -> Callable[[], Any]:
    import torch
    if contender == "torch .to(bfloat16)":
        return lambda: x.to(torch.bfloat16)
    if contender == "srkern.cast bf16 stochastic":
        return lambda: srkern.cast(x, "bfloat16", seed=SEED)
    if contender == "torch copy_ into out":
        return torch_to(x, torch.bfloat16)
    return srkern_cast(x, "bf16", "stochastic")


@pytest.mark.parametrize("contender", list(CALLS))  # torch first: srkern cites its entry
def test_cast_call(benchmark, baselines, device, contender):
    """Time per call of SR to BF16 on 1K elements (``call_us``), against torch's cast of the same
    1K: the allocating call against ``.to``, the ``out=`` call against ``copy_``."""
    import torch
    benchmark.group = f"cast per call {device} n={CALL_N}"
    x = torch.randn(CALL_N, generator=torch.Generator(device=device).manual_seed(0), device=device)
    kind = CALLS[contender]
    _common.run_benchmark(benchmark, _call_fn(contender, x), device, budget=0.5)
    t = _common.stats_min(benchmark)
    base = None
    if contender.startswith("torch"):
        baselines.note(f"{contender} [1K call]", device, CALL_N, t)
    else:
        name = CALL_BASELINE[kind]
        base = {name: baselines.time(f"{name} [1K call]", device, CALL_N, lambda: _call_fn(name, x))}
    _common.record(benchmark, kernel=f"{contender} [1K call]", size=CALL_N, dtype="float32->bfloat16",
                   device=device, bytes_moved=_cast_bytes(CALL_N, "bf16"), baselines=base,
                   role="kernel" if base else "baseline", call=kind,
                   **({"call_us": t * 1e6} if t else {}))
