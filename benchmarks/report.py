"""Turn pytest-benchmark JSON from srkern's benchmarks into a Markdown report and PNG plots.

    python benchmarks/report.py bench-out/cpu.json [more.json ...] --out bench-out/

Writes OUT/report.md (the machine, a table per benchmark group with time, GB/s, the copy roofline
measured in the same run and the speed-up against each baseline, and the performance targets
with their measured ratios), OUT/bandwidth.png (GB/s against size for every kernel and baseline,
with the copy roofline drawn) and OUT/optimizer_bytes.png (optimizer bytes per parameter of every
AdamW precision mode).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Performance targets, matched against the `kernel` field of the records (CPU numbers).
# (label, kernel, device, minimum size, field, compare-to baseline or None, target ratio)
TARGETS = [
    ("SR cast to BF16 vs copy bandwidth", "srkern.cast bf16 stochastic", "cpu", 1 << 26,
     "fraction_of_copy", None, 0.8),
    ("SR cast to BF16 vs PyTorch-ops SR recipe", "srkern.cast bf16 stochastic", "cpu", 1 << 26,
     "speedup_vs", "torch SR recipe", 10.0),
    ("SR cast to BF16 vs torch .to(bfloat16)", "srkern.cast bf16 stochastic", "cpu", 1 << 26,
     "speedup_vs", "torch .to(bfloat16)", 1.0),
    ("SR cast to BF16 vs copy bandwidth, GPU", "srkern.cast bf16 stochastic", "cuda", 1 << 28,
     "fraction_of_copy", None, 0.9),
    ("bf16-sr AdamW vs copy bandwidth", "srkern.adamw_step bf16-sr", "cpu", 1 << 24,
     "fraction_of_copy", None, 0.8),
    ("bf16-sr AdamW vs torch fused mixed precision", "srkern.adamw_step bf16-sr", "cpu", 1 << 24,
     "speedup_vs", "torch AdamW(fused=True) fp32-master + bf16 copy", 1.5),
    ("bf16-sr AdamW vs torch foreach mixed precision", "srkern.adamw_step bf16-sr", "cpu", 1 << 24,
     "speedup_vs", "torch AdamW(foreach=True) fp32-master + bf16 copy", 3.0),
    ("bf16-sr AdamW vs torchao SR AdamW", "srkern.adamw_step bf16-sr", "cpu", 1 << 24,
     "speedup_vs", "torchao AdamW(bf16_stochastic_round=True)", 2.0),
    ("bf16-sr AdamW vs copy bandwidth, GPU", "srkern.adamw_step bf16-sr", "cuda", 1 << 24,
     "fraction_of_copy", None, 0.85),
    ("bf16-sr AdamW vs torch fused, GPU", "srkern.adamw_step bf16-sr", "cuda", 1 << 24,
     "speedup_vs", "torch AdamW(fused=True) fp32-master + bf16 copy", 1.8),
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
    parts = [f"**{s.get('device_name') or machine.get('cpu', {}).get('brand_raw', '?')}**",
             f"{s.get('cores', '?')} cores" if s.get("cores") else "",
             f"torch {s.get('torch')}" if s.get("torch") else "",
             f"torchao {s.get('torchao')}" if s.get("torchao") else "",
             f"cupy {s.get('cupy')}" if s.get("cupy") else "",
             f"compiler {s.get('cxx')}" if s.get("cxx") else "",
             f"commit {s.get('commit')}" if s.get("commit") else "",
             f"load average at start {', '.join(f'{x:.1f}' for x in s['load_avg_at_start'])}"
             if s.get("load_avg_at_start") else ""]
    return ", ".join(p for p in parts if p)


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
            out.append(f"| {r['kernel']} | {r['device']} | {_fmt_size(r['size'])} | {r.get('dtype', '')} | "
                       f"{r['seconds'] * 1e3:.3f} | {r.get('GBps', 0):.1f} | {r.get('copy_GBps', 0):.1f} | "
                       f"{r.get('fraction_of_copy', 0):.2f} | {speed} |")
    return "\n".join(out)


def targets(records: list[dict]) -> str:
    out = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for label, kernel, device, min_size, field, base, goal in TARGETS:
        cands = [r for r in records if r["kernel"] == kernel and r["device"] == device
                 and r["size"] >= min_size and field in r]
        if not cands:
            continue
        r = max(cands, key=lambda r: r["size"])
        value = r[field] if base is None else (r[field] or {}).get(base)
        if value is None:
            continue
        met = "yes" if value >= goal else f"no (missed by {100 * (1 - value / goal):.0f}%)"
        out.append(f"| {label}, n={_fmt_size(r['size'])} | {value:.2f}x | {goal:.2f}x | {met} |")
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
             "Times are minima over repeated runs; GB/s counts bytes read plus bytes written; "
             "'of copy' is the kernel's bandwidth over an all-core copy of the same bytes measured "
             "in the same run; speed-ups are baseline time / srkern time (> 1: srkern is faster).",
             "", "## Targets", "", targets(records), "", "## All measurements", tables(records)]
    if plot_bandwidth(records, args.out / "bandwidth.png"):
        parts += ["", "## Bandwidth against size", "", "![bandwidth](bandwidth.png)"]
    parts += ["", "## Optimizer memory", "", plot_optimizer_bytes(args.out / "optimizer_bytes.png"), "",
              "![optimizer bytes](optimizer_bytes.png)"]
    (args.out / "report.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
