"""INT8 on the outlier stress model (issue 16): the stress model's ratios per preset size, then plain vs
outlier-aware INT8 (and the fallback on top) on random and stress weights, optionally ModelOpt's ONNX INT8
PTQ on the same FP32 graphs, and the latency against PyTorch FP32 eager. Writes JSON + Markdown + PNG.

    nice python benchmarks/int8_outliers.py --output benchmarks/results/int8_outliers \\
        [--modelopt-path /tmp/mo-pkgs] [--skip-precision]

Step 2 runs `benchmarks/precision_cpu.py` once per weights (its exports through `vpr-export`, its bench
through `vpr-edge bench`; commands in each run's commands.txt). ModelOpt (nvidia-modelopt 0.47) is not a
dependency: its `[onnx]` extra pulls onnxruntime-gpu and an older onnx into the environment, so it is
measured from a side folder given with --modelopt-path (`pip install --target DIR --no-deps
nvidia-modelopt onnx_graphsurgeon onnxslim pulp omegaconf pydantic pydantic_core annotated-types
typing-inspection nvidia-ml-py lief cppimport mako regex ninja`), run on the CPU ONNX Runtime.
Random-weight and stress-model numbers are not trained-model numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"
STRESS_PRESETS = {  # preset -> blocks built for the ratio measurement (the planting block + 1 after it)
    "anyloc-dinov2-vits14": None,
    "boq-dinov2": None,
    "anyloc-dinov2": 15,  # ViT-G/14: blocks 0..14 of 40 (planting at 13) keep the measurement to ~2 GB
}


def stress_ratios(n_images: int) -> dict:
    """The stress model's ratios on Corridor images at each preset's input size, random vs random-outliers."""
    import numpy as np
    import torch

    from vpr_edge import datasets, presets
    from vpr_edge.imaging.exact import preprocess_image
    from vpr_edge.models import weights as W
    from vpr_edge.models.outliers import outlier_stats, plant_block

    out = {}
    paths = datasets.list_images(CORRIDOR / "queries")[:n_images]
    for name, blocks in STRESS_PRESETS.items():
        p = presets.get(name)
        size = p.preprocess.image_size
        imgs = torch.from_numpy(np.stack([preprocess_image(x, p.preprocess) for x in paths]))
        k = plant_block(p.backbone.depth)
        n = blocks or (p.facet.layer + 1 if p.facet else None)
        row = {"arch": p.backbone.arch, "image_size": list(size), "plant_block": k}
        for w in ("random", "random-outliers"):
            t = time.perf_counter()
            if p.facet is None:
                model = W.load_boq_backbone(p.backbone, w, image_size=size)
            else:
                model = W.load_backbone(p.backbone, w, num_blocks=n, image_size=size)
            with torch.no_grad():
                row[w] = {kk: round(v, 3) for kk, v in outlier_stats(model, imgs).items()}
            row[w]["seconds"] = round(time.perf_counter() - t, 1)
            del model
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def modelopt_int8(mo_path: Path, fp32: Path, dst: Path, method: str, same_nodes: bool) -> dict:
    """ModelOpt's ONNX INT8 PTQ of `fp32` in a subprocess with `mo_path` on its path, judged like our exports.
    same_nodes: quantise only MatMul/Gemm/Conv and leave our default exclusions (attention, first layer, the
    VLAD head) in float, as our INT8 does; else ModelOpt's own defaults."""
    code = f"""
import json, time, collections
import onnx
import modelopt.onnx.quantization as moq
from vpr_edge import presets
from vpr_edge.verifyset import verify_set
from vpr_edge.engines.precision.calibration import calibration_images
from vpr_edge.fidelity import compare_outputs
from vpr_edge.onnxrt import run_onnx
p = presets.get("anyloc-dinov2-vits14")
vs = verify_set({str(CORRIDOR)!r}, p.preprocess, 64)
cal, _ = calibration_images({str(CORRIDOR / 'database')!r}, p.preprocess)
kw = {{}}
if {same_nodes!r}:
    from vpr_edge.engines import graph as G
    from vpr_edge.engines.precision.int8 import default_exclusions
    kw = dict(op_types_to_quantize=["MatMul", "Gemm", "Conv"],
              nodes_to_exclude=sorted(default_exclusions(G.load({str(fp32)!r}, load_weights=False))))
t = time.perf_counter()
moq.quantize({str(fp32)!r}, quantize_mode="int8", calibration_data={{"images": cal}}, calibration_method={method!r},
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path={str(dst)!r}, log_level="WARNING", **kw)
secs = time.perf_counter() - t
r = compare_outputs(run_onnx({str(fp32)!r}, vs.images), run_onnx({str(dst)!r}, vs.images), vs.db_idx, vs.q_idx, vs.positives)
ops = collections.Counter(n.op_type for n in onnx.load({str(dst)!r}, load_external_data=False).graph.node)
print("RESULT", json.dumps({{"cos_mean": r["cos_mean"], "cos_min": r["cos_min"], "top1_agreement": r["top1_agreement"],
      "top5_agreement": r["top5_agreement"], "quantize_s": round(secs, 1), "quantize_linear_nodes": ops["QuantizeLinear"]}}))
"""
    env = dict(os.environ, PYTHONPATH=f"{mo_path}{os.pathsep}{REPO}")
    r = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, env=env)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1][:300] if (r.stderr or r.stdout) else f"rc {r.returncode}"}
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--ratio-images", type=int, default=8)
    ap.add_argument("--target-agreement", type=float, default=0.95)
    ap.add_argument("--modelopt-path", type=Path, default=None)
    ap.add_argument("--skip-precision", action="store_true", help="reuse the precision runs already in --output")
    ap.add_argument("--skip-ratios", action="store_true", help="reuse ratios.json already in --output")
    args = ap.parse_args()
    from vpr_edge.measure import cpu_features

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    ratios_file = out / "ratios.json"
    if args.skip_ratios and ratios_file.is_file():
        ratios = json.loads(ratios_file.read_text())
    else:
        ratios = stress_ratios(args.ratio_images)
        ratios_file.write_text(json.dumps(ratios, indent=2) + "\n")
    runs = {}
    for w in ("random", "random-outliers"):
        run_dir = out / w
        if not args.skip_precision or not (run_dir / "summary.json").is_file():
            cmd = [sys.executable, str(REPO / "benchmarks" / "precision_cpu.py"), "--model", "anyloc-dinov2-vits14",
                   "--weights", w, "--no-fp16", "--int8-plain", "--int8-target", str(args.target_agreement),
                   "--output", str(run_dir), "--reuse", "--batches", "1", "--runs", "10"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        runs[w] = json.loads((run_dir / "summary.json").read_text())
    modelopt = {}
    if args.modelopt_path:
        for w in ("random", "random-outliers"):
            fp32 = out / w / "artifacts" / "fp32-for-modelopt" / "model.onnx"
            if not fp32.is_file():
                subprocess.run([sys.executable, "-m", "vpr_edge.cli.main", "export", "--model", "anyloc-dinov2-vits14",
                                "--weights", w, "--verify", str(CORRIDOR / "queries"), "--quiet", "--force",
                                "--output", str(fp32.parent)], check=True)
            for method, same in (("max", False), ("entropy", False), ("max", True)):
                key = f"{w}/{method}" + ("/our-nodes" if same else "/defaults")
                modelopt[key] = modelopt_int8(args.modelopt_path, fp32, out / w / f"modelopt-{method}.onnx", method, same)
                print(key, modelopt[key], flush=True)
                (out / w / f"modelopt-{method}.onnx").unlink(missing_ok=True)
            for f in fp32.parent.iterdir():  # re-creatable from the command: keep the manifest only
                if f.name != "manifest.json":
                    f.unlink()
    summary = {"cpu_features": cpu_features(), "stress_ratios": ratios, "precision": runs, "modelopt": modelopt,
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(summary, out)


def write_report(s: dict, out: Path) -> None:
    lines = ["# INT8 on the outlier stress model (ViT-S/14, Corridor; random weights: not trained-model numbers)", "",
             f"Command: `{s['command']}`; CPU features: {', '.join(s['cpu_features']) or 'unknown'}.", "",
             "## The stress model's ratios (Corridor images, each preset's input size)", "",
             "| preset | arch | block | weights | token norm max/median | fc2 input max/median | next norm1 channel spread | block-0 norm1 channel spread | tokens >10x median norm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in s["stress_ratios"].items():
        for w in ("random", "random-outliers"):
            r = row[w]
            lines.append(f"| {name} | {row['arch']} | {row['plant_block']} | {w} | {r['token_norm_ratio']:.1f} | "
                         f"{r['fc2_input_max_over_median']:.0f} | {r['later_norm1_channel_max_over_median']:.2f} | "
                         f"{r['first_norm1_channel_max_over_median']:.2f} | {r['tokens_over_10x_median_norm']:.1f} |")
    lines += ["", "## INT8 export verification (64 Corridor images: 32 queries vs 32 database, against PyTorch FP32) "
              "and latency (`vpr-edge bench`, batch 1, 32 images, 10 runs, one run per weights)", "",
              "| weights | variant | gate | cos mean | cos min | top-1 | top-5 | FLOPs kept beyond default | split channels | ms/img | vs PyTorch FP32 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"int8-plain": "onnx-int8-plain", "int8": "onnx-int8", "int8-fallback": "onnx-int8-fallback", "fp32": "onnx-fp32"}
    for w, run in s["precision"].items():
        pt = run["bench"]["pytorch-fp32"]["p50_ms_per_image"]
        lines.append(f"| {w} | pytorch-fp32 | - | - | - | - | - | - | - | {pt.get('1', '-')} | 1.0 |")
        for key, var in names.items():
            ev = run["export_verification"].get(key)
            if ev is None:
                continue
            b = run["bench"].get(var, {})
            oc = ev.get("outlier_channels")
            split = oc.get("channels_split") if isinstance(oc, dict) else "off"
            beyond = ev.get("beyond_default_flops_fraction")
            lines.append(
                f"| {w} | {var} | {'pass' if ev['passed'] else 'FAIL'} | {ev['cos_mean']:.4f} | {ev['cos_min']:.4f} | "
                f"{ev['top1_agreement']:.3f} | {ev['top5_agreement']:.3f} | {'-' if beyond is None else f'{beyond:.4%}'} | "
                f"{split} | {b.get('p50_ms_per_image', {}).get('1', '-')} | {b.get('speedup_vs_pytorch_fp32', {}).get('1', '-')} |")
    if s["modelopt"]:
        lines += ["", "## ModelOpt ONNX INT8 PTQ (nvidia-modelopt 0.47, CPU ORT, FP32 elsewhere) on the same FP32 graphs", "",
                  "| weights / calibration | cos mean | cos min | top-1 | top-5 | Q nodes | quantize s |", "|---|---|---|---|---|---|---|"]
        for k, r in s["modelopt"].items():
            if "error" in r:
                lines.append(f"| {k} | error: {r['error']} | | | | | |")
            else:
                lines.append(f"| {k} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['top1_agreement']:.3f} | "
                             f"{r['top5_agreement']:.3f} | {r['quantize_linear_nodes']} | {r['quantize_s']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, cos, top1 = [], [], []
    for w, run in s["precision"].items():
        for key in ("int8-plain", "int8", "int8-fallback"):
            ev = run["export_verification"].get(key)
            if ev:
                labels.append(f"{w}\n{key}")
                cos.append(ev["cos_mean"])
                top1.append(ev["top1_agreement"])
    for k, r in s["modelopt"].items():
        if "error" not in r:
            labels.append(f"{k.split('/')[0]}\nmodelopt-{'-'.join(k.split('/')[1:])}")
            cos.append(r["cos_mean"])
            top1.append(r["top1_agreement"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], cos, 0.4, label="cos mean")
    ax.bar([i + 0.2 for i in x], top1, 0.4, label="top-1 agreement")
    ax.axhline(0.98, color="C0", ls="--", lw=0.8)
    ax.axhline(0.95, color="C1", ls="--", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_title("ViT-S/14 INT8 vs FP32 on Corridor (gate: dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)


if __name__ == "__main__":
    main()
