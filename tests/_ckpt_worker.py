"""The multi-process and crash half of tests/test_checkpoint.py.

Run as ``mpirun -n K python tests/_ckpt_worker.py SCENARIO --out DIR ...``, or without mpirun
(one process, an mpi4py singleton) for ``crash-loop``. Like tests/_dist_worker.py, a worker never
asserts: it records what it saw and rank 0 writes ``DIR/<scenario>.json``, which the tests read;
anything unexpected raises inside ``abort_on_error``, so a bug ends the job instead of hanging it.

The state of a checkpoint here is written directly into the buffers (no kernel runs): variant
``v`` of :func:`full_state` gives every section of the flat vector its own random bits, so the
tests can tell the old checkpoint, the new one and the loading optimizer's own state apart bit
for bit.

Scenarios:
  crash-loop   one process; for each case and k = 1, 2, ... a forked child saves an old
               checkpoint, then a new one with an audit hook that ends the process
               (``os._exit``) at its k-th file operation of the save, until a save completes.
  crash        every rank saves the old checkpoint, then the new one; rank R dies at its K-th file
               operation (``--die R:K[:SUBSTR]``, counting only paths containing SUBSTR).
  folders      ranks that see different folders; two saves of one step; a world-size round trip.
  hang         one damaged checkpoint (``--case``), loaded by every rank: each must raise, quickly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from srkern import dist  # noqa: E402
from srkern.checkpoint import seal_manifest  # noqa: E402
from srkern.testing import bits_of  # noqa: E402

BF16 = ml_dtypes.bfloat16
N = 1003  # odd: the last shard of every world size is short
PRECISION = "bf16-kahan"  # four sections (param, moments, compensation) and no kernel at construction
SEED = 0x5EED_C4E0
OLD, NEW, OTHER = 1, 2, 3  # state variants: the checkpoint in the folder, the one being saved, the loader's
CRASH_EXIT = 75  # the exit status of a process the audit hook ended


def full_state(variant: int) -> dict[str, np.ndarray]:
    """Every section of the flat vector for a state variant (BF16 bits, all finite)."""
    rng = np.random.default_rng(variant)
    out = {}
    for name, scale in (("param", 1.0), ("exp_avg", 1e-2), ("exp_avg_sq", 1e-4), ("compensation", 1e-6)):
        x = rng.normal(0, scale, N).astype(np.float32)
        out[name] = np.abs(x).astype(BF16) if name == "exp_avg_sq" else x.astype(BF16)
    return out


def make_core(comm: dist.Communicator, variant: int, step: int) -> dist.ShardedAdamWCore:
    core = dist.ShardedAdamWCore(full_state(variant)["param"].copy(), comm, precision=PRECISION, seed=SEED)
    set_state(core, variant, step)
    return core


def set_state(core: dist.ShardedAdamWCore, variant: int, step: int) -> None:
    full = full_state(variant)
    core.flat_params[...] = full["param"]
    for name, t in core.state_sections():
        if name != "param":
            t[...] = full[name][core.start:core.stop]
    core.step_count = step


def state_bits(core: dist.ShardedAdamWCore) -> list[np.ndarray]:
    """What a load may change on this rank: the whole weights and this rank's sections."""
    return [bits_of(core.flat_params).copy()] + [bits_of(t).copy() for _, t in core.state_sections()]


def is_variant(core: dist.ShardedAdamWCore, variant: int, step: int) -> bool:
    full = full_state(variant)
    same = np.array_equal(bits_of(core.flat_params), bits_of(full["param"]))
    for name, t in core.state_sections():
        same = same and np.array_equal(bits_of(t), bits_of(full[name][core.start:core.stop]))
    return bool(same and core.step_count == step and core.seed == SEED)


def die_at(k: int, substr: str = "", only: str = "") -> None:
    """Install an audit hook that ends this process at its k-th file operation that changes the
    file system (an open for writing, a rename or replace, a remove, a mkdir) on a path
    containing ``substr`` (and of audit event ``only``, when given): the crash points of a save,
    in order."""
    count = 0
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event: str, args: tuple) -> None:
        nonlocal count
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return  # os.fdopen of a descriptor already counted at its os.open
            if not (any(c in (mode or "") for c in "wxa+") or (mode is None and flags & writes)):
                return
            paths = [path]
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        if only and event != only:
            return
        if any(substr in os.fsdecode(p) for p in paths):
            count += 1
            if count == k:
                os._exit(CRASH_EXIT)

    sys.addaudithook(hook)


# ---- crash-loop: one process, a fork per crash point -------------------------------------------

CRASH_CASES = {"same-step": 3, "next-step": 4}  # the new checkpoint's step; the old one is at step 3


def crash_child(folder: Path, new_step: int, k: int) -> None:
    comm = dist.Communicator()
    core = make_core(comm, OLD, 3)
    core.save(folder)
    set_state(core, NEW, new_step)
    die_at(k)
    core.save(folder)


def crash_loop(out: Path) -> dict:
    """Forks before MPI starts in this process (each child starts its own singleton)."""
    codes: dict[str, list[int]] = {}
    for case, new_step in CRASH_CASES.items():
        codes[case] = []
        for k in range(1, 40):
            pid = os.fork()
            if pid == 0:
                try:
                    crash_child(out / case / f"k{k}", new_step, k)
                    os._exit(0)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            codes[case].append(os.waitstatus_to_exitcode(status))
            if codes[case][-1] != CRASH_EXIT:  # the save completed (0) or failed (1): no more crash points
                break
    return {"codes": codes}


# ---- under mpirun --------------------------------------------------------------------------------

def crash(comm: dist.Communicator, out: Path, die: str) -> dict:
    rank, k, *sub = die.split(":")  # rank:k[:substring[:audit event]]
    core = make_core(comm, OLD, 3)
    core.save(out / "ckpt")
    comm.barrier()
    set_state(core, NEW, 3)  # the same step and world size: the case whose names used to collide
    if comm.rank == int(rank):
        die_at(int(k), *sub)
    core.save(out / "ckpt")
    return {"completed": True}


def raises(comm: dist.Communicator, fn) -> dict:
    """Run ``fn`` on every rank; what each raised (class and message) and how long it took."""
    t0 = time.monotonic()
    try:
        fn()
        got = None
    except dist.CheckpointError as e:
        got = (type(e).__name__, str(e))
    return {"raised": comm.mpi.allgather(got), "seconds": comm.mpi.allgather(time.monotonic() - t0)}


def folders(comm: dist.Communicator, out: Path) -> dict:
    r = comm.rank
    res: dict = {}
    shared, local = out / "shared", out / "node-local-1"
    core = make_core(comm, OLD, 3)
    core.save(shared)
    if r == 1:
        local.mkdir()  # rank 1's "node" has a folder of that name, which rank 0 cannot see
    comm.barrier()
    before = sorted(p.name for p in shared.iterdir()) if r == 0 else None
    set_state(core, NEW, 4)
    res["different"] = raises(comm, lambda: core.save(shared if r == 0 else local))
    res["shared_unchanged"] = comm.mpi.allgather(before == sorted(p.name for p in shared.iterdir()) if r == 0 else True)
    res["local_empty"] = comm.mpi.allgather(not any(local.iterdir()) if r == 1 else True)
    # Two saves of the same step: the second generation replaces the first, files and all.
    twice = out / "twice"
    core.save(twice)
    first = sorted(p.name for p in twice.iterdir())
    set_state(core, OTHER, 4)
    core.save(twice)
    res["twice"] = {"first": first, "second": sorted(p.name for p in twice.iterdir())}
    return res


def damage(case: str, folder: Path) -> str:
    """Damage a good world-2 checkpoint; returns words the refusal must contain."""
    man = json.loads((folder / "manifest.json").read_text())
    if case == "utf8":  # rank 0 reads the bytes; every rank must fail to decode them, not rank 0 alone
        raw = (folder / "manifest.json").read_bytes()
        (folder / "manifest.json").write_bytes(raw.replace(b"srkern.Sharded", b"srkern.Sharded\xff", 1))
        return "is not valid UTF-8"
    if case == "float-stop":  # resealed: the checksum holds, the field check must answer
        man["shards"][0]["stop"] = float(man["shards"][0]["stop"])
        (folder / "manifest.json").write_bytes(seal_manifest(man))
        return "manifest fields ['shards[0].stop'] must be integers"
    if case == "fifo-manifest":  # rank 0 reads the manifest: its open used to block, the others waited
        (folder / "manifest.json").unlink()
        os.mkfifo(folder / "manifest.json")
        return "manifest.json: not a regular file but a FIFO"
    f = folder / man["shards"][1]["file"]  # the shard rank 1 reads
    f.unlink()
    if case == "fifo":
        os.mkfifo(f)
        return "not a regular file but a FIFO"
    if case == "sparse":
        with open(f, "wb") as fh:
            fh.truncate(40 << 30)
        return f"has {40 << 30} bytes, expected {man['shards'][1]['bytes']} (too long)"
    raise ValueError(case)


def hang(comm: dist.Communicator, out: Path, case: str) -> dict:
    folder = out / case
    core = make_core(comm, OLD, 3)
    core.save(folder)
    comm.barrier()
    words = damage(case, folder) if comm.rank == 0 else None
    words = comm.mpi.bcast(words, root=0)
    target = make_core(comm, OTHER, 5)
    before = state_bits(target)
    res = raises(comm, lambda: target.load(folder))
    after = state_bits(target)
    same = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)) and target.step_count == 5
    res.update(words=words, unchanged=comm.mpi.allgather(same))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["crash-loop", "crash", "folders", "hang"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--die", default="")
    ap.add_argument("--case", default="")
    args = ap.parse_args()
    if args.scenario == "crash-loop":  # no MPI in this process: it forks
        (args.out / "crash-loop.json").write_text(json.dumps(crash_loop(args.out)))
        return
    comm = dist.Communicator()
    with dist.abort_on_error(comm):
        if args.scenario == "crash":
            res = crash(comm, args.out, args.die)
        elif args.scenario == "folders":
            res = folders(comm, args.out)
        else:
            res = hang(comm, args.out, args.case)
        if comm.rank == 0:
            (args.out / f"{args.scenario}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
