"""The multi-process half of tests/test_dist_optim.py: ``mpirun -n 3 python tests/_dist_optim_worker.py
--out DIR``, one launch for world sizes 3, 2 and 1: the 3 ranks run every check as world 3 (which
saves the checkpoints), then split into a world of ranks 0 and 1 and a world of rank 2, which run
every check again at the same time, resuming world 3's checkpoints (one launch instead of three:
each process pays ~2-4 s to import torch and srkern.torch).

Like tests/_dist_worker.py (whose problem, gradients and ``Checks`` it reuses), a worker never
asserts: it records failed checks, and rank 0 writes them to ``DIR/optim-w<K>.json`` and the
results (weights and the whole optimizer state, gathered from the shards) as raw ``.bin`` files,
which the pytest side compares with the single-process functional steps. Anything that raises
aborts the job (srkern.dist.abort_on_error), so a bug shows as a non-zero exit, never as a hang.

What each world does: the invariance problem for ShardedSGDCore (with and without momentum) and
ShardedLionCore in every mode, saving a checkpoint after step 2 (world 3) or resuming world 3's
checkpoints and continuing (worlds 2 and 1); the same for the torch ShardedSGD and ShardedLion on
a small model; checkpoints of another optimizer refused; bad hyper-parameters raising on every rank.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _dist_worker as dw  # noqa: E402
from srkern import dist  # noqa: E402
from srkern.checkpoint import seal_manifest  # noqa: E402
from srkern.sgd import ELEMENTWISE_PRECISIONS  # noqa: E402
from srkern.sharded import ShardedAdamWCore, ShardedLionCore, ShardedSGDCore  # noqa: E402
from srkern.testing import bits_of  # noqa: E402

MODES = ELEMENTWISE_PRECISIONS  # SGD's and Lion's: every AdamW mode but fp16-sr
SAVE_AT = 2  # the world-3 launch saves after this step; the world-2 launch resumes there
# Two groups (the invariance problem's odd sizes 500 + 503): momentum with nesterov and weight
# decay in one, dampening and maximize in the other; Lion with other betas, decay and maximize.
SGD_HYPER = [dict(lr=1e-2, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False),
             dict(lr=3e-3, momentum=0.8, dampening=0.1, nesterov=False, weight_decay=0.0, maximize=True)]
SGD_PLAIN = [dict(h, momentum=0.0, dampening=0.0, nesterov=False) for h in SGD_HYPER]  # no state at all
LION_HYPER = [dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, maximize=False),
              dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.0, maximize=True)]
HYPERS = {"sgd": SGD_HYPER, "sgd-plain": SGD_PLAIN, "lion": LION_HYPER}
# (optimizer case, mode, state_dtype): every mode of each, and FP32 state in bf16-sr.
CASES = [(c, m, None) for c in HYPERS for m in MODES] + [("sgd", "bf16-sr", "float32"), ("lion", "bf16-sr", "float32")]
TORCH_HYPER = {"sgd": dict(lr=2e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
               "lion": dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)}


def case_name(case: str, precision: str, state_dtype: str | None) -> str:
    return f"{case}-{precision}" + ("-f32state" if state_dtype == "float32" else "")


def make_core(comm: dist.Communicator, case: str, w: np.ndarray, precision: str, state_dtype: str | None,
              groups: bool = True):
    kw = dict(precision=precision, seed=dw.SEED, state_dtype=state_dtype,
              groups=[(0, dw.INV_SIZES[0]), (dw.INV_SIZES[0], w.size)] if groups else None)
    if case == "lion":
        return ShardedLionCore(w, comm, **kw)
    return ShardedSGDCore(w, comm, momentum=case == "sgd", **kw)


def gathered(core, comm: dist.Communicator) -> dict[str, np.ndarray]:
    """On rank 0: the weights and every state section of the whole flat vector (bits)."""
    out = {"param": bits_of(core.flat_params).copy()}
    for name, t in core.state_sections():
        if name != "param":
            parts = comm.mpi.gather(bits_of(t).copy(), root=0)
            out[name] = np.concatenate(parts) if comm.rank == 0 else None
    return out


def write(out: Path, stem: str, state: dict[str, np.ndarray], comm: dist.Communicator) -> None:
    if comm.rank == 0:
        for name, bits in state.items():
            bits.tofile(out / f"{stem}-{name}.bin")


def run_cores(comm: dist.Communicator, out: Path, save: bool, resume: Path | None) -> None:
    """Every case for INV_STEPS steps from the invariance problem's start (``{name}-w{K}-*.bin``);
    ``save``: a checkpoint after step SAVE_AT in ``out/ckpt-{name}``; ``resume``: also each case
    loaded from ``resume/ckpt-{name}`` into a core that starts elsewhere and stepped to the end
    (``{name}-resumed-w{K}-*.bin``)."""
    W = comm.size
    for case, prec, sdt in CASES:
        name = case_name(case, prec, sdt)
        core = make_core(comm, case, dw.inv_initial(prec).copy(), prec, sdt)
        for t in range(1, dw.INV_STEPS + 1):
            core.flat_grads[...] = dw.inv_grad(core.flat_params, t)  # every rank: the same gradient
            core.step(HYPERS[case])
            if save and t == SAVE_AT:
                core.save(out / f"ckpt-{name}")
        write(out, f"{name}-w{W}", gathered(core, comm), comm)
        if resume is not None:
            other = make_core(comm, case, (-dw.inv_initial(prec)).copy(), prec, sdt)  # other weights, no state
            other.load(resume / f"ckpt-{name}")
            for t in range(SAVE_AT + 1, dw.INV_STEPS + 1):
                other.flat_grads[...] = dw.inv_grad(other.flat_params, t)
                other.step(HYPERS[case])
            write(out, f"{name}-resumed-w{W}", gathered(other, comm), comm)


def run_torch(comm: dist.Communicator, out: Path, save: bool, resume: Path | None) -> None:
    """ShardedSGD and ShardedLion on the small model of tests/_dist_worker.py, 4 steps
    (``torch-{opt}-w{K}-param.bin``); ``save`` / ``resume`` as in :func:`run_cores`, through the
    front end's save and load (the resumed optimizer is built with another lr: the load must
    restore the checkpoint's)."""
    import torch
    from srkern.torch import ShardedLion, ShardedSGD
    W = comm.size
    for opt_name, cls in (("sgd", ShardedSGD), ("lion", ShardedLion)):
        runs = [("", None)] + ([("-resumed", resume / f"ckpt-torch-{opt_name}")] if resume is not None else [])
        for tag, ckpt in runs:
            model = dw.torch_model()
            hyper = dict(TORCH_HYPER[opt_name], **({"lr": 0.5} if ckpt else {}))
            opt = cls(model.parameters(), comm, precision="bf16-sr", seed=dw.SEED, **hyper)
            start = 0
            if ckpt is not None:
                opt.load(ckpt)
                start = opt.core.step_count
            for t in range(start + 1, dw.INV_STEPS + 1):
                opt.zero_grad()
                dw.torch_loss(model, t).backward()
                opt.step()
                if save and t == SAVE_AT and not tag:
                    opt.save(out / f"ckpt-torch-{opt_name}")
            state = gathered(opt.core, comm)
            state["param"] = opt.flat_params.view(torch.int16).numpy().view(np.uint16).copy()
            write(out, f"torch-{opt_name}{tag}-w{W}", state, comm)


def check_mismatched(comm: dist.Communicator, ck: dw.Checks, folder: Path) -> None:
    """A checkpoint of one optimizer loaded into another is refused on every rank, naming both,
    with nothing changed; AdamW's manifests keep their old fields (no ``optimizer``)."""
    w = dw.inv_initial("bf16-sr")[:37]
    cores = {"adamw": ShardedAdamWCore(w.copy(), comm, seed=dw.SEED),
             "sgd": make_core(comm, "sgd", w.copy(), "bf16-sr", None, groups=False),
             "sgd-plain": make_core(comm, "sgd-plain", w.copy(), "bf16-sr", None, groups=False),
             "lion": make_core(comm, "lion", w.copy(), "bf16-sr", None, groups=False)}
    hypers = {"adamw": [dw.INV_HYPER[0]], "sgd": SGD_HYPER[:1], "sgd-plain": SGD_PLAIN[:1], "lion": LION_HYPER[:1]}
    for name, core in cores.items():
        core.flat_grads[...] = dw.inv_grad(core.flat_params, 1)
        core.step(hypers[name])
        core.save(folder / name)
    man = {name: json.loads((folder / name / "manifest.json").read_text()) for name in cores}
    ck.expect("optimizer" not in man["adamw"], "checkpoint: an AdamW manifest names its optimizer (old format changed)")
    ck.expect(man["sgd"].get("optimizer") == "sgd" and man["lion"].get("optimizer") == "lion",
              "checkpoint: SGD / Lion manifests do not name their optimizer")
    if comm.rank == 0:  # an optimizer srkern does not know, the manifest resealed so that its own check answers
        shutil.copytree(folder / "sgd", folder / "unknown", dirs_exist_ok=True)
        (folder / "unknown" / "manifest.json").write_bytes(seal_manifest(dict(man["sgd"], optimizer="adam")))
        shutil.copytree(folder / "lion", folder / "foreign-hyper", dirs_exist_ok=True)  # AdamW's keys in a Lion folder
        (folder / "foreign-hyper" / "manifest.json").write_bytes(
            seal_manifest(dict(man["lion"], extra={"hyper": [dict(dw.INV_HYPER[0], betas=[0.9, 0.999])]})))
        shutil.copytree(folder / "adamw", folder / "named-adamw", dirs_exist_ok=True)  # the field, not its absence
        (folder / "named-adamw" / "manifest.json").write_bytes(seal_manifest(dict(man["adamw"], optimizer="adamw")))
    comm.barrier()

    def refused(target, path: Path, what: str, cls: type, words: str) -> None:
        snap = [bits_of(t).copy() for _, t in target.state_sections()] + [bits_of(target.flat_params).copy()]
        step, msg = target.step_count, None
        try:
            target.load(path)
            ck.expect(False, f"checkpoint {what} was loaded")
        except dist.CheckpointError as e:
            msg = f"{type(e).__name__}: {e}"
            ck.expect(isinstance(e, cls) and words in str(e), f"checkpoint {what}: {msg!r}, expected "
                                                              f"{cls.__name__} with {words!r}")
        ck.expect(len(set(comm.mpi.allgather(msg))) == 1, f"checkpoint {what}: ranks raised different errors")
        after = [bits_of(t) for _, t in target.state_sections()] + [bits_of(target.flat_params)]
        ck.expect(all(np.array_equal(a, b) for a, b in zip(snap, after, strict=True)) and target.step_count == step,
                  f"checkpoint {what}: state changed")

    for saved in ("adamw", "sgd", "lion"):
        for loader in ("adamw", "sgd", "lion"):
            if saved != loader:
                refused(cores[loader], folder / saved, f"of {saved} loaded by {loader}", dist.CheckpointMismatch,
                        f"optimizer: '{saved}' in the checkpoint, '{loader}' here")
    refused(cores["sgd-plain"], folder / "sgd", "of SGD with momentum loaded without", dist.CheckpointMismatch,
            "state sections")
    refused(cores["sgd"], folder / "unknown", "of an unknown optimizer", dist.CheckpointMismatch,
            "optimizer 'adam' is not one of ['adamw', 'sgd', 'lion']")
    refused(cores["lion"], folder / "foreign-hyper", "with AdamW hyper-parameters in a Lion folder",
            dist.CheckpointCorrupt, "must hold only the hyper-parameters ['lr', 'betas', 'weight_decay', 'maximize']")
    refused(cores["lion"], folder / "named-adamw", "naming adamw loaded by lion", dist.CheckpointMismatch,
            "optimizer: 'adamw' in the checkpoint, 'lion' here")
    cores["adamw"].load(folder / "named-adamw")  # "optimizer": "adamw" is what its absence means
    before = bits_of(cores["sgd"].momentum_buffer).copy()
    cores["sgd"].load(folder / "sgd")  # and the good one loads back
    ck.expect(np.array_equal(bits_of(cores["sgd"].momentum_buffer), before) and cores["sgd"].step_count == 1,
              "checkpoint: SGD round trip")


def check_errors(comm: dist.Communicator, ck: dw.Checks) -> int:
    """Bad hyper-parameters and settings raise the same error on every rank, change nothing and
    never hang (a hang runs into MPIEXEC_TIMEOUT). 10 elements: on 3 ranks rank 2 owns nothing
    and never calls the step, so it must refuse before any exchange too."""
    import torch
    from srkern.torch import ShardedLion, ShardedSGD
    W, r = comm.size, comm.rank
    w = dw.inv_initial("bf16-sr")[:10]
    sgd = make_core(comm, "sgd", w.copy(), "bf16-sr", None, groups=False)
    lion = make_core(comm, "lion", w.copy(), "bf16-sr", None, groups=False)
    for core in (sgd, lion):
        core.flat_grads[...] = 1
    w0 = bits_of(w).copy()
    h, lh = SGD_HYPER[0], LION_HYPER[0]
    x = ck.expect_raise
    x("SGD lr=inf", ValueError, "lr", lambda: sgd.step([dict(h, lr=float("inf"))]))
    x("SGD lr=nan on one rank", ValueError, "lr", lambda: sgd.step([dict(h, lr=float("nan") if r == W - 1 else 1e-2)]))
    x("SGD nesterov with dampening", ValueError, "Nesterov", lambda: sgd.step([dict(h, dampening=0.5)]))
    x("SGD momentum 0 in a core with momentum", ValueError, "fixed at construction",
      lambda: sgd.step([dict(h, momentum=0.0, nesterov=False)]))
    x("SGD hyper-parameter missing", ValueError, "['maximize'] missing",
      lambda: sgd.step([{k: v for k, v in h.items() if k != "maximize"}]))
    x("SGD nesterov=1 (not a bool)", TypeError, "nesterov", lambda: sgd.step([dict(h, nesterov=1)]))
    x("Lion betas[0]=1.5", ValueError, "betas[0]", lambda: lion.step([dict(lh, betas=(1.5, 0.99))]))
    # Each valid alone, but lr * weight_decay is below FP32's smallest normal: only the kernel
    # scalars' check sees it, which the empty shard's rank must run too.
    x("Lion lr*weight_decay subnormal", ValueError, "lrwd", lambda: lion.step([dict(lh, lr=1e-20, weight_decay=1e-20)]))
    x("Lion grad_scale=inf", ValueError, "grad_scale", lambda: lion.step([lh], grad_scale=float("inf")))
    if W > 1:
        x("Lion maximize differing on one rank", ValueError, "maximize",
          lambda: lion.step([dict(lh, maximize=r == W - 1)]))
    ck.expect(all(np.array_equal(bits_of(c.flat_params), w0) and c.step_count == 0 for c in (sgd, lion)),
              "errors: rejected steps changed the weights or the step count")
    for core, hy in ((sgd, [h]), (lion, [lh])):  # and the job still works afterwards
        core.step(hy)
        ck.expect(core.step_count == 1 and not np.array_equal(bits_of(core.flat_params), w0),
                  "errors: a good step after the rejected ones did not update")
    x("ShardedSGDCore in fp16-sr", ValueError, "no 'fp16-sr' kernels",
      lambda: ShardedSGDCore(w.astype(np.float16), comm, momentum=True, precision="fp16-sr"))
    x("ShardedSGDCore momentum=0.9 (not a bool)", TypeError, "momentum must be a bool",
      lambda: ShardedSGDCore(w.copy(), comm, momentum=0.9))
    p = [torch.nn.Parameter(torch.zeros(6, dtype=torch.bfloat16)) for _ in range(2)]
    x("ShardedSGD with momentum in one group only", ValueError, "every parameter group",
      lambda: ShardedSGD([dict(params=[p[0]]), dict(params=[p[1]], momentum=0.0)], comm, momentum=0.9))
    x("ShardedSGD lr=-1 on one rank", ValueError, "lr",
      lambda: ShardedSGD(p, comm, lr=-1.0 if r == W - 1 else 1e-2, momentum=0.9))
    x("ShardedLion betas=(None, 0.9)", TypeError, "betas[0]", lambda: ShardedLion(p, comm, betas=(None, 0.9)))
    return ck.raised


def run_world(comm: dist.Communicator, out: Path, save: bool, resume: Path | None) -> None:
    """Every check on the ranks of ``comm``; its rank 0 writes ``out/optim-w<size>.json``."""
    W = comm.size
    ck = dw.Checks(comm)
    run_cores(comm, out, save, resume)
    run_torch(comm, out, save, resume)
    check_mismatched(comm, ck, out / f"mismatch-w{W}")
    result = {"world": W, "error_cases": check_errors(comm, ck), "failures": ck.gather()}
    if comm.rank == 0:
        (out / f"optim-w{W}.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    world = dist.Communicator()
    with dist.abort_on_error(world):
        if world.size != 3:
            raise SystemExit("run under mpirun -n 3")
        run_world(world, args.out, save=True, resume=None)
        world.barrier()  # world 3's checkpoints are complete before anyone resumes them
        part = dist.Communicator(world.mpi.Split(color=int(world.rank == 2), key=world.rank))
        run_world(part, args.out, save=False, resume=args.out)  # ranks 0, 1: world 2; rank 2: world 1
        world.barrier()


if __name__ == "__main__":
    main()
