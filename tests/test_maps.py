"""Maps: CLI build/add/query/info on Corridor, resume after a kill, unreadable images, indexes,
refusal of descriptors from another space."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from vpr_edge import presets
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.cli import map as map_cli
from vpr_edge.runtime import map_index
from vpr_edge.runtime.describer import Describer
from vpr_edge.runtime.maps import REPORT, Chunk, ChunkStore, Map, _finalize, add_to_map, build_map, query_map

pytest.importorskip("onnx", reason="onnx not installed (export extra), needed to write the toy artifact")
pytest.importorskip("faiss", reason="faiss not installed")
from toy_artifact import write_toy_artifact  # noqa: E402

PRESET = presets.get("anyloc-dinov2").tiny()


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return write_toy_artifact(tmp_path_factory.mktemp("art") / "anyloc", PRESET, "backbone")


@pytest.fixture(scope="module")
def db(corridor):
    return sorted((corridor / "database").glob("*.jpg"))


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    map_cli.register(parser.add_subparsers())
    args = parser.parse_args(["map", *argv])
    return args.func(args)


def test_cli_build_add_query_info(art, db, corridor, tmp_path, capsys):
    m = tmp_path / "map"
    assert _cli("build", *map(str, db[:60]), "--model", str(art), "-o", str(m), "--threads", "1", "--batch", "5") == 0
    assert "60 images" in capsys.readouterr().out
    assert _cli("add", str(m), str(corridor / "database"), "--threads", "1") == 0
    assert "added 51 images, now 111" in capsys.readouterr().out
    assert _cli("add", str(m), str(corridor / "database"), "--threads", "1") == 0
    assert "added 0 images, now 111" in capsys.readouterr().out
    q = corridor / "queries" / "0000010.jpg"
    assert (
        _cli(
            "query",
            str(m),
            str(q),
            str(corridor / "queries" / "0000011.jpg"),
            "--top-k",
            "3",
            "--json",
            "--threads",
            "1",
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in res] == [str(q), str(corridor / "queries" / "0000011.jpg")]
    hits = res[0]["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert all(h["file"].startswith(str(corridor / "database")) for h in hits)
    # the reported hit is what an exact numpy search over the map's descriptors finds
    mp = Map.open(m)
    with Describer.from_artifact(art, threads=1) as d:
        qd = d.describe([q])
    best = int(np.argmax(mp.descriptors() @ qd[0]))
    assert hits[0]["id"] == best and mp.entries()[best]["path"] == hits[0]["file"]
    assert _cli("info", str(m), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 111 and info["complete"] and info["dim"] == PRESET.descriptor_dim
    assert info["index"]["type"] == "flat" and info["artifact"]["scope"] == "backbone"
    assert _cli("query", str(m), str(q), "--top-k", "2", "--threads", "1") == 0
    assert "    1  " in capsys.readouterr().out
    # the registered CLI entry point knows the command
    from vpr_edge.cli.main import main

    assert main(["map", "info", str(m)]) == 0


def test_build_resumes_after_a_kill_without_reencoding(art, db, tmp_path, monkeypatch):
    images = db[:50]
    fresh = build_map(images, art, tmp_path / "fresh", chunk_size=16, batch=4, progress=False, threads=1)

    class Killed(Exception):
        pass

    encoded: list[int] = []
    real_run = Describer.run_backend

    def dying_run(self, x, batch=None):
        if sum(encoded) + len(x) > 38:  # dies inside the third chunk (images 32..47)
            raise Killed
        encoded.append(len(x))
        return real_run(self, x, batch)

    monkeypatch.setattr(Describer, "run_backend", dying_run)
    with pytest.raises(Killed):
        build_map(images, art, tmp_path / "map", chunk_size=16, batch=4, progress=False, threads=1)
    partial = Map.open(tmp_path / "map", require_complete=False)
    assert not partial.complete and [len(c.files) for c in partial.store.committed()] == [16, 16]
    with pytest.raises(ArtifactError, match="did not finish"):
        query_map(tmp_path / "map", images[:1], artifact=art)

    def counting_run(self, x, batch=None):
        encoded.append(len(x))
        return real_run(self, x, batch)

    encoded.clear()
    monkeypatch.setattr(Describer, "run_backend", counting_run)
    m = build_map(images, art, tmp_path / "map", chunk_size=16, batch=4, progress=False, threads=1)
    assert sum(encoded) == 50 - 32  # nothing committed was encoded again
    assert [e["path"] for e in m.entries()] == [str(p.resolve()) for p in images]  # nothing lost, order kept
    np.testing.assert_allclose(m.descriptors(), fresh.descriptors(), atol=1e-6)
    assert m.index().ntotal == 50


def test_kill_between_descriptor_and_record_write(art, db, tmp_path, monkeypatch):
    """A chunk whose .npy landed but whose .json did not is not committed and gets redone."""
    real = ChunkStore.commit
    calls = {"n": 0}

    def commit(self, chunk, descriptors):
        calls["n"] += 1
        if calls["n"] == 2:
            self.dir.mkdir(parents=True, exist_ok=True)
            np.save(self.dir / f"{chunk.id:06d}.npy", descriptors)  # the .npy lands, then the process dies
            raise KeyboardInterrupt
        return real(self, chunk, descriptors)

    monkeypatch.setattr(ChunkStore, "commit", commit)
    with pytest.raises(KeyboardInterrupt):
        build_map(db[:20], art, tmp_path / "map", chunk_size=8, progress=False, threads=1)
    monkeypatch.setattr(ChunkStore, "commit", real)
    m = build_map(db[:20], art, tmp_path / "map", chunk_size=8, progress=False, threads=1)
    assert m.details["count"] == 20 and len(m.store.committed()) == 3


def test_unreadable_images_are_reported_skipped_and_retried_by_add(art, db, tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in db[:4]:
        shutil.copy(p, folder / p.name)
    (folder / "zz_corrupt.jpg").write_bytes(b"not a jpeg at all")
    data = db[4].read_bytes()
    (folder / "zz_truncated.jpg").write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING):
        m = build_map([folder], art, tmp_path / "map", progress=False, threads=1)
    assert m.details["count"] == 4 and m.details["failed"] == 2
    report = (tmp_path / "map" / REPORT).read_text().splitlines()
    assert report[0] == "path\terror" and len(report) == 3 and "zz_corrupt.jpg" in report[1]
    assert any("skipping unreadable image" in r.message for r in caplog.records)
    # fix one file: `add` retries it, the report shrinks
    Image.open(db[5]).save(folder / "zz_corrupt.jpg")
    m, n = add_to_map(tmp_path / "map", [folder], progress=False, threads=1)
    assert n == 1 and m.details["count"] == 5 and m.details["failed"] == 1
    assert "zz_corrupt" not in (tmp_path / "map" / REPORT).read_text()


def test_refuses_queries_from_another_descriptor_space(art, db, tmp_path):
    m = build_map(db[:10], art, tmp_path / "map", progress=False, threads=1)
    other_vocab = write_toy_artifact(tmp_path / "seed1", PRESET, "backbone", seed=1)
    with pytest.raises(ArtifactError, match=r"different descriptor spaces.*vocabulary"):
        query_map(m.folder, db[:1], artifact=other_vocab, threads=1)
    boq = write_toy_artifact(tmp_path / "boq", presets.get("boq-resnet50").tiny(), "descriptor")
    with pytest.raises(ArtifactError, match=r"boq.*and map.*different descriptor spaces \(preset 'boq-resnet50@tiny' vs 'anyloc-dinov2@tiny'.*features.backbone"):
        query_map(m.folder, db[:1], artifact=boq, threads=1)
    with pytest.raises(ArtifactError, match="different descriptor spaces"):
        add_to_map(m.folder, db[10:12], artifact=boq, progress=False, threads=1)
    # same space, another artifact folder (e.g. the FP16 or engine twin): accepted
    twin = shutil.copytree(art, tmp_path / "twin")
    assert query_map(m.folder, db[:1], artifact=twin, top_k=1, threads=1)[0]["results"][0]["id"] == 0


def test_existing_outputs_and_resume_options(art, db, tmp_path):
    m = build_map(db[:5], art, tmp_path / "map", progress=False, threads=1)
    with pytest.raises(ArtifactError, match="map add"):
        build_map(db[:5], art, m.folder, progress=False, threads=1)
    again = build_map(db[:3], art, m.folder, force=True, progress=False, threads=1)
    assert again.details["count"] == 3
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a map"):
        build_map(db[:3], art, junk, force=True, progress=False, threads=1)
    assert (junk / "keep.txt").exists()
    # an unfinished build is resumed only with the same options
    unfinished = Map.open(m.folder)
    unfinished.details["complete"] = False
    unfinished.manifest.save(m.folder)
    with pytest.raises(ConfigError, match="same options"):
        build_map(db[:3], art, m.folder, index="ivfflat", progress=False, threads=1)
    with pytest.raises(ConfigError, match="index must be"):
        build_map(db[:3], art, tmp_path / "x", index="hnsw", progress=False)


def test_second_writer_is_refused_while_a_build_holds_the_map(art, db, tmp_path):
    """Two `map build`/`map add` on one map would interleave chunk numbers: the second is refused with
    the holder's pid, and nothing of the map is touched; once the first is done, writing works."""
    import os

    from vpr_edge.runtime.maps import writer_lock

    m = build_map(db[:3], art, tmp_path / "map", progress=False, threads=1)
    before = sorted(p.name for p in (m.folder / "chunks").iterdir())
    with writer_lock(m.folder):  # another open file description: conflicts like another process would
        with pytest.raises(ArtifactError, match=rf"being written by another .*pid {os.getpid()}"):
            add_to_map(m.folder, db[3:5], progress=False, threads=1)
        with pytest.raises(ArtifactError, match="being written by another"):
            build_map(db[:3], art, tmp_path / "map", force=True, progress=False, threads=1)
    assert sorted(p.name for p in (m.folder / "chunks").iterdir()) == before
    _, n = add_to_map(m.folder, db[3:5], progress=False, threads=1)
    assert n == 2


def test_moved_map_needs_model(art, db, tmp_path):
    moved_art = shutil.copytree(art, tmp_path / "art")
    m = build_map(db[:4], moved_art, tmp_path / "map", progress=False, threads=1)
    shutil.rmtree(moved_art)
    with pytest.raises(ArtifactError, match="pass --model ARTIFACT"):
        query_map(m.folder, db[:1])
    assert query_map(m.folder, db[:1], artifact=art, top_k=1, threads=1)[0]["results"][0]["id"] == 0


def test_utm_metadata(art, db, tmp_path):
    folder = tmp_path / "utm"
    folder.mkdir()
    for i, p in enumerate(db[:3]):
        shutil.copy(p, folder / f"@{500000 + 10 * i:.2f}@{4100000.5:.2f}@33@T@@@@@@@@.jpg")
    shutil.copy(db[3], folder / "no_utm.jpg")
    m = build_map([folder], art, tmp_path / "map", metadata="utm", progress=False, threads=1)
    utms = [e["utm"] for e in m.entries()]
    assert utms[:3] == [[500000.0, 4100000.5], [500010.0, 4100000.5], [500020.0, 4100000.5]] and utms[3] is None
    res = query_map(m.folder, [folder / f"@{500010:.2f}@{4100000.5:.2f}@33@T@@@@@@@@.jpg"], top_k=1, threads=1)
    assert res[0]["results"][0]["utm"] == [500010.0, 4100000.5]


def test_ivf_indexes(art, db, corridor, tmp_path, capsys):
    with pytest.raises(ConfigError, match="ivfpq needs at least 624"):
        build_map(db[:40], art, tmp_path / "pq", index="ivfpq", progress=False, threads=1)
    # options that do not fit the index are refused before any image is described
    with pytest.raises(ConfigError, match="--refine and --rerank apply to --index ivfpq"):
        _cli("build", *map(str, db[:40]), "--model", str(art), "-o", str(tmp_path / "bad"), "--index", "ivfflat",
             "--refine", "sq8")
    assert not (tmp_path / "bad").exists()
    ivf = tmp_path / "ivf"
    assert _cli("build", *map(str, db[:40]), "--model", str(art), "-o", str(ivf), "--index", "ivfflat",
                "--nprobe", "3", "--threads", "1") == 0
    m = Map.open(ivf)
    params = m.details["index"]
    assert params["type"] == "ivfflat" and params["nprobe"] == min(3, params["nlist"])  # 40 images: 1 list
    assert m.index().ntotal == 40 and map_index.search_settings(m.index()) == {"nprobe": params["nprobe"]}
    q = str(corridor / "queries" / "0000010.jpg")
    capsys.readouterr()
    assert _cli("query", str(ivf), q, "--nprobe", str(m.details["index"]["nlist"]), "--json", "--threads", "1") == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    with Describer.from_artifact(art, threads=1) as d:
        qd = d.describe([q])
    assert hits[0]["id"] == int(np.argmax(m.descriptors() @ qd[0]))  # all lists visited: exact
    with pytest.raises(ConfigError, match="--rerank applies to IVF-PQ maps"):
        _cli("query", str(ivf), q, "--rerank", "5")


def _synthetic_map(folder, x: np.ndarray, index: dict) -> Map:
    """A map folder made of chunks of given descriptors (no images), finalised into its index."""
    from vpr_edge.manifest import Manifest

    from vpr_edge.space import DescriptorSpace, Identity

    man = Manifest(
        kind="map",
        preset=PRESET.to_dict(),
        space=DescriptorSpace.of(PRESET, "toy:seed=0").to_dict(),
        identity=Identity.of(PRESET, "toy:seed=0").to_dict(),
        details={"index": index, "complete": False, "dim": x.shape[1], "metadata": None},
    )
    folder.mkdir()
    man.save(folder)
    m = Map.open(folder, require_complete=False)
    _commit_rows(m, x, 0)
    return _finalize(m)


def _commit_rows(m: Map, x: np.ndarray, first_id: int) -> None:
    next_id = m.store.next_id()
    for cid, start in enumerate(range(0, len(x), 1000)):
        rows = x[start : start + 1000]
        names = [f"img{first_id + start + i}.jpg" for i in range(len(rows))]
        m.store.commit(Chunk(next_id + cid, names, [None] * len(rows), []), rows)


def _clustered(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((50, d))
    x = centers[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), rng


def test_ivfpq_on_synthetic_map(tmp_path):
    n, d = 2500, 64
    x, rng = _clustered(n, d)
    params = map_index.index_params("ivfpq", n, d)
    assert params == {"type": "ivfpq", "nlist": 64, "nprobe": 16, "m": 32, "nbits": 6, "refine": "sq8", "rerank": 500}
    m = _synthetic_map(tmp_path / "m", x, {"type": "ivfpq"})
    assert {k: v for k, v in m.details["index"].items() if k != "trained_on"} == params
    index = Map.open(tmp_path / "m").index()
    assert index.ntotal == n and map_index.search_settings(index) == {"nprobe": 16, "rerank": 500}
    q = x[rng.choice(n, 200, replace=False)] + 0.05 * rng.standard_normal((200, d)).astype(np.float32)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, approx = map_index.search(index, q, 10)
    recall10 = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall10 > 0.9, recall10  # PQ candidates re-ranked with the 8-bit copy
    # serialised and reloaded index gives the same answers
    _, again = map_index.search(map_index.load_index(tmp_path / "m" / "index.faiss", m.details["index"]), q, 10)
    assert np.array_equal(again, approx)
    # `map add` appends to the trained index (both the PQ codes and the re-rank copy)
    more, _ = _clustered(300, d, seed=1)
    m.details["complete"] = False
    _commit_rows(m, more, n)
    m = _finalize(m)
    grown = Map.open(m.folder).index()
    assert grown.ntotal == n + 300 and map_index.search_settings(grown) == {"nprobe": 16, "rerank": 500}
    assert map_index.search(grown, more[:5], 1)[1][:, 0].tolist() == list(range(n, n + 5))


def test_ivfpq_options_are_recorded_and_reapplied(tmp_path):
    n, d = 2500, 64
    x, _ = _clustered(n, d)
    m = _synthetic_map(tmp_path / "m", x, {"type": "ivfpq", "nprobe": 4, "refine": "flat", "rerank": 40})
    assert (m.details["index"]["nprobe"], m.details["index"]["refine"], m.details["index"]["rerank"]) == (4, "flat", 40)
    index = Map.open(m.folder).index()
    assert map_index.search_settings(index) == {"nprobe": 4, "rerank": 40}
    assert map_index.bytes_per_vector(m.details["index"], d) == 24 + 8 + 4 * d
    assert map_index.search_settings(Map.open(m.folder).index(nprobe=2, rerank=10)) == {"nprobe": 2, "rerank": 10}
    plain = _synthetic_map(tmp_path / "plain", x, {"type": "ivfpq", "refine": "none"})
    assert "rerank" not in plain.details["index"]
    assert map_index.search_settings(Map.open(plain.folder).index()) == {"nprobe": 16}


def test_map_from_before_reranking_loads_and_grows(tmp_path):
    """A map written by the earlier runtime: a plain IVFPQ index file, params without "refine"."""
    import faiss

    n, d = 2500, 64
    x, rng = _clustered(n, d)
    m = _synthetic_map(tmp_path / "old", x, {"type": "flat"})
    old = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, 64, 32, 6, faiss.METRIC_INNER_PRODUCT)
    old.train(x)
    old.add(x)
    map_index.save_index(old, m.folder / "index.faiss")
    m.details["index"] = {"type": "ivfpq", "nlist": 64, "nprobe": 8, "m": 32, "nbits": 6, "trained_on": n}
    m.manifest.add_file(m.folder, "index.faiss", "index")  # what that runtime recorded for its own index file
    m.manifest.save(m.folder)
    loaded = Map.open(m.folder)
    index = loaded.index()
    assert index.ntotal == n and map_index.search_settings(index) == {"nprobe": 8}
    q = x[:50] + 0.02 * rng.standard_normal((50, d)).astype(np.float32)
    assert np.mean(map_index.search(index, q, 1)[1][:, 0] == np.arange(50)) > 0.5
    more, _ = _clustered(100, d, seed=2)
    loaded.details["complete"] = False
    _commit_rows(loaded, more, n)
    grown = _finalize(loaded)
    assert "refine" not in grown.details["index"] and Map.open(grown.folder).index().ntotal == n + 100
