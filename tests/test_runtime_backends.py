"""ONNX Runtime backend and Describer on toy artifacts in the export contract."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vpr_edge import presets
from vpr_edge.errors import ArtifactError, ConfigError, InputError, MissingDependencyError
from vpr_edge.runtime.aggregate import vlad_hard
from vpr_edge.runtime.describer import Describer
from vpr_edge.runtime.ort_backend import OrtBackend, resolve_providers
from vpr_edge.imaging.exact import preprocess_image

onnx = pytest.importorskip("onnx", reason="onnx not installed (export extra)")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
from toy_artifact import write_toy_artifact  # noqa: E402

ANYLOC = presets.get("anyloc-dinov2").tiny()
BOQ = presets.get("boq-resnet50").tiny()


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("arts")
    return {
        "backbone": write_toy_artifact(root / "backbone", ANYLOC, "backbone"),
        "backbone_b1": write_toy_artifact(root / "backbone_b1", ANYLOC, "backbone", batch=1),
        "descriptor": write_toy_artifact(root / "descriptor", BOQ, "descriptor"),
        "gem_pca": write_toy_artifact(root / "gem", presets.get("anyloc-dinov2-gem").tiny(), "backbone"),
    }


@pytest.fixture(scope="module")
def images(corridor):
    return sorted((corridor / "database").glob("*.jpg"))[:6]


def test_ort_backend_runs_a_handmade_graph(tmp_path):
    h = onnx.helper
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = h.make_graph(
        [
            h.make_node("ReduceMean", ["images"], ["pooled"], axes=[2, 3], keepdims=0),
            h.make_node("MatMul", ["pooled", "w"], ["descriptor"]),
        ],
        "g",
        [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["B", 3, 8, 10])],
        [h.make_tensor_value_info("descriptor", onnx.TensorProto.FLOAT, ["B", 4])],
        initializer=[onnx.numpy_helper.from_array(w, "w")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).random((5, 3, 8, 10)).astype(np.float32)
    with OrtBackend(tmp_path / "m.onnx", threads=1) as be:
        assert be.batch_size is None and be.input_hw == (8, 10) and be.providers == ["CPUExecutionProvider"]
        np.testing.assert_allclose(be.run(x), x.mean(axis=(2, 3)) @ w, rtol=1e-5)


def test_providers_are_resolved_or_refused():
    avail = ["CPUExecutionProvider"]
    assert resolve_providers(None, avail) == ["CPUExecutionProvider"]
    assert resolve_providers(
        ["cuda", "tensorrt"], ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    ) == [
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(MissingDependencyError, match=r"vpr-edge\[gpu\]"):
        resolve_providers(["cuda"], avail)


def test_backbone_scope_equals_preprocess_ort_and_numpy_vlad(arts, images):
    with Describer.from_artifact(arts["backbone"], threads=1) as d:
        out = d.describe(images, batch=4)
        assert out.shape == (len(images), ANYLOC.descriptor_dim) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
        x = np.stack([preprocess_image(p, ANYLOC.preprocess) for p in images])
        feats = d.backend.run(x)
        assert feats.shape == (len(images), int(np.prod(ANYLOC.grid())), ANYLOC.feature_dim)
        np.testing.assert_allclose(out, vlad_hard(feats, d.aggregation.centers), atol=1e-6)
        t = d.timing_summary()
        assert t["images"] == len(images) and all(t[f"{s}_s"] > 0 for s in ("preprocess", "backbone", "aggregation"))


def test_fixed_batch_model_is_padded_and_matches_dynamic(arts, images):
    with (
        Describer.from_artifact(arts["backbone"], threads=1) as dyn,
        Describer.from_artifact(arts["backbone_b1"], threads=1) as fixed,
    ):
        assert fixed.backend.batch_size == 1 and dyn.backend.batch_size is None
        np.testing.assert_allclose(fixed.describe(images[:5], batch=4), dyn.describe(images[:5], batch=3), atol=1e-6)


def test_descriptor_scope_and_array_inputs(arts, images):
    from PIL import Image

    with Describer.from_artifact(arts["descriptor"], threads=1) as d:
        assert d.aggregation is None
        by_path = d.describe(images[:3])
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images[:3]]
        np.testing.assert_allclose(d.describe(arrays), by_path, atol=1e-6)
        assert by_path.shape == (3, BOQ.descriptor_dim)
        assert d.describe([]).shape == (0, BOQ.descriptor_dim)
        with pytest.raises(InputError, match="expected preprocessed images"):
            d.forward(np.zeros((1, 3, 10, 10), np.float32))


def test_gem_scope(arts, images):
    with Describer.from_artifact(arts["gem_pca"], threads=1) as d:
        out = d.describe(images[:2])
        assert out.shape == (2, d.preset.feature_dim)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_unreadable_image_names_the_file(arts, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with Describer.from_artifact(arts["descriptor"], threads=1) as d, pytest.raises(InputError, match="broken.jpg"):
        d.describe([bad])


def test_artifact_without_manifest_asks_to_reexport(arts, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(arts["descriptor"] / "model.onnx", folder / "model.onnx")
    for target in (folder, folder / "model.onnx"):
        with pytest.raises(ArtifactError, match="re-export it with vpr-export"):
            Describer.from_artifact(target)
    with pytest.raises(ArtifactError, match="not found"):
        Describer.from_artifact(tmp_path / "missing")


def test_truncated_or_foreign_artifacts_are_refused(arts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(arts["descriptor"], copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        Describer.from_artifact(copy)
    # the manifest says another input size than the graph
    other = tmp_path / "other"
    shutil.copytree(arts["descriptor"], other)
    man = json.loads((other / "manifest.json").read_text())
    man["preset"]["preprocess"]["image_size"] = [96, 96]
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="model input is 64x64"):
        Describer.from_artifact(other, threads=1)
    # unknown scope
    man["preset"]["preprocess"]["image_size"] = [64, 64]
    man["details"]["scope"] = "everything"
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="scope"):
        Describer.from_artifact(other)


def test_backend_choice_is_checked(arts):
    with pytest.raises(ConfigError, match="build-engine"):
        Describer.from_artifact(arts["descriptor"], backend="trt")
    with pytest.raises(ConfigError, match="backend must be"):
        Describer.from_artifact(arts["descriptor"], backend="cuda")
    with pytest.raises(MissingDependencyError, match="CUDAExecutionProvider"):
        Describer.from_artifact(arts["descriptor"], providers=["cuda"])


def _fp16_io_copy(src, dst):
    """The toy model with float16 'images'/'descriptor' (Casts inside), as an fp16 export with io_dtype float16."""
    shutil.copytree(src, dst)
    m = onnx.load(dst / "model.onnx")
    g = m.graph
    for node in g.node:
        node.input[:] = ["images_f32" if i == "images" else i for i in node.input]
        node.output[:] = ["descriptor_f32" if o == "descriptor" else o for o in node.output]
    h = onnx.helper
    g.node.insert(0, h.make_node("Cast", ["images"], ["images_f32"], to=onnx.TensorProto.FLOAT))
    g.node.append(h.make_node("Cast", ["descriptor_f32"], ["descriptor"], to=onnx.TensorProto.FLOAT16))
    g.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    g.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(m, dst / "model.onnx")
    man = json.loads((dst / "manifest.json").read_text())
    from vpr_edge.integrity import sha256_file

    man["files"]["model.onnx"].update(bytes=(dst / "model.onnx").stat().st_size, sha256=sha256_file(dst / "model.onnx"))
    man["details"].update({"precision": "fp16", "io_dtype": "float16"})
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def test_float16_io_artifact(arts, images, tmp_path):
    f16 = _fp16_io_copy(arts["descriptor"], tmp_path / "f16")
    with Describer.from_artifact(f16, threads=1) as d16, Describer.from_artifact(arts["descriptor"], threads=1) as d32:
        a, b = d16.describe(images[:3]), d32.describe(images[:3])
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=5e-3)
