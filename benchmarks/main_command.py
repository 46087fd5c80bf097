"""The card's main command, measured: `vpr-export --model anyloc-dinov2 --precision fp16` exactly as
README's "Set up" runs it (random weights, 16 Corridor verify images), into a temporary folder.

Wall time and peak RSS of the whole process tree (the CLI and its PyTorch worker, sampled every
50 ms, as benchmarks/export_anyloc.py), per-step time and peak RSS from the artifact's manifest,
the FP16 verification report and the artifact size.

    python benchmarks/main_command.py --output benchmarks/results/main_command

writes <output>.json, <output>.md and <output>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_anyloc import CORRIDOR, REPO, run_measured  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "main_command")
    ap.add_argument("--verify-limit", type=int, default=16)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vpr-main-"))
    out = work / "anyloc-dinov2-fp16"
    argv = ["--model", "anyloc-dinov2", "--precision", "fp16", "--weights", "random", "--verify", str(CORRIDOR),
            "--verify-limit", str(args.verify_limit), "--output", str(out)]
    r = run_measured([sys.executable, "-m", "vpr_edge.cli.main", "export", *argv])
    m = json.loads((out / "manifest.json").read_text())
    fp16 = m["verification"]["fp16"]
    results = {
        "command": "vpr-export " + " ".join(argv),
        "benchmark_command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ram_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "wall_s": r["wall_s"],
        "peak_rss_gib": r["peak_rss_gib"],
        "artifact_mib": round(sum(f["bytes"] for f in m["files"].values()) / 2**20, 1),
        "step_times_s": m["details"]["timings_s"],
        "step_peak_rss_gib": m["details"]["peak_rss_gib"],
        "lowering_times_s": m["details"].get("lowering_timings_s", {}),
        "lowering_peak_rss_gib": m["details"].get("lowering_peak_rss_gib", {}),
        "fp16_overflow_tensors": len(m["details"].get("fp16_overflow", {})),
        "fp16_passed": fp16["passed"],
        "fp16_report": {k: fp16["report"][k] for k in ("cos_mean", "cos_min", "top1_agreement", "top5_agreement",
                                                       "nonfinite") if k in fp16["report"]},
        "versions": m["versions"],
    }
    shutil.rmtree(work)
    write(results, args.output)
    print(json.dumps(results, indent=1))


def write(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    rep = results["fp16_report"]
    lines = [
        "# The main command: anyloc-dinov2 (ViT-G/14) to a verified FP16 graph",
        "",
        f"Command: `{results['command']}`  ",
        f"Measured by: `python {results['benchmark_command']}`  ",
        f"Machine: {results['machine']['cores']} cores, {results['machine']['ram_gib']} GiB.",
        "",
        f"Wall {results['wall_s']} s, peak RSS {results['peak_rss_gib']} GiB (process tree), artifact "
        f"{results['artifact_mib']} MiB. FP16 gate {'passed' if results['fp16_passed'] else 'FAILED'}: cos mean "
        f"{rep['cos_mean']:.5f} / min {rep['cos_min']:.4f}, top-1 {rep['top1_agreement']:.2f}, top-5 "
        f"{rep['top5_agreement']:.2f}, non-finite {rep.get('nonfinite', 0)}.",
        "",
        "| step | time (s) | peak RSS (GiB) |",
        "|---|---|---|",
    ]
    for step, t in results["step_times_s"].items():
        lines.append(f"| {step} | {t} | {results['step_peak_rss_gib'].get(step, '-')} |")
    if results.get("lowering_times_s"):
        lines += ["", "Inside \"lowering to fp16 + verifying\" (`details.lowering_timings_s` of the manifest):", "",
                  "| sub-step | time (s) | peak RSS (GiB) |", "|---|---|---|"]
        for step, t in results["lowering_times_s"].items():
            lines.append(f"| {step} | {t} | {results['lowering_peak_rss_gib'].get(step, '-')} |")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    steps = list(results["step_times_s"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].barh(steps, [results["step_times_s"][s] for s in steps])
    ax[0].set_xlabel("s")
    ax[0].invert_yaxis()
    ax[1].barh(steps, [results["step_peak_rss_gib"].get(s, 0) for s in steps], color="tab:orange")
    ax[1].set_xlabel("peak RSS, GiB")
    ax[1].set_yticks([])
    ax[1].invert_yaxis()
    fig.suptitle("vpr-export --model anyloc-dinov2 --precision fp16 (CPU)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
