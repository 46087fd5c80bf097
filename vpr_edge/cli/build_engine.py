"""`vpr-edge build-engine ARTIFACT_DIR`: a TensorRT engine artifact from an ONNX artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpr_edge.cli.options import int_list


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "build-engine",
        help="build a TensorRT engine from an ONNX artifact (on the Jetson/GPU that will run it)",
        description="Parse the artifact's ONNX into a strongly typed TensorRT network (precision comes from "
        "the graph: FP16 casts, INT8 Q/DQ) and write an engine artifact whose manifest records the TensorRT "
        "version, GPU and ONNX hash. Example: vpr-edge build-engine artifacts/anyloc-dinov2-fp16-descriptor "
        "--batch 1,4 --timing-cache ~/.cache/vpr-edge/timing.cache",
    )
    p.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="ONNX artifact folder written by vpr-export")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="DIR", help="engine artifact folder (default: ARTIFACT_DIR-engine)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--workspace-gb", type=float, default=4.0, metavar="GB", help="builder workspace limit (default 4)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), metavar="0-5",
                   help="builder optimisation level (default 3; higher searches longer)")
    p.add_argument("--batch", type=int_list, default=(1,), metavar="1,4,8",
                   help="batch sizes of the optimisation profile: min, opt (middle), max (default 1)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE", help="timing cache to reuse and update")
    p.add_argument("--version-compatible", action="store_true",
                   help="engine that later TensorRT versions of the same major (and the lean runtime) can run")
    p.add_argument("--exclude-lean-runtime", action="store_true", help="with --version-compatible: do not embed the lean runtime")
    p.add_argument("--hardware-compatible", action="store_true", help="engine for any Ampere-or-newer GPU (slower)")
    p.add_argument("--verify", type=Path, default=None, metavar="DIR",
                   help="images to compare engine vs ONNX Runtime on (default: the synthetic verify set)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from vpr_edge.doctor.engine_check import record_engine_check
    from vpr_edge.engines.tensorrt.build import EngineOptions, build_engine, missing_tensorrt_message
    from vpr_edge.errors import MissingDependencyError
    from vpr_edge.lazy import available

    opts = EngineOptions(
        workspace_gb=args.workspace_gb,
        opt_level=args.opt_level,
        batch_sizes=args.batch,
        timing_cache=args.timing_cache,
        version_compatible=args.version_compatible,
        exclude_lean_runtime=args.exclude_lean_runtime,
        hardware_compatible=args.hardware_compatible,
    )
    opts.check()
    if not available("tensorrt"):
        raise MissingDependencyError(missing_tensorrt_message(args.artifact, opts))
    out = args.output or args.artifact.with_name(args.artifact.name + "-engine")
    build_engine(args.artifact, out, options=opts, force=args.force, device=args.device)
    m = record_engine_check(out, args.artifact, verify=args.verify, device=args.device)
    d = m.details
    line = (f"wrote {out}: TensorRT {d['trt_version']} on {d['gpu_name']} (sm {d['compute_capability']}), "
            f"{d['precision']}, batch {d['batch_sizes']}, built in {d['build_seconds']} s")
    cmp = m.verification.get("engine_vs_onnxruntime", {})
    if "report" in cmp:
        r = cmp["report"]
        line += f"; vs ONNX Runtime: cos min {r['cos_min']:.5f}, top-1 agreement {r['top1_agreement']:.3f}"
    print(line)
    return 0
