"""INT8 in the graph: Q/DQ placement TensorRT expects, calibration methods, the fidelity gate."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from onnx import numpy_helper  # noqa: E402

from vpr_edge.engines import graph as G  # noqa: E402
from vpr_edge.engines.calibration import batches  # noqa: E402
from vpr_edge.engines.fidelity import compare_outputs  # noqa: E402
from vpr_edge.engines.int8 import check_qdq, int8_from_onnx  # noqa: E402
from vpr_edge.engines.lower import VerifyData, lower_onnx  # noqa: E402
from vpr_edge.engines.ortrun import run_onnx  # noqa: E402
from vpr_edge.errors import ConfigError, FidelityError  # noqa: E402
from vpr_edge.presets import Preprocess  # noqa: E402

PRE = Preprocess(image_size=(112, 154))


@pytest.fixture(scope="module")
def quantized(toy_path, data, tmp_path_factory):
    dst = tmp_path_factory.mktemp("int8") / "int8.onnx"
    report = int8_from_onnx(toy_path, dst, batches(data[1]), "max", calibration_source="corridor")
    return dst, report


def test_qdq_surrounds_exactly_the_weight_ops(toy_path, quantized):
    dst, report = quantized
    src = G.load(toy_path)
    sidx = G.GraphIndex.of(src)
    weight_ops = [n for n, node in sidx.nodes.items() if node.op_type in ("MatMul", "Conv")
                  and sidx.is_constant(node.input[1])]
    head = {n for n, why in report.excluded.items() if "head" in why or "ArgMax" in why}
    assert set(report.quantized) == set(weight_ops) - head
    assert len(report.quantized) == 1 + 4 * 4  # patch embedding + qkv/proj/fc1/fc2 per block

    model = G.load(dst)
    idx = G.GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    assert check_qdq(model, report.quantized) == []
    for name in report.quantized:
        node = idx.nodes[name]
        act_dq, w_dq = (idx.nodes[idx.producer[t]] for t in node.input[:2])
        assert act_dq.op_type == w_dq.op_type == "DequantizeLinear"
        w = numpy_helper.to_array(inits[w_dq.input[0]])
        scale = numpy_helper.to_array(inits[w_dq.input[1]])
        assert w.dtype == np.int8
        out_axis = 0 if node.op_type == "Conv" else 1
        assert scale.shape == (w.shape[out_axis],)  # per output channel
        assert not numpy_helper.to_array(inits[w_dq.input[2]]).any()  # symmetric
        q = idx.nodes[idx.producer[act_dq.input[0]]]
        assert q.op_type == "QuantizeLinear"
        assert numpy_helper.to_array(inits[q.input[1]]).shape == ()  # per tensor
        zp = numpy_helper.to_array(inits[q.input[2]])
        assert zp.dtype == np.int8 and zp == 0
        # nothing quantised after the op: bias add / GELU / residual stay float
        for consumer in idx.consumers[node.output[0]]:
            assert idx.nodes[consumer].op_type != "QuantizeLinear"
    for name, node in idx.nodes.items():
        if node.op_type in ("LayerNormalization", "Softmax", "ArgMax", "ReduceL2", "Erf"):
            producers = {idx.nodes[idx.producer[t]].op_type for t in node.input if t in idx.producer}
            assert "DequantizeLinear" not in producers, name
    # attention (activation x activation) and VLAD MatMuls are not quantised
    reasons = set(report.excluded.values())
    assert any("attention" in r for r in reasons) and any("head" in r or "ArgMax" in r for r in reasons)


def test_calibration_is_recorded_and_few_images_warn(quantized):
    _, report = quantized
    d = report.to_dict()
    assert d["calibration"]["method"] == "max" and d["calibration"]["images"] == 48
    assert d["calibration"]["source"] == "corridor"
    assert any("few hundred" in w for w in d["warnings"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods(toy_path, data, tmp_path, method):
    verify, cal = data
    report = int8_from_onnx(toy_path, tmp_path / "q.onnx", batches(cal[:15], 7), method)  # uneven batches on purpose
    assert report.calibration["ort_method"] == {"entropy": "Entropy", "percentile": "Percentile"}[method]
    images = verify.images[:16]
    rep = compare_outputs(run_onnx(toy_path, images), run_onnx(tmp_path / "q.onnx", images), np.arange(8), np.arange(8, 16))
    assert rep["cos_mean"] >= 0.98 and rep["nonfinite"] == 0


def test_unknown_method_is_refused(toy_path, data, tmp_path):
    with pytest.raises(ConfigError, match="calibration-method"):
        int8_from_onnx(toy_path, tmp_path / "q.onnx", batches(data[1][:8]), "minmax")


def test_int8_outside_thresholds_fails_loudly(toy_path, data, tmp_path):
    full, cal = data
    verify = VerifyData(full.images[::2], np.arange(16), np.arange(16, 32), None, "corridor, every other image")
    bad = cal[:16] * 0.01  # calibration ranges 100x too small: activations saturate
    with pytest.raises(FidelityError, match="outside thresholds"):
        lower_onnx(toy_path, tmp_path / "bad.onnx", "int8", verify, calibration=bad)
    accepted = lower_onnx(toy_path, tmp_path / "bad.onnx", "int8", verify, calibration=bad, accept_fidelity=True)
    assert not accepted.passed and accepted.verification["accepted_outside_thresholds"]
    assert accepted.verification["failures"]


@pytest.mark.slow
def test_int8_meets_thresholds_on_corridor_with_fallback(toy_path, data, tmp_path):
    verify, cal = data
    result = lower_onnx(toy_path, tmp_path / "model.onnx", "int8", verify, calibration=cal,
                        calibration_source="corridor", target_agreement=0.95)
    v = result.verification
    assert v["passed"], v["failures"]
    rep = v["report"]
    assert rep["cos_mean"] >= 0.98 and rep["top1_agreement"] >= 0.95 and rep["nonfinite"] == 0
    fb = result.details["fallback"]
    assert fb["met"] and fb["agreement"] >= 0.95
    assert 0.0 <= fb["estimated_cost_flops_fraction"] < 1.0  # some of the graph still runs in INT8
    assert len(fb["evaluations"]) < 2 ** 5  # bisection, not all subsets of the 5 units
    assert result.details["int8"]["quantized_nodes"] > 0
    assert result.details["int8"]["calibration"]["method"] == "max"
