"""Hard VLAD, GeM and PCA-whitening against straightforward re-statements of AnyLoc's code."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_edge import presets
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.models.gem import GeM
from vpr_edge.fitted import PCAWhitening, load_pca
from vpr_edge.models.pca import PCAWhiten, fit_pca, fit_pca_whitening, pca_module
from vpr_edge.space import DescriptorSpace
from vpr_edge.models.vlad import HardVLAD

# ---------------------------------------------------------------------------------------------
# Hard VLAD
# ---------------------------------------------------------------------------------------------


def anyloc_vlad(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """AnyLoc utilities.VLAD.generate (hard, norm_descs, intra_norm) for one image, [N, K, D] residuals and all."""
    k, d = centers.shape
    labels = (F.normalize(x, dim=-1) @ F.normalize(centers, dim=-1).T).argmax(dim=-1)
    residuals = F.normalize(x, dim=-1)[:, None, :] - centers[None, :, :]  # normalised patch - raw centre
    un_vlad = torch.zeros(k * d, dtype=x.dtype)
    for c in set(labels.tolist()):
        cd_sum = residuals[labels == c, c].sum(dim=0)
        un_vlad[c * d : (c + 1) * d] = F.normalize(cd_sum, dim=0)
    return F.normalize(un_vlad, dim=0)


def _data(b=3, n=20, k=16, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # raw centres of norm < 1, like AnyLoc's (means of unit vectors); few patches, many clusters -> empty ones
    centers = F.normalize(torch.randn(k, d, generator=g), dim=-1) * (0.4 + 0.5 * torch.rand(k, 1, generator=g))
    x = torch.randn(b, n, d, generator=g)
    return x, centers


def test_hard_vlad_equals_anyloc_loop_with_empty_clusters():
    x, c = _data()
    m = HardVLAD(c)
    out = m(x)
    assert out.shape == (3, 16 * 24)
    labels = m.assign(x)
    assert any(len(set(row.tolist())) < 16 for row in labels), "test data should leave some clusters empty"
    ref = torch.stack([anyloc_vlad(xi, c) for xi in x])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_hard_vlad_does_not_care_whether_features_come_normalised():
    x, c = _data(seed=1)
    m = HardVLAD(c)
    torch.testing.assert_close(m(x), m(F.normalize(x, dim=-1) * 3.0), atol=1e-6, rtol=1e-5)


def test_hard_vlad_invariants():
    x, c = _data(b=4, n=30, k=12, d=16, seed=2)
    m = HardVLAD(c)
    out = m(x)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    blocks = out.reshape(4, 12, 16)
    labels = m.assign(x)
    for b in range(4):
        used = set(labels[b].tolist())
        for k in range(12):
            if k in used:
                # each non-empty block was intra-normalised, then all scaled by 1/sqrt(#non-empty)
                assert blocks[b, k].norm().item() == pytest.approx(1 / np.sqrt(len(used)), rel=1e-5)
            else:
                assert torch.count_nonzero(blocks[b, k]) == 0  # exactly zero, not tiny, not NaN


def test_hard_vlad_ties_go_to_the_lowest_index():
    c = torch.eye(4)[:3].clone()
    c = torch.cat([c, c[:1]])  # centre 3 duplicates centre 0: every tie must go to 0
    x = torch.tensor([[[1.0, 0.1, 0.0, 0.0], [0.9, 0.0, 0.1, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    m = HardVLAD(c)
    assert m.assign(x).tolist() == [[0, 0, 1]]
    assert torch.count_nonzero(m(x).reshape(4, 4)[3]) == 0
    # an exact tie between two different centres: equal cosine to e0 and e1
    x2 = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    assert m.assign(x2).tolist() == [[0]]


def test_hard_vlad_gradients_flow_to_features():
    x, c = _data(b=2, n=10, k=4, d=6, seed=3)
    m = HardVLAD(c).double()
    x = x.double().requires_grad_(True)
    (m(x) * torch.randn(2, 24, dtype=torch.float64)).sum().backward()  # a unit-norm output has no grad for sum(y^2)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the residual path is differentiable wherever the assignment does not change
    assert torch.autograd.gradcheck(m, (x.detach().requires_grad_(True),), eps=1e-6, atol=1e-5)


def test_hard_vlad_rejects_wrong_feature_dim():
    m = HardVLAD(torch.randn(4, 8))
    with pytest.raises(ConfigError, match=r"\[B, N, 8\]"):
        m(torch.randn(1, 5, 9))


@pytest.fixture(scope="module")
def vlad_onnx(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    x, c = _data(b=2, n=40, k=8, d=32, seed=4)
    c[5] = c[1]  # a duplicated centre: ties must resolve like torch (first index) in ORT too
    m = HardVLAD(c).eval()
    path = tmp_path_factory.mktemp("vlad") / "vlad.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True, opset_version=18, input_names=["features"], verbose=False)
    return m, x, onnx.load(str(path)), path


def test_hard_vlad_onnx_runs_and_matches(vlad_onnx):
    ort = pytest.importorskip("onnxruntime")
    m, x, _, path = vlad_onnx
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for xi in (x, torch.randn_like(x)):
        got = sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})[0]
        np.testing.assert_allclose(got, m(xi).detach().numpy(), atol=1e-6)


def test_hard_vlad_onnx_graph_is_argmax_onehot_matmul_without_nkd_tensor(vlad_onnx):
    import onnx

    m, x, model, _ = vlad_onnx
    ops = [n.op_type for n in model.graph.node]
    assert "ArgMax" in ops and "MatMul" in ops
    assert "Equal" in ops or "OneHot" in ops
    b, n, d = x.shape
    k = m.num_clusters
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = []
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [dd.dim_value for dd in vi.type.tensor_type.shape.dim]
        assert all(v > 0 for v in dims), f"{vi.name} has an unknown dimension"
        shapes.append(dims)
    assert len(shapes) > 10
    assert max(int(np.prod(s)) for s in shapes) < b * n * k * d, "an [N, K, D]-sized tensor is in the graph"
    assert all(len(s) <= 3 for s in shapes)


# ---------------------------------------------------------------------------------------------
# GeM
# ---------------------------------------------------------------------------------------------


def anyloc_gem(x: torch.Tensor, p: float, use_abs: bool) -> torch.Tensor:
    """AnyLoc scripts/dino_v2_gem.py get_gem_descriptors (then the L2 its recall code applies)."""
    if use_abs:
        g = torch.mean(torch.abs(x) ** p, dim=-2) ** (1 / p)
    else:
        m = torch.mean(x**p, dim=-2)
        g = torch.abs(m.to(torch.complex64) ** (1 / p)) * torch.sign(m)
    return F.normalize(g, dim=-1)


@pytest.mark.parametrize("p", [3.0, 4.0, 1.0])
def test_gem_signed_matches_anyloc(p):
    x = F.normalize(torch.randn(3, 50, 40, dtype=torch.float64), dim=-1)
    got = GeM(p=p).double()(x)
    torch.testing.assert_close(got, anyloc_gem(x, p, use_abs=False).double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    if int(p) % 2:
        assert (got < 0).any(), "signed facet features must keep negative GeM components (odd p)"


def test_gem_abs_and_clamp_modes_match_their_formulas():
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    torch.testing.assert_close(GeM(3.0, mode="abs")(x), anyloc_gem(x, 3.0, use_abs=True), atol=1e-7, rtol=1e-6)
    eps, p = 1e-6, 2.5
    want = F.normalize(x.clamp(min=eps).pow(p).mean(dim=1).pow(1 / p), dim=-1)  # the talk's formula + L2
    torch.testing.assert_close(GeM(p, eps=eps, mode="clamp")(x), want, atol=1e-7, rtol=1e-6)


def test_gem_rejects_fractional_p_in_signed_mode_and_bad_input():
    with pytest.raises(ConfigError, match="integer p"):
        GeM(p=2.5)
    with pytest.raises(ConfigError):
        GeM(p=3, mode="nope")
    with pytest.raises(ConfigError, match=r"\[B, N, D\]"):
        GeM()(torch.randn(2, 3))


def test_gem_gradient_is_finite_where_the_mean_is_zero():
    x = torch.randn(1, 6, 5)
    x[:, :, 0] = 0.0  # a dimension whose mean of cubes is exactly 0
    x.requires_grad_(True)
    (GeM()(x) * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gem_onnx_matches():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = GeM(3.0).eval()
    x = F.normalize(torch.randn(2, 20, 12), dim=-1)
    prog = torch.onnx.export(m, (x,), dynamo=True, opset_version=18, verbose=False)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, m(x).numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# PCA-whitening
# ---------------------------------------------------------------------------------------------


def _descriptors(n, d, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(5.0, 0.05, d)
    return (rng.standard_normal((n, d)) * scales + 3.0).astype(np.float32)


@pytest.mark.parametrize("n,d,dim", [(400, 64, 16), (60, 300, 40)])  # n > D and n < D (Gram path)
def test_pca_whitening_identity_covariance_on_fit_set(n, d, dim):
    x = _descriptors(n, d)
    mean, proj = fit_pca(x, dim)
    assert mean.shape == (d,) and proj.shape == (dim, d)
    y = (x - mean) @ proj.T  # before the final L2
    np.testing.assert_allclose(y.T @ y / n, np.eye(dim), atol=2e-3)
    out = PCAWhiten(torch.from_numpy(mean), torch.from_numpy(proj))(torch.from_numpy(x))
    assert out.shape == (n, dim)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(n))


def test_pca_without_whitening_has_orthonormal_axes_in_variance_order():
    x = _descriptors(300, 32, seed=1)
    mean, proj = fit_pca(x, 8, whiten=False)
    np.testing.assert_allclose(proj @ proj.T, np.eye(8), atol=1e-5)
    var = ((x - mean) @ proj.T).var(axis=0)
    assert np.all(np.diff(var) <= 1e-3 * var[0])


def test_pca_too_few_images_is_a_clear_error():
    x = _descriptors(20, 100)
    with pytest.raises(InputError, match="too few images to do PCA.*needs more than 20 descriptors, got 20"):
        fit_pca(x, 20)
    fit_pca(x, 19)  # n - 1 components are fine


def test_pca_rank_deficient_data_is_refused():
    x = np.repeat(_descriptors(5, 50), 10, axis=0)  # 50 rows but only 5 distinct
    with pytest.raises(InputError, match="span only about 4 dimensions"):
        fit_pca(x, 10)


def test_pca_file_round_trip_and_checks(tmp_path):
    preset = presets.get("anyloc-dinov2-pca").tiny()
    base = preset.without_pca()
    full, out = base.descriptor_dim, preset.aggregator.pca_dim
    x = _descriptors(80, full, seed=2)
    pw = fit_pca_whitening(x, preset, source="test")
    assert (pw.in_dim, pw.out_dim) == (base.descriptor_dim, preset.aggregator.pca_dim)
    path = pw.save(tmp_path / "pca.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca.npz"]  # nothing partial left
    again = load_pca(path, preset)
    np.testing.assert_array_equal(again.proj, pw.proj)
    np.testing.assert_array_equal(again.mean, pw.mean)
    assert again.meta["space"] == DescriptorSpace.of(preset.with_overrides(pca_dim=again.out_dim), None).to_dict()
    assert again.meta["whiten"] is True
    ref = again.apply(x[:5])
    got = pca_module(again)(torch.from_numpy(x[:5])).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)

    other_layer = preset.with_overrides(layer=1)
    with pytest.raises(ArtifactError, match="pca.npz.*layer") as e:
        PCAWhitening.load(path, other_layer)
    assert "\n" not in str(e.value)
    other = out + 2  # any size other than the one fitted
    with pytest.raises(ArtifactError, match=rf"pca.npz maps {full} -> {out} dims.*needs {full} -> {other}"):
        again.check_for(preset.with_overrides(pca_dim=other))
    with pytest.raises(ArtifactError, match="pca.npz"):
        again.check_for(preset.with_overrides(clusters=preset.aggregator.clusters * 2))


def test_pca_remembers_its_vocabulary():
    from vpr_edge.fitted import Vocabulary

    preset = presets.get("anyloc-dinov2-pca").tiny()
    rng = np.random.default_rng(0)
    shape = (preset.aggregator.clusters, preset.feature_dim)
    v1 = Vocabulary.for_preset(rng.standard_normal(shape).astype(np.float32), preset.without_pca())
    v2 = Vocabulary.for_preset(rng.standard_normal(shape).astype(np.float32), preset.without_pca())
    pw = fit_pca_whitening(_descriptors(40, preset.without_pca().descriptor_dim), preset, vocabulary=v1)
    pw.check_for(preset, v1)
    with pytest.raises(ArtifactError, match="vocabulary"):
        pw.check_for(preset, v2)


def test_pca_fit_rejects_descriptors_of_the_wrong_size():
    preset = presets.get("anyloc-dinov2-pca").tiny()
    with pytest.raises(InputError, match=rf"{preset.without_pca().descriptor_dim}-d descriptors, got 100-d"):
        fit_pca_whitening(_descriptors(40, 100), preset)
