"""The PyTorch reference as a runtime backend (`runtime.backends`, name 'torch'): the model an artifact
was exported from (`models.reference.reference_from_artifact`), run on the same preprocessed arrays
as ONNX Runtime and TensorRT, so `bench` and `doctor` compare backends on identical inputs.

It computes what the artifact's graph computes: the descriptor for descriptor-scope artifacts, the
per-patch features (aggregated by the Describer in numpy) for backbone-scope ones. FP16 casts the
backbone to half and keeps the head in FP32, as the exported FP16 graphs do; it needs CUDA.
On CUDA, run() synchronises before returning, so the Describer's clocks see the GPU's time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")


class TorchBackend:
    name = "torch"
    kinds = ("onnx", "engine")

    def __init__(self, model: Any, *, scope: str = "descriptor", device: str = "cpu", fp16: bool = False,
                 info: dict[str, Any] | None = None):
        dev = torch.device(device)
        if fp16 and dev.type != "cuda":
            raise ConfigError("PyTorch FP16 needs a CUDA device; use --device cuda or drop the FP16 reference")
        self.model = model.eval().to(dev)
        self.device = dev
        self.fp16 = fp16
        if fp16:
            self.model.backbone.half()
        self.scope = scope
        self.output = "features" if scope == "backbone" else "descriptor"
        self.batch_size: int | None = None
        self.max_batch: int | None = None
        self.input_hw = (None, None)
        self._info = dict(info or {})
        self.normalize: tuple[np.ndarray, np.ndarray] | None = None  # uint8-input artifacts: (mean, std) x 255

    @classmethod
    def for_artifact(cls, art: Any, options) -> "TorchBackend":
        from vpr_edge.models.reference import reference_from_artifact

        ref = reference_from_artifact(art, options.weights)
        device = options.device if isinstance(options.device, str) else "cpu"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if options.threads:
            torch.set_num_threads(int(options.threads))
        info = {"backend": "pytorch", "device": device, "precision": "fp16" if options.fp16 else "fp32",
                "scope": "eager", "preset": art.preset.name, "weights": ref.weights, "seed": ref.seed,
                "built_from": str(art.folder)}
        be = cls(ref.model, scope=art.scope, device=device, fp16=options.fp16, info=info)
        if art.input_layout == "uint8":  # the artifact normalises in its graph; the reference does it here
            pre = art.preset.preprocess
            be.normalize = (np.asarray(pre.mean, np.float32) * 255, np.asarray(pre.std, np.float32) * 255)
        return be

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, images: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise ConfigError("the PyTorch backend is closed")
        if self.normalize is not None:  # uint8 [B, H, W, 3] -> normalised float [B, 3, H, W]
            mean, std = self.normalize
            images = ((np.asarray(images, np.float32) - mean) / std).transpose(0, 3, 1, 2)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            feats = self.model.backbone(x.half() if self.fp16 else x)
            out = feats if self.scope == "backbone" else self.model.aggregator(feats.float())
            out = out.float().cpu().numpy()
        self._sync()
        return out

    def gpu_peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / float(1 << 20)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict:
        return dict(self._info)

    def __enter__(self) -> "TorchBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
