"""Fast vs exact preprocessing: milliseconds per frame, and what the fast path changes in the descriptors.

    python benchmarks/preprocess.py --output benchmarks/results/preprocess [--work /tmp/vpr-preprocess]

1. Frames: Corridor's 222 images as they are (160x120 JPEG) and upscaled (bicubic, stretched) to
   1920x1080 JPEG quality 90, written in Corridor's layout (full-resolution frames made by upscaling:
   no real 1080p ground truth exists here).
2. Time per frame, one thread (the pool of `runtime.pipeline` runs one such call per thread), median of
   --repeats passes over --timing-frames frames, for the presets' three input sizes (224, 322, 384 px):
   the exact path, the fast path to float input, the fast path to uint8 input (`--input uint8`
   artifacts), and the JPEG draft oversampling sweep of the float path (decode at >= k x the resized
   size; "full" = no DCT scaling).
3. Fidelity, a stage like any other: descriptors of full-size random-weight FP32 artifacts
   (`anyloc-dinov2-vits14`: hard VLAD, the most sensitive head; `boq-resnet50`: soft BoQ) from the fast
   path against the exact path: cosine and top-1/top-5 agreement of the database ranking of every
   query; the float layout per draft factor and the uint8 layout (what a --input uint8 artifact sees). Random weights: never a trained-model number.
4. Pipelined throughput: `vpr-edge bench` on the 1080p frames with --preprocess fast, batch 1 and 8, for
   the ViT-S/14 artifact (pipelined describe vs the backend fed preprocessed arrays).

Writes <output>/results.json, results.md, preprocess.png, and keeps the bench run in <output>/bench.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"
BIN = Path(sys.executable).parent
PRESETS = ("anyloc-dinov2", "boq-dinov2", "boq-resnet50")  # 224, 322 and 384 px inputs
OVERSAMPLE = (1.0, 1.5, 2.0, 3.0, None)  # None: full decode (no DCT scaling)


def make_frames(dst: Path, size=(1920, 1080), quality=90) -> Path:
    """Corridor upscaled to `size` JPEGs, same layout and ground truth (skipped when present)."""
    if (dst / "ground_truth.csv").exists():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("database", "queries"):
        (tmp / sub).mkdir(parents=True)
        for p in sorted((CORRIDOR / sub).iterdir()):
            with Image.open(p) as im:
                im.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
                    tmp / sub / (p.stem + ".jpg"), quality=quality)
    gt = (CORRIDOR / "ground_truth.csv").read_text()
    (tmp / "ground_truth.csv").write_text(gt.replace(".png", ".jpg"))
    tmp.rename(dst)
    return dst


def timings(frames: list[Path], repeats: int) -> dict:
    from vpr_edge import presets
    from vpr_edge.imaging import prepare
    from vpr_edge.imaging.fast import fast_float

    def per_frame(fn) -> float:
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            for f in frames:
                fn(f)
            runs.append((time.perf_counter() - t) / len(frames) * 1e3)
        return round(statistics.median(runs), 2)

    out = {}
    for name in PRESETS:
        pre = presets.get(name).preprocess
        row = {
            "input": list(pre.image_size),
            "exact_ms": per_frame(lambda f: prepare(f, pre, "exact", "float")),
            "fast_float_ms": per_frame(lambda f: prepare(f, pre, "fast", "float")),
            "fast_uint8_ms": per_frame(lambda f: prepare(f, pre, "fast", "uint8")),
            "oversample_ms": {},
        }
        for k in OVERSAMPLE:
            row["oversample_ms"][_label(k)] = per_frame(lambda f: fast_float(f, pre, oversample=k or 1e6))
        out[name] = row
        print(f"  {name} {tuple(pre.image_size)}: exact {row['exact_ms']} ms, fast {row['fast_float_ms']} ms "
              f"(uint8 {row['fast_uint8_ms']} ms)", flush=True)
    return out


def _label(k) -> str:
    return "full" if k is None else f"{k:g}x"


def export(preset: str, dst: Path) -> Path:
    if not (dst / "manifest.json").exists():
        subprocess.run([str(BIN / "vpr-export"), "--model", preset, "--weights", "random", "--verify", str(CORRIDOR),
                        "--verify-limit", "16", "--quiet", "--output", str(dst)], check=True)
    return dst


def fidelity(artifact: Path, dataset: Path, threads: int, sweep: bool) -> dict:
    """Fast against exact descriptors: the float layout (`fast_float`, what --preprocess fast feeds a float
    artifact) per JPEG draft factor (sweep) or at the default only, and the uint8 layout (`fast_rgb` +
    the graph's normalisation, what a --input uint8 artifact computes) at the default."""
    from vpr_edge.datasets import load_dataset
    from vpr_edge.fidelity import compare_descriptors
    from vpr_edge.imaging import prepare
    from vpr_edge.imaging.fast import DRAFT_OVERSAMPLE, fast_float, fast_rgb, normalize
    from vpr_edge.runtime.backends import BackendOptions
    from vpr_edge.runtime.describer import Describer

    ds = load_dataset(dataset)
    paths = [*ds.database, *ds.queries]
    db, q = np.arange(len(ds.database)), np.arange(len(ds.database), len(paths))
    with Describer.from_artifact(artifact, options=BackendOptions(threads=threads)) as d:
        pre = d.preset.preprocess

        def describe(load) -> np.ndarray:
            return d.aggregate(d.run_backend(np.stack([load(p) for p in paths])))

        ref = describe(lambda p: prepare(p, pre, "exact", "float"))
        variants = {f"float, draft {_label(k)}": (lambda p, k=k: fast_float(p, pre, oversample=k or 1e6))
                    for k in (OVERSAMPLE if sweep else (DRAFT_OVERSAMPLE,))}
        variants[f"uint8, draft {_label(DRAFT_OVERSAMPLE)}"] = lambda p: normalize(fast_rgb(p, pre), pre)
        rows = {}
        for label, load in variants.items():
            rep = compare_descriptors(ref, describe(load), db, q, ds.positives)
            rows[label] = {m: round(float(rep[m]), 6) for m in ("cos_mean", "cos_min", "top1_agreement", "top5_agreement")}
            print(f"  {artifact.name} on {dataset.name}, {label}: {rows[label]}", flush=True)
    return {"images": len(paths), "variants": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "preprocess")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vpr-preprocess"))
    ap.add_argument("--timing-frames", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="backend threads for the fidelity and bench runs")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    from vpr_edge.measure import machine_info

    args.work.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    big = make_frames(args.work / "corridor-1080p")
    res: dict = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                 "machine": machine_info(), "frames": {"1080p": "Corridor upscaled (bicubic) to 1920x1080 JPEG q90",
                                                      "corridor": "Corridor as it is (160x120 JPEG)"}}
    print("timing, 1080p JPEG frames", flush=True)
    frames = sorted((big / "queries").iterdir())[: args.timing_frames]
    res["timing_1080p"] = timings(frames, args.repeats)
    print("timing, Corridor frames", flush=True)
    res["timing_corridor"] = timings(sorted((CORRIDOR / "queries").iterdir())[: args.timing_frames], args.repeats)
    print("== fidelity", flush=True)
    res["fidelity"] = {}
    # ViT-S/14 + hard VLAD (the most sensitive head): the draft sweep on both frame sets; BoQ-ResNet50 at the
    # default only, on the 1080p frames (CPU time: 384 px ResNet50 on 222 images per variant)
    for preset, sets in (("anyloc-dinov2-vits14", {"corridor": CORRIDOR, "1080p": big}), ("boq-resnet50", {"1080p": big})):
        art = export(preset, args.work / f"{preset}-fp32")
        res["fidelity"][preset] = {k: fidelity(art, folder, args.threads, sweep=preset != "boq-resnet50")
                                   for k, folder in sets.items()}
    if not args.skip_bench:
        print("== bench", flush=True)
        bench = args.output / "bench"
        art = args.work / "anyloc-dinov2-vits14-fp32"
        subprocess.run([str(BIN / "vpr-edge"), "bench", str(big), "--variant", f"vits14-fp32={art}", "--batches", "1,8",
                        "--preprocess", "fast", "--runs", "3", "--limit", "64", "--threads", str(args.threads),
                        "--no-plots", "--quiet", "--force", "--output", str(bench)], check=True)
        b = json.loads((bench / "results.json").read_text())
        res["bench"] = {"command": (bench / "command.txt").read_text().strip(), "throughput": _throughput(b)}
    (args.output / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    write_md(res, args.output / "results.md")
    plot(res, args.output / "preprocess.png")
    print(f"wrote {args.output}")
    return 0


def _throughput(b: dict) -> list[dict]:
    """The pipelined vs backend-only rows of a dataset bench's results.json."""
    keys = ("pipelined_ips", "backend_only_ips", "pipelined_vs_backend_only", "preprocess_share")
    return [{"variant": name, "batch": batch, **{k: lat.get(k) for k in keys},
             "peak_rss_mb": lat.get("memory", {}).get("rss_peak_mb")}
            for name, v in b["variants"].items() for batch, lat in v["latency"].items()]


def write_md(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = ["# Fast vs exact preprocessing", "", f"Command: `{res['command']}`  ",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores_logical', '?')} cores, features {', '.join(m.get('cpu_features', []))}.",
             "Weights: random (full-size architectures); never a trained-model number.", ""]
    for key, title in (("timing_1080p", "1920x1080 JPEG q90 (Corridor upscaled)"), ("timing_corridor", "Corridor 160x120 JPEG")):
        lines += [f"## Milliseconds per frame, one thread: {title}", "",
                  "| preset | input | exact | fast (float) | fast (uint8) | " + " | ".join(
                      f"draft {_label(k)}" for k in OVERSAMPLE) + " |",
                  "|---" * (4 + len(OVERSAMPLE)) + "|"]
        for name, r in res[key].items():
            lines.append(f"| {name} | {r['input'][0]}x{r['input'][1]} | {r['exact_ms']} | {r['fast_float_ms']} | "
                         f"{r['fast_uint8_ms']} | " + " | ".join(str(v) for v in r["oversample_ms"].values()) + " |")
        lines.append("")
    lines += ["## Descriptor fidelity of the fast path against the exact path", "",
              "| artifact | frames | layout, JPEG draft | cos mean | cos min | top-1 agreement | top-5 agreement |", "|---|---|---|---|---|---|---|"]
    for art, sets in res["fidelity"].items():
        for frames, f in sets.items():
            for k, r in f["variants"].items():
                lines.append(f"| {art} | {frames} ({f['images']}) | {k} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
                             f"{r['top1_agreement']:.3f} | {r['top5_agreement']:.3f} |")
    lines.append("")
    if res.get("bench"):
        lines += ["## Pipelined describe vs backend-only (1080p frames, --preprocess fast)", "",
                  f"Command: `{res['bench']['command']}`", "",
                  "| variant | batch | pipelined img/s | backend-only img/s | ratio | preprocess share |", "|---|---|---|---|---|---|"]
        for r in res["bench"]["throughput"]:
            lines.append(f"| {r['variant']} | {r['batch']} | {_num(r['pipelined_ips'])} | {_num(r['backend_only_ips'])} | "
                         f"{_num(r['pipelined_vs_backend_only'], 3)} | {_num(r['preprocess_share'], 3)} |")
        lines.append("")
    path.write_text("\n".join(lines))


def _num(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(res["timing_1080p"])
    x = np.arange(len(names))
    for i, (key, label) in enumerate((("exact_ms", "exact"), ("fast_float_ms", "fast (float)"), ("fast_uint8_ms", "fast (uint8)"))):
        ax[0].bar(x + (i - 1) * 0.27, [res["timing_1080p"][n][key] for n in names], 0.27, label=label)
    ax[0].set_xticks(x, names, fontsize=8)
    ax[0].set_ylabel("ms per 1920x1080 JPEG, 1 thread")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=8)
    for art, sets in res["fidelity"].items():
        for frames, f in sets.items():
            ks = [k for k in f["variants"] if k.startswith("float")]
            if len(ks) > 1:
                ax[1].plot([k.split("draft ")[1] for k in ks], [f["variants"][k]["cos_min"] for k in ks], marker="o",
                           label=f"{art}, {frames}")
    ax[1].set_xlabel("JPEG draft (float layout): decoded pixels per output pixel")
    ax[1].set_ylabel("cos min vs exact path")
    ax[1].legend(fontsize=7)
    fig.suptitle("Fast preprocessing: time and descriptor fidelity (random weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
