"""Smoke tests of ``python -m srkern info`` and ``python -m srkern regs``."""
from __future__ import annotations

import subprocess
import sys

import pytest

from srkern.__main__ import parse_ptxas_log

from conftest import child_env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srkern", *args], capture_output=True, text=True, timeout=300,
                          env=child_env())


def test_info():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for text in ("srkern ", "bit contract v1", "random streams: cast=0", "numpy", "torch", "cupy", "jax",
                 "mpi4py", "CPU backend: yes", "GPU backend:", "CUDA devices:", "cache folder:"):
        assert text in out, f"{text!r} missing from:\n{out}"


def test_help():
    res = _run("--help")
    assert res.returncode == 0 and "info" in res.stdout and "regs" in res.stdout


def test_regs():
    pytest.importorskip("cuda.bindings.nvrtc")
    res = _run("regs", "--arch", "sm_80", "philox")
    assert res.returncode == 0, res.stderr
    lines = [line.split() for line in res.stdout.splitlines() if line.startswith("philox.cu")]
    assert lines and lines[0][1] == "philox_blocks", res.stdout
    regs, stack, spill_st, spill_ld = map(int, lines[0][2:6])
    assert 0 < regs <= 255 and spill_st == 0 and spill_ld == 0


def test_regs_unknown_kernel_fails():
    pytest.importorskip("cuda.bindings.nvrtc")
    res = _run("regs", "no_such_kernel")
    assert res.returncode == 1 and "no kernel source" in res.stderr


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function 'k_a' for 'sm_90'
ptxas info    : Function properties for k_a
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compiling entry function 'k_b' for 'sm_90'
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 7 registers, used 1 barriers"""
    assert parse_ptxas_log(log) == [
        {"function": "k_a", "registers": 40, "stack": 8, "spill_stores": 4, "spill_loads": 12},
        {"function": "k_b", "registers": 7, "stack": 0, "spill_stores": 0, "spill_loads": 0},
    ]
