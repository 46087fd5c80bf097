"""map_index: IVF-PQ re-ranking on near-duplicate places, search settings saved and reapplied,
maps and index files from before re-ranking existed."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_edge.errors import ConfigError
from vpr_edge.runtime import map_index

faiss = pytest.importorskip("faiss", reason="faiss not installed")


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _exact_top1(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.argmax(q @ x.T, axis=1)


@pytest.fixture(scope="module")
def hard_map():
    """Dense places: 3 clusters of ~500 near-duplicate frames (cosine ~0.99 with each other), queries
    revisiting a frame. Exact search separates the frames by ~0.01 in cosine; PQ's codes do not."""
    from vpr_edge.benchmarks.map_bench import ClusteredVectors

    n, d, nq = 1500, 128, 200
    gen = ClusteredVectors(n, d, clusters=3, spread=0.1, chunk=n, seed=3)
    x = gen.get(0)
    rng = np.random.default_rng(4)
    q = x[rng.choice(n, nq, replace=False)] + rng.standard_normal((nq, d)).astype(np.float32) * np.float32(0.2 / d**0.5)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q, _exact_top1(x, q)


@pytest.fixture(scope="module")
def built(hard_map):
    x, _, _ = hard_map
    out = {}
    for refine in ("none", "sq8", "flat"):
        params = map_index.index_params("ivfpq", len(x), x.shape[1], refine=refine)
        out[refine] = (params, map_index.build_index(x, params))
    return out


def test_rerank_recovers_top1_that_pq_loses(hard_map, built):
    x, q, truth = hard_map
    agree = {}
    for refine, (params, index) in built.items():
        _, ids = map_index.search(index, q, 1)
        agree[refine] = float(np.mean(ids[:, 0] == truth))
    # PQ alone swaps near-duplicates; re-scoring 500 candidates with the 8-bit or float copy does not
    assert agree["none"] < 0.8, agree
    assert agree["sq8"] >= 0.95 and agree["flat"] >= 0.98, agree
    assert agree["sq8"] > agree["none"] + 0.15, agree


def test_rerank_count_does_not_depend_on_k(hard_map, built):
    _, q, _ = hard_map
    params, index = built["sq8"]
    assert map_index.search_settings(index) == {"nprobe": params["nprobe"], "rerank": 500}
    _, top1 = map_index.search(index, q, 1)
    _, top10 = map_index.search(index, q, 10)
    # faiss' own k_factor would re-rank 10x fewer candidates for k=1 than for k=10
    assert np.array_equal(top1[:, 0], top10[:, 0])
    map_index.apply_search_settings(index, {"rerank": 1})
    try:
        _, few = map_index.search(index, q, 1)
    finally:
        map_index.apply_search_settings(index, {"rerank": 500})
    pq_only = faiss.downcast_index(index.base_index).search(q, 1)[1]
    assert np.array_equal(few[:, 0], pq_only[:, 0])  # re-ranking 1 candidate keeps PQ's order


def test_params_defaults_and_memory():
    p = map_index.index_params("ivfpq", 1_000_000, 512)
    assert p == {"type": "ivfpq", "nlist": 4000, "nprobe": 125, "m": 64, "nbits": 8, "refine": "sq8", "rerank": 500}
    assert map_index.factory_string(p) == "IVF4000,PQ64x8np,Refine(SQ8)"
    assert map_index.bytes_per_vector(p, 512) == 64 + 8 + 512
    assert map_index.bytes_per_vector({**p, "refine": "flat"}, 512) == 64 + 8 + 2048
    assert map_index.training_size(p, 1_000_000) == 200_000
    custom = map_index.index_params("ivfpq", 10_000, 64, nprobe=5, refine="flat", rerank=40)
    assert (custom["nprobe"], custom["refine"], custom["rerank"]) == (5, "flat", 40)
    assert map_index.index_params("ivfpq", 10_000, 64, nprobe=10**6)["nprobe"] == custom["nlist"]
    assert "rerank" not in map_index.index_params("ivfpq", 10_000, 64, refine="none")
    # a map saved before re-ranking existed: plain IVF-PQ, no "refine" key
    old = {"type": "ivfpq", "nlist": 64, "nprobe": 8, "m": 32, "nbits": 6}
    assert map_index.factory_string(old) == "IVF64,PQ32x6np" and map_index.bytes_per_vector(old, 64) == 32


@pytest.mark.parametrize(
    "kind, kwargs, match",
    [
        ("flat", {"nprobe": 4}, "--nprobe applies to"),
        ("ivfflat", {"refine": "sq8"}, "--refine and --rerank apply to --index ivfpq"),
        ("ivfpq", {"refine": "sq4"}, "--refine must be one of"),
        ("ivfpq", {"rerank": 0}, "--rerank must be an integer >= 1"),
        ("ivfpq", {"nprobe": -1}, "--nprobe must be an integer >= 1"),
        ("ivfpq", {"refine": "none", "rerank": 50}, "--rerank needs re-ranking"),
    ],
)
def test_bad_options_are_refused(kind, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        map_index.index_params(kind, 10_000, 64, **kwargs)


def test_settings_saved_and_reapplied_on_load(hard_map, built, tmp_path):
    x, q, _ = hard_map
    params, index = built["sq8"]
    path = tmp_path / "index.faiss"
    map_index.save_index(index, path)
    same = map_index.load_index(path)  # nprobe and the rerank count travel inside the file
    assert map_index.search_settings(same) == map_index.search_settings(index)
    assert np.array_equal(map_index.search(same, q, 5)[1], map_index.search(index, q, 5)[1])
    tuned = map_index.load_index(path, {**params, "nprobe": 2, "rerank": 30})
    assert map_index.search_settings(tuned) == {"nprobe": 2, "rerank": 30}
    plain = map_index.load_index(path, {"nprobe": None, "rerank": None})  # None = leave as saved
    assert map_index.search_settings(plain) == map_index.search_settings(index)
    map_index.add_to_index(tuned, x[:10])  # `map add`: the PQ codes and the re-rank copy both grow
    assert tuned.ntotal == len(x) + 10 and faiss.downcast_index(tuned.refine_index).ntotal == len(x) + 10
    plain_path = tmp_path / "plain.faiss"
    map_index.save_index(built["none"][1], plain_path)
    with pytest.raises(ConfigError, match="--rerank applies to IVF-PQ maps built with re-ranking"):
        map_index.load_index(plain_path, {"rerank": 5})


def test_index_written_before_reranking_still_loads(hard_map, tmp_path):
    """What the old build_index wrote: IndexIVFPQ from its constructor, params without "refine"."""
    x, q, truth = hard_map
    d = x.shape[1]
    old = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, 64, 32, 6, faiss.METRIC_INNER_PRODUCT)
    old.train(x)
    old.add(x)
    path = tmp_path / "old.faiss"
    faiss.write_index(old, str(path))
    params = {"type": "ivfpq", "nlist": 64, "nprobe": 8, "m": 32, "nbits": 6, "trained_on": len(x)}
    index = map_index.load_index(path, params)
    assert map_index.search_settings(index) == {"nprobe": 8}
    scores, ids = map_index.search(index, q, 3)
    assert ids.shape == (len(q), 3) and np.all(ids >= 0) and np.all(scores[:, 0] >= scores[:, 1])
    assert np.mean(ids[:, 0] == truth) > 0.2  # a working (if coarse) IVF-PQ, not garbage


def test_small_and_flat_indexes_search(hard_map):
    x, q, truth = hard_map
    flat = map_index.build_index(x[:100], map_index.index_params("flat", 100, x.shape[1]))
    assert map_index.search_settings(flat) == {}
    with pytest.raises(ConfigError, match="--nprobe applies to IVF indexes"):
        map_index.apply_search_settings(flat, {"nprobe": 3})
    # fewer map vectors than k * candidates: padded with -1 by faiss, never an error
    p = map_index.index_params("ivfpq", 700, x.shape[1], rerank=5000)
    small = map_index.build_index(x[:700], p)
    _, ids = map_index.search(small, q[:5], 10)
    assert ids.shape == (5, 10) and np.all(ids >= 0)
