"""`vpr-edge doctor [ARTIFACT]`: what this machine can run, and does the artifact agree across backends.

Without an artifact: versions of TensorRT / CUDA bindings / ONNX Runtime / PyTorch and the GPU
("none" where there is none). With one: run it on a few images with every backend available here
(ONNX Runtime CPU; the TensorRT engine where TensorRT and a GPU exist, after the manifest check;
PyTorch where the reference can be rebuilt), compare, time, and print ONE verdict line.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vpr_edge.errors import VprEdgeError
from vpr_edge.lazy import available


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor",
        help="check TensorRT/CUDA/ONNX Runtime here and an artifact across backends; one verdict line",
        description="Report TensorRT, CUDA, ONNX Runtime and PyTorch versions and the GPU. Given an artifact, "
        "run it with ONNX Runtime, its TensorRT engine (where possible) and PyTorch (where installed and the "
        "weights are known), compare descriptors, print latency and one verdict. "
        "Example: vpr-edge doctor artifacts/anyloc-dinov2-fp16-descriptor-engine --images /data/corridor",
    )
    p.add_argument("artifact", type=Path, nargs="?", default=None, metavar="ARTIFACT_DIR", help="ONNX or engine artifact")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="images or a dataset root (default: a deterministic synthetic set)")
    p.add_argument("--limit", type=int, default=16, metavar="N", help="compare on at most N images (default 16)")
    p.add_argument("--repeat", type=int, default=20, metavar="N", help="timed runs for latency (default 20)")
    p.add_argument("--build-engine", action="store_true",
                   help="for an ONNX artifact: build a temporary engine here (TensorRT + GPU needed)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.set_defaults(func=_run)
    return p


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _version(module: str) -> str:
    if not available(module):
        return "not installed"
    mod = __import__(module)
    return str(getattr(mod, "__version__", "installed"))


def environment_report(device: int = 0) -> dict[str, Any]:
    """Versions and GPU; never raises for what is missing."""
    rep: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "torch": _version("torch"),
        "tensorrt": _version("tensorrt"),
        "cuda_bindings": "cuda-python" if available("cuda.bindings.runtime") or available("cuda.cudart")
        else ("pycuda" if available("pycuda.driver") else "none"),
        "gpu": "none",
        "compute_capability": None,
    }
    if rep["onnxruntime"] != "not installed":
        import onnxruntime

        rep["onnxruntime_providers"] = onnxruntime.get_available_providers()
    try:
        from vpr_edge.runtime.cuda_api import open_cuda

        name, cc = open_cuda().device_info(device)
        rep["gpu"], rep["compute_capability"] = name, cc
    except (VprEdgeError, ImportError, OSError):
        if rep["torch"] != "not installed":
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(device)
                rep["gpu"], rep["compute_capability"] = props.name, f"{props.major}.{props.minor}"
    return rep


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def _timed(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, repeat: int, batch: int = 8,
           fixed: int | None = None) -> tuple[np.ndarray, dict]:
    """Outputs for all images, and batch-1 latency (median/p95 after one warm-up run).
    fixed: a static batch size; chunks are padded to it and the padding dropped."""
    step = fixed or batch

    def chunk(x: np.ndarray) -> np.ndarray:
        n = len(x)
        if fixed and n < fixed:
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        return np.asarray(run(x), np.float32)[:n]

    out = np.concatenate([chunk(images[i : i + step]) for i in range(0, len(images), step)])
    one = images[:1]
    chunk(one)  # warm-up
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        chunk(one)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    lat = {"median_ms": round(statistics.median(times), 3), "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3)}
    return out, lat


def _torch_reference(art) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
    """A PyTorch model equal to the artifact's, when its weights can be rebuilt here."""
    if not available("torch"):
        return None, "PyTorch not installed"
    weights = art.manifest.details.get("weights")
    if weights in (None, "random"):
        return None, "artifact was exported with random weights; no PyTorch reference to rebuild"
    try:
        import torch

        from vpr_edge.models import build as B

        vocab = pca = None
        vfile = art.file("vocabulary", required=False)
        pfile = art.file("pca", required=False)
        if vfile:
            from vpr_edge.models import vocabulary as V

            vocab = V.load_vocabulary(vfile)
        if pfile:
            from vpr_edge.models import pca as P

            pca = P.load_pca(pfile)
        backbone = B.build_backbone(art.preset, weights, 0)
        model = B.VprModel(art.preset, backbone, B.build_aggregator(art.preset, vocab, pca)).eval()
        module = model.backbone if art.scope == "backbone" else model
    except (VprEdgeError, ImportError, AttributeError, TypeError) as exc:
        return None, f"PyTorch reference not rebuilt ({exc})"

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).float().numpy()

    return run, "PyTorch FP32"


def diagnose(artifact: Path, *, images: Path | None = None, limit: int = 16, repeat: int = 20,
             build: bool = False, device: int = 0) -> dict[str, Any]:
    """Run the artifact on every backend available here; returns outputs' comparisons and a verdict."""
    from vpr_edge.engines.build import missing_tensorrt_message, verify_images
    from vpr_edge.engines.fidelity import compare_outputs
    from vpr_edge.runtime.artifact import load_artifact
    from vpr_edge.runtime.ort_backend import OrtBackend

    art = load_artifact(artifact)
    imgs, db, q, positives, source = verify_images(art.preset.preprocess, images, limit)
    result: dict[str, Any] = {"artifact": str(artifact), "kind": art.kind, "precision": art.precision,
                              "images": source, "backends": {}, "comparisons": {}, "notes": []}
    outputs: dict[str, np.ndarray] = {}

    onnx_dir = artifact if art.kind == "onnx" else Path(art.manifest.details.get("onnx_artifact", ""))
    onnx_art = None
    if art.kind == "onnx":
        onnx_art = art
    elif onnx_dir and (onnx_dir / "manifest.json").exists():
        onnx_art = load_artifact(onnx_dir, kinds=("onnx",))
    if onnx_art is not None:
        with OrtBackend(onnx_art.file("onnx"), providers=["CPUExecutionProvider"], io_dtype=onnx_art.io_dtype) as ort_b:
            outputs["onnxruntime"], lat = _timed(ort_b.run, imgs, repeat, fixed=ort_b.batch_size)
        result["backends"]["onnxruntime"] = lat
    else:
        result["notes"].append("no ONNX artifact beside the engine: ONNX Runtime not compared")

    engine_dir = artifact if art.kind == "engine" else None
    tmp = None
    if art.kind == "onnx" and build:
        if not available("tensorrt"):
            result["notes"].append(missing_tensorrt_message(artifact))
        else:
            import tempfile

            from vpr_edge.engines.build import build_engine

            tmp = tempfile.TemporaryDirectory(prefix="vpr-edge-doctor-")
            engine_dir = Path(tmp.name) / "engine"
            build_engine(artifact, engine_dir, compare=False, device=device)
    elif art.kind == "onnx":
        result["notes"].append(
            "TensorRT engine not checked (give an engine artifact or --build-engine)"
            if available("tensorrt") else missing_tensorrt_message(artifact)
        )
    try:
        if engine_dir is not None:
            from vpr_edge.runtime.describer import open_backend

            eng = load_artifact(engine_dir, kinds=("engine",))
            backend = open_backend(eng, "trt", device=device)  # refuses a mismatched engine
            try:
                outputs["tensorrt"], lat = _timed(backend.run, imgs, repeat, batch=min(8, backend.max_batch),
                                                  fixed=backend.batch_size)
            finally:
                backend.close()
            result["backends"]["tensorrt"] = lat
    finally:
        if tmp is not None:
            tmp.cleanup()

    ref_run, why = _torch_reference(onnx_art or art)
    if ref_run is not None:
        outputs["pytorch"], lat = _timed(ref_run, imgs, repeat)
        result["backends"]["pytorch"] = lat
    else:
        result["notes"].append(why)

    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            result["comparisons"][f"{b} vs {a}"] = compare_outputs(outputs[a], outputs[b], db, q, positives)
    result["verdict"] = _verdict(result, art.precision)
    return result


def _verdict(result: dict[str, Any], precision: str) -> str:
    from vpr_edge.engines.fidelity import THRESHOLDS, check_fidelity

    backends = ", ".join(f"{k} {v['median_ms']} ms" for k, v in result["backends"].items())
    if not result["comparisons"]:
        return f"OK (only {backends or 'no backend'} ran here; nothing to compare): " + "; ".join(result["notes"])
    fails = []
    gate = precision if precision in THRESHOLDS else "fp16"  # FP32 artifacts: backends must agree at least as FP16 does
    for name, rep in result["comparisons"].items():
        for f in check_fidelity(rep, gate):
            fails.append(f"{name}: {f}")
    worst = min(r["cos_min"] for r in result["comparisons"].values())
    agree = min(r["top1_agreement"] for r in result["comparisons"].values())
    summary = f"{len(result['comparisons'])} comparison(s), cos min {worst:.5f}, top-1 agreement {agree:.3f}; latency {backends}"
    return ("FAIL: " + "; ".join(fails) + f" ({summary})") if fails else f"OK: {summary}"


def _run(args) -> int:
    env = environment_report(args.device)
    for key, val in env.items():
        print(f"{key:>22}: {val}")
    if args.artifact is None:
        print("verdict: OK (environment only; pass an artifact folder to check it)")
        return 0
    try:
        result = diagnose(args.artifact, images=args.images, limit=args.limit, repeat=args.repeat,
                          build=args.build_engine, device=args.device)
    except VprEdgeError as exc:
        print(f"verdict: FAIL: {exc}")
        return exc.exit_code
    for name, lat in result["backends"].items():
        print(f"{name:>22}: median {lat['median_ms']} ms, p95 {lat['p95_ms']} ms per image (batch 1)")
    for name, rep in result["comparisons"].items():
        print(f"{name:>22}: cos min {rep['cos_min']:.6f}, top-1 agreement {rep['top1_agreement']:.3f}, "
              f"non-finite {rep['nonfinite']}")
    for note in result["notes"]:
        print(f"{'note':>22}: {note}")
    print(f"verdict: {result['verdict']}")
    return 0 if not result["verdict"].startswith("FAIL") else 3
