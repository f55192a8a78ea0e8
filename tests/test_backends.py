"""The backend layer itself (srkern/_backend.py, kernels/srk_emu_run.h): gpu-emu launches check
the kernel's C signature, the grid-stride loops run past their first iteration, a sanitized build
without its runtime is a clear error, and every backend converts arguments the same way."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import srkern
from srkern import _backend, _build, reference
from srkern.testing import assert_same_bits

from conftest import child_env


def test_emu_refuses_arguments_of_the_wrong_width(monkeypatch):
    # philox_blocks(u64 seed, u64 step, u32 stream, u64 q0, i64 n, u32* out): a uint32 code for
    # q0 would be packed as 4 bytes by CuPy on a GPU. The emulator's 8-byte slots would hide it;
    # the signature check does not.
    monkeypatch.setenv("SRKERN_BACKEND", "gpu-emu")
    out = np.zeros((1, 4), dtype=np.uint32)
    args = [("Q", 1), ("Q", 0), ("I", 0), ("I", 7), ("q", 1), ("p", out.ctypes.data)]
    with pytest.raises(_build.BuildError, match=r"philox_blocks takes parameters of \[8, 8, 4, 8, 8, 8\] bytes"):
        _backend.launch("philox", "philox_blocks", args)
    with pytest.raises(_build.BuildError, match="philox_blocks"):
        _backend.launch("philox", "philox_blocks", args[:-1])
    assert not out.any()


@pytest.mark.parametrize("value", [2 ** 64, -1], ids=["2**64", "-1"])
@pytest.mark.parametrize("name", ["cpu", "cpu-portable", "gpu-emu"])
def test_out_of_range_arguments_raise_on_every_backend(monkeypatch, name, value):
    # One conversion (the NumPy scalars CuPy is handed) for every backend: a uint64 argument out
    # of range raises, where ctypes alone would wrap it silently.
    monkeypatch.setenv("SRKERN_BACKEND", name)
    out = np.zeros((1, 4), dtype=np.uint32)
    with pytest.raises(OverflowError):
        _backend.launch("philox", "philox_blocks", [("Q", value), ("Q", 0), ("I", 0), ("Q", 0),
                                                    ("q", 1), ("p", out.ctypes.data)])
    assert not out.any()


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SRKERN_BACKEND", "gpu")
    with pytest.raises(_build.BuildError, match="SRKERN_BACKEND='gpu' is not a backend"):
        srkern.cast(np.ones(4, np.float32), "bfloat16", seed=1)


def test_the_backend_follows_every_change_of_the_environment(monkeypatch):
    # cpu_backend reads os.environ's own dict (srkern/_backend.py, _env_reader): every setenv and
    # delenv through os.environ is seen at the next launch, unset means the default.
    for name in ("gpu-emu", "cpu-portable", "cpu"):
        monkeypatch.setenv("SRKERN_BACKEND", name)
        assert _backend.cpu_backend() == name
    monkeypatch.delenv("SRKERN_BACKEND")
    assert _backend.cpu_backend() == _backend.DEFAULT_BACKEND
    monkeypatch.setenv("SRKERN_BACKEND", "")
    assert _backend.cpu_backend() == _backend.DEFAULT_BACKEND


def test_grid_stride_loops_run_past_their_first_iteration(monkeypatch):
    # With one emulated SM the grid is 32 blocks x 256 threads = 8192 threads, so casts, AdamW
    # and grad_norm over more units than that take the `i += gridDim.x * blockDim.x` step of
    # their grid-stride loops (on an H200 that happens only beyond ~10^6 units, which no other
    # test reaches). Bits must equal the oracle as at full grid size.
    monkeypatch.setenv("SRKERN_BACKEND", "gpu-emu")
    monkeypatch.setenv("SRKERN_EMU_SMS", "1")
    assert _backend.grid_blocks(10 ** 6, _backend.emu_sms()) == 32
    rng = np.random.default_rng(5)
    n = 3 * 8192 * 8 + 13  # 3 strides of BF16 blocks, plus a partial one
    x = rng.standard_normal(n).astype(np.float32)
    for fmt in ("bfloat16", "float16"):
        got = srkern.cast(x, fmt, seed=3, offset=5)
        assert_same_bits(got, reference.round_float32(x, fmt, seed=3, offset=5), x, f"cast {fmt}")
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    kw = dict(step=1, lr=1e-2, weight_decay=0.1, precision="fp32", seed=9)
    want = reference.adamw_step([p], [g], [m], [v], **kw)
    srkern.adamw_step([p], [g], [m], [v], **kw)
    assert_same_bits(p, want["params"][0], what="adamw fp32 params")
    # grad_norm: 130 tensors of 70001 elements are 130 x 2 spans x 32 = 8320 partials (threads).
    grads = [rng.standard_normal(70001).astype(np.float32) for _ in range(130)]
    norm = srkern.grad_norm(grads)
    monkeypatch.setenv("SRKERN_BACKEND", "cpu")
    assert norm == srkern.grad_norm(grads)


def test_sanitized_build_without_its_runtime_is_a_clear_error(tmp_path):
    env = dict(child_env(), SRKERN_BACKEND="gpu-emu", SRKERN_EMU_SANITIZE="1",
               SRKERN_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("LD_PRELOAD", None)
    code = ("import numpy as np, srkern\n"
            "try:\n    srkern.cast(np.ones(4, np.float32), 'bfloat16', seed=1)\n"
            "except srkern.BuildError as e:\n    print('BuildError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "BuildError: SRKERN_EMU_SANITIZE=1 needs the AddressSanitizer runtime" in res.stdout, res.stdout
