"""One-command GPU verification: tests, GPU-vs-CPU bit parity for every kernel, benchmarks, report.

Run from the source tree on a CUDA machine that already has CuPy, PyTorch and pytest (no network,
nothing installed):

    python benchmarks/gpu_check.py OUT_DIR            # the real check, about 3-4 minutes on an H200
    python benchmarks/gpu_check.py OUT_DIR --dry-run  # everything but the GPU: "device" = CPU copies

It writes OUT_DIR/parity.json (every case, pass/fail and the first differing bits), the pytest
log, the benchmark JSON, and OUT_DIR/report.md with PNG plots (benchmarks/report.py). Exit status
is non-zero if any parity case differs by one bit, a test fails, or a stage fails to run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import srkern  # noqa: E402
from srkern import _backend  # noqa: E402
from srkern._tensor import NP_DTYPES, as_view  # noqa: E402

FORMATS = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
SIZES = (0, 1, 7, 8, 9, 1023, 4099, (1 << 20) + 3)


class Device:
    """Moves NumPy arrays to the checked device and back (CuPy on CUDA; plain copies in a dry run)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        if not dry_run:
            import cupy
            self.cupy = cupy
            self.name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        else:
            self.name = "cpu (dry run)"

    def put(self, a: np.ndarray) -> Any:
        return a.copy() if self.dry_run else self.cupy.asarray(a)

    def get(self, a: Any) -> np.ndarray:
        if self.dry_run:
            return np.asarray(a)
        self.cupy.cuda.get_current_stream().synchronize()
        return self.cupy.asnumpy(a)


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]).reshape(-1)


def compare(name: str, cpu: np.ndarray, dev: np.ndarray) -> dict:
    cb, db = bits(cpu), bits(dev)
    if cb.shape != db.shape:
        return {"case": name, "ok": False, "error": f"shapes {cb.shape} vs {db.shape}"}
    bad = np.nonzero(cb != db)[0]
    rec = {"case": name, "ok": bad.size == 0, "n": int(cb.size), "mismatches": int(bad.size)}
    if bad.size:
        rec["first"] = [{"index": int(i), "cpu": hex(int(cb[i])), "device": hex(int(db[i]))} for i in bad[:5]]
    return rec


def test_inputs(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random values over many binades plus every special, float32."""
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-40, 40, n))).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, -3.4028235e38,
                         1e-45, -1e-45, 1.1754944e-38, 65504.0, 65520.0, 448.0, 464.0, 480.0,
                         57344.0, 61440.0, 6e-8, 2.0 ** -9, 2.0 ** -16], dtype=np.float32)
    k = min(n, specials.size)
    x[:k] = specials[:k]
    # NaN with a payload: the kernels keep sign and quiet the NaN; both backends must agree.
    if n > k:
        x[k] = np.uint32(0x7FA00001).view(np.float32)
    return x


def cast_cases(dev: Device, rng: np.random.Generator) -> list[dict]:
    out = []
    for fmt in FORMATS:
        for rounding in ("stochastic", "nearest"):
            for sat in (False, True):
                for n in SIZES:
                    for offset, lead in ((0, 0), (5, 1), ((1 << 32) - 3, 3)):
                        x = test_inputs(n + lead, rng)
                        kw = dict(rounding=rounding, seed=0x1234_5678_9ABC_DEF0, offset=offset,
                                  step=11, stream=2, saturate=sat)
                        cpu = srkern.cast(x[lead:], fmt, **kw)          # unaligned when lead > 0
                        got = dev.get(srkern.cast(dev.put(x)[lead:], fmt, **kw))
                        out.append(compare(f"cast fmt={fmt} rounding={rounding} sat={sat} n={n} "
                                           f"offset={offset} lead={lead}", cpu, got))
        # exact upcasts over every bit pattern of the format
        width = NP_DTYPES[fmt].itemsize
        pats = np.arange(1 << (8 * width), dtype=np.uint16 if width == 2 else np.uint8).view(NP_DTYPES[fmt])
        out.append(compare(f"upcast fmt={fmt} all patterns", srkern.cast(pats, "float32"),
                           dev.get(srkern.cast(dev.put(pats), "float32"))))
    return out


def adamw_cases(dev: Device, rng: np.random.Generator) -> list[dict]:
    out = []
    sizes = [1, 7, 8, 1023, 4099, 65537]
    configs = []
    for prec in ("bf16-sr", "bf16-nearest", "bf16-kahan"):
        for gdt in ("bfloat16", "float32"):
            for sdt in ("bfloat16", "float32"):
                configs.append((prec, gdt, sdt))
    for prec in ("fp32-master", "fp32"):
        for gdt in ("bfloat16", "float32"):
            configs.append((prec, gdt, "float32"))
    for prec, gdt, sdt in configs:
        pdt = "float32" if prec == "fp32" else "bfloat16"
        host = {
            "params": [rng.standard_normal(s).astype(np.float32).astype(NP_DTYPES[pdt]) for s in sizes],
            "exp_avgs": [np.zeros(s, NP_DTYPES[sdt]) for s in sizes],
            "exp_avg_sqs": [np.zeros(s, NP_DTYPES[sdt]) for s in sizes],
        }
        if prec == "fp32-master":
            host["master_params"] = [p.astype(np.float32) for p in host["params"]]
        if prec == "bf16-kahan":
            host["compensation"] = [np.zeros(s, NP_DTYPES["bfloat16"]) for s in sizes]
        devs = {k: [dev.put(a) for a in v] for k, v in host.items()}
        for step in (1, 2, 3):
            grads = [(rng.standard_normal(s) * 1e-2).astype(np.float32).astype(NP_DTYPES[gdt]) for s in sizes]
            kw = dict(step=step, lr=1e-3 * step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                      precision=prec, grad_scale=0.5, seed=42)
            extra = {k: host[k] for k in ("master_params", "compensation") if k in host}
            srkern.adamw_step(host["params"], grads, host["exp_avgs"], host["exp_avg_sqs"], **kw, **extra)
            dextra = {k: devs[k] for k in ("master_params", "compensation") if k in devs}
            srkern.adamw_step(devs["params"], [dev.put(g) for g in grads], devs["exp_avgs"],
                              devs["exp_avg_sqs"], **kw, **dextra)
        for key in host:
            for i, (h, d) in enumerate(zip(host[key], devs[key])):
                out.append(compare(f"adamw prec={prec} grad={gdt} state={sdt} {key}[{i}] n={h.size} 3 steps",
                                   h, dev.get(d)))
        g = [(rng.standard_normal(s)).astype(np.float32).astype(NP_DTYPES[gdt]) for s in sizes]
        a, b = srkern.grad_norm(g, grad_scale=0.25), srkern.grad_norm([dev.put(x) for x in g], grad_scale=0.25)
        out.append(compare(f"grad_norm grad={gdt}", np.array([a.norm]), np.array([b.norm])))
    return out


def dist_cases(dev: Device, rng: np.random.Generator) -> list[dict]:
    """The local reduce-and-round kernels of the reduce-scatter, launched directly (no MPI)."""
    out = []
    for wire, wdt in (("f32", "float32"), ("bf16", "bfloat16")):
        for variant in ("bf16_sr", "bf16_rn", "f32"):
            for world, m, start in ((1, 1023, 0), (3, 4099, 8 * 1000 + 3), (4, 7, 5)):
                chunks = rng.standard_normal(world * m).astype(np.float32).astype(NP_DTYPES[wdt])
                odt = "float32" if variant == "f32" else "bfloat16"
                results = []
                for side in ("cpu", "dev"):
                    c = chunks if side == "cpu" else dev.put(chunks)
                    o = np.zeros(m, NP_DTYPES[odt]) if side == "cpu" else dev.put(np.zeros(m, NP_DTYPES[odt]))
                    cv, ov = as_view(c), as_view(o)
                    args = [("p", cv.ptr), ("q", m), ("i", world), ("f", float(world)), ("p", ov.ptr), ("q", m)]
                    if variant != "f32":
                        args += [("Q", start), ("Q", 7), ("Q", 3), ("I", 5)]
                    _backend.launch("dist", f"dist_reduce_{wire}_{variant}", args, device=cv.device,
                                    device_id=cv.device_id, units=-(-m // 8) + 2,
                                    stream=0)
                    results.append(o if side == "cpu" else dev.get(o))
                out.append(compare(f"dist_reduce wire={wire} out={variant} world={world} m={m} start={start}",
                                   *results))
    return out


def run_stage(name: str, fn: Callable[[], Any], log: dict) -> Any:
    t0 = time.perf_counter()
    try:
        res = fn()
        log[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        return res
    except Exception as e:  # a stage that cannot run is a failure, reported, not a crash
        log[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1), "error": repr(e)}
        print(f"[gpu_check] stage {name} failed: {e!r}", flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", type=Path, help="folder for parity.json, logs, benchmark JSON and report.md")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run every stage with CPU copies as the device")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest stage")
    ap.add_argument("--skip-bench", action="store_true", help="skip the benchmark stage")
    ap.add_argument("--test-timeout", type=int, default=120, help="seconds for the pytest stage")
    ap.add_argument("--bench-timeout", type=int, default=180, help="seconds for the benchmark stage")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stages: dict = {}
    failed = False
    dev = Device(args.dry_run)
    print(f"[gpu_check] device: {dev.name}", flush=True)
    rng = np.random.default_rng(2025)

    parity: list[dict] = []
    for name, fn in (("parity_cast", cast_cases), ("parity_adamw", adamw_cases), ("parity_dist", dist_cases)):
        res = run_stage(name, lambda fn=fn: fn(dev, rng), stages)
        failed |= res is None
        if res:
            bad = [r for r in res if not r["ok"]]
            print(f"[gpu_check] {name}: {len(res) - len(bad)}/{len(res)} cases bit-identical", flush=True)
            for r in bad[:10]:
                print(f"[gpu_check]   MISMATCH {r['case']}: {r.get('first', r.get('error'))}", flush=True)
            failed |= bool(bad)
            parity += res
    (args.out / "parity.json").write_text(json.dumps({"device": dev.name, "cases": parity}, indent=1))

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not args.skip_tests:
        def tests() -> None:
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", str(ROOT / "tests"), "-m", "not slow",
                   "-p", "no:cacheprovider"]
            with open(args.out / "pytest.log", "w") as f:
                res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                     timeout=args.test_timeout)
            tail = (args.out / "pytest.log").read_text().strip().splitlines()[-1:]
            print(f"[gpu_check] pytest: {tail}", flush=True)
            if res.returncode != 0:
                raise RuntimeError(f"pytest exited {res.returncode}: {tail}")
        run_stage("tests", tests, stages)
        failed |= not stages["tests"]["ok"]

    if not args.skip_bench:
        def bench() -> None:
            device = "cpu" if args.dry_run else "cuda"
            cmd = [sys.executable, "-m", "pytest", "-q", str(ROOT / "benchmarks"), "-p", "no:cacheprovider",
                   f"--device={device}", f"--size={'2**20' if args.dry_run else '2**28'}",
                   f"--adamw-size={'2**20' if args.dry_run else '2**26'}",
                   f"--sweep-sizes={'2**10,2**16' if args.dry_run else '2**10,2**14,2**18,2**22,2**26,2**28'}",
                   f"--benchmark-json={args.out / 'bench.json'}"]
            with open(args.out / "bench.log", "w") as f:
                res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                     timeout=args.bench_timeout)
            if res.returncode != 0:
                tail = (args.out / "bench.log").read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"benchmarks exited {res.returncode}: {tail}")
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(args.out / "bench.json"),
                            "--out", str(args.out)], cwd=ROOT, env=env, check=True, timeout=60)
        run_stage("bench", bench, stages)
        failed |= not stages["bench"]["ok"]

    (args.out / "stages.json").write_text(json.dumps(stages, indent=1))
    print(f"[gpu_check] stages: {json.dumps(stages)}", flush=True)
    print(f"[gpu_check] {'FAILED' if failed else 'OK'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
