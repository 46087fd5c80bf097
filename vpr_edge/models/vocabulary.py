"""Fitting VLAD vocabularies: streaming cosine k-means over facet features (faiss), and AnyLoc's
released `c_centers.pt` imported as a vocabulary.

The file format and the `Vocabulary` record are torch-free and live in `vpr_edge.fitted` (the
runtime reads them too). AnyLoc's `c_centers.pt` is a bare [K, D] tensor: without a preset it
carries no provenance, so only its shape can be checked.

Only numpy at module level; torch and faiss are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.fitted import Vocabulary, vocabulary_details
from vpr_edge.lazy import lazy_import
from vpr_edge.presets import Preset

log = logging.getLogger(__name__)

DEFAULT_PER_IMAGE = 1000  # patches sampled per image
DEFAULT_MAX_PATCHES = 200_000  # reservoir size: 200k x 1536 floats = 1.2 GB for ViT-G
DEFAULT_NITER = 100  # fast_pytorch_kmeans' max_iter, which AnyLoc used


def import_faiss():
    """faiss, without its loader's INFO lines about which SIMD build it found (noise on the CLI)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return lazy_import("faiss")


def import_anyloc_centers(path: str | Path, preset: Preset | None = None, weights: str | None = None) -> Vocabulary:
    """AnyLoc's released `c_centers.pt` ([K, D] tensor) -> Vocabulary (meta for `preset` if given, checked)."""
    from vpr_edge.models.weights import torch_load_refusal

    torch = lazy_import("torch")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; pass AnyLoc's c_centers.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for a bad file
        raise ArtifactError(torch_load_refusal(path, exc, "AnyLoc's [K, D] centre tensor")) from None
    if isinstance(obj, dict) and len(obj) == 1:  # tolerate {'c_centers': tensor}
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
        got = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise ArtifactError(f"{path} should hold AnyLoc's [K, D] centre tensor, got {got}")
    centers = obj.detach().to(torch.float32).numpy()
    details = {
        "source": "anyloc-c_centers",
        "source_file": path.name,
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    if preset is None:
        vocab = Vocabulary(centers, details | vocabulary_details(*centers.shape), path)
    else:
        vocab = Vocabulary.for_preset(centers, preset, weights, **details)
        vocab.path = path
        vocab.check_for(preset, weights)
    return vocab


def load_vocabulary(path: str | Path, preset: Preset | None = None, weights: str | None = None) -> Vocabulary:
    """A `.npz` from `vpr-edge vocab fit/import`, or AnyLoc's `c_centers.pt`; checked against `preset` if given."""
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        vocab = import_anyloc_centers(path)
        if preset is not None:
            vocab.check_for(preset, weights)
        return vocab
    return Vocabulary.load(path, preset, weights)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


class Reservoir:
    """Uniform sample of at most `capacity` rows from a stream (Algorithm R), in a fixed buffer."""

    def __init__(self, capacity: int, dim: int, rng: np.random.Generator):
        if capacity < 1:
            raise ConfigError(f"reservoir capacity must be >= 1, got {capacity}")
        self.buffer = np.empty((capacity, dim), dtype=np.float32)
        self.seen = 0
        self.rng = rng

    @property
    def capacity(self) -> int:
        return self.buffer.shape[0]

    def add(self, rows: np.ndarray) -> None:
        m = rows.shape[0]
        free = max(0, min(m, self.capacity - self.seen))
        if free:
            self.buffer[self.seen : self.seen + free] = rows[:free]
        if free < m:
            t = np.arange(self.seen + free, self.seen + m)
            j = self.rng.integers(0, t + 1)  # row t replaces slot j with probability capacity / (t + 1)
            keep = j < self.capacity
            # sequential semantics for repeated slots: numpy fancy assignment keeps the last write
            self.buffer[j[keep]] = rows[free:][keep]
        self.seen += m

    def rows(self) -> np.ndarray:
        return self.buffer[: min(self.seen, self.capacity)]


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator, sample: int = 20_000) -> np.ndarray:
    """k-means++ seeds for unit rows (D^2 sampling with the chord distance 2 - 2 cos) from a subsample.

    faiss (and AnyLoc's fast_pytorch_kmeans) start from k random patches; on features with
    well-separated clusters that often leaves two centres in one cluster and one covering two.
    """
    if x.shape[0] > sample:
        x = x[rng.choice(x.shape[0], sample, replace=False)]
    first = x[rng.integers(x.shape[0])]
    seeds = [first]
    d2 = np.maximum(2.0 - 2.0 * (x @ first), 0.0).astype(np.float64)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
        seeds.append(x[i])
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[i]), 0.0))
    return np.ascontiguousarray(np.stack(seeds), dtype=np.float32)


def _l2rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def fit_vocabulary(
    feature_iter: Iterable[np.ndarray | tuple[Any, np.ndarray]],
    k: int | None = None,
    dim: int | None = None,
    per_image: int = DEFAULT_PER_IMAGE,
    seed: int = 0,
    progress: bool = True,
    *,
    preset: Preset | None = None,
    source: str = "vpr-edge vocab fit",
    max_patches: int = DEFAULT_MAX_PATCHES,
    niter: int = DEFAULT_NITER,
    weights: str | None = None,
    **details: Any,
) -> Vocabulary:
    """Streaming cosine k-means over per-image patch features -> Vocabulary.

    `feature_iter` yields [N, dim] arrays (or (path, array) pairs, as iter_image_features does).
    `k`/`dim` default to the preset's clusters / feature dim. From each image at most `per_image`
    patches are drawn at random; they go into a reservoir of at most `max_patches` rows (uniform
    over the stream), so memory is bounded whatever the number of images. Patches are
    L2-normalised and clustered by faiss spherical k-means (cosine, k-means++ seeds from `seed`),
    then the stored centres are set the way AnyLoc's are: fast_pytorch_kmeans in 'cosine' mode
    assigns by cosine similarity but updates each centroid as the plain mean of its (normalised)
    members and never re-normalises it, so AnyLoc's c_centers are **raw means of the
    L2-normalised members** (norm < 1, not unit vectors). We take faiss's final assignment and
    store those raw means. A cluster the final assignment leaves empty (rare: faiss splits empty
    clusters while training) keeps faiss's unit centroid; `meta["empty_clusters"]` counts them.
    `weights`: the weights id of the network the features came from (recorded in the space).
    """
    faiss = import_faiss()
    from tqdm import tqdm

    if preset is not None:
        k = k or preset.aggregator.clusters
        dim = dim or preset.feature_dim
    if not k or not dim or k < 1 or dim < 1 or per_image < 1:
        raise ConfigError(f"fit_vocabulary needs k, dim, per_image >= 1 (got {k}, {dim}, {per_image})")
    rng = np.random.default_rng(seed)
    res = Reservoir(max_patches, dim, rng)
    images = 0
    for item in tqdm(feature_iter, desc="vocabulary", unit="img", disable=not progress):
        feats = item[1] if isinstance(item, tuple) else item
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise InputError(f"image {images}: features must be [N, {dim}], got {feats.shape}")
        if feats.shape[0] > per_image:
            feats = feats[rng.choice(feats.shape[0], per_image, replace=False)]
        res.add(_l2rows(feats))
        images += 1
    x = np.ascontiguousarray(res.rows())
    if x.shape[0] < k:
        raise InputError(
            f"k-means with {k} clusters needs at least {k} patches, got {x.shape[0]} from {images} images; "
            "give more images or fewer --clusters"
        )
    if x.shape[0] < 39 * k:
        log.warning("only %d patches for %d clusters (faiss suggests >= %d); centres may be noisy", x.shape[0], k, 39 * k)
    km = faiss.Kmeans(
        dim, k, niter=niter, spherical=True, seed=int(seed) % (2**31), verbose=False,
        max_points_per_centroid=x.shape[0] // k + 1, min_points_per_centroid=1,
    )  # fmt: skip
    km.train(x, init_centroids=kmeans_pp_init(x, k, rng))
    _, labels = km.index.search(x, 1)
    labels = labels[:, 0]
    counts = np.bincount(labels, minlength=k)
    centers = np.array(km.centroids, dtype=np.float32)
    for c in np.flatnonzero(counts):
        centers[c] = x[labels == c].mean(axis=0, dtype=np.float64)
    stats = {
        "source": source,
        "images": images,
        "patches_seen": res.seen,
        "patches_used": int(x.shape[0]),
        "per_image": per_image,
        "max_patches": max_patches,
        "seed": seed,
        "niter": niter,
        "empty_clusters": int((counts == 0).sum()),
    }
    if preset is not None:
        return Vocabulary.for_preset(centers, preset, weights, **stats, **details)
    return Vocabulary(centers, vocabulary_details(k, dim) | stats | details)
