"""The multi-process half of tests/test_dist.py: run by ``mpirun -n K python tests/_dist_worker.py``.

Each scenario runs its checks on every rank and records failures instead of asserting, so that
one failing check does not leave the other ranks waiting in a collective; rank 0 writes
``<out>/<scenario>-w<K>.json`` ({"failures": [...], ...}) and result arrays as raw ``.bin``
files, which the pytest side reads. Anything that raises aborts the whole job
(srkern.dist.abort_on_error), so a bug shows as a non-zero exit, never as a hang.

Scenarios: ``all`` (collectives, numerics, invariance, corrupt, errors, train), ``train`` (optionally
``--ckpt-at k [--die]`` or ``--resume DIR``), ``raise`` (rank 1 raises in step 2).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from srkern import dist, reference as ref  # noqa: E402
from srkern.checkpoint import seal_manifest  # noqa: E402
from srkern.precisions import PRECISIONS, param_dtype  # noqa: E402
from srkern.testing import bits_of, first_difference, mismatch_report  # noqa: E402

BF16 = ml_dtypes.bfloat16
MODES = list(PRECISIONS)
NP_WEIGHTS = {"bfloat16": BF16, "float16": np.float16, "float32": np.float32}  # param_dtype -> NumPy
# Invariance problem: two parameter groups of odd sizes (different lr), K steps.
INV_SIZES = (500, 503)
INV_STEPS = 4
INV_HYPER = [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
             dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)]
SEED = 0x5EED_0001_2345


def inv_initial(precision: str) -> np.ndarray:
    """The initial flat weights of the invariance problem (the same everywhere), in the mode's
    weight dtype: BF16, FP32 in fp32, FP16 in fp16-sr."""
    w = np.random.default_rng(7).normal(0, 1, sum(INV_SIZES)).astype(np.float32)
    return w.astype(NP_WEIGHTS[param_dtype(precision)])


def inv_grad(w: np.ndarray, step: int) -> np.ndarray:
    """The gradient of step ``step`` for weights ``w``: BF16-representable values (so the average
    of identical per-rank copies is exact in FP32 for world <= 4), in ``w``'s dtype; for FP16
    weights (fp16-sr) FP16 values, whose average is exact in FP32 as well."""
    x = w.astype(np.float32)
    g32 = (np.sin(3.0 * x + step) * 0.5 + 0.01 * x).astype(np.float32)
    if w.dtype == np.float16:
        return g32.astype(np.float16)
    g = g32.astype(BF16)
    return g if w.dtype == BF16 else g.astype(np.float32)


class Checks:
    def __init__(self, comm: dist.Communicator) -> None:
        self.comm, self.failures, self.raised = comm, [], 0

    def expect_raise(self, what: str, exc: type, words: str, fn) -> None:
        """``fn`` must raise ``exc`` naming ``words`` on this rank, and every rank the same error."""
        self.raised += 1
        try:
            fn()
            msg = None
        except exc as e:
            msg = f"{type(e).__name__}: {e}"
        msgs = self.comm.mpi.allgather(msg)
        self.expect(msg is not None, f"errors: {what}: accepted (no {exc.__name__}) on this rank")
        self.expect(msg is None or words in msg, f"errors: {what}: message {msg!r} lacks {words!r}")
        self.expect(len(set(msgs)) == 1, f"errors: {what}: ranks raised different errors {msgs}")

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(f"rank {self.comm.rank}: {what}")

    def same_bits(self, got, want, what: str) -> None:
        rec = first_difference(got, want, limit=5)
        if not rec["ok"]:
            report = mismatch_report(rec, what, width=bits_of(want).itemsize).replace("\n", ";")
            self.failures.append(f"rank {self.comm.rank}: {report}")

    def gather(self) -> list[str]:
        out = self.comm.mpi.allgather(self.failures)
        return [f for per_rank in out for f in per_rank]


# ---- collectives: closed-form inputs and the NumPy oracle ---------------------------------------

def check_collectives(comm: dist.Communicator, ck: Checks) -> None:
    W, r = comm.size, comm.rank
    for n in (0, 1, 7, 8, 29, 1023):
        a, b = dist.shard_range(n, W, r)
        ck.expect(sum(np.diff(dist.shard_range(n, W, k))[0] for k in range(W)) == n, f"shards tile n={n}")
        i = np.arange(n)
        for dt in ("float32", "bfloat16"):
            npdt = np.float32 if dt == "float32" else BF16
            # Closed form: x_r[i] = i % 8 + 8 r; the sum W (i % 8) + 4 W (W - 1) is an integer
            # below 256, exact in BF16, so every rounding mode must return it exactly.
            xs = [((i % 8) + 8 * k).astype(np.float32).astype(npdt) for k in range(W)]
            closed = (W * (i % 8) + 4 * W * (W - 1)).astype(np.float32)
            for od in ("bfloat16", "float32"):
                for rounding in ("stochastic", "nearest"):
                    got = dist.reduce_scatter(xs[r], comm, op="sum", out_dtype=od, rounding=rounding,
                                              seed=11, step=3)
                    ck.same_bits(got, closed[a:b].astype(np.float32 if od == "float32" else BF16),
                                 f"closed-form sum n={n} in={dt} out={od} {rounding}")
            # Rank-dependent non-exact inputs, op avg / sum, against the oracle.
            rng = np.random.default_rng(n)
            ys = [rng.normal(0, 1, n).astype(np.float32).astype(npdt) for _ in range(W)]
            for op in ("avg", "sum"):
                for od in ("bfloat16", "float32"):
                    for wire in ([None, "bfloat16"] if dt == "float32" else [None]):
                        got = dist.reduce_scatter(ys[r], comm, op=op, out_dtype=od, seed=99, step=5,
                                                  wire_dtype=wire)
                        want = ref.reduce_scatter_full(ys, op, od, seed=99, step=5, wire_dtype=wire)
                        ck.same_bits(got, want[a:b], f"oracle n={n} in={dt} op={op} out={od} wire={wire}")
            # all_gather: shard holds its global indices; the result is arange(n) (n < 256 is
            # exact in BF16 too), into a new array and in place.
            shard = np.arange(a, b).astype(np.float32).astype(npdt)
            full = dist.all_gather(shard, comm, n=n)
            ck.same_bits(full, i.astype(np.float32).astype(npdt), f"all_gather n={n} {dt}")
            buf = np.zeros(n, dtype=npdt)
            buf[a:b] = shard
            dist.all_gather(buf[a:b], comm, out=buf)
            ck.same_bits(buf, i.astype(np.float32).astype(npdt), f"all_gather in place n={n} {dt}")
    # Bytes: the all-to-all sends exactly the other ranks' shards (the plain reduce-scatter volume).
    x = np.ones(1000, dtype=BF16)
    before = comm.bytes_sent
    dist.reduce_scatter(x, comm, seed=1)
    a, b = dist.shard_range(1000, W, r)
    ck.expect(comm.bytes_sent - before == 2 * (1000 - (b - a)),
              f"bytes sent {comm.bytes_sent - before}, expected {2 * (1000 - (b - a))}")
    before = comm.bytes_sent
    dist.reduce_scatter(np.ones(1000, dtype=np.float32), comm, seed=1, wire_dtype="bfloat16")
    ck.expect(comm.bytes_sent - before == 2 * (1000 - (b - a)), "FP32 on a BF16 wire sends 2 bytes per element")
    # Arguments that differ across ranks raise on every rank instead of hanging or mixing.
    try:
        dist.reduce_scatter(x, comm, seed=1 + (r == W - 1))
        ck.expect(W == 1, "different seeds on different ranks were accepted")
    except ValueError as e:
        ck.expect("different arguments" in str(e), f"wrong error for mismatched seeds: {e}")


# ---- numerics of SR reduce-scatter --------------------------------------------------------------

def check_numerics(comm: dist.Communicator, ck: Checks, out: dict) -> None:
    W, r = comm.size, comm.rank
    n = 4096
    rng = np.random.default_rng(3)
    v = (1.0 + rng.integers(0, 128, n) / 128.0).astype(np.float32)  # BF16 values in [1, 2)
    ulp = np.float32(2.0 ** -7)
    t = v + ulp / 4  # 0.25 ulp above a BF16 value; exact in FP32
    # Rank-dependent inputs whose FP32 sum in rank order is exact and whose average is t:
    # x_r = t + (r - (W-1)/2) * 2^-5, all multiples of 2^-9 below 4.
    x = (t + np.float32((r - (W - 1) / 2) * 2.0 ** -5)).astype(np.float32)
    a, b = dist.shard_range(n, W, r)
    tt = t[a:b].astype(np.float64)

    def err(seed: int, rounding: str = "stochastic") -> np.ndarray:
        y = dist.reduce_scatter(x, comm, op="avg", out_dtype="bfloat16", rounding=rounding, seed=seed, step=1)
        return (y.astype(np.float64) - tt) / float(ulp)

    def global_mean(e: np.ndarray) -> float:
        return comm.mpi.allreduce(float(e.sum())) / n

    # SR error per element is +0.75 ulp (p = 1/4) or -0.25 ulp (p = 3/4): sd 0.433 ulp, so the
    # mean over 4096 elements has SE 0.0068 ulp and the 0.15 ulp bound is 22 SE away from 0.
    sr_mean = global_mean(err(1))
    rn_mean = global_mean(err(1, "nearest"))
    ck.expect(abs(sr_mean) < 0.15, f"SR mean signed error {sr_mean:.4f} ulp, bound 0.15")
    ck.expect(abs(rn_mean) >= 0.15, f"RN mean signed error {rn_mean:.4f} ulp should fail the 0.15 bound")
    # Averaging 16 seeds: the mean of 16 outputs has error k/16 - 1/4 with k ~ Bin(16, 1/4):
    # E|.| = 0.087 ulp against 0.375 ulp for one seed (ratio 0.23; the bound is 0.6).
    one = global_mean(np.abs(err(100)))
    avg16 = np.mean([err(100 + s) for s in range(16)], axis=0)
    many = global_mean(np.abs(avg16))
    ck.expect(many < 0.6 * one, f"16-seed MAE {many:.4f} not below 0.6 x single-seed MAE {one:.4f}")
    out["numerics"] = {"sr_mean_signed_ulp": sr_mean, "rn_mean_signed_ulp": rn_mean,
                       "mae_one_seed_ulp": one, "mae_16_seeds_ulp": many}


# ---- ShardedAdamW: world-size invariance (framework-neutral core, NumPy buffers) ---------------

# Non-default moment dtypes the invariance problem also runs: FP32 moments in bf16-sr, BF16
# moments (written with SR) in fp16-sr.
INV_STATE_CASES = (("bf16-sr", "float32"), ("fp16-sr", "bfloat16"))


def inv_name(precision: str, state_dtype: str | None = None) -> str:
    """The file stem of an invariance result: ``inv-<mode>[-f32state|-bf16state]``."""
    return f"inv-{precision}" + {None: "", "float32": "-f32state", "bfloat16": "-bf16state"}[state_dtype]


def run_invariance(comm: dist.Communicator, precision: str, state_dtype: str | None = None) -> np.ndarray:
    w0 = inv_initial(precision)
    core = dist.ShardedAdamWCore(w0.copy(), comm, precision=precision, seed=SEED, state_dtype=state_dtype,
                                 groups=[(0, INV_SIZES[0]), (INV_SIZES[0], sum(INV_SIZES))])
    for t in range(1, INV_STEPS + 1):
        core.flat_grads[...] = inv_grad(core.flat_params, t)  # every rank: the same gradient
        core.step(INV_HYPER)
    return core.flat_params


# ---- checkpoints: corrupted and mismatched ones are refused, nothing loaded --------------------

def check_corrupt(comm: dist.Communicator, ck: Checks, folder: Path) -> None:
    r = comm.rank
    core = dist.ShardedAdamWCore(inv_initial("bf16-kahan"), comm, precision="bf16-kahan", seed=SEED)
    for t in (1, 2):
        core.flat_grads[...] = inv_grad(core.flat_params, t)
        core.step([INV_HYPER[0]])
    good = folder / "good"
    core.save(good)
    snap = [bits_of(x).copy() for _, x in core.state_sections()] + [bits_of(core.flat_params).copy()]
    man = json.loads((good / "manifest.json").read_text())

    n = core.n
    last = man["shards"][-1]["file"]

    def flip(f: Path) -> None:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))

    def edit(**fields):  # a manifest with some fields replaced and its checksum renewed, so each field's own check answers
        return lambda bad: (bad / "manifest.json").write_bytes(seal_manifest(dict(man, **fields)))

    bad_hyper = [dict(INV_HYPER[0], lr=-1.0, betas=list(INV_HYPER[0]["betas"]))]
    # kind: (the damage, the error class it must raise, words of the message that name the cause)
    cases = {
        "missing": (lambda bad: (bad / last).unlink(), dist.CheckpointCorrupt, f"cannot read {folder}/missing/{last}"),
        "truncated": (lambda bad: (bad / last).write_bytes((bad / last).read_bytes()[:-3]),
                      dist.CheckpointCorrupt, "(truncated?)"),
        "corrupted": (lambda bad: flip(bad / last), dist.CheckpointCorrupt, "fails its SHA-256 check"),
        "no-manifest": (lambda bad: (bad / "manifest.json").unlink(), dist.CheckpointCorrupt,
                        "cannot read " + str(folder / "no-manifest" / "manifest.json")),
        "garbled-manifest": (lambda bad: (bad / "manifest.json").write_text("{not json"),
                             dist.CheckpointCorrupt, "manifest.json is not valid JSON"),
        "wrong-format-version": (edit(format_version=3), dist.CheckpointMismatch,
                                 "not a srkern.ShardedAdamW v2 checkpoint (format 'srkern.ShardedAdamW', version 3)"),
        "edited-manifest": (lambda bad: (bad / "manifest.json").write_text(json.dumps(dict(man, step=7))),
                            dist.CheckpointCorrupt, "does not match its checksum manifest_sha256"),
        "wrong-contract": (edit(contract_version="2.0"), dist.CheckpointMismatch, "written under bit contract v2.0"),
        "wrong-n": (edit(n=n + 1), dist.CheckpointMismatch, f"number of parameters: {n + 1} in the checkpoint, {n} here"),
        "wrong-precision": (edit(precision="bf16-sr"), dist.CheckpointMismatch,
                            "precision: 'bf16-sr' in the checkpoint, 'bf16-kahan' here"),
        "wrong-sections": (edit(sections=man["sections"][:-1]), dist.CheckpointMismatch, "state sections: "),
        "wrong-groups": (edit(groups=[[0, 8], [8, n]]), dist.CheckpointMismatch, "parameter groups: [[0, 8], "),
        "bad-hyper": (edit(extra={"hyper": bad_hyper}), dist.CheckpointCorrupt, "parameter group 0: lr"),
        "wrong-world": (edit(world_size=man["world_size"] + 1), dist.CheckpointCorrupt,
                        f"shard table does not tile {n} elements over {man['world_size'] + 1} ranks"),
        "escaping-path": (edit(shards=[dict(man["shards"][0], file="../" + man["shards"][0]["file"])]
                               + man["shards"][1:]), dist.CheckpointCorrupt, "bad shard entry"),
        "step-out-of-range": (edit(step=2**32), dist.CheckpointCorrupt, "step must be in [0, 2**32)"),
        # 0.0 == 0 in JSON, but a float offset would break the copy loop of some ranks only
        "float-start": (edit(shards=[dict(man["shards"][0], start=0.0)] + man["shards"][1:]),
                        dist.CheckpointCorrupt, "manifest fields ['shards[0].start'] must be integers"),
        "extra-not-object": (edit(extra=[]), dist.CheckpointCorrupt, "extra must be an object, got list"),
    }

    def refused(target, path: Path, kind: str, cls: type, words: str) -> None:
        msg = None
        try:
            target.load(path)
            ck.expect(False, f"checkpoint {kind} was loaded")
        except dist.CheckpointError as e:
            msg = f"{type(e).__name__}: {e}"
            ck.expect(isinstance(e, cls), f"checkpoint {kind}: {type(e).__name__}, expected {cls.__name__}: {e}")
            ck.expect(words in str(e), f"checkpoint {kind}: message {str(e)!r} lacks {words!r}")
        ck.expect(len(set(comm.mpi.allgather(msg))) == 1, f"checkpoint {kind}: ranks raised different errors")

    for kind, (hurt, cls, words) in cases.items():
        bad = folder / kind
        if r == 0:
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(good, bad)
            hurt(bad)
        comm.barrier()
        refused(core, bad, kind, cls, words)
        after = [bits_of(x) for _, x in core.state_sections()] + [bits_of(core.flat_params)]
        ck.expect(all(np.array_equal(p, q) for p, q in zip(snap, after, strict=True)), f"{kind}: state changed")
        ck.expect(core.step_count == 2, f"{kind}: step changed")
    # A model of another size is refused by the same check.
    other = dist.ShardedAdamWCore(inv_initial("bf16-kahan")[:-1].copy(), comm, precision="bf16-kahan", seed=SEED)
    refused(other, good, "of another model size", dist.CheckpointMismatch,
            f"number of parameters: {n} in the checkpoint, {n - 1} here")
    # And the good one loads back bit for bit.
    core.load(good)
    after = [bits_of(x) for _, x in core.state_sections()] + [bits_of(core.flat_params)]
    ck.expect(all(np.array_equal(p, q) for p, q in zip(snap, after, strict=True)), "good checkpoint round trip")


# ---- bad arguments on some ranks: every rank raises, none hangs ---------------------------------

def check_errors(comm: dist.Communicator, ck: Checks, folder: Path) -> int:
    """Each case must raise on every rank (same type and message), never hang: a hang would run
    into MPIEXEC_TIMEOUT and fail the launch. Returns the number of cases run."""
    W, r = comm.size, comm.rank
    expect_raise = ck.expect_raise


    # Seeds that differ only in bit 63 (a modulo-2**63 comparison would call them equal).
    x = np.ones(29, dtype=BF16)
    if W > 1:
        expect_raise("seeds differing in bit 63", ValueError, "different arguments",
                     lambda: dist.reduce_scatter(x, comm, seed=5 + ((r == W - 1) << 63)))
    # A bad out= on one rank only (wrong length, then wrong dtype for all_gather).
    a, b = dist.shard_range(29, W, r)
    bad_len = np.zeros(b - a + (r == W - 1), dtype=BF16)
    expect_raise("reduce_scatter out of the wrong length on one rank", ValueError, "elements",
                 lambda: dist.reduce_scatter(x, comm, seed=1, out=bad_len))
    bad_dt = np.zeros(29, dtype=np.float32 if r == W - 1 else BF16)
    expect_raise("all_gather out of the wrong dtype on one rank", TypeError, "dtype",
                 lambda: dist.all_gather(x[a:b], comm, out=bad_dt))
    # Non-finite hyper-parameters / grad_scale with a model so small that ranks 2 and 3 of 4 own
    # nothing (they never run adamw_step): all raise before the reduce-scatter; nothing changes.
    core = dist.ShardedAdamWCore(inv_initial("bf16-sr")[:10].copy(), comm, precision="bf16-sr", seed=SEED)
    core.flat_grads[...] = 1
    w0 = bits_of(core.flat_params).copy()
    bad_lr = dict(INV_HYPER[0], lr=float("inf"))
    expect_raise("lr=inf", ValueError, "lr", lambda: core.step([bad_lr]))
    expect_raise("grad_scale=inf", ValueError, "grad_scale",
                 lambda: core.step([INV_HYPER[0]], grad_scale=float("inf")))
    expect_raise("lr=nan on one rank", ValueError, "lr",
                 lambda: core.step([dict(INV_HYPER[0], lr=float("nan") if r == W - 1 else 1e-3)]))
    ck.expect(np.array_equal(bits_of(core.flat_params), w0) and core.step_count == 0,
              "errors: rejected steps changed the weights or the step count")
    core.step([INV_HYPER[0]])  # and the job still works afterwards
    ck.expect(core.step_count == 1 and not np.array_equal(bits_of(core.flat_params), w0),
              "errors: a good step after the rejected ones did not update")
    # An invalid state_dtype is refused (fp32-master used to override it silently).
    expect_raise("state_dtype bfloat16 for fp32-master", ValueError, "state_dtype",
                 lambda: dist.ShardedAdamWCore(inv_initial("fp32-master")[:10].copy(), comm,
                                               precision="fp32-master", state_dtype="bfloat16"))
    # The torch optimizer with a bad argument on one rank only (FP32 weights for bf16-sr): every
    # rank raises at construction, none waits in the core's exchanges.
    import torch
    from srkern.torch import ShardedAdamW
    wrong = torch.zeros(12, dtype=torch.float32 if r == W - 1 else torch.bfloat16)
    expect_raise("ShardedAdamW with FP32 weights on one rank", TypeError, "dtype",
                 lambda: ShardedAdamW([wrong], comm, precision="bf16-sr", seed=SEED))
    # save() into a folder rank 0 cannot create (a file is in the way): CheckpointError everywhere.
    blocker = folder / "a-file"
    if r == 0:
        folder.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a folder")
    comm.barrier()
    expect_raise("save where mkdir fails on rank 0", dist.CheckpointError, "failed",
                 lambda: core.save(blocker / "ckpt"))
    return ck.raised


# ---- a small PyTorch model with ShardedAdamW: the example's loop in miniature ------------------

# The precisions the torch ShardedAdamW model trains with in scenario ``all`` (``train``: bf16-sr).
TRAIN_PRECISIONS = ("bf16-sr", "fp16-sr")


def torch_model(precision: str = "bf16-sr"):
    """The small model, in the weight dtype of ``precision`` (BF16; FP16 for fp16-sr)."""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    return model.to(getattr(torch, param_dtype(precision)))


def torch_batch(step: int, dtype):
    """The batch of ``step`` in torch dtype ``dtype`` (the model's): the same on every rank, so
    the averaged gradient is exact."""
    import torch
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 13, generator=g).to(dtype)
    y = torch.randn(32, 3, generator=g).to(dtype)
    return x, y


def torch_loss(model, step: int):
    x, y = torch_batch(step, next(model.parameters()).dtype)
    return ((model(x).float() - y.float()) ** 2).mean()


TRAIN_HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)


def run_train(comm: dist.Communicator, steps: int, folder: Path | None = None, ckpt_at: int = 0,
              die: bool = False, resume: Path | None = None, raise_at: int = 0,
              precision: str = "bf16-sr") -> np.ndarray:
    import torch
    model = torch_model(precision)
    from srkern.torch import ShardedAdamW
    opt = ShardedAdamW(model.parameters(), comm, precision=precision, seed=SEED, **TRAIN_HYPER)
    start = 0
    if resume is not None:
        opt.load(resume)
        start = opt.core.step_count
    for t in range(start + 1, steps + 1):
        opt.zero_grad()
        torch_loss(model, t).backward()
        if raise_at and t == raise_at and comm.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        opt.step()
        if ckpt_at and t == ckpt_at:
            opt.save(folder)
            if die:  # the job is killed (SIGKILL) right after the checkpoint
                comm.barrier()
                if comm.rank == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
    return opt.flat_params.view(torch.int16).numpy().view(np.uint16).copy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["all", "train", "raise"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ckpt-at", type=int, default=0)
    ap.add_argument("--die", action="store_true")
    ap.add_argument("--resume", type=Path)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    comm = dist.Communicator()
    W = comm.size
    result: dict = {"world": W}
    with dist.abort_on_error(comm):
        ck = Checks(comm)
        if args.scenario == "all":
            check_collectives(comm, ck)
            check_numerics(comm, ck, result)
            for mode in MODES:
                w = run_invariance(comm, mode)
                if comm.rank == 0:
                    bits_of(w).tofile(args.out / f"inv-{mode}-w{W}.bin")
            for mode, sdt in INV_STATE_CASES:  # each mode's other moment dtype
                w = run_invariance(comm, mode, sdt)
                if comm.rank == 0:
                    bits_of(w).tofile(args.out / f"{inv_name(mode, sdt)}-w{W}.bin")
            folder = args.out / f"ckpt-w{W}"
            check_corrupt(comm, ck, folder)
            result["error_cases"] = check_errors(comm, ck, args.out / f"errors-w{W}")
            for prec in TRAIN_PRECISIONS:  # bf16-sr: train-w{W}.bin (the resume test reads it)
                w = run_train(comm, args.steps, precision=prec)
                if comm.rank == 0:
                    w.tofile(args.out / f"train{'' if prec == 'bf16-sr' else '-' + prec}-w{W}.bin")
        elif args.scenario == "train":
            w = run_train(comm, args.steps, args.out / "ckpt", args.ckpt_at, args.die, args.resume)
            if comm.rank == 0:
                w.tofile(args.out / f"train{args.tag}-w{W}.bin")
        elif args.scenario == "raise":
            run_train(comm, args.steps, raise_at=2)
        result["failures"] = ck.gather()
        result["bytes_sent"] = comm.mpi.allgather(comm.bytes_sent)
        if comm.rank == 0:
            name = f"{args.scenario}{args.tag}-w{W}.json"
            (args.out / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
