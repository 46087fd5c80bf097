"""The images an artifact is verified or compared on: real images (a folder or a dataset, split by
`datasets.verify_split`) or a deterministic synthetic set whose queries are perturbed copies of its
database images (so recall is defined). One set type for export, precision lowering, engine checks
and doctor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpr_edge import datasets
from vpr_edge.presets import Preprocess

Loader = Callable[[Sequence[Path]], np.ndarray]  # image paths -> float32 [n, 3, H, W], preprocessed


@dataclass
class VerifySet:
    images: np.ndarray  # [n, 3, H, W] float32, preprocessed
    db_idx: np.ndarray
    q_idx: np.ndarray
    positives: list[np.ndarray] | None = None  # per query, indices into the database subset
    source: str = "synthetic"  # "synthetic" or the folder
    paths: list[str] = field(default_factory=list)
    # database-like images NOT in the verify set, for fitting a vocabulary/PCA when none is given:
    # centres fitted on the verified images themselves make some clusters' residual sums ~0, and
    # intra-normalisation then turns float noise into large descriptor differences
    fit_images: np.ndarray | None = None

    def describe(self) -> dict:
        return {
            "source": self.source,
            "n_images": int(len(self.images)),
            "n_database": int(len(self.db_idx)),
            "n_queries": int(len(self.q_idx)),
            "ground_truth": self.positives is not None,
            "n_fit_images": 0 if self.fit_images is None else int(len(self.fit_images)),
        }


def exact_loader(pre: Preprocess) -> Loader:
    """The runtime's exact numpy/Pillow preprocessing as a loader."""
    from vpr_edge.imaging.exact import preprocess_image

    h, w = pre.image_size

    def load(paths: Sequence[Path]) -> np.ndarray:
        out = np.empty((len(paths), 3, h, w), dtype=np.float32)
        for i, p in enumerate(paths):
            out[i] = preprocess_image(p, pre)
        return out

    return load


def synthetic(pre: Preprocess, n_db: int = 8, seed: int = 0, with_fit: bool = True) -> VerifySet:
    """Smooth random scenes (low-frequency noise) and, as queries, shifted + noisy copies of them."""
    rng = np.random.default_rng(seed)
    h, w = pre.image_size
    base = []
    for _ in range(n_db):
        coarse = rng.random((3, max(2, h // 16), max(2, w // 16))).astype(np.float32)
        img = np.kron(coarse, np.ones((16, 16), np.float32))[:, :h, :w]
        img = np.pad(img, ((0, 0), (0, max(0, h - img.shape[1])), (0, max(0, w - img.shape[2]))), mode="edge")
        base.append(img)
    queries = [np.clip(np.roll(b, 3, axis=2) + 0.05 * rng.standard_normal(b.shape).astype(np.float32), 0, 1) for b in base]
    raw = np.stack(base + queries)
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    images = ((raw - mean) / std).astype(np.float32)
    fit = synthetic(pre, 2 * n_db, seed + 1, with_fit=False).images if with_fit else None
    return VerifySet(
        images=images,
        db_idx=np.arange(n_db),
        q_idx=np.arange(n_db, 2 * n_db),
        positives=[np.array([i]) for i in range(n_db)],
        source="synthetic",
        fit_images=fit,
    )


def from_folder(folder: str | Path, pre: Preprocess, limit: int = 64, load: Loader | None = None,
                with_fit: bool = True) -> VerifySet:
    """At most `limit` images of `folder` (`datasets.verify_split`), preprocessed by `load` (default:
    the runtime's exact path); with_fit also loads up to `limit` other database-like images."""
    split = datasets.verify_split(folder, limit)
    load = load or exact_loader(pre)
    images = load(split.paths)
    fit = load(split.rest) if with_fit and split.rest else None
    n = len(split.paths)
    return VerifySet(images, np.arange(split.n_database), np.arange(split.n_database, n), split.positives,
                     split.source, [str(p) for p in split.paths], fit)


def verify_set(folder: str | Path | None, pre: Preprocess, limit: int = 64, *, seed: int = 0,
               load: Loader | None = None, with_fit: bool = True) -> VerifySet:
    """`from_folder` when a folder is given, else the synthetic set."""
    if folder is None:
        return synthetic(pre, seed=seed, with_fit=with_fit)
    return from_folder(folder, pre, limit, load=load, with_fit=with_fit)
