"""What exact integer products cost where ONNX Runtime's INT8 kernel saturates (x86 without VNNI), and what
they buy: the same INT8 artifacts through a session with `session.x64quantprecision` (what every vpr-edge
session sets on such a CPU, `onnxrt.session_config`) and through a plain session without it, beside the FP32
artifact of the same preset, timed in interleaved rounds on one process.

    python benchmarks/int8_products.py --output benchmarks/results/int8_products_avx2 \\
        --pair NAME=FP32_DIR,INT8_DIR [--pair ...] [--rounds 10] [--images 8]

Per pair (an FP32 artifact and an INT8 artifact of the same weights and vocabulary): p50 ms per image at batch 1 of ORT FP32, INT8 exact and INT8 saturating (portable graphs,
`model.onnx`, the same threads), and the cosine of each INT8 output to the FP32 graph's output on the same
Corridor database images (the artifacts' own preprocessing). On a VNNI or ARM CPU both INT8 sessions are the
same kernel. Writes results.json, results.md, int8_products.png; the CPU features are in every result.
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from report import finish, pyplot  # noqa: E402
from vpr_edge.atomic import write_json  # noqa: E402
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"
VARIANTS = ("fp32", "int8-exact", "int8-saturating")


def _sessions(fp32: Path, int8: Path, threads: int) -> dict:
    import onnxruntime as ort

    from vpr_edge import onnxrt

    def plain(path: Path, exact: bool):
        # built here rather than through onnxrt.session, which always asks for exact products where needed:
        # the saturating session is the thing measured
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if exact:
            opts.add_session_config_entry(onnxrt.X64_QUANT_PRECISION, "1")
        return ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    return {"fp32": plain(fp32, True), "int8-exact": plain(int8, True), "int8-saturating": plain(int8, False)}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def measure(fp32: Path, int8: Path, images: np.ndarray, rounds: int, threads: int) -> dict:
    sessions = _sessions(fp32, int8, threads)
    name = sessions["fp32"].get_inputs()[0].name
    outs = {k: np.concatenate([s.run(None, {name: x[None]})[0] for x in images]) for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]  # rotated so drifts of the machine hit every variant alike
        for k in order:
            t = time.perf_counter()
            for x in images:
                sessions[k].run(None, {name: x[None]})
            times[k].append(1000 * (time.perf_counter() - t) / len(images))
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {"p50_ms": p50, "ms_per_round": times,
            "cos_to_fp32": {k: {"mean": float(_cos(outs[k], outs["fp32"]).mean()),
                                "min": float(_cos(outs[k], outs["fp32"]).min())} for k in VARIANTS[1:]},
            "saturating_over_exact_time": p50["int8-saturating"] / p50["int8-exact"],
            "int8_exact_vs_fp32_speed": p50["fp32"] / p50["int8-exact"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--pair", action="append", required=True, metavar="NAME=FP32_DIR,INT8_DIR")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from vpr_edge import datasets
    from vpr_edge.artifact import load_artifact
    from vpr_edge.errors import VprEdgeError
    from vpr_edge.imaging.exact import preprocess_image
    from vpr_edge.measure import machine_info
    from vpr_edge.onnxrt import session_config

    paths = datasets.list_images(CORRIDOR / "database")[: args.images]
    machine = machine_info()
    res = {"command": "python benchmarks/int8_products.py " + " ".join(
               [f"--output {args.output}"] + [f"--pair {x}" for x in args.pair]
               + [f"--rounds {args.rounds}", f"--images {args.images}", f"--threads {args.threads}"]),
           "cpu": machine["cpu"], "cpu_features": machine["cpu_features"], "machine": machine, "toolkit_session_config": session_config(),
           "rounds": args.rounds, "images": len(paths), "threads": args.threads, "artifacts": {}}
    pairs = {}  # every pair checked before anything is timed
    for spec in args.pair:
        key, _, dirs = spec.partition("=")
        if not key or dirs.count(",") != 1:
            raise SystemExit(f"--pair {spec}: expected NAME=FP32_DIR,INT8_DIR")
        fp32, int8 = (Path(d) for d in dirs.split(","))
        try:
            arts = [load_artifact(fp32), load_artifact(int8)]
        except VprEdgeError as exc:
            raise SystemExit(f"--pair {spec}: {exc}") from None
        if arts[0].manifest.space != arts[1].manifest.space:  # same weights and vocabulary, or cosines mean nothing
            raise SystemExit(f"--pair {spec}: the two artifacts describe different descriptor spaces; pair an FP32 and "
                             "an INT8 export of the same weights and vocabulary")
        pairs[key] = (fp32, int8, arts[0].preset.preprocess)
    for key, (fp32, int8, pre) in pairs.items():
        images = np.stack([preprocess_image(p, pre) for p in paths]).astype(np.float32)
        print(f"{key}: {fp32} vs {int8}", flush=True)
        res["artifacts"][key] = measure(fp32, int8, images, args.rounds, args.threads)
        print(json.dumps(res["artifacts"][key]["p50_ms"]), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", res)
    md = ["# INT8 with exact vs saturating integer products (ONNX Runtime, CPU)", "",
          f"Command: `{res['command']}`. CPU: {res['cpu']} ({', '.join(res['cpu_features']) or 'none'}); what "
          f"vpr-edge sessions set here: {res['toolkit_session_config'] or 'nothing'}. Portable graphs, batch 1, "
          f"{res['threads']} threads, {res['images']} Corridor database images, {res['rounds']} interleaved "
          "rounds, p50 ms per image; cosine of graph outputs to the FP32 graph's. Random weights (and the stress "
          "model where named): not trained-model numbers.", "",
          "| pair | FP32 ms | INT8 exact ms | INT8 saturating ms | INT8 exact speed-up over FP32 | saturating time / exact time | "
          "cos mean / min to FP32, exact | saturating |", "|---|---|---|---|---|---|---|---|"]
    for key, r in res["artifacts"].items():
        p, c = r["p50_ms"], r["cos_to_fp32"]
        md.append(f"| {key} | {p['fp32']:.1f} | {p['int8-exact']:.1f} | {p['int8-saturating']:.1f} | "
                  f"{r['int8_exact_vs_fp32_speed']:.2f}x | {r['saturating_over_exact_time']:.2f}x | "
                  f"{c['int8-exact']['mean']:.4f} / {c['int8-exact']['min']:.4f} | "
                  f"{c['int8-saturating']['mean']:.4f} / {c['int8-saturating']['min']:.4f} |")
    return finish(args.output, md, _plot, res)


def _plot(out: Path, res: dict) -> None:
    plt = pyplot()
    keys = list(res["artifacts"])
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(keys)), 3.6))
    for i, v in enumerate(VARIANTS):
        ax.bar([k + (i - 1) * 0.27 for k in range(len(keys))], [res["artifacts"][k]["p50_ms"][v] for k in keys],
               0.27, label=v)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("p50 ms / image, batch 1")
    ax.set_title(f"ONNX Runtime INT8 products ({', '.join(res['cpu_features']) or 'no SIMD listed'})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "int8_products.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
