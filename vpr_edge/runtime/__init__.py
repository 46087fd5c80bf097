"""The lean runtime that runs on the robot: numpy/Pillow preprocessing, ONNX Runtime or TensorRT,
numpy aggregation, faiss maps. It never imports torch (a test enforces it).

Names are resolved lazily so `import vpr_edge.runtime` stays cheap:
    from vpr_edge.runtime import Describer
    with Describer.from_artifact("out/anyloc") as d:
        desc = d.describe(["a.jpg", "b.jpg"])
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Describer": "vpr_edge.runtime.describer",
    "open_backend": "vpr_edge.runtime.backends",
    "Backend": "vpr_edge.runtime.backends",
    "BackendOptions": "vpr_edge.runtime.backends",
    "Artifact": "vpr_edge.artifact",
    "load_artifact": "vpr_edge.artifact",
    "OrtBackend": "vpr_edge.runtime.ort_backend",
    "TrtBackend": "vpr_edge.runtime.trt_backend",
    "Aggregation": "vpr_edge.runtime.aggregate",
    "vlad_hard": "vpr_edge.runtime.aggregate",
    "gem": "vpr_edge.runtime.aggregate",
    "pca_whiten": "vpr_edge.runtime.aggregate",
    "resize_plan": "vpr_edge.imaging.geometry",
    "load_rgb": "vpr_edge.imaging.decode",
    "preprocess_rgb": "vpr_edge.imaging.exact",
    "preprocess_image": "vpr_edge.imaging.exact",
    "engine_mismatches": "vpr_edge.engines.tensorrt.environment",
    "check_engine_compatible": "vpr_edge.engines.tensorrt.environment",
    "Map": "vpr_edge.runtime.maps",
    "build_map": "vpr_edge.runtime.maps",
    "add_to_map": "vpr_edge.runtime.maps",
    "query_map": "vpr_edge.runtime.maps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vpr_edge.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
