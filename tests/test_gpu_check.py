"""The one-command GPU check (benchmarks/gpu_check.py) in its dry run, and proof that it can fail.

In a dry run gpu-emu is the device: the GPU side of the kernel source (the text NVRTC compiles,
built by g++ with a CUDA shim and run over every (block, thread) of the CUDA grid), fed NumPy
buffers that start 0..3 elements past an aligned address inside guard bytes. The expected side is
the CPU backend. So the parity stage compares the GPU code with the CPU code, and a wrong line that
only the GPU compiles must make it fail: ``test_a_broken_gpu_only_line_is_caught`` breaks one in a
copy of kernels/ and checks that exactly the cases that run that line differ.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="gpu-emu (the dry run's device) needs g++")


def run_check(out: Path, *extra: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU_CHECK), str(out), "--dry-run", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def tail(res: subprocess.CompletedProcess) -> str:
    return res.stdout[-4000:] + res.stderr[-3000:]


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every stage but the pytest suite (which runs in CI on its own)."""
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    return out, run_check(out, "--skip-tests")


def test_dry_run_every_stage_passes(dry_run):
    out, res = dry_run
    assert res.returncode == 0, tail(res)
    stages = load(out, "stages.json")
    assert list(stages) == list(gpu_check.STAGES), stages
    assert all(s["ok"] for s in stages.values()), stages
    assert stages["tests"]["skipped"] == "--skip-tests"
    assert all("seconds" in s and s["budget"] for s in stages.values())
    summary = load(out, "summary.json")
    assert summary["ok"] and not summary["failed_stages"]


def test_dry_run_parity_covers_every_family_fully(dry_run):
    out, res = dry_run
    stages = load(out, "stages.json")
    parity = load(out, "parity.json")
    assert parity["expected"] == "cpu" and parity["device"].startswith("gpu-emu")
    cases = parity["cases"]
    assert {c["family"] for c in cases} == set(gpu_check.FAMILIES)
    assert {c["case"].split()[0] for c in cases} == set(gpu_check.FAMILIES)
    for fam in gpu_check.FAMILIES:
        st = stages[f"parity_{fam}"]
        assert st["ok"] and st["cases"] > 0 and st["not_run"] == 0 and st["failed"] == 0, (fam, st)
    assert all(c["ok"] for c in cases), [c for c in cases if not c["ok"]][:3]
    # every line of parity.jsonl is a case or an event, written as the stage went
    lines = [json.loads(x) for x in (out / "parity.jsonl").read_text().splitlines() if x.strip()]
    assert sum(e["event"] == "case" for e in lines) == len(cases)
    names = [c["case"] for c in cases]
    for fmt in gpu_check.FORMATS:
        for rounding in ("stochastic", "nearest"):
            for sat in (0, 1):
                tag = f"cast fmt={fmt} rounding={rounding} sat={sat} "
                got = [n for n in names if n.startswith(tag)]
                assert {int(n.split(" n=")[1].split()[0]) for n in got} == set(gpu_check.CAST_SIZES)
        assert sum(n.startswith(f"upcast fmt={fmt} ") for n in names) == 3
    # a cast ending in the last Philox block, offsets past 2**32 and 2**35, every lead 0..3
    ends = [n for n in names if n.startswith("cast ") and int(n.split(" n=")[1].split()[0]) > 0
            and int(n.split("offset=")[1].split()[0]) + int(n.split(" n=")[1].split()[0]) == 1 << 64]
    assert ends
    assert {int(n.split(" lead=")[1].split()[0]) for n in names if n.startswith("cast ")} == {0, 1, 2, 3}
    import srkern
    for prec in srkern.PRECISIONS:
        for variant in gpu_check.ADAMW_VARIANTS:
            assert any(n.startswith(f"adamw prec={prec} ") and variant in n for n in names), (prec, variant)
    assert any("start=18446744073709486079" in n for n in names)  # a shard ending at 2**64
    # the grad-norm cases that would show a flush to zero or a lost Inf/NaN
    assert {n.split()[-1] for n in names if n.startswith("grad_norm")} >= {"subnormal-only", "with-inf", "with-nan"}
    # the kernels beyond AdamW: add_ in every acc x x x rounding; SGD (with momentum and Nesterov,
    # and without), Lion and Adafactor in every elementwise mode with BF16 and FP32 gradients
    for acc in ("bfloat16", "float16"):
        for x in ("float32", "bfloat16"):
            for rounding in ("stochastic", "nearest"):
                assert f"optim add_ acc={acc} x={x} rounding={rounding} tensors=6 steps=2" in names
    from srkern.sgd import ELEMENTWISE_PRECISIONS
    for opt in ("sgd", "lion", "adafactor"):
        for prec in ELEMENTWISE_PRECISIONS:
            for gdt in ("bfloat16", "float32"):
                got = [n for n in names if n.startswith(f"optim {opt} prec={prec} grad={gdt} ")]
                assert len(got) == (2 if opt == "sgd" else 1), (opt, prec, gdt, got)
        variants = {v for v in gpu_check.ADAMW_VARIANTS if any(n.startswith(f"optim {opt} ") and v in n for n in names)}
        assert variants == set(gpu_check.ADAMW_VARIANTS[:2 if opt == "adafactor" else 3]), (opt, variants)
    assert sum("momentum=0.9 nesterov" in n for n in names) == sum("state=none momentum=0 " in n for n in names) == 10


def test_dry_run_writes_env_bench_sanitizer_and_report(dry_run):
    out, res = dry_run
    env = load(out, "env.json")
    assert env["expected"] == "cpu" and env["cxx"]["path"] and env["cpu_backend"]["works"]
    assert all(c["ok"] for c in env["compile"].values()) and env["srkern"]["streams"]
    import report
    records, machine = report.load([out / "bench.json"])
    kernels = {r["kernel"] for r in records}
    assert {"srkern.cast bf16 stochastic", "torch .to(bfloat16)", "torch copy_ (roofline)",
            "srkern.adamw_step bf16-sr", "torch AdamW(fused=True) fp32-master + bf16 copy",
            "srkern.grad_norm"} <= kernels, kernels
    assert all(r["seconds"] > 0 and r["copy_GBps"] > 0 for r in records)
    assert any("torch .to(bfloat16)" in (r.get("speedup_vs") or {}) for r in records)
    san = load(out, "sanitizer.json")
    assert san.get("skipped") or (san["payload_ok"] and san["returncode"] == 0)
    text = (out / "report.md").read_text()
    for part in ("# srkern GPU check: PASSED", "## Stages", "## Parity", "## Tests", "## Benchmarks",
                 "| kernel |", "## Sanitizer"):
        assert part in text, part


# A line that only the GPU runs, the text it becomes, and the family whose cases must differ.
# With one shared body per kernel (the CPU variants live in kernels/cpu/), what only the GPU runs
# is its dispatch and the aligned vector accesses no CPU path makes: (file, anchor, line, broken,
# family), the line being the first after the anchor.
BREAKS = {
    # adamw.cu, the GPU's dispatch: skip the partial blocks at tensor ends (lane-by-lane path).
    "adamw-partial-blocks": ("adamw.cu", "#ifdef SRK_GPU", "else adamw_block<MODE, P, G, S, false>(h, row, q);",
                             "else {}", "adamw"),
    # srk_vec.h, the aligned 8-byte store (4 x FP16 of a cast; no CPU path stores 8 bytes
    # through it): flip the lowest bit of the first element.
    "cast-store-8-bytes": ("srk_vec.h", "SRK_HD void srk_store(", "*(SrkPacked<T, N>*)p = x;",
                           "SrkPacked<T, N> b = x; if (sizeof(b) == 8) *(unsigned char*)&b ^= 1; *(SrkPacked<T, N>*)p = b;",
                           "cast"),
    # srk_opt1.h, the GPU's dispatch of SGD and Lion: skip each tensor's first (tensor, block) pair.
    "opt1-first-pair": ("srk_opt1.h", "#ifdef SRK_GPU", "srk_opt1_pair<OPT>(h, row, row.off / 8 + (u64)(b - row.b0));",
                        "if (b > row.b0) srk_opt1_pair<OPT>(h, row, row.off / 8 + (u64)(b - row.b0));", "optim"),
}


def broken_kernels(tmp_path: Path, src: str, anchor: str, line: str, broken: str) -> Path:
    """A copy of kernels/ with ``line`` (the first after ``anchor`` in ``src``) replaced by ``broken``."""
    kdir = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", kdir)
    text = (kdir / src).read_text()
    start = text.find(anchor)
    at = text.find(line, start)
    assert start >= 0 and at >= 0, f"the GPU-only line to break in {src} moved: update the test"
    (kdir / src).write_text(text[:at] + broken + text[at + len(line):])
    return kdir


@pytest.mark.parametrize("which", list(BREAKS))
def test_a_broken_gpu_only_line_is_caught(tmp_path, which):
    src, anchor, line, broken, family = BREAKS[which]
    kdir = broken_kernels(tmp_path, src, anchor, line, broken)
    out = tmp_path / "out"
    res = run_check(out, "--stages", f"parity_{family}", "--kernel-dir", str(kdir))
    assert res.returncode == 1, tail(res)
    stages = load(out, "stages.json")
    assert stages["env"]["ok"], stages
    assert not stages[f"parity_{family}"]["ok"] and stages[f"parity_{family}"]["not_run"] == 0, stages
    cases = load(out, "parity.json")["cases"]
    assert {c["family"] for c in cases} == {family}
    bad = [c for c in cases if not c["ok"]]
    assert bad and all("error" not in c and c["mismatches"] > 0 for c in bad), bad[:3]
    if which == "opt1-first-pair":
        # every SGD and Lion case (each has tensors), no add_ or Adafactor case
        assert {c["case"] for c in bad} == {c["case"] for c in cases if c["case"].split()[1] in ("sgd", "lion")}
    elif which == "adamw-partial-blocks":
        # every case has tensors whose sizes or offsets leave partial blocks, except the one
        # whose found_inf flag makes the launch write nothing
        assert {c["case"] for c in cases if c["ok"]} == {c["case"] for c in cases if "found_inf=1.0" in c["case"]}
    else:
        # FP16 casts (4 x 2 bytes per aligned store); BF16 and FP8 use the 16- and 4-byte stores
        assert {c["case"].split()[1] for c in bad} == {"fmt=float16"}
        assert all(c["ok"] for c in cases if "fmt=float16" not in c["case"])
        assert any(c["case"].split()[1] == "fmt=float16" and c["ok"] for c in cases)  # n < 4 or misaligned


def test_a_hanging_case_is_stopped_and_the_next_family_still_runs(tmp_path):
    # The aligned 16-byte store of 2-byte elements (the GPU cast path's BF16 output) spins forever:
    # the first BF16 case hangs. The upcasts' 16-byte stores of floats are left working.
    kdir = broken_kernels(tmp_path, "srk_vec.h", "SRK_HD void srk_store(", "*(SrkPacked<T, N>*)p = x;",
                          "if (sizeof(x) == 16 && sizeof(T) == 2) { volatile int spin = 1; while (spin) {} } "
                          "*(SrkPacked<T, N>*)p = x;")
    out = tmp_path / "out"
    res = run_check(out, "--stages", "parity_cast,parity_upcast", "--budget", "parity_cast=2",
                    "--kernel-dir", str(kdir), timeout=300)
    assert res.returncode == 1, tail(res)
    stages = load(out, "stages.json")
    cast, upcast = stages["parity_cast"], stages["parity_upcast"]
    assert not cast["ok"] and "running: cast fmt=bfloat16" in cast["error"] and cast["seconds"] < 30, cast
    assert upcast["ok"] and upcast["cases"] > 0, upcast  # a fresh child ran the next family
    cases = load(out, "parity.json")["cases"]
    assert cast["cases"] == sum(c["family"] == "cast" for c in cases)
    assert "parity_cast" in (out / "report.md").read_text()


def test_torch_tensors_as_device_buffers(tmp_path):
    # The real run's data path (torch views with storage offsets, bit-exact reads of BF16 and FP8,
    # torch results) with torch CPU tensors in place of CUDA ones, against the CPU backend.
    out = tmp_path / "out"
    res = run_check(out, "--stages", "parity", "--torch-tensors")
    assert res.returncode == 0, tail(res)
    parity = load(out, "parity.json")
    assert "torch CPU tensors" in parity["device"]
    assert {c["family"] for c in parity["cases"]} == set(gpu_check.FAMILIES)
    assert all(c["ok"] for c in parity["cases"])


def test_a_spent_budget_fails_the_stage_and_keeps_what_ran(tmp_path):
    out = tmp_path / "out"
    res = run_check(out, "--stages", "parity_cast", "--budget", "parity_cast=2")
    assert res.returncode == 1, tail(res)
    st = load(out, "stages.json")["parity_cast"]
    assert not st["ok"] and st["not_run"] > 0 and "budget" in st["error"], st
    cases = load(out, "parity.json")["cases"]
    assert 0 < len(cases) == st["cases"] and all(c["ok"] for c in cases)
    assert "parity_cast" in (out / "report.md").read_text()


def test_compare_reports_first_differing_bits():
    # The harness must be able to fail: one flipped bit is found and reported with its index.
    a = np.arange(10, dtype=np.uint16)
    b = a.copy()
    b[7] ^= 1
    rec = gpu_check.compare("case", a, b)
    assert not rec["ok"] and rec["mismatches"] == 1
    assert rec["first"][0] == {"index": 7, "cpu": "0x7", "device": "0x6"}


def test_compare_nan_modes():
    a = np.array([0x7FC00000, 0xFFC00000, 0x3F800000], dtype=np.uint32).view(np.float32)
    b = np.array([0x7FA00001, 0x7FC00000, 0x3F800000], dtype=np.uint32).view(np.float32)
    assert gpu_check.compare("c", a, b)["mismatches"] == 2
    assert gpu_check.compare("c", a, b, nan="sign")["mismatches"] == 1  # the sign of index 1 differs
    assert gpu_check.compare("c", a, b, nan="any")["ok"]
    assert not gpu_check.compare("c", a, b[:2])["ok"]


@pytest.mark.parametrize("n", [0, 1, 64])
def test_inputs_cover_specials(n):
    x = gpu_check.test_inputs(n, np.random.default_rng(0))
    assert x.dtype == np.float32 and x.size == n
    if n >= 64:
        assert np.isnan(x).any() and np.isinf(x).any() and (x == 0).any()
        u = x.view(np.uint32)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        assert (nan & (u >> 31 == 1)).any() and (nan & (u >> 31 == 0)).any()  # NaN payloads of both signs
        assert (((u & 0x7F800000) == 0) & ((u & 0x7FFFFF) != 0)).any()  # FP32 subnormals
