"""Running an ONNX file with ONNX Runtime on CPU: the reference every precision is checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.errors import ArtifactError
from vpr_edge.lazy import lazy_import

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cpu_session(path: str | Path, *, threads: int = 0, optimize: bool = True, prepack: bool = True) -> Any:
    """prepack=False: run on the loaded weights as they are instead of prepacking a second copy of every
    MatMul weight (~1x the weights resident instead of ~2x; for verification and calibration passes)."""
    ort = lazy_import("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def run_onnx(path_or_session: Any, images: np.ndarray, *, batch_size: int = 8, output: str | None = None) -> np.ndarray:
    """Outputs for `images` [n, 3, H, W] float32, in float32, batch by batch."""
    sess = path_or_session if hasattr(path_or_session, "run") else cpu_session(path_or_session)
    inp = sess.get_inputs()[0]
    dtype = _NP.get(inp.type)
    if dtype is None:
        raise ArtifactError(f"ONNX input {inp.name} has type {inp.type}; expected float32 or float16 images")
    names = [output] if output else [sess.get_outputs()[0].name]
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
    if fixed:  # a static-batch export takes exactly that many images per run
        batch_size = fixed
        pad = (-len(images)) % fixed
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        n_real = len(images) - pad
    else:
        n_real = len(images)
    outs = []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size], dtype=dtype)
        outs.append(np.asarray(sess.run(names, {inp.name: batch})[0], dtype=np.float32))
    return np.concatenate(outs, axis=0)[:n_real]
