"""Outlier stress model (`models.outliers`) and outlier-aware INT8 (`engines.precision.smoothing`)."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_edge.errors import ConfigError

pytest.importorskip("torch")


# -- the stress model ------------------------------------------------------------------------------------------
def _vit(weights: str, preset: str = "anyloc-dinov2-vits14", blocks: int = 6, size=(112, 154)):
    from vpr_edge import presets
    from vpr_edge.models import weights as W

    p = presets.get(preset)
    return W.load_backbone(p.backbone, weights, num_blocks=blocks, image_size=size)


def _images(n=4, size=(112, 154), seed=3):
    import torch

    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, *size)).astype(np.float32))


def test_stress_model_reproduces_its_stated_ratios():
    """ViT-S/14 width, the planting block (12 // 3 = 4) and one after it: the ratios the docstring states, on images
    the planting never saw; random weights of the same seed show none of it."""
    from vpr_edge.models.outliers import DEFAULT, outlier_stats

    imgs = _images()
    tame = outlier_stats(_vit("random"), imgs)
    stressed = outlier_stats(_vit("random-outliers"), imgs)
    assert stressed["block"] == 4
    assert stressed["tokens_over_10x_median_norm"] == DEFAULT.tokens  # exactly the planted ones, in every image
    assert 0.5 * DEFAULT.norm_ratio < stressed["token_norm_ratio"] < 2 * DEFAULT.norm_ratio  # measured 63
    assert stressed["fc2_input_max_over_median"] > 0.3 * DEFAULT.activation_ratio  # measured ~6000
    assert stressed["later_norm1_channel_max_over_median"] > 3  # the channel outliers left behind (measured 4.1)
    assert stressed["first_norm1_channel_max_over_median"] < 3  # the marker itself is no outlier (measured 2.0)
    assert tame["tokens_over_10x_median_norm"] == 0 and tame["token_norm_ratio"] < 3
    assert tame["fc2_input_max_over_median"] < 100 and tame["later_norm1_channel_max_over_median"] < 2


def test_stress_model_is_deterministic_and_its_own_weights_id():
    from vpr_edge.models import weights as W
    from vpr_edge.models.reference import weights_for
    from vpr_edge import presets

    a, b = _vit("random-outliers").state_dict(), _vit("random-outliers").state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not np.array_equal(a["blocks.4.mlp.fc1.weight"].numpy(), _vit("random").state_dict()["blocks.4.mlp.fc1.weight"].numpy())
    p = presets.get("anyloc-dinov2-vits14")
    wid = W.weights_id("random-outliers", p.weights, seed=2)
    assert wid == "random-outliers:seed=2" and wid != W.weights_id("random", p.weights, seed=2)
    assert weights_for(wid, None, p, "artifact") == ("random-outliers", 2)  # rebuildable from a manifest


@pytest.mark.parametrize("preset", ["anyloc-dinov2@tiny", "boq-dinov2@tiny"])
def test_stress_model_plants_into_swiglu_and_boq_backbones(preset):
    """ViT-G's SwiGLU MLP (gate half fires, linear half constant) and BoQ's DINOv2; tiny grids are larger than
    the tiny position table, so the marker is a bump over a few tokens rather than exact deltas."""
    from vpr_edge import presets
    from vpr_edge.models import weights as W
    from vpr_edge.models.outliers import outlier_stats

    p = presets.get(preset.split("@")[0]).tiny()
    size = p.preprocess.image_size
    if p.backbone.family == "dinov2" and p.facet is None:
        model = W.load_boq_backbone(p.backbone, "random-outliers", image_size=size)
    else:
        model = W.load_backbone(p.backbone, "random-outliers", num_blocks=p.facet.layer + 1, image_size=size)
    st = outlier_stats(model, _images(2, size))
    assert st["token_norm_ratio"] > 10 and st["fc2_input_max_over_median"] > 1000
    assert 0 < st["tokens_over_10x_median_norm"] < 0.3 * (size[0] // 14) * (size[1] // 14)


def test_stress_model_refuses_backbones_it_cannot_plant():
    from vpr_edge import presets
    from vpr_edge.models import weights as W

    p = presets.get("anyloc-dino")  # DINO v1 ViT-S/8: planted at block 4 of 12, but only blocks 0..1 built here
    with pytest.raises(ConfigError, match="block 4"):
        W.load_backbone(p.backbone, "random-outliers", num_blocks=2, image_size=(64, 64))
    with pytest.raises(ConfigError, match="input size"):
        W.load_backbone(presets.get("anyloc-dinov2-vits14").backbone, "random-outliers", num_blocks=6)


# -- outlier-aware INT8 on a small graph ------------------------------------------------------------------------
K, H = 16, 64


def _mlp_graph(path):
    """x [B, N, K] -> LayerNorm (one gamma channel 20x: a smoothing case) -> fc1 -> erf-GELU (one unit 1000x: a split
    case) -> fc2 -> y. Biases as the exporter writes them (MatMul then Add)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    gamma = f32(1 + 0.1 * rng.normal(size=K))
    gamma[3] = 20.0
    w1 = f32(rng.normal(size=(K, H)) / np.sqrt(K))
    w1[:, 7] *= 1000.0
    inits = {"gamma": gamma, "beta": f32(0.1 * rng.normal(size=K)), "W1": w1, "b1": f32(0.1 * rng.normal(size=H)),
             "W2": f32(rng.normal(size=(H, K)) / np.sqrt(H)), "b2": f32(0.1 * rng.normal(size=K)),
             "root2": f32(np.sqrt(2.0)), "one": f32(1.0), "half": f32(0.5)}
    n = helper.make_node
    nodes = [n("LayerNormalization", ["x", "gamma", "beta"], ["z"], axis=-1, epsilon=1e-6, name="norm2"),
             n("MatMul", ["z", "W1"], ["h0"], name="fc1"), n("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
             n("Div", ["h", "root2"], ["d"], name="div"), n("Erf", ["d"], ["e"], name="erf"),
             n("Add", ["e", "one"], ["e1"], name="erf_plus_one"), n("Mul", ["h", "half"], ["hh"], name="half"),
             n("Mul", ["hh", "e1"], ["g"], name="gelu"),
             n("MatMul", ["g", "W2"], ["y0"], name="fc2"), n("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 12, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 12, K])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def _run(path, x):
    from vpr_edge.onnxrt import run_onnx

    return run_onnx(path, x)


@pytest.fixture()
def mlp(tmp_path):
    x = np.random.default_rng(1).standard_normal((6, 12, K)).astype(np.float32)
    return _mlp_graph(tmp_path / "mlp.onnx"), x


def test_split_and_smoothing_are_exact_in_fp32(mlp, tmp_path):
    import onnx

    from vpr_edge.engines.graph import GraphIndex
    from vpr_edge.engines.precision import minmax, smoothing

    path, x = mlp
    model = onnx.load(str(path))
    grps = smoothing.groups(model, ["fc1", "fc2"])
    assert {g.tensor: g.channels for g in grps} == {"z": K, "g": H}
    absmax: dict = {}
    minmax.minmax_ranges(path, [x], ("MatMul",), channels={g.tensor: g.channels for g in grps}, channel_absmax=absmax)
    assert np.allclose(absmax["g"], np.abs(_intermediate(path, x, "g")).reshape(-1, H).max(0), rtol=1e-5)  # per-channel max |x|
    rep = smoothing.smooth_(model, absmax, grps, smoothing.OutlierOptions())
    out = tmp_path / "smoothed.onnx"
    onnx.save(model, str(out))
    ref, got = _run(path, x), _run(out, x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    how = {d["tensor"]: d for d in rep.smoothed}
    assert how["z"]["how"] == "layernorm" and how["z"]["smoothed"] and how["z"]["channels_split"] == 0
    assert how["g"]["how"] == "mul" and how["g"]["channels_split"] == 1  # the 1000x unit, alone
    assert rep.split == {"fc2": 1} and rep.split_share == {"fc2": 1 / H}
    assert how["z"]["spread_after"] < how["z"]["spread_before"] and how["g"]["spread_after"] < 8
    idx = GraphIndex.of(model)
    assert idx.nodes["fc2"].input[0] == "g__int8_scaled" and "fc2__outlier_channels" in idx.nodes
    # the range the quantiser gets for a rewritten input is the rewritten tensor's true max |x|
    assert rep.ranges["z"] == pytest.approx(float(np.abs(_intermediate(out, x, "z")).max()), rel=1e-5)


def _intermediate(path, x, name):
    """Value of tensor `name` of the graph at `path` for input x (exposed as an extra output)."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "exposed.onnx"
        onnx.save(model, str(p))
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return sess.run([name], {"x": x})[0]


def test_outlier_aware_int8_keeps_qdq_where_tensorrt_expects_it_and_beats_plain(mlp, tmp_path):
    from vpr_edge.engines import graph as G
    from vpr_edge.engines.precision import int8, smoothing

    path, x = mlp
    cal = [np.random.default_rng(s).standard_normal((8, 12, K)).astype(np.float32) for s in range(3)]

    def quant(name, opts):
        dst = tmp_path / f"{name}.onnx"
        rep = int8.int8_from_onnx(path, dst, cal, rewrite=True, outliers=opts, keep_first_layer=False)
        return rep, dst

    plain_rep, plain = quant("plain", smoothing.OFF)
    aware_rep, aware = quant("aware", smoothing.OutlierOptions())
    model = G.load(aware, load_weights=False)
    assert not int8.check_qdq(model, aware_rep.quantized)  # Q -> DQ -> MatMul on both quantised MatMuls
    idx = G.GraphIndex.of(model)
    side = idx.nodes["fc2__outlier_channels"]
    assert all(idx.nodes.get(idx.producer.get(t, ""), None) is None or idx.nodes[idx.producer[t]].op_type != "DequantizeLinear"
               for t in side.input)  # the split-off channels stay float
    assert aware_rep.excluded["fc2__outlier_channels"].startswith("outlier channels")
    assert aware_rep.outliers["matmuls_split"] == 1 and plain_rep.outliers == {}
    ref = _run(path, x)

    def err(p):
        return float(np.abs(_run(p, x) - ref).max() / np.abs(ref).max())

    assert err(aware) < 0.2 * err(plain)  # the 1000x unit no longer sets the step for every other one


def test_outlier_rewrite_of_a_graph_saved_with_external_data(mlp, tmp_path, monkeypatch):
    """ViT-G's rewritten graph is saved with external data (over 2 GB), which turns the in-memory initializers
    into references to that file: the split and smoothing read and rewrite them there (the stress-model ViT-G
    INT8 export failed on exactly this). Same graph as the in-memory path."""
    from vpr_edge.engines import graph as G
    from vpr_edge.engines.precision import int8, smoothing

    path, x = mlp
    cal = [np.random.default_rng(s).standard_normal((8, 12, K)).astype(np.float32) for s in range(3)]
    small = tmp_path / "small"
    small.mkdir()
    int8.int8_from_onnx(path, small / "aware.onnx", cal, rewrite=True, outliers=smoothing.OutlierOptions(),
                        keep_first_layer=False)
    big = tmp_path / "big"
    big.mkdir()
    monkeypatch.setattr(G, "over_size", lambda model, limit: True)  # every save goes to one external-data file
    rep = int8.int8_from_onnx(path, big / "aware.onnx", cal, rewrite=True, outliers=smoothing.OutlierOptions(),
                              keep_first_layer=False)
    assert rep.outliers["matmuls_split"] == 1
    assert np.array_equal(_run(big / "aware.onnx", x), _run(small / "aware.onnx", x))
    assert not [f for f in big.iterdir() if f.name.startswith(".")]  # no temporary left


def test_graphs_without_outliers_are_left_as_they_are(tmp_path):
    """Random-weight-like statistics: nothing is split or smoothed, so the INT8 graph is the plain one."""
    import onnx

    from vpr_edge.engines.precision import smoothing

    path = _mlp_graph(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    grps = smoothing.groups(model, ["fc1", "fc2"])
    tame = {"z": np.linspace(1, 3, K), "g": np.linspace(1, 4, H)}
    before = model.SerializeToString()
    rep = smoothing.smooth_(model, tame, grps, smoothing.OutlierOptions())
    assert rep.smoothed == [] and model.SerializeToString() == before


def test_outlier_options_are_checked():
    from vpr_edge.engines.precision.smoothing import OutlierOptions

    with pytest.raises(ConfigError, match="smooth-alpha"):
        OutlierOptions(alpha=1.5)


# -- the gate on the stress model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stress_vits(tmp_path_factory, data):
    """ViT-S/14 width with blocks 0..4 (planting at 4) + the value facet of 5, at Corridor's 112x154 (88 tokens):
    the smallest cut of a real preset that holds the massive tokens; FP32 ONNX of random and stress weights."""
    from vpr_edge import presets
    from vpr_edge.export.artifact import ExportOptions, export_artifact

    p = presets.get("anyloc-dinov2-vits14").with_overrides(image_size=(112, 154), layer=5)
    out = {}
    for w in ("random", "random-outliers"):
        folder = tmp_path_factory.mktemp(w)
        export_artifact(p, folder, weights=w, options=ExportOptions(progress=False, torch_worker="off"), force=True)
        out[w] = folder / "model.onnx"
    return out


@pytest.mark.slow
def test_gate_refuses_plain_int8_of_the_stress_model_and_accepts_the_outlier_aware_one(stress_vits, data, tmp_path):
    from vpr_edge.engines.precision.lower import lower_onnx
    from vpr_edge.engines.precision.smoothing import OFF
    from vpr_edge.errors import FidelityError

    verify, cal = data
    with pytest.raises(FidelityError, match="outside thresholds"):
        lower_onnx(stress_vits["random-outliers"], tmp_path / "plain.onnx", "int8", verify, calibration=cal, outliers=OFF)
    plain = lower_onnx(stress_vits["random-outliers"], tmp_path / "plain.onnx", "int8", verify, calibration=cal,
                       outliers=OFF, accept_fidelity=True)
    assert plain.verification["report"]["cos_mean"] < 0.9  # far outside 0.98, not a near miss (measured 0.80)
    aware = lower_onnx(stress_vits["random-outliers"], tmp_path / "aware.onnx", "int8", verify, calibration=cal,
                       accept_fidelity=True)
    oc = aware.details["int8"]["outlier_channels"]
    assert oc["matmuls_split"] >= 1 and oc["channels_split"] <= 2  # the spiking unit, not a share of the layer
    assert aware.verification["report"]["cos_mean"] >= 0.97  # back to random-weight INT8 quality (measured 0.983)
    assert aware.details["beyond_default_flops_fraction"] < 0.001
    # the gate itself (top-1 on near-tied random-weight rankings) is reached with the node-level fallback on top;
    # which MatMuls it keeps moves with ties between runs and machines (measured 11-46% of this 5-block cut's
    # FLOPs, where one block is ~16%; the full 12-block preset: 4.1%, benchmarks/results/int8_outliers), never the
    # whole network
    passed = lower_onnx(stress_vits["random-outliers"], tmp_path / "passed.onnx", "int8", verify, calibration=cal,
                        target_agreement=0.95, refine_nodes=True)
    assert passed.passed, passed.verification["failures"]
    assert passed.details["beyond_default_flops_fraction"] < 0.75


@pytest.mark.slow
def test_outlier_handling_leaves_random_weights_int8_unchanged(stress_vits, data, tmp_path):
    """On well-behaved activations nothing is rewritten: the INT8 graph and its verification are the plain ones."""
    import onnx

    from vpr_edge.engines.precision.lower import lower_onnx
    from vpr_edge.engines.precision.smoothing import OFF

    verify, cal = data
    a = lower_onnx(stress_vits["random"], tmp_path / "a.onnx", "int8", verify, calibration=cal, accept_fidelity=True)
    b = lower_onnx(stress_vits["random"], tmp_path / "b.onnx", "int8", verify, calibration=cal, accept_fidelity=True,
                   outliers=OFF)
    assert a.details["int8"]["outlier_channels"]["tensors_smoothed"] == 0
    assert a.verification["report"]["cos_mean"] == b.verification["report"]["cos_mean"]
    ga, gb = onnx.load(str(tmp_path / "a.onnx")).graph, onnx.load(str(tmp_path / "b.onnx")).graph
    assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node]


def test_int8_outlier_options_are_refused_for_other_precisions():
    from vpr_edge import presets
    from vpr_edge.export.artifact import ExportOptions

    with pytest.raises(ConfigError, match="int8-outliers"):
        ExportOptions(precision="fp16", int8_outliers="off").check(presets.get("anyloc-dinov2-vits14"))
