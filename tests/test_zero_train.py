"""Smoke test of the example ``python/zero_train.py``: a tiny run under ``mpirun -n 2``."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env
from srkern.testing import find_mpirun

pytestmark = pytest.mark.mpi
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "python" / "zero_train.py"
TIMEOUT_S = 120

MPIRUN = find_mpirun()
if MPIRUN is None:  # pragma: no cover
    pytest.skip("mpirun not found beside this Python nor on PATH (pip install mpich)", allow_module_level=True)


def test_zero_train_two_ranks_tiny(tmp_path):
    # 8 steps of a width-8 MLP on 2 ranks: the job exits 0, prints the final table with finite
    # losses, and each rank holds its shard of the state only: with bf16-sr the two ranks' optimizer
    # bytes (BF16 moments and reduced-gradient shard, 6 B per parameter) add up to exactly 6 B
    # per model parameter, because the shards tile the flat vector without padding.
    ckpt = tmp_path / "ckpt"
    cmd = [MPIRUN, "-n", "2", sys.executable, str(SCRIPT), "--steps", "8", "--batch", "8", "--width", "8",
           "--checkpoint", str(ckpt)]
    env = dict(child_env(), MPIEXEC_TIMEOUT=str(TIMEOUT_S), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 30)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    out = res.stdout
    head = re.search(r"(\d+) parameters, 2 ranks, precision bf16-sr, 8 steps", out)
    assert head, out
    n_params = int(head.group(1))
    losses = [float(v) for v in re.findall(r"\| loss, mean of (?:first|last) 5 steps \| (\S+) \|", out)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), out
    mem = [int(v) for v in re.findall(r"\| rank \d: optimizer memory \| (\d+) B", out)]
    assert len(mem) == 2 and sum(mem) == 6 * n_params, out
    sent = [float(v) for v in re.findall(r"\| rank \d: bytes sent per step \| (\S+) B", out)]
    assert len(sent) == 2 and all(s > 0 for s in sent), out
    assert f"| checkpoint | {ckpt} |" in out, out
    man = json.loads((ckpt / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["step"] == 8 and man["n"] == n_params
