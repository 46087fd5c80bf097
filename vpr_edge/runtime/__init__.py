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
    "open_backend": "vpr_edge.runtime.describer",
    "Artifact": "vpr_edge.runtime.artifact",
    "load_artifact": "vpr_edge.runtime.artifact",
    "OrtBackend": "vpr_edge.runtime.ort_backend",
    "TrtBackend": "vpr_edge.runtime.trt_backend",
    "Aggregation": "vpr_edge.runtime.aggregate",
    "vlad_hard": "vpr_edge.runtime.aggregate",
    "gem": "vpr_edge.runtime.aggregate",
    "pca_whiten": "vpr_edge.runtime.aggregate",
    "resize_plan": "vpr_edge.runtime.preprocess",
    "load_rgb": "vpr_edge.runtime.images",
    "preprocess_rgb": "vpr_edge.runtime.preprocess",
    "preprocess_image": "vpr_edge.runtime.preprocess",
    "engine_mismatches": "vpr_edge.runtime.engine_compat",
    "check_engine_compatible": "vpr_edge.runtime.engine_compat",
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
