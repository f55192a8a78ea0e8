"""The one-command GPU check, dry-run on CPU: every stage but the GPU itself runs and reports.

On a machine without a GPU the parity stage compares the CPU backend with itself (so a mismatch
there means the harness is broken, not a kernel), the benchmark stage runs at small sizes, and the
report is rendered. A real GPU run differs only in where the "device" copies live.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_writes_parity_bench_and_report(tmp_path):
    out = tmp_path / "gpu-check"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run",
                          "--skip-tests", "--bench-timeout", "600"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parity = json.loads((out / "parity.json").read_text())
    kinds = {c["case"].split()[0] for c in parity["cases"]}
    assert {"cast", "upcast", "adamw", "grad_norm", "dist_reduce"} <= kinds
    assert all(c["ok"] for c in parity["cases"])
    stages = json.loads((out / "stages.json").read_text())
    assert all(s["ok"] for s in stages.values()), stages
    report = (out / "report.md").read_text()
    assert "srkern benchmark report" in report and "| kernel |" in report
    assert (out / "optimizer_bytes.png").stat().st_size > 0


def test_compare_reports_first_differing_bits():
    # The harness must be able to fail: one flipped bit is found and reported with its index.
    a = np.arange(10, dtype=np.uint16)
    b = a.copy()
    b[7] ^= 1
    rec = gpu_check.compare("case", a, b)
    assert not rec["ok"] and rec["mismatches"] == 1
    assert rec["first"][0] == {"index": 7, "cpu": "0x7", "device": "0x6"}


@pytest.mark.parametrize("n", [0, 1, 64])
def test_inputs_cover_specials(n):
    x = gpu_check.test_inputs(n, np.random.default_rng(0))
    assert x.dtype == np.float32 and x.size == n
    if n >= 64:
        assert np.isnan(x).any() and np.isinf(x).any() and (x == 0).any()
