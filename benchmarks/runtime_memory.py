"""Runtime memory at default settings: peak RSS of describing camera frames with each full-size artifact.

    python benchmarks/runtime_memory.py --output benchmarks/results/runtime_memory \
        --artifact NAME=DIR [--artifact NAME=DIR ...] [--frames DIR] [--limit 16]

Each artifact runs in a fresh process (the lean runtime: Describer.from_artifact + describe, default
batch = `runtime.memory.default_batch`, default preprocessing workers), on --limit frames of --frames
(default: Corridor's queries upscaled to 1920x1080 by benchmarks/preprocess.py, else Corridor itself).
Peak RSS is the kernel's high-water mark of that process (VmHWM), which includes the ONNX Runtime
session, its weights and the Python/numpy/onnxruntime libraries. The issue's target: at default
settings a runtime stays within its artifact's size + 1.5 GB. Random weights (memory does not depend on
the values).

Writes <output>.json, <output>.md and <output>.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from named_artifacts import named_artifacts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"
BIG = Path("/tmp/vpr-preprocess/corridor-1080p")
MARGIN_GB = 1.5

CHILD = r"""
import json, sys, time
from pathlib import Path
from vpr_edge.measure import hwm_bytes
from vpr_edge.runtime.describer import Describer
art, frames, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
paths = sorted(p for p in Path(frames).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
t = time.perf_counter()
with Describer.from_artifact(art, preprocess="fast") as d:
    batch = d.default_batch
    out = d.describe(paths)
    print(json.dumps({"batch": batch, "images": len(paths), "dim": int(out.shape[1]), "seconds": time.perf_counter() - t,
                      "peak_rss_bytes": hwm_bytes(), "input": list(d.input_size)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "runtime_memory")
    ap.add_argument("--artifact", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--frames", type=Path, default=(BIG / "queries") if BIG.exists() else (CORRIDOR / "queries"))
    ap.add_argument("--limit", type=int, default=16)
    args = ap.parse_args()
    from vpr_edge.measure import machine_info

    rows = []
    for art in named_artifacts(args.artifact):
        name, folder = art.name, art.folder
        r = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.frames), str(args.limit)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{name}: the runtime failed on {folder}")
        m = json.loads(r.stdout.strip().splitlines()[-1])
        size = art.size_bytes
        budget = size + MARGIN_GB * 1e9
        row = {"name": name, "artifact": str(folder), "preset": art.identity.get("network"),
               "precision": art.identity.get("precision"), "artifact_mb": round(size / 1e6, 1),
               "default_batch": m["batch"], "images": m["images"], "seconds": round(m["seconds"], 1),
               "peak_rss_mb": round(m["peak_rss_bytes"] / 1e6, 1), "budget_mb": round(budget / 1e6, 1),
               "within_budget": m["peak_rss_bytes"] <= budget}
        rows.append(row)
        print(f"{name}: batch {row['default_batch']}, peak {row['peak_rss_mb']} MB, artifact {row['artifact_mb']} MB, "
              f"budget {row['budget_mb']} MB: {'ok' if row['within_budget'] else 'OVER'}", flush=True)
    res = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": machine_info(),
           "frames": str(args.frames), "margin_gb": MARGIN_GB, "rows": rows}
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Runtime memory at default settings", "", f"Command: `{res['command']}`  ",
             f"Frames: {args.frames} (first {args.limit}), `--preprocess fast`, default batch and workers.", "",
             "| artifact | preset | precision | artifact MB | default batch | peak RSS MB | artifact + 1.5 GB | within |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['preset']} | {r['precision']} | {r['artifact_mb']} | {r['default_batch']} | "
                     f"{r['peak_rss_mb']} | {r['budget_mb']} | {'yes' if r['within_budget'] else 'no'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["name"] for r in rows]
    ax.barh(names, [r["peak_rss_mb"] for r in rows], label="peak RSS")
    ax.scatter([r["budget_mb"] for r in rows], names, color="red", marker="|", s=300, label="artifact + 1.5 GB")
    ax.set_xlabel("MB")
    ax.legend(fontsize=8)
    ax.set_title("Runtime peak RSS at default batch (CPU, ONNX Runtime)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
