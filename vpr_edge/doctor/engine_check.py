"""A built TensorRT engine vs ONNX Runtime on the same ONNX and the same images (the runtime's
backends through its Describer), recorded in the engine's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vpr_edge.errors import MissingDependencyError
from vpr_edge.fidelity import compare_outputs
from vpr_edge.manifest import Manifest
from vpr_edge.verifyset import verify_set


def compare_engine(engine_dir: Path, onnx_dir: Path, *, verify: Path | None = None, device: int = 0,
                   limit: int = 32) -> dict[str, Any]:
    """Engine vs ONNX Runtime (CPU) on the verify images (a folder, or the synthetic set)."""
    from vpr_edge.runtime.backends import BackendOptions
    from vpr_edge.runtime.describer import Describer

    outs = {}
    vs = None
    for name, folder in (("trt", engine_dir), ("ort", onnx_dir)):
        with Describer.from_artifact(folder, backend=name, options=BackendOptions(device=device, prepack=False)) as d:
            if vs is None:
                vs = verify_set(verify, d.preset.preprocess, limit, with_fit=False)
            outs[name] = d.run_backend(vs.images)
    report = compare_outputs(outs["ort"], outs["trt"], vs.db_idx, vs.q_idx, vs.positives)
    return {"images": vs.source, "reference": "ONNX Runtime CPU on the same ONNX", "report": report}


def record_engine_check(engine_dir: Path, onnx_dir: Path, *, verify: Path | None = None, device: int = 0) -> Manifest:
    """Run `compare_engine` and record it (or why it could not run) in the engine's manifest."""
    try:
        comparison = compare_engine(engine_dir, onnx_dir, verify=verify, device=device)
    except MissingDependencyError as exc:
        comparison = {"skipped": str(exc)}
    m = Manifest.load(engine_dir)
    m.verification["engine_vs_onnxruntime"] = comparison
    m.save(engine_dir)
    return m
