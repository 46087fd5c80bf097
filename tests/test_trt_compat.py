"""engines/tensorrt/compat: the offline TensorRT check finds what TensorRT refuses, and passes graphs like ours.

Graphs are built here with onnx.helper in the shapes our exporter, onnxconverter-common and ORT's QDQ
quantiser write (FP16 islands and INT8 come from those libraries themselves); every seeded failure is one
TensorRT documents, and each test asserts the node it must name."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from vpr_edge.engines.tensorrt import onnx_support as S  # noqa: E402
from vpr_edge.engines.tensorrt.compat import check_onnx  # noqa: E402
from vpr_edge.errors import ArtifactError, ConfigError  # noqa: E402

RNG = np.random.default_rng(0)


def _w(*shape, dtype=np.float32):
    return (RNG.standard_normal(shape) * 0.1).astype(dtype)


def _model(nodes, inputs, outputs, inits=(), opset=18, value_info=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info))
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _vi(name, et, dims):
    return h.make_tensor_value_info(name, et, dims)


def fp32_graph(batch="batch", h_=8, w_=8):
    """AnyLoc-like at toy size: patch Conv, tokens, LayerNorm, MLP with erf-GELU, attention-ish Softmax,
    per-token L2, hard assignment (ArgMax -> Equal -> Cast), counts (ReduceSum)."""
    inits = [
        nh.from_array(_w(4, 3, 4, 4), "conv_w"), nh.from_array(_w(4), "conv_b"),
        nh.from_array(np.array([0, 4, -1], np.int64), "tok_shape"),
        nh.from_array(np.ones(4, np.float32), "ln_s"), nh.from_array(np.zeros(4, np.float32), "ln_b"),
        nh.from_array(_w(4, 6), "fc1_w"), nh.from_array(_w(6), "fc1_b"), nh.from_array(_w(6, 4), "fc2_w"),
        nh.from_array(np.array(0.7071, np.float32), "rsqrt2"), nh.from_array(np.array(1.0, np.float32), "one"),
        nh.from_array(np.array(0.5, np.float32), "half"), nh.from_array(np.array([2], np.int64), "ax2"),
        nh.from_array(_w(4, 3), "centers"), nh.from_array(np.arange(3, dtype=np.int64).reshape(1, 1, 3), "ids"),
        nh.from_array(np.array([1], np.int64), "ax1"),
    ]
    nodes = [
        h.make_node("Conv", ["images", "conv_w", "conv_b"], ["patches"], name="patch_conv", strides=[4, 4]),
        h.make_node("Reshape", ["patches", "tok_shape"], ["tok_t"], name="tokens_reshape"),
        h.make_node("Transpose", ["tok_t"], ["tok"], name="tokens_transpose", perm=[0, 2, 1]),
        h.make_node("LayerNormalization", ["tok", "ln_s", "ln_b"], ["ln"], name="norm1", axis=-1, epsilon=1e-6),
        h.make_node("MatMul", ["ln", "fc1_w"], ["fc1"], name="fc1_matmul"),
        h.make_node("Add", ["fc1", "fc1_b"], ["fc1b"], name="fc1_bias"),
        h.make_node("Mul", ["fc1b", "rsqrt2"], ["g0"], name="gelu_scale"),
        h.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
        h.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        h.make_node("Mul", ["fc1b", "g2"], ["g3"], name="gelu_mul"),
        h.make_node("Mul", ["g3", "half"], ["gelu"], name="gelu_half"),
        h.make_node("MatMul", ["gelu", "fc2_w"], ["fc2"], name="fc2_matmul"),
        h.make_node("Softmax", ["fc2"], ["sm"], name="softmax", axis=-1),
        h.make_node("ReduceL2", ["sm", "ax2"], ["nrm"], name="l2", keepdims=1),
        h.make_node("Div", ["sm", "nrm"], ["x"], name="l2_div"),
        h.make_node("MatMul", ["x", "centers"], ["sim"], name="assign_matmul"),
        h.make_node("ArgMax", ["sim"], ["best"], name="assign_argmax", axis=2, keepdims=1),
        h.make_node("Equal", ["best", "ids"], ["onehot_b"], name="assign_equal"),
        h.make_node("Cast", ["onehot_b"], ["onehot"], name="assign_cast", to=TP.FLOAT),
        h.make_node("ReduceSum", ["onehot", "ax1"], ["descriptor"], name="counts", keepdims=0),
    ]
    return _model(nodes, [_vi("images", TP.FLOAT, [batch, 3, h_, w_])], [_vi("descriptor", TP.FLOAT, [batch, 3])],
                  inits)


def lines_of(report):
    return "\n".join(report.lines())


def problems(report, rule, node=None, target=None, severity="error"):
    return [p for p in report.problems if p.rule == rule and p.severity == severity
            and (node is None or p.node == node) and (target is None or target in p.targets)]


# ---------------------------------------------------------------------------------------------------------
# clean graphs pass
# ---------------------------------------------------------------------------------------------------------


def test_fp32_graph_like_ours_passes_and_reports_counts():
    report = check_onnx(fp32_graph(), batch_sizes=(1, 4, 8))
    assert report.ok, lines_of(report)
    assert report.verdict("10.3") == report.verdict("11") == "ok"
    assert report.op_counts["MatMul"] == 3 and report.op_counts["ArgMax"] == 1
    assert report.profile == [[1, 3, 8, 8], [4, 3, 8, 8], [8, 3, 8, 8]]
    d = json.loads(json.dumps(report.to_dict()))  # serialisable for a manifest
    assert d["verdicts"] == {"10.3": "ok", "11": "ok"}
    assert "0137504e" in d["tables"]["10.3"]["source"] and d["tables"]["11"]["opsets"] == [9, 24]
    assert d["io"]["inputs"][0] == {"name": "images", "type": "FP32", "dims": ["batch", 3, 8, 8]}


ISLANDS = ["norm1", "softmax", "l2", "l2_div", "assign_matmul", "assign_argmax", "assign_equal", "assign_cast",
           "counts"]  # LayerNorm, Softmax and the VLAD head stay FP32, as engines/islands.py keeps them


def test_fp16_islands_from_onnxconverter_common_pass():
    f16 = pytest.importorskip("onnxconverter_common.float16")
    m = f16.convert_float_to_float16(fp32_graph(), keep_io_types=True, node_block_list=ISLANDS)
    assert sum(n.op_type == "Cast" for n in m.graph.node) >= 4  # islands exist: the test is about them
    report = check_onnx(m)
    assert report.ok, lines_of(report)


def test_onnxconverter_cast_left_fp32_is_caught():
    """The converter's rough edge engines/fp16.py works around: a Cast(to=FLOAT) outside the block list
    keeps casting to FP32 while its output is declared FP16 - TensorRT would take the declared type."""
    f16 = pytest.importorskip("onnxconverter_common.float16")
    m = f16.convert_float_to_float16(fp32_graph(), keep_io_types=True,
                                     node_block_list=[n for n in ISLANDS if n not in ("assign_cast", "counts")])
    [p] = problems(check_onnx(m), "strong-typing", "assign_cast")
    assert "differs from existing elem type" in p.message


def test_int8_qdq_from_ort_like_ours_passes(tmp_path):
    q = pytest.importorskip("onnxruntime.quantization")
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(fp32_graph(batch=1), src)

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.it, None)

    q.quantize_static(str(src), str(dst), Reader(), quant_format=q.QuantFormat.QDQ, op_types_to_quantize=["MatMul",
                      "Conv"], per_channel=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                      nodes_to_exclude=["assign_matmul"], extra_options={"ActivationSymmetric": True,
                      "WeightSymmetric": True, "QuantizeBias": False, "QDQOpTypePerChannelSupportToAxis":
                      {"MatMul": 1, "Conv": 0}, "OpTypesToExcludeOutputQuantization": ["MatMul", "Conv"]})
    m = onnx.load(dst)
    per_channel = [n for n in m.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel  # per-channel weights are what the axis rule checks
    report = check_onnx(dst)
    assert report.ok, lines_of(report)
    assert report.op_counts["QuantizeLinear"] >= 3


# ---------------------------------------------------------------------------------------------------------
# 1. operators
# ---------------------------------------------------------------------------------------------------------


def test_operator_the_table_marks_unsupported_is_reported_for_both_targets():
    m = fp32_graph()
    m.graph.node.append(h.make_node("Unique", ["descriptor"], ["uniq"], name="dedupe"))
    m.graph.output.append(_vi("uniq", TP.FLOAT, None))
    report = check_onnx(m)
    [p] = problems(report, "operator", "dedupe")
    assert p.op == "Unique" and p.targets == ("10.3", "11") and "does not support" in p.message
    assert report.verdict("10.3") == report.verdict("11") == "problems"


def test_operator_tables_differ_by_version():
    # HannWindow: added in 10.4 (Changelog) -> refused by 10.3, parsed by 11
    nodes = [h.make_node("HannWindow", ["size"], ["win"], name="window")]
    m = _model(nodes, [], [_vi("win", TP.FLOAT, [16])], [nh.from_array(np.array(16, np.int64), "size")])
    report = check_onnx(m)
    [p] = problems(report, "operator", "window")
    assert p.targets == ("10.3",)
    assert report.verdict("11") == "ok" and report.verdict("10.3") == "problems"


def test_custom_domain_op_needs_a_plugin():
    m = fp32_graph()
    m.graph.node.append(h.make_node("FusedGelu", ["descriptor"], ["y"], name="ms_gelu", domain="com.microsoft"))
    m.graph.output.append(_vi("y", TP.FLOAT, None))
    m.opset_import.append(h.make_opsetid("com.microsoft", 1))
    [p] = problems(check_onnx(m), "operator", "ms_gelu")
    assert "plugin" in p.message and p.op == "com.microsoft::FusedGelu"


def test_documented_attribute_limits():
    m = fp32_graph()
    ln = next(n for n in m.graph.node if n.name == "norm1")
    ln.output.extend(["ln_mean"])  # LayerNormalization: only the first output is supported
    m.graph.output.append(_vi("ln_mean", TP.FLOAT, None))
    m.graph.node.append(h.make_node("Resize", ["images", "", "scales"], ["up"], name="upsample", mode="cubic"))
    m.graph.initializer.append(nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    m.graph.output.append(_vi("up", TP.FLOAT, None))
    report = check_onnx(m)
    assert "first output" in problems(report, "operator-limit", "norm1")[0].message
    assert "mode 'cubic'" in problems(report, "operator-limit", "upsample")[0].message


def test_opset_outside_the_parsers_range():
    report = check_onnx(_reopset(fp32_graph(), 21))
    [p] = problems(report, "opset")
    assert p.targets == ("10.3",) and "9-20" in p.message


def _reopset(m, opset):
    m.opset_import[0].version = opset
    return m


# ---------------------------------------------------------------------------------------------------------
# 2. types
# ---------------------------------------------------------------------------------------------------------


def test_int64_where_tensorrt_needs_int32():
    # TensorScatter (opset 24): operators.md 10.15 lists FP32, FP16, BF16, INT32 - no INT64
    nodes = [h.make_node("TensorScatter", ["cache", "update", "pos"], ["out"], name="kv_update", axis=-2)]
    m = _model(nodes, [_vi("cache", TP.INT64, [1, 2, 8, 4]), _vi("update", TP.INT64, [1, 2, 1, 4])],
               [_vi("out", TP.INT64, [1, 2, 8, 4])], [nh.from_array(np.array([3], np.int64), "pos")], opset=24)
    report = check_onnx(m)
    [p] = problems(report, "type", "kv_update", target="11")
    assert "INT64" in p.message and "needs INT32" in p.message
    assert problems(report, "operator", "kv_update", target="10.3")  # not in 10.3 at all


def test_int64_into_a_float_only_op():
    m = fp32_graph()
    m.graph.node.append(h.make_node("CumSum", ["best", "ax2"], ["csum"], name="running_count"))
    m.graph.output.append(_vi("csum", TP.INT64, None))
    [p] = problems(check_onnx(m), "type", "running_count")
    assert "INT64" in p.message and "float" in p.message and p.targets == ("10.3", "11")


def test_double_activation_and_int8_outside_qdq():
    m = fp32_graph()
    m.graph.node.append(h.make_node("Cast", ["descriptor"], ["d64"], name="to_double", to=TP.DOUBLE))
    m.graph.node.append(h.make_node("Cast", ["descriptor"], ["d8"], name="to_int8", to=TP.INT8))
    m.graph.node.append(h.make_node("Neg", ["d8"], ["n8"], name="neg_int8"))
    m.graph.output.extend([_vi("d64", TP.DOUBLE, None), _vi("n8", TP.INT8, None)])
    report = check_onnx(m)
    assert any("DOUBLE" in p.message for p in problems(report, "type", "to_double"))
    assert any("INT8" in p.message and "Q/DQ" in p.message for p in problems(report, "type", "neg_int8"))


# ---------------------------------------------------------------------------------------------------------
# 3. strongly typed
# ---------------------------------------------------------------------------------------------------------


def test_mixed_precision_add_without_cast_is_refused():
    nodes = [
        h.make_node("Cast", ["x"], ["x16"], name="to_half", to=TP.FLOAT16),
        h.make_node("MatMul", ["x16", "w16"], ["y16"], name="mm_half"),
        h.make_node("Add", ["y16", "bias32"], ["y"], name="bias_add"),  # FP16 + FP32: the missing island Cast
    ]
    m = _model(nodes, [_vi("x", TP.FLOAT, ["batch", 4])], [_vi("y", TP.FLOAT16, ["batch", 4])],
               [nh.from_array(_w(4, 4, dtype=np.float16), "w16"), nh.from_array(_w(4), "bias32")])
    report = check_onnx(m)
    [p] = problems(report, "strong-typing", "bias_add")
    assert "FP16" in p.message and "FP32" in p.message and "Cast" in p.message
    assert p.targets == ("10.3", "11")


def test_fp16_quantize_needs_opset_19():
    nodes = [h.make_node("Cast", ["x"], ["x16"], name="to_half", to=TP.FLOAT16),
             h.make_node("QuantizeLinear", ["x16", "s", "zp"], ["q"], name="q_half"),
             h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq_half")]
    m = _model(nodes, [_vi("x", TP.FLOAT, ["batch", 4])], [_vi("y", TP.FLOAT, ["batch", 4])],
               [nh.from_array(np.array(0.1, np.float32), "s"), nh.from_array(np.array(0, np.int8), "zp")])
    assert any("opset >= 19" in p.message for p in problems(check_onnx(m), "strong-typing", "q_half"))


def test_attribute_of_a_later_opset():
    m = qdq_graph()
    dq = next(n for n in m.graph.node if n.name == "w_dequant")
    dq.attribute.append(h.make_attribute("block_size", 2))  # DequantizeLinear-21
    msgs = [p.message for p in problems(check_onnx(m), "strong-typing", "w_dequant")]
    assert any("'block_size' is not defined for DequantizeLinear-13" in m and "opset >= 21" in m for m in msgs), msgs


# ---------------------------------------------------------------------------------------------------------
# 4. Q/DQ
# ---------------------------------------------------------------------------------------------------------


def qdq_graph(w_axis=1, w_scales=None, act_zp=0, act_zp_type=TP.INT8, act_scale=0.05, act_scale_shape=()):
    """x -> Q/DQ (per tensor) -> MatMul(DQ(int8 W [K, N], per channel)) -> y, as ORT's QDQ writes it."""
    k, n = 4, 6
    w_scales = np.full(n if w_axis == 1 else k, 0.01, np.float32) if w_scales is None else w_scales
    zp_np = np.uint8 if act_zp_type == TP.UINT8 else np.int8
    inits = [
        nh.from_array(RNG.integers(-127, 127, (k, n)).astype(np.int8), "w_q"),
        nh.from_array(w_scales, "w_scale"), nh.from_array(np.zeros(w_scales.shape, np.int8), "w_zp"),
        nh.from_array(np.full(act_scale_shape, act_scale, np.float32), "x_scale"),
        nh.from_array(np.full(act_scale_shape, act_zp, zp_np), "x_zp"),
    ]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_quant"),
        h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dequant"),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dequant", axis=w_axis),
        h.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="fc_matmul"),
    ]
    return _model(nodes, [_vi("x", TP.FLOAT, ["batch", 7, k])], [_vi("y", TP.FLOAT, ["batch", 7, n])], inits)


def test_qdq_like_ours_passes():
    report = check_onnx(qdq_graph())
    assert report.ok, lines_of(report)


def test_per_channel_weights_on_the_wrong_axis():
    # MatMul weights [K, N] quantized along K (axis 0): TensorRT needs the output channel N (axis 1)
    report = check_onnx(qdq_graph(w_axis=0))
    [p] = problems(report, "qdq", "w_dequant")
    assert "axis 0" in p.message and "axis 1" in p.message and "fc_matmul" in p.message


def test_per_channel_scale_on_an_activation():
    report = check_onnx(qdq_graph(act_scale_shape=(4,)))
    msgs = [p.message for p in problems(report, "qdq", "x_quant")]
    assert any("per-channel" in m and "activation" in m for m in msgs), lines_of(report)


def test_asymmetric_and_uint8_and_negative_scales():
    assert any("not all zero" in p.message for p in problems(check_onnx(qdq_graph(act_zp=3)), "qdq", "x_quant"))
    uint8 = check_onnx(qdq_graph(act_zp=0, act_zp_type=TP.UINT8))
    assert any("UINT8" in p.message for p in problems(uint8, "qdq", "x_quant"))
    assert any("UINT8" in p.message for p in problems(uint8, "qdq", "x_dequant"))
    neg = check_onnx(qdq_graph(w_scales=np.array([0.01, -0.01, 0.01, 0.01, 0.01, 0.01], np.float32)))
    assert any("non-positive" in p.message for p in problems(neg, "qdq", "w_dequant"))


def test_scales_in_external_data_are_read_by_offset(tmp_path):
    """Full-size per-channel scales (ViT-G: 1536-8192 floats) land in the external-data file."""
    scales = np.full(6, 0.01, np.float32)
    scales[4] = 0.0
    path = tmp_path / "model.onnx"
    onnx.save_model(qdq_graph(w_scales=scales), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert onnx.load(path, load_external_data=False).graph.initializer[1].data_location == TP.EXTERNAL
    assert any("non-positive" in p.message for p in problems(check_onnx(path), "qdq", "w_dequant"))


def test_quantize_without_dequantize():
    m = qdq_graph()
    mm = next(n for n in m.graph.node if n.name == "fc_matmul")
    mm.input[0] = "x_q"  # INT8 straight into MatMul
    report = check_onnx(m)
    assert any("followed by a DequantizeLinear" in p.message for p in problems(report, "qdq", "x_quant"))
    assert problems(report, "type", "fc_matmul")  # INT8 read outside Q/DQ


# ---------------------------------------------------------------------------------------------------------
# 5. shapes
# ---------------------------------------------------------------------------------------------------------


def test_dynamic_non_batch_input_dim():
    m = fp32_graph()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "height"
    [p] = problems(check_onnx(m), "shape", "input:images")
    assert "dim 2" in p.message and "height" in p.message and "patch_conv" in p.message


def test_static_batch_against_requested_batch_sizes_and_baked_batch():
    report = check_onnx(fp32_graph(batch=1), batch_sizes=(1, 8))
    [p] = problems(report, "shape", "input:images")
    assert "fixed to 1" in p.message and "--batch dynamic" in p.message
    assert check_onnx(fp32_graph(batch=1), batch_sizes=(1,)).ok

    m = fp32_graph()  # dynamic input, but the token Reshape bakes batch 1
    next(t for t in m.graph.initializer if t.name == "tok_shape").CopyFrom(
        nh.from_array(np.array([1, 4, -1], np.int64), "tok_shape"))
    m.graph.output[0].type.tensor_type.ClearField("shape")  # as the exporter would infer it: [1, 3]
    baked = check_onnx(m)
    assert any("batch 1 while the input batch is dynamic" in p.message for p in problems(baked, "shape", "counts"))


# ---------------------------------------------------------------------------------------------------------
# 6. external data
# ---------------------------------------------------------------------------------------------------------


def _save_external(m, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=64)
    return path


def test_external_data_checked_and_missing_file_reported(tmp_path):
    path = _save_external(fp32_graph(), tmp_path / "model.onnx")
    good = check_onnx(path)
    assert good.ok, lines_of(good)
    assert "tensors in 1 files" in good.checks["external-data"]
    (tmp_path / "model.onnx.data").unlink()
    report = check_onnx(path)
    [p] = problems(report, "external-data")
    assert "missing" in p.message and "model.onnx.data" in p.message
    assert p.node in ("patch_conv", "fc1_matmul", "fc2_matmul", "assign_matmul")  # the node reading it


def test_external_data_truncated_and_absolute_location(tmp_path):
    path = _save_external(fp32_graph(), tmp_path / "model.onnx")
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert any("truncated" in p.message for p in problems(check_onnx(path), "external-data"))

    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = str(tmp_path / "model.onnx.data")
    onnx.save(m, tmp_path / "abs.onnx")
    assert any("relative" in p.message for p in problems(check_onnx(tmp_path / "abs.onnx"), "external-data"))


def test_protobuf_over_the_2gb_limit(tmp_path, monkeypatch):
    from vpr_edge.engines.tensorrt import compat

    path = tmp_path / "model.onnx"
    onnx.save(fp32_graph(), path)  # weights inline
    assert check_onnx(path).ok
    monkeypatch.setattr(compat, "PROTOBUF_LIMIT", path.stat().st_size - 1)  # a 2 GB file, scaled down
    [p] = problems(check_onnx(path), "model-size")
    assert "external data" in p.message and p.targets == ("10.3", "11")
    assert problems(check_onnx(fp32_graph()), "model-size")  # in memory: the serialised size counts
    _save_external(fp32_graph(), tmp_path / "ext" / "model.onnx")
    assert not problems(check_onnx(tmp_path / "ext" / "model.onnx"), "model-size")


def test_vitg_sized_graph_checks_in_seconds_without_reading_weights(tmp_path, monkeypatch):
    """40 blocks of ViT-G/14 widths (1536, SwiGLU 8192) with 3.3 GB of weights in a sparse external file."""
    d, f, blocks = 1536, 4096, 40
    inits, nodes, offset, x = [], [], 0, "tok"

    def ext(name, shape):
        nonlocal offset
        t = onnx.TensorProto(name=name, data_type=TP.FLOAT, dims=shape)
        t.data_location = TP.EXTERNAL
        n = int(np.prod(shape)) * 4
        for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(n))):
            t.external_data.add(key=key, value=value)
        offset += n
        inits.append(t)

    for i in range(blocks):
        ext(f"b{i}.ln", [d])
        ext(f"b{i}.qkv", [d, 3 * d])
        ext(f"b{i}.proj", [3 * d, d])
        ext(f"b{i}.w12", [d, f])
        ext(f"b{i}.w3", [f, d])
        nodes += [
            h.make_node("LayerNormalization", [x, f"b{i}.ln", f"b{i}.ln"], [f"b{i}.n"], name=f"b{i}.norm", axis=-1),
            h.make_node("MatMul", [f"b{i}.n", f"b{i}.qkv"], [f"b{i}.q"], name=f"b{i}.qkv_mm"),
            h.make_node("Softmax", [f"b{i}.q"], [f"b{i}.s"], name=f"b{i}.softmax", axis=-1),
            h.make_node("MatMul", [f"b{i}.s", f"b{i}.proj"], [f"b{i}.p"], name=f"b{i}.proj_mm"),
            h.make_node("MatMul", [f"b{i}.p", f"b{i}.w12"], [f"b{i}.h"], name=f"b{i}.w12_mm"),
            h.make_node("Sigmoid", [f"b{i}.h"], [f"b{i}.g"], name=f"b{i}.sigmoid"),
            h.make_node("Mul", [f"b{i}.h", f"b{i}.g"], [f"b{i}.a"], name=f"b{i}.silu"),
            h.make_node("MatMul", [f"b{i}.a", f"b{i}.w3"], [f"b{i}.o"], name=f"b{i}.w3_mm"),
            h.make_node("Add", [x, f"b{i}.o"], [f"b{i}.r"], name=f"b{i}.residual"),
        ]
        x = f"b{i}.r"
    m = _model(nodes, [_vi("tok", TP.FLOAT, ["batch", 257, d])], [_vi(x, TP.FLOAT, ["batch", 257, d])], inits)
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    with open(tmp_path / "model.onnx.data", "wb") as fh:
        fh.truncate(offset)  # sparse: 3.3 GB that take no disk
    assert offset > 3 * 10**9

    def no_weights(*a, **k):
        raise AssertionError("check_onnx loaded the external weights")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_weights)
    t0 = time.perf_counter()
    report = check_onnx(path, batch_sizes=(1, 4))
    assert time.perf_counter() - t0 < 10
    assert report.ok, lines_of(report)
    assert report.op_counts["MatMul"] == 4 * blocks and f"{5 * blocks} tensors" in report.checks["external-data"]


# ---------------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------------


def test_api_errors_and_raise_if_problems():
    with pytest.raises(ConfigError, match="known: 10.3"):
        check_onnx(fp32_graph(), targets=("9.0",))
    with pytest.raises(ConfigError, match="batch_sizes"):
        check_onnx(fp32_graph(), batch_sizes=(0,))
    report = check_onnx(fp32_graph(), targets=("11",))
    assert report.targets == ("11",) and "10.3" not in report.tables
    report.raise_if_problems()
    bad = check_onnx(qdq_graph(w_axis=0))
    with pytest.raises(ArtifactError, match="w_dequant"):
        bad.raise_if_problems("10.3")


def test_tables_record_their_sources():
    for target in S.DEFAULT_TARGETS:
        t = S.TABLES[target]
        assert t.source.startswith("onnx/onnx-tensorrt docs/operators.md")
        assert t.get("MatMul").supported and not t.get("MatMulInteger").supported
    assert S.TABLES["10.3"].get("STFT").supported is False and S.TABLES["11"].get("STFT").supported
    assert "INT64" in S.TABLES["10.3"].get("ConstantOfShape").types  # the 10.6 row's "INF64" typo read as INT64


def test_module_imports_without_onnx():
    code = ("import sys; sys.modules['onnx'] = None; import vpr_edge.engines.tensorrt.compat as c; "
            "print(c.RULES[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "model-size"
