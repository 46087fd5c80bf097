"""Descriptor space vs identity: what decides comparability, what is only recorded, and old manifests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")

from toy_artifact import write_toy_artifact  # noqa: E402
from vpr_edge import presets  # noqa: E402
from vpr_edge.errors import ArtifactError  # noqa: E402
from vpr_edge.fitted import load_vocabulary  # noqa: E402
from vpr_edge.manifest import Manifest  # noqa: E402
from vpr_edge.runtime.maps import add_to_map, build_map, query_map  # noqa: E402
from vpr_edge.space import DescriptorSpace, Identity, differences, random_weights_id  # noqa: E402

TEACHER = presets.get("anyloc-dinov2").tiny()


def _declare(folder, space: dict, identity: dict | None = None) -> None:
    """Rewrite an artifact's manifest to declare `space` (what a student artifact does)."""
    m = Manifest.load(folder)
    m.space = space
    if identity is not None:
        m.identity = identity
    m.save(folder)


@pytest.fixture()
def teacher_map(tmp_path, corridor):
    art = write_toy_artifact(tmp_path / "teacher", TEACHER, "backbone")
    db = sorted((corridor / "database").glob("*.jpg"))[:6]
    m = build_map(db, art, tmp_path / "map", progress=False, threads=1)
    return art, m, db


def test_toy_artifact_records_vocabulary_content_not_file_hash(tmp_path):
    art = write_toy_artifact(tmp_path / "a", TEACHER, "backbone")
    man = Manifest.load(art)
    assert man.space["vocabulary"] == load_vocabulary(art / "vocabulary.npz").fingerprint
    assert man.space["vocabulary"] != man.files["vocabulary.npz"]["sha256"]


def test_another_backbone_declaring_the_teacher_space_queries_its_map(teacher_map, tmp_path):
    art, m, db = teacher_map
    # a "student": another network whose manifest declares the teacher's space
    student = write_toy_artifact(tmp_path / "student", TEACHER, "backbone", seed=5)
    shutil.copy(art / "vocabulary.npz", student / "vocabulary.npz")  # the teacher's vocabulary: its head
    m_s = Manifest.load(student)
    m_s.files["vocabulary.npz"] = Manifest.load(art).files["vocabulary.npz"]
    m_s.save(student)
    _declare(student, Manifest.load(art).space,
             Identity(network="student:vits14@anyloc-dinov2@tiny", backbone="dinov2 vits14",
                      weights=random_weights_id(5)).to_dict())
    hits = query_map(m.folder, db[:1], artifact=student, top_k=2, threads=1)
    assert len(hits[0]["results"]) == 2
    # a map holds one identity: the student may query it, not extend it
    with pytest.raises(ArtifactError, match="one artifact identity"):
        add_to_map(m.folder, db[:1], artifact=student, progress=False, threads=1)
    # the same student declaring another vocabulary: refused, naming both sides
    _declare(student, {**Manifest.load(art).space, "vocabulary": "0" * 64})
    with pytest.raises(ArtifactError, match=r"artifact .*student and map .*map are in different descriptor spaces.*vocabulary"):
        query_map(m.folder, db[:1], artifact=student, threads=1)


def test_random_weights_of_another_seed_are_another_space():
    a = DescriptorSpace.of(TEACHER, random_weights_id(0))
    b = DescriptorSpace.of(TEACHER, random_weights_id(1))
    assert differences(a, b) == ["weights random:seed=0 vs random:seed=1"]
    assert differences(a, b, level="features") and not differences(a, a)
    # a student's own identity never enters the comparison
    assert not differences(a.to_dict(), DescriptorSpace.of(TEACHER, random_weights_id(0)).to_dict())


def test_format_1_manifests_migrate_on_read(tmp_path, teacher_map):
    art, m, _ = teacher_map
    old = {
        "format": "vpr-edge-manifest", "format_version": 1, "kind": "onnx", "created": "2026-01-01T00:00:00+00:00",
        "preset": TEACHER.to_dict(),
        "space": {"preset": "anyloc-dinov2", "tiny": True, "backbone": {"family": "dinov2"}, "layer": 2,
                  "facet": {"layer": 2, "facet": "value"}, "image_size": [112, 154], "aggregator": {"kind": "vlad"},
                  "descriptor_dim": 192},
        "hashes": {"weights": "random", "vocabulary": "ab" * 32, "pca": None},
        "files": {}, "details": {"scope": "backbone", "precision": "int8"},
    }
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old))
    got = Manifest.load(tmp_path / "old")
    assert got.format_version == 2 and got.details["migrated_from_format"] == 1
    assert got.space["preset"] == "anyloc-dinov2@tiny" and got.space["weights"] == "legacy:random"
    assert got.space["vocabulary"] == "ab" * 32
    assert got.identity["precision"] == "int8" and got.identity["weights"] == "legacy:random"
    assert got.space["features"]["facet"]["facet"] == "value"
    # a migrated space compares with current ones by substance: another weights id here
    assert "weights legacy:random vs toy:seed=0" in "; ".join(differences(got.space, Manifest.load(art).space))


def test_vocabulary_of_another_network_is_refused_for_a_preset():
    from vpr_edge.fitted import Vocabulary

    v = Vocabulary.for_preset(np.random.default_rng(0).standard_normal((4, TEACHER.feature_dim)).astype(np.float32),
                              TEACHER, random_weights_id(0))
    v.check_for(TEACHER, random_weights_id(0))
    with pytest.raises(ArtifactError, match="weights random:seed=0 vs random:seed=1"):
        v.check_for(TEACHER, random_weights_id(1))
