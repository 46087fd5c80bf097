"""PCA-whitening of global descriptors (AnyLoc-VLAD-DINOv2-PCA: 49152 -> 512): fitting, and the torch layer.

`fit_pca` uses faiss.PCAMatrix with eigen_power=-0.5. faiss works from the n x n Gram matrix
when there are fewer descriptors than dimensions (a few hundred 49152-d VLADs), but centred data
of n rows has rank <= n - 1, so whitening to `dim` needs n > dim descriptors: the talk's "too few
database images to do PCA" is refused with a clear error instead of dividing by zero eigenvalues.

The file and the torch-free `PCAWhitening` record live in `vpr_edge.fitted` (the runtime reads them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vpr_edge.errors import ConfigError, InputError
from vpr_edge.fitted import PCAWhitening, Vocabulary
from vpr_edge.lazy import lazy_import
from vpr_edge.models.vlad import NORM_EPS, l2_normalize
from vpr_edge.models.vocabulary import import_faiss
from vpr_edge.presets import Preset
from vpr_edge.space import DescriptorSpace

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


def pca_module(pw: PCAWhitening) -> PCAWhiten:
    """The torch layer holding a fitted PCA's arrays as buffers."""
    return PCAWhiten(torch.from_numpy(pw.mean), torch.from_numpy(pw.proj))


def fit_pca_whitening(
    descriptors: np.ndarray,
    preset: Preset,
    dim: int | None = None,
    whiten: bool = True,
    vocabulary: Vocabulary | None = None,
    source: str = "vpr-edge pca fit",
    weights: str | None = None,
    **details: Any,
) -> PCAWhitening:
    """Fit on descriptors of `preset` before PCA; `dim` defaults to the preset's pca_dim. `weights`: the
    weights id of the network the descriptors came from (recorded in the space)."""
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
    space = DescriptorSpace.of(target, weights, vocabulary=vocabulary.fingerprint if vocabulary is not None else None)
    meta = {"space": space.to_dict(), "preset": target.name, "preset_record": target.to_dict()} | {
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


