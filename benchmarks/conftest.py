"""pytest wiring for srkern's benchmarks: options, size/device parametrization and shared fixtures.

Options (each also settable by environment variable, for CI and the GPU check):
  --size=LIST      headline sizes in elements, e.g. ``--size=64M`` or ``--size=2**20,2**26``
                   (SRKERN_BENCH_SIZES). Default: 64M elements on CPU, 256M on CUDA.
  --adamw-size=LIST  headline AdamW sizes in parameters (SRKERN_BENCH_ADAMW_SIZES). Default:
                   ``--size`` when given, else 16M and 64M parameters on CPU (issue 3's size and
                   issue 13's out-of-cache one), 256M on CUDA.
  --sweep          run the size sweep 2**10 .. 2**28 (every other power of two; SRKERN_BENCH_SWEEP=1).
                   Without it the sweep tests run a few sizes only, so a CPU run stays short.
  --sweep-sizes=LIST  explicit sweep sizes (SRKERN_BENCH_SWEEP_SIZES).
  --device=LIST    ``cpu``, ``cuda`` or both (SRKERN_BENCH_DEVICES). Default: cpu, plus cuda when
                   torch sees a GPU.

Fixtures: a test that takes ``device`` and ``size`` (or ``adamw_size``, or ``sweep_size``) is
parametrized over them;
``inputs`` caches random FP32 inputs per (device, size); ``baselines`` times a baseline once per
run so that every benchmark can cite it.

The JSON's ``machine_info`` gets srkern's :func:`_common.machine_info` (CPU, device, compiler,
library versions, git commit). Command: ``python -m pytest benchmarks/bench_cast.py
--benchmark-json=out.json`` (pyproject's python_files lists bench_*.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_SIZE = {"cpu": 1 << 26, "cuda": 1 << 28}
DEFAULT_ADAMW_SIZES = {"cpu": [1 << 24, 1 << 26], "cuda": [1 << 28]}
DEFAULT_SWEEP = [1 << 10, 1 << 16, 1 << 22]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("srkern benchmarks")
    group.addoption("--size", default=os.environ.get("SRKERN_BENCH_SIZES"),
                    help="headline sizes in elements, comma separated (64M, 2**26, 1024)")
    group.addoption("--adamw-size", default=os.environ.get("SRKERN_BENCH_ADAMW_SIZES"),
                    help="headline AdamW sizes in parameters (default: --size, else 16M,64M on CPU)")
    group.addoption("--sweep", action="store_true", default=os.environ.get("SRKERN_BENCH_SWEEP") == "1",
                    help="size sweep 2**10..2**28 instead of a few sizes")
    group.addoption("--sweep-sizes", default=os.environ.get("SRKERN_BENCH_SWEEP_SIZES"),
                    help="explicit sweep sizes, comma separated")
    group.addoption("--device", default=os.environ.get("SRKERN_BENCH_DEVICES"),
                    help="devices to benchmark: cpu, cuda or cpu,cuda")


def _devices(config: pytest.Config) -> list[str]:
    text = config.getoption("--device")
    if text:
        return [d.strip() for d in text.split(",") if d.strip()]
    devices = ["cpu"]
    try:
        import torch
        if torch.cuda.is_available():
            devices.append("cuda")
    except ImportError:
        pass
    return devices


def _sizes(config: pytest.Config, device: str) -> list[int]:
    text = config.getoption("--size")
    return _common.parse_sizes(text) if text else [DEFAULT_SIZE.get(device.split(":")[0], 1 << 26)]


def _adamw_sizes(config: pytest.Config, device: str) -> list[int]:
    text = config.getoption("--adamw-size") or config.getoption("--size")
    return _common.parse_sizes(text) if text else list(DEFAULT_ADAMW_SIZES.get(device.split(":")[0], [1 << 24]))


def _sweep(config: pytest.Config) -> list[int]:
    text = config.getoption("--sweep-sizes")
    if text:
        return _common.parse_sizes(text)
    return _common.sweep_sizes(10, 28, 2) if config.getoption("--sweep") else list(DEFAULT_SWEEP)


def _size_id(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "device" not in names:
        return
    config = metafunc.config
    size_name = next((s for s in ("size", "adamw_size", "sweep_size") if s in names), None)
    if size_name is None:
        metafunc.parametrize("device", _devices(config))
        return
    pairs, ids = [], []
    for dev in _devices(config):
        sizes = {"size": _sizes, "adamw_size": _adamw_sizes}.get(size_name)
        for n in (sizes(config, dev) if sizes else _sweep(config)):
            pairs.append((dev, n))
            ids.append(f"{dev}-n={_size_id(n)}")
    metafunc.parametrize(("device", size_name), pairs, ids=ids)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    devices = _devices(config)
    machine_info["srkern"] = _common.machine_info(devices[-1])


@pytest.fixture(scope="session")
def inputs() -> Callable[[str, int], Any]:
    """inputs(device, n) -> a cached torch FP32 tensor of n standard-normal values (seed 0)."""
    import torch
    cache: dict[tuple[str, int], Any] = {}

    def get(device: str, n: int):
        key = (device, n)
        if key not in cache:
            if len(cache) >= 2:  # keep at most two large inputs alive
                cache.pop(next(iter(cache)))
            g = torch.Generator(device=device).manual_seed(0)
            cache[key] = torch.randn(n, generator=g, dtype=torch.float32, device=device)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def baselines() -> _common.Baselines:
    """The run's shared baseline timer (:class:`_common.Baselines`)."""
    return _common.Baselines()
