"""SGD step benchmarks: srkern.sgd_step (momentum 0.9, weight decay) in every precision mode against
torch.optim.SGD and against the copy bandwidth of the bytes the step must move, in one run.

Contenders (each a pytest-benchmark entry recording bytes moved, GB/s, the copy bandwidth of the
same bytes measured in this run and the baselines' times from this run):
  * ``srkern.sgd_step`` in ``bf16-sr`` (BF16 buffer; also FP32 buffer), ``bf16-nearest``,
    ``bf16-kahan``, ``fp32-master``, ``fp32`` (BF16 gradients; FP32 in ``fp32``);
  * torch mixed precision, what (BF16, FP32) training runs: ``torch.optim.SGD(foreach=True)``
    and ``(fused=True)`` (where this torch runs it on the device; skipped with the reason
    otherwise) stepping FP32 masters with FP32 gradients, then ``torch._foreach_copy_`` of the
    masters into the BF16 model weights;
  * ``torch.optim.SGD(foreach=True)`` on BF16 weights, gradients and buffer: pure BF16 with
    round-to-nearest writes (what stalls below half an ulp; the bytes of ``bf16-sr``);
  * torch ``copy_`` of as many bytes as ``bf16-sr`` moves (the roofline; all cores).

Bytes moved per parameter (each buffer read once and written once, gradients read; the BF16
copy of a master only written): bf16-sr / bf16-nearest with a BF16 buffer 2 + 2x2 + 2x2 = 10
(FP32 buffer 14); bf16-kahan 14; fp32-master 2 + 2x4 + 2x4 + 2 = 20; fp32 4 + 8 + 8 = 20;
torch mixed precision 4 + 8 + 8 + 2 = 22; torch pure BF16 10.

The CPU path of sgd_step runs 64-element ``omp simd`` loops over the shared per-element functions
(kernels/srk_opt1.h, srk_opt1_run8), with the Philox words of 8 blocks drawn at once by
cpu/philox_tile.h's SIMD tile. Layout and timing as benchmarks/bench_adamw.py: ``--adamw-size``
parameters (default 16M and 64M on CPU) in 16 equal tensors, minimum over rounds fitted to ~1 s.

Run:  python -m pytest -rs benchmarks/bench_sgd.py --benchmark-json=out.json [--adamw-size=16M]
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

import _common
import srkern
from srkern.precisions import PRECISIONS

HYPER = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
SEED = 0x5EED
TENSORS = 16
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

# (precision, buffer dtype)
MODES = [("bf16-sr", "bfloat16"), ("bf16-sr", "float32"), ("bf16-nearest", "bfloat16"),
         ("bf16-kahan", "bfloat16"), ("fp32-master", "float32"), ("fp32", "float32")]
COPY = "torch copy_ (roofline)"
FOREACH = "torch SGD(foreach=True) fp32-master + bf16 copy"
FUSED = "torch SGD(fused=True) fp32-master + bf16 copy"
PURE_BF16 = "torch SGD(foreach=True) bf16 (round-to-nearest)"
TORCH_IMPL = {FOREACH: "foreach", FUSED: "fused"}
CITED = (FOREACH, FUSED, PURE_BF16)
_unavailable: dict[str, str] = {}


def label(family: str, precision: str, state_dtype: str) -> str:
    default = PRECISIONS[precision].state_dtypes[0]
    return f"srkern.{family}_step {precision}" + ("" if state_dtype == default else " fp32-state")


def grad_dtype(precision: str) -> str:
    return "float32" if precision == "fp32" else "bfloat16"


def step_bytes(precision: str, state_dtype: str, states: int = 1) -> int:
    """Bytes one step of a single-state optimizer moves per parameter (see the module text)."""
    p = PRECISIONS[precision]
    moved = ITEMSIZE[grad_dtype(precision)] + states * 2 * ITEMSIZE[state_dtype]
    moved += 2 * 4 + 2 if p.master else 2 * ITEMSIZE[p.param_dtype]
    return moved + (2 * 2 if p.compensation else 0)


def split(n: int, tensors: int = TENSORS) -> list[int]:
    tensors = max(1, min(tensors, n))
    base = n // tensors
    return [base] * (tensors - 1) + [n - base * (tensors - 1)]


def tensors(sizes: list[int], dtype: Any, device: str, seed: int, scale: float = 1.0) -> list[Any]:
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(s, generator=g, device=device) * scale).to(dtype) for s in sizes]


def srkern_buffers(sizes: list[int], precision: str, state_dtype: str, device: str) -> dict[str, Any]:
    """Weights, gradients (x 1e-3), one zero state per tensor, and the mode's extra buffers."""
    import torch
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    mode = PRECISIONS[precision]
    params = tensors(sizes, tdt[mode.param_dtype], device, 1)
    out = {"params": params, "grads": tensors(sizes, tdt[grad_dtype(precision)], device, 0, 1e-3),
           "states": [torch.zeros(s, dtype=tdt[state_dtype], device=device) for s in sizes], "extra": {}}
    if mode.master:
        out["extra"]["master_params"] = [p.float() for p in params]
    if mode.compensation:
        out["extra"]["compensation"] = [torch.zeros(s, dtype=torch.bfloat16, device=device) for s in sizes]
    return out


def srkern_step(sizes: list[int], precision: str, state_dtype: str, device: str,
                step_fn: Callable[..., None] = srkern.sgd_step, hyper: dict[str, Any] = HYPER) -> Callable[[], None]:
    """One step of a single-state optimizer (``step_fn``: sgd_step, or lion_step from
    benchmarks/bench_lion.py) on fresh buffers, the step count advancing every call."""
    b = srkern_buffers(sizes, precision, state_dtype, device)
    counter = [0]

    def run() -> None:
        counter[0] += 1
        step_fn(b["params"], b["grads"], b["states"], step=counter[0], precision=precision,
                seed=SEED, **hyper, **b["extra"])
    return run


def torch_step(name: str, sizes: list[int], device: str) -> Callable[[], None]:
    import torch
    if name == PURE_BF16:
        params = [torch.nn.Parameter(w) for w in tensors(sizes, torch.bfloat16, device, 1)]
        for w, g in zip(params, tensors(sizes, torch.bfloat16, device, 0, 1e-3)):
            w.grad = g
        opt = torch.optim.SGD(params, **HYPER, foreach=True)
        return opt.step
    masters = [torch.nn.Parameter(w) for w in tensors(sizes, torch.float32, device, 1)]
    for w, g in zip(masters, tensors(sizes, torch.float32, device, 0, 1e-3)):
        w.grad = g
    model = [torch.empty(s, dtype=torch.bfloat16, device=device) for s in sizes]
    opt = torch.optim.SGD(masters, **HYPER, **{TORCH_IMPL[name]: True})

    def run() -> None:
        opt.step()
        with torch.no_grad():
            torch._foreach_copy_(model, masters)
    return run


def copy_fn(nbytes: int, device: str) -> Callable[[], Any]:
    import torch
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def checked(name: str, make: Callable[[], Callable[[], Any]], device: str) -> Callable[[], Any]:
    """``make()`` run once; a peer that fails here (torch without fused SGD on this device) is
    skipped with the reason, once per run."""
    key = f"{name} [{device}]"
    if key in _unavailable:
        pytest.skip(_unavailable[key])
    try:
        fn = make()
        fn()
    except Exception as e:  # noqa: BLE001 - any failure means this peer cannot run here
        _unavailable[key] = f"{name} does not run on {device}: {type(e).__name__}: {str(e)[:160]}"
        pytest.skip(_unavailable[key])
    return fn


def bench(benchmark, baselines: _common.Baselines, name: str, make: Callable[[], Callable[[], Any]],
          n: int, nbytes: int, device: str, dtype: str, cited: tuple[str, ...],
          cite_make: Callable[[str], Callable[[], Any]], **extra: Any) -> None:
    """Time ``name`` and record it; srkern entries cite ``cited`` (timed once per run)."""
    fn = checked(name, make, device)
    _common.run_benchmark(benchmark, fn, device)
    del fn
    t = _common.stats_min(benchmark)
    is_srkern = name.startswith("srkern")
    if not is_srkern and name != COPY:
        baselines.note(name, device, n, t)
    base = None
    if is_srkern:
        base = {}
        for c in cited:
            if f"{c} [{device}]" in _unavailable:
                continue
            try:
                base[c] = baselines.time(c, device, n, lambda c=c: checked(c, lambda: cite_make(c), device))
            except pytest.skip.Exception:
                continue
    role = "roofline" if name == COPY else ("kernel" if is_srkern else "baseline")
    _common.record(benchmark, kernel=name, size=n, dtype=dtype, device=device, bytes_moved=nbytes,
                   baselines=base, role=role, tensors=TENSORS, step_bytes_per_param=nbytes / n, **extra)


BASELINES = [COPY, FOREACH, FUSED, PURE_BF16]
TORCH_BYTES = {FOREACH: 4 + 8 + 8 + 2, FUSED: 4 + 8 + 8 + 2, PURE_BF16: 10}


@pytest.mark.parametrize("name", BASELINES, ids=["copy", "torch-foreach", "torch-fused", "torch-bf16"])
def test_sgd_baseline(benchmark, baselines, device, adamw_size, name):
    benchmark.group = f"sgd {device} n={adamw_size}"
    sizes = split(adamw_size)
    nbytes = step_bytes("bf16-sr", "bfloat16") * adamw_size if name == COPY else TORCH_BYTES[name] * adamw_size
    make = (lambda: copy_fn(nbytes, device)) if name == COPY else (lambda: torch_step(name, sizes, device))
    bench(benchmark, baselines, name, make, adamw_size, nbytes, device, "torch", (), lambda c: None)


@pytest.mark.parametrize("precision,state_dtype", MODES, ids=[f"{p}-{s[:4]}" for p, s in MODES])
def test_sgd_srkern(benchmark, baselines, device, adamw_size, precision, state_dtype):
    benchmark.group = f"sgd {device} n={adamw_size}"
    sizes = split(adamw_size)
    nbytes = step_bytes(precision, state_dtype) * adamw_size
    bench(benchmark, baselines, label("sgd", precision, state_dtype),
          lambda: srkern_step(sizes, precision, state_dtype, device), adamw_size, nbytes, device,
          f"{PRECISIONS[precision].param_dtype} weights, {state_dtype} buffer, {grad_dtype(precision)} grad",
          CITED, lambda c: torch_step(c, sizes, device), precision=precision, state_dtype=state_dtype)
