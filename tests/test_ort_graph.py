"""The ONNX-Runtime-only graph (engines.ort_graph): attention fused into contrib nodes, equal to the
portable graph, sharing its weights, chosen by the runtime except where standard ops are needed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vpr_edge import presets
from vpr_edge.artifact import load_artifact
from vpr_edge.engines import graph
from vpr_edge.engines import ort_graph as OG
from vpr_edge.export.artifact import ExportOptions, export_artifact
from vpr_edge.runtime.backends import BackendOptions
from vpr_edge.runtime.describer import Describer
from vpr_edge.runtime.ort_backend import graph_for


@pytest.fixture(scope="module")
def art(corridor, tmp_path_factory):
    """A tiny ViT-G-architecture (SwiGLU) FP32 artifact."""
    out = tmp_path_factory.mktemp("ortg") / "art"
    export_artifact(presets.get("anyloc-dinov2").tiny(), out, options=ExportOptions(verify=corridor, verify_limit=12,
                                                                                     progress=False))
    return out


def _images(corridor, n=6):
    return sorted((corridor / "database").iterdir())[:n]


def test_fused_graph_is_listed_shares_weights_and_replaces_every_attention(art):
    a = load_artifact(art)
    fused, portable = a.file("onnx-ort"), a.file("onnx")
    assert fused.name == OG.ORT_GRAPH_NAME
    rep = a.manifest.details["ort_graph"]
    blocks = a.manifest.details["graph"]["blocks"]
    assert rep["attention"] == len(blocks) > 0 and rep["check"]["passed"] and rep["check"]["rel_err"] <= 1e-4
    f, p = graph.load(fused, load_weights=False), graph.load(portable, load_weights=False)
    ops_f, ops_p = graph.op_counts(f), graph.op_counts(p)
    assert rep["op"] == "MultiHeadAttention" and ops_f["MultiHeadAttention"] == len(blocks)
    assert ops_f.get("Softmax", 0) == ops_p["Softmax"] - len(blocks)
    # one weights file for both graphs; the second graph takes no initializer the portable one lacks
    assert graph.external_data_files(fused) == graph.external_data_files(portable) == [art / "model.onnx.data"]
    assert {i.name for i in f.graph.initializer} <= {i.name for i in p.graph.initializer}
    assert fused.stat().st_size < 0.5 * (art / "model.onnx.data").stat().st_size


def test_runtime_runs_fused_graph_by_default_and_both_agree(art, corridor):
    imgs = _images(corridor)
    with Describer.from_artifact(art) as d:
        assert d.backend.describe()["graph"] == "fused attention" and d.backend.path.name == OG.ORT_GRAPH_NAME
        got = d.describe(imgs, batch=3)
    with Describer.from_artifact(art, ort_graph="portable") as d:
        assert d.backend.describe()["graph"] == "portable" and d.backend.path.name == "model.onnx"
        want = d.describe(imgs, batch=3)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_both_fused_forms_equal_the_portable_graph(art, corridor, tmp_path):
    """MultiHeadAttention (the default) and Attention: same outputs as the standard-ops graph, on a copy."""
    import onnxruntime as ort
    import shutil

    for f in ("model.onnx", "model.onnx.data"):
        shutil.copy(art / f, tmp_path / f)
    with Describer.from_artifact(art, ort_graph="portable") as d:
        x = np.stack([d.preprocess(p) for p in _images(corridor, 4)])
        want = d.backend.run(x)
    for op in OG.OPS:
        rep = OG.write_ort_graph(tmp_path / "model.onnx", op=op, name=f"{op}.onnx")
        assert rep["attention"] > 0 and rep["op"] == op
        m = graph.load(tmp_path / rep["file"], load_weights=False)
        assert graph.op_counts(m)[op] == rep["attention"] and graph.op_counts(m).get("Squeeze", 0) == 0
        (got,) = ort.InferenceSession(str(tmp_path / rep["file"])).run(None, {"images": x})
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(ValueError, match="op must be"):
        OG.fuse_attention(graph.load(tmp_path / "model.onnx", load_weights=False), op="Flash")


def test_tensorrt_ep_and_portable_choice_take_the_standard_graph(art):
    a = load_artifact(art)
    assert graph_for(a, BackendOptions()).name == OG.ORT_GRAPH_NAME
    assert graph_for(a, BackendOptions(providers=("cuda",))).name == OG.ORT_GRAPH_NAME
    for opts in (BackendOptions(ort_graph="portable"), BackendOptions(providers=("tensorrt", "cuda")),
                 BackendOptions(providers=("TensorrtExecutionProvider",))):
        assert graph_for(a, opts).name == "model.onnx"
    from vpr_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="--ort-graph"):
        graph_for(a, BackendOptions(ort_graph="fast"))
    # an artifact without the second graph (older exports, FP16/INT8) runs its model.onnx
    plain = SimpleNamespace(file=lambda role, required=True: None if role == "onnx-ort" else art / "model.onnx")
    assert graph_for(plain, BackendOptions()).name == "model.onnx"


def test_a_fused_graph_that_differs_is_not_shipped(corridor, tmp_path, monkeypatch):
    real = OG._Match.attention

    def wrong_scale(self, softmax):
        found = real(self, softmax)
        return None if found is None else found._replace(scale=found.scale * 1.5)

    monkeypatch.setattr(OG._Match, "attention", wrong_scale)
    out = tmp_path / "art"
    m = export_artifact(presets.get("anyloc-dinov2-vits14").tiny(), out,
                        options=ExportOptions(verify=corridor, verify_limit=12, progress=False))
    rep = m.details["ort_graph"]
    assert rep["check"]["passed"] is False and rep["file"] is None and "not shipped" in rep["reason"]
    assert not (out / OG.ORT_GRAPH_NAME).exists() and OG.ORT_GRAPH_NAME not in m.files
    with Describer.from_artifact(out) as d:
        assert d.backend.describe()["graph"] == "portable"


def test_fp16_graphs_get_no_second_graph(art, tmp_path):
    from vpr_edge.engines.precision.fp16 import fp16_from_onnx

    dst = tmp_path / "fp16.onnx"
    fp16_from_onnx(art / "model.onnx", dst)
    rep = OG.write_ort_graph(dst)
    assert rep["attention"] == 0 and "FP16" in rep["reason"] and not (tmp_path / OG.ORT_GRAPH_NAME).exists()


def test_bench_variant_can_ask_for_the_portable_graph():
    from vpr_edge.benchmarks.variants import variant_options

    assert variant_options("plain@portable=/a") == {"backend": "ort", "ort_graph": "portable"}


@pytest.mark.parametrize("gate_passes", [True, False])
def test_int8_fused_graph_is_judged_by_the_int8_gate(corridor, tmp_path, monkeypatch, gate_passes):
    """INT8: the qkv projection stays a Q/DQ MatMul and MultiHeadAttention takes its output; the fused graph is
    shipped only if it passes the INT8 gate against the PyTorch reference, through the runtime (here the gate
    is forced either way: a tiny random model's INT8 verdict is not what this checks)."""
    from vpr_edge.engines.precision import table

    real, calls = table.Precision.gate, []

    def gate(self, report):  # the lowering's own verdict first, then the fused graph's
        if self.name != "int8":
            return real(self, report)
        calls.append(report)
        return [] if gate_passes or len(calls) == 1 else ["planted: outside"]

    monkeypatch.setattr(table.Precision, "gate", gate)
    out = tmp_path / "int8"
    m = export_artifact(presets.get("anyloc-dinov2-vits14").tiny(), out, options=ExportOptions(
        verify=corridor, verify_limit=12, precision="int8", calibration=corridor / "database", calibration_limit=16,
        progress=False))
    rep = m.details["ort_graph"]
    assert rep["attention"] == len(m.details["graph"]["blocks"]) and rep["op"] == "MultiHeadAttention"
    assert rep["check"]["passed"] is gate_passes and "INT8 gate" in rep["check"]["compared_with"]
    assert set(rep["check"]["report"]) >= {"cos_mean", "top1_agreement"}
    imgs = _images(corridor, 4)
    with Describer.from_artifact(out) as d:
        assert d.backend.describe()["graph"] == ("fused attention" if gate_passes else "portable")
        got = d.describe(imgs)
    if gate_passes:
        fused = graph.load(out / OG.ORT_GRAPH_NAME, load_weights=False)
        assert graph.op_counts(fused)["DequantizeLinear"] == graph.op_counts(
            graph.load(out / "model.onnx", load_weights=False))["DequantizeLinear"]
        with Describer.from_artifact(out, ort_graph="portable") as d:
            want = d.describe(imgs)
        assert float(np.mean(np.sum(got * want, axis=1))) > 0.9  # another INT8 implementation, not bit-equal
    else:
        assert OG.ORT_GRAPH_NAME not in m.files and not (out / OG.ORT_GRAPH_NAME).exists()
        assert "INT8 gate" in rep["reason"] and "not shipped" in rep["reason"]
    assert len(calls) == 2 and calls[1] == rep["check"]["report"]
