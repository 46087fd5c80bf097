"""The images an artifact is verified on: real images (a folder or a dataset) or a deterministic
synthetic set whose queries are perturbed copies of its database images (so recall is defined)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpr_edge.errors import InputError
from vpr_edge.presets import Preprocess


@dataclass
class VerifySet:
    images: np.ndarray  # [n, 3, H, W] float32, preprocessed
    db_idx: np.ndarray
    q_idx: np.ndarray
    positives: list[np.ndarray] | None  # per query, indices into the database subset
    source: str  # "synthetic" or the folder
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


def from_folder(folder: Path, pre: Preprocess, limit: int = 64) -> VerifySet:
    """A dataset root (database/ + queries/, with ground truth) or a plain folder of images
    (first half database, second half queries, no ground truth). At most `limit` images."""
    from vpr_edge import datasets
    from vpr_edge.models.preprocess import load_batch

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--verify {folder}: not a folder; give a folder of images or a dataset root")
    if (folder / "database").is_dir() or (folder / "images").is_dir() or (folder / "ref").is_dir():
        ds = datasets.load_dataset(folder)
        keep_db = datasets.evenly_spaced(len(ds.database), limit // 2)
        remap = {int(old): new for new, old in enumerate(keep_db)}
        keep_q, positives = [], []
        for qi in datasets.evenly_spaced(len(ds.queries), limit - len(keep_db)):
            pos = [remap[int(p)] for p in ds.positives[qi] if int(p) in remap]
            keep_q.append(qi)
            positives.append(np.asarray(pos, dtype=np.int64))
        paths = [ds.database[i] for i in keep_db] + [ds.queries[i] for i in keep_q]
        images = load_batch(paths, pre).numpy()
        n_db = len(keep_db)
        rest = [p for i, p in enumerate(ds.database) if i not in set(keep_db.tolist())]
        fit = load_batch([rest[i] for i in datasets.evenly_spaced(len(rest), limit)], pre).numpy() if rest else None
        return VerifySet(images, np.arange(n_db), np.arange(n_db, len(paths)), positives, str(folder),
                         [str(p) for p in paths], fit)
    paths = datasets.list_images(folder)
    if len(paths) < 4:
        raise InputError(f"--verify {folder}: found {len(paths)} images, need at least 4 (half database, half queries)")
    keep = set(datasets.evenly_spaced(len(paths), limit).tolist())
    rest = [p for i, p in enumerate(paths) if i not in keep]
    paths = [p for i, p in enumerate(paths) if i in keep]
    images = load_batch(paths, pre).numpy()
    fit = load_batch([rest[i] for i in datasets.evenly_spaced(len(rest), limit)], pre).numpy() if rest else None
    half = len(paths) // 2
    return VerifySet(images, np.arange(half), np.arange(half, len(paths)), None, str(folder),
                     [str(p) for p in paths], fit)
