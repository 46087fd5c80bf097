"""PCA-whitening of global descriptors (AnyLoc-VLAD-DINOv2-PCA: 49152 -> 512).

`fit_pca` uses faiss.PCAMatrix with eigen_power=-0.5. faiss works from the n x n Gram matrix
when there are fewer descriptors than dimensions (a few hundred 49152-d VLADs), but centred data
of n rows has rank <= n - 1, so whitening to `dim` needs n > dim descriptors: the talk's "too few
database images to do PCA" is refused with a clear error instead of dividing by zero eigenvalues.

File: `.npz` with `mean` [D], `proj` [d_out, D], `eigenvalues` and a JSON `meta` string like a
vocabulary's (format, preset, space, dim, whiten, descriptors, vocabulary fingerprint); see
vocabulary.save_npz.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.lazy import lazy_import
from vpr_edge.models.vlad import NORM_EPS, l2_normalize
from vpr_edge.models.vocabulary import (
    Vocabulary,
    array_fingerprint,
    describe_space,
    import_faiss,
    load_npz,
    preset_meta,
    save_npz,
    space_mismatch,
)
from vpr_edge.presets import Preset

torch = lazy_import("torch")
nn = torch.nn

# A kept eigenvalue below this fraction of the largest means the data lacks that rank: faiss accumulates in
# float32, so a truly missing direction shows up as ~1e-6 of the largest, not 0.
RANK_RTOL = 1e-5


class PCAWhiten(nn.Module):
    """[B, D] -> L2((x - mean) @ proj^T), [B, d_out]."""

    def __init__(self, mean: torch.Tensor, proj: torch.Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        proj = torch.as_tensor(proj, dtype=torch.float32)
        if mean.dim() != 1 or proj.dim() != 2 or proj.shape[1] != mean.shape[0]:
            raise ConfigError(
                f"PCAWhiten needs mean [D] and proj [d_out, D], got {tuple(mean.shape)} and {tuple(proj.shape)}"
            )
        self.register_buffer("mean", mean.clone())
        self.register_buffer("proj", proj.clone())

    @property
    def in_dim(self) -> int:
        return self.proj.shape[1]

    @property
    def out_dim(self) -> int:
        return self.proj.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize((x - self.mean) @ self.proj.transpose(0, 1), eps=NORM_EPS)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}"


def fit_pca(descriptors: np.ndarray, dim: int, whiten: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], proj [dim, D]) so that (x - mean) @ proj.T has identity covariance on the fit set (whiten=True)
    or orthonormal principal axes (whiten=False). Needs n > dim descriptors."""
    mean, proj, _ = fit_pca_full(descriptors, dim, whiten)
    return mean, proj


def fit_pca_full(descriptors: np.ndarray, dim: int, whiten: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fit_pca plus the kept eigenvalues (variances along the axes, covariance normalised by n)."""
    faiss = import_faiss()
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"PCA needs descriptors [n, D], got shape {x.shape}")
    n, d_in = x.shape
    if not 1 <= dim <= d_in:
        raise ConfigError(f"PCA dim must be in 1..{d_in} (the descriptor size), got {dim}")
    if n <= dim:
        raise InputError(
            f"too few images to do PCA: whitening to {dim} dims needs more than {dim} descriptors, got {n}; "
            f"use more images (>= {dim + 1}) or a smaller --dim (<= {max(n - 1, 1)})"
        )
    if not np.isfinite(x).all():
        raise InputError("PCA descriptors contain NaN/inf")
    pca = faiss.PCAMatrix(d_in, dim, -0.5 if whiten else 0.0)
    pca.train(x)
    eig = faiss.vector_to_array(pca.eigenvalues)[:dim].astype(np.float64)
    if eig[-1] <= RANK_RTOL * max(eig[0], 1e-30):
        rank = int((eig > RANK_RTOL * max(eig[0], 1e-30)).sum())
        raise InputError(
            f"the {n} descriptors span only about {rank} dimensions (duplicates or near-constant images); "
            f"whitening to {dim} would divide by ~0: use --dim <= {max(rank, 1)} or more varied images"
        )
    mean = faiss.vector_to_array(pca.mean).astype(np.float32)
    proj = faiss.vector_to_array(pca.A).reshape(dim, d_in).astype(np.float64)
    if whiten:
        # faiss's eigenvalues are of X^T X (not divided by n); scale so the fit-set covariance is I
        proj *= np.sqrt(n)
    return mean, proj.astype(np.float32), (eig / n).astype(np.float32)


@dataclass
class PCAWhitening:
    """A fitted PCA(-whitening): arrays + meta (like a vocabulary's); `.module()` gives the torch layer."""

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

    def module(self) -> PCAWhiten:
        """The torch layer holding these arrays as buffers."""
        return PCAWhiten(torch.from_numpy(self.mean), torch.from_numpy(self.proj))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """numpy reference: L2((x - mean) @ proj^T)."""
        y = (np.asarray(x, dtype=np.float32) - self.mean) @ self.proj.T
        return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), NORM_EPS)

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        arrays = {"mean": self.mean, "proj": self.proj}
        if self.eigenvalues is not None:
            arrays["eigenvalues"] = np.asarray(self.eigenvalues, dtype=np.float32)
        meta = self.meta | {"in_dim": self.in_dim, "dim": self.out_dim, "fingerprint": self.fingerprint}
        self.path = save_npz(path, arrays, meta, "pca")
        return self.path

    @classmethod
    def load(cls, path: str | Path, preset: Preset | None = None) -> "PCAWhitening":
        data, meta = load_npz(path, "pca", ("mean", "proj"))
        pw = cls(data["mean"], data["proj"], meta, data.get("eigenvalues"), Path(path))
        if preset is not None:
            pw.check_for(preset)
        return pw

    # -- validation -------------------------------------------------------------------------
    def check_for(self, preset: Preset, vocabulary: Vocabulary | None = None) -> None:
        """Refuse a PCA fitted for other descriptors (size, backbone/layer/facet, aggregator, vocabulary)."""
        name = self._name()
        full = preset.without_pca().descriptor_dim
        want_out = preset.aggregator.pca_dim or self.out_dim
        if (self.in_dim, self.out_dim) != (full, want_out):
            raise ArtifactError(
                f"{name} maps {self.in_dim} -> {self.out_dim} dims, {preset.name} needs {full} -> {want_out}; fit one "
                f"with `vpr-edge pca fit IMAGES --model {preset.name} --vocabulary V --dim {want_out} --output pca.npz`"
            )
        have, want = self.meta.get("space"), preset.space()
        if have:
            diffs = space_mismatch(have, want)
            ha, wa = have.get("aggregator") or {}, want.get("aggregator") or {}
            if (ha.get("kind"), ha.get("clusters")) != (wa.get("kind"), wa.get("clusters")):
                diffs.append("aggregator")
            if diffs:
                raise ArtifactError(
                    f"{name} was fitted on {ha.get('kind')} descriptors of {describe_space(have)}, {preset.name} uses "
                    f"{wa.get('kind')} on {describe_space(want)} ({', '.join(diffs)} differ); re-fit it with `vpr-edge pca fit`"
                )
        fitted_with = self.meta.get("vocabulary_fingerprint")
        if vocabulary is not None and fitted_with and fitted_with != vocabulary.fingerprint:
            raise ArtifactError(
                f"{name} was fitted on VLADs of vocabulary {fitted_with[:12]}, the model uses {vocabulary.fingerprint[:12]}; "
                "re-fit the PCA with this --vocabulary"
            )


def fit_pca_whitening(
    descriptors: np.ndarray,
    preset: Preset,
    dim: int | None = None,
    whiten: bool = True,
    vocabulary: Vocabulary | None = None,
    source: str = "vpr-edge pca fit",
    **details: Any,
) -> PCAWhitening:
    """Fit on descriptors of `preset` before PCA; `dim` defaults to the preset's pca_dim."""
    dim = dim or preset.aggregator.pca_dim
    if not dim:
        raise ConfigError(f"{preset.name} has no PCA dimension; pass --dim (AnyLoc uses 512)")
    base = preset.without_pca()
    if descriptors.ndim == 2 and descriptors.shape[1] != base.descriptor_dim:
        raise InputError(
            f"PCA for {preset.name} is fitted on {base.descriptor_dim}-d descriptors, got {descriptors.shape[1]}-d"
        )
    mean, proj, eig = fit_pca_full(descriptors, dim, whiten)
    target = preset.with_overrides(pca_dim=dim)
    meta = preset_meta(target, "pca") | {
        "in_dim": int(mean.shape[0]),
        "dim": dim,
        "whiten": whiten,
        "method": "faiss.PCAMatrix, eigen_power -0.5, scaled to unit variance on the fit set" if whiten
        else "faiss.PCAMatrix, orthonormal axes",
        "descriptors": int(descriptors.shape[0]),
        "source": source,
    }
    if vocabulary is not None:
        meta["vocabulary_fingerprint"] = vocabulary.fingerprint
    return PCAWhitening(mean, proj, meta | details, eig)


def load_pca(path: str | Path, preset: Preset | None = None) -> PCAWhitening:
    return PCAWhitening.load(path, preset)
