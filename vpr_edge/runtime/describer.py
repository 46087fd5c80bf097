"""Images -> descriptors with an exported artifact: preprocess (numpy/Pillow), a backend (ONNX Runtime,
TensorRT, or the PyTorch reference; `runtime.backends`), and for per-patch outputs numpy aggregation.
No torch unless the PyTorch backend is asked for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vpr_edge.artifact import Artifact, load_artifact
from vpr_edge.batching import run_batched
from vpr_edge.engines.precision import table
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.imaging import ImageSource, preprocess_image
from vpr_edge.runtime.aggregate import Aggregation
from vpr_edge.runtime import backends
from vpr_edge.runtime.backends import BackendOptions, open_backend

STAGES = ("preprocess", "backbone", "aggregation")
BACKENDS = backends.names()


def check_precision(art: Artifact) -> None:
    """The artifact's precision and I/O type are ones the precision table knows."""
    if art.precision not in table.PRECISIONS:
        raise ArtifactError(f"{art.folder}: details.precision is {art.precision!r}, expected one of {table.names()}")
    allowed = table.get(art.precision).io_dtypes
    if art.io_dtype not in allowed:
        raise ArtifactError(f"{art.folder}: io_dtype {art.io_dtype!r} is not one {art.precision} artifacts declare ({allowed})")


def row_problems(desc: np.ndarray) -> list[str | None]:
    """Per descriptor row, why it cannot be trusted (NaN/inf values, zero norm), else None."""
    out: list[str | None] = []
    for row in np.asarray(desc):
        if not np.isfinite(row).all():
            out.append(f"{int((~np.isfinite(row)).sum())} NaN/inf values")
        elif not np.any(row):
            out.append("zero norm")
        else:
            out.append(None)
    return out


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
        if getattr(backend, "output", "descriptor") == "features" and aggregation is None:
            raise ArtifactError(f"{artifact.folder}: the model outputs per-patch features but no aggregation was given")
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
        device: int | str = 0,
        max_pixels: int | None = None,
        *,
        verify: bool = True,
        options: BackendOptions | None = None,
    ) -> "Describer":
        """`verify=False` skips the file hashes (sizes are still checked); `options` overrides the
        individual backend arguments."""
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        art = load_artifact(path, verify=verify)
        check_precision(art)
        opts = options or BackendOptions(
            providers=tuple(providers) if providers else None, threads=threads, cuda_graph=cuda_graph, device=device
        )
        be = open_backend(art, backend, opts)
        try:
            aggregation = None
            if be.output == "features":
                aggregation = Aggregation.for_preset(
                    art.preset, art.file("vocabulary", required=False), art.file("pca", required=False)
                )
            return cls(art, be, aggregation, max_pixels=max_pixels)
        except BaseException:
            be.close()
            raise

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

    def _check_input(self, x: np.ndarray) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise InputError(
                f"expected preprocessed images [B, 3, {self.input_size[0]}, {self.input_size[1]}], got {x.shape}"
            )

    def run_backend(self, x: np.ndarray, batch: int | None = None) -> np.ndarray:
        """Preprocessed float32 [B, 3, H, W] -> the backend's raw outputs (descriptors or features), in
        runs of `batch` images (default: as many as the backend takes)."""
        self._check_input(x)
        t = time.perf_counter()
        step = batch or getattr(self.backend, "max_batch", None)
        out = run_batched(self.backend.run, x, batch=step, fixed=getattr(self.backend, "batch_size", None))
        self.timings["backbone"] += time.perf_counter() - t
        self._check_output(out)
        return out

    def aggregate(self, raw: np.ndarray) -> np.ndarray:
        """Backend outputs -> descriptors (numpy aggregation of per-patch features; descriptors pass)."""
        if self.aggregation is None:
            return np.ascontiguousarray(raw, dtype=np.float32)
        t = time.perf_counter()
        out = self.aggregation(raw)
        self.timings["aggregation"] += time.perf_counter() - t
        return np.ascontiguousarray(out, dtype=np.float32)

    def forward(self, x: np.ndarray, batch: int | None = None) -> np.ndarray:
        """Preprocessed float32 [B, 3, H, W] -> descriptors float32 [B, dim]."""
        self._check_input(x)
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.aggregate(self.run_backend(x, batch))
        self.images += len(x)
        return out

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
