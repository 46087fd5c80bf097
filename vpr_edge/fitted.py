"""Fitted parameters of descriptor heads, as torch-free files: VLAD vocabularies and PCA-whitening.

One file format and one loader for both, read by the reference, the exporter and the lean runtime:
an `.npz` holding the arrays (`centers` [K, D]; `mean` [D], `proj` [d_out, D], `eigenvalues`) and
`meta`, a JSON string that is a vpr-edge manifest (`vpr_edge.manifest`: kind `vocabulary`/`pca`, the
preset it was fitted for, its descriptor space with the weights the features came from, and the
fit details). Loading checks the kind and format version and that the arrays are finite and of the
right shapes; an all-zero vocabulary or PCA is refused (it would map every image to one descriptor).
Files written by vpr-edge 0.1 (meta format `vpr-edge-vocabulary`/`vpr-edge-pca` 1) are migrated.

Fitting (faiss k-means, PCA) lives in `vpr_edge.models.vocabulary` / `vpr_edge.models.pca`; AnyLoc's
released `c_centers.pt` is imported there (it needs torch to read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.atomic import atomic_file
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.manifest import FORMAT_VERSION, Manifest, package_versions
from vpr_edge.presets import Preset
from vpr_edge.space import DescriptorSpace, differences, migrate_space

log = logging.getLogger(__name__)

KINDS = ("vocabulary", "pca")
NORM_EPS = 1e-4  # = models.vlad.NORM_EPS: L2 floor of descriptors


def kind_cmd(kind: str) -> str:
    return {"vocabulary": "vocab", "pca": "pca"}.get(kind, kind)


def array_fingerprint(a: np.ndarray) -> str:
    """sha256 of the float32 little-endian bytes: identifies content regardless of container."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def describe_space(space: dict[str, Any] | None) -> str:
    """'dinov2 vitg14 layer 31 facet value (head_major)' for messages."""
    if not space:
        return "an unknown backbone/layer/facet"
    feats = space.get("features") or {}
    b = feats.get("backbone") or {}
    f = feats.get("facet") or {}
    return f"{b.get('family')} {b.get('arch')} layer {f.get('layer')} facet {f.get('facet')} ({f.get('layout')})"


# -- the file format ------------------------------------------------------------------------------
def save_fitted(path: str | Path, arrays: dict[str, np.ndarray], kind: str, meta: dict[str, Any]) -> Path:
    """Write arrays plus a manifest (from `meta`: details, with 'space', 'preset' (a name) and optionally
    'preset_record' (the full preset)) to `path` atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: {kind} files are .npz; name the output *.npz")
    details = {k: v for k, v in meta.items() if k not in ("space", "preset", "preset_record", "identity")}
    preset = meta.get("preset_record") or ({"name": meta["preset"]} if meta.get("preset") else {})
    manifest = Manifest(
        kind=kind,
        preset=preset,
        space=meta.get("space") or {},
        identity=meta.get("identity") or {},
        versions=package_versions("numpy", "faiss-cpu", "torch"),
        details=details,
    )
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(manifest.to_dict()))
    with atomic_file(path, "wb") as fh:
        np.savez(fh, **payload)
    return path


def _migrate_meta(meta: dict[str, Any], kind: str) -> dict[str, Any]:
    """A vpr-edge 0.1 meta (`vpr-edge-<kind>` 1, flat) -> the manifest form."""
    old_space = meta.pop("space", None)
    for k in ("format", "format_version", "kind", "backbone", "layer", "facet", "image_size"):
        meta.pop(k, None)
    name = meta.pop("preset", None)
    space = migrate_space(old_space, {"vocabulary": meta.get("vocabulary_fingerprint")}) if old_space else {}
    if space and kind == "vocabulary":
        space["vocabulary"] = None
    return {"format": "vpr-edge-manifest", "format_version": FORMAT_VERSION, "kind": kind,
            "preset": {"name": name} if name else {}, "space": space, "identity": {},
            "created": meta.pop("created", ""), "versions": meta.pop("versions", {}),
            "details": meta | {"migrated_from": f"vpr-edge-{kind} 1"}}


def load_fitted(path: str | Path, kind: str, arrays: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a file written by `save_fitted`; meta = details + 'space' + 'preset' (name).

    Refuses another kind of file, a newer format, missing arrays and non-numeric data (`allow_pickle`
    is off: a data file can never run code)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; check the path or create it with `vpr-edge {kind_cmd(kind)} fit`")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"{path} is not a readable .npz file ({exc}); re-create it") from None
    missing = [k for k in arrays if k not in data]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}; expected a vpr-edge {kind} file, re-create it")
    raw: dict[str, Any] = {}
    if "meta" in data:
        try:
            raw = json.loads(str(data.pop("meta")))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: its `meta` is not valid JSON ({exc}); re-create it") from None
        if not isinstance(raw, dict):
            raise ArtifactError(f"{path}: its `meta` is not a JSON object; re-create it")
    if raw and raw.get("format") != "vpr-edge-manifest":
        if raw.get("kind", kind) != kind:
            raise ArtifactError(f"{path} is a {raw.get('kind')!r} file, expected a {kind!r} file")
        if int(raw.get("format_version", 0) or 0) > 1:
            raise ArtifactError(f"{path} has format_version {raw.get('format_version')}, this vpr-edge reads it only "
                                "as a manifest; upgrade vpr-edge")
        raw = _migrate_meta(dict(raw), kind)
    if raw:
        manifest = Manifest.from_dict(raw, source=str(path))
        if manifest.kind != kind:
            raise ArtifactError(f"{path} is a {manifest.kind!r} file, expected a {kind!r} file")
        meta = dict(manifest.details) | {"space": manifest.space or None, "preset": manifest.preset.get("name")}
    else:
        meta = {"space": None, "preset": None}
    for name in arrays:
        if not np.issubdtype(data[name].dtype, np.number):
            raise ArtifactError(f"{path}: array {name!r} has dtype {data[name].dtype}, expected numbers; re-create it")
    return data, meta


# -- vocabulary -----------------------------------------------------------------------------------
def vocabulary_details(k: int, dim: int) -> dict[str, Any]:
    return {
        "k": int(k),
        "dim": int(dim),
        "assignment": "hard, cosine (argmax of normalised patch . normalised centre)",
        "centres": "raw means of L2-normalised members (AnyLoc / fast_pytorch_kmeans cosine)",
        "intra_norm": True,
    }


@dataclass
class Vocabulary:
    """VLAD centres [K, D] (float32; AnyLoc convention: raw means of L2-normalised members) + meta.

    `meta["space"]` (a DescriptorSpace record of the preset it was fitted for, with the weights its
    features came from) is what `check_for` compares at the 'features' level; a vocabulary without
    one (an AnyLoc c_centers.pt imported without --model) is checked by shape only."""

    centers: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        c = np.asarray(self.centers)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ArtifactError(f"{self._name()}: centres must be [K, D], got shape {c.shape}")
        if not np.isfinite(c).all():
            raise ArtifactError(f"{self._name()}: centres contain NaN/inf; re-fit the vocabulary")
        if not np.abs(c).max(axis=1).all():
            raise ArtifactError(
                f"{self._name()}: {int((np.abs(c).max(axis=1) == 0).sum())} of {c.shape[0]} centres are all zero "
                "(their cosine assignment is undefined); re-fit the vocabulary"
            )
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

    @classmethod
    def for_preset(cls, centers: np.ndarray, preset: Preset, weights: str | None = None, **details: Any) -> "Vocabulary":
        """Centres plus meta for `preset` (its clusters are set to centers.shape[0]); `weights`: the weights
        id of the network whose features were clustered (None: not known)."""
        centers = np.asarray(centers, dtype=np.float32)
        if preset.aggregator.kind == "vlad" and preset.aggregator.clusters != centers.shape[0]:
            preset = preset.with_overrides(clusters=int(centers.shape[0]))
        meta = {"space": DescriptorSpace.of(preset, weights).to_dict(), "preset": preset.name, "preset_record": preset.to_dict()}
        return cls(centers, meta | vocabulary_details(*centers.shape) | details)

    def save(self, path: str | Path) -> Path:
        meta = dict(self.meta) | {"k": self.k, "dim": self.dim, "fingerprint": self.fingerprint}
        self.path = save_fitted(path, {"centers": self.centers}, "vocabulary", meta)
        return self.path

    @classmethod
    def load(cls, path: str | Path, preset: Preset | None = None, weights: str | None = None) -> "Vocabulary":
        data, meta = load_fitted(path, "vocabulary", ("centers",))
        vocab = cls(data["centers"], meta, Path(path))
        if meta.get("fingerprint") and meta["fingerprint"] != vocab.fingerprint:
            raise ArtifactError(f"{path}: its centres do not match the fingerprint its meta records; re-create it")
        if preset is not None:
            vocab.check_for(preset, weights)
        return vocab

    def check_for(self, preset: Preset, weights: str | None = None) -> None:
        """Refuse a vocabulary whose shape, or feature recipe / weights, do not fit `preset` (`weights`: the
        weights id the features will come from; None: not compared)."""
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
        target = DescriptorSpace.of(preset, weights)
        diffs = differences(self.space, target, level="features")
        if diffs:
            raise ArtifactError(
                f"{name} was made for {describe_space(self.space)}, {preset.name} uses "
                f"{describe_space(target.to_dict())} ({'; '.join(diffs[:4])}); fit a vocabulary for this preset "
                f"with `vpr-edge vocab fit IMAGES --model {preset.name} --output vocab.npz`"
            )

    def summary(self) -> dict[str, Any]:
        skip = {"space", "versions", "preset_record"}
        out: dict[str, Any] = {"file": str(self.path) if self.path else None, "clusters": self.k, "dim": self.dim}
        out["made_for"] = describe_space(self.space) if self.space else "unknown (no provenance, e.g. AnyLoc c_centers.pt)"
        if self.space and self.space.get("weights"):
            out["weights"] = self.space["weights"]
        out |= {k: v for k, v in self.meta.items() if k not in skip and k not in out}
        out["fingerprint"] = self.fingerprint
        return out


def load_vocabulary(path: str | Path, preset: Preset | None = None, weights: str | None = None) -> Vocabulary:
    """A vocabulary `.npz` (torch-free; AnyLoc's c_centers.pt is imported by `models.vocabulary`)."""
    return Vocabulary.load(path, preset, weights)


# -- PCA ------------------------------------------------------------------------------------------
@dataclass
class PCAWhitening:
    """A fitted PCA(-whitening): `apply(x) = L2((x - mean) @ proj^T)`; arrays + meta like a vocabulary's."""

    mean: np.ndarray
    proj: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    eigenvalues: np.ndarray | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        self.proj = np.ascontiguousarray(self.proj, dtype=np.float32)
        if self.mean.ndim != 1 or self.proj.ndim != 2 or self.proj.shape[1] != self.mean.shape[0]:
            raise ArtifactError(
                f"{self._name()}: expected mean [D] and proj [d_out, D], got {self.mean.shape} and {self.proj.shape}"
            )
        if not (np.isfinite(self.mean).all() and np.isfinite(self.proj).all()):
            raise ArtifactError(f"{self._name()}: PCA arrays contain NaN/inf; re-fit it")
        zero_rows = int((np.abs(self.proj).max(axis=1) == 0).sum())
        if zero_rows:
            raise ArtifactError(
                f"{self._name()}: {zero_rows} of {self.proj.shape[0]} projection rows are all zero (those output "
                "dimensions are constant for every image); re-fit it with `vpr-edge pca fit`"
            )
        self.meta = dict(self.meta)

    def _name(self) -> str:
        return str(self.path) if self.path else "PCA"

    @property
    def in_dim(self) -> int:
        return int(self.proj.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.proj.shape[0])

    @property
    def fingerprint(self) -> str:
        return array_fingerprint(np.concatenate([self.mean, self.proj.ravel()]))

    @property
    def space(self) -> dict[str, Any] | None:
        return self.meta.get("space")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """numpy reference: L2((x - mean) @ proj^T)."""
        y = (np.asarray(x, dtype=np.float32) - self.mean) @ self.proj.T
        return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), NORM_EPS)

    def save(self, path: str | Path) -> Path:
        arrays = {"mean": self.mean, "proj": self.proj}
        if self.eigenvalues is not None:
            arrays["eigenvalues"] = np.asarray(self.eigenvalues, dtype=np.float32)
        meta = dict(self.meta) | {"in_dim": self.in_dim, "dim": self.out_dim, "fingerprint": self.fingerprint}
        self.path = save_fitted(path, arrays, "pca", meta)
        return self.path

    @classmethod
    def load(cls, path: str | Path, preset: Preset | None = None) -> "PCAWhitening":
        data, meta = load_fitted(path, "pca", ("mean", "proj"))
        pw = cls(data["mean"], data["proj"], meta, data.get("eigenvalues"), Path(path))
        if meta.get("fingerprint") and meta["fingerprint"] != pw.fingerprint:
            raise ArtifactError(f"{path}: its arrays do not match the fingerprint its meta records; re-create it")
        if preset is not None:
            pw.check_for(preset)
        return pw

    def check_for(self, preset: Preset, vocabulary: Vocabulary | None = None, weights: str | None = None) -> None:
        """Refuse a PCA fitted for other descriptors (size; feature recipe, weights, aggregator, vocabulary:
        the 'aggregate' level of the space)."""
        name = self._name()
        full = preset.without_pca().descriptor_dim
        want_out = preset.aggregator.pca_dim or self.out_dim
        if (self.in_dim, self.out_dim) != (full, want_out):
            raise ArtifactError(
                f"{name} maps {self.in_dim} -> {self.out_dim} dims, {preset.name} needs {full} -> {want_out}; fit one "
                f"with `vpr-edge pca fit IMAGES --model {preset.name} --vocabulary V --dim {want_out} --output pca.npz`"
            )
        have = self.space
        if have:
            target = DescriptorSpace.of(preset, weights, vocabulary=vocabulary.fingerprint if vocabulary else None)
            diffs = differences(have, target, level="aggregate")
            if diffs:
                ha, wa = have.get("aggregator") or {}, target.aggregator
                raise ArtifactError(
                    f"{name} was fitted on {ha.get('kind')} descriptors of {describe_space(have)}, {preset.name} uses "
                    f"{wa.get('kind')} on {describe_space(target.to_dict())} ({'; '.join(diffs[:4])}); "
                    "re-fit it with `vpr-edge pca fit`"
                )
        fitted_with = self.meta.get("vocabulary_fingerprint")
        if vocabulary is not None and fitted_with and fitted_with != vocabulary.fingerprint:
            raise ArtifactError(
                f"{name} was fitted on VLADs of vocabulary {fitted_with[:12]}, the model uses {vocabulary.fingerprint[:12]}; "
                "re-fit the PCA with this --vocabulary"
            )


def load_pca(path: str | Path, preset: Preset | None = None) -> PCAWhitening:
    return PCAWhitening.load(path, preset)
