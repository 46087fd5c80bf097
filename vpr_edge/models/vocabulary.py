"""VLAD vocabularies: cosine k-means centres over facet features, with the manifest saying what they are for.

File format: `.npz` holding `centers` (float32 [K, D]) and `meta`, a JSON string of the one
manifest format (`vpr_edge.manifest.Manifest`, kind 'vocabulary'): preset, descriptor space
(backbone, layer, facet, image size), and details (k, images, patches used, per-image cap, seed,
source, weights). Written atomically. AnyLoc's released `c_centers.pt` (a bare [K, D] tensor)
is read too; it carries no provenance, so only its shape can be checked.

Only numpy at module level; torch and faiss are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.atomic import atomic_file
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.lazy import lazy_import
from vpr_edge.manifest import Manifest, package_versions
from vpr_edge.presets import Preset

log = logging.getLogger(__name__)

DEFAULT_PER_IMAGE = 1000  # patches sampled per image
DEFAULT_MAX_PATCHES = 200_000  # reservoir size: 200k x 1536 floats = 1.2 GB for ViT-G
DEFAULT_NITER = 100  # fast_pytorch_kmeans' max_iter, which AnyLoc used


# ---------------------------------------------------------------------------------------------
# .npz + manifest files (shared with pca.py)
# ---------------------------------------------------------------------------------------------


def save_npz(path: str | Path, arrays: dict[str, np.ndarray], manifest: Manifest) -> Path:
    """Write arrays plus the manifest (as the JSON string `meta`) atomically to `path`."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: vocabulary and PCA files are .npz; name the output *.npz")
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(manifest.to_dict()))
    with atomic_file(path, "wb") as fh:
        np.savez(fh, **payload)
    return path


def load_npz(path: str | Path, kind: str, arrays: tuple[str, ...]) -> tuple[dict[str, np.ndarray], Manifest]:
    """Read a file written by save_npz and check it holds a `kind` manifest and `arrays`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; check the path or create it with `vpr-edge {kind_cmd(kind)} fit`")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"{path} is not a readable .npz file ({exc}); re-create it") from exc
    missing = [k for k in (*arrays, "meta") if k not in data]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}; expected a vpr-edge {kind} file, re-create it")
    try:
        meta = json.loads(str(data.pop("meta")))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: its `meta` is not valid JSON ({exc}); re-create it") from exc
    manifest = Manifest.from_dict(meta, source=str(path))
    if manifest.kind != kind:
        raise ArtifactError(f"{path} is a {manifest.kind!r} file, expected a {kind!r} file")
    return data, manifest


def kind_cmd(kind: str) -> str:
    return {"vocabulary": "vocab", "pca": "pca"}.get(kind, kind)


def array_fingerprint(a: np.ndarray) -> str:
    """sha256 of the float32 little-endian bytes: identifies content regardless of container."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def describe_space(space: dict[str, Any] | None) -> str:
    if not space:
        return "an unknown backbone/layer/facet"
    b = space.get("backbone") or {}
    f = space.get("facet") or {}
    return f"{b.get('family')} {b.get('arch')} layer {space.get('layer')} facet {f.get('facet')} ({f.get('layout')})"


def space_mismatch(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Which of backbone / layer / facet differ (keys absent on either side are not compared)."""
    out = []
    hb, wb = have.get("backbone") or {}, want.get("backbone") or {}
    if any(hb[k] != wb[k] for k in hb.keys() & wb.keys() if k != "weights"):
        out.append("backbone")
    if have.get("layer") != want.get("layer"):
        out.append("layer")
    hf, wf = have.get("facet") or {}, want.get("facet") or {}
    if (hf.get("facet"), hf.get("layout")) != (wf.get("facet"), wf.get("layout")):
        out.append("facet")
    return out


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """VLAD centres [K, D] (float32, AnyLoc convention: raw means of L2-normalised members)."""

    centers: np.ndarray
    manifest: Manifest | None = None  # None only for an imported AnyLoc c_centers.pt
    path: Path | None = None

    def __post_init__(self) -> None:
        c = np.asarray(self.centers)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ArtifactError(f"{self._name()}: centres must be [K, D], got shape {c.shape}")
        if not np.isfinite(c).all():
            raise ArtifactError(f"{self._name()}: centres contain NaN/inf; re-fit the vocabulary")
        self.centers = np.ascontiguousarray(c, dtype=np.float32)

    def _name(self) -> str:
        return str(self.path) if self.path else "vocabulary"

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centers.shape[1])

    @property
    def fingerprint(self) -> str:
        return array_fingerprint(self.centers)

    @property
    def details(self) -> dict[str, Any]:
        return dict(self.manifest.details) if self.manifest else {"source": "anyloc-c_centers"}

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, centers: np.ndarray, preset: Preset, **details: Any) -> "Vocabulary":
        """Centres plus a manifest for `preset` (its K must equal centers.shape[0])."""
        centers = np.asarray(centers, dtype=np.float32)
        if preset.aggregator.kind == "vlad" and preset.aggregator.clusters != centers.shape[0]:
            preset = preset.with_overrides(clusters=int(centers.shape[0]))
        manifest = Manifest(
            kind="vocabulary",
            preset=preset.to_dict(),
            space=preset.space(),
            outputs=[{"name": "centers", "shape": list(centers.shape), "dtype": "float32"}],
            hashes={"vocabulary": array_fingerprint(centers)},
            versions=package_versions("numpy", "faiss-cpu", "torch"),
            details={"k": int(centers.shape[0]), "dim": int(centers.shape[1])} | details,
        )
        return cls(centers, manifest)

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        if self.manifest is None:
            raise ArtifactError("this vocabulary has no manifest (imported without a preset); import it with --model")
        self.path = save_npz(path, {"centers": self.centers}, self.manifest)
        return self.path

    @classmethod
    def load(cls, path: str | Path, preset: Preset | None = None) -> "Vocabulary":
        data, manifest = load_npz(path, "vocabulary", ("centers",))
        vocab = cls(data["centers"], manifest, Path(path))
        if preset is not None:
            vocab.check_for(preset)
        return vocab

    # -- validation -------------------------------------------------------------------------
    def check_for(self, preset: Preset) -> None:
        """Refuse a vocabulary whose shape or backbone/layer/facet do not fit `preset`."""
        name = self._name()
        if preset.aggregator.kind != "vlad":
            raise ConfigError(f"{preset.name} uses {preset.aggregator.kind}, not VLAD; drop --vocabulary {name}")
        want = (preset.aggregator.clusters, preset.feature_dim)
        if (self.k, self.dim) != want:
            raise ArtifactError(
                f"{name} has {self.k} centres of dim {self.dim}, {preset.name} needs {want[0]} x {want[1]}; "
                f"fit one with `vpr-edge vocab fit IMAGES --model {preset.name} --output vocab.npz`"
            )
        if self.manifest is None:
            log.info("%s carries no provenance (AnyLoc c_centers.pt): only its shape was checked", name)
            return
        diffs = space_mismatch(self.manifest.space, preset.space())
        if diffs:
            raise ArtifactError(
                f"{name} was made for {describe_space(self.manifest.space)}, {preset.name} uses "
                f"{describe_space(preset.space())} ({', '.join(diffs)} differ); fit a vocabulary for this preset "
                f"with `vpr-edge vocab fit IMAGES --model {preset.name} --output vocab.npz`"
            )

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": str(self.path) if self.path else None,
            "clusters": self.k,
            "dim": self.dim,
            "fingerprint": self.fingerprint[:16],
        }
        if self.manifest is not None:
            out["made_for"] = describe_space(self.manifest.space)
            out["preset"] = self.manifest.space.get("preset")
            out["image_size"] = self.manifest.space.get("image_size")
            out["created"] = self.manifest.created
            out |= self.manifest.details
        else:
            out["made_for"] = "unknown (AnyLoc c_centers.pt, no provenance)"
        return out


def import_anyloc_centers(path: str | Path, preset: Preset | None = None) -> Vocabulary:
    """AnyLoc's released `c_centers.pt` ([K, D] tensor) -> Vocabulary (with a manifest if `preset` is given)."""
    torch = lazy_import("torch")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; pass AnyLoc's c_centers.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for a bad file
        raise ArtifactError(f"{path} is not a loadable torch tensor file ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and len(obj) == 1:  # tolerate {'c_centers': tensor}
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
        shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise ArtifactError(f"{path} should hold AnyLoc's [K, D] centre tensor, got {shape}")
    centers = obj.detach().to(torch.float32).numpy()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if preset is None:
        return Vocabulary(centers, None, path)
    vocab = Vocabulary.create(centers, preset, source="anyloc-c_centers", source_file=path.name, source_sha256=sha)
    vocab.path = path
    vocab.check_for(preset)
    return vocab


def load_vocabulary(path: str | Path, preset: Preset | None = None) -> Vocabulary:
    """A `.npz` from `vpr-edge vocab fit/import`, or AnyLoc's `c_centers.pt`; checked against `preset` if given."""
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        vocab = import_anyloc_centers(path)
        if preset is not None:
            vocab.check_for(preset)
        return vocab
    return Vocabulary.load(path, preset)


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


def _l2rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@dataclass
class FitStats:
    images: int
    patches_seen: int  # patches sub-sampled from the images (at most per_image each)
    patches_used: int  # patches k-means ran on (at most the reservoir size)
    empty_clusters: int


def fit_vocabulary(
    feature_iter: Iterable[np.ndarray | tuple[Any, np.ndarray]],
    k: int,
    dim: int,
    per_image: int = DEFAULT_PER_IMAGE,
    seed: int = 0,
    progress: bool = True,
    max_patches: int = DEFAULT_MAX_PATCHES,
    niter: int = DEFAULT_NITER,
) -> tuple[np.ndarray, FitStats]:
    """Streaming cosine k-means over per-image patch features -> (centres [k, dim], stats).

    `feature_iter` yields [N, dim] arrays (or (path, array) pairs, as iter_image_features does).
    From each image at most `per_image` patches are drawn at random; those go into a reservoir of
    at most `max_patches` rows, so memory is bounded whatever the number of images. Patches are
    L2-normalised, clustered by faiss spherical k-means (cosine), then the stored centres are set
    the way AnyLoc's fitted centres are: fast_pytorch_kmeans in 'cosine' mode assigns by cosine
    similarity but updates each centroid as the plain mean of its (normalised) members and never
    re-normalises it, so AnyLoc's c_centers are **raw means of the L2-normalised members** (norm
    < 1). We take faiss's final assignment and store those raw means. A cluster left empty by the
    final assignment (rare; faiss splits empty clusters while training) keeps faiss's unit centroid.
    """
    faiss = lazy_import("faiss")
    from tqdm import tqdm

    if k < 1 or dim < 1 or per_image < 1:
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
    km.train(x)
    _, labels = km.index.search(x, 1)
    labels = labels[:, 0]
    counts = np.bincount(labels, minlength=k)
    centers = np.array(km.centroids, dtype=np.float32)
    for c in np.flatnonzero(counts):
        centers[c] = x[labels == c].mean(axis=0, dtype=np.float64)
    stats = FitStats(images=images, patches_seen=res.seen, patches_used=x.shape[0], empty_clusters=int((counts == 0).sum()))
    return centers, stats

