"""Do ONNX Runtime's spinning threads starve the preprocessing pool? Pipelined vs backend-only throughput on
full-resolution frames with the backend's intra-op threads spinning (ORT's default) or sleeping between ops.

    python benchmarks/ort_spin.py --output benchmarks/results/ort_spin [--rounds 3] [--images 48]

1. Artifacts: `anyloc-dinov2-vits14` FP32 at full size, random weights, float input and `--input uint8`
   (normalised in the graph), exported once into <output>/artifacts (kept out of git but their manifests).
2. Frames: Corridor upscaled to 1920x1080 JPEG q90 (`benchmarks/preprocess.py`'s frames; no real
   full-resolution set exists here), `--preprocess fast`.
3. All four Describers (2 artifacts x spin on/off, --threads each, the default preprocessing workers) are
   open at once; per batch size (1, 8), --rounds rounds, each round visiting every Describer in a rotated
   order with two bursts of --images frames: the pipelined stream (`Describer.stream`, decoding in the pool
   ahead of the backend) and the backend fed the same frames preprocessed beforehand (`forward`). Interleaving
   short bursts makes slow drifts of this shared machine hit every setting alike.
Reported per setting: the medians over rounds of pipelined and backend-only images/s, their ratio, and the
ratio of the pipelined throughput to the best backend-only throughput of either setting (what a user gets
against the fastest the network runs here). Writes results.json, results.md, ort_spin.png.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from preprocess import CORRIDOR, make_frames  # noqa: E402
from report import finish, pyplot  # noqa: E402
from vpr_edge.atomic import write_json  # noqa: E402

BIN = Path(sys.executable).parent
SETTINGS = ("on", "off")


def export(dst: Path, uint8: bool) -> Path:
    if not (dst / "manifest.json").exists():
        cmd = [str(BIN / "vpr-export"), "--model", "anyloc-dinov2-vits14", "--weights", "random", "--verify",
               str(CORRIDOR), "--verify-limit", "16", "--quiet", "--output", str(dst)] + (["--input", "uint8"] if uint8 else [])
        subprocess.run(cmd, check=True)
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vpr-preprocess"), help="where the 1080p frames are made")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--images", type=int, default=32, help="frames per burst (a multiple of 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()

    from vpr_edge.measure import machine_info
    from vpr_edge.runtime.describer import Describer
    from vpr_edge.runtime.pipeline import default_workers

    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    arts = {"float": export(out / "artifacts" / "vits14-fp32", False),
            "uint8": export(out / "artifacts" / "vits14-fp32-u8", True)}
    frames = sorted((make_frames(args.work / "corridor-1080p") / "queries").iterdir())
    batches = [int(b) for b in args.batches.split(",")]
    raw: dict = {a: {str(b): {s: [] for s in SETTINGS} for b in batches} for a in arts}
    t_start = time.time()
    opened = {(a, s): Describer.from_artifact(path, threads=args.threads, preprocess="fast", spin=s)
              for a, path in arts.items() for s in SETTINGS}
    chunk = frames[: args.images]
    arrays = {key: np.stack([d.preprocess(f) for f in chunk]) for key, d in opened.items()}
    try:
        for d in opened.values():  # warm-up: sessions, pools, page cache
            list(d.stream(chunk[:8], 8))
        for b in batches:
            for r in range(args.rounds):
                keys = list(opened)
                keys = keys[r % len(keys):] + keys[: r % len(keys)]
                for key in keys:
                    d = opened[key]
                    t0 = time.perf_counter()
                    done = sum(1 for x in d.stream(chunk, b) if x.ok)
                    pipelined = done / (time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    d.forward(arrays[key], b)
                    backend = len(chunk) / (time.perf_counter() - t0)
                    a, s = key
                    raw[a][str(b)][s].append({"pipelined_ips": pipelined, "backend_only_ips": backend})
                    print(f"b{b} round {r + 1} {a} spin {s}: pipelined {pipelined:.2f} img/s, backend-only "
                          f"{backend:.2f} img/s ({pipelined / backend:.3f})", flush=True)
    finally:
        for d in opened.values():
            d.close()
    summary: dict = {}
    for a in arts:
        for b in batches:
            cell = raw[a][str(b)]
            med = {s: {k: statistics.median(x[k] for x in cell[s]) for k in ("pipelined_ips", "backend_only_ips")}
                   for s in SETTINGS}
            best_backend = max(med[s]["backend_only_ips"] for s in SETTINGS)
            for s in SETTINGS:
                med[s]["ratio_same_setting"] = med[s]["pipelined_ips"] / med[s]["backend_only_ips"]
                med[s]["ratio_vs_best_backend"] = med[s]["pipelined_ips"] / best_backend
                med[s]["ratio_per_round_median"] = statistics.median(
                    x["pipelined_ips"] / x["backend_only_ips"] for x in cell[s])
            summary[f"{a} b{b}"] = med
    res = {
        "command": "python benchmarks/ort_spin.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "workers": default_workers(),
        "threads": args.threads,
        "frames": "Corridor queries upscaled (bicubic) to 1920x1080 JPEG q90, --preprocess fast",
        "weights": "random (seed 0): a scheduling measurement, no accuracy involved",
        "wall_s": round(time.time() - t_start, 1),
        "summary": summary,
        "raw": raw,
    }
    write_json(out / "results.json", res)
    m = res["machine"]
    md = ["# ONNX Runtime threads spinning or sleeping beside the preprocessing pool", "",
          f"Command: `{res['command']}`. CPU: {m.get('cpu')} ({', '.join(m.get('cpu_features', []))}), "
          f"{m.get('cores_logical')} cores; ORT {args.threads} threads, {res['workers']} preprocessing worker(s); "
          f"{args.rounds} rounds, settings in "
          f"rotated order, medians; {args.images} frames per burst. {res['frames']}; {res['weights']}.", "",
          "| artifact, batch | spin | pipelined img/s | backend-only img/s | pipelined / backend-only (same setting) "
          "| pipelined / best backend-only | median of per-round ratios |", "|---|---|---|---|---|---|---|"]
    for key, med in summary.items():
        for s in SETTINGS:
            v = med[s]
            md.append(f"| {key} | {s} | {v['pipelined_ips']:.2f} | {v['backend_only_ips']:.2f} | "
                      f"{v['ratio_same_setting']:.3f} | {v['ratio_vs_best_backend']:.3f} | {v['ratio_per_round_median']:.3f} |")
    md += ["", f"Wall time {res['wall_s']:.0f} s."]
    return finish(out, md, _plot, summary)


def _plot(out: Path, summary: dict) -> None:
    plt = pyplot()
    keys = list(summary)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    x = range(len(keys))
    for i, s in enumerate(SETTINGS):
        ax[0].bar([k + (i - 0.5) * 0.38 for k in x], [summary[k][s]["pipelined_ips"] for k in keys], 0.38,
                  label=f"pipelined, spin {s}")
        ax[0].scatter([k + (i - 0.5) * 0.38 for k in x], [summary[k][s]["backend_only_ips"] for k in keys],
                      marker="_", s=400, color="k", zorder=3, label="backend-only" if i == 0 else None)
        ax[1].bar([k + (i - 0.5) * 0.38 for k in x], [summary[k][s]["ratio_vs_best_backend"] for k in keys], 0.38,
                  label=f"spin {s}")
    for a in ax:
        a.set_xticks(list(x), keys, fontsize=8)
    ax[0].set_ylabel("images / s (1080p frames)")
    ax[0].legend(fontsize=7)
    ax[1].axhline(0.9, color="gray", ls="--")
    ax[1].set_ylabel("pipelined / best backend-only")
    ax[1].set_ylim(0, 1.05)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ort_spin.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
