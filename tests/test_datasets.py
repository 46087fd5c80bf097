"""Dataset layouts, ground truth, UTM positives and retrieval metrics."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from vpr_edge.datasets import (
    list_images,
    load_corridor_like,
    load_dataset,
    load_vpr_bench,
    load_vpr_downloader,
    parse_utm,
    positives_within,
)
from vpr_edge.fidelity import compare_descriptors, rank_database, recall_at_k
from vpr_edge.errors import InputError


def test_list_images_sorted_and_errors(tmp_path):
    for name in ["img10.jpg", "img2.PNG", "img1.jpeg", "notes.txt", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img0.jpg").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["img1.jpeg", "img2.PNG", "img10.jpg"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["img1.jpeg", "img2.PNG", "img10.jpg", "img0.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"{empty}: no images found"):
        list_images(empty)
    with pytest.raises(InputError, match="missing: image folder not found"):
        list_images(tmp_path / "missing")


def test_corridor_ground_truth(corridor):
    ds = load_corridor_like(corridor)
    assert len(ds.database) == len(ds.queries) == 111 and ds.layout == "corridor"
    assert ds.queries[0].name == "0000000.jpg" and ds.database[-1].name == "0000110.jpg"
    assert ds.positives[0].tolist() == [0, 1, 2]
    assert ds.positives[3].tolist() == [1, 2, 3, 4, 5]
    assert all(len(p) >= 3 for p in ds.positives)
    assert load_dataset(corridor).positives[50].tolist() == ds.positives[50].tolist()
    # the matching frame is a positive for every query
    assert all(i in ds.positives[i] for i in range(111))


def test_corridor_ground_truth_errors(corridor, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(corridor / "database", root / "database")
    shutil.copytree(corridor / "queries", root / "queries")
    with pytest.raises(InputError, match="ground truth not found"):
        load_corridor_like(root)
    (root / "ground_truth.csv").write_text("query,positives\n0000000.jpg,9999999.jpg\n")
    with pytest.raises(InputError, match=r"9999999.jpg.*not in"):
        load_corridor_like(root)
    (root / "ground_truth.csv").write_text("query,positives\n0000000.jpg,0000000.jpg\n")
    with pytest.raises(InputError, match="no ground-truth row for 110 queries"):
        load_corridor_like(root)
    (root / "ground_truth.csv").write_text("q;p\n")
    with pytest.raises(InputError, match="header"):
        load_corridor_like(root)


def test_parse_utm():
    name = "@0543256.96@4178906.70@10@S@037.75094@-122.44000@7KPzXkrFS0jsOcMYNk_pKQ@@0@@@@201311@@.jpg"
    assert parse_utm(name) == (543256.96, 4178906.70)
    assert parse_utm(f"/data/queries/{name}") == (543256.96, 4178906.70)
    assert parse_utm("0000001.jpg") is None
    assert parse_utm("@abc@def@.jpg") is None
    assert parse_utm("@1.0@.jpg") is None


def test_positives_within_25_m_matches_brute_force():
    rng = np.random.default_rng(0)
    db = np.column_stack([rng.uniform(5e5, 5e5 + 400, 600), rng.uniform(4.1e6, 4.1e6 + 400, 600)])
    q = np.column_stack([rng.uniform(5e5, 5e5 + 400, 80), rng.uniform(4.1e6, 4.1e6 + 400, 80)])
    got = positives_within(db, q, 25.0)
    for i in range(len(q)):
        brute = np.flatnonzero(np.linalg.norm(db - q[i], axis=1) <= 25.0)
        assert got[i].tolist() == brute.tolist()
    # boundary: exactly 25 m is in, 25.01 m is out (float64 keeps cm precision at UTM magnitudes)
    edge = positives_within(np.array([[5e5, 4.1e6 + 25.0], [5e5, 4.1e6 + 25.01]]), np.array([[5e5, 4.1e6]]))
    assert edge[0].tolist() == [0]


def _utm_name(e, n, tag):
    return f"@{e:.2f}@{n:.2f}@10@S@@@{tag}@@@@@@@@.jpg"


def test_vpr_datasets_downloader_layout(tmp_path):
    root = tmp_path / "tiny_city"
    dbf, qf = root / "images" / "test" / "database", root / "images" / "test" / "queries"
    dbf.mkdir(parents=True)
    qf.mkdir(parents=True)
    for i, (e, n) in enumerate([(500000, 4100000), (500010, 4100000), (500100, 4100000), (500000, 4100024)]):
        (dbf / _utm_name(e, n, f"d{i}")).write_bytes(b"x")
    (qf / _utm_name(500005, 4100000, "q0")).write_bytes(b"x")
    (qf / _utm_name(500300, 4100000, "q1")).write_bytes(b"x")
    for ds in (load_vpr_downloader(root), load_dataset(root), load_vpr_downloader(root / "images" / "test")):
        assert ds.layout == "vpr-datasets-downloader" and len(ds.database) == 4
        by_tag = {p.name.split("@")[7]: i for i, p in enumerate(ds.database)}
        q0 = [i for i, p in enumerate(ds.queries) if "q0" in p.name][0]
        assert sorted(ds.positives[q0].tolist()) == sorted([by_tag["d0"], by_tag["d1"], by_tag["d3"]])  # d3: 24.5 m
        assert ds.summary()["queries_without_positives"] == 1
    assert load_vpr_downloader(root).name == "tiny_city"
    (qf / "plain.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="plain.jpg: no UTM"):
        load_vpr_downloader(root)


def test_vpr_bench_layout(tmp_path):
    root = tmp_path / "bench"
    (root / "ref").mkdir(parents=True)
    (root / "query").mkdir()
    for i in range(12):  # numeric names sort numerically: 2.jpg before 10.jpg, like VPR-Bench's int() sort
        (root / "ref" / f"{i}.jpg").write_bytes(b"x")
    for i in range(3):
        (root / "query" / f"{i}.jpg").write_bytes(b"x")
    gt = np.empty((3, 2), dtype=object)
    gt[0] = [0, [0, 1]]
    gt[1] = [2, [10, 11]]
    gt[2] = [1, 5]  # a scalar ref index, as some VPR-Bench files have
    np.save(root / "ground_truth_new.npy", gt, allow_pickle=True)
    ds = load_dataset(root)
    assert ds.layout == "vpr-bench" and [p.name for p in ds.database][:3] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [p.tolist() for p in ds.positives] == [[0, 1], [5], [10, 11]]
    gt[1] = [2, [12]]
    np.save(root / "ground_truth_new.npy", gt, allow_pickle=True)
    with pytest.raises(InputError, match="outside 0..11"):
        load_vpr_bench(root)
    gt[1] = [2, [11]]
    np.save(root / "ground_truth_new.npy", gt[:2], allow_pickle=True)
    with pytest.raises(InputError, match="no ground-truth row for 1 queries"):
        load_vpr_bench(root)


def test_unknown_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(InputError, match="unknown dataset layout"):
        load_dataset(tmp_path)
    with pytest.raises(InputError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")


def test_recall_at_k_hand_made():
    positives = [np.array([3]), np.array([0, 9]), np.array([7]), np.array([], dtype=np.int64)]
    preds = np.array(
        [
            [3, 1, 2, 4, 5],  # hit at rank 1
            [5, 6, 9, 1, 2],  # hit at rank 3
            [1, 2, 4, 5, 6],  # miss
            [0, 1, 2, 3, 4],  # no positives: always a miss
        ]
    )
    assert recall_at_k(preds, positives, ks=(1, 2, 3, 5, 10)) == {"R@1": 0.25, "R@2": 0.25, "R@3": 0.5, "R@5": 0.5}
    with pytest.raises(InputError):
        recall_at_k(preds[:2], positives)


def test_recall_on_corridor_with_perfect_and_shifted_rankings(corridor):
    ds = load_corridor_like(corridor)
    ideal = np.arange(111)[:, None] + np.zeros((1, 5), dtype=int)
    assert recall_at_k(ideal, ds.positives, ks=(1,)) == {"R@1": 1.0}
    far = (np.arange(111)[:, None] + 50) % 111 + np.zeros((1, 5), dtype=int)
    assert recall_at_k(far, ds.positives, ks=(1,)) == {"R@1": 0.0}


def test_agreement_cosine_and_ranking():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8))
    db = x / np.linalg.norm(x, axis=1, keepdims=True)
    idx = rank_database(db, db[[3, 1]], k=2)
    assert idx[:, 0].tolist() == [3, 1]
    same = compare_descriptors(db, db * 3.0, np.arange(4), np.arange(4, 6))
    assert same["cos_min"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    # swap one query's descriptor for another's: its ranking changes, the other's does not
    other = db.copy()
    other[5] = db[4]
    rep = compare_descriptors(db, other, np.arange(4), np.arange(4, 6))
    assert rep["cos_min"] < 1.0 and rep["top1_agreement"] in (0.5, 1.0) and rep["top1_overlap"] <= 1.0


def test_agreement_with_ties_forgives_only_fp32_level_swaps():
    # database images 0 and 1 score 1e-7 apart for the query: a 1e-6 norm error on image 1 swaps
    # them (strict top-1 disagrees); that is a numerical tie
    q = np.array([[1.0, 0.0]])
    db = np.array([[1.0, 0.0], [1.0 - 1e-7, 0.0], [0.99, 0.14], [0.5, 0.866]])
    ref = np.vstack([db, q])
    tied = ref.copy()
    tied[1] *= 1.0 + 1e-6
    rep = compare_descriptors(ref, tied, np.arange(4), [4], ks=(1, 2))
    assert rep["top1_agreement"] == 0.0 and rep["top1_agreement_ties"] == 1.0 and rep["top2_agreement_ties"] == 1.0
    assert rep["score_err_max"] == pytest.approx(1e-6, rel=1e-3)
    assert rep["ref_top1_margin_p50"] == pytest.approx(1e-7, rel=1e-3) and rep["ref_score_spread_p50"] == pytest.approx(0.5)
    # image 2 overtakes across a 1e-2 gap: a ranking change, whatever the scale of the error
    moved = ref.copy()
    moved[2] *= 1.02
    rep = compare_descriptors(ref, moved, np.arange(4), [4], ks=(1, 2))
    assert rep["top1_agreement"] == 0.0 and rep["top1_agreement_ties"] == 0.0
