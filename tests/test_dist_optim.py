"""Sharded SGD and Lion under mpirun (ShardedSGDCore, ShardedLionCore, srkern.torch.ShardedSGD and
ShardedLion): world-size invariance against the single-process functional steps, checkpoints
saved on 3 ranks and continued on 2, checkpoints of another optimizer refused, bad
hyper-parameters raising on every rank.

One ``mpirun -n 3 python tests/_dist_optim_worker.py`` launch runs every check for world sizes 3,
2 and 1 (its ranks split after world 3 has saved its checkpoints; see the worker), about 15 s on
2 cores, most of it importing torch. One CPU backend (the first selected): the sharding is what is
tested here; the kernels' backends are compared bit for bit in tests/test_sgd.py and tests/test_lion.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mpi

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_dist_optim_worker.py"
TIMEOUT_S = 120  # per launch; also MPIEXEC_TIMEOUT, so mpirun itself ends a hung job
WORLDS = (3, 2, 1)  # 3 first: it writes the checkpoints worlds 2 and 1 resume

sys.path.insert(0, str(ROOT / "tests"))
import _dist_optim_worker as worker  # noqa: E402
import _dist_worker as dw  # noqa: E402
from conftest import CPU_BACKENDS, backend_names, child_env  # noqa: E402
from srkern.testing import assert_same_bits, bits_of, find_mpirun  # noqa: E402

MPIRUN = find_mpirun()
if MPIRUN is None:  # pragma: no cover
    pytest.skip("mpirun not found beside this Python nor on PATH (pip install mpich)", allow_module_level=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The one launch (worlds 3, 2, 1); {K: (out folder, world K's result JSON)}."""
    backend = next((b for b in backend_names() if b in CPU_BACKENDS), "cpu")
    env = dict(child_env(), MPIEXEC_TIMEOUT=str(TIMEOUT_S), OMP_NUM_THREADS="1", SRKERN_BACKEND=backend)
    folder = tmp_path_factory.mktemp("optim")
    cmd = [MPIRUN, "-n", "3", sys.executable, str(WORKER), "--out", str(folder)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 30)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n{res.stdout[-3000:]}"
                    f"\n--- stderr\n{res.stderr[-5000:]}", pytrace=False)
    return {k: (folder, json.loads((folder / f"optim-w{k}.json").read_text())) for k in WORLDS}


STATE = {"sgd": "momentum_buffer", "lion": "exp_avg"}


def reference(case: str, precision: str, state_dtype: str | None) -> dict[str, np.ndarray]:
    """The invariance problem with srkern.sgd_step / lion_step on whole NumPy tensors in this
    process (one call per group, its global offset): the bits of the weights and every state."""
    import srkern
    from srkern.precisions import default_state_dtype
    w = dw.inv_initial(precision).copy()
    n, a = w.size, dw.INV_SIZES[0]
    sdt = {"bfloat16": dw.BF16, "float32": np.float32}[state_dtype or default_state_dtype(precision)]
    state = {} if case == "sgd-plain" else {STATE[case.split("-")[0]]: np.zeros(n, sdt)}
    if precision == "fp32-master":
        state["master"] = w.astype(np.float32)
    if precision == "bf16-kahan":
        state["compensation"] = np.zeros(n, dw.BF16)
    for t in range(1, dw.INV_STEPS + 1):
        g = dw.inv_grad(w, t)
        for sl, h in zip((slice(0, a), slice(a, n)), worker.HYPERS[case], strict=True):
            kw = dict(precision=precision, seed=dw.SEED, step=t, offsets=[sl.start],
                      master_params=[state["master"][sl]] if "master" in state else None,
                      compensation=[state["compensation"][sl]] if "compensation" in state else None)
            if case == "lion":
                srkern.lion_step([w[sl]], [g[sl]], [state["exp_avg"][sl]], **h, **kw)
            else:
                buf = [state["momentum_buffer"][sl]] if case == "sgd" else None
                srkern.sgd_step([w[sl]], [g[sl]], buf, first_step=t == 1, **h, **kw)
    return {"param": bits_of(w), **{k: bits_of(v) for k, v in state.items()}}


def read(folder: Path, stem: str, want: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.fromfile(folder / f"{stem}-{name}.bin", dtype=bits.dtype) for name, bits in want.items()}


def assert_state(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        assert_same_bits(got[name], want[name], what=f"{what}: {name}")


CASE_IDS = [worker.case_name(*c) for c in worker.CASES]


@pytest.mark.parametrize("case,precision,state_dtype", worker.CASES, ids=CASE_IDS)
def test_sharded_sgd_lion_world_size_invariance(runs, case, precision, state_dtype):
    # Same reduced gradient each step (identical BF16-representable per-rank gradients: the FP32
    # average is exact and SR returns it): weights and every state section after 4 steps of two
    # groups (odd sizes 500 + 503: a shard boundary inside a group on 2 and 3 ranks; momentum with
    # nesterov and weight decay in one, dampening and maximize in the other) must be bit-identical
    # for world sizes 1, 2, 3 and to the functional step run in this process.
    name = worker.case_name(case, precision, state_dtype)
    want = reference(case, precision, state_dtype)
    for k in WORLDS:
        assert_state(read(runs[k][0], f"{name}-w{k}", want), want, f"{name}: world {k} vs the functional step")
    w0 = bits_of(dw.inv_initial(precision))
    assert (want["param"] != w0).mean() > 0.5, "the weights barely moved: the test would not see a difference"
    if case != "sgd-plain":
        assert np.count_nonzero(want[STATE[case.split("-")[0]]]) > 0.5 * w0.size, "the state stayed zero"


@pytest.mark.parametrize("case,precision,state_dtype", worker.CASES, ids=CASE_IDS)
def test_checkpoint_saved_on_3_ranks_continues_on_2(runs, case, precision, state_dtype):
    # World 3 saved after step 2; worlds 2 and 1 loaded it into a core that started from other
    # weights and continued to step 4: weights and state bit-identical to the uninterrupted run
    # (SGD's step 3 is not a first step: the loaded buffers are continued).
    name = worker.case_name(case, precision, state_dtype)
    want = reference(case, precision, state_dtype)
    for k in (2, 1):
        assert_state(read(runs[k][0], f"{name}-resumed-w{k}", want), want, f"{name}: resumed 3 -> {k} vs uninterrupted")


def torch_reference(opt_name: str) -> dict[str, np.ndarray]:
    """The torch model of the worker stepped by the functional step on its flat vector here."""
    import torch
    import srkern
    torch.set_num_threads(1)
    model = dw.torch_model()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    off = 0
    for p in params:
        p.data = flat[off:off + p.numel()].view(p.shape)
        off += p.numel()
    state = torch.zeros_like(flat)
    h = dict(worker.TORCH_HYPER[opt_name], maximize=False)
    for t in range(1, dw.INV_STEPS + 1):
        for p in params:
            p.grad = None
        dw.torch_loss(model, t).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        if opt_name == "sgd":
            srkern.sgd_step([flat], [g], [state], dampening=0.0, first_step=t == 1, seed=dw.SEED, step=t, **h)
        else:
            srkern.lion_step([flat], [g], [state], seed=dw.SEED, step=t, **h)
    bits = lambda x: x.view(torch.int16).numpy().view(np.uint16).copy()  # noqa: E731
    return {"param": bits(flat), STATE[opt_name]: bits(state)}


@pytest.mark.parametrize("opt_name", ["sgd", "lion"])
def test_torch_sharded_sgd_lion(runs, opt_name):
    # srkern.torch.ShardedSGD / ShardedLion on a small BF16 model: worlds 1-3 equal the functional
    # step on the flat vector in this process; world 3's checkpoint (front end save: layout and
    # hyper-parameters) loaded on 2 ranks (and 1) by an optimizer built with another lr continues exactly.
    want = torch_reference(opt_name)
    for k in WORLDS:
        assert_state(read(runs[k][0], f"torch-{opt_name}-w{k}", want), want, f"torch {opt_name}: world {k}")
    for k in (2, 1):
        assert_state(read(runs[k][0], f"torch-{opt_name}-resumed-w{k}", want), want,
                     f"torch {opt_name}: resumed 3 -> {k}")


@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_checkpoint_of_another_optimizer_refused(runs, k):
    # AdamW, SGD and Lion checkpoints loaded by each other, SGD with momentum by SGD without, an
    # unknown optimizer name, AdamW's hyper-parameters in a Lion folder: CheckpointMismatch (or
    # Corrupt) naming the cause on every rank, nothing changed; AdamW's manifest unchanged.
    bad = [f for f in runs[k][1]["failures"] if "checkpoint" in f]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("k", WORLDS, ids=lambda k: f"world={k}")
def test_bad_hyper_parameters_raise_on_every_rank(runs, k):
    # Bad or mismatched hyper-parameters, settings and constructions (a 10-element model: on 3
    # ranks rank 2 owns nothing): every rank raises the same error and the launch finishes.
    assert runs[k][1]["error_cases"] == (15 if k > 1 else 14), runs[k][1]["error_cases"]
    bad = [f for f in runs[k][1]["failures"] if "errors:" in f]
    assert not bad, "\n".join(bad)


def test_no_unexpected_failures(runs):
    for k, (_, res) in runs.items():
        assert not res["failures"], f"world {k}:\n" + "\n".join(res["failures"][:20])
