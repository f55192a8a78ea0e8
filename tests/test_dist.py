"""Distributed srkern under mpirun: SR reduce-scatter, all-gather, ShardedAdamW, checkpoints.

Design: these tests run in one ordinary pytest process and launch
``mpirun -n K python tests/_dist_worker.py SCENARIO`` (K = 1, 2, 3, 4; MPICH oversubscribes the
2-core CI machine without flags). A worker never asserts: it records failed checks and rank 0
writes them with its results to JSON and raw ``.bin`` files, which the tests here read. So a
failing check cannot leave ranks hanging in a collective, anything that raises aborts the job
(srkern.dist.abort_on_error), and ``MPIEXEC_TIMEOUT`` plus the subprocess timeout bound a
genuine hang. One launch per world size runs every single-launch scenario, which keeps the
whole file at about half a minute on 2 cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_dist_worker.py"
TIMEOUT_S = 120  # per mpirun launch; also MPIEXEC_TIMEOUT, so mpirun itself ends a hung job
WORLDS = (1, 2, 3, 4)

sys.path.insert(0, str(ROOT / "tests"))
import _dist_worker as worker  # noqa: E402
from conftest import CPU_BACKENDS, backend_names, child_env  # noqa: E402
from srkern.testing import assert_same_bits, bits_of, find_mpirun  # noqa: E402

MPIRUN = find_mpirun()
if MPIRUN is None:  # pragma: no cover
    pytest.skip("mpirun not found beside this Python nor on PATH (pip install mpich)", allow_module_level=True)


def mpirun_env(backend: str | None = None) -> dict[str, str]:
    """The environment of a launch: ``MPIEXEC_TIMEOUT`` (mpirun itself ends a hung job), one
    OpenMP thread per rank (ranks share the cores) and the backend, where given."""
    env = dict(child_env(), MPIEXEC_TIMEOUT=str(TIMEOUT_S), OMP_NUM_THREADS="1")
    if backend is not None:
        env["SRKERN_BACKEND"] = backend
    return env


def mpirun(k: int, *args: str, check: bool = True, backend: str = "cpu") -> subprocess.CompletedProcess:
    cmd = [MPIRUN, "-n", str(k), sys.executable, str(WORKER), *args]
    res = subprocess.run(cmd, env=mpirun_env(backend), capture_output=True, text=True, timeout=TIMEOUT_S + 30)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n{res.stdout[-3000:]}"
                    f"\n--- stderr\n{res.stderr[-5000:]}", pytrace=False)
    return res


@pytest.fixture(scope="module", params=[b for b in backend_names() if b in CPU_BACKENDS],
                ids=lambda b: f"be={b}")
def mpi_backend(request) -> str:
    """The CPU backend every rank of the launches below uses (SRKERN_BACKEND in their environment)."""
    return request.param


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mpi_backend) -> dict:
    """Run scenario ``all`` once per world size; {K: (out folder, result JSON)}."""
    out = {}
    for k in WORLDS:
        folder = tmp_path_factory.mktemp(f"w{k}")
        mpirun(k, "all", "--out", str(folder), backend=mpi_backend)
        out[k] = (folder, json.loads((folder / f"all-w{k}.json").read_text()))
    return out


def failures(result: dict, prefix: str) -> list[str]:
    return [f for f in result["failures"] if prefix in f]


def read_bits(path: Path, dtype) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


# ---- reduce-scatter and all-gather ---------------------------------------------------------------

@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_reduce_scatter_and_all_gather_closed_form(runs, k):
    # Closed-form sums of rank-dependent integers (exact in BF16: any rounding must return them),
    # the NumPy oracle for non-exact inputs (avg/sum, FP32/BF16 in and out, BF16 wire), sizes
    # 0, 1, 7, 8, 29, 1023 (not divisible by 2, 3, 4), all_gather new and in place, bytes sent.
    folder, res = runs[k]
    bad = [f for f in res["failures"] if any(s in f for s in ("closed-form", "oracle", "all_gather",
                                                               "shards tile", "bytes", "wire", "seed"))]
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_sr_reduce_scatter_numerics(runs, k):
    # Inputs 0.25 ulp above BF16 values (averaged over rank-dependent parts): SR's mean signed
    # error is below 0.15 ulp (22 standard errors), round-to-nearest's is -0.25 and fails the
    # same bound; averaging 16 seeds cuts the mean absolute error below 0.6x one seed's.
    folder, res = runs[k]
    bad = failures(res, "error") + failures(res, "MAE")
    assert not bad, "\n".join(bad)
    num = res["numerics"]
    assert abs(num["sr_mean_signed_ulp"]) < 0.15 and abs(num["rn_mean_signed_ulp"]) >= 0.15
    assert num["mae_16_seeds_ulp"] < 0.6 * num["mae_one_seed_ulp"]


# ---- ShardedAdamW -----------------------------------------------------------------------------

def _torch_of(a: np.ndarray):
    """NumPy array ``a`` (BF16, FP16 or FP32) as a torch tensor of the same dtype and bits."""
    import torch
    t = torch.from_numpy(bits_of(a).view(np.int16 if a.itemsize == 2 else np.int32).copy())
    return t.view({worker.BF16: torch.bfloat16, np.float16: torch.float16, np.float32: torch.float32}[a.dtype.type])


def _bits_of(t) -> np.ndarray:
    """The bit patterns of torch tensor ``t`` (uint16 for BF16 / FP16, uint32 for FP32)."""
    import torch
    wide = t.element_size() == 4
    return t.view(torch.int32 if wide else torch.int16).numpy().view(np.uint32 if wide else np.uint16)


def single_process_adamw(precision: str, state_dtype: str | None = None) -> np.ndarray:
    """The invariance problem with srkern.torch.AdamW in this process: the reference weights."""
    import torch
    import srkern.torch as srt
    w0 = worker.inv_initial(precision)
    flat = _torch_of(w0)
    a = worker.INV_SIZES[0]
    p1 = torch.nn.Parameter(flat[:a].clone())
    p2 = torch.nn.Parameter(flat[a:].clone())
    kw = {} if state_dtype is None else {"state_dtype": state_dtype}
    opt = srt.AdamW([dict(params=[p1], **worker.INV_HYPER[0]), dict(params=[p2], **worker.INV_HYPER[1])],
                    precision=precision, seed=worker.SEED, **kw)
    for t in range(1, worker.INV_STEPS + 1):
        w = torch.cat([p1.detach(), p2.detach()])
        g = worker.inv_grad(_bits_of(w).view(w0.dtype), t)
        gt = _torch_of(g)
        p1.grad, p2.grad = gt[:a].clone(), gt[a:].clone()
        opt.step()
    return _bits_of(torch.cat([p1.detach(), p2.detach()]))


def single_process_adamw_step(precision: str, state_dtype: str | None = None) -> np.ndarray:
    """The invariance problem with srkern.adamw_step on whole NumPy tensors in this process."""
    import srkern
    from srkern.precisions import default_state_dtype
    w = worker.inv_initial(precision).copy()
    a = worker.INV_SIZES[0]
    sdt = {"bfloat16": worker.BF16, "float32": np.float32}[state_dtype or default_state_dtype(precision)]
    m, v = np.zeros(w.size, sdt), np.zeros(w.size, sdt)
    master = w.astype(np.float32) if precision == "fp32-master" else None
    comp = np.zeros(w.size, worker.BF16) if precision == "bf16-kahan" else None
    for t in range(1, worker.INV_STEPS + 1):
        g = worker.inv_grad(w, t)
        for sl, h in zip((slice(0, a), slice(a, None)), worker.INV_HYPER, strict=True):
            srkern.adamw_step([w[sl]], [g[sl]], [m[sl]], [v[sl]], step=t, precision=precision,
                              master_params=None if master is None else [master[sl]],
                              compensation=None if comp is None else [comp[sl]],
                              seed=worker.SEED, offsets=[sl.start], **h)
    return bits_of(w)


INV_CASES = [(m, None) for m in worker.MODES] + list(worker.INV_STATE_CASES)


@pytest.mark.parametrize("precision,state_dtype", INV_CASES,
                         ids=[f"mode={m}" + (f"-state={s}" if s else "") for m, s in INV_CASES])
def test_sharded_adamw_world_size_invariance(runs, precision, state_dtype):
    # Same reduced gradient each step (identical BF16-representable per-rank gradients, FP16 ones
    # for the FP16 weights of fp16-sr, so the FP32 average is exact): weights after 4 steps of two
    # parameter groups (odd sizes, different hyper-parameters) must be bit-identical for world
    # sizes 1-4 and to srkern.torch.AdamW. fp16-sr reduces its FP16 gradients (sent as their
    # exact FP32 upcast) to FP32, so its reduced gradient is the gradient itself.
    name = worker.inv_name(precision, state_dtype)
    dt = np.uint32 if worker.inv_initial(precision).itemsize == 4 else np.uint16
    got = {k: read_bits(runs[k][0] / f"{name}-w{k}.bin", dt) for k in WORLDS}
    for k in WORLDS[1:]:
        assert_same_bits(got[k], got[1], what=f"{name}: world {k} vs world 1")
    assert_same_bits(got[1], single_process_adamw_step(precision, state_dtype),
                     what=f"{name}: world 1 vs srkern.adamw_step")
    assert_same_bits(got[1], single_process_adamw(precision, state_dtype), what=f"{name}: world 1 vs srkern.torch.AdamW")
    w0 = bits_of(worker.inv_initial(precision))
    assert (got[1] != w0).mean() > 0.5, "the weights barely moved: the test would not see a difference"


@pytest.mark.parametrize("precision", worker.TRAIN_PRECISIONS, ids=lambda p: f"mode={p}")
def test_sharded_adamw_torch_class_matches_single_process(runs, precision):
    # The PyTorch ShardedAdamW on a small model (BF16; FP16 for fp16-sr): world sizes 1-4 agree
    # bit for bit, and equal srkern.torch.AdamW stepping the same model in one process.
    import torch
    import srkern.torch as srt
    stem = "train" if precision == "bf16-sr" else f"train-{precision}"
    got = {k: read_bits(runs[k][0] / f"{stem}-w{k}.bin", np.uint16) for k in WORLDS}
    for k in WORLDS[1:]:
        assert_same_bits(got[k], got[1], what=f"torch ShardedAdamW {precision}: world {k} vs world 1")
    torch.set_num_threads(1)
    model = worker.torch_model(precision)
    opt = srt.AdamW(model.parameters(), precision=precision, seed=worker.SEED, **worker.TRAIN_HYPER)
    for t in range(1, 7):
        opt.zero_grad()
        worker.torch_loss(model, t).backward()
        opt.step()
    ref = _bits_of(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert_same_bits(got[1], ref, what=f"torch ShardedAdamW {precision} (world 1) vs srkern.torch.AdamW")
    w0 = _bits_of(torch.cat([p.detach().reshape(-1) for p in worker.torch_model(precision).parameters()]))
    assert (got[1] != w0).mean() > 0.5, "the weights barely moved: the test would not see a difference"


def test_kill_and_resume_on_another_world_size(runs, mpi_backend, tmp_path):
    # World 3 trains, checkpoints after step 3 and is killed there (SIGKILL on rank 0); world 2
    # resumes from the checkpoint to step 6: bit-identical to the uninterrupted runs.
    res = mpirun(3, "train", "--out", str(tmp_path), "--steps", "6", "--ckpt-at", "3", "--die", check=False,
                 backend=mpi_backend)
    assert res.returncode != 0, "the killed run exited cleanly: it was not killed"
    assert (tmp_path / "ckpt" / "manifest.json").is_file()
    man = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert man["world_size"] == 3 and man["step"] == 3
    mpirun(2, "train", "--out", str(tmp_path), "--steps", "6", "--resume", str(tmp_path / "ckpt"), "--tag=-resumed",
           backend=mpi_backend)
    resumed = read_bits(tmp_path / "train-resumed-w2.bin", np.uint16)
    assert_same_bits(resumed, read_bits(runs[4][0] / "train-w4.bin", np.uint16),
                     what="resumed (3 -> 2 ranks) vs uninterrupted")


@pytest.mark.parametrize("k", (2, 3, 4), ids=lambda k: f"world={k}")
def test_corrupted_and_mismatched_checkpoints_refused(runs, k):
    # Each damage (missing / truncated / bit-flipped shard, missing / garbled manifest; another
    # format version, contract, n, precision, sections or groups; invalid hyper-parameters, world
    # size, step or a path leaving the folder; a model of another size) must raise its own cause
    # on every rank: CheckpointCorrupt or CheckpointMismatch with the message that names it, every
    # buffer unchanged. The good checkpoint round-trips.
    folder, res = runs[k]
    bad = [f for f in res["failures"] if "checkpoint" in f or "state changed" in f or "step changed" in f
           or "round trip" in f or "message" in f]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_bad_arguments_raise_on_every_rank(runs, k):
    # Seeds differing only in bit 63, a bad out= on one rank (reduce_scatter, all_gather),
    # lr / grad_scale = inf (world 4: a 10-element model leaves ranks 2 and 3 without a shard),
    # lr = nan on one rank, an invalid state_dtype, save() where rank 0 cannot mkdir: every rank
    # raises the same error and the launch finishes (a hang would hit MPIEXEC_TIMEOUT).
    folder, res = runs[k]
    assert res["error_cases"] == (9 if k > 1 else 8), res["error_cases"]
    bad = failures(res, "errors:")
    assert not bad, "\n".join(bad)


def test_rank_raising_mid_step_aborts_the_job(tmp_path):
    # Rank 1 raises in step 2 while ranks 0 and 2 wait in the reduce-scatter: abort_on_error calls
    # MPI_Abort, so mpirun exits non-zero within seconds (not at the 120 s timeout), naming the rank.
    t0 = time.time()
    res = mpirun(3, "raise", "--out", str(tmp_path), "--steps", "4", check=False)
    elapsed = time.time() - t0
    assert res.returncode != 0
    assert "rank 1 of 3 raised RuntimeError: injected failure on rank 1" in res.stderr, res.stderr[-3000:]
    assert elapsed < TIMEOUT_S / 2, f"took {elapsed:.0f} s: the job hung until the timeout"


def test_no_unexpected_failures(runs):
    # Every check a worker recorded is claimed by one of the tests above; this one lists them all.
    for k, (_, res) in runs.items():
        assert not res["failures"], f"world {k}:\n" + "\n".join(res["failures"][:20])
