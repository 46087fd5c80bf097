"""INT8 in the graph: Q/DQ placement TensorRT expects, calibration methods, the fidelity gate."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from onnx import numpy_helper  # noqa: E402

from vpr_edge.engines import graph as G  # noqa: E402
from vpr_edge.batching import chunks  # noqa: E402
from vpr_edge.fidelity import compare_outputs  # noqa: E402
from vpr_edge.engines.precision.int8 import check_qdq, int8_from_onnx  # noqa: E402
from vpr_edge.engines.precision.int8 import default_exclusions as int8_default_exclusions  # noqa: E402
from vpr_edge.engines.precision.lower import lower_onnx  # noqa: E402
from vpr_edge.verifyset import VerifySet  # noqa: E402


def batches(images, size: int = 8):
    return [images[s] for s in chunks(len(images), size)]
from vpr_edge.onnxrt import run_onnx  # noqa: E402
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
    first = {n for n, why in report.excluded.items() if "first layer" in why}
    assert [sidx.nodes[n].op_type for n in first] == ["Conv"]  # the patch embedding stays float
    assert set(report.quantized) == set(weight_ops) - head - first
    assert len(report.quantized) == 4 * 4  # qkv/proj/fc1/fc2 per block

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
    assert not report.quantize_attention and report.to_dict()["attention_matmuls_quantized"] is False


def _activation_matmuls(model) -> list[str]:
    idx = G.GraphIndex.of(model)
    return [n for n, node in idx.nodes.items() if node.op_type == "MatMul"
            and not idx.is_constant(node.input[0]) and not idx.is_constant(node.input[1])]


def test_attention_matmuls_quantized_on_both_inputs(toy_path, data, tmp_path):
    src = G.load(toy_path)
    attention = [n for n in _activation_matmuls(src) if n not in {
        n for n, why in int8_default_exclusions(src).items() if "head" in why or "ArgMax" in why}]
    assert len(attention) == 2 * 4  # QK^T and attention x V in each of the 4 blocks
    report = int8_from_onnx(toy_path, tmp_path / "q.onnx", batches(data[1][:8]), "max", quantize_attention=True)
    assert set(attention) <= set(report.quantized) and report.to_dict()["attention_matmuls_quantized"]
    model = G.load(tmp_path / "q.onnx")
    idx = G.GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    for name in attention:
        for t in idx.nodes[name].input[:2]:
            dq = idx.nodes[idx.producer[t]]
            q = idx.nodes[idx.producer[dq.input[0]]]
            assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
            assert numpy_helper.to_array(inits[q.input[1]]).shape == ()  # per tensor, symmetric
            assert not numpy_helper.to_array(inits[q.input[2]]).any()
    assert check_qdq(model, report.quantized) == []


def test_rewrites_recorded_and_ort_fuses_gelu(quantized, tmp_path):
    """The INT8 graph stays standard ONNX; ORT fuses its erf-GELUs once reordered (rewrites.py)."""
    import onnxruntime as ort

    dst, report = quantized
    d = report.to_dict()
    assert d["graph_rewrites"]["gelu_reordered_for_ort_fusion"] == 4  # one per block
    assert "not applied" in d["ort_quant_pre_process"]
    model = G.load(dst)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert "Erf" in {n.op_type for n in model.graph.node}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "Erf" not in fused and fused & {"Gelu", "BiasGelu"}
    assert "MatMulIntegerToFloat" in fused  # DQ -> MatMul -> float: ORT's integer kernel


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


def test_int8_outside_thresholds_fails_loudly(toy_path, data, tmp_path, monkeypatch):
    """Activation ranges 1000x too small: every quantised input saturates in QuantizeLinear's clamp, which
    is exact arithmetic on any CPU, so the graph misses the gate by a wide margin whatever integer kernels
    run the MatMuls (an earlier version scaled the calibration images instead, which LayerNorm undoes, and
    it passed on an AVX-512 VNNI machine)."""
    from vpr_edge.engines.precision import minmax

    real = minmax.minmax_ranges
    monkeypatch.setattr(minmax, "minmax_ranges",
                        lambda *a, **k: {t: (lo * 1e-3, hi * 1e-3) for t, (lo, hi) in real(*a, **k).items()})
    full, cal = data
    verify = VerifySet(full.images[::2], np.arange(16), np.arange(16, 32), None, "corridor, every other image")
    with pytest.raises(FidelityError, match="outside thresholds"):
        lower_onnx(toy_path, tmp_path / "bad.onnx", "int8", verify, calibration=cal[:16])
    accepted = lower_onnx(toy_path, tmp_path / "bad.onnx", "int8", verify, calibration=cal[:16], accept_fidelity=True)
    assert accepted.verification["report"]["cos_mean"] < 0.95  # measured 0.90: well outside 0.98, not near it
    assert not accepted.passed and accepted.verification["accepted_outside_thresholds"]
    assert accepted.verification["failures"]
    # what ran the check is recorded: the CPU's integer features, and the options that made its products exact
    from vpr_edge.onnxrt import session_config

    assert accepted.verification["ort_session_config"] == session_config()
    assert isinstance(accepted.verification["cpu_features"], list)


def test_exact_integer_products_are_asked_for_only_where_the_kernel_saturates():
    from vpr_edge.onnxrt import X64_QUANT_PRECISION, session_config

    assert session_config(["avx2"], "x86_64") == {X64_QUANT_PRECISION: "1"}
    assert session_config(["avx2", "avx512f"], "AMD64") == {X64_QUANT_PRECISION: "1"}
    for feats, arch in ((["avx2", "avx512f", "avx512_vnni"], "x86_64"), (["avx2", "avx_vnni"], "x86_64"),
                        (["asimd", "asimddp"], "aarch64")):
        assert session_config(feats, arch) == {}


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


def _layerscale_gelu_graph():
    """x -> MatMul W -> Add b -> GELU as torch exports it -> MatMul W2 -> Add b2 -> Mul gamma -> + x."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = {"W": f32(rng.normal(size=(8, 16))), "b": f32(rng.normal(size=16)), "W2": f32(rng.normal(size=(16, 8))),
             "b2": f32(rng.normal(size=8)), "gamma": f32(rng.uniform(0.1, 2, size=8)), "root2": f32(np.sqrt(2.0)),
             "one": f32(1.0), "half": f32(0.5)}
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W"], ["h0"], name="fc1"), n("Add", ["h0", "b"], ["h"], name="fc1_bias"),
             n("Div", ["h", "root2"], ["d"], name="div"), n("Erf", ["d"], ["e"], name="erf"),
             n("Add", ["e", "one"], ["e1"], name="add1"), n("Mul", ["half", "e1"], ["m"], name="half"),
             n("Mul", ["h", "m"], ["g"], name="gelu"), n("MatMul", ["g", "W2"], ["y0"], name="fc2"),
             n("Add", ["y0", "b2"], ["y1"], name="fc2_bias"), n("Mul", ["y1", "gamma"], ["y2"], name="ls"),
             n("Add", ["x", "y2"], ["y"], name="residual")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_rewrites_are_exact_and_keep_standard_ops():
    import onnxruntime as ort

    from vpr_edge.engines.precision.rewrites import tidy_for_ort

    def run(model, x):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    model = _layerscale_gelu_graph()
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    before = run(model, x)
    counts = tidy_for_ort(model)
    assert counts == {"gelu_reordered_for_ort_fusion": 1, "layerscale_folded_into_weights": 1}
    onnx.checker.check_model(model)
    names = {node.name for node in model.graph.node}
    assert "ls" not in names and {"fc1", "fc2", "gelu", "half"} <= names  # node names kept for exclusions
    assert "gamma" not in {i.name for i in model.graph.initializer}  # folded, so no dead initializer is left
    np.testing.assert_allclose(run(model, x), before, rtol=1e-5, atol=1e-5)
    assert tidy_for_ort(model) == {"gelu_reordered_for_ort_fusion": 0, "layerscale_folded_into_weights": 0}


@pytest.mark.slow
def test_fallback_also_clears_the_cosine_threshold(toy_path, data, tmp_path, monkeypatch):
    """A top-1 target that plain INT8 already meets while its mean cosine misses the gate: the search
    keeps blocks until the artifact passes the gate, instead of keeping none. (The toy's INT8 cosine is
    ~0.99 whatever the calibration, so the gate's cosine threshold is raised above it here.)"""
    import dataclasses

    from vpr_edge.engines.precision import table

    full, cal = data
    verify = VerifySet(full.images[::2], np.arange(16), np.arange(16, 32), None, "corridor, every other image")
    plain = lower_onnx(toy_path, tmp_path / "plain.onnx", "int8", verify, calibration=cal[:16], accept_fidelity=True)
    rep = plain.verification["report"]
    raised = (rep["cos_mean"] + 1.0) / 2
    int8 = table.get("int8")
    monkeypatch.setitem(table.PRECISIONS, "int8", dataclasses.replace(int8, thresholds=(
        table.Threshold("nonfinite", 0, upper=True), table.Threshold("cos_mean", raised),
        table.Threshold("top1_agreement", 0.0))))
    result = lower_onnx(toy_path, tmp_path / "fb.onnx", "int8", verify, calibration=cal[:16],
                        target_agreement=rep["top1_agreement"])
    assert result.verification["passed"], result.verification["failures"]
    assert result.verification["report"]["cos_mean"] >= raised > rep["cos_mean"]
    assert result.details["fallback"]["met"] and result.details["fallback"]["blocks"]


def test_export_cli_calibration_limit_is_recorded(corridor, tmp_path, capsys):
    import json

    from vpr_edge.cli.main import main

    out = tmp_path / "int8"
    base = ["export", "--model", "anyloc-dinov2@tiny", "--weights", "random", "--verify", str(corridor),
            "--verify-limit", "12", "--precision", "int8", "--calibration", str(corridor / "database"),
            "--accept-fidelity", "--quiet", "--output", str(out)]
    assert main(base + ["--calibration-limit", "0"]) == 2
    assert "--calibration-limit must be >= 1" in capsys.readouterr().err and not out.exists()
    assert main(base + ["--calibration-limit", "20"]) in (0, 4)
    details = json.loads((out / "manifest.json").read_text())["details"]
    assert details["calibration_set"] == {"source": str(corridor / "database"), "images": 20, "available": 111, "limit": 20}
    assert details["int8"]["calibration"]["images"] == 20


def test_lean_max_calibration_matches_orts_calibrator(toy_path, data, tmp_path):
    """engines.minmax gives ORT's MinMax ranges (same tensors, same numbers) from one weight copy,
    and int8_from_onnx with it writes the same quantised graph as ORT's own calibrator."""
    import json

    from onnxruntime import quantization as q

    from vpr_edge.engines.precision import minmax
    from vpr_edge.engines.precision.int8 import QUANTIZED_OPS

    cal = data[1][:16]
    ours = minmax.minmax_ranges(toy_path, batches(cal, 4), QUANTIZED_OPS)
    ort_cache = tmp_path / "ort.json"
    q.quantize_static(str(toy_path), str(tmp_path / "ort.onnx"), I_reader(cal), quant_format=q.QuantFormat.QDQ,
                      op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, activation_type=q.QuantType.QInt8,
                      weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
                      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                      calibration_cache_path=str(ort_cache))
    theirs = q.calibrate.load_tensors_data(ort_cache).data
    assert set(ours) == set(theirs) and len(ours) > 10
    for t, (lo, hi) in ours.items():
        np.testing.assert_allclose([lo, hi], np.ravel(theirs[t].range_value), rtol=1e-6, err_msg=t)
    # and through int8_from_onnx: the graph's scales equal those from ORT's calibrator
    a = int8_from_onnx(toy_path, tmp_path / "lean.onnx", batches(cal, 4), "max")
    cache = tmp_path / "cache.json"
    minmax.write_ort_cache({t: (np.float32(v.range_value[0]), np.float32(v.range_value[1])) for t, v in theirs.items()}, cache)
    b = int8_from_onnx(toy_path, tmp_path / "orts.onnx", batches(cal, 4), "max", calibration_cache=cache)
    assert a.quantized == b.quantized

    def scales(path):
        m = onnx.load(str(path))
        return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith("_scale")}

    sa, sb = scales(tmp_path / "lean.onnx"), scales(tmp_path / "orts.onnx")
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, err_msg=k)
    assert not list(tmp_path.glob(".*calibrate.onnx")) and not list(tmp_path.glob(".*ranges.json"))
    json.loads(cache.read_text())


def I_reader(images):
    from vpr_edge.engines.precision.int8 import batch_reader

    return batch_reader(batches(images, 4), "images")


def test_integer_products_are_exact_whatever_the_cpu(tmp_path):
    """A Q/DQ MatMul whose U8S8 pair sums exceed int16 (what ORT's AVX2 / AVX-512F-without-VNNI kernel
    saturates): every session the toolkit opens computes the exact product, so an INT8 gate cannot depend on
    the CPU's instruction set. On a VNNI or ARM CPU the kernel is exact and no option is set; on the others
    this fails without `session.x64quantprecision`."""
    from onnx import TensorProto, helper

    from vpr_edge import onnxrt

    k, n = 64, 8
    w = np.full((k, n), 127, dtype=np.int8)
    w[:, 1::2] = -127
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(w, "wq")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "qdq_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    path = tmp_path / "qdq.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.stack([np.full(k, 127.0), np.tile([127.0, -128.0], k // 2)]).astype(np.float32)
    (got,) = onnxrt.session(path).run(None, {"x": x})
    np.testing.assert_array_equal(got, x.astype(np.float64) @ w.astype(np.float64))


def test_an_interrupted_export_resumes_its_fallback_search(corridor, tmp_path, monkeypatch):
    """The search's scores are journalled beside the output; an export killed after its search reads them
    all back when rerun (the same FP32 graph and inputs), and the journal goes once the artifact is written."""
    import json

    from vpr_edge.cli.main import main
    from vpr_edge.export import artifact

    out = tmp_path / "int8"
    cmd = ["export", "--model", "anyloc-dinov2@tiny", "--weights", "random", "--verify", str(corridor),
           "--verify-limit", "12", "--precision", "int8", "--calibration", str(corridor / "database"),
           "--calibration-limit", "12", "--target-agreement", "1.0", "--accept-fidelity", "--quiet", "--output", str(out)]

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(artifact, "_tensorrt_check", killed)  # the step after the search
        assert main(cmd) == 130  # Ctrl-C's exit status
    journal = artifact.search_journal(out)
    lines = journal.read_text().splitlines()
    assert lines and not out.exists()
    assert main(cmd) in (0, 4)
    fb = json.loads((out / "manifest.json").read_text())["details"]["fallback"]
    assert len(fb["evaluations"]) >= len(lines) and all(e.get("from_journal") for e in fb["evaluations"])
    assert not journal.exists()
