"""OnnxFromTorch: write a torch module to ONNX at a fixed spatial size (batch fixed or dynamic)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from vpr_edge.errors import ArtifactError

log = logging.getLogger(__name__)

# Weights go to `<name>.data` above this size: protobuf cannot hold more than 2 GB, and below
# that a single-file save still serialises a second in-memory copy of every weight.
EXTERNAL_DATA_BYTES = 512 * 2**20
INPUT_NAME = "images"


def param_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def onnx_from_torch(
    module,
    image_size: tuple[int, int],
    path: Path,
    *,
    output_name: str,
    batch: int | None = None,
    opset: int = 18,
) -> Path:
    """Export `module(images[B,3,H,W])` to `path`. batch=None makes the batch axis dynamic."""
    import torch

    h, w = image_size
    example = torch.zeros(batch or 2, 3, h, w)
    dynamic = None if batch else {"images": {0: torch.export.Dim("batch", min=1, max=1024)}}
    external = param_bytes(module) > EXTERNAL_DATA_BYTES

    class _Named(torch.nn.Module):
        # the exporter names graph inputs after forward()'s argument
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images)

    wrapped = _Named(module).eval()
    # eval() drops eval-time caches (BoQ's query self-attention); recompute them so the graph holds
    # image-independent results as constants
    for sub in wrapped.modules():
        if sub is not wrapped and callable(getattr(sub, "freeze", None)):
            sub.freeze()
    sink = io.StringIO()
    # onnxscript's optimizer warns once per multi-output Split it leaves unfolded (BoQ-ResNet50: 8 lines)
    quiet = logging.getLogger("onnxscript.optimizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                opset_version=opset,
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
            )
            program.save(str(path), external_data=external)
    except OSError as exc:
        raise ArtifactError(f"writing {path} failed: {exc.strerror or exc}; check disk space and permissions") from exc
    finally:
        quiet.setLevel(level)
    log.debug(sink.getvalue())
    return path


def onnx_files(path: Path) -> list[str]:
    """The model file and its external-data file(s), by name, relative to the folder."""
    import onnx

    names = {path.name}
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return sorted(names)
