"""Gradient-norm benchmarks: srkern.grad_norm against the norm a PyTorch user would take for
clipping, and against copy bandwidth of the bytes it must read, in one run.

Contenders (each a pytest-benchmark entry recording bytes moved, GB/s, the copy bandwidth of the
same bytes and the baseline's time, all measured in this run):
  * ``srkern.grad_norm`` over BF16 and over FP32 gradients (FP64 partial sums in a fixed order:
    the same bits on every backend);
  * torch ``nn.utils.get_total_norm(grads, foreach=True)`` (the norm ``clip_grad_norm_`` takes;
    torch >= 2.6; the entry is skipped with the reason on older torch);
  * torch ``copy_`` of as many bytes as the BF16 norm reads (the roofline; all cores).

Bytes moved: the gradients are read once and nothing of their size is written, so n * 2 bytes for
BF16 and n * 4 for FP32 (the partials, 8 bytes per 2048 elements, are not counted).

Layout: the AdamW headline layout (``--adamw-size``, default 16M and 64M parameters on CPU, in 16
equal tensors), so a clipping step's norm and update are measured on the same tensors.

Run:  python -m pytest benchmarks/bench_norm.py --benchmark-json=out.json
      (--adamw-size=16M, --device=cpu,cuda)
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

import _common
import srkern
from bench_adamw import HEADLINE_TENSORS, copy_fn, split
from srkern.formats import KERNEL_SUFFIX, NP_DTYPES

# grad dtype by its short name, and bytes per element read (the norm reads each gradient once)
DTYPES = {KERNEL_SUFFIX[d]: (d, NP_DTYPES[d].itemsize) for d in ("bfloat16", "float32")}
TORCH = "torch get_total_norm (foreach)"
COPY = "torch copy_ (roofline)"


def _grads(n: int, dtype: str, device: str) -> list[Any]:
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, generator=g, device=device).to(getattr(torch, dtype))
            for s in split(n, HEADLINE_TENSORS)]


def torch_norm(grads: list[Any]) -> Callable[[], Any]:
    import torch
    if not hasattr(torch.nn.utils, "get_total_norm"):
        pytest.skip(f"torch {torch.__version__} has no nn.utils.get_total_norm (torch >= 2.6)")
    return lambda: torch.nn.utils.get_total_norm(grads, foreach=True)


def test_norm_copy(benchmark, device, adamw_size):
    """Roofline entry: torch ``copy_`` of as many bytes as the BF16 norm reads."""
    benchmark.group = f"grad_norm {device} n={adamw_size}"
    nbytes = 2 * adamw_size
    _common.run_benchmark(benchmark, copy_fn(nbytes, device), device)
    _common.record(benchmark, kernel=COPY, size=adamw_size, dtype="uint8", device=device,
                   bytes_moved=nbytes, role="roofline")


@pytest.mark.parametrize("short", list(DTYPES))
def test_norm_torch(benchmark, baselines, device, adamw_size, short):
    """Baseline entry: torch's total norm over the same tensors."""
    dtype, size = DTYPES[short]
    benchmark.group = f"grad_norm {device} n={adamw_size}"
    fn = torch_norm(_grads(adamw_size, dtype, device))
    _common.run_benchmark(benchmark, fn, device)
    baselines.note(f"{TORCH} {short}", device, adamw_size, _common.stats_min(benchmark))
    _common.record(benchmark, kernel=TORCH, size=adamw_size, dtype=dtype, device=device,
                   bytes_moved=size * adamw_size, role="baseline", tensors=HEADLINE_TENSORS)


@pytest.mark.parametrize("short", list(DTYPES))
def test_norm_srkern(benchmark, baselines, device, adamw_size, short):
    """srkern.grad_norm; baseline: torch's total norm (cited from its entry when that ran first)."""
    dtype, size = DTYPES[short]
    benchmark.group = f"grad_norm {device} n={adamw_size}"
    grads = _grads(adamw_size, dtype, device)
    _common.run_benchmark(benchmark, lambda: srkern.grad_norm(grads), device)
    base = {}
    try:
        base[TORCH] = baselines.time(f"{TORCH} {short}", device, adamw_size, lambda: torch_norm(grads))
    except pytest.skip.Exception:
        pass
    _common.record(benchmark, kernel="srkern.grad_norm", size=adamw_size, dtype=dtype, device=device,
                   bytes_moved=size * adamw_size, baselines=base or None, role="kernel",
                   tensors=HEADLINE_TENSORS)


if __name__ == "__main__":
    import sys
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
