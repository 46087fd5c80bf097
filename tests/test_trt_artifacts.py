"""Every artifact vpr-export writes carries the offline TensorRT check's verdict: every tiny preset at every
lowered precision here (FP32 in test_export's every-preset test), and `doctor --offline` agrees."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from vpr_edge import presets  # noqa: E402
from vpr_edge.cli.main import main  # noqa: E402
from vpr_edge.engines.precision import table  # noqa: E402
from vpr_edge.export.artifact import ExportOptions, export_artifact  # noqa: E402

TINY = [presets.get(n).tiny() for n in presets.names()]


@pytest.mark.slow
@pytest.mark.parametrize("precision", table.lowered())
@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.name)
def test_every_lowered_tiny_artifact_passes_the_offline_tensorrt_check(preset, precision, tmp_path, capsys):
    out = tmp_path / "art"
    m = export_artifact(preset, out, options=ExportOptions(precision=precision, verify_limit=8, accept_fidelity=True,
                                                           progress=False))
    check = m.details["tensorrt_check"]
    assert check["ok"] and check["verdicts"] == {"10.3": "ok", "11": "ok"}, check["problems"]
    assert main(["doctor", str(out), "--offline"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("verdict: OK")


def test_doctor_offline_names_the_problem_node(tmp_path, capsys):
    """An artifact whose graph TensorRT would refuse: the offline doctor says which node and why."""
    import onnx
    from onnx import TensorProto, helper

    from toy_artifact import write_manifest

    p = presets.get("anyloc-dinov2-gem").tiny()
    h, w = p.preprocess.image_size
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])
    y = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Det", ["m"], ["d"], name="determinant"),  # no TensorRT importer
        helper.make_node("Add", ["m", "d"], ["descriptor"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "bad", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    tmp_path.joinpath("art").mkdir()
    onnx.save(model, str(tmp_path / "art" / "model.onnx"))
    write_manifest(tmp_path / "art", p, "onnx", {"model.onnx": "onnx"}, {"scope": "descriptor", "precision": "fp32",
                                                                          "batch": "dynamic"})
    assert main(["doctor", str(tmp_path / "art"), "--offline"]) == 3
    out = capsys.readouterr().out
    assert "determinant [Det]" in out and out.strip().splitlines()[-1].startswith("verdict: FAIL")
