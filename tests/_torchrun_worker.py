"""The multi-process half of tests/test_torchrun.py: one script, two launchers.

    python -m torch.distributed.run --standalone --nproc-per-node K tests/_torchrun_worker.py SCENARIO --launcher torch --out DIR
    mpirun -n K python tests/_torchrun_worker.py train --launcher mpi --out DIR

Under ``--launcher torch`` the ranks join a gloo process group and srkern runs over it
(``srkern._torch_comm.TorchCommunicator``); under ``--launcher mpi`` over mpi4py. As in
tests/_dist_worker.py a worker never asserts: it records failed checks, and rank 0 writes them
with its results to ``DIR/<scenario>-<launcher>-w<K>.json`` and the final weights as raw bits to
``DIR/train-<launcher>-w<K>.bin``. Anything that raises ends the job (``abort_on_error``).

Scenarios: ``all`` (train, collectives, errors), ``train`` (optionally ``--resume CKPT``: load a
checkpoint written at step 3, by any launcher and world size, and train to step 6), ``raise``
(rank 1 raises in step 2 while the others wait in the reduce-scatter).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_worker as dw  # noqa: E402  (the model, batches, seed and hyper-parameters of test_dist)
from srkern import dist, reference as ref  # noqa: E402

STEPS, CKPT_AT = 6, 3  # six ShardedAdamW steps; a checkpoint after step 3, loaded by a fresh optimizer


def flat_bits(opt) -> np.ndarray:
    import torch
    return opt.flat_params.view(torch.int16).numpy().view(np.uint16).copy()


def optimizer(comm_arg):
    from srkern.torch import ShardedAdamW
    model = dw.torch_model()
    return model, ShardedAdamW(model.parameters(), comm_arg, precision="bf16-sr", seed=dw.SEED, **dw.TRAIN_HYPER)


def train(model, opt, first: int, last: int, raise_at: int = 0) -> None:
    for t in range(first, last + 1):
        opt.zero_grad()
        dw.torch_loss(model, t).backward()
        if t == raise_at and opt.core.comm.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        opt.step()


def run_train(launcher: str, out: Path, result: dict, resume: Path | None = None) -> np.ndarray:
    """Steps 1-3 with ``comm=None`` (the default: torch's default group under torchrun, MPI's
    COMM_WORLD under mpirun), a checkpoint, then a fresh model and optimizer on another handle of
    the same ranks (a ``new_group`` of every rank / a Communicator) that loads it and runs 4-6."""
    if resume is None:
        model, opt = optimizer(None)
        result["default_comm"] = type(opt.core.comm).__name__
        train(model, opt, 1, CKPT_AT)
        resume = out / "ckpt"
        opt.save(resume)
    if launcher == "torch":
        import torch.distributed as tdist
        handle = tdist.new_group(list(range(tdist.get_world_size())))
    else:
        handle = dist.Communicator()
    model, opt = optimizer(handle)
    result["second_comm"] = type(opt.core.comm).__name__
    opt.load(resume)
    train(model, opt, opt.core.step_count + 1, STEPS)
    return flat_bits(opt)


# ---- the exchanges themselves, through srkern.dist on the group -----------------------------------

def check_collectives(comm, ck: dw.Checks) -> None:
    W, r = comm.size, comm.rank
    for n in (0, 1, 7, 29, 1023):  # shard sizes differ between ranks: uneven all-to-all and all-gather
        a, b = dist.shard_range(n, W, r)
        rng = np.random.default_rng(n)
        for npdt in (np.float32, dw.BF16):
            ys = [rng.normal(0, 1, n).astype(np.float32).astype(npdt) for _ in range(W)]
            for wire in ([None, "bfloat16"] if npdt is np.float32 else [None]):
                got = dist.reduce_scatter(ys[r], comm, op="avg", seed=99, step=5, wire_dtype=wire)
                want = ref.reduce_scatter_full(ys, "avg", "bfloat16", seed=99, step=5, wire_dtype=wire)
                ck.same_bits(got, want[a:b], f"collective reduce_scatter n={n} in={np.dtype(npdt).name} wire={wire}")
            full = ys[0]
            ck.same_bits(dist.all_gather(full[a:b].copy(), comm), full, f"collective all_gather n={n}")
            buf = np.zeros(n, dtype=npdt)
            buf[a:b] = full[a:b]
            dist.all_gather(buf[a:b], comm, out=buf)
            ck.same_bits(buf, full, f"collective all_gather in place n={n}")
    # alltoallv with the pieces in reverse rank order on both sides (the packing path): rank r
    # sends rank q the r + q + 1 values 100 r + q.
    from srkern._tensor import as_view
    counts = [r + q + 1 for q in range(W)]
    displs = [sum(counts[q + 1:]) for q in range(W)]
    send = np.zeros(sum(counts), dtype=np.uint32)
    for q in range(W):
        send[displs[q]:displs[q] + counts[q]] = 100 * r + q
    rcounts = [q + r + 1 for q in range(W)]
    rdispls = [sum(rcounts[q + 1:]) for q in range(W)]
    recv = np.zeros(sum(rcounts), dtype=np.uint32)
    comm.alltoallv(as_view(send), counts, displs, as_view(recv), rcounts, rdispls)
    want = np.concatenate([np.full(rcounts[q], 100 * q + r, dtype=np.uint32) for q in reversed(range(W))])
    ck.expect(np.array_equal(recv, want), f"collective alltoallv unpacked: {recv.tolist()[:12]}")
    # A seed drawn on rank 0 reaches every rank (bcast_int), all 64 bits.
    core = dist.ShardedAdamWCore(np.zeros(10, dtype=dw.BF16), comm)
    ck.expect(len(set(comm.mpi.allgather(core.seed))) == 1, "collective: ranks hold different drawn seeds")
    big = comm.bcast_int((1 << 64) - 3 if r == 0 else 0)
    ck.expect(big == (1 << 64) - 3, f"collective bcast_int gave {big}")


# ---- bad arguments on one rank: every rank raises the same error, none hangs --------------------------

def check_errors(comm, ck: dw.Checks, out: Path) -> int:
    import torch
    from srkern.torch import ShardedAdamW
    W, r = comm.size, comm.rank
    last = r == W - 1
    expect_raise = ck.expect_raise


    group = getattr(comm, "group", comm)  # the torch ProcessGroup itself, as a user passes it
    wrong = torch.zeros(12, dtype=torch.float32 if last else torch.bfloat16)
    expect_raise("FP32 weights on the last rank", TypeError, "dtype",
                 lambda: ShardedAdamW([wrong], group, precision="bf16-sr", seed=dw.SEED))
    if W > 1:
        # The same number of elements, another shape: only the shape codes can tell.
        p = torch.zeros((4, 3) if last else (3, 4), dtype=torch.bfloat16)
        expect_raise("another parameter shape on the last rank", ValueError, "parameter 0 shape",
                     lambda: ShardedAdamW([p], group, seed=dw.SEED))
        q = torch.zeros(13 if last else 12, dtype=torch.bfloat16)
        expect_raise("another parameter size on the last rank", ValueError, "parameter 0 shape",
                     lambda: ShardedAdamW([q], group, seed=dw.SEED))
        expect_raise("another seed on the last rank", ValueError, "seed",
                     lambda: ShardedAdamW([torch.zeros(12, dtype=torch.bfloat16)], group, seed=dw.SEED + last))
    # A step with lr = nan on one rank, a missing gradient on one rank: refused everywhere,
    # nothing changes, and the next good step works.
    model, opt = optimizer(group)
    dw.torch_loss(model, 1).backward()
    before = flat_bits(opt)
    opt.param_groups[0]["lr"] = float("nan") if last else dw.TRAIN_HYPER["lr"]
    expect_raise("lr=nan on the last rank", ValueError, "lr", opt.step)
    opt.param_groups[0]["lr"] = dw.TRAIN_HYPER["lr"]
    saved = model[0].weight.grad
    if last:
        model[0].weight.grad = None
    expect_raise("a gradient missing on the last rank", ValueError, "no gradient", opt.step)
    model[0].weight.grad = saved
    ck.expect(np.array_equal(flat_bits(opt), before) and opt.core.step_count == 0,
              "errors: rejected steps changed the weights or the step count")
    opt.step()
    ck.expect(opt.core.step_count == 1 and not np.array_equal(flat_bits(opt), before),
              "errors: a good step after the rejected ones did not update")
    # Collectives with a bad out= on one rank.
    x = np.ones(29, dtype=dw.BF16)
    a, b = dist.shard_range(29, W, r)
    expect_raise("reduce_scatter out of the wrong length on the last rank", ValueError, "elements",
                 lambda: dist.reduce_scatter(x, group, seed=1, out=np.zeros(b - a + last, dtype=dw.BF16)))
    # A damaged checkpoint is refused on every rank (the first rank's error), nothing loaded.
    folder = out / f"errors-w{W}"
    opt.save(folder / "good")
    shard = sorted((folder / "good").glob("*.bin"))[-1]
    comm.barrier()
    if r == 0:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    comm.barrier()
    expect_raise("a corrupted shard file", dist.CheckpointCorrupt, "fails its SHA-256 check",
                 lambda: opt.load(folder / "good"))
    ck.expect(opt.core.step_count == 1, "errors: the refused load changed the step")
    return ck.raised


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["all", "train", "raise"])
    ap.add_argument("--launcher", choices=["torch", "mpi"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", type=Path)
    ap.add_argument("--timeout", type=float, default=120, help="the process group's timeout (s)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    if args.launcher == "torch":
        import torch.distributed as tdist
        tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        import srkern._torch_comm as tc  # importing it (srkern.torch does) registers process groups
        from srkern.comm import as_communicator
        handle = tdist.group.WORLD
        comm = as_communicator(handle)
        same = comm is tc.default_communicator() and comm is as_communicator(handle)
    else:
        comm = handle = dist.Communicator()
    W = comm.size
    tag = f"{args.launcher}-w{W}"
    result: dict = {"world": W, "launcher": args.launcher, "comm": type(comm).__name__,
                    "one_wrapper_per_group": args.launcher == "mpi" or same}
    with dist.abort_on_error(handle):  # the group itself: abort_on_error takes it as a comm
        ck = dw.Checks(comm)
        if args.scenario in ("all", "train"):
            w = run_train(args.launcher, args.out, result, args.resume)
            if comm.rank == 0:
                w.tofile(args.out / f"train{'-resumed' if args.resume else ''}-{tag}.bin")
        if args.scenario == "all":
            check_collectives(comm, ck)
            result["error_cases"] = check_errors(comm, ck, args.out)
        if args.scenario == "raise":
            model, opt = optimizer(handle)
            train(model, opt, 1, 4, raise_at=2)
        result["failures"] = ck.gather()
        if comm.rank == 0:
            (args.out / f"{args.scenario}{'-resumed' if args.resume else ''}-{tag}.json").write_text(
                json.dumps(result, indent=1))
    if args.launcher == "torch":
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
