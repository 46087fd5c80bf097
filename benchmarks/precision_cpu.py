"""FP32 / FP16 / INT8 ONNX Runtime vs PyTorch FP32 eager on this CPU, in one bench run (issue 4).

For each preset: `vpr-export` at fp32, fp16 and int8 (INT8 calibrated on Corridor's database,
verified on Corridor; `--accept-fidelity` so an artifact outside the thresholds is still measured —
its manifest says so), then one `vpr-edge bench` over the three artifacts plus the PyTorch
reference, which writes JSON + Markdown + PNG with ratios against PyTorch FP32. The exact commands
are written to <output>/commands.txt and into the summary.

    python benchmarks/precision_cpu.py --model anyloc-dinov2-vits14 --output benchmarks/results/precision/anyloc-dinov2-vits14
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"


def run(cmd: list[str], log: list[str]) -> None:
    log.append(shlex.join(cmd))
    print("$", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, text=True, capture_output=True)
    print(r.stdout[-2000:], r.stderr[-2000:] if r.returncode else "", f"({time.perf_counter() - t:.0f} s)", flush=True)
    if r.returncode not in (0, 4):  # 4: engine step not possible here, artifact written
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(cmd)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--verify-limit", type=int, default=32)
    ap.add_argument("--bench-limit", type=int, default=32)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--target-agreement", type=float, default=None, help="passed to the FP16/INT8 exports")
    args = ap.parse_args()

    out = args.output
    arts = out / "artifacts"
    arts.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "vpr_edge.cli.main"]
    log: list[str] = []
    common = ["--model", args.model, "--weights", "random", "--verify", str(CORRIDOR), "--verify-limit",
              str(args.verify_limit), "--quiet", "--force"]
    run(exe + ["export", *common, "--output", str(arts / "fp32")], log)
    vocab = arts / "fp32" / "vocabulary.npz"
    same_space = ["--vocabulary", str(vocab)] if vocab.exists() else []
    pca = arts / "fp32" / "pca.npz"
    same_space += ["--pca", str(pca)] if pca.exists() else []
    target = ["--target-agreement", str(args.target_agreement)] if args.target_agreement else []
    run(exe + ["export", *common, *same_space, *target, "--precision", "fp16", "--accept-fidelity",
               "--output", str(arts / "fp16")], log)
    run(exe + ["export", *common, *same_space, *target, "--precision", "int8", "--accept-fidelity",
               "--calibration", str(CORRIDOR / "database"), "--output", str(arts / "int8")], log)
    run(exe + ["bench", str(CORRIDOR), "--variant", f"onnx-fp32={arts / 'fp32'}", "--variant",
               f"onnx-fp16={arts / 'fp16'}", "--variant", f"onnx-int8={arts / 'int8'}", "--pytorch", "onnx-fp32",
               "--weights", "random", "--limit", str(args.bench_limit), "--batches", args.batches, "--runs",
               str(args.runs), "--warmup", "2", "--output", str(out / "bench"), "--force"], log)
    sizes = {}
    export_fidelity = {}
    for p in ("fp32", "fp16", "int8"):
        m = json.loads((arts / p / "manifest.json").read_text())
        sizes[p] = round(sum(f["bytes"] for f in m["files"].values()) / 2**20, 2)
        v = m["verification"].get(p) or m["verification"]["fp32"]
        rep = v["report"]
        export_fidelity[p] = {
            "passed": v.get("passed"),
            "cos_min": rep["cos_min"],
            "cos_mean": rep["cos_mean"],
            "top1_agreement": rep["top1_agreement"],
            "top5_agreement": rep["top5_agreement"],
            "fallback": m["details"].get("fallback", {}).get("keep_blocks") if m["details"].get("fallback") else None,
            "high_precision_flops_fraction": m["details"].get("high_precision_flops_fraction"),
        }
    summary = {"model": args.model, "artifact_mib": sizes, "export_verification": export_fidelity, "commands": log}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    # artifacts are large and re-creatable from the commands: keep only their manifests
    for p in ("fp32", "fp16", "int8"):
        for f in (arts / p).iterdir():
            if f.name != "manifest.json":
                f.unlink()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
