"""Backends: what runs an artifact's network, behind one small protocol, and the registry that opens them.

A backend takes preprocessed images [B, 3, H, W] and returns the network's output as float32: the
descriptor, or per-patch features that the Describer aggregates in numpy (`output`). It says how many
images it takes per run (`batch_size` when fixed, else up to `max_batch`; the Describer batches with
the one rule of `vpr_edge.batching`), its input size, and frees what it holds in an idempotent
`close()`. Adding a backend is one module with a class that has `for_artifact(art, options)` plus one
line in `_REGISTRY`.

| name  | runs                                         | for artifacts of kind |
|-------|----------------------------------------------|-----------------------|
| ort   | ONNX Runtime (CPU; CUDA/TensorRT EPs)         | onnx                  |
| trt   | a serialized TensorRT engine                 | engine                |
| torch | the PyTorch reference rebuilt from the manifest (`models.reference`) | onnx, engine |
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vpr_edge.errors import ConfigError


@runtime_checkable
class Backend(Protocol):
    name: str
    output: str  # 'descriptor' | 'features'
    batch_size: int | None  # fixed batch size of the network, None when it takes any
    max_batch: int | None  # most images per run (None: no limit)
    input_hw: tuple[int | None, int | None]

    def run(self, images: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class BackendOptions:
    """Everything a caller may ask of a backend; each backend reads what applies to it."""

    providers: tuple[str, ...] | None = None  # ort: execution providers ('cuda', 'tensorrt', ...)
    threads: int | None = None  # ort/torch: CPU threads
    prepack: bool = True  # ort: prepack weights (False: ~1x the weights resident, for verification runs)
    ort_graph: str = "auto"  # ort: 'auto' (the artifact's fused-attention graph where it has one, not on the
    # TensorRT EP) or 'portable' (the standard-ops model.onnx TensorRT builds from)
    spin: str = "on"  # ort: intra-op threads spin between ops ('on': ORT's default) or sleep ('off'); measured on
    # 2 cores beside the preprocessing pool: no consistent difference (benchmarks/results/ort_spin)
    cuda_graph: bool = False  # trt: replay the engine as a CUDA graph
    device: int | str = 0  # trt: CUDA device index; torch: 'cpu', 'cuda', 'cuda:1'
    environment: dict | None = None  # trt: the machine description (default: detected)
    weights: str | None = None  # torch: the checkpoint the artifact was exported from
    fp16: bool = False  # torch: half-precision backbone (CUDA)


# name -> (module, class); the class has for_artifact(art, options) and `kinds` (artifact kinds it runs)
_REGISTRY: dict[str, tuple[str, str]] = {
    "ort": ("vpr_edge.runtime.ort_backend", "OrtBackend"),
    "trt": ("vpr_edge.runtime.trt_backend", "TrtBackend"),
    "torch": ("vpr_edge.models.torch_backend", "TorchBackend"),
}
DEFAULT_FOR_KIND = {"onnx": "ort", "engine": "trt"}


ORT_GRAPHS = ("auto", "portable")
SPIN = ("on", "off")


def names() -> tuple[str, ...]:
    return ("auto", *_REGISTRY)


def backend_class(name: str) -> Any:
    if name not in _REGISTRY:
        raise ConfigError(f"backend must be one of {', '.join(names())}, got {name!r}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def open_backend(art: Any, name: str = "auto", options: BackendOptions | None = None) -> Backend:
    """The backend `name` for artifact `art` ('auto': TensorRT for engines, ONNX Runtime for ONNX)."""
    if name == "auto":
        name = DEFAULT_FOR_KIND.get(art.kind, "ort")
    cls = backend_class(name)
    if art.kind not in cls.kinds:
        hint = f"build one with `vpr-edge build-engine {art.folder}`" if name == "trt" else "use the ort backend"
        raise ConfigError(f"{art.folder} is an {art.kind} artifact; the {name} backend runs {', '.join(cls.kinds)} artifacts: {hint}")
    return cls.for_artifact(art, options or BackendOptions())
