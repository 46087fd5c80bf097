"""VLAD vocabularies: cosine k-means centres over facet features, with metadata saying what they are for.

File format: `.npz` holding `centers` (float32 [K, D]) and `meta`, a JSON string (the
vocabulary's manifest): format tag, preset name and descriptor space (`Preset.space()`:
backbone, layer, facet, image size), k, dim, images, patches used, per-image cap, seed, source,
weights, versions, creation time. Written atomically. AnyLoc's released `c_centers.pt` (a bare
[K, D] tensor) is read too; without a preset it carries no provenance, so only its shape can be
checked.

Only numpy at module level; torch and faiss are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.atomic import atomic_file
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.lazy import lazy_import
from vpr_edge.manifest import package_versions
from vpr_edge.presets import Preset

log = logging.getLogger(__name__)

FORMAT = "vpr-edge-{kind}"
FORMAT_VERSION = 1
DEFAULT_PER_IMAGE = 1000  # patches sampled per image
DEFAULT_MAX_PATCHES = 200_000  # reservoir size: 200k x 1536 floats = 1.2 GB for ViT-G
DEFAULT_NITER = 100  # fast_pytorch_kmeans' max_iter, which AnyLoc used


def import_faiss():
    """faiss, without its loader's INFO lines about which SIMD build it found (noise on the CLI)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return lazy_import("faiss")


# ---------------------------------------------------------------------------------------------
# .npz + JSON meta files (shared with pca.py)
# ---------------------------------------------------------------------------------------------


def kind_cmd(kind: str) -> str:
    return {"vocabulary": "vocab", "pca": "pca"}.get(kind, kind)


def preset_meta(preset: Preset, kind: str) -> dict[str, Any]:
    """The identification part of a vocabulary/PCA meta: format, preset, space and a readable summary."""
    return {
        "format": FORMAT.format(kind=kind),
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "preset": preset.name,
        "space": preset.space(),
        "backbone": f"{preset.backbone.family} {preset.backbone.arch}",
        "layer": preset.facet.layer if preset.facet else None,
        "facet": preset.facet.facet if preset.facet else None,
        "image_size": list(preset.preprocess.image_size),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions("numpy", "faiss-cpu", "torch"),
    }


def save_npz(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], kind: str) -> Path:
    """Write arrays plus `meta` (as the JSON string `meta`) atomically to `path`."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: {kind} files are .npz; name the output *.npz")
    meta = {"format": FORMAT.format(kind=kind), "format_version": FORMAT_VERSION, "kind": kind} | dict(meta)
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(meta))
    with atomic_file(path, "wb") as fh:
        np.savez(fh, **payload)
    return path


def load_npz(path: str | Path, kind: str, arrays: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by save_npz; check it holds `arrays` and is not another kind of file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; check the path or create it with `vpr-edge {kind_cmd(kind)} fit`")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"{path} is not a readable .npz file ({exc}); re-create it") from exc
    missing = [k for k in arrays if k not in data]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}; expected a vpr-edge {kind} file, re-create it")
    meta: dict[str, Any] = {}
    if "meta" in data:
        try:
            meta = json.loads(str(data.pop("meta")))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: its `meta` is not valid JSON ({exc}); re-create it") from exc
        if not isinstance(meta, dict):
            raise ArtifactError(f"{path}: its `meta` is not a JSON object; re-create it")
    if meta.get("kind", kind) != kind:
        raise ArtifactError(f"{path} is a {meta.get('kind')!r} file, expected a {kind!r} file")
    if int(meta.get("format_version", 0) or 0) > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {meta.get('format_version')}, this vpr-edge reads <= {FORMAT_VERSION}; upgrade vpr-edge"
        )
    return data, meta


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
    have, want = json.loads(json.dumps(have)), json.loads(json.dumps(want))  # tuples vs lists after a file
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
    """VLAD centres [K, D] (float32; AnyLoc convention: raw means of L2-normalised members) + meta.

    `meta["space"]` (a `Preset.space()`) is what loading checks backbone/layer/facet against;
    a vocabulary without it (an AnyLoc c_centers.pt imported without --model) is checked by shape only.
    """

    centers: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        c = np.asarray(self.centers)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ArtifactError(f"{self._name()}: centres must be [K, D], got shape {c.shape}")
        if not np.isfinite(c).all():
            raise ArtifactError(f"{self._name()}: centres contain NaN/inf; re-fit the vocabulary")
        self.centers = np.ascontiguousarray(c, dtype=np.float32)
        self.meta = dict(self.meta)

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
    def space(self) -> dict[str, Any] | None:
        return self.meta.get("space")

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def for_preset(cls, centers: np.ndarray, preset: Preset, **details: Any) -> "Vocabulary":
        """Centres plus meta for `preset` (its clusters are set to centers.shape[0])."""
        centers = np.asarray(centers, dtype=np.float32)
        if preset.aggregator.kind == "vlad" and preset.aggregator.clusters != centers.shape[0]:
            preset = preset.with_overrides(clusters=int(centers.shape[0]))
        meta = preset_meta(preset, "vocabulary") | {
            "k": int(centers.shape[0]),
            "dim": int(centers.shape[1]),
            "assignment": "hard, cosine (argmax of normalised patch . normalised centre)",
            "centres": "raw means of L2-normalised members (AnyLoc / fast_pytorch_kmeans cosine)",
            "intra_norm": True,
        }
        return cls(centers, meta | details)

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        meta = self.meta | {"k": self.k, "dim": self.dim, "fingerprint": self.fingerprint}
        self.path = save_npz(path, {"centers": self.centers}, meta, "vocabulary")
        return self.path

    @classmethod
    def load(cls, path: str | Path, preset: Preset | None = None) -> "Vocabulary":
        data, meta = load_npz(path, "vocabulary", ("centers",))
        vocab = cls(data["centers"], meta, Path(path))
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
        if not self.space:
            log.info("%s carries no backbone/layer/facet record (AnyLoc c_centers.pt?): only its shape was checked", name)
            return
        diffs = space_mismatch(self.space, preset.space())
        if diffs:
            raise ArtifactError(
                f"{name} was made for {describe_space(self.space)}, {preset.name} uses "
                f"{describe_space(preset.space())} ({', '.join(diffs)} differ); fit a vocabulary for this preset "
                f"with `vpr-edge vocab fit IMAGES --model {preset.name} --output vocab.npz`"
            )

    def summary(self) -> dict[str, Any]:
        skip = {"space", "versions", "format", "format_version", "kind"}
        out: dict[str, Any] = {"file": str(self.path) if self.path else None, "clusters": self.k, "dim": self.dim}
        out["made_for"] = describe_space(self.space) if self.space else "unknown (no provenance, e.g. AnyLoc c_centers.pt)"
        out |= {k: v for k, v in self.meta.items() if k not in skip and k not in out}
        out["fingerprint"] = self.fingerprint
        return out


def import_anyloc_centers(path: str | Path, preset: Preset | None = None) -> Vocabulary:
    """AnyLoc's released `c_centers.pt` ([K, D] tensor) -> Vocabulary (meta for `preset` if given, checked)."""
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
        got = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise ArtifactError(f"{path} should hold AnyLoc's [K, D] centre tensor, got {got}")
    centers = obj.detach().to(torch.float32).numpy()
    details = {
        "source": "anyloc-c_centers",
        "source_file": path.name,
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    if preset is None:
        vocab = Vocabulary(centers, details | {"k": int(centers.shape[0]), "dim": int(centers.shape[1])}, path)
    else:
        vocab = Vocabulary.for_preset(centers, preset, **details)
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
        return Vocabulary.for_preset(centers, preset, **stats, **details)
    return Vocabulary(centers, {"k": k, "dim": dim} | stats | details)
