"""A newcomer's head family: a head module (here, this file) plus registry entries, and nothing else.

The head is "mean pooling of facet tokens + a learned projection" (a stand-in for SALAD / MegaLoc on
DINOv2). Registering it and a preset is all it takes: the registry sizes its descriptor and its toy
version, the reference builder builds it, export verifies it through the runtime, and a map takes its
descriptors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vpr_edge import presets  # noqa: E402

OUT = 24


class MeanProject(torch.nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, out)

    def forward(self, features):
        x = self.proj(features.mean(dim=1))
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-4)


def build_head(preset, *, vocabulary=None, pca=None, state_dict=None, seed: int = 0, origin: str = ""):
    from vpr_edge.models.weights import init_random_

    return init_random_(MeanProject(preset.feature_dim, preset.aggregator.row_dim), seed)


@pytest.fixture()
def family():
    kind = presets.register_head(presets.HeadKind(
        name="meanproject", module=__name__, dim=lambda a, d: a.row_dim, tiny=lambda a: a,
    ))
    base = presets.get("anyloc-dinov2-vits14")
    preset = presets.register(dataclasses.replace(
        base, name="meanproject-dinov2", summary="mean-pooled ViT-S/14 value tokens, projected to 24-d",
        aggregator=presets.Aggregator(kind="meanproject", row_dim=OUT),
    ))
    yield preset
    presets.REGISTRY.pop(preset.name)
    presets.HEADS.pop(kind.name)


def test_a_new_head_family_is_a_model_file_and_a_registry_entry(family, corridor, tmp_path):
    from vpr_edge.export.artifact import ExportOptions, export_artifact
    from vpr_edge.models.reference import build_reference
    from vpr_edge.runtime.maps import build_map, query_map

    tiny = presets.get("meanproject-dinov2@tiny")
    assert tiny.descriptor_dim == OUT and tiny.describe()["aggregator"] == "meanproject"
    ref = build_reference(tiny, "random")
    x = torch.randn(2, 3, *tiny.preprocess.image_size)
    with torch.no_grad():
        assert ref.model(x).shape == (2, OUT)

    art = tmp_path / "art"
    m = export_artifact(tiny, art, options=ExportOptions(verify=corridor, verify_limit=12, progress=False))
    assert m.verification["fp32"]["passed"] and m.space["aggregator"]["kind"] == "meanproject"
    db = sorted((corridor / "database").glob("*.jpg"))[:8]
    built = build_map(db, art, tmp_path / "map", progress=False, threads=1)
    hits = query_map(built.folder, db[:1], top_k=1, threads=1)
    assert hits[0]["results"][0]["file"] == str(db[0].resolve())
    np.testing.assert_equal(len(built.descriptors()), len(db))
