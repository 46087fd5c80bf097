"""Hard-VLAD assignment ties in the FP32 check (export.ties): a token the reference places within float noise of
two centres may go to either; anything else still counts in full."""

from __future__ import annotations

import numpy as np

from vpr_edge.export.ties import MAX_TIED, tie_records, tie_rel_err
from vpr_edge.runtime.aggregate import Aggregation, l2_normalize, vlad_from_labels, vlad_hard


def _case(seed=0, n=40, d=8, k=4):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32)
    feats = rng.standard_normal((2, n, d)).astype(np.float32)
    cn = l2_normalize(centers)
    # token 5 of image 0 halfway between centres 0 and 1: its similarities to both are equal to float noise
    feats[0, 5] = (cn[0] + cn[1]) * 3.0
    return feats, centers


def test_a_tied_token_that_changes_cluster_is_not_an_error():
    feats, centers = _case()
    agg = Aggregation(kind="vlad", centers=centers)
    ref = vlad_hard(feats, centers)
    x = l2_normalize(feats)
    labels = np.argmax(x @ l2_normalize(centers).T, axis=2)
    assert labels[0, 5] in (0, 1)
    flipped = labels.copy()
    flipped[0, 5] = 1 - labels[0, 5]
    other = vlad_from_labels(x, flipped, centers)  # what an equally right implementation may compute
    scale = float(np.abs(ref).max())
    strict = float(np.abs(other - ref).max()) / scale
    rep = tie_rel_err(tie_records(feats, centers), agg, other, scale)
    assert strict > 1e-2 and rep["rel_err_ties"] < 1e-6
    assert rep["tied_tokens"] == 1 and rep["images_with_ties"] == 1 and rep["images_judged_strictly"] == 0


def test_other_errors_still_count_in_full():
    feats, centers = _case(1)
    agg = Aggregation(kind="vlad", centers=centers)
    ref = vlad_hard(feats, centers)
    scale = float(np.abs(ref).max())
    x = l2_normalize(feats)
    labels = np.argmax(x @ l2_normalize(centers).T, axis=2)
    wrong = labels.copy()
    wrong[1, 7] = (labels[1, 7] + 2) % centers.shape[0]  # an untied token in the wrong cluster: an export bug
    bad = vlad_from_labels(x, wrong, centers)
    assert tie_rel_err(tie_records(feats, centers), agg, bad, scale)["rel_err_ties"] > 1e-2
    noisy = ref.copy()
    noisy[0, 3] += 1e-3 * scale
    assert abs(tie_rel_err(tie_records(feats, centers), agg, noisy, scale)["rel_err_ties"] - 1e-3) < 1e-5
    assert tie_rel_err(tie_records(feats, centers), agg, ref, scale)["rel_err_ties"] < 1e-6


def test_a_hard_vlad_export_judges_the_tie_aware_error(corridor, tmp_path):
    from vpr_edge import presets
    from vpr_edge.export.artifact import ExportOptions, export_artifact

    m = export_artifact(presets.get("anyloc-dinov2-vits14").tiny(), tmp_path / "a",
                        options=ExportOptions(verify=corridor, verify_limit=8, progress=False))
    v = m.verification["fp32"]
    rep = v["report"]
    assert {"tied_tokens", "images_with_ties", "images_judged_strictly"} <= set(rep)
    assert rep["rel_err_ties"] <= rep["rel_err"] + 1e-12 and v["passed"]
    assert "rel_err_ties" in v["tolerance"]
    # GeM has no assignment: the strict error is the judged one
    g = export_artifact(presets.get("anyloc-dinov2-gem").tiny(), tmp_path / "g",
                        options=ExportOptions(verify=corridor, verify_limit=8, progress=False))
    rg = g.verification["fp32"]["report"]
    assert rg["rel_err_ties"] == rg["rel_err"] and "tied_tokens" not in rg


def test_ties_through_pca_and_too_many_ties_judged_as_is():
    from vpr_edge.runtime.aggregate import pca_whiten

    feats, centers = _case()
    k, d = centers.shape
    rng = np.random.default_rng(5)
    proj = np.linalg.qr(rng.standard_normal((k * d, k * d)))[0][:12].astype(np.float32)
    agg = Aggregation(kind="vlad", centers=centers, pca_mean=np.zeros(k * d, np.float32), pca_proj=proj)
    x = l2_normalize(feats)
    labels = np.argmax(x @ l2_normalize(centers).T, axis=2)
    assert labels[0, 5] in (0, 1)
    flipped = labels.copy()
    flipped[0, 5] = 1 - labels[0, 5]
    ref = pca_whiten(vlad_hard(feats, centers), agg.pca_mean, proj)
    other = pca_whiten(vlad_from_labels(x, flipped, centers), agg.pca_mean, proj)
    scale = float(np.abs(ref).max())
    assert float(np.abs(other - ref).max()) / scale > 1e-2
    assert tie_rel_err(tie_records(feats, centers), agg, other, scale)["rel_err_ties"] < 1e-5
    # more tied tokens than MAX_TIED in one image: none is tried, the image is judged as is
    many = np.repeat(feats[:1, 5:6], MAX_TIED + 2, axis=1)
    recs = tie_records(np.concatenate([many, feats[:1, 10:]], axis=1), centers)
    assert recs[0].tied == MAX_TIED + 2 and len(recs[0].tokens) == 0
    rep = tie_rel_err(recs, Aggregation(kind="vlad", centers=centers), vlad_hard(np.concatenate([many, feats[:1, 10:]], axis=1), centers), 1.0)
    assert rep["images_judged_strictly"] == 1 and rep["rel_err_ties"] < 1e-6
