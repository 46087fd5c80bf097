"""ONNX Runtime sessions, built in one place for every stage (verification, calibration, overflow scans,
the runtime's backend), and run with the one batching rule (`vpr_edge.batching`).

onnxruntime is imported when a session is made, never at module import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vpr_edge.batching import run_batched
from vpr_edge.errors import ArtifactError, MissingDependencyError
from vpr_edge.lazy import lazy_import

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def resolve_providers_name(name: str) -> str:
    """A short EP name ('cuda', 'tensorrt', 'cpu') as ONNX Runtime spells it; full names pass through."""
    return _PROVIDER_NAMES.get(name.lower(), name)


def resolve_providers(providers: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Short names ('cuda', 'tensorrt', 'cpu') or full EP names -> EP list ending with CPU.

    Asking for an EP that this onnxruntime lacks is an error, not a silent CPU fallback: on a
    robot a silent 20x slowdown is worse than a clear message."""
    if not providers:
        return ["CPUExecutionProvider"]
    out = []
    for p in providers:
        name = resolve_providers_name(p)
        if name not in available:
            raise MissingDependencyError(
                f"execution provider {name} is not available in this onnxruntime (available: {', '.join(available)}); "
                "install onnxruntime-gpu: pip install 'vpr-edge[gpu]', or leave out --providers for CPU"
            )
        if name not in out:
            out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


X64_QUANT_PRECISION = "session.x64quantprecision"
ALLOW_SPINNING = "session.intra_op.allow_spinning"


def session_config(features: Sequence[str] | None = None, arch: str | None = None) -> dict[str, str]:
    """Session config entries every session gets on this CPU (`features`/`arch`: another CPU's).

    x86 CPUs without VNNI (AVX2, AVX-512F) run ORT's U8S8 integer GEMM through a saturating 16-bit
    intermediate (vpmaddubsw): INT8 outputs there are worse than the arithmetic the graph states, and than
    what TensorRT or a VNNI CPU computes (Corridor, ViT-S/14 INT8: cos mean 0.972 on an AVX2 EPYC, 0.991 on
    a VNNI Xeon), so a gate judged on such a CPU depended on it. ORT's documented `session.x64quantprecision`
    makes it use exact U8U8 products. Only there: on a VNNI/AMX Xeon it changed no output bit and doubled
    the INT8 ViT-S/14 time (22.4 -> 47.6 ms, batch 1), so VNNI CPUs (exact already) and ARM run without it."""
    import platform

    from vpr_edge.measure import cpu_features

    feats = set(cpu_features() if features is None else features)
    arch = (arch or platform.machine()).lower()
    if arch in ("x86_64", "amd64", "i386", "i686") and not feats & {"avx512_vnni", "avx_vnni"}:
        return {X64_QUANT_PRECISION: "1"}
    return {}


def session(
    model: str | Path | Any,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    optimize: bool = True,
    prepack: bool = True,
    weights_dir: str | Path | None = None,
    written_order: bool = False,
    spin: bool | None = None,
) -> Any:
    """An InferenceSession of `model` (a path, or an in-memory ModelProto).

    prepack=False runs on the loaded weights as they are instead of prepacking a second copy of every
    MatMul weight (~1x the weights resident instead of ~2x; for verification and calibration passes).
    optimize=False sees the graph as written (the FP16 overflow scan reads every tensor by name).
    written_order: run the nodes in the order the graph lists them (ORT's priority-based order) instead of
    ORT's default order, which may run a side branch late and keep its input alive the whole run
    (the overflow scan's reductions: 2.13 GB peak vs 0.48 GB on ViT-S/14, batch 4).
    weights_dir: for a ModelProto whose weights are external files in that folder (ONNX Runtime refuses
    weight paths outside the model's folder, so the graph is written there while the session loads).
    spin: False keeps ORT's intra-op threads from spinning while they wait for work between ops
    (`session.intra_op.allow_spinning` = 0); None leaves ORT's default (spinning). Spinning cuts the wake-up
    time of each op, but spinning threads hold cores that preprocessing threads running beside the session
    need (`BackendOptions.spin` for the runtime)."""
    ort = lazy_import("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: warnings about unused initialisers are noise here
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in session_config().items():
        opts.add_session_config_entry(key, value)
    if spin is not None:
        opts.add_session_config_entry(ALLOW_SPINNING, "1" if spin else "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if written_order:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        opts.enable_mem_pattern = False  # patterns are planned for the default order
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    eps = resolve_providers(providers, ort.get_available_providers())
    label = str(model) if isinstance(model, (str, Path)) else "an in-memory graph"
    try:
        if isinstance(model, (str, Path)):
            # a path (not bytes) so ORT finds external data (model.onnx.data) next to the model
            return ort.InferenceSession(str(model), opts, providers=eps)
        if weights_dir is None:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=eps)
        fd, tmp = tempfile.mkstemp(prefix=".session.", suffix=".onnx", dir=weights_dir)
        os.close(fd)
        try:
            lazy_import("onnx").save_model(model, tmp)
            return ort.InferenceSession(tmp, opts, providers=eps)
        finally:
            os.unlink(tmp)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped Fail/InvalidGraph classes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{label}: onnxruntime cannot load the model ({first}); re-export the artifact") from exc


def fixed_batch(sess: Any) -> int | None:
    """The static batch size of the session's first input, None when the batch axis is dynamic."""
    shape = sess.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def run_onnx(path_or_session: Any, images: np.ndarray, *, batch_size: int = 8, output: str | None = None) -> np.ndarray:
    """Outputs for `images` [n, 3, H, W] in float32, batch by batch (a CPU session of a path is made
    without prepacking: these are verification runs over a few images)."""
    sess = path_or_session if hasattr(path_or_session, "run") else session(path_or_session, prepack=False)
    inp = sess.get_inputs()[0]
    dtype = _NP.get(inp.type)
    if dtype is None:
        raise ArtifactError(f"ONNX input {inp.name} has type {inp.type}; expected float32 or float16 images")
    names = [output] if output else [sess.get_outputs()[0].name]

    def run(batch: np.ndarray) -> np.ndarray:
        return sess.run(names, {inp.name: np.ascontiguousarray(batch, dtype=dtype)})[0]

    return run_batched(run, images, batch=batch_size, fixed=fixed_batch(sess))
