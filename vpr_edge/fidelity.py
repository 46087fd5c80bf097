"""Does a stage rank the database like the reference? One report format for every stage.

numpy only (the runtime and benchmarks use it without torch).

Definitions (the same everywhere, so numbers in manifests and benchmarks compare):
- rel_err: max |test - ref| / max |ref| over all elements (relative to the output's scale; an
  elementwise ratio explodes near zero and says nothing about ranking).
- cosine: per-row cosine between test and ref descriptors (min and mean).
- topk_agreement: fraction of queries whose top-k database list (in order) is identical under test
  and ref; top1_agreement is the case k=1. topk_overlap: mean |top-k(test) ∩ top-k(ref)| / k.
- recall@k: fraction of queries with at least one ground-truth positive among the top k.
- score_err_max: max |q.d (test) - q.d (ref)| over all query/database pairs (raw inner products,
  as rank_database and the runtime's maps score).
- zero_norm / constant_rows / distinct_rows: test descriptors with norm < 1e-6, rows whose values are all
  equal, and the number of distinct rows (to 1e-6): degenerate outputs that every gate refuses whatever
  the error metrics say (an all-zero PCA gives zero error against an all-zero reference).
- ref_top1_margin_p50 / ref_score_spread_p50: medians over queries of the reference's top-1 minus
  top-2 score, and of its best minus worst database score: how decidable the ranking is at all
  (random weights often give spreads under 0.01, where any numeric change reorders).
- topk_agreement_ties: topk_agreement where position p may hold a different image if the reference
  scores it within TIE_EPS of the reference's image at p. A swap of images whose reference scores
  differ by g needs score errors of g/2, so this only forgives what an FP32-level score error
  (<= TIE_EPS / 2) can do. Why: random-weight BoQ-ResNet50 scores its database within 0.005 with
  consecutive gaps of ~1e-6; its FP32 ONNX (score error 5.8e-6, rel_err 3e-6) reorders the top 5
  of 4 in 32 queries, which the strict number calls disagreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vpr_edge.errors import InputError

TIE_EPS = 2e-5  # reference scores closer than this are ties at FP32 precision


def _l2n(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def rank_database(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k database indices per query by inner product (descriptors are L2-normalised)."""
    return _rank(queries.astype(np.float64) @ db.astype(np.float64).T, k)


def _rank(sims: np.ndarray, k: int) -> np.ndarray:
    """Top-k columns per row of a [Q, N] score matrix, best first."""
    k = min(k, sims.shape[1])
    # stable tie-breaking by index so equal scores rank identically in every stage
    order = np.lexsort((np.broadcast_to(np.arange(sims.shape[1]), sims.shape), -sims), axis=1)
    return order[:, :k]


def _margins(sims: np.ndarray) -> np.ndarray:
    """Per row of query-database scores: top-1 minus top-2 (0 where the database has one item)."""
    if sims.shape[1] < 2:
        return np.zeros(len(sims))
    top2 = np.sort(np.partition(sims, -2, axis=1)[:, -2:], axis=1)
    return top2[:, 1] - top2[:, 0]


def top1_margins(db: np.ndarray, queries: np.ndarray, rows: int = 256) -> np.ndarray:
    """Per query: its inner product with its top-1 database item minus that with its top-2 (how the map ranks
    L2-normalised descriptors), in blocks of `rows` queries."""
    out = [_margins(queries[i : i + rows] @ db.T) for i in range(0, len(queries), rows)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def recall_at_k(ranked: np.ndarray, positives: Sequence[np.ndarray], ks: Sequence[int] = (1, 5, 10, 20)) -> dict[str, float]:
    """{'R@k': fraction of queries with a positive among their first k}, for ks <= K.

    `ranked` [Q, K] database indices, best first. Queries without any positive count as misses."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or len(ranked) != len(positives):
        raise InputError(f"rankings must be [Q, K] with Q = {len(positives)} queries, got shape {ranked.shape}")
    out = {}
    for k in ks:
        if k > ranked.shape[1]:
            continue
        hits = [np.isin(ranked[i, :k], positives[i]).any() for i in range(len(positives))]
        out[f"R@{k}"] = float(np.mean(hits)) if hits else 0.0
    return out


def compare_descriptors(
    ref: np.ndarray,
    test: np.ndarray,
    db_idx: Sequence[int],
    q_idx: Sequence[int],
    positives: Sequence[np.ndarray] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Fidelity of `test` descriptors against `ref` on the same images."""
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape:
        raise ValueError(f"descriptor shapes differ: ref {ref.shape} vs test {test.shape}")
    finite = np.isfinite(test)
    report: dict[str, float] = {"n_images": int(len(ref)), "nonfinite": int((~finite).sum())}
    t = np.where(finite, test, 0.0)
    scale = float(np.abs(ref).max()) or 1.0
    report["max_abs_err"] = float(np.abs(t - ref).max())
    report["rel_err"] = report["max_abs_err"] / scale
    report["rel_err_ties"] = report["rel_err"]  # hard-VLAD exports recount it with assignment ties (export.ties)
    norms = np.linalg.norm(t, axis=1)
    report["zero_norm"] = int((norms < 1e-6).sum())
    report["constant_rows"] = int(((t.max(axis=1) - t.min(axis=1)) <= 1e-9 * np.maximum(norms, 1e-30)).sum()) if t.shape[1] > 1 else 0
    report["distinct_rows"] = int(len(np.unique(np.round(t, 6), axis=0)))
    cos = np.sum(_l2n(t) * _l2n(ref), axis=1)
    report["cos_min"] = float(cos.min())
    report["cos_mean"] = float(cos.mean())
    db_idx, q_idx = np.asarray(db_idx), np.asarray(q_idx)
    kmax = max(ks)
    s_ref = ref[q_idx] @ ref[db_idx].T
    s_test = t[q_idx] @ t[db_idx].T
    r_ref, r_test = _rank(s_ref, kmax), _rank(s_test, kmax)
    s_err = float(np.abs(s_test - s_ref).max()) if s_ref.size else 0.0
    report["score_err_max"] = s_err
    if s_ref.shape[1] >= 2:
        report["ref_top1_margin_p50"] = float(np.median(_margins(s_ref)))
        report["ref_score_spread_p50"] = float(np.median(s_ref.max(1) - s_ref.min(1)))
    rows = np.arange(len(q_idx))[:, None]
    for k in ks:
        kk = min(k, r_ref.shape[1])
        report[f"top{k}_agreement"] = float(np.mean(np.all(r_ref[:, :kk] == r_test[:, :kk], axis=1)))
        tied = np.abs(s_ref[rows, r_test[:, :kk]] - s_ref[rows, r_ref[:, :kk]]) <= TIE_EPS
        report[f"top{k}_agreement_ties"] = float(np.mean(np.all(tied, axis=1)))
        overlap = [len(set(a[:kk]) & set(b[:kk])) / kk for a, b in zip(r_ref, r_test)]
        report[f"top{k}_overlap"] = float(np.mean(overlap))
    if positives is not None:
        for name, ranked in (("ref", r_ref), ("test", r_test)):
            for key, val in recall_at_k(ranked, positives, ks).items():
                report[f"{key}_{name}"] = val
    return report


def pooled(features: np.ndarray) -> np.ndarray:
    """[n, N, D] token features -> [n, D] mean-pooled, L2-normalised descriptors (for ranking only)."""
    d = np.asarray(features, dtype=np.float64).mean(axis=1)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def compare_outputs(
    ref: np.ndarray,
    test: np.ndarray,
    db_idx: Sequence[int] | np.ndarray,
    q_idx: Sequence[int] | np.ndarray,
    positives: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Fidelity of `test` against the FP32 `ref` on the same images (rows).

    [n, dim] descriptors are compared directly. [n, N, D] features are ranked by their pooled
    descriptor, and the per-token cosine is added as token_cos_min/token_cos_mean."""
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape:
        raise InputError(f"reference and test outputs differ in shape: {ref.shape} vs {test.shape}")
    if ref.ndim == 2:
        return compare_descriptors(ref, test, db_idx, q_idx, positives)
    if ref.ndim != 3:
        raise InputError(f"expected [n, dim] descriptors or [n, N, D] features, got shape {ref.shape}")
    finite = np.isfinite(test).all(axis=(1, 2))
    safe = np.where(np.isfinite(test), test, 0.0)
    report = compare_descriptors(pooled(ref), pooled(safe), db_idx, q_idx, positives)
    tok_r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    tok_t = safe.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = np.sum(tok_r * tok_t, axis=1) / np.maximum(np.linalg.norm(tok_r, axis=1) * np.linalg.norm(tok_t, axis=1), 1e-12)
    report["nonfinite"] = int((~np.isfinite(test)).sum())
    report["token_cos_min"] = float(cos.min())
    report["token_cos_mean"] = float(cos.mean())
    report["cos_mean"] = min(report["cos_mean"], report["token_cos_mean"])
    report["cos_min"] = min(report["cos_min"], report["token_cos_min"]) if finite.all() else -1.0
    scale = float(np.abs(ref).max()) or 1.0
    report["max_abs_err"] = float(np.abs(safe - ref).max())
    report["rel_err"] = report["max_abs_err"] / scale
    return report
