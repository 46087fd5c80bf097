"""The offline TensorRT check (`vpr-edge doctor ARTIFACT --offline`) on full-size artifacts.

    python benchmarks/trt_offline.py --output benchmarks/results/trt_offline --artifact NAME=DIR [...]

For each artifact folder: `engines.tensorrt.compat.check_onnx` on its model.onnx against TensorRT 10.3
(JetPack 6), 10.15 and 11, for engine batch sizes 1 and 8 (a dynamic batch gets that profile): the verdict
per version, errors, warnings, the operators seen and the seconds the check took. A static check against
the parser's documented operator table and the strongly typed rules: no TensorRT ran here (it cannot be
installed on these machines), so a pass means "nothing documented stands in the way", not "built".

Writes <output>.json, <output>.md and <output>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from named_artifacts import named_artifacts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("10.3", "10.15", "11")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "trt_offline")
    ap.add_argument("--artifact", action="append", required=True, metavar="NAME=DIR")
    args = ap.parse_args()
    from vpr_edge.engines.tensorrt.compat import check_onnx
    from vpr_edge.measure import machine_info

    rows = []
    for art in named_artifacts(args.artifact):
        name, ident = art.name, art.identity
        rep = check_onnx(art.folder / "model.onnx", targets=TARGETS, batch_sizes=(1, 8)).to_dict()
        rows.append({"name": name, "artifact": str(art.folder), "preset": ident.get("network"),
                     "precision": ident.get("precision"), "scope": ident.get("scope"),
                     "artifact_mib": round(art.size_bytes / 2**20, 1), "nodes": sum(rep["op_counts"].values()),
                     "verdicts": rep["verdicts"], "errors": rep["errors"], "warnings": rep["warnings"],
                     "problems": [f"{p['severity']} {p['rule']} {p['node']} ({p['op']}, TensorRT {', '.join(p['targets'])}): {p['message']}"
                                  for p in rep["problems"]][:20],
                     "seconds": rep["seconds"], "op_counts": rep["op_counts"]})
        print(f"{name}: {rep['verdicts']} ({rep['seconds']} s)", flush=True)
    res = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": machine_info(),
           "targets": TARGETS, "rows": rows}
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Offline TensorRT check on full-size artifacts", "", f"Command: `{res['command']}`  ",
             "Static check only (operator tables, types, strongly typed rules, Q/DQ, shapes, external data); "
             "no TensorRT ran.", "",
             "| artifact | preset | precision | scope | MiB | nodes | " + " | ".join(f"TRT {t}" for t in TARGETS)
             + " | warnings (11) | seconds |", "|---" * (8 + len(TARGETS)) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['preset']} | {r['precision']} | {r['scope']} | {r['artifact_mib']} | {r['nodes']} | "
                     + " | ".join(f"{r['verdicts'][t]} ({r['errors'][t]} errors)" for t in TARGETS)
                     + f" | {r['warnings']['11']} | {r['seconds']} |")
    for r in rows:
        if r["problems"]:
            lines += ["", f"{r['name']}:", *[f"- {p}" for p in r["problems"]]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    for i, r in enumerate(rows):
        for j, t in enumerate(TARGETS):
            ok = r["verdicts"][t] == "ok"
            ax.scatter(j, i, s=300, color="tab:green" if ok else "tab:red", marker="s")
            ax.annotate(str(r["errors"][t]), (j, i), ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(TARGETS)), [f"TensorRT {t}" for t in TARGETS])
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.set_xlim(-0.5, len(TARGETS) - 0.5)
    ax.set_title("Offline TensorRT check (errors per version; green = ok)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
