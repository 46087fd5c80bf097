"""Hard-VLAD assignment ties in the FP32 check.

A hard-VLAD descriptor is a discontinuous function of the features: a token whose two most similar centres the
reference scores within float noise may go to either in another correct implementation (ONNX Runtime's sums differ
from PyTorch's in the last bits, and differently on another CPU), and that one token moves two cluster blocks of
the descriptor. Measured: `anyloc-dino` (ViT-S/8 stride 4, VLAD 128) on random weights, 16 Corridor images: rel err
4.8e-3 at cos min 0.9999994 on an AVX-512 Xeon, where the same export passed on an AVX2 EPYC. So the FP32 gate's
relative error treats such a token like a ranking tie (`fidelity.TIE_EPS`): per image, the smallest error over the
reference descriptors its tied tokens allow. A wrong export moves much more than its tied tokens, and still fails.

What is kept of the reference pass is small (`TieRecord`, per image: the residual sums [K, D] before normalisation
and the tied tokens only), not its features ([N, D] per image: 4.6 MB for ViT-S/8 at 3025 tokens), so the check
costs ~K*D floats per verify image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from vpr_edge.fidelity import TIE_EPS
from vpr_edge.runtime.aggregate import (Aggregation, l2_normalize, pca_whiten, vlad_centers, vlad_normalize,
                                       vlad_residuals)

MAX_TIED = 8  # tied tokens per image tried both ways (2**8 descriptors at most); an image with more is judged as is
CHUNK = 16  # alternative descriptors computed at a time


@dataclass
class TieRecord:
    """One image's hard VLAD, as much as the tie check needs."""

    residual: np.ndarray  # [K, D] sums of (normalised token - its centre) per cluster, before any normalisation
    tokens: np.ndarray  # [T, D] the tied tokens, normalised
    best: np.ndarray  # [T] their cluster in the reference
    second: np.ndarray  # [T] the other centre within TIE_EPS
    tied: int  # how many tokens were tied (> len(tokens) when over MAX_TIED: then none is kept)


def tie_records(features: np.ndarray, centers: np.ndarray, eps: float = TIE_EPS) -> list[TieRecord]:
    """`TieRecord`s of a batch of reference features [B, N, D] (called on each batch of the reference pass)."""
    x = l2_normalize(np.asarray(features, dtype=np.float32))
    c = vlad_centers(centers, x.shape[2])
    sims = x @ l2_normalize(c).T  # [B, N, K]
    best = np.argmax(sims, axis=2)
    masked = sims.copy()
    np.put_along_axis(masked, best[..., None], -np.inf, axis=2)
    second = np.argmax(masked, axis=2)
    margin = np.take_along_axis(sims, best[..., None], 2)[..., 0] - np.take_along_axis(sims, second[..., None], 2)[..., 0]
    residual = vlad_residuals(x, best, c).astype(np.float32)
    out = []
    for i in range(len(x)):
        tied = np.flatnonzero(margin[i] <= eps)
        keep = tied if len(tied) <= MAX_TIED else tied[:0]
        out.append(TieRecord(residual[i], x[i][keep], best[i][keep], second[i][keep], int(len(tied))))
    return out


def tie_rel_err(records: list[TieRecord], agg: Aggregation, got: np.ndarray, scale: float) -> dict:
    """{"rel_err_ties", "tied_tokens", "images_with_ties", "images_judged_strictly"} of descriptors `got` [B, dim]
    against the reference's hard VLAD (+ `agg`'s PCA), its tied tokens free to take either centre; `scale` is the
    rel_err's denominator (the largest reference descriptor value)."""
    c = vlad_centers(agg.centers, records[0].residual.shape[1]) if records else None
    got = np.asarray(got, dtype=np.float32)
    errs = []
    for rec, g in zip(records, got):
        t = len(rec.tokens)
        choices = np.array(list(itertools.product((0, 1), repeat=t)), dtype=np.float32).reshape(2 ** t, t)
        # moving token j from cluster a to b: residual[a] -= x_j - c[a], residual[b] += x_j - c[b]
        out_a = rec.tokens - c[rec.best]  # [T, D]
        into_b = rec.tokens - c[rec.second]
        err = np.inf
        for start in range(0, len(choices), CHUNK):
            pick = choices[start:start + CHUNK]  # [A, T]
            res = np.repeat(rec.residual[None], len(pick), axis=0)  # [A, K, D]
            for j in range(t):
                res[:, rec.best[j]] -= pick[:, j:j + 1] * out_a[j]
                res[:, rec.second[j]] += pick[:, j:j + 1] * into_b[j]
            alt = vlad_normalize(res, agg.intra_norm)
            if agg.pca_proj is not None:
                alt = pca_whiten(alt, agg.pca_mean, agg.pca_proj)
            err = min(err, float(np.abs(alt - g[None]).max(axis=1).min()))
        errs.append(err)
    return {"rel_err_ties": (max(errs) if errs else 0.0) / (scale or 1.0),
            "tied_tokens": int(sum(r.tied for r in records)),
            "images_with_ties": int(sum(r.tied > 0 for r in records)),
            "images_judged_strictly": int(sum(r.tied > MAX_TIED for r in records)), "tie_eps": TIE_EPS}
