"""The multi-process half of tests/test_dist_attack.py: ``mpirun -n K python tests/_dist_attack_worker.py
SCENARIO OUT`` (``rawcomm`` runs in one process, without mpirun).

Each scenario makes ranks disagree, or fail on one rank only, and every rank writes one line per
case to ``OUT/rank-R.txt`` (its own file: mpirun joins the ranks' stdout in arbitrary chunks),
``rank R case C raised <Type>: <message>`` or ``rank R case C accepted`` (and, after refused
steps, ``rank R case C unchanged`` when the weights and the step count are as before), which the
pytest side reads. Everything runs inside ``abort_on_error``, so an unexpected exception ends the
job at once; a rank that hangs runs into MPIEXEC_TIMEOUT. The ``exit-*`` scenarios leave the
``with abort_on_error`` body on one rank by an exception that is not an error (``sys.exit(0)``,
``sys.exit()``, ``KeyboardInterrupt``) while the other ranks wait in a barrier.
"""
from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from srkern import dist  # noqa: E402
from srkern.testing import bits_of  # noqa: E402

BF16 = ml_dtypes.bfloat16
SEED = 0x5EED_0002_0011
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
N = 40  # two groups of 20: a shard boundary inside each group on 2 and 3 ranks


OUT = Path(".")


def report(comm: dist.Communicator, text: str) -> None:
    """One line ``rank R <text>`` in this rank's file, written at once (read even after a hang)."""
    with open(OUT / f"rank-{comm.rank}.txt", "a") as f:
        f.write(f"rank {comm.rank} {text}".replace("\n", " ") + "\n")


def attempt(comm: dist.Communicator, case: str, fn) -> bool:
    """Run ``fn`` and report how it ended on this rank; True if it raised."""
    try:
        fn()
    except Exception as e:
        report(comm, f"case {case} raised {type(e).__name__}: {e}")
        return True
    report(comm, f"case {case} accepted")
    return False


def core_model(comm: dist.Communicator, groups=((0, 20), (20, N))) -> dist.ShardedAdamWCore:
    w = np.random.default_rng(3).normal(0, 1, N).astype(np.float32).astype(BF16)
    core = dist.ShardedAdamWCore(w, comm, groups=list(groups), seed=SEED)
    core.flat_grads[...] = np.linspace(-1, 1, N).astype(BF16)
    return core


def refused_steps(comm: dist.Communicator, core, cases: dict) -> None:
    """Each case is a step that must raise on every rank and change nothing."""
    for case, fn in cases.items():
        w0, t0 = bits_of(core.flat_params).copy(), core.step_count
        attempt(comm, case, fn)
        if np.array_equal(bits_of(core.flat_params), w0) and core.step_count == t0:
            report(comm, f"case {case} unchanged")


def torch_params(shapes, dtype=None):
    import torch
    g = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=g).to(dtype or torch.bfloat16) for s in shapes]


# ---- the scenarios --------------------------------------------------------------------------------

def settings(comm: dist.Communicator) -> None:
    """Ranks that disagree on a setting: every rank must refuse (else each rank would update its
    shard with its own setting, a mixed model)."""
    import torch
    from srkern.torch import ShardedAdamW
    last = comm.rank == comm.size - 1
    other = dict(HYPER)
    core = core_model(comm)
    cases = {}
    for key, value in (("lr", 2e-2), ("betas", (0.9, 0.99)), ("eps", 1e-6), ("weight_decay", 0.0)):
        hypers = [HYPER, dict(HYPER, **{key: value}) if last else other]
        cases[key] = lambda hypers=hypers: core.step(hypers)
    cases["grad_scale"] = lambda: core.step([HYPER, HYPER], grad_scale=0.5 if last else 1.0)
    refused_steps(comm, core, cases)
    attempt(comm, "control-step", lambda: core.step([HYPER, HYPER]))  # agreeing ranks still step
    # Construction: the same total size, other group boundaries.
    attempt(comm, "core-groups", lambda: core_model(comm, ((0, 16), (16, N)) if last else ((0, 20), (20, N))))
    attempt(comm, "core-seed", lambda: dist.ShardedAdamWCore(
        np.zeros(N, dtype=BF16), comm, seed=SEED + (1 << 40) * last))
    # The PyTorch optimizer: the same total size, other per-parameter sizes, shapes or groups.
    attempt(comm, "torch-sizes", lambda: ShardedAdamW(
        torch_params([(10,), (30,)] if last else [(20,), (20,)]), comm, seed=SEED))
    attempt(comm, "torch-shapes", lambda: ShardedAdamW(
        torch_params([(4, 5), (20,)] if last else [(5, 4), (20,)]), comm, seed=SEED))
    a, b, c = torch_params([(8,), (8,), (24,)])
    attempt(comm, "torch-groups", lambda: ShardedAdamW(
        [{"params": [a]}, {"params": [b, c]}] if last else [{"params": [a, b]}, {"params": [c]}],
        comm, seed=SEED))
    attempt(comm, "torch-lr", lambda: ShardedAdamW(torch_params([(N,)]), comm, lr=2e-3 if last else 1e-3,
                                                    seed=SEED))
    opt = ShardedAdamW(torch_params([(N,)]), comm, seed=SEED)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    if last:
        opt.param_groups[0]["lr"] = 5e-3  # a scheduler that ran on one rank only
    w0 = opt.flat_params.clone()
    attempt(comm, "torch-step-lr", opt.step)
    if torch.equal(opt.flat_params, w0) and opt.core.step_count == 0:
        report(comm, "case torch-step-lr unchanged")


def flat_grads(comm: dist.Communicator) -> None:
    """flat_grads is written into, never replaced; a tensor resized in place is refused on every rank."""
    import torch
    last = comm.rank == comm.size - 1
    core = core_model(comm)
    attempt(comm, "assign", lambda: setattr(core, "flat_grads", np.zeros(64 * N, dtype=BF16)))
    flat = torch.from_numpy(bits_of(core_model(comm).flat_params).copy()).view(torch.bfloat16)
    tcore = dist.ShardedAdamWCore(flat, comm, seed=SEED)
    tcore.flat_grads.fill_(1.0)
    if last:
        tcore.flat_grads.resize_(64 * N)  # the same tensor object, 64 times longer
    refused_steps(comm, tcore, {"resize": lambda: tcore.step([HYPER])})
    if last:
        tcore.flat_grads.resize_(N)
    attempt(comm, "control-step", lambda: tcore.step([HYPER]))


def writable(comm: dist.Communicator) -> None:
    """16 elements on 3 ranks: rank 2's shard is empty, so it writes nothing locally; a buffer
    refused only inside adamw_step on ranks 0 and 1 would leave it waiting in the all-gather."""
    import torch
    w = torch.linspace(-1, 1, 16).to(torch.bfloat16)
    leaf = w.clone().requires_grad_(True)  # an optimizer writes its parameters: as under no_grad
    core = dist.ShardedAdamWCore(leaf, comm, seed=SEED)
    core.flat_grads.fill_(0.5)
    v0 = leaf._version
    attempt(comm, "requires-grad-step", lambda: core.step([HYPER]))
    report(comm, f"case requires-grad-version {'bumped' if leaf._version > v0 else 'unchanged'}")
    ro = np.zeros(16, dtype=BF16)
    ro.flags.writeable = False
    attempt(comm, "read-only-core", lambda: dist.ShardedAdamWCore(ro, comm, seed=SEED))
    with torch.inference_mode():  # its state buffers are inference tensors, written outside
        icore = dist.ShardedAdamWCore(torch.zeros(16, dtype=torch.bfloat16), comm, seed=SEED)
    attempt(comm, "inference-step", lambda: icore.step([HYPER]))
    attempt(comm, "inference-load", lambda: icore.load(OUT / "no-such-checkpoint"))


def ctor(comm: dist.Communicator) -> None:
    """A constructor argument that is bad on one rank only."""
    import torch
    from srkern.torch import ShardedAdamW
    last = comm.rank == comm.size - 1
    attempt(comm, "torch-lr-nan", lambda: ShardedAdamW(torch_params([(N,)]), comm, seed=SEED,
                                                       lr=float("nan") if last else 1e-3))
    attempt(comm, "torch-float32", lambda: ShardedAdamW(
        torch_params([(N,)], torch.float32 if last else None), comm, seed=SEED))
    attempt(comm, "core-float32", lambda: dist.ShardedAdamWCore(
        np.zeros(N, dtype=np.float32 if last else BF16), comm, seed=SEED))


def ctor_seed(comm: dist.Communicator) -> None:
    """A bad seed on rank 0 only (the rank that used to be the only one to look at it)."""
    attempt(comm, "seed-type", lambda: dist.ShardedAdamWCore(
        np.zeros(N, dtype=BF16), comm, seed="12x" if comm.rank == 0 else SEED))
    attempt(comm, "seed-range", lambda: dist.ShardedAdamWCore(
        np.zeros(N, dtype=BF16), comm, seed=1 << 64 if comm.rank == 0 else SEED))


def grad_none(comm: dist.Communicator) -> None:
    """A parameter without a gradient on one rank only."""
    import torch
    from srkern.torch import ShardedAdamW
    params = torch_params([(N // 2,), (N // 2,)])
    opt = ShardedAdamW(params, comm, seed=SEED)
    for p in params:
        p.grad = torch.ones_like(p)
    if comm.rank == comm.size - 1:
        params[1].grad = None
    w0 = opt.flat_params.clone()
    attempt(comm, "grad-none", opt.step)
    if torch.equal(opt.flat_params, w0) and opt.core.step_count == 0:
        report(comm, "case grad-none unchanged")
    # Any error while the gradients are gathered, not only ValueError/TypeError: here a gradient
    # whose data was swapped for a longer tensor (torch's copy_ raises RuntimeError) on one rank.
    params[1].grad = torch.ones_like(params[1])
    if comm.rank == comm.size - 1:
        params[1].grad.data = torch.ones(2 * N, dtype=torch.bfloat16)
    attempt(comm, "grad-runtime-error", opt.step)
    if torch.equal(opt.flat_params, w0) and opt.core.step_count == 0:
        report(comm, "case grad-runtime-error unchanged")


def all_gather_n(comm: dist.Communicator) -> None:
    """n given on some ranks only (the others would sum the shard lengths in an allreduce)."""
    a, b = dist.shard_range(N, comm.size, comm.rank)
    shard = np.ones(b - a, dtype=BF16)
    attempt(comm, "n-on-rank-0", lambda: dist.all_gather(shard, comm, n=N if comm.rank == 0 else None))
    last = comm.rank == comm.size - 1
    attempt(comm, "n-on-last", lambda: dist.all_gather(shard, comm, n=N if last else None))


def raw_comm(_comm: dist.Communicator) -> None:
    """One process: an mpi4py communicator is accepted (wrapped), None or another object is a
    TypeError naming comm."""
    from mpi4py import MPI
    x = np.linspace(-1, 1, N).astype(np.float32)
    me = dist.Communicator()
    want = bits_of(dist.reduce_scatter(x, me, seed=SEED))
    got = bits_of(dist.reduce_scatter(x, MPI.COMM_WORLD, seed=SEED))
    report(me, f"case rs-mpi4py {'same' if np.array_equal(got, want) else 'different'}")
    got = bits_of(dist.all_gather(x.astype(BF16), MPI.COMM_WORLD))
    report(me, f"case ag-mpi4py {'same' if np.array_equal(got, bits_of(x.astype(BF16))) else 'different'}")
    core = dist.ShardedAdamWCore(np.zeros(N, dtype=BF16), MPI.COMM_WORLD, seed=SEED)
    report(me, f"case core-mpi4py {'same' if core.comm.mpi is MPI.COMM_WORLD and core.comm.size == 1 else 'different'}")
    for name, bad in (("none", None), ("str", "world")):
        attempt(me, f"rs-{name}", lambda bad=bad: dist.reduce_scatter(x, bad, seed=SEED))
        attempt(me, f"ag-{name}", lambda bad=bad: dist.all_gather(x, bad))
        attempt(me, f"core-{name}", lambda bad=bad: dist.ShardedAdamWCore(np.zeros(N, dtype=BF16), bad))
    # out= of the collectives is written through a raw pointer, as cast's: a torch out that
    # requires grad is refused in grad mode, and a written out has its version counter bumped.
    import torch
    xt = torch.linspace(-1, 1, N)
    for name, fn in (("rs", lambda o: dist.reduce_scatter(xt, me, seed=SEED, out=o)),
                     ("ag", lambda o: dist.all_gather(xt.to(torch.bfloat16), me, out=o))):
        leaf = torch.zeros(N, dtype=torch.bfloat16, requires_grad=True)
        attempt(me, f"{name}-out-grad", lambda fn=fn, leaf=leaf: fn(leaf))
        out = torch.zeros(N, dtype=torch.bfloat16)
        before = out._version
        fn(out)
        report(me, f"case {name}-out-version {'bumped' if out._version > before else 'unchanged'}")
    # ShardedAdamW's parameters are views of its flat buffer: a graph that saved one raises on
    # backward after a step or a load, as after torch's own in-place updates.
    from srkern.torch import ShardedAdamW
    p = torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16))
    opt = ShardedAdamW([p], me, seed=SEED)
    for case, change in (("sharded-step", opt.step), ("sharded-load", lambda: opt.load(OUT / "ckpt"))):
        p.grad = torch.ones_like(p)
        if case == "sharded-load":
            opt.save(OUT / "ckpt")
        y = (p * p).sum()
        change()
        attempt(me, case, y.backward)


def leave_body(comm: dist.Communicator, how: str) -> None:
    """Rank 1 leaves the abort_on_error body by ``how``; the others then wait in a barrier."""
    with dist.abort_on_error(comm):
        if comm.rank == 1:
            if how == "exit-0":
                sys.exit(0)
            if how == "exit-none":
                sys.exit()
            raise KeyboardInterrupt
        comm.barrier()  # never returns: rank 1 is gone (the job must be aborted instead)
    report(comm, "left the barrier")


SCENARIOS = {"settings": settings, "flat-grads": flat_grads, "ctor": ctor, "ctor-seed": ctor_seed,
             "grad-none": grad_none, "all-gather-n": all_gather_n, "rawcomm": raw_comm,
             "writable": writable}


def main() -> None:
    global OUT
    scenario, OUT = sys.argv[1], Path(sys.argv[2])
    comm = dist.Communicator()
    if scenario.startswith("exit-") or scenario == "keyboard":
        leave_body(comm, scenario)
        return
    with dist.abort_on_error(comm):
        SCENARIOS[scenario](comm)
        comm.barrier()
    report(comm, "done")


if __name__ == "__main__":
    main()
