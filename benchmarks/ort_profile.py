"""Where ONNX Runtime's time goes in an artifact's graph: ORT's own profiler, kernel time per op type.

    python benchmarks/ort_profile.py --artifact /tmp/vpr-ort-graphs/anyloc-dinov2-vits14-fp32 \
        --output benchmarks/results/ort_graphs/profile_vits14

Profiles the graph the runtime runs (`--ort-graph auto|portable`) on preprocessed Corridor images at one batch
size, same threads as the benchmarks; writes <output>.json, <output>.md and <output>.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--ort-graph", default="auto", choices=("auto", "portable"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import onnxruntime as ort

    from vpr_edge.artifact import load_artifact
    from vpr_edge.measure import machine_info
    from vpr_edge.runtime.backends import BackendOptions
    from vpr_edge.runtime.describer import Describer
    from vpr_edge.runtime.ort_backend import graph_for

    art = load_artifact(args.artifact)
    path = graph_for(art, BackendOptions(ort_graph=args.ort_graph))
    with Describer.from_artifact(args.artifact) as d:
        x = np.stack([d.preprocess(p) for p in sorted((CORRIDOR / "database").iterdir())[: args.batch]])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(args.output.parent / ".ort_profile")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up, excluded below by run count
    for _ in range(args.runs):
        sess.run(None, {name: x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    runs = args.runs + 1
    shares = {op: {"share": round(us / total, 4), "ms_per_run": round(us / runs / 1000, 2)} for op, us in per_op.most_common()}
    result = {"command": shlex.join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "graph": path.name,
              "artifact": str(args.artifact), "batch": args.batch, "threads": args.threads, "runs": runs,
              "kernel_ms_per_run": round(total / runs / 1000, 2), "per_op": shares, "machine": machine_info()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ONNX Runtime profile: {path.name} of {art.preset.name}, batch {args.batch}", "",
             f"Command: `{result['command']}`; kernel time {result['kernel_ms_per_run']} ms per run ({runs} runs, "
             f"the first a warm-up).", "", "| op | share | ms per run |", "|---|---|---|"]
    lines += [f"| {op} | {100 * s['share']:.1f}% | {s['ms_per_run']} |" for op, s in list(shares.items())[:12]]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = list(shares.items())[:8]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([op for op, _ in top][::-1], [100 * s["share"] for _, s in top][::-1])
    ax.set_xlabel("% of kernel time")
    ax.set_title(f"{art.preset.name}: {path.name}, batch {args.batch}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.output.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
