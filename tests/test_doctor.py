"""doctor rebuilds the PyTorch reference from the manifest: the same weights (checked by their id), the
release head, from any working folder; and its verdict names what it could not compare."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from vpr_edge import presets  # noqa: E402
from vpr_edge.cli.main import main  # noqa: E402
from vpr_edge.export.artifact import ExportOptions, export_artifact  # noqa: E402
from vpr_edge.models import weights as W  # noqa: E402
from vpr_edge.models.reference import build_reference  # noqa: E402

BOQ = presets.get("boq-resnet50").tiny()


def _release(path, seed: int):
    """A random checkpoint in BoQ's release layout (backbone.net.* + aggregator.*), like resnet50_16384.pth."""
    model = build_reference(BOQ, "random", seed=seed).model
    W.save_official(model.backbone, path, "boq-resnet50")
    sd = torch.load(path, weights_only=True)
    sd.update({f"aggregator.{k}": v for k, v in model.aggregator.state_dict().items() if k != "query_cache"})
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def boq_artifact(tmp_path_factory, corridor):
    root = tmp_path_factory.mktemp("doctor")
    ckpt = _release(root / "resnet50_16384.pth", seed=3)
    art = root / "art"
    export_artifact(BOQ, art, weights=str(ckpt), options=ExportOptions(verify=corridor, verify_limit=12, progress=False))
    return art, ckpt, root


def _doctor(capsys, *argv):
    rc = main(["doctor", *argv, "--limit", "8", "--repeat", "2"])
    out = capsys.readouterr().out
    return rc, out, [line for line in out.splitlines() if line.startswith("verdict:")][-1]


def test_doctor_rebuilds_boq_with_its_release_head_from_any_folder(boq_artifact, capsys, tmp_path, monkeypatch):
    art, ckpt, _ = boq_artifact
    monkeypatch.chdir(tmp_path)  # not where the artifact or the checkpoint are
    rc, out, verdict = _doctor(capsys, str(art), "--weights", str(ckpt))
    assert rc == 0 and verdict.startswith("verdict: OK"), out
    assert "pytorch vs onnxruntime" in out and "1 comparison(s)" in verdict


def test_doctor_without_the_checkpoint_says_what_it_could_not_compare(boq_artifact, capsys):
    art, _, _ = boq_artifact
    rc, _, verdict = _doctor(capsys, str(art))
    assert rc == 4 and verdict.startswith("verdict: INCOMPLETE")
    assert "pytorch:" in verdict and "pass --weights PATH" in verdict and "tensorrt" in verdict


def test_doctor_refuses_another_checkpoint(boq_artifact, capsys):
    art, _, root = boq_artifact
    other = _release(root / "other.pth", seed=4)
    rc, _, verdict = _doctor(capsys, str(art), "--weights", str(other))
    assert rc == 4 and "other.pth has sha256:" in verdict and "exported from a checkpoint with sha256:" in verdict


def test_doctor_rebuilds_random_weights_from_their_seed(capsys, tmp_path, corridor):
    p = presets.get("anyloc-dinov2-gem").tiny()
    art = tmp_path / "gem"
    export_artifact(p, art, seed=7, options=ExportOptions(verify=corridor, verify_limit=12, progress=False))
    rc, out, verdict = _doctor(capsys, str(art))
    assert rc == 0 and verdict.startswith("verdict: OK") and "pytorch vs onnxruntime" in out


def test_doctor_says_how_this_cpu_multiplies_int8(monkeypatch):
    from vpr_edge.doctor import environment
    from vpr_edge.onnxrt import X64_QUANT_PRECISION, session_config

    assert ("U8U8" in environment.environment_report()["ort_int8_products"]) == bool(session_config())
    monkeypatch.setattr(environment, "session_config", lambda: {X64_QUANT_PRECISION: "1"})  # an AVX2 CPU
    assert environment.environment_report()["ort_int8_products"].startswith("exact U8U8")
    monkeypatch.setattr(environment, "session_config", lambda: {})
    assert "VNNI" in environment.environment_report()["ort_int8_products"]
