"""Does an artifact agree across the backends available here? One verdict line for bug reports.

The artifact runs on a few images with every backend that can run it here, all through the runtime's
Describer on the same preprocessed arrays: ONNX Runtime (an ONNX artifact, or the ONNX artifact an
engine was built from), its TensorRT engine (where TensorRT and a GPU exist, after the manifest's
TensorRT/GPU check), and the PyTorch reference rebuilt from the manifest (`models.reference`: the
same preset, the artifact's vocabulary/PCA, and the same weights, checked by their id: a random
seed, or the sha256 of the checkpoint passed as `--weights PATH`). Every pair is compared with the
gate of the artifact's precision (FP32 artifacts: ONNX Runtime vs PyTorch with FP32's, any pair with
TensorRT with FP16's, which allows TF32 arithmetic). The verdict is FAIL when a comparison fails,
INCOMPLETE when nothing could be compared, else OK; it names every comparison it could not make and why.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.artifact import load_artifact
from vpr_edge.engines.precision import table
from vpr_edge.errors import VprEdgeError
from vpr_edge.fidelity import compare_outputs
from vpr_edge.lazy import available
from vpr_edge.measure import percentiles
from vpr_edge.verifyset import verify_set

EXACT = ("onnxruntime", "pytorch")  # backends that compute an FP32 graph in FP32 on this machine


def _latency(describer, images: np.ndarray, repeat: int) -> dict[str, float]:
    """Batch-1 latency through the Describer (one warm-up run), milliseconds."""
    one = images[:1]
    describer.run_backend(one)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        describer.run_backend(one)
        times.append((time.perf_counter() - t0) * 1e3)
    p = percentiles(times)
    return {"median_ms": round(p["p50"], 3), "p95_ms": round(p["p95"], 3)}


def _gate(precision: str, a: str, b: str) -> table.Precision:
    if precision == "fp32":
        return table.get("fp32" if {a, b} <= set(EXACT) else "fp16")
    return table.get(precision)


def diagnose(artifact: Path, *, images: Path | None = None, limit: int = 16, repeat: int = 20, build: bool = False,
             device: int = 0, weights: str | None = None) -> dict[str, Any]:
    """Run the artifact on every backend available here; returns latencies, comparisons, what could not
    run (and why) and the verdict."""
    from vpr_edge.engines.tensorrt.build import build_engine, missing_tensorrt_message
    from vpr_edge.runtime.backends import BackendOptions
    from vpr_edge.runtime.describer import Describer

    art = load_artifact(artifact)
    vs = verify_set(images, art.preset.preprocess, limit, with_fit=False)
    result: dict[str, Any] = {"artifact": str(artifact), "kind": art.kind, "precision": art.precision,
                              "images": vs.source, "backends": {}, "comparisons": {}, "not_compared": {}, "notes": []}
    outputs: dict[str, np.ndarray] = {}

    def run(name: str, folder: Path, backend: str, **opts: Any) -> None:
        with Describer.from_artifact(folder, backend=backend, options=BackendOptions(prepack=False, **opts)) as d:
            outputs[name] = d.forward(vs.images, batch=8)
            result["backends"][name] = _latency(d, vs.images, repeat)

    onnx_dir = artifact if art.kind == "onnx" else Path(art.manifest.details.get("onnx_artifact", ""))
    if art.kind == "onnx" or (onnx_dir != Path("") and (onnx_dir / "manifest.json").exists()):
        result["onnx"] = str(load_artifact(onnx_dir, kinds=("onnx",)).file("onnx"))
        run("onnxruntime", onnx_dir, "ort")
    else:
        result["not_compared"]["onnxruntime"] = f"the ONNX artifact the engine was built from ({onnx_dir}) is not here"

    engine_dir, tmp = (artifact if art.kind == "engine" else None), None
    if art.kind == "onnx" and build:
        if not available("tensorrt"):
            result["not_compared"]["tensorrt"] = missing_tensorrt_message(artifact)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="vpr-edge-doctor-")
            engine_dir = Path(tmp.name) / "engine"
            build_engine(artifact, engine_dir, device=device)
    elif art.kind == "onnx":
        result["not_compared"]["tensorrt"] = (
            "no engine given (pass an engine artifact or --build-engine)" if available("tensorrt")
            else missing_tensorrt_message(artifact)
        )
    try:
        if engine_dir is not None:
            run("tensorrt", engine_dir, "trt", device=device)  # refuses an engine built for another TensorRT/GPU
    finally:
        if tmp is not None:
            tmp.cleanup()

    if not available("torch"):
        result["not_compared"]["pytorch"] = "PyTorch is not installed (pip install 'vpr-edge[torch]')"
    else:
        try:
            run("pytorch", artifact, "torch", weights=weights)
        except VprEdgeError as exc:
            result["not_compared"]["pytorch"] = str(exc)

    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rep = compare_outputs(outputs[a], outputs[b], vs.db_idx, vs.q_idx, vs.positives)
            gate = _gate(art.precision, a, b)
            rep["gate"] = gate.name
            rep["failures"] = gate.gate(rep)
            result["comparisons"][f"{b} vs {a}"] = rep
    result["verdict"] = verdict(result)
    return result


def verdict(result: dict[str, Any]) -> str:
    backends = ", ".join(f"{k} {v['median_ms']} ms" for k, v in result["backends"].items())
    missing = "; ".join(f"{k}: {why}" for k, why in result["not_compared"].items())
    tail = f"; not compared: {missing}" if missing else ""
    comps = result["comparisons"]
    if not comps:
        return f"INCOMPLETE: nothing to compare (ran: {backends or 'no backend'}){tail}"
    fails = [f"{name}: {f}" for name, rep in comps.items() for f in rep["failures"]]
    worst = min(r["cos_min"] for r in comps.values())
    agree = min(r["top1_agreement"] for r in comps.values())
    summary = f"{len(comps)} comparison(s), cos min {worst:.5f}, top-1 agreement {agree:.3f}; latency {backends}"
    return ("FAIL: " + "; ".join(fails) + f" ({summary}){tail}") if fails else f"OK: {summary}{tail}"
