"""Images -> descriptors with an exported artifact: preprocess (numpy/Pillow), backend (ORT or
TensorRT), and for backbone-scope artifacts numpy aggregation. No torch anywhere."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.runtime.aggregate import Aggregation
from vpr_edge.runtime.artifact import Artifact, load_artifact
from vpr_edge.runtime.preprocess import ImageSource, preprocess_image

STAGES = ("preprocess", "backbone", "aggregation")
BACKENDS = ("auto", "ort", "trt")


def open_backend(
    art: Artifact,
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    cuda_graph: bool = False,
    device: int = 0,
    environment: dict | None = None,
):
    """The backend object for an artifact: ORT for kind 'onnx', TensorRT for kind 'engine'."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "trt" if art.kind == "engine" else "ort"
    if backend == "ort":
        if art.kind != "onnx":
            raise ConfigError(f"{art.folder} is a {art.kind} artifact; the ORT backend needs an ONNX artifact")
        from vpr_edge.runtime.ort_backend import OrtBackend

        return OrtBackend(art.file("onnx"), providers=providers, threads=threads, io_dtype=art.io_dtype)
    if art.kind != "engine":
        raise ConfigError(
            f"{art.folder} is an {art.kind} artifact; the TensorRT backend needs an engine: "
            f"build one with `vpr-edge build-engine {art.folder}`"
        )
    from vpr_edge.runtime.engine_compat import check_engine_compatible, current_environment
    from vpr_edge.runtime.trt_backend import TrtBackend

    env = environment if environment is not None else current_environment(device)
    check_engine_compatible(art.manifest.details, env, str(art.folder))
    return TrtBackend(art.file("engine"), device=device, cuda_graph=cuda_graph)


class Describer:
    """`Describer.from_artifact(path).describe(images)` -> float32 [n, dim] descriptors."""

    def __init__(
        self, artifact: Artifact, backend: Any, aggregation: Aggregation | None, max_pixels: int | None = None
    ):
        self.artifact = artifact
        self.backend = backend
        self.aggregation = aggregation
        self.max_pixels = max_pixels
        self.preset = artifact.preset
        self.manifest = artifact.manifest
        self.input_size: tuple[int, int] = tuple(self.preset.preprocess.image_size)
        self.dim = self.preset.descriptor_dim
        hw = getattr(backend, "input_hw", (None, None))
        for got, want in zip(hw, self.input_size):  # None: dynamic axis
            if got is not None and got != want:
                raise ArtifactError(
                    f"{artifact.folder}: model input is {hw[0]}x{hw[1]}, the manifest's preset says "
                    f"{self.input_size[0]}x{self.input_size[1]}; re-export the artifact"
                )
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.images = 0
        self._checked = False

    @classmethod
    def from_artifact(
        cls,
        path: str | Path,
        backend: str = "auto",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cuda_graph: bool = False,
        device: int = 0,
        max_pixels: int | None = None,
    ) -> "Describer":
        art = load_artifact(path)
        aggregation = None
        if art.scope == "backbone":
            aggregation = Aggregation.for_preset(
                art.preset, art.file("vocabulary", required=False), art.file("pca", required=False)
            )
        be = open_backend(art, backend, providers=providers, threads=threads, cuda_graph=cuda_graph, device=device)
        return cls(art, be, aggregation, max_pixels=max_pixels)

    # -- stages ---------------------------------------------------------------------------------
    def preprocess(self, item: ImageSource) -> np.ndarray:
        """One image (path, PIL image or uint8 HxW[x3|x4] array) -> float32 [3, H, W]."""
        t = time.perf_counter()
        x = preprocess_image(item, self.preset.preprocess, max_pixels=self.max_pixels)
        self.timings["preprocess"] += time.perf_counter() - t
        return x

    def _check_output(self, out: np.ndarray) -> None:
        if self._checked:
            return
        folder = self.artifact.folder
        if self.aggregation is None:
            if out.ndim != 2 or out.shape[1] != self.dim:
                raise ArtifactError(
                    f"{folder}: model output has shape {out.shape}, expected [B, {self.dim}]; re-export it"
                )
        elif out.ndim != 3 or out.shape[2] != self.preset.feature_dim:
            raise ArtifactError(
                f"{folder}: backbone output has shape {out.shape}, expected [B, N, {self.preset.feature_dim}]; re-export it"
            )
        self._checked = True

    def _run_backend(self, x: np.ndarray) -> np.ndarray:
        fixed = getattr(self.backend, "batch_size", None)
        step = fixed or getattr(self.backend, "max_batch", None) or len(x)
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            n = len(chunk)
            if fixed and n < fixed:  # fixed-batch model: pad with zeros, drop the padded rows
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), dtype=chunk.dtype)])
            outs.append(self.backend.run(chunk)[:n])
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [B, 3, H, W] -> descriptors float32 [B, dim]."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise InputError(
                f"expected preprocessed images [B, 3, {self.input_size[0]}, {self.input_size[1]}], got {x.shape}"
            )
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        t = time.perf_counter()
        out = self._run_backend(x)
        self.timings["backbone"] += time.perf_counter() - t
        self._check_output(out)
        if self.aggregation is not None:
            t = time.perf_counter()
            out = self.aggregation(out)
            self.timings["aggregation"] += time.perf_counter() - t
        self.images += len(x)
        return np.ascontiguousarray(out, dtype=np.float32)

    def describe(self, items: Iterable[ImageSource], batch: int = 8, progress: bool = False) -> np.ndarray:
        """Images -> float32 [n, dim]; any unreadable image raises InputError naming it."""
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        items = list(items)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), unit="img", desc="describe")
        try:
            for i in range(0, len(items), batch):
                chunk = items[i : i + batch]
                x = np.stack([self.preprocess(it) for it in chunk])
                out[i : i + len(chunk)] = self.forward(x)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return out

    # -- reporting & lifetime -------------------------------------------------------------------
    def reset_timings(self) -> None:
        self.timings = dict.fromkeys(STAGES, 0.0)
        self.images = 0

    def timing_summary(self) -> dict[str, float]:
        """Accumulated seconds per stage and milliseconds per image."""
        n = max(self.images, 1)
        out = {f"{k}_s": v for k, v in self.timings.items()}
        out.update({f"{k}_ms_per_image": 1000.0 * v / n for k, v in self.timings.items()})
        out["images"] = self.images
        return out

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> "Describer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
