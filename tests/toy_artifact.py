"""A toy artifact in the exact export contract, built from numpy with `onnx.helper` (no torch): a test
fixture, for the runtime and map tests where the real exporter (torch) is not needed. A strided
convolution stands in for the backbone. Scope 'backbone' outputs per-patch L2-normalised
"features" [B, N, D] on the preset's patch grid (AnyLoc presets, with a random vocabulary and,
if the preset has one, a random PCA); scope 'descriptor' outputs an L2-normalised
"descriptor" [B, dim]. Needs the `onnx` package (the export extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpr_edge.atomic import atomic_dir
from vpr_edge.errors import ConfigError
from vpr_edge.fitted import PCAWhitening, Vocabulary
from vpr_edge.lazy import lazy_import
from vpr_edge.manifest import package_versions, write_artifact
from vpr_edge.presets import Preset
from vpr_edge.space import DescriptorSpace, Identity

OPSET = 17


def _l2(helper, x: str, out: str, axis: int, prefix: str) -> list:
    return [
        helper.make_node("ReduceL2", [x], [f"{prefix}_norm"], axes=[axis], keepdims=1),
        helper.make_node("Max", [f"{prefix}_norm", f"{prefix}_eps"], [f"{prefix}_clamped"]),
        helper.make_node("Div", [x, f"{prefix}_clamped"], [out]),
    ]


def toy_graph(preset: Preset, scope: str, batch: int | None = None, seed: int = 0):
    """The ONNX ModelProto of a toy backbone (scope 'backbone') or descriptor model."""
    onnx = lazy_import("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(seed)
    h, w = preset.preprocess.image_size
    b = preset.backbone
    if b.family == "resnet":
        kernel = stride = 16
        d = preset.feature_dim
    else:
        kernel, stride, d = b.patch_size, b.effective_stride, preset.feature_dim
    conv_w = (rng.standard_normal((d, 3, kernel, kernel)) / np.sqrt(3 * kernel * kernel)).astype(np.float32)
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(np.array([1e-12], dtype=np.float32), "l2_eps"),
    ]
    nodes = [helper.make_node("Conv", ["images", "conv_w"], ["fmap"], strides=[stride, stride])]
    bdim = batch if batch else "B"
    if scope == "backbone":
        gh, gw = preset.grid()
        inits.append(numpy_helper.from_array(np.array([0, d, -1], dtype=np.int64), "flat_shape"))
        nodes += [
            helper.make_node("Reshape", ["fmap", "flat_shape"], ["flat"]),
            helper.make_node("Transpose", ["flat"], ["patches"], perm=[0, 2, 1]),
            *_l2(helper, "patches", "features", 2, "l2"),
        ]
        out = helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [bdim, gh * gw, d])
    elif scope == "descriptor":
        dim = preset.descriptor_dim
        head = (rng.standard_normal((d, dim)) / np.sqrt(d)).astype(np.float32)
        inits.append(numpy_helper.from_array(head, "head_w"))
        nodes += [
            helper.make_node("ReduceMean", ["fmap"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "head_w"], ["raw"]),
            *_l2(helper, "raw", "descriptor", 1, "l2"),
        ]
        out = helper.make_tensor_value_info("descriptor", onnx.TensorProto.FLOAT, [bdim, dim])
    else:
        raise ConfigError(f"scope must be 'backbone' or 'descriptor', got {scope!r}")
    inp = helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [bdim, 3, h, w])
    graph = helper.make_graph(nodes, f"toy_{scope}", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vpr-edge-toy")
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model


def write_toy_artifact(
    folder: str | Path,
    preset: Preset,
    scope: str = "backbone",
    batch: int | None = None,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a complete toy artifact folder (manifest.json, model.onnx, vocabulary/pca npz) through the
    package's own writers (`manifest.write_artifact`, `fitted` files), as export writes real ones."""
    onnx = lazy_import("onnx")
    if scope == "backbone" and preset.aggregator.kind not in ("vlad", "gem"):
        raise ConfigError(f"scope 'backbone' needs a VLAD/GeM preset, {preset.name} uses {preset.aggregator.kind}")
    rng = np.random.default_rng(seed + 1)
    folder = Path(folder)
    weights = f"toy:seed={seed}"  # a toy network: its own weights id, one per seed
    with atomic_dir(folder, force=force) as tmp:
        onnx.save(toy_graph(preset, scope, batch, seed), str(tmp / "model.onnx"))
        files = {"model.onnx": "onnx"}
        a = preset.aggregator
        vocab = pca = None
        if scope == "backbone" and a.kind == "vlad":
            centers = rng.standard_normal((a.clusters, preset.feature_dim)).astype(np.float32)
            vocab = Vocabulary.for_preset(centers, preset, weights, source="toy", seed=seed)
            vocab.save(tmp / "vocabulary.npz")
            files["vocabulary.npz"] = "vocabulary"
        if scope == "backbone" and a.pca_dim:
            full = preset.without_pca().descriptor_dim
            q, _ = np.linalg.qr(rng.standard_normal((full, a.pca_dim)))
            pca = PCAWhitening(np.zeros(full, np.float32), q.T.astype(np.float32), {"source": "toy", "seed": seed})
            pca.save(tmp / "pca.npz")
            files["pca.npz"] = "pca"
        h, w = preset.preprocess.image_size
        bdim = batch or "B"
        inputs = [{"name": "images", "shape": [bdim, 3, h, w], "dtype": "float32"}]
        if scope == "backbone":
            gh, gw = preset.grid()
            outputs = [{"name": "features", "shape": [bdim, gh * gw, preset.feature_dim], "dtype": "float32"}]
        else:
            outputs = [{"name": "descriptor", "shape": [bdim, preset.descriptor_dim], "dtype": "float32"}]
        space = DescriptorSpace.of(preset, weights, vocabulary=vocab.fingerprint if vocab else None,
                                   pca=pca.fingerprint if pca else None)
        write_artifact(tmp, "onnx", files, space.to_dict(), Identity.of(preset, weights, scope=scope).to_dict(),
                       {"scope": scope, "precision": "fp32", "opset": OPSET, "toy": True},
                       preset=preset.to_dict(), inputs=inputs, outputs=outputs,
                       versions=package_versions("onnx", "numpy"))
    return folder


def write_manifest(folder: str | Path, preset: Preset, kind: str, files: dict[str, str], details: dict,
                   weights: str = "toy:seed=0") -> Path:
    """The manifest of files already in `folder` (a hand-made test artifact), through the one writer."""
    space = DescriptorSpace.of(preset, weights)
    identity = Identity.of(preset, weights, precision=details.get("precision", "fp32"),
                           scope=details.get("scope", "descriptor"))
    write_artifact(folder, kind, files, space.to_dict(), identity.to_dict(), details, preset=preset.to_dict())
    return Path(folder)
