"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vpr_edge.errors import ArtifactError, ConfigError, MissingDependencyError
from vpr_edge.lazy import lazy_import

_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def resolve_providers(providers: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Short names ('cuda', 'tensorrt', 'cpu') or full EP names -> EP list ending with CPU.

    Asking for an EP that this onnxruntime lacks is an error, not a silent CPU fallback: on a
    robot a silent 20x slowdown is worse than a clear message."""
    if not providers:
        return ["CPUExecutionProvider"]
    out = []
    for p in providers:
        name = _PROVIDER_NAMES.get(p.lower(), p)
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


class OrtBackend:
    """Runs `model.onnx`: images [B, 3, H, W] -> first output ('descriptor' or 'features')."""

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        io_dtype: str = "float32",
    ) -> None:
        ort = lazy_import("onnxruntime")
        self.path = Path(model_path)
        self.providers = resolve_providers(providers, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
        try:
            # a path (not bytes) so ORT finds external data (model.onnx.data) next to the model
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped Fail/InvalidGraph classes
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(
                f"{self.path}: onnxruntime cannot load the model ({first}); re-export the artifact"
            ) from exc
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1:
            raise ArtifactError(f"{self.path}: expected one input 'images', got {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise ArtifactError(f"{self.path}: input must be [B, 3, H, W], got {shape}")
        self.batch_size: int | None = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_hw: tuple[int | None, int | None] = tuple(s if isinstance(s, int) else None for s in shape[2:])
        self.io_dtype = np.float16 if io_dtype == "float16" else np.float32
        if io_dtype not in ("float16", "float32"):
            raise ConfigError(f"io_dtype must be float16 or float32, got {io_dtype!r}")

    def run(self, images: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise ConfigError(f"{self.path}: backend is closed")
        x = np.ascontiguousarray(images, dtype=self.io_dtype)
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"backend": "ort", "providers": list(self.providers), "model": str(self.path)}
