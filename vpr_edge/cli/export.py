"""`vpr-export` / `vpr-edge export`: a preset to a verified ONNX artifact folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vpr_edge.cli import options as O
from vpr_edge.engines.precision import table


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes a number or 'dynamic', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch must be >= 1, got {n}")
    return n


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a preset to a verified ONNX artifact (FP32/FP16/INT8; TensorRT engine where available)",
        description="Export a preset to ONNX, verify it against PyTorch with ONNX Runtime, write an artifact folder "
        "with manifest.json. Example: vpr-export --model anyloc-dinov2 --precision fp16",
    )
    O.add_model(p)
    O.add_output(p, required=False, help="artifact folder (default: ./artifacts/<preset>-<precision>-<scope>)")
    O.add_verify(p)
    g = p.add_argument_group("export")
    g.add_argument("--precision", choices=table.names(), default="fp32",
                   help="; ".join(f"{p.name}: {p.summary}" for p in table.PRECISIONS.values()))
    g.add_argument("--scope", choices=("backbone", "descriptor"), default="descriptor",
                   help="backbone: image -> facet features only; descriptor: image -> descriptor in one graph")
    g.add_argument("--batch", type=_batch, default=None, metavar="N|dynamic", help="fixed batch N or dynamic (default)")
    g.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    g.add_argument("--input", choices=("float", "uint8"), default="float",
                   help="float (default): normalised float [B, 3, H, W]; uint8: camera pixels [B, H, W, 3] RGB, cast and "
                        "normalised inside the graph (the runtime then uses the fast preprocessing)")
    g.add_argument("--verify-limit", type=int, default=64, metavar="N", help="verify on at most N images (default 64)")
    g.add_argument("--accept-fidelity", action="store_true",
                   help="write the artifact even when outside tolerance (the manifest records it)")
    q = p.add_argument_group("precision (fp16/int8)")
    q.add_argument("--calibration", type=Path, default=None, metavar="DIR",
                   help="INT8 calibration images (hundreds recommended; default: the verify images)")
    q.add_argument("--calibration-method", choices=("max", "entropy", "percentile"), default="max",
                   help="int8: how activation ranges are taken from the calibration images (default max)")
    q.add_argument("--calibration-limit", type=int, default=512, metavar="N",
                   help="use at most N images of --calibration, evenly spaced (default 512)")
    q.add_argument("--target-agreement", type=float, default=None, metavar="F",
                   help="keep the fewest blocks in higher precision so top-1 agreement with FP32 reaches F")
    q.add_argument("--int8-outliers", choices=("auto", "off"), default="auto",
                   help="int8: auto (default) takes input channels whose calibrated range is >64x the median channel's "
                        "out of the INT8 MatMul (a thin float MatMul) and SmoothQuant-scales inputs whose channel spread "
                        "is >8x; graphs without outliers are left as they are. off: plain per-tensor INT8")
    q.add_argument("--smooth-alpha", type=float, default=0.5, metavar="A",
                   help="int8: SmoothQuant migration strength in [0, 1] (default 0.5)")
    q.add_argument("--io-dtype", choices=("float32", "float16"), default="float32",
                   help="fp16: graph input/output type (default float32: casts inside the graph)")
    q.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs tensorrt + a GPU)")
    p.add_argument("--torch-worker", choices=("auto", "on", "off"), default="auto",
                   help="build, reference and tracing in a separate process whose memory is freed before ONNX Runtime "
                        "verifies (auto: on for full-size presets; measured on ViT-G: peak RSS 2.46x -> 1.31x the FP32 weights)")
    p.add_argument("--json", action="store_true", help="print the manifest's verification as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from vpr_edge.errors import ConfigError
    from vpr_edge.export.artifact import ExportOptions, export_artifact

    preset = O.resolve_preset(args)
    opts = ExportOptions(
        precision=args.precision,
        scope=args.scope,
        batch=args.batch,
        opset=args.opset,
        verify=args.verify,
        verify_limit=args.verify_limit,
        accept_fidelity=args.accept_fidelity,
        calibration=args.calibration,
        calibration_method=args.calibration_method,
        calibration_limit=args.calibration_limit,
        target_agreement=args.target_agreement,
        int8_outliers=args.int8_outliers,
        smooth_alpha=args.smooth_alpha,
        io_dtype=args.io_dtype,
        input=args.input,
        engine=args.engine,
        progress=not args.quiet,
        torch_worker=args.torch_worker,
    )
    weights = args.weights
    if preset.method == "student":  # its weights, vocabulary and PCA are the run's
        weights = str(args.model).removeprefix("student:")
        if args.vocabulary or args.pca or args.weights not in ("auto", weights):
            raise ConfigError("--weights/--vocabulary/--pca do not apply to a student: they come from its run folder")
    name = preset.name.replace("@", "-").replace(":", "-")
    out = args.output or Path("artifacts") / f"{name}-{args.precision}-{args.scope}"
    manifest = export_artifact(
        preset, out, weights=weights, vocabulary=args.vocabulary, pca=args.pca, options=opts,
        force=args.force, seed=args.seed,
    )
    if args.json:
        print(json.dumps(manifest.verification, indent=2))
    _summary(out, manifest)
    return _engine_step(out, args) if args.engine else 0


def _engine_step(out: Path, args) -> int:
    """--engine: build the TensorRT engine next to the artifact, or say exactly how to on the target."""
    from vpr_edge.doctor.engine_check import record_engine_check
    from vpr_edge.engines.tensorrt.build import build_engine, missing_tensorrt_message
    from vpr_edge.lazy import available

    if not available("tensorrt"):
        print(f"engine not built: {missing_tensorrt_message(out)}", flush=True)
        return 4  # the verified ONNX artifact is written; the engine step asked for could not run here
    engine_dir = out.with_name(out.name + "-engine")
    build_engine(out, engine_dir, force=args.force)
    m = record_engine_check(engine_dir, out, verify=args.verify)
    print(f"wrote engine {engine_dir} (TensorRT {m.details.get('trt_version')})")
    return 0


def _ties_note(rep: dict) -> str:
    from vpr_edge.fidelity import TIE_EPS

    ties = rep.get("top5_agreement_ties")
    if ties is None or ties == rep["top5_agreement"]:
        return ""
    return f" ({ties:.3f} counting swaps of images the reference scores within {TIE_EPS:.0e} as ties)"


def _assignment_ties_note(rep: dict) -> str:
    tied, ties = rep.get("tied_tokens"), rep.get("rel_err_ties")
    if not tied or ties is None or ties > rep["rel_err"] / 2:  # only where the ties change the verdict's number
        return ""
    return f" ({ties:.2e} with {tied} tokens the reference's hard VLAD ties between two centres free to take either)"


def _summary(out: Path, m) -> None:
    v = m.verification
    prec = m.details["precision"]
    rep = (v.get(prec) or v["fp32"])["report"]  # the gate's report of the written precision
    size = sum(f["bytes"] for f in m.files.values()) / 2**20
    print(
        f"wrote {out} ({prec}, {m.details['scope']}, {size:.1f} MiB): vs PyTorch on {v['set']['n_images']} "
        f"{v['set']['source']} images: cos min {rep['cos_min']:.6f}, rel err {rep['rel_err']:.2e}"
        + _assignment_ties_note(rep)
        + f", top-1 agreement {rep['top1_agreement']:.3f}, top-5 agreement {rep['top5_agreement']:.3f}"
        + _ties_note(rep)
    )
    if prec != "fp32" and not v[prec].get("passed", True):
        print(f"WARNING: outside the {prec} thresholds ({'; '.join(v[prec].get('failures', []))}); written because of --accept-fidelity")
    from vpr_edge.engines.tensorrt.build import engine_command

    trt = m.details.get("tensorrt_check") or {}
    verdicts = ", ".join(f"TensorRT {t}: {v}" for t, v in (trt.get("verdicts") or {}).items())
    print(f"offline TensorRT check: {verdicts or 'not run'}" + ("" if trt.get("ok", True) else
          f" (`vpr-edge doctor {out} --offline` lists the problems)"))
    print(f"TensorRT engine (on the Jetson/GPU machine): {engine_command(out)}")
