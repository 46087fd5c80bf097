"""One table and one plot over every `benchmarks/precision_cpu.py` run (issue 4's "Measured" section).

Reads <root>/<preset>/summary.json and <root>/<preset>/bench/results.json as precision_cpu.py
wrote them; writes <root>/summary.json, summary.md and summary.png. Measures nothing itself.

    python benchmarks/precision_summary.py --root benchmarks/results/precision
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = ["pytorch-fp32", "onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int8-fallback"]
EXPORT_NAME = {"onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8", "onnx-int8-fallback": "int8-fallback"}


def rows_for(run: Path) -> list[dict]:
    s = json.loads((run / "summary.json").read_text())
    bench = json.loads((run / "bench" / "results.json").read_text())
    ds = bench["dataset"]
    rows = []
    for name in VARIANTS:
        var = bench["variants"].get(name)
        if var is None:
            continue
        fid = var.get("fidelity") or {}
        exp = EXPORT_NAME.get(name)
        ev = s["export_verification"].get(exp, {}) if exp else {}
        rows.append({
            "preset": s["model"],
            "variant": name,
            "p50_ms": {b: x["per_image_ms"]["p50"] for b, x in var["latency"].items()},
            "speedup": bench["ratios"][name].get("speedup_p50", {}) if bench.get("ratios") else {},
            "cos_mean": fid.get("cos_mean"),
            "cos_min": fid.get("cos_min"),
            "top1_agreement": fid.get("top1_agreement"),
            "top5_agreement": fid.get("top5_agreement"),
            "R@1": var["accuracy"].get("R@1"),
            "size_mib": s["artifact_mib"].get(exp) if exp else None,
            "export_gate_passed": ev.get("passed"),
            "fallback_blocks": ev.get("fallback_blocks"),
            "bench_images": f"{ds['queries']} queries vs {ds['database']} database",
            "ref_top1_margin_p50": fid.get("ref_top1_margin_p50"),
            "ref_score_spread_p50": fid.get("ref_score_spread_p50"),
            "threads": s["threads"],
        })
    return rows


def _f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(rows: list[dict], root: Path) -> str:
    lines = [
        "# Precision on CPU: every preset measured",
        "",
        f"Collected by `python benchmarks/precision_summary.py --root {root}` from each preset's run; the command",
        "of each run is in `<preset>/commands.txt`. Random weights, Corridor; PyTorch and ONNX Runtime on the same",
        "threads. Fidelity columns are the bench's (against PyTorch FP32 on the bench images); `gate` is the",
        "export's own verification against its thresholds. `ref margin / spread`: medians over the bench queries of",
        "PyTorch's top-1 minus top-2 score and best minus worst database score (how decidable the ranking is).",
        "",
        "| preset | variant | p50 ms b1 | vs PyTorch b1 / b8 | cos mean / min | top-1 / top-5 agr | R@1 | size MiB | gate | bench images | ref margin / spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r["speedup"]
        speed = " / ".join(f"{sp[b]:.2f}x" for b in ("1", "8") if b in sp) or "-"
        gate = {True: "passed", False: "failed", None: "-"}[r["export_gate_passed"]]
        if r["fallback_blocks"]:
            gate += f" (blocks {r['fallback_blocks']} FP32)"
        lines.append(
            f"| {r['preset']} | {r['variant']} | {_f(r['p50_ms'].get('1'), 1)} | {speed} | "
            f"{_f(r['cos_mean'], 4)} / {_f(r['cos_min'], 3)} | {_f(r['top1_agreement'], 3)} / {_f(r['top5_agreement'], 2)} | "
            f"{_f(r['R@1'], 3)} | {_f(r['size_mib'], 1)} | {gate} | {r['bench_images']} | "
            f"{_f(r['ref_top1_margin_p50'], 4)} / {_f(r['ref_score_spread_p50'], 3)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    variants = [v for v in VARIANTS[1:] if any(r["variant"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(presets), 4))
    width = 0.8 / max(len(variants), 1)
    for j, v in enumerate(variants):
        for i, p in enumerate(presets):
            r = next((r for r in rows if r["preset"] == p and r["variant"] == v), None)
            if r is None or "1" not in r["speedup"]:
                continue
            x = i + (j - (len(variants) - 1) / 2) * width
            ax.bar(x, r["speedup"]["1"], width, color=f"C{j}", label=v if i == 0 else None)
            if r["top1_agreement"] is not None:
                ax.text(x, r["speedup"]["1"] + 0.03, f"{r['top1_agreement']:.2f}", ha="center", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(2.5, color="r", lw=0.8, ls="--", label="INT8 target 2.5x")
    ax.set_xticks(range(len(presets)), presets, fontsize=8)
    ax.set_ylabel("speed-up vs PyTorch FP32, batch 1")
    ax.set_title("ONNX Runtime on CPU (label: top-1 agreement with PyTorch)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("benchmarks/results/precision"))
    args = ap.parse_args()
    runs = sorted(p.parent for p in args.root.glob("*/summary.json") if (p.parent / "bench" / "results.json").exists())
    if not runs:
        raise SystemExit(f"{args.root}: no precision_cpu.py runs found; run benchmarks/precision_cpu.py first")
    rows = [r for run in runs for r in rows_for(run)]
    (args.root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.root / "summary.md").write_text(markdown(rows, args.root))
    plot(rows, args.root / "summary.png")
    print(markdown(rows, args.root))


if __name__ == "__main__":
    main()
