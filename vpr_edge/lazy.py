"""Heavy optional dependencies are imported through here, so a missing one names its pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from vpr_edge.errors import MissingDependencyError

# module -> extra of vpr-edge that installs it
_EXTRA = {
    "torch": "torch",
    "torchvision": "torch",
    "timm": "torch",
    "onnx": "export",
    "onnxscript": "export",
    "onnxconverter_common": "export",
    "onnxruntime": "runtime",
    "faiss": "runtime",
    "PIL": "runtime",
    "tensorrt": "tensorrt",
    "cuda": "tensorrt",
    "pycuda": "tensorrt",
    "matplotlib": "bench",
    "psutil": "runtime",
    "av": "video",
}


def extra_for(module: str) -> str | None:
    """The vpr-edge extra that installs `module` (None if it is not an optional dependency)."""
    return _EXTRA.get(module.split(".")[0])


def lazy_import(name: str) -> ModuleType:
    """Import `name` or raise a one-line error naming the extra that provides it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        extra = _EXTRA.get(top, top)
        raise MissingDependencyError(
            f"'{name}' is not installed ({exc}); install it with: pip install 'vpr-edge[{extra}]'"
        ) from exc


def available(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
