"""The student as a product: teacher artifact -> cache -> training -> a student artifact (FP32/FP16/INT8) that
queries the teacher's map, side by side in bench, evaluated against the teacher; and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from vpr_edge.cli.main import main  # noqa: E402
from vpr_edge.errors import ArtifactError  # noqa: E402
from vpr_edge.manifest import Manifest  # noqa: E402

TEACHER = "anyloc-dinov2@tiny"


@pytest.fixture(scope="module")
def product(tmp_path_factory, corridor):
    root = tmp_path_factory.mktemp("student")
    teacher = root / "teacher"
    assert main(["export", "--quiet", "--model", TEACHER, "--weights", "random", "--scope", "backbone",
                 "--verify", str(corridor), "--verify-limit", "16", "--output", str(teacher)]) == 0
    images = sorted((corridor / "database").glob("*.jpg"))[::8]  # 14 training images
    cache = root / "cache"
    assert main(["distill", "cache", *map(str, images), "--teacher", str(teacher), "--output", str(cache),
                 "--views", "2", "--shard-size", "8", "--quiet"]) == 0
    run = root / "run"
    assert main(["distill", "train", "--cache", str(cache), "--output", str(run), "--tiny", "--steps", "12",
                 "--batch-size", "8", "--micro-batch-size", "4", "--warmup-steps", "2", "--eval-every", "6",
                 "--checkpoint-every", "6", "--lr", "2e-3", "--threads", "2", "--quiet"]) == 0
    return root, teacher, cache, run


def test_a_student_artifact_declares_the_teachers_space_and_queries_its_map(product, corridor, capsys):
    root, teacher, _, run = product
    student = root / "student"
    assert main(["export", "--quiet", "--model", f"student:{run}", "--verify", str(corridor), "--verify-limit", "16",
                 "--output", str(student)]) == 0
    s, t = Manifest.load(student), Manifest.load(teacher)
    assert s.space == t.space  # the teacher's descriptor space ...
    assert s.identity["network"].startswith("student-vits14@tiny:") and s.identity["weights"] != t.identity["weights"]
    assert s.details["student_run"] == str(run.resolve()) and s.verification["fp32"]["passed"]
    mp = root / "map"
    assert main(["map", "build", str(corridor / "database"), "--model", str(teacher), "-o", str(mp)]) == 0
    capsys.readouterr()
    assert main(["map", "query", str(mp), str(corridor / "queries" / "0000001.jpg"), "--model", str(student),
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits[0]["results"]) == 5
    # bench: teacher and student side by side, comparable (same space)
    out = root / "bench"
    assert main(["bench", str(corridor), "--variant", f"teacher={teacher}", "--variant", f"student={student}",
                 "--baseline", "teacher", "--batches", "1", "--runs", "3", "--warmup", "0", "--limit", "6",
                 "--no-plots", "--match-grid", "0", "--quiet", "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["variants"]["student"]["accuracy"]["R@1"] >= 0


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_student_exports_through_the_precision_gates(product, corridor, precision, capsys):
    root, teacher, _, run = product
    out = root / f"student-{precision}"
    rc = main(["export", "--quiet", "--model", f"student:{run}", "--precision", precision, "--verify", str(corridor),
               "--verify-limit", "16", "--accept-fidelity", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = Manifest.load(out)
    assert m.space == Manifest.load(teacher).space and m.identity["precision"] == precision
    assert m.details["tensorrt_check"]["ok"]


def test_a_student_at_another_input_size_exports_with_its_token_alignment(product, corridor, tmp_path, capsys):
    # 84x112 input: a 6x8 token grid, aligned bilinearly to the teacher's 8x11 grid by a Resize of activations
    root, teacher, cache, _ = product
    run = tmp_path / "run"
    assert main(["distill", "train", "--cache", str(cache), "--output", str(run), "--tiny", "--student-size", "84x112",
                 "--steps", "4", "--batch-size", "4", "--micro-batch-size", "4", "--warmup-steps", "1",
                 "--threads", "2", "--quiet"]) == 0
    for precision in ("fp32", "int8"):
        out = tmp_path / precision
        rc = main(["export", "--quiet", "--model", f"student:{run}", "--precision", precision, "--verify", str(corridor),
                   "--verify-limit", "16", "--accept-fidelity", "--output", str(out)])
        assert rc == 0, capsys.readouterr().err
        m = Manifest.load(out)
        assert m.preset["preprocess"]["image_size"] == [84, 112] and m.space == Manifest.load(teacher).space
        assert m.details["graph"]["ops"].get("Resize") == 1 and m.details["tensorrt_check"]["ok"]
        if precision == "fp32":
            assert m.verification["fp32"]["passed"]
    # a Resize of a constant (a position table resampled at run time) is still refused
    import onnx
    from onnx import TensorProto, helper as h

    from vpr_edge.export.artifact import _graph_report
    from vpr_edge import presets

    table = h.make_tensor("pos", TensorProto.FLOAT, [1, 4, 2, 2], np.ones(16, np.float32))
    scales = h.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    g = h.make_graph([h.make_node("Resize", ["pos", "", "scales"], ["pos2"], name="pos_resize", mode="linear"),
                      h.make_node("Add", ["images", "pos2"], ["features"], name="add")], "g",
                     [h.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4, 4, 4])],
                     [h.make_tensor_value_info("features", TensorProto.FLOAT, [1, 4, 4, 4])], [table, scales])
    bad = tmp_path / "bad.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), bad)
    with pytest.raises(ArtifactError, match=r"bad.onnx: graph resizes a constant \(pos_resize\); the position "
                                            r"embedding must be precomputed"):
        _graph_report(presets.get(TEACHER), bad)


def test_distill_eval_compares_the_student_with_its_teacher(product, corridor, tmp_path, capsys):
    root, teacher, _, run = product
    out = tmp_path / "eval"
    assert main(["distill", "eval", str(run), "--teacher", str(teacher), "--images", str(corridor), "--limit", "8",
                 "--latency-runs", "2", "--quiet", "--output", str(out)]) == 0
    rep = json.loads((out / "eval.json").read_text())
    s = rep["results"][f"student:{run.name}"]
    assert -1 <= s["cos_mean"] <= 1 and 0 <= s["top1_agreement"] <= 1 and 0 <= s["assignment_agreement"] <= 1
    assert s["gflops"] > 0 and rep["results"]["teacher"]["gflops"] > 0 and "R@1" in s
    assert {"eval.md", "cosine.png", "recall.png"} <= {p.name for p in out.iterdir()}
    # top-1 agreement split by the teacher's own top-1 margin: the two halves bracket the whole
    u, lo = s["top1_agreement_teacher_margin_upper_half"], s["top1_agreement_teacher_margin_lower_half"]
    assert min(u, lo) <= s["top1_agreement"] <= max(u, lo)
    assert rep["results"]["teacher"]["top1_margin"]["n"] == 8 and "top-1 margin" in (out / "eval.md").read_text()


def test_the_teachers_top1_margin():
    from vpr_edge.fidelity import top1_margins

    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.9, 0.1, 0, 0], [0.5, 0.5, 0, 0], [0, 0.2, 0.7, 0.1]], np.float32)
    np.testing.assert_allclose(top1_margins(db, q, rows=2), [0.8, 0.0, 0.5], atol=1e-6)


def test_a_student_of_another_teacher_is_refused(product, corridor, tmp_path):
    root, teacher, _, run = product
    other = tmp_path / "other-teacher"
    assert main(["export", "--quiet", "--model", TEACHER, "--weights", "random", "--seed", "3", "--scope", "backbone",
                 "--verify", str(corridor), "--verify-limit", "16", "--output", str(other)]) == 0
    from vpr_edge.benchmarks.distill_eval import evaluate_students

    with pytest.raises(ArtifactError, match="different descriptor spaces.*weights random:seed=0 vs random:seed=3"):
        evaluate_students([run], other, corridor, tmp_path / "e", limit=4, latency_runs=1, progress=False)
    mp = tmp_path / "map"
    assert main(["map", "build", str(corridor / "database"), "--model", str(other), "-o", str(mp)]) == 0
    student = root / "student"
    if not student.exists():
        assert main(["export", "--quiet", "--model", f"student:{run}", "--output", str(student)]) == 0
    from vpr_edge.runtime.maps import query_map

    with pytest.raises(ArtifactError, match="different descriptor spaces"):
        query_map(mp, [corridor / "queries" / "0000001.jpg"], artifact=student, threads=1)


def test_student_export_refuses_teacher_options(product, capsys, tmp_path):
    _, _, _, run = product
    rc = main(["export", "--quiet", "--model", f"student:{run}", "--vocabulary", str(tmp_path / "v.npz"),
               "--output", str(tmp_path / "x")])
    assert rc != 0 and "come from its run folder" in capsys.readouterr().err


def test_a_teacher_artifact_without_features_is_refused_for_a_cache(corridor, tmp_path, capsys):
    art = tmp_path / "desc"
    assert main(["export", "--quiet", "--model", TEACHER, "--weights", "random", "--verify", str(corridor),
                 "--verify-limit", "12", "--output", str(art)]) == 0
    rc = main(["distill", "cache", str(corridor / "queries"), "--teacher", str(art), "--output", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "--scope backbone" in err
    assert np.isfinite(0.0)


def test_a_map_specific_student_is_distilled_from_the_maps_own_features(product, corridor, tmp_path, capsys):
    root, teacher, _, generic = product
    mp = tmp_path / "map"
    db = sorted((corridor / "database").glob("*.jpg"))[:20]
    assert main(["map", "build", *map(str, db), "--model", str(teacher), "-o", str(mp), "--keep-teacher-features",
                 "--chunk", "8"]) == 0
    assert list((mp / "chunks").glob("*.features.npy")) and (mp / "teacher" / "vocabulary.npz").exists()
    from vpr_edge.distill.cache import open_cache

    c = open_cache(mp)
    assert len(c) == 20 and c.features(3).shape == (c.grid[0] * c.grid[1], c.feature_dim)
    # the features the map kept are the teacher's: the stored descriptor is their aggregation
    from vpr_edge.artifact import load_artifact
    from vpr_edge.runtime.aggregate import Aggregation

    agg = Aggregation.for_preset(load_artifact(teacher).preset, teacher / "vocabulary.npz", None)
    np.testing.assert_allclose(agg(np.asarray(c.features(3), np.float32)[None])[0], c.descriptor(3), atol=2e-3)
    run = tmp_path / "map-run"
    assert main(["distill", "train", "--cache", str(mp), "--output", str(run), "--tiny", "--steps", "6",
                 "--batch-size", "4", "--micro-batch-size", "4", "--warmup-steps", "1", "--eval-every", "3",
                 "--checkpoint-every", "3", "--threads", "2", "--quiet"]) == 0
    # the map-specific student fine-tuned from the generic one (the CLI records where it started)
    tuned = tmp_path / "map-tuned"
    assert main(["distill", "train", "--cache", str(mp), "--output", str(tuned), "--tiny", "--student-weights",
                 str(generic), "--steps", "2", "--batch-size", "4", "--micro-batch-size", "4", "--warmup-steps", "1",
                 "--threads", "2", "--quiet"]) == 0
    assert json.loads((tuned / "config.json").read_text())["init"]["run"] == str(generic.resolve())
    out = tmp_path / "eval"
    assert main(["distill", "eval", str(generic), str(run), "--teacher", str(teacher), "--map", str(mp),
                 "--images", str(corridor), "--limit", "6", "--latency-runs", "1", "--quiet", "--output", str(out)]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert set(rep["students"]) == {f"student:{generic.name}", f"student:{run.name}"}
    assert rep["images"]["against"].startswith("map ")
