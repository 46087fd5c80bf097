"""The PyTorch reference as a benchmark variant, with the runtime Describer's interface
(`describe(paths, batch)`, `timings` per stage, `reset_timings()`, `close()`).

It is rebuilt from an artifact's manifest: the same preset, the same weights argument and the
artifact's own vocabulary.npz / pca.npz, so its descriptors live in the artifact's space.
Stages: preprocess = decode + torch resize/crop/normalise on the CPU; backbone = host-to-device
copy + backbone forward; aggregation = VLAD/GeM(+PCA) or the BoQ head + copy back. On CUDA the
clock is read after `torch.cuda.synchronize()`.

FP16 ("PyTorch FP16") casts the backbone to half and keeps the aggregator in FP32, as the exported
FP16 graphs keep the descriptor head in FP32.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpr_edge.errors import ConfigError
from vpr_edge.runtime.artifact import load_artifact

STAGES = ("preprocess", "backbone", "aggregation")


def resolve_weights(manifest_weights: str | None, weights: str | None, source: Path) -> str:
    """The weights argument for the reference: the given one, else the artifact's if it is reusable."""
    if weights:
        return weights
    if manifest_weights in ("random", "auto"):
        return manifest_weights
    raise ConfigError(
        f"{source} was exported from the checkpoint file {manifest_weights!r}; pass --weights PATH to "
        "build the PyTorch reference from the same file"
    )


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


class TorchDescriber:
    def __init__(self, model, device: str = "cpu", fp16: bool = False, info: dict[str, Any] | None = None):
        if fp16 and not str(device).startswith("cuda"):
            raise ConfigError("PyTorch FP16 needs a CUDA device; use --device cuda or drop the FP16 reference")
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.fp16 = fp16
        if fp16:
            self.model.backbone.half()
        self.preset = model.preset
        self.dim = self.preset.descriptor_dim
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.images = 0
        self._info = dict(info or {})

    @classmethod
    def from_artifact(
        cls,
        path: str | Path,
        weights: str | None = None,
        seed: int = 0,
        device: str = "cpu",
        fp16: bool = False,
    ) -> "TorchDescriber":
        from vpr_edge.models import build as B

        art = load_artifact(path)
        w = resolve_weights(art.manifest.details.get("weights"), weights, art.folder)
        preset = art.preset
        release = B.fetch_release(preset, w)
        backbone = B.build_backbone(preset, w, seed=seed, state_dict=release)
        torch.manual_seed(seed)  # random BoQ heads are drawn from the global generator, as build_model does
        aggregator = B.build_aggregator(
            preset, art.file("vocabulary", required=False), art.file("pca", required=False), state_dict=release
        )
        model = B.VprModel(preset, backbone, aggregator)
        info = {
            "backend": "pytorch",
            "device": str(device),
            "precision": "fp16" if fp16 else "fp32",
            "scope": "eager",
            "preset": preset.name,
            "weights": w,
            "seed": seed,
            "built_from": str(art.folder),
        }
        return cls(model, device=device, fp16=fp16, info=info)

    def info(self) -> dict[str, Any]:
        return {**self._info, "dim": self.dim}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _describe_chunk(self, chunk: list) -> np.ndarray:
        from vpr_edge.models.preprocess import load_tensor

        t0 = time.perf_counter()
        x = torch.stack([load_tensor(p, self.preset.preprocess) for p in chunk])
        t1 = time.perf_counter()
        x = x.to(self.device, dtype=torch.float16 if self.fp16 else torch.float32, non_blocking=False)
        feats = self.model.backbone(x)
        self._sync()
        t2 = time.perf_counter()
        out = self.model.aggregator(feats.float()).float().cpu().numpy()
        t3 = time.perf_counter()
        self.timings["preprocess"] += t1 - t0
        self.timings["backbone"] += t2 - t1
        self.timings["aggregation"] += t3 - t2
        self.images += len(chunk)
        return out

    def describe(self, items: Iterable, batch: int = 8, progress: bool = False) -> np.ndarray:
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        items = list(items)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        from tqdm import tqdm

        with tqdm(total=len(items), unit="img", desc="describe", disable=not progress) as bar:
            for i in range(0, len(items), batch):
                chunk = items[i : i + batch]
                out[i : i + len(chunk)] = self._describe_chunk(chunk)
                bar.update(len(chunk))
        return out

    def reset_timings(self) -> None:
        self.timings = dict.fromkeys(STAGES, 0.0)
        self.images = 0

    def gpu_peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / float(1 << 20)

    def reset_gpu_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "TorchDescriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
