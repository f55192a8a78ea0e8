"""Distributed benchmark: bytes each rank sends and the time of SR reduce-scatter, all-gather and
one ShardedAdamW step, against MPI's own FP32 Reduce_scatter of the same vector (the baseline a
user would pick), measured in the same run.

Run:  mpirun -n 4 python benchmarks/bench_dist.py [--n 4194304] [--repeat 5] [--json out.json]
(pytest collects ``test_bench_dist_smoke`` below, which runs it on 2 ranks with a small vector.)

Timings on an oversubscribed machine (more ranks than cores) measure the scheduler as much as
srkern: read them as noisy. Bytes are exact. Every row names the SIMD path that ran
(``_common.simd_path``), and the JSON's machine the CPU model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _best(comm, fn, repeat: int) -> float:
    """Best-of-``repeat`` wall time of a collective (max over ranks of each run)."""
    times = []
    for _ in range(repeat):
        comm.mpi.Barrier()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(comm.mpi.allreduce(dt, op=__import__("mpi4py").MPI.MAX))
    return min(times)


def run(n: int, repeat: int) -> list[dict]:
    import ml_dtypes
    from mpi4py import MPI
    sys.path.insert(0, str(ROOT))
    import _common  # benchmarks/ is this script's folder: first on sys.path
    from srkern import dist

    comm = dist.Communicator()
    W, r = comm.size, comm.rank
    rng = np.random.default_rng(r)
    x32 = rng.normal(0, 1, n).astype(np.float32)
    x16 = x32.astype(ml_dtypes.bfloat16)
    a, b = dist.shard_range(n, W, r)
    rows = []

    def measure(name: str, fn, wire_bytes: int) -> None:
        fn()  # warm-up (kernel compile, buffers)
        before = comm.bytes_sent
        fn()
        sent = comm.bytes_sent - before if comm.bytes_sent != before else wire_bytes
        t = _best(comm, fn, repeat)
        rows.append({"op": name, "world": W, "n": n, "bytes_sent_rank0": comm.mpi.bcast(sent, root=0),
                     "time_ms": t * 1e3, "GB_s_per_rank": sent / t / 1e9 if t else 0.0,
                     "simd_path": _common.simd_path("cpu")})

    measure("reduce_scatter bf16 -> bf16 SR", lambda: dist.reduce_scatter(x16, comm, seed=1, step=1), 0)
    measure("reduce_scatter fp32 -> bf16 SR", lambda: dist.reduce_scatter(x32, comm, seed=1, step=1), 0)
    measure("reduce_scatter fp32 (bf16 SR wire) -> bf16 SR",
            lambda: dist.reduce_scatter(x32, comm, seed=1, step=1, wire_dtype="bfloat16"), 0)
    measure("reduce_scatter fp32 -> fp32", lambda: dist.reduce_scatter(x32, comm, out_dtype="float32"), 0)
    counts = [dist.shard_range(n, W, k)[1] - dist.shard_range(n, W, k)[0] for k in range(W)]
    base_out = np.empty(b - a, dtype=np.float32)
    # Baseline: MPI's reduce-scatter (its own algorithm and summation order), FP32 sum.
    measure("baseline MPI Reduce_scatter fp32", lambda: comm.mpi.Reduce_scatter(x32, base_out, counts, op=MPI.SUM),
            4 * (n - (b - a)))
    shard = x16[a:b].copy()
    measure("all_gather bf16", lambda: dist.all_gather(shard, comm, n=n), 0)
    core = dist.ShardedAdamWCore(x16.copy(), comm, precision="bf16-sr", seed=1)
    core.flat_grads[...] = x16
    hyper = [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)]
    measure("ShardedAdamW step bf16-sr", lambda: core.step(hyper), 0)
    for row in rows:
        row["optimizer_bytes_rank0"] = sum(core.optimizer_bytes().values()) if "ShardedAdamW" in row["op"] else None
    return rows if r == 0 else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 22, help="elements per vector (default 4M)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the rows, machine and versions here")
    args = ap.parse_args()
    rows = run(args.n, args.repeat)
    if not rows:
        return
    import mpi4py
    print(f"{'op':<48} {'world':>5} {'n':>10} {'bytes sent/rank':>16} {'ms':>9} {'GB/s/rank':>10}")
    for row in rows:
        print(f"{row['op']:<48} {row['world']:>5} {row['n']:>10} {row['bytes_sent_rank0']:>16} "
              f"{row['time_ms']:>9.2f} {row['GB_s_per_rank']:>10.3f}")
    if args.json:
        from mpi4py import MPI
        import _common
        info = {"machine": platform.machine(), "cpu": _common._cpu_model(), "simd_path": _common.simd_path("cpu"),
                "cpus": os.cpu_count(), "python": platform.python_version(),
                "mpi4py": mpi4py.__version__, "mpi": MPI.Get_library_version().splitlines()[0],
                "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip()}
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


def test_bench_dist_smoke(tmp_path):
    """Runs the benchmark on 2 ranks with a small vector; checks the byte counts it reports."""
    import pytest
    from srkern.testing import find_mpirun
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found beside this Python nor on PATH (pip install mpich)")
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT="120", PYTHONPATH=str(ROOT))
    res = subprocess.run([mpirun, "-n", "2", sys.executable, __file__, "--n", "10000", "--repeat", "2",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["op"]: r for r in data["rows"]}
    assert data["machine"]["simd_path"] and all(r["simd_path"] for r in rows.values())
    # Rank 0 owns 5000 of 10000 elements: it sends the other 5000, 2 bytes each on a BF16 wire.
    assert rows["reduce_scatter bf16 -> bf16 SR"]["bytes_sent_rank0"] == 10000
    assert rows["reduce_scatter fp32 (bf16 SR wire) -> bf16 SR"]["bytes_sent_rank0"] == 10000
    assert rows["reduce_scatter fp32 -> fp32"]["bytes_sent_rank0"] == 20000


if __name__ == "__main__":
    main()
