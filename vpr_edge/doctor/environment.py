"""Versions of TensorRT / CUDA bindings / ONNX Runtime / PyTorch and the GPU of this machine."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from vpr_edge.errors import VprEdgeError
from vpr_edge.lazy import available
from vpr_edge.measure import cpu_features
from vpr_edge.onnxrt import session_config


def _version(module: str) -> str:
    if not available(module):
        return "not installed"
    mod = __import__(module)
    return str(getattr(mod, "__version__", "installed"))


def environment_report(device: int = 0) -> dict[str, Any]:
    """Versions, CPU features and GPU; never raises for what is missing."""
    rep: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "torch": _version("torch"),
        "tensorrt": _version("tensorrt"),
        "cuda_bindings": "cuda-python" if available("cuda.bindings.runtime") or available("cuda.cudart")
        else ("pycuda" if available("pycuda.driver") else "none"),
        "cpu_features": ",".join(cpu_features()) or "unknown",
        # how ONNX Runtime multiplies INT8 here (`onnxrt.session_config`): a user on an AVX2 CPU learns why INT8
        # is slower than published VNNI numbers, and that its results are nonetheless the exact ones
        "ort_int8_products": "exact U8U8 (session.x64quantprecision: no VNNI, slower)" if session_config()
        else "exact (VNNI or non-x86 integer kernels)",
        "gpu": "none",
        "compute_capability": None,
    }
    if rep["onnxruntime"] != "not installed":
        import onnxruntime

        rep["onnxruntime_providers"] = onnxruntime.get_available_providers()
    try:
        from vpr_edge.engines.tensorrt.cuda_api import open_cuda

        name, cc = open_cuda().device_info(device)
        rep["gpu"], rep["compute_capability"] = name, cc
    except (VprEdgeError, ImportError, OSError):
        if rep["torch"] != "not installed":
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(device)
                rep["gpu"], rep["compute_capability"] = props.name, f"{props.major}.{props.minor}"
    return rep
