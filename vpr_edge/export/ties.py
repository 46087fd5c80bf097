"""Hard-VLAD assignment ties in the FP32 check.

A hard-VLAD descriptor is a discontinuous function of the features: a token whose two most similar centres the
reference scores within float noise may go to either in another correct implementation (ONNX Runtime's sums differ
from PyTorch's in the last bits, and differently on another CPU), and that one token moves two cluster blocks of
the descriptor. Measured: `anyloc-dino` (ViT-S/8 stride 4, VLAD 128) on random weights, 16 Corridor images: rel err
4.8e-3 at cos min 0.9999994 on an AVX-512 Xeon, where the same export passed on an AVX2 EPYC. So the FP32 gate's
relative error treats such a token like a ranking tie (`fidelity.TIE_EPS`): per image, the smallest error over the
reference descriptors its tied tokens allow. A wrong export moves much more than its tied tokens, and still fails.
"""

from __future__ import annotations

import itertools

import numpy as np

from vpr_edge.fidelity import TIE_EPS
from vpr_edge.runtime.aggregate import Aggregation, l2_normalize, pca_whiten, vlad_centers, vlad_from_labels

MAX_TIED = 8  # tied tokens per image tried both ways (2**8 descriptors at most); an image with more is judged as is
CHUNK = 16  # alternative descriptors computed at a time (each holds a one-hot [tokens, clusters])


def tie_rel_err(features: np.ndarray, agg: Aggregation, got: np.ndarray, scale: float, eps: float = TIE_EPS) -> dict:
    """{"rel_err_ties", "tied_tokens", "images_with_ties", "images_judged_strictly"} of descriptors `got` [B, dim]
    against the hard VLAD (+ PCA) `agg` of the reference's features [B, N, D]; `scale` is the rel_err's
    denominator (the largest reference descriptor value)."""
    x = l2_normalize(np.asarray(features, dtype=np.float32))
    c = vlad_centers(agg.centers, x.shape[2])
    sims = x @ l2_normalize(c).T  # [B, N, K]
    best = np.argmax(sims, axis=2)
    masked = sims.copy()
    np.put_along_axis(masked, best[..., None], -np.inf, axis=2)
    second = np.argmax(masked, axis=2)
    margin = np.take_along_axis(sims, best[..., None], 2)[..., 0] - np.take_along_axis(sims, second[..., None], 2)[..., 0]
    got = np.asarray(got, dtype=np.float32)
    errs, tied_tokens, with_ties, strict = [], 0, 0, 0
    for i in range(len(x)):
        tied = np.flatnonzero(margin[i] <= eps)
        tied_tokens += len(tied)
        with_ties += bool(len(tied))
        if len(tied) > MAX_TIED:
            strict += 1
            tied = tied[:0]
        choices = np.array(list(itertools.product((0, 1), repeat=len(tied))), dtype=bool).reshape(2 ** len(tied), len(tied))
        err = np.inf
        for start in range(0, len(choices), CHUNK):
            pick = choices[start:start + CHUNK]
            labels = np.repeat(best[i][None], len(pick), axis=0)
            labels[:, tied] = np.where(pick, second[i][tied][None], best[i][tied][None])
            alt = vlad_from_labels(np.repeat(x[i][None], len(pick), axis=0), labels, c, agg.intra_norm)
            if agg.pca_proj is not None:
                alt = pca_whiten(alt, agg.pca_mean, agg.pca_proj)
            err = min(err, float(np.abs(alt - got[i][None]).max(axis=1).min()))
        errs.append(err)
    return {"rel_err_ties": max(errs) / (scale or 1.0), "tied_tokens": int(tied_tokens),
            "images_with_ties": int(with_ties), "images_judged_strictly": int(strict), "tie_eps": eps}
