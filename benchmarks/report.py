"""Turn pytest-benchmark JSON from srkern's benchmarks into a Markdown report and PNG plots.

    python benchmarks/report.py bench-out/cpu.json [more.json ...] --out bench-out/

Writes OUT/report.md (the machine with its CPU model and the SIMD path that ran, the performance
targets of issues 3 and 13 with their measured ratios and pass/miss, and a table per benchmark
group with time, GB/s, the copy roofline measured in the same run and the speed-up against each
baseline), OUT/bandwidth.png (GB/s against size for every kernel and baseline, with the copy
roofline drawn), OUT/adamw_step_time.png (AdamW step time against parameter count per optimizer,
log-log, with the roofline: bytes moved per parameter over the copy bandwidth measured in the
same run) and OUT/optimizer_bytes.png (optimizer bytes per parameter of every AdamW precision
mode).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Kernel names of the records the targets read (bench_adamw's and bench_cast's labels; spelled out
# here because gpu_check's parent process renders this report without importing torch or srkern).
FUSED = "torch AdamW(fused=True) fp32-master + bf16 copy"
FOREACH = "torch AdamW(foreach=True) fp32-master + bf16 copy"
TORCHAO = "torchao AdamW(bf16_stochastic_round=True)"
DEEPSPEED = "DeepSpeedCPUAdam fp32-master + bf16 copy"
BF16_SR = "srkern.adamw_step bf16-sr"
SR_CAST = "srkern.cast bf16 stochastic"
HOST = "srkern.torch.AdamW bf16-sr"


class Target(NamedTuple):
    """A performance target, matched against the records' ``kernel`` and ``device`` fields.

    ``size``/``pick``: which record of the kernel measures it: "exact" (that size only), "smallest"
    (the smallest size >= ``size``: the size the target is stated at) or "largest" (the largest
    size >= ``size``). ``field`` is the record's value (``speedup_vs`` is read at ``base``);
    ``higher`` says whether the value must reach ``goal`` (ratios) or stay under it (costs).
    ``device`` None: one row per device that has a matching record."""
    issue: str
    label: str
    kernel: str
    device: str | None
    size: int
    pick: str
    field: str
    base: str | None
    goal: float
    higher: bool = True
    unit: str = "x"


TARGETS = [
    Target("3, 13", "SR cast to BF16 vs copy bandwidth", SR_CAST, "cpu", 1 << 26, "smallest",
           "fraction_of_copy", None, 0.8),
    Target("3", "SR cast to BF16 vs PyTorch-ops SR recipe", SR_CAST, "cpu", 1 << 26, "smallest",
           "speedup_vs", "torch SR recipe", 10.0),
    Target("3", "SR cast to BF16 vs torch .to(bfloat16)", SR_CAST, "cpu", 1 << 26, "smallest",
           "speedup_vs", "torch .to(bfloat16)", 1.0),
    Target("3", "SR cast to BF16 vs copy bandwidth, GPU", SR_CAST, "cuda", 1 << 28, "largest",
           "fraction_of_copy", None, 0.9),
    Target("3", "bf16-sr AdamW vs copy bandwidth", BF16_SR, "cpu", 1 << 24, "smallest",
           "fraction_of_copy", None, 0.8),
    Target("3", "bf16-sr AdamW vs torch fused mixed precision", BF16_SR, "cpu", 1 << 24, "smallest",
           "speedup_vs", FUSED, 1.5),
    Target("3", "bf16-sr AdamW vs torch foreach mixed precision", BF16_SR, "cpu", 1 << 24, "smallest",
           "speedup_vs", FOREACH, 3.0),
    Target("3", "bf16-sr AdamW vs torchao SR AdamW", BF16_SR, "cpu", 1 << 24, "smallest",
           "speedup_vs", TORCHAO, 2.0),
    Target("3", "bf16-sr AdamW vs copy bandwidth, GPU", BF16_SR, "cuda", 1 << 24, "largest",
           "fraction_of_copy", None, 0.85),
    Target("3", "bf16-sr AdamW vs torch fused, GPU", BF16_SR, "cuda", 1 << 24, "largest",
           "speedup_vs", FUSED, 1.8),
    Target("13", "bf16-sr AdamW vs torch fused mixed precision, out of cache", BF16_SR, "cpu", 1 << 26,
           "exact", "speedup_vs", FUSED, 1.2),
    Target("13", "bf16-sr AdamW vs DeepSpeedCPUAdam (fp32 master + bf16 copy), out of cache", BF16_SR,
           "cpu", 1 << 26, "exact", "speedup_vs", DEEPSPEED, 1.1),
    Target("13", "bf16-sr AdamW vs torch fused mixed precision, in cache (sweep, 1 tensor)",
           f"adamw sweep: {BF16_SR}", "cpu", 1 << 22, "exact", "speedup_vs", FUSED, 0.8),
    Target("13", "srkern.torch.AdamW host cost per tensor, 1,000x4K against 1x4,096,000",
           f"{HOST} [1000x4K]", None, 0, "largest", "host_cost_per_tensor_us", None, 2.0, False, "us"),
    Target("13", "srkern.torch.AdamW host cost per tensor, 150x1K (GPT-2 small list) against 1x153,600",
           f"{HOST} [150x1K]", None, 0, "largest", "host_cost_per_tensor_us", None, 2.0, False, "us"),
    Target("13", "srkern.torch.AdamW fixed cost per step (one tensor of 1K, kernel included)",
           f"{HOST} [1x1K]", None, 0, "largest", "fixed_cost_us", None, 50.0, False, "us"),
    Target("13", "srkern.cast SR to BF16 of 1K elements, per call (allocating, as x.to)",
           f"{SR_CAST} [1K call]", None, 0, "largest", "call_us", None, 5.0, False, "us"),
]


def load(paths: list[Path]) -> tuple[list[dict], dict]:
    records, machine = [], {}
    for p in paths:
        data = json.loads(p.read_text())
        machine = machine or data.get("machine_info", {})
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info", {}))
            if "kernel" not in info:
                continue
            info.setdefault("seconds", b["stats"]["min"])
            info["group"] = b.get("group") or p.stem
            info["name"] = b["name"]
            records.append(info)
    return records, machine


def _fmt_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def machine_line(machine: dict) -> str:
    s = machine.get("srkern", {})
    cpu = s.get("cpu") or machine.get("cpu", {}).get("brand_raw")
    flags = s.get("cpu_simd_flags")
    parts = [f"**{s.get('device_name') or cpu or '?'}**",
             f"CPU {cpu}" if cpu and cpu != s.get("device_name") else "",
             f"SIMD path {s['simd_path']}" if s.get("simd_path") else "",
             f"CPU flags {' '.join(flags)}" if flags else "",
             f"{s.get('cores', '?')} cores" if s.get("cores") else "",
             f"torch {s.get('torch')}" if s.get("torch") else "",
             f"torchao {s.get('torchao')}" if s.get("torchao") else "",
             f"deepspeed {s.get('deepspeed')}" if s.get("deepspeed") else "",
             f"torch-optimi {s.get('optimi')}" if s.get("optimi") else "",
             f"cupy {s.get('cupy')}" if s.get("cupy") else "",
             f"compiler {s.get('cxx')}" if s.get("cxx") else "",
             f"commit {s.get('commit')}" if s.get("commit") else "",
             f"load average at start {', '.join(f'{x:.1f}' for x in s['load_avg_at_start'])}"
             if s.get("load_avg_at_start") else ""]
    return ", ".join(p for p in parts if p)


# Per-call and per-tensor costs some records carry, shown beside their speed-ups.
COSTS = (("host_cost_per_tensor_us", "host cost per tensor"), ("fixed_cost_us", "fixed cost per step"),
         ("call_us", "per call"))


def tables(records: list[dict]) -> str:
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_group[r["group"]].append(r)
    out = []
    for group, rows in by_group.items():
        out.append(f"\n### {group}\n")
        out.append("| kernel | device | size | dtype | time (ms) | GB/s | copy GB/s | of copy | speed-up vs baselines |")
        out.append("|---|---|---|---|---:|---:|---:|---:|---|")
        for r in sorted(rows, key=lambda r: (r["device"], r["size"], r["kernel"])):
            speed = "; ".join(f"{v:.2f}x vs {k}" for k, v in (r.get("speedup_vs") or {}).items() if k != r["kernel"])
            costs = [f"{label} {r[k]:.1f} us" for k, label in COSTS if r.get(k) is not None]
            speed = "; ".join(x for x in (speed, *costs) if x)
            out.append(f"| {r['kernel']} | {r['device']} | {_fmt_size(r['size'])} | {r.get('dtype', '')} | "
                       f"{r['seconds'] * 1e3:.3f} | {r.get('GBps', 0):.1f} | {r.get('copy_GBps', 0):.1f} | "
                       f"{r.get('fraction_of_copy', 0):.2f} | {speed} |")
    return "\n".join(out)


def _pick(target: Target, records: list[dict]) -> list[dict]:
    """The record that measures ``target``, per device (one row each)."""
    out = []
    devices = [target.device] if target.device else sorted({r["device"] for r in records})
    for device in devices:
        cands = [r for r in records if r["kernel"] == target.kernel and r["device"] == device
                 and r["size"] >= target.size and target.field in r]
        if target.pick == "exact":
            cands = [r for r in cands if r["size"] == target.size]
        if cands:
            out.append((min if target.pick == "smallest" else max)(cands, key=lambda r: r["size"]))
    return out


def _value(target: Target, r: dict) -> float | None:
    value = r[target.field] if target.base is None else (r[target.field] or {}).get(target.base)
    return None if value is None else float(value)


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f}x" if unit == "x" else f"{value:.1f} {unit}"


def targets(records: list[dict]) -> str:
    """The targets table: issue, target, measured value, goal, ratio to goal (>= 1 means met, for
    costs too: goal / measured) and pass/miss, one row per target the records measure."""
    out = ["| issue | target | measured | goal | ratio to goal | met |", "|---|---|---:|---:|---:|---|"]
    for t in TARGETS:
        for r in _pick(t, records):
            value = _value(t, r)
            if value is None:
                continue
            where = f"n={_fmt_size(r['size'])}" + (f", {r['device']}" if t.device is None else "")
            goal = f"{'>=' if t.higher else '<='} {_fmt(t.goal, t.unit)}"
            if not t.higher and value <= 0:
                # many tensors stepped faster than one of the same total: the difference is noise,
                # so the run says nothing about the target (neither met nor missed)
                out.append(f"| {t.issue} | {t.label}, {where} | {_fmt(value, t.unit)} | {goal} | n/a | "
                           "no result (below the timing noise: rerun on a quiet machine) |")
                continue
            ratio = value / t.goal if t.higher else t.goal / value
            met = "yes" if ratio >= 1 else f"no (missed by {100 * (1 - ratio):.0f}%)"
            out.append(f"| {t.issue} | {t.label}, {where} | {_fmt(value, t.unit)} | {goal} | "
                       f"{ratio:.2f} | {met} |")
    return "\n".join(out) if len(out) > 2 else "(no record matches a target in this run)"


def _family(r: dict) -> str:
    return "AdamW step" if "adamw" in (r["kernel"] + r["group"]).lower() else "casts"


def plot_bandwidth(records: list[dict], path: Path) -> bool:
    """GB/s against size, one panel per kernel family, the copy roofline dashed in each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[tuple[str, str], dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if not r.get("GBps") or "[" in r["kernel"]:  # multi-tensor entries are not a size series
            continue
        name = r["kernel"].removeprefix("adamw sweep: ")
        key = ("copy roofline" if "copy_" in name else name, r["device"])
        series[_family(r)][key][r["size"]] = max(r["GBps"], series[_family(r)][key].get(r["size"], 0))
    panels = {f: {k: v for k, v in d.items() if len(v) >= 2} for f, d in series.items()}
    panels = {f: d for f, d in panels.items() if d}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (family, data) in zip(axes[0], sorted(panels.items()), strict=True):
        ci = 0
        for (name, device), pts in sorted(data.items()):
            xs = sorted(pts)
            if name == "copy roofline":
                ax.plot(xs, [pts[x] for x in xs], "k--", lw=2, label=f"copy roofline [{device}]")
                continue
            style = "-" if name.startswith("srkern") else ":"
            ax.plot(xs, [pts[x] for x in xs], style, marker="o", ms=3, color=colors[ci % len(colors)],
                    label=f"{name} [{device}]")
            ci += 1
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("parameters" if family == "AdamW step" else "elements")
        ax.set_ylabel("GB/s (bytes read + written)")
        ax.set_title(f"{family}: srkern (solid) and baselines (dotted)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def simd_line(records: list[dict]) -> str:
    """The SIMD paths the records name, with their counts ("avx512 (96 records)")."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[str(r.get("simd_path", "not recorded"))] += 1
    return ", ".join(f"{k} ({v} records)" for k, v in sorted(counts.items()))


def _optimizer(r: dict) -> str | None:
    """The optimizer a record times, for the step-time plot (None: not an AdamW step on a size)."""
    if "adamw" not in r["group"].lower() or "multi-tensor" in r["group"] or "[" in r["kernel"]:
        return None
    if r.get("role") == "roofline" or "copy_" in r["kernel"]:
        return None
    return r["kernel"].removeprefix("adamw sweep: ")


def plot_step_time(records: list[dict], path: Path) -> bool:
    """AdamW step time against parameter count, one line per optimizer (srkern modes solid, the
    peers dotted), log-log, with rooflines: the copy time of bytes moved per parameter (the fewest
    and the most of the plotted optimizers), each point measured in this run as the records' own
    ``copy_seconds``. False when fewer than two sizes were measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    roof: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
    for r in records:
        name = _optimizer(r)
        if name is None or not r.get("seconds"):
            continue
        pts = series[(name, r["device"])]
        pts[r["size"]] = min(r["seconds"], pts.get(r["size"], math.inf))
        if r.get("copy_seconds"):
            per = round(r["bytes_moved"] / r["size"])
            line = roof[(per, r["device"])]
            line[r["size"]] = min(r["copy_seconds"], line.get(r["size"], math.inf))
    sizes = {n for pts in series.values() for n in pts}
    if len(sizes) < 2:
        return False
    fig, ax = plt.subplots(figsize=(9, 6.5))
    palettes = {True: plt.get_cmap("tab10").colors, False: plt.get_cmap("Dark2").colors}
    used = {True: 0, False: 0}
    for (name, device), pts in sorted(series.items()):
        xs = sorted(pts)
        srk = name.startswith("srkern")
        color = palettes[srk][used[srk] % len(palettes[srk])]
        used[srk] += 1
        ax.plot(xs, [pts[x] * 1e3 for x in xs], "-" if srk else ":", marker="o" if srk else "s", ms=4,
                lw=1.6 if srk else 1.4, color=color, label=f"{name} [{device}]")
    for device in sorted({d for _, d in roof}):
        pers = sorted(per for per, d in roof if d == device)
        for per, style in ((pers[0], "k--"), (pers[-1], "k-.")) if len(pers) > 1 else ((pers[0], "k--"),):
            pts = roof[(per, device)]
            xs = sorted(pts)
            if len(xs) >= 2:
                ax.plot(xs, [pts[x] * 1e3 for x in xs], style, lw=1.8,
                        label=f"roofline {per} B/param / copy bandwidth [{device}]")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time (ms)")
    ax.set_title("AdamW step time: srkern modes (solid) and peers (dotted); lower is faster")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_optimizer_bytes(path: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from srkern.adamw import PRECISIONS, bytes_per_param

    rows = []
    for prec in PRECISIONS:
        rows.append((prec, bytes_per_param(prec)))
        if prec.startswith("bf16"):
            rows.append((f"{prec} (FP32 moments)", bytes_per_param(prec, "float32")))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
    for i, (_, b) in enumerate(rows):
        ax.text(b + 0.1, i, f"{b} B", va="center")
    ax.set_xlabel("optimizer + weight bytes per parameter (gradient not included)")
    ax.set_title("Memory per parameter of each AdamW precision mode")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    table = ["| mode | bytes per parameter (weights + optimizer state) |", "|---|---:|"]
    table += [f"| {m} | {b} |" for m, b in rows]
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records, machine = load(args.json)
    if not records:
        print("no srkern benchmark records in the JSON (was it written with --benchmark-json?)", file=sys.stderr)
        return 1
    parts = ["# srkern benchmark report", "", f"Machine: {machine_line(machine)}.", "",
             f"SIMD path of the records: {simd_line(records)}.", "",
             "Times are minima over repeated runs; GB/s counts bytes read plus bytes written; "
             "'of copy' is the kernel's bandwidth over an all-core copy of the same bytes measured "
             "in the same run; speed-ups are baseline time / srkern time (> 1: srkern is faster).",
             "", "## Targets", "", targets(records), "", "## All measurements", tables(records)]
    if plot_bandwidth(records, args.out / "bandwidth.png"):
        parts += ["", "## Bandwidth against size", "", "![bandwidth](bandwidth.png)"]
    if plot_step_time(records, args.out / "adamw_step_time.png"):
        parts += ["", "## AdamW step time against parameter count", "",
                  "Each optimizer's step time; the rooflines are the copy time of the fewest and the "
                  "most bytes per parameter the plotted optimizers move, measured in this run.", "",
                  "![AdamW step time](adamw_step_time.png)"]
    parts += ["", "## Optimizer memory", "", plot_optimizer_bytes(args.out / "optimizer_bytes.png"), "",
              "![optimizer bytes](optimizer_bytes.png)"]
    (args.out / "report.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
