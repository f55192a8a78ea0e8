"""Data-parallel training with sharded BF16 + SR AdamW state (ZeRO style) over MPI ranks.

Shows srkern.torch.ShardedAdamW on a small PyTorch MLP regression: every rank computes the
gradient of its own slice of each batch; one step is an SR reduce-scatter of the BF16 gradients
(FP32 sums in rank order, one stochastic rounding with shared random bits), srkern's fused SR
AdamW on the rank's shard of the flat parameter vector, and an all-gather of the BF16 weights.
Each rank keeps only 1 / world of the moments. At the end, a table: loss, optimizer memory per
rank and bytes each rank sent per step.

Run:  mpirun -n 4 python python/zero_train.py
      mpirun -n 2 python python/zero_train.py --steps 200 --precision bf16-kahan
      python python/zero_train.py --help
A rank that raises aborts the whole job (srkern.dist.abort_on_error); MPIEXEC_TIMEOUT=<s>
bounds a hang.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install
from srkern import dist  # noqa: E402
from srkern.precisions import PRECISIONS, param_dtype  # noqa: E402
from srkern.torch import ShardedAdamW  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=256, help="global batch (split over ranks)")
    p.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16-sr")
    p.add_argument("--seed", type=int, default=1234, help="model, data and SR seed")
    p.add_argument("--checkpoint", type=Path, help="save the sharded state here at the end")
    return p.parse_args()


def make_model(width: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights everywhere (ShardedAdamW also broadcasts rank 0's)
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, 1)).to(dtype)


def batch(step: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: a fixed smooth target function of 32 inputs."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randn(n, 32, generator=g)
    y = torch.sin(x[:, :8].sum(1, keepdim=True)) + 0.1 * x[:, 8:9]
    return x, y


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # ranks share the cores
    comm = dist.Communicator()
    rank, world = comm.rank, comm.size
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} ranks")
    dtype = getattr(torch, param_dtype(args.precision))
    with dist.abort_on_error(comm):
        model = make_model(args.width, dtype)
        opt = ShardedAdamW(model.parameters(), comm, lr=args.lr, precision=args.precision,
                           seed=args.seed, weight_decay=0.0)
        n_params = opt.core.n
        per = args.batch // world
        steps = range(1, args.steps + 1)
        bar = None
        if rank == 0:
            try:
                from tqdm import tqdm
                bar = tqdm(total=args.steps, desc=f"{world} ranks, {args.precision}", unit="step")
            except ImportError:
                pass
        sent0 = comm.bytes_sent
        t0 = time.perf_counter()
        losses = []
        for t in steps:
            x, y = batch(t, args.batch, args.seed)
            xs, ys = x[rank * per:(rank + 1) * per].to(dtype), y[rank * per:(rank + 1) * per]
            opt.zero_grad()
            loss = ((model(xs).float() - ys) ** 2).mean()
            loss.backward()
            opt.step()  # averages the gradients over ranks: the loss is a mean over the global batch
            glob = comm.mpi.allreduce(loss.detach().item()) / world
            losses.append(glob)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{glob:.4f}")
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        sent = (comm.bytes_sent - sent0) / args.steps
        mem = opt.optimizer_bytes()
        mems = comm.mpi.gather(sum(mem.values()), root=0)
        sents = comm.mpi.gather(sent, root=0)
        if args.checkpoint:
            opt.save(args.checkpoint)
        if rank == 0:
            first = sum(losses[:5]) / min(5, len(losses))
            last = sum(losses[-5:]) / min(5, len(losses))
            print(f"\n{n_params} parameters, {world} ranks, precision {args.precision}, "
                  f"{args.steps} steps in {wall:.1f} s")
            print("| quantity | value |\n|---|---|")
            print(f"| loss, mean of first 5 steps | {first:.4f} |")
            print(f"| loss, mean of last 5 steps | {last:.4f} |")
            for r, (m, s) in enumerate(zip(mems, sents, strict=True)):
                print(f"| rank {r}: optimizer memory | {m} B ({m / n_params:.2f} B/param of the model) |")
                print(f"| rank {r}: bytes sent per step | {s:.0f} B ({s / n_params:.2f} B/param) |")
            print(f"| unsharded srkern bf16-sr state, for comparison | {4 * n_params} B (4 B/param) |")
            if args.checkpoint:
                print(f"| checkpoint | {args.checkpoint} |")


if __name__ == "__main__":
    main()
