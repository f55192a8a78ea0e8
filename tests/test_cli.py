"""Smoke tests of ``python -m srkern info``, ``python -m srkern regs`` and ``python -m srkern ptx``."""
from __future__ import annotations

import subprocess
import sys

import pytest

from srkern.__main__ import parse_ptxas_log

from conftest import child_env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srkern", *args], capture_output=True, text=True, timeout=300,
                          env=child_env())


def test_info(monkeypatch):
    monkeypatch.delenv("SRKERN_BACKEND", raising=False)
    res = _run("info")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for text in ("srkern ", "bit contract v1", "random streams: cast=0", "numpy", "torch", "cupy", "jax",
                 "mpi4py", "CPU backend: yes", "GPU backend:", "CUDA devices:", "cache folder:",
                 "backend for CPU tensors: cpu (SRKERN_BACKEND"):
        assert text in out, f"{text!r} missing from:\n{out}"


def test_info_names_the_backend(monkeypatch):
    monkeypatch.setenv("SRKERN_BACKEND", "gpu-emu")
    monkeypatch.setenv("SRKERN_EMU_SMS", "7")
    res = _run("info")
    assert res.returncode == 0, res.stderr
    assert "backend for CPU tensors: gpu-emu" in res.stdout and "grid of 7 SMs" in res.stdout, res.stdout


def test_help():
    res = _run("--help")
    assert res.returncode == 0 and "info" in res.stdout and "regs" in res.stdout and "ptx" in res.stdout


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


def test_ptx():
    # The PTX the CUDA backend loads for cast.cu on sm_80: stdout is the PTX alone, stderr says
    # which compile (flags, and the cubin that is loaded).
    pytest.importorskip("cuda.bindings.nvrtc")
    from srkern import _nvrtc
    res = _run("ptx", "cast", "--arch", "sm_80")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("//") and ".target sm_80" in out, out[:400]
    assert ".visible .entry cast_f32_bf16_sr(" in out and ".entry cast_e4m3_f32(" in out
    assert ".ftz" not in out and "mul.rn.f32" in out
    assert "--fmad=false" in res.stderr and "--gpu-architecture=sm_80" in res.stderr and "sha256" in res.stderr
    assert out.rstrip("\n") == _nvrtc.gpu_binary("cast", "sm_80").ptx.decode().rstrip("\n")


def test_ptx_errors():
    pytest.importorskip("cuda.bindings.nvrtc")
    res = _run("ptx", "no_such_kernel")
    assert res.returncode == 1 and "no kernel source" in res.stderr and res.stdout == ""
    res = _run("ptx", "philox", "--arch", "90")
    assert res.returncode == 1 and "sm_90" in res.stderr
    res = _run("ptx")
    assert res.returncode == 2 and "kernel" in res.stderr


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
