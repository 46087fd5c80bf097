"""Images -> descriptors with an exported artifact: preprocess (numpy/Pillow, exact or fast, in a pool of
threads ahead of the backend: `runtime.pipeline`), a backend (ONNX Runtime, TensorRT, or the PyTorch
reference; `runtime.backends`), and for per-patch outputs numpy aggregation. No torch unless the PyTorch
backend is asked for."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from vpr_edge.artifact import Artifact, load_artifact
from vpr_edge.batching import run_batched
from vpr_edge.engines.precision import table
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge import imaging
from vpr_edge.imaging import ImageSource
from vpr_edge.runtime.aggregate import Aggregation
from vpr_edge.runtime import backends
from vpr_edge.runtime.backends import BackendOptions, open_backend
from vpr_edge.runtime import memory
from vpr_edge.runtime.pipeline import prefetch

STAGES = ("preprocess", "backbone", "aggregation")  # summed seconds; preprocess across its threads
BACKENDS = backends.names()


def check_precision(art: Artifact) -> None:
    """The artifact's precision and I/O type are ones the precision table knows."""
    if art.precision not in table.PRECISIONS:
        raise ArtifactError(f"{art.folder}: details.precision is {art.precision!r}, expected one of {table.names()}")
    allowed = table.get(art.precision).io_dtypes
    if art.io_dtype not in allowed:
        raise ArtifactError(f"{art.folder}: io_dtype {art.io_dtype!r} is not one {art.precision} artifacts declare ({allowed})")


def _name(item: Any) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"a {type(item).__name__} image"


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


@dataclass
class Described:
    """One image of a stream: its descriptor, or why there is none."""

    index: int  # position in the input
    item: Any  # what was given (path, array, ...)
    descriptor: np.ndarray | None  # float32 [dim]; None when the image could not be read
    error: str | None  # one line: unreadable image, or an untrustworthy (NaN/inf, zero) descriptor
    latency_s: float  # from taking the item off the input to its descriptor
    submitted: float = 0.0  # time.perf_counter() when the item was taken off the input
    raw: np.ndarray | None = None  # the backend's output for this image, when asked (keep_raw)
    size: tuple[int, int] | None = None  # decoded (h, w) of the source image

    @property
    def ok(self) -> bool:
        return self.error is None


class Describer:
    """`Describer.from_artifact(path).describe(images)` -> float32 [n, dim] descriptors;
    `.stream(images)` -> one `Described` per image, in order, errors in place."""

    def __init__(
        self, artifact: Artifact, backend: Any, aggregation: Aggregation | None, max_pixels: int | None = None,
        *, preprocess: str | None = None, channels: str = "rgb", workers: int | None = None,
    ):
        self.artifact = artifact
        self.backend = backend
        self.aggregation = aggregation
        self.max_pixels = max_pixels
        self.input_layout = artifact.input_layout
        # uint8-input artifacts take the fast path's uint8 output; float ones default to the exact path
        self.preprocess_mode = preprocess or ("fast" if self.input_layout == "uint8" else "exact")
        self.channels = channels
        self.workers = workers
        imaging.check(self.preprocess_mode, self.input_layout, channels)
        self._lock = threading.Lock()
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
        self.default_batch = self._default_batch()

    def _default_batch(self) -> int:
        """Images per backend run when the caller does not say: the network's fixed batch, else what the
        memory estimate fits in the budget (`runtime.memory`)."""
        fixed = getattr(self.backend, "batch_size", None)
        if fixed:
            return int(fixed)
        half = self.artifact.precision == "fp16" and getattr(self.backend, "name", "") == "trt"
        batch = memory.default_batch(self.preset, dtype_bytes=2 if half else 4)
        most = getattr(self.backend, "max_batch", None)
        return min(batch, most) if most else batch

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
        preprocess: str | None = None,
        channels: str = "rgb",
        workers: int | None = None,
        ort_graph: str = "auto",
        spin: str = "on",
    ) -> "Describer":
        """`verify=False` skips the file hashes (sizes are still checked); `options` overrides the
        individual backend arguments; `preprocess` 'exact' | 'fast' (default: exact, fast for uint8-input
        artifacts); `channels` of camera arrays ('rgb' | 'bgr'); `workers` preprocessing threads; `ort_graph`
        'auto' | 'portable' (`BackendOptions.ort_graph`); `spin`: ONNX Runtime's threads spin between ops ('on',
        ORT's default) or sleep ('off'; `BackendOptions.spin`)."""
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        art = load_artifact(path, verify=verify)
        check_precision(art)
        opts = options or BackendOptions(
            providers=tuple(providers) if providers else None, threads=threads, cuda_graph=cuda_graph, device=device,
            ort_graph=ort_graph, spin=spin,
        )
        be = open_backend(art, backend, opts)
        try:
            aggregation = None
            if be.output == "features":
                aggregation = Aggregation.for_preset(
                    art.preset, art.file("vocabulary", required=False), art.file("pca", required=False)
                )
            return cls(art, be, aggregation, max_pixels=max_pixels, preprocess=preprocess, channels=channels,
                       workers=workers)
        except BaseException:
            be.close()
            raise

    # -- stages ---------------------------------------------------------------------------------
    def preprocess(self, item: ImageSource, size: list | None = None) -> np.ndarray:
        """One image (path, PIL image or uint8 HxW[x3|x4] array) -> the network input: float32 [3, H, W],
        or uint8 [H, W, 3] for uint8-input artifacts. Thread-safe (the pipeline calls it from its pool);
        the decoded source (h, w) is appended to `size` when given."""
        t = time.perf_counter()
        x = imaging.prepare(item, self.preset.preprocess, self.preprocess_mode, self.input_layout,
                            max_pixels=self.max_pixels, channels=self.channels, size=size)
        dt = time.perf_counter() - t
        with self._lock:
            self.timings["preprocess"] += dt
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
        h, w = self.input_size
        if self.input_layout == "uint8":
            if x.ndim != 4 or tuple(x.shape[1:]) != (h, w, 3) or x.dtype != np.uint8:
                raise InputError(f"this artifact takes uint8 images [B, {h}, {w}, 3], got {x.dtype} {x.shape}")
        elif x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise InputError(f"expected preprocessed images [B, 3, {h}, {w}], got {x.shape}")

    def run_backend(self, x: np.ndarray, batch: int | None = None) -> np.ndarray:
        """Preprocessed images [B, 3, H, W] (uint8 [B, H, W, 3] for uint8-input artifacts) -> the backend's raw outputs (descriptors or features), in
        runs of `batch` images (default: `default_batch`)."""
        self._check_input(x)
        t = time.perf_counter()
        step = batch or self.default_batch
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
        """Preprocessed images (as `run_backend` takes them) -> descriptors float32 [B, dim]."""
        self._check_input(x)
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.aggregate(self.run_backend(x, batch))
        self.images += len(x)
        return out

    def stream(self, items: Iterable[ImageSource], batch: int | None = 1, *, workers: int | None = None,
               keep_raw: bool = False, sizes: bool = False) -> Iterator[Described]:
        """Images (any iterable, a camera generator included) -> one `Described` per image, in input order.

        Preprocessing runs `workers` threads ahead of the backend (default: the Describer's, else
        `pipeline.default_workers()`; 0: in this thread); `batch` images go through the backend together
        (1 for a live camera: a frame is answered before the next is waited for). An unreadable image, or
        one whose descriptor is NaN/inf or zero, comes back with `error` set and the stream goes on.
        `keep_raw`: also return each image's backend output; `sizes`: each source image's decoded (h, w).
        batch=None: `default_batch`."""
        batch = self.default_batch if batch is None else batch
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        workers = self.workers if workers is None else workers

        def one(item):
            size: list | None = [] if sizes else None
            x = self.preprocess(item, size)
            return x, (size[0] if size else None)

        group: list = []  # Prefetched items of the batch being gathered, failed ones included

        def flush() -> Iterator[Described]:
            good = [p for p in group if p.error is None]
            out = raw = None
            if good:
                x = np.stack([p.value[0] for p in good])
                raw = self.run_backend(x)
                out = self.aggregate(raw)
                self.images += len(good)
            problems = iter(row_problems(out) if out is not None else [])
            rows = iter(range(len(good)))
            for p in group:
                if p.error is not None:
                    yield Described(p.index, p.item, None, p.error, time.perf_counter() - p.submitted, p.submitted)
                    continue
                j = next(rows)
                problem = next(problems)
                err = f"{_name(p.item)}: its descriptor has {problem}; the model, its vocabulary or PCA is broken for this image" if problem else None
                yield Described(p.index, p.item, out[j], err, time.perf_counter() - p.submitted, p.submitted,
                                raw=raw[j] if keep_raw else None, size=p.value[1])
            group.clear()

        ready = 0
        for p in prefetch(items, one, workers=workers, depth=max(2 * batch, 2 * (workers or 1))):
            group.append(p)
            ready += p.error is None
            if ready == batch:
                yield from flush()
                ready = 0
        if group:
            yield from flush()

    def describe(self, items: Iterable[ImageSource], batch: int | None = None, progress: bool = False) -> np.ndarray:
        """Images -> float32 [n, dim] through the pipeline (`stream`; batch None: `default_batch`); an
        unreadable image raises InputError naming it. Rows are returned as computed (check untrusted ones
        with `row_problems`)."""
        batch = self.default_batch if batch is None else batch
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        items = list(items)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), unit="img", desc="describe")
        try:
            for d in self.stream(items, batch):
                if d.descriptor is None:
                    raise InputError(d.error)
                out[d.index] = d.descriptor
                if bar is not None:
                    bar.update(1)
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
