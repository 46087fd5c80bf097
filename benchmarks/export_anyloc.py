"""Full-size export measurement (issue 3): `anyloc-dinov2` on CPU with random weights.

For each scope and weights source: wall time and peak RSS of the whole `vpr-export` process
(sampled every 50 ms over its process tree: the CLI and its PyTorch worker), the FP32 weight bytes
the graph needs (blocks 0..31 qkv), the ratio of the two, the artifact size; then (random rows) ORT
vs PyTorch eager latency per image at batch 1 on the same machine. Weights sources: `random`
(seeded in the process) and `file` (random weights saved in the official dinov2 layout, all 40
blocks, 4.2 GiB: the path a user with the downloaded checkpoint takes).

    python benchmarks/export_anyloc.py --output benchmarks/results/export_anyloc

writes <output>.json, <output>.md and <output>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"


def run_measured(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak / 2**30, 2), "log_tail": out[-600:]}


def latency(fn, x, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return {"median_ms": round(1e3 * float(np.median(ts)), 1), "p95_ms": round(1e3 * float(np.percentile(ts, 95)), 1), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="anyloc-dinov2")
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "export_anyloc")
    ap.add_argument("--verify-limit", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scopes", default="backbone,descriptor")
    ap.add_argument("--weights", default="random,file", help="comma list of: random, file")
    args = ap.parse_args()

    import torch

    from vpr_edge import presets
    from vpr_edge.export.onnx_from_torch import param_bytes
    from vpr_edge.models import build as B

    preset = presets.get(args.model)
    with torch.device("meta"):
        weights_bytes = param_bytes(B.build_backbone(preset, "random"))
    results = {
        "model": args.model,
        "image_size": list(preset.preprocess.image_size),
        "weights_fp32_gib": round(weights_bytes / 2**30, 2),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ram_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "scopes": {},
    }
    work = Path(tempfile.mkdtemp(prefix="vpr-bench-"))
    sources = args.weights.split(",")
    if "file" in sources:
        ckpt = work / f"{args.model}-random-official-layout.pth"
        # in a separate process so this one does not keep the 4.2 GiB model while exports are measured
        subprocess.run([sys.executable, "-c", (
            "import sys; from vpr_edge import presets; from vpr_edge.models import weights as W; "
            "spec = presets.get(sys.argv[1]).backbone; "
            "W.save_official(W.init_random_(W.build_for_layout(spec, 'dinov2'), 0), sys.argv[2], 'dinov2')"),
            args.model, str(ckpt)], check=True)
        results["checkpoint_gib"] = round(ckpt.stat().st_size / 2**30, 2)
    for source, scope in [(w, s) for w in sources for s in args.scopes.split(",")]:
        out = work / f"{source}-{scope}"
        weights = "random" if source == "random" else str(ckpt)
        cmd = [sys.executable, "-m", "vpr_edge.cli.main", "export", "--quiet", "--model", args.model, "--weights",
               weights, "--scope", scope, "--verify", str(CORRIDOR), "--verify-limit", str(args.verify_limit),
               "--output", str(out)]
        r = run_measured(cmd)
        r["weights"] = source
        m = json.loads((out / "manifest.json").read_text())
        r["command"] = "vpr-export " + " ".join(cmd[4:])
        r["artifact_gib"] = round(sum(f["bytes"] for f in m["files"].values()) / 2**30, 2)
        r["peak_over_weights"] = round(r["peak_rss_gib"] / (weights_bytes / 2**30), 2)
        r["timings_s"] = m["details"]["timings_s"]
        r["fidelity"] = {k: m["verification"]["fp32"]["report"][k] for k in ("rel_err", "cos_min", "top1_agreement", "top5_agreement")}
        r["blocks_in_graph"] = [m["details"]["graph"]["blocks"][0], m["details"]["graph"]["blocks"][-1] + 1]
        r["facet_block_ops"] = m["details"]["graph"].get("facet_block_ops")
        r["step_peak_rss_gib"] = m["details"]["peak_rss_gib"]
        r.pop("log_tail")
        results["scopes"][f"{scope} ({source} weights)"] = r
        print(json.dumps({scope: r}, indent=1))
        if source != "random":
            shutil.rmtree(out)
            continue
        # latency: ORT on the artifact vs PyTorch eager on the same module, batch 1
        import onnxruntime as ort

        x = np.zeros((1, 3, *preset.preprocess.image_size), np.float32)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        r["ort"] = latency(lambda a, run=sess.run: run(None, {"images": a}), x, 1, args.runs)
        del sess
        from vpr_edge.models import vocabulary as V

        vocab = V.load_vocabulary(out / "vocabulary.npz") if (out / "vocabulary.npz").exists() else None
        model = B.build_model(preset, "random", vocabulary=vocab) if scope == "descriptor" else B.build_feature_model(preset)
        with torch.inference_mode():
            r["torch"] = latency(lambda a, fn=model: fn(torch.from_numpy(a)), x, 1, args.runs)
        del model
        r["ort_speedup"] = round(r["torch"]["median_ms"] / r["ort"]["median_ms"], 2)
        shutil.rmtree(out)
    shutil.rmtree(work)
    write(results, args.output)


def write(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Full-size export: {results['model']} (random weights, {results['image_size'][0]}x{results['image_size'][1]})",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']['cores']} cores, {results['machine']['ram_gib']} GiB; torch {results['torch']}.  ",
        f"FP32 weights the graph needs: {results['weights_fp32_gib']} GiB.",
        "",
        "| scope | wall (s) | peak RSS (GiB) | peak / weights | artifact (GiB) | blocks | ORT ms | PyTorch ms | ORT speed-up | rel err | top-5 agr. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, r in results["scopes"].items():
        lat = (f"{r['ort']['median_ms']} | {r['torch']['median_ms']} | {r['ort_speedup']}x" if "ort" in r
               else "- | - | -")
        lines.append(
            f"| {s} | {r['wall_s']} | {r['peak_rss_gib']} | {r['peak_over_weights']} | {r['artifact_gib']} | "
            f"{r['blocks_in_graph'][0]}..{r['blocks_in_graph'][1]} | {lat} | "
            f"{r['fidelity']['rel_err']:.1e} | {r['fidelity']['top5_agreement']:.2f} |"
        )
    if "checkpoint_gib" in results:
        lines += ["", f"`file` rows load a {results['checkpoint_gib']} GiB checkpoint in the official dinov2 layout "
                      "(random weights, all 40 blocks)."]
    lines += ["", "Peak RSS per step (GiB; PyTorch steps run in the worker process, the last in the CLI process):", ""]
    lines += [f"- {s}: {r['step_peak_rss_gib']}" for s, r in results["scopes"].items()]
    lines += ["", "Step timings (s):", ""]
    lines += [f"- {s}: {r['timings_s']}" for s, r in results["scopes"].items()]
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    scopes = list(results["scopes"])
    lat_scopes = [s for s in scopes if "ort" in results["scopes"][s]]
    ax[0].bar([s.replace(" (", "\n(") for s in scopes], [results["scopes"][s]["peak_rss_gib"] for s in scopes], color="tab:blue", label="peak RSS")
    ax[0].axhline(results["weights_fp32_gib"], color="k", ls="--", label="FP32 weights")
    ax[0].axhline(1.3 * results["weights_fp32_gib"], color="tab:red", ls=":", label="1.3x weights")
    ax[0].set_ylabel("GiB")
    ax[0].legend(fontsize=7)
    w = 0.35
    xs = np.arange(len(lat_scopes))
    ax[1].bar(xs - w / 2, [results["scopes"][s]["torch"]["median_ms"] for s in lat_scopes], w, label="PyTorch eager")
    ax[1].bar(xs + w / 2, [results["scopes"][s]["ort"]["median_ms"] for s in lat_scopes], w, label="ONNX Runtime")
    ax[1].set_xticks(xs, [s.replace(" (", "\n(") for s in lat_scopes])
    ax[1].set_ylabel("ms / image (batch 1)")
    ax[1].legend(fontsize=7)
    fig.suptitle(f"{results['model']} export on CPU")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
