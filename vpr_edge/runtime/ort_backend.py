"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when asked for.

Sessions come from the one builder, `vpr_edge.onnxrt.session`. A float artifact may carry a second graph
for ONNX Runtime only (`model.ort.onnx`, role `onnx-ort`: each attention one contrib `Attention` node,
checked against the portable graph at export; `vpr_edge.engines.ort_graph`); it is run unless the caller
asks for the portable graph or the TensorRT EP, which takes standard ops."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vpr_edge import onnxrt
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.runtime.backends import ORT_GRAPHS, SPIN

resolve_providers = onnxrt.resolve_providers  # the runtime's public name for it


def _spin(choice: str) -> bool | None:
    """BackendOptions.spin -> onnxrt.session's spin: None (ORT's default, which spins) for 'on', False for 'off'."""
    if choice not in SPIN:
        raise ConfigError(f"spin must be one of {', '.join(SPIN)}, got {choice!r}")
    return None if choice == "on" else False


def graph_for(art: Any, options) -> Path:
    """The graph file ONNX Runtime runs for `art` under `options` (`BackendOptions.ort_graph`)."""
    choice = getattr(options, "ort_graph", "auto")
    if choice not in ORT_GRAPHS:
        raise ConfigError(f"--ort-graph must be one of {', '.join(ORT_GRAPHS)}, got {choice!r}")
    fused = art.file("onnx-ort", required=False)
    eps = [onnxrt.resolve_providers_name(p) for p in (options.providers or ())]
    if fused is None or choice == "portable" or "TensorrtExecutionProvider" in eps:
        return art.file("onnx")
    return fused


class OrtBackend:
    """Runs `model.onnx`: images [B, 3, H, W] -> first output ('descriptor' or 'features')."""

    name = "ort"
    kinds = ("onnx",)

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        io_dtype: str = "float32",
        prepack: bool = True,
        spin: bool | None = None,
    ) -> None:
        ort = lazy_import("onnxruntime")
        if io_dtype not in ("float16", "float32"):
            raise ConfigError(f"io_dtype must be float16 or float32, got {io_dtype!r}")
        self.path = Path(model_path)
        self.graph = "portable"
        self.providers = onnxrt.resolve_providers(providers, ort.get_available_providers())
        self.spin = spin
        self.session = onnxrt.session(self.path, providers=self.providers, threads=threads, prepack=prepack, spin=spin)
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1:
            raise ArtifactError(f"{self.path}: expected one input 'images', got {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.output = "features" if self.output_name == "features" else "descriptor"
        shape = inputs[0].shape
        # uint8 input (`vpr-export --input uint8`): [B, H, W, 3] RGB, normalised inside the graph
        self.input_layout = "uint8" if inputs[0].type == "tensor(uint8)" else "float"
        if len(shape) != 4:
            want = "[B, H, W, 3]" if self.input_layout == "uint8" else "[B, 3, H, W]"
            raise ArtifactError(f"{self.path}: input must be {want}, got {shape}")
        self.batch_size: int | None = onnxrt.fixed_batch(self.session)
        self.max_batch: int | None = self.batch_size
        hw = shape[1:3] if self.input_layout == "uint8" else shape[2:]
        self.input_hw: tuple[int | None, int | None] = tuple(s if isinstance(s, int) else None for s in hw)
        self.io_dtype = np.float16 if io_dtype == "float16" else np.float32
        self.input_dtype = np.uint8 if self.input_layout == "uint8" else self.io_dtype

    @classmethod
    def for_artifact(cls, art: Any, options) -> "OrtBackend":
        be = cls(graph_for(art, options), providers=options.providers, threads=options.threads,
                 io_dtype=art.io_dtype, prepack=options.prepack, spin=_spin(options.spin))
        be.graph = "fused attention" if be.path.name != art.file("onnx").name else "portable"
        return be

    def run(self, images: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise ConfigError(f"{self.path}: backend is closed")
        x = np.ascontiguousarray(images, dtype=self.input_dtype)
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"backend": "ort", "providers": list(self.providers), "model": str(self.path), "graph": self.graph,
                "spin": "off" if self.spin is False else "on"}
