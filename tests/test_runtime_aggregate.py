"""Numpy aggregation (runtime) against naive loops and against the torch reference heads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vpr_edge import presets
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.runtime.aggregate import Aggregation, gem, pca_whiten, vlad_hard


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _naive_vlad(feats: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """AnyLoc's hard VLAD written as loops over patches and clusters."""
    k, d = centers.shape
    cn = _unit(centers)
    blocks = np.zeros((k, d))
    for x in feats:
        x = x / np.linalg.norm(x)
        best = int(np.argmax([x @ c for c in cn]))
        blocks[best] += x - centers[best]
    for j in range(k):
        n = np.linalg.norm(blocks[j])
        if n > 0:
            blocks[j] /= n
    v = blocks.reshape(-1)
    return v / np.linalg.norm(v)


def _data(seed=0, b=3, n=50, d=16, k=6):
    rng = np.random.default_rng(seed)
    feats = _unit(rng.standard_normal((b, n, d))).astype(np.float32)
    centers = (rng.standard_normal((k, d)) * 0.3).astype(np.float32)
    return feats, centers


def test_vlad_matches_naive_loop_including_empty_clusters():
    feats, centers = _data()
    centers[5] = centers[0] * 2.0  # same direction as centre 0: ties go to 0, so cluster 5 stays empty
    out = vlad_hard(feats, centers)
    assert np.all(out.reshape(3, 6, 16)[:, 5] == 0) and np.all(np.any(out.reshape(3, 6, 16)[:, 0] != 0, axis=1))
    assert out.shape == (3, 6 * 16) and out.dtype == np.float32
    for b in range(3):
        np.testing.assert_allclose(out[b], _naive_vlad(feats[b], centers), atol=2e-6)
    # single image [N, D] -> [K*D]
    np.testing.assert_allclose(vlad_hard(feats[0], centers), out[0], atol=1e-7)


def test_vlad_empty_cluster_is_zero_and_layout_is_cluster_major():
    d = 4
    centers = np.eye(3, d, dtype=np.float32)  # centres along e0, e1, e2
    feats = np.array([[1, 0.1, 0, 0], [0.9, 0, 0.2, 0], [0, 1, 0, 0.1]], dtype=np.float32)
    out = vlad_hard(_unit(feats), centers)
    blocks = out.reshape(3, d)
    assert np.all(blocks[2] == 0)  # no patch chose e2
    assert np.linalg.norm(blocks[0]) > 0 and np.linalg.norm(blocks[1]) > 0
    np.testing.assert_allclose(np.linalg.norm(blocks[0]), np.linalg.norm(blocks[1]), rtol=1e-6)  # intra-norm
    np.testing.assert_allclose(np.linalg.norm(out), 1.0, rtol=1e-6)


def test_vlad_matches_torch_reference_head():
    torch = pytest.importorskip("torch")
    vlad = pytest.importorskip("vpr_edge.models.vlad")
    feats, centers = _data(seed=3, b=4, n=200, d=32, k=8)
    ref = vlad.HardVLAD(torch.from_numpy(centers))(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(vlad_hard(feats, centers), ref, atol=1e-6)


def _naive_gem(feats, p=3, eps=1e-6, mode="signed"):
    x = feats.astype(np.float64)
    if mode == "abs":
        x = np.abs(x)
    elif mode == "clamp":
        x = np.maximum(x, eps)
    m = np.mean(x**p, axis=0)
    g = np.sign(m) * np.maximum(np.abs(m), eps**p) ** (1 / p) if mode == "signed" else np.maximum(m, eps**p) ** (1 / p)
    return g / np.linalg.norm(g)


@pytest.mark.parametrize("mode", ["signed", "abs", "clamp"])
def test_gem_matches_naive_and_torch(mode):
    feats, _ = _data(seed=4)
    out = gem(feats, 3.0, mode=mode)
    for b in range(len(feats)):
        np.testing.assert_allclose(out[b], _naive_gem(feats[b], mode=mode), atol=2e-6)
    try:
        import torch

        from vpr_edge.models.gem import GeM
    except ImportError:
        return
    ref = GeM(p=3.0, mode=mode)(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_gem_signed_keeps_negative_components():
    feats = np.tile(np.array([[-0.8, 0.6]], np.float32), (5, 1))
    out = gem(feats, 3.0)
    assert out[0] < 0 < out[1]  # a clamping GeM would zero the first component
    with pytest.raises(ConfigError, match="integer p"):
        gem(feats, 2.5)


def test_pca_whiten_matches_formula_and_torch():
    rng = np.random.default_rng(5)
    x = _unit(rng.standard_normal((7, 24))).astype(np.float32)
    mean = rng.standard_normal(24).astype(np.float32) * 0.1
    proj = rng.standard_normal((8, 24)).astype(np.float32)
    out = pca_whiten(x, mean, proj)
    ref = (x - mean) @ proj.T
    np.testing.assert_allclose(out, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    try:
        import torch

        from vpr_edge.models.pca import PCAWhiten
    except ImportError:
        return
    np.testing.assert_allclose(
        out, PCAWhiten(torch.from_numpy(mean), torch.from_numpy(proj))(torch.from_numpy(x)).numpy(), atol=1e-6
    )
    with pytest.raises(ArtifactError):
        pca_whiten(x, mean, proj[:, :10])


def test_aggregation_for_preset(tmp_path):
    p = presets.get("anyloc-dinov2").tiny()
    with pytest.raises(ArtifactError, match="vocabulary"):
        Aggregation.for_preset(p, None, None)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, centers=np.zeros((3, p.feature_dim), np.float32), meta=np.array(json.dumps({})))
    with pytest.raises(ArtifactError, match="3 centres"):
        Aggregation.for_preset(p, wrong, None)
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ArtifactError, match=r"lacks \['centers'\]"):
        Aggregation.for_preset(p, bad, None)
    with pytest.raises(ArtifactError, match="runs inside the graph"):
        Aggregation.for_preset(presets.get("boq-resnet50").tiny(), None, None)
    good = tmp_path / "v.npz"
    centers = np.random.default_rng(0).standard_normal((p.aggregator.clusters, p.feature_dim)).astype(np.float32)
    np.savez(good, centers=centers, meta=np.array(json.dumps({"k": 4})))
    agg = Aggregation.for_preset(p, good, None)
    feats = _unit(np.random.default_rng(1).standard_normal((2, 10, p.feature_dim))).astype(np.float32)
    assert agg(feats).shape == (2, p.descriptor_dim) == (2, agg.dim)
    pca_preset = presets.get("anyloc-dinov2-pca").tiny()
    with pytest.raises(ArtifactError, match="pca"):
        Aggregation.for_preset(pca_preset, good, None)
