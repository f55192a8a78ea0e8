"""ShardedAdamW under torchrun: srkern's collectives over a torch.distributed (gloo) process group.

Design: as tests/test_dist.py, one ordinary pytest process launches the ranks,
``python -m torch.distributed.run --standalone --nproc-per-node K tests/_torchrun_worker.py``
(K = 1, 2, 3, 4 on the 2-core CI machine), and the same worker under ``mpirun -n K``; each
launch writes its final weights and its recorded checks to files under ``tmp_path``, and the
tests here compare them. The bits must not depend on the transport: the reduce-scatter's SR, the
shard updates and the gathered weights are fixed by the bit contract, so torchrun, mpirun and
``srkern.torch.AdamW`` in this process must agree bit for bit. A hang is bounded three ways: the
process group's timeout inside the worker, the launch's own timeout (torchrun gets SIGTERM, which
ends its workers, then SIGKILL), and the test fails naming it. NCCL (CUDA tensors) is the same
code path with another backend and is not run here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_torchrun_worker.py"
TIMEOUT_S = 150  # per launch; the workers' process group times out at the same bound
WORLDS = (1, 2, 3, 4)

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)
if not torch.distributed.is_gloo_available():  # pragma: no cover
    pytest.skip("this torch build has no gloo backend (needed for CPU tensors under torchrun)",
                allow_module_level=True)

pytestmark = pytest.mark.mpi

sys.path.insert(0, str(ROOT / "tests"))
import _dist_worker as dw  # noqa: E402
import _torchrun_worker as tw  # noqa: E402
from conftest import child_env, run_mpi  # noqa: E402
from srkern.testing import assert_same_bits  # noqa: E402


def torchrun(k: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node k`` of the worker, bounded by ``TIMEOUT_S``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}",
           "--max-restarts=0", str(WORKER), *args, "--launcher", "torch", "--timeout", str(TIMEOUT_S)]
    env = dict(child_env(), OMP_NUM_THREADS="1", SRKERN_BACKEND="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun's agent ends its workers on SIGTERM
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung: stopped after {TIMEOUT_S} s\n--- stderr\n{err[-5000:]}", pytrace=False)
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-6000:]}",
                    pytrace=False)
    return res


def mpirun(k: int, *args: str) -> subprocess.CompletedProcess:
    res = run_mpi(k, WORKER, *args, "--launcher", "mpi", timeout=TIMEOUT_S)
    if res.returncode != 0:
        pytest.fail(f"mpirun -n {k} {WORKER.name} {' '.join(args)} exited {res.returncode}\n--- stderr\n"
                    f"{res.stderr[-6000:]}", pytrace=False)
    return res


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory) -> dict:
    """Scenario ``all`` once per world size under torchrun: {K: (folder, result JSON)}."""
    out = {}
    for k in WORLDS:
        folder = tmp_path_factory.mktemp(f"torchrun-w{k}")
        torchrun(k, "all", "--out", str(folder))
        out[k] = (folder, json.loads((folder / f"all-torch-w{k}.json").read_text()))
    return out


@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory) -> dict:
    """Scenario ``train`` once per world size under mpirun: {K: folder}."""
    out = {}
    for k in WORLDS:
        folder = tmp_path_factory.mktemp(f"mpirun-w{k}")
        mpirun(k, "train", "--out", str(folder))
        out[k] = folder
    return out


@pytest.fixture(scope="module")
def one_process() -> np.ndarray:
    """srkern.torch.AdamW on the same model and batches, six steps in this process."""
    import srkern.torch as srt
    torch.set_num_threads(1)
    model = dw.torch_model()
    opt = srt.AdamW(model.parameters(), precision="bf16-sr", seed=dw.SEED, **dw.TRAIN_HYPER)
    for t in range(1, tw.STEPS + 1):
        opt.zero_grad()
        dw.torch_loss(model, t).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).view(torch.int16).numpy().view(np.uint16)


def weights(folder: Path, name: str) -> np.ndarray:
    return np.fromfile(folder / name, dtype=np.uint16)


@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_torchrun_weights_equal_mpirun_and_one_process(torch_runs, mpi_runs, one_process, k):
    # Six bf16-sr ShardedAdamW steps, a sharded checkpoint after step 3 loaded by a fresh
    # optimizer on another handle of the same ranks: the weights under torchrun (gloo) equal
    # those of the same script under mpirun and of srkern.torch.AdamW in one process, bit for bit.
    got = weights(torch_runs[k][0], f"train-torch-w{k}.bin")
    assert_same_bits(got, weights(mpi_runs[k], f"train-mpi-w{k}.bin"), what=f"world {k}: torchrun vs mpirun")
    assert_same_bits(got, one_process, what=f"world {k}: torchrun vs srkern.torch.AdamW in one process")
    w0 = torch.cat([p.detach().reshape(-1) for p in dw.torch_model().parameters()]).view(torch.int16).numpy()
    assert (got != w0.view(np.uint16)).mean() > 0.5, "the weights barely moved: the test would not see a difference"


@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_comm_none_uses_the_default_group_and_groups_are_accepted(torch_runs, k):
    # comm=None under torchrun picks torch.distributed's default group; a new_group of the same
    # ranks (the optimizer that loads the checkpoint) and group.WORLD (abort_on_error, the
    # collectives) are taken as communicators too, one wrapper per group.
    res = torch_runs[k][1]
    assert (res["comm"], res["default_comm"], res["second_comm"]) == ("TorchCommunicator",) * 3, res
    assert res["one_wrapper_per_group"], "group.WORLD gave another TorchCommunicator each time"



@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_collectives_over_gloo_are_bit_exact(torch_runs, k):
    # srkern.dist.reduce_scatter / all_gather on the group against the NumPy oracle, for sizes
    # 0, 1, 7, 29, 1023 (uneven shards: the all-to-all and the all-gather of uneven counts), FP32
    # and BF16 inputs, a BF16 wire; alltoallv with unpacked displacements; a 64-bit broadcast.
    bad = [f for f in torch_runs[k][1]["failures"] if "collective" in f]
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_bad_arguments_and_mismatched_shapes_raise_on_every_rank(torch_runs, k):
    # FP32 weights on one rank; on one rank another parameter shape (same size), another size,
    # another seed; lr = nan or a missing gradient on one rank at step(); a bad out= on one rank;
    # a corrupted checkpoint shard: each raises the same error on every rank and the launch ends
    # (a hang would hit the timeouts), the rejected steps change nothing and a good step works.
    res = torch_runs[k][1]
    assert res["error_cases"] == (8 if k > 1 else 5), res["error_cases"]
    bad = [f for f in res["failures"] if "errors:" in f]
    assert not bad, "\n".join(bad)


def test_mpirun_checkpoint_resumes_under_torchrun(mpi_runs, one_process, tmp_path):
    # The checkpoint format does not depend on the transport: mpirun's world-3 checkpoint (step 3)
    # is loaded by torchrun with 2 ranks, which trains on to step 6: the same bits.
    torchrun(2, "train", "--out", str(tmp_path), "--resume", str(mpi_runs[3] / "ckpt"))
    assert json.loads((mpi_runs[3] / "ckpt" / "manifest.json").read_text())["world_size"] == 3
    assert_same_bits(weights(tmp_path, "train-resumed-torch-w2.bin"), one_process,
                     what="mpirun world 3 -> torchrun world 2 vs one process")


def test_rank_raising_mid_step_ends_the_job(tmp_path):
    # Rank 1 raises in step 2 while ranks 0 and 2 wait in the reduce-scatter: abort_on_error ends
    # rank 1, the others' gloo exchange fails (or torchrun ends them), and the launch exits non-zero
    # within seconds, not at the timeout, naming the rank.
    t0 = time.time()
    res = torchrun(3, "raise", "--out", str(tmp_path), check=False)
    elapsed = time.time() - t0
    assert res.returncode != 0
    assert "rank 1 of 3 raised RuntimeError: injected failure on rank 1" in res.stderr, res.stderr[-3000:]
    assert elapsed < TIMEOUT_S / 2, f"took {elapsed:.0f} s: the job hung until the timeout"


def test_no_unexpected_failures(torch_runs):
    # Every check a worker recorded is claimed by one of the tests above; this one lists them all.
    for k, (_, res) in torch_runs.items():
        assert not res["failures"], f"world {k}:\n" + "\n".join(res["failures"][:20])
