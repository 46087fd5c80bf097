"""FP32 / FP16 / INT8 ONNX Runtime vs PyTorch FP32 eager on this CPU, in one bench run (issue 4).

For each preset: `vpr-export` at fp32, fp16 and int8 (INT8 calibrated on Corridor's database,
verified on Corridor; `--accept-fidelity` so an artifact outside the thresholds is still measured —
its manifest says so), optionally a second INT8 export with `--target-agreement` (the automatic
fallback keeps blocks in FP32 until top-1 agreement reaches it), then one `vpr-edge bench` over the
artifacts plus the PyTorch reference, which writes JSON + Markdown + PNG with ratios against PyTorch
FP32. PyTorch and ONNX Runtime get the same thread count (`--threads`, default 2 = this machine's
cores; OMP_NUM_THREADS=1 in the environment would otherwise leave PyTorch on one thread while ORT
uses all cores). The exact commands are written to <output>/commands.txt and into the summary.

    flock /work/notes/cpu.lock python benchmarks/precision_cpu.py --model anyloc-dinov2-vits14 \
        --int8-target 0.95 --output benchmarks/results/precision/anyloc-dinov2-vits14
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vpr_edge.export.artifact import search_journal

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"


def run(cmd: list[str], log: list[str], reuse: Path | None = None) -> None:
    """Run `cmd`; with `reuse`, an artifact folder already holding a manifest (an earlier, interrupted
    run of the same command) is kept and the command is only logged."""
    if reuse is not None and (reuse / "manifest.json").is_file() and (reuse / "model.onnx").is_file():
        log.append(f"# reused {reuse} from an earlier run of: {shlex.join(cmd)}")
        print(log[-1], flush=True)
        return
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
    ap.add_argument("--verify-limit", type=int, default=64)
    ap.add_argument("--bench-limit", type=int, default=32)
    ap.add_argument("--calibration-limit", type=int, default=None, help="INT8 calibration images (default: all 111)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--target-agreement", type=float, default=None, help="passed to the FP16/INT8 exports")
    ap.add_argument("--int8-target", type=float, default=None,
                    help="also export and bench INT8 with --target-agreement F (variant onnx-int8-fallback)")
    ap.add_argument("--weights", default="random", help="random (default) or random-outliers (the INT8 stress model)")
    ap.add_argument("--no-fp16", action="store_true", help="skip the FP16 export")
    ap.add_argument("--int8-plain", action="store_true",
                    help="also export INT8 with --int8-outliers off (variant onnx-int8-plain): what outlier handling changes")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch and ONNX Runtime in the bench")
    ap.add_argument("--keep-artifacts", action="store_true",
                    help="keep the exported graphs (by default only their manifests are kept)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep artifacts an interrupted earlier run already wrote (their commands are logged as reused)")
    args = ap.parse_args()

    out = args.output
    arts = out / "artifacts"
    arts.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "vpr_edge.cli.main"]
    log: list[str] = []
    common = ["--model", args.model, "--weights", args.weights, "--verify", str(CORRIDOR), "--verify-limit",
              str(args.verify_limit), "--quiet", "--force"]
    reuse = (lambda name: arts / name) if args.reuse else (lambda name: None)
    run(exe + ["export", *common, "--output", str(arts / "fp32")], log, reuse("fp32"))
    vocab = arts / "fp32" / "vocabulary.npz"
    same_space = ["--vocabulary", str(vocab)] if vocab.exists() else []
    pca = arts / "fp32" / "pca.npz"
    same_space += ["--pca", str(pca)] if pca.exists() else []
    target = ["--target-agreement", str(args.target_agreement)] if args.target_agreement else []
    if not args.no_fp16:
        run(exe + ["export", *common, *same_space, *target, "--precision", "fp16", "--accept-fidelity",
                   "--output", str(arts / "fp16")], log, reuse("fp16"))
    int8 = ["export", *common, *same_space, "--precision", "int8", "--accept-fidelity", "--calibration",
            str(CORRIDOR / "database")]
    if args.calibration_limit:
        int8 += ["--calibration-limit", str(args.calibration_limit)]
    if args.target_agreement or args.int8_target:
        print(f"# the fallback searches log each score as it is known (and resume from it when rerun): "
              f"{search_journal(arts / 'int8')}, {search_journal(arts / 'int8-fallback')}", flush=True)
    run(exe + [*int8, *target, "--output", str(arts / "int8")], log, reuse("int8"))
    kinds = {"fp32": "onnx-fp32", **({} if args.no_fp16 else {"fp16": "onnx-fp16"}), "int8": "onnx-int8"}
    if args.int8_plain:
        run(exe + [*int8, *target, "--int8-outliers", "off", "--output", str(arts / "int8-plain")], log, reuse("int8-plain"))
        kinds["int8-plain"] = "onnx-int8-plain"
    if args.int8_target:
        run(exe + [*int8, "--target-agreement", str(args.int8_target), "--output", str(arts / "int8-fallback")], log, reuse("int8-fallback"))
        kinds["int8-fallback"] = "onnx-int8-fallback"
    variants = [a for k, name in kinds.items() for a in ("--variant", f"{name}={arts / k}")]
    run(exe + ["bench", str(CORRIDOR), *variants, "--pytorch", "onnx-fp32", "--weights", args.weights, "--threads",
               str(args.threads), "--limit", str(args.bench_limit), "--batches", args.batches, "--runs",
               str(args.runs), "--warmup", "2", "--output", str(out / "bench"), "--force"], log)
    sizes = {}
    export_fidelity = {}
    for p in kinds:
        m = json.loads((arts / p / "manifest.json").read_text())
        prec = m["details"]["precision"]
        sizes[p] = round(sum(f["bytes"] for f in m["files"].values()) / 2**20, 2)
        v = m["verification"].get(prec) or m["verification"]["fp32"]
        rep = v["report"]
        fb = m["details"].get("fallback")
        export_fidelity[p] = {
            "passed": v.get("passed"),
            "verify_images": m["verification"].get("set", {}).get("n_images"),
            "cos_min": rep["cos_min"],
            "cos_mean": rep["cos_mean"],
            "top1_agreement": rep["top1_agreement"],
            "top5_agreement": rep["top5_agreement"],
            "fallback_blocks": fb["blocks"] if fb else None,
            "fallback_met": fb["met"] if fb else None,
            "fallback_evaluations": len(fb["evaluations"]) if fb else None,
            "fallback_nodes_kept": len(fb["nodes"]) if fb else None,
            "high_precision_flops_fraction": m["details"].get("high_precision_flops_fraction"),
            "beyond_default_flops_fraction": m["details"].get("beyond_default_flops_fraction"),
            "outlier_channels": (m["details"].get("int8") or {}).get("outlier_channels"),
        }
    bench = json.loads((out / "bench" / "results.json").read_text())
    latency = {}
    for name in ["pytorch-fp32", *kinds.values()]:
        var = bench["variants"][name]
        fid = var.get("fidelity") or {}
        latency[name] = {
            "p50_ms_per_image": {b: round(x["per_image_ms"]["p50"], 2) for b, x in var["latency"].items()},
            "speedup_vs_pytorch_fp32": {b: round(x, 3) for b, x in bench["ratios"][name].get("speedup_p50", {}).items()},
            "bench_top1_agreement": fid.get("top1_agreement"),
            "bench_cos_mean": fid.get("cos_mean"),
        }
    summary = {"model": args.model, "weights": args.weights, "threads": args.threads, "machine": bench["machine"].get("cpu"),
               "artifact_mib": sizes, "export_verification": export_fidelity, "bench": latency, "commands": log}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    # artifacts are large and re-creatable from the commands: keep only their manifests
    for p in kinds if not args.keep_artifacts else ():
        for f in (arts / p).iterdir():
            if f.name != "manifest.json":
                f.unlink()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
