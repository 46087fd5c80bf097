"""Numpy aggregation for backbone-scope artifacts: hard VLAD, GeM, PCA-whitening.

Same math as the PyTorch reference heads (vpr_edge.models.vlad / gem / pca, which follow AnyLoc):
- hard VLAD: patches are L2-normalised (a no-op for the exported, already normalised facets),
  each goes to the centre of highest cosine similarity (ties: lowest index); the residual is the
  normalised patch minus the raw, un-normalised centre; residuals are summed per cluster, each
  cluster's sum is L2-normalised (intra-normalisation), clusters are flattened cluster-major
  (index k * D + d) and the whole vector is L2-normalised. Empty clusters stay zero. The sums are
  formed as (sum of patches) - count * centre, so no [N, K, D] tensor is ever built.
- GeM, AnyLoc's default ('signed'): m = mean over patches of x^p (integer p, sign kept), then
  sign(m) * max(|m|, eps^p)^(1/p); 'abs' uses |x|^p and 'clamp' max(x, eps)^p (classic CNN GeM).
  Then L2.
- PCA-whitening: proj @ (x - mean) (the whitening scale is folded into proj), then L2.
L2 normalisation is x / max(||x||, 1e-4) like the reference (whose floor is an FP16-safe
stand-in for AnyLoc's 1e-12; real norms are orders of magnitude above both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpr_edge import fitted, presets
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.presets import Preset

L2_EPS = 1e-4  # = vpr_edge.models.vlad.NORM_EPS
GEM_MODES = ("signed", "abs", "clamp")


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = L2_EPS) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, eps)


def _batched(features: np.ndarray) -> tuple[np.ndarray, bool]:
    if features.ndim == 2:
        return features[None], True
    if features.ndim != 3:
        raise ConfigError(f"features must be [N, D] or [B, N, D], got shape {features.shape}")
    return features, False


def vlad_hard(features: np.ndarray, centers: np.ndarray, intra_norm: bool = True) -> np.ndarray:
    """[B, N, D] (or [N, D]) patch features -> [B, K*D] (or [K*D]) hard-VLAD descriptors."""
    x, single = _batched(np.asarray(features, dtype=np.float32))
    c = vlad_centers(centers, x.shape[2])
    x = l2_normalize(x)
    labels = np.argmax(x @ l2_normalize(c).T, axis=2)  # [B, N]: the most similar centre (cosine)
    out = vlad_from_labels(x, labels, c, intra_norm)
    return out[0] if single else out


def vlad_centers(centers: np.ndarray, dim: int) -> np.ndarray:
    c = np.asarray(centers, dtype=np.float32)
    if c.ndim != 2 or c.shape[1] != dim:
        raise ArtifactError(f"VLAD centres have shape {c.shape}, features have dimension {dim}")
    return c


def vlad_from_labels(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, intra_norm: bool = True) -> np.ndarray:
    """Hard VLAD of L2-normalised features `x` [B, N, D] with the cluster of each token given ([B, N])."""
    return vlad_normalize(vlad_residuals(x, labels, centers), intra_norm)


def vlad_residuals(x: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """[B, K, D] per-cluster sums of (token - its centre), before any normalisation."""
    k = centers.shape[0]
    onehot = (labels[:, :, None] == np.arange(k)[None, None, :]).astype(np.float32)  # [B, N, K]
    sums = np.einsum("bnk,bnd->bkd", onehot, x)  # [B, K, D]
    counts = onehot.sum(axis=1)  # [B, K]
    return sums - counts[:, :, None] * centers[None]


def vlad_normalize(residual: np.ndarray, intra_norm: bool = True) -> np.ndarray:
    """[B, K, D] residual sums -> [B, K*D] descriptors (intra-normalised per cluster, then L2)."""
    if intra_norm:
        residual = l2_normalize(residual, axis=2)
    return l2_normalize(residual.reshape(residual.shape[0], -1), axis=1)


def gem(features: np.ndarray, p: float = 3.0, eps: float = 1e-6, mode: str = "signed") -> np.ndarray:
    """[B, N, D] (or [N, D]) -> [B, D] (or [D]) generalised-mean pooled, L2-normalised."""
    if mode not in GEM_MODES:
        raise ConfigError(f"GeM mode must be one of {GEM_MODES}, got {mode!r}")
    if mode == "signed" and float(p) != int(p):
        raise ConfigError(f"GeM mode 'signed' needs an integer p, got {p}")
    x, single = _batched(np.asarray(features, dtype=np.float32))
    if mode == "abs":
        x = np.abs(x)
    elif mode == "clamp":
        x = np.maximum(x, np.float32(eps))
    m = np.mean(np.power(x, int(p) if float(p) == int(p) else p), axis=1)
    floor = np.float32(eps) ** np.float32(p)
    root = np.power(np.maximum(np.abs(m), floor), np.float32(1.0 / p))
    pooled = np.sign(m) * root if mode == "signed" else root
    out = l2_normalize(pooled.astype(np.float32), axis=1)
    return out[0] if single else out


def pca_whiten(descriptors: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """[B, D] -> [B, d_out]: proj @ (x - mean), L2-normalised."""
    d = np.asarray(descriptors, dtype=np.float32)
    if proj.shape[1] != d.shape[-1] or mean.shape[0] != d.shape[-1]:
        raise ArtifactError(f"PCA expects {proj.shape[1]}-d input (mean {mean.shape}), descriptors are {d.shape[-1]}-d")
    return l2_normalize((d - mean) @ proj.T, axis=-1).astype(np.float32)


@dataclass
class Aggregation:
    """Features [B, N, D] -> descriptors [B, dim] as the preset's aggregator says."""

    kind: str  # 'vlad' | 'gem'
    centers: np.ndarray | None = None
    intra_norm: bool = True
    gem_p: float = 3.0
    pca_mean: np.ndarray | None = None
    pca_proj: np.ndarray | None = None

    @property
    def dim(self) -> int:
        if self.pca_proj is not None:
            return int(self.pca_proj.shape[0])
        if self.kind == "vlad":
            return int(self.centers.size)
        return -1  # GeM: the feature dimension, known only from the features

    def __call__(self, features: np.ndarray) -> np.ndarray:
        if self.kind == "vlad":
            out = vlad_hard(features, self.centers, self.intra_norm)
        else:
            out = gem(features, self.gem_p)
        if self.pca_proj is not None:
            out = pca_whiten(out, self.pca_mean, self.pca_proj)
        return out

    @classmethod
    def for_preset(cls, preset: Preset, vocabulary: Path | None, pca: Path | None) -> "Aggregation":
        a = preset.aggregator
        if a.kind not in ("vlad", "gem") or not presets.head(a).runtime:
            raise ArtifactError(
                f"preset {preset.name} aggregates with {a.kind!r}, which runs inside the graph; "
                "a backbone-scope artifact only makes sense for VLAD/GeM presets: re-export with scope 'descriptor'"
            )
        agg = cls(kind=a.kind, gem_p=a.gem_p)
        if a.kind == "vlad":
            if vocabulary is None:
                raise ArtifactError(
                    f"preset {preset.name} needs a VLAD vocabulary but the artifact has none; re-export it"
                )
            vocab = fitted.load_vocabulary(vocabulary)
            agg.centers, agg.intra_norm = vocab.centers, bool(vocab.meta.get("intra_norm", True))
            if vocab.k != a.clusters or vocab.dim != preset.feature_dim:
                raise ArtifactError(
                    f"{vocabulary}: {vocab.k} x {vocab.dim} centres, preset {preset.name} says {a.clusters} x "
                    f"{preset.feature_dim}; re-export it"
                )
        if pca is not None:
            pw = fitted.load_pca(pca)
            agg.pca_mean, agg.pca_proj = pw.mean, pw.proj
        elif a.pca_dim:
            raise ArtifactError(
                f"preset {preset.name} has PCA to {a.pca_dim} but the artifact has no pca.npz; re-export it"
            )
        return agg
