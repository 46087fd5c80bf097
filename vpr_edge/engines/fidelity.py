"""Is a lowered-precision graph close enough to its FP32 reference? Thresholds and the gate.

The numbers themselves come from `vpr_edge.fidelity.compare_descriptors` (one report format for
every stage: cos_min/cos_mean, top-k agreement and overlap, recall, non-finite count, errors).
Here: outputs of either scope are turned into descriptors, and the thresholds of issue 4 applied.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vpr_edge import fidelity as F
from vpr_edge.errors import ConfigError

# The mean cosine is gated; the min is reported (one hard image among hundreds shows up in the
# agreement, which is what retrieval depends on). NaN/Inf anywhere fails.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp16": {"cos_mean": 0.999, "top1_agreement": 0.99, "nonfinite": 0},
    "int8": {"cos_mean": 0.98, "top1_agreement": 0.95, "nonfinite": 0},
}


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
        raise ConfigError(f"reference and test outputs differ in shape: {ref.shape} vs {test.shape}")
    if ref.ndim == 2:
        return F.compare_descriptors(ref, test, db_idx, q_idx, positives)
    if ref.ndim != 3:
        raise ConfigError(f"expected [n, dim] descriptors or [n, N, D] features, got shape {ref.shape}")
    finite = np.isfinite(test).all(axis=(1, 2))
    safe = np.where(np.isfinite(test), test, 0.0)
    report = F.compare_descriptors(pooled(ref), pooled(safe), db_idx, q_idx, positives)
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


def check_fidelity(report: dict[str, Any], precision: str) -> list[str]:
    """Failed thresholds as readable lines (empty: within thresholds)."""
    if precision not in THRESHOLDS:
        raise ConfigError(f"no fidelity thresholds for precision {precision!r}; choose one of {sorted(THRESHOLDS)}")
    t = THRESHOLDS[precision]
    fails = []
    if report["nonfinite"] > t["nonfinite"]:
        fails.append(f"{report['nonfinite']} NaN/Inf values in the outputs")
    if not report["cos_mean"] >= t["cos_mean"]:  # `not >=` also catches NaN
        fails.append(f"mean descriptor cosine {report['cos_mean']:.5f} < {t['cos_mean']}")
    if not report["top1_agreement"] >= t["top1_agreement"]:
        fails.append(f"top-1 agreement {report['top1_agreement']:.3f} < {t['top1_agreement']}")
    return fails
