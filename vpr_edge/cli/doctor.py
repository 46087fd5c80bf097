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
    print(f"verdict: {result['verdict']}")
    return EXIT[result["verdict"].split(":")[0].split(" ")[0]]
