"""`vpr-edge doctor [ARTIFACT]`: what this machine can run, and does the artifact agree across backends."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor",
        help="check TensorRT/CUDA/ONNX Runtime here and an artifact across backends; one verdict line",
        description="Report TensorRT, CUDA, ONNX Runtime and PyTorch versions, the CPU features and the GPU. Given "
        "an artifact, run it with ONNX Runtime, its TensorRT engine (where possible) and the PyTorch reference "
        "(rebuilt from the manifest: random weights by their seed, a checkpoint via --weights), compare descriptors, "
        "print latency and one verdict (OK, FAIL, or INCOMPLETE when nothing could be compared; it names every "
        "comparison it could not make). Example: vpr-edge doctor artifacts/anyloc-dinov2-fp16 --images /data/corridor",
    )
    p.add_argument("artifact", type=Path, nargs="?", default=None, metavar="ARTIFACT_DIR", help="ONNX or engine artifact")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="images or a dataset root (default: a deterministic synthetic set)")
    p.add_argument("--weights", default=None, metavar="PATH|auto",
                   help="the checkpoint the artifact was exported from, to rebuild its PyTorch reference (checked "
                        "against the weights hash in the manifest; default: the official file if it is in the hub cache)")
    p.add_argument("--limit", type=int, default=16, metavar="N", help="compare on at most N images (default 16)")
    p.add_argument("--repeat", type=int, default=20, metavar="N", help="timed runs for latency (default 20)")
    p.add_argument("--build-engine", action="store_true",
                   help="for an ONNX artifact: build a temporary engine here (TensorRT + GPU needed)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--offline", action="store_true",
                   help="only the static TensorRT check of the artifact's ONNX (TensorRT 10.3 / JetPack 6 and 11: "
                        "operators, types, strongly typed rules, Q/DQ, shapes, external data): one line per problem, "
                        "no backend runs, no GPU or TensorRT needed")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="--offline: the largest batch the engine will be built for (default: 8 for dynamic graphs)")
    p.set_defaults(func=_run)
    return p


EXIT = {"OK": 0, "INCOMPLETE": 4, "FAIL": 3}


def _run(args) -> int:
    from vpr_edge.doctor.diagnose import diagnose
    from vpr_edge.doctor.environment import environment_report
    from vpr_edge.errors import VprEdgeError

    env = environment_report(args.device)
    for key, val in env.items():
        print(f"{key:>22}: {val}")
    if args.artifact is None:
        print("verdict: OK (environment only; pass an artifact folder to check it)")
        return 0
    if args.offline:
        return _offline(args)
    try:
        result = diagnose(args.artifact, images=args.images, limit=args.limit, repeat=args.repeat,
                          build=args.build_engine, device=args.device, weights=args.weights)
    except VprEdgeError as exc:
        print(f"verdict: FAIL: {exc}")
        return exc.exit_code
    for name, lat in result["backends"].items():
        print(f"{name:>22}: median {lat['median_ms']} ms, p95 {lat['p95_ms']} ms per image (batch 1)")
    for name, rep in result["comparisons"].items():
        print(f"{name:>22}: cos min {rep['cos_min']:.6f}, top-1 agreement {rep['top1_agreement']:.3f}, "
              f"non-finite {rep['nonfinite']} ({rep['gate']} gate)")
    for name, why in result["not_compared"].items():
        print(f"{'not compared':>22}: {name}: {why}")
    if any("tensorrt" in name and rep["failures"] for name, rep in result["comparisons"].items()):
        # Polygraphy (NVIDIA's, pip install polygraphy) bisects which layer's precision breaks an engine
        print(f"{'to bisect':>22}: polygraphy run {result.get('onnx', 'model.onnx')} --trt --onnxrt --atol 1e-3 --rtol 1e-3 "
              "--check-error-stat median; polygraphy debug precision ... narrows it to layers")
    print(f"verdict: {result['verdict']}")
    return EXIT[result["verdict"].split(":")[0].split(" ")[0]]


def _offline(args) -> int:
    from pathlib import Path

    from vpr_edge.artifact import load_artifact
    from vpr_edge.engines.tensorrt.compat import check_onnx

    art = load_artifact(args.artifact)
    onnx_dir = args.artifact if art.kind == "onnx" else Path(art.manifest.details.get("onnx_artifact", ""))
    onnx_art = art if art.kind == "onnx" else load_artifact(onnx_dir, kinds=("onnx",))
    recorded = art.manifest.details.get("batch", "dynamic")
    batches = (args.batch,) if args.batch else ((1, 8) if recorded == "dynamic" else (int(recorded),))
    report = check_onnx(onnx_art.file("onnx"), batch_sizes=batches)
    for line in report.lines():
        print(line)
    print(report.summary())
    if report.ok:
        print(f"verdict: OK: {report.summary()}")
        return 0
    print(f"verdict: FAIL: {len(report.errors())} TensorRT problem(s) ({report.summary()})")
    return 3
