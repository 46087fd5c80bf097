"""Trust nothing unverified, lose nothing: safe loading, integrity of what is loaded, one writer, refused
numbers, actionable failures (issue 12). Each test plants the bad input and checks the one-line refusal."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from toy_artifact import write_toy_artifact  # noqa: E402
from vpr_edge import presets  # noqa: E402
from vpr_edge.cli.main import main  # noqa: E402
from vpr_edge.errors import ArtifactError  # noqa: E402
from vpr_edge.manifest import Manifest  # noqa: E402
from vpr_edge.runtime.maps import Map, add_to_map, build_map, query_map  # noqa: E402

PRESET = presets.get("anyloc-dinov2").tiny()


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


class _Payload:
    """Unpickling this calls open(marker, 'w'): what a malicious object array in a .npy would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture()
def art(tmp_path):
    return write_toy_artifact(tmp_path / "art", PRESET, "backbone")


@pytest.fixture()
def db(corridor):
    return sorted((corridor / "database").glob("*.jpg"))[:12]


# -- 1. code execution from a data file ---------------------------------------------------------------
def test_vpr_bench_ground_truth_cannot_run_code(tmp_path, capsys):
    root = tmp_path / "bench"
    (root / "ref").mkdir(parents=True)
    (root / "query").mkdir()
    for i in range(2):
        (root / "ref" / f"{i}.jpg").write_bytes(b"x")
        (root / "query" / f"{i}.jpg").write_bytes(b"x")
    marker = tmp_path / "pwned"
    gt = np.empty((2, 2), dtype=object)
    gt[0] = [0, [0]]
    gt[1] = [1, _Payload(marker)]
    np.save(root / "ground_truth_new.npy", gt, allow_pickle=True)
    assert main(["describe", str(root), "--model", "anyloc-dinov2@tiny", "--weights", "random", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert not marker.exists()  # the payload never ran
    assert len(err.splitlines()) == 1 and "ground_truth_new.npy: refused" in err and "arbitrary code" in err
    # what numpy itself writes for a VPR-Bench file still loads
    gt[1] = [1, np.array([1, 0])]
    np.save(root / "ground_truth_new.npy", gt, allow_pickle=True)
    from vpr_edge.datasets import load_vpr_bench

    assert [p.tolist() for p in load_vpr_bench(root).positives] == [[0], [0, 1]]


def test_refused_pickled_checkpoint_is_one_line_of_ours(tmp_path):
    torch = pytest.importorskip("torch")
    from vpr_edge.errors import WeightsError
    from vpr_edge.models import weights as W

    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as e:
        W.read_checkpoint(tmp_path / "evil.pth")
    text = _one_line(e)
    assert not marker.exists() and "could run code" in text and "weights_only=False" not in text
    assert "re-download" not in text


# -- 2. what the manifest says is what is loaded -------------------------------------------------------
def test_swapped_model_file_is_refused_at_load(tmp_path, art):
    from vpr_edge.runtime.describer import Describer

    other = write_toy_artifact(tmp_path / "other", PRESET, "backbone", seed=1)
    assert (other / "model.onnx").stat().st_size == (art / "model.onnx").stat().st_size  # same size, other seed
    shutil.copy(other / "model.onnx", art / "model.onnx")
    with pytest.raises(ArtifactError) as e:
        Describer.from_artifact(art)
    assert "model.onnx does not match the sha256" in _one_line(e)
    Describer.from_artifact(art, verify=False).close()  # --no-verify: sizes only, the user's choice


def test_hashes_are_remembered_until_the_file_changes(tmp_path, art, monkeypatch):
    from vpr_edge import integrity

    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    integrity.file_sha256(art / "model.onnx")
    integrity.file_sha256(art / "model.onnx")
    assert calls.count("model.onnx") <= 1  # hashed at most once (the writer may have remembered it already)
    (art / "model.onnx").write_bytes((art / "model.onnx").read_bytes())  # rewritten: new mtime/ctime
    calls.clear()
    integrity.file_sha256(art / "model.onnx")
    assert calls == ["model.onnx"]


def test_map_files_are_verified(tmp_path, art, db):
    m = build_map(db, art, tmp_path / "map", progress=False, threads=1)
    other = build_map(db[:6], art, tmp_path / "other", progress=False, threads=1)
    shutil.copy(other.folder / "index.faiss", m.folder / "index.faiss")
    with pytest.raises(ArtifactError) as e:
        query_map(m.folder, db[:1], threads=1)
    assert "index.faiss" in _one_line(e)

    m = build_map(db, art, tmp_path / "map2", progress=False, threads=1)
    lines = (m.folder / "images.jsonl").read_text().splitlines()
    (m.folder / "images.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:7])  # truncated mid-line
    with pytest.raises(ArtifactError) as e:
        query_map(m.folder, db[:1], threads=1)
    assert "images.jsonl" in _one_line(e)

    m = build_map(db, art, tmp_path / "map3", progress=False, threads=1, chunk_size=4)
    (m.folder / "chunks" / "000001.npy").unlink()
    (m.folder / "chunks" / "000001.json").unlink()
    with pytest.raises(ArtifactError) as e:
        Map.open(m.folder).descriptors()
    assert "000001" in _one_line(e)


def test_random_weights_of_two_seeds_are_two_spaces(tmp_path, corridor):
    pytest.importorskip("torch")
    from vpr_edge.export.artifact import ExportOptions, export_artifact

    p = presets.get("anyloc-dinov2-gem").tiny()
    opts = ExportOptions(verify=corridor, verify_limit=8, progress=False)
    a = export_artifact(p, tmp_path / "s0", seed=0, options=opts)
    b = export_artifact(p, tmp_path / "s1", seed=1, options=opts)
    assert a.space["weights"] == "random:seed=0" and b.space["weights"] == "random:seed=1"
    m = build_map([corridor / "database" / "0000001.jpg"] * 1, tmp_path / "s0", tmp_path / "map", progress=False, threads=1)
    with pytest.raises(ArtifactError, match="weights random:seed=1 vs random:seed=0"):
        query_map(m.folder, [corridor / "queries" / "0000001.jpg"], artifact=tmp_path / "s1", threads=1)


# -- 3. one writer means one writer ------------------------------------------------------------------
def test_the_lock_holds_through_a_symlink(tmp_path, art, db):
    from vpr_edge.runtime.maps import writer_lock

    m = build_map(db[:6], art, tmp_path / "map", progress=False, threads=1)
    alias = tmp_path / "alias"
    alias.symlink_to(m.folder)
    with writer_lock(m.folder):  # another writer holds the real map
        with pytest.raises(ArtifactError) as e:
            add_to_map(alias, db[6:], progress=False, threads=1)
    assert "being written by another" in _one_line(e)
    assert Map.open(m.folder).details["count"] == 6  # nothing was added behind the holder's back


class _StopAfter(Exception):
    pass


def _kill_after_first_chunk(chunk_id, committed):
    raise _StopAfter  # what a kill between chunks leaves


def test_an_unfinished_build_is_resumed_by_build_only(tmp_path, art, db):
    out = tmp_path / "map"
    with pytest.raises(_StopAfter):
        build_map(db, art, out, progress=False, threads=1, chunk_size=4, on_commit=_kill_after_first_chunk)
    with pytest.raises(ArtifactError) as e:
        add_to_map(out, db[:2], progress=False, threads=1)
    assert "map build` did not finish" in _one_line(e)
    assert not Map.open(out, require_complete=False).complete  # the add did not mark it complete
    with pytest.raises(ArtifactError, match="last `vpr-edge map build` of this map did not finish"):
        query_map(out, db[:1], threads=1)
    m = build_map(db, art, out, progress=False, threads=1, chunk_size=4)
    assert m.complete and m.details["count"] == len(db)


def test_a_map_takes_one_artifact_identity(tmp_path, art, db):
    twin = shutil.copytree(art, tmp_path / "fp16-twin")
    man = Manifest.load(twin)
    man.identity = {**man.identity, "precision": "fp16"}  # same space, another producer
    man.save(twin)
    out = tmp_path / "map"
    with pytest.raises(_StopAfter):
        build_map(db, art, out, progress=False, threads=1, chunk_size=4, on_commit=_kill_after_first_chunk)
    with pytest.raises(ArtifactError, match="one artifact identity"):
        build_map(db, twin, out, progress=False, threads=1, chunk_size=4)  # resuming with another identity
    m = build_map(db, art, out, progress=False, threads=1, chunk_size=4)
    with pytest.raises(ArtifactError, match="one artifact identity"):
        add_to_map(m.folder, db[:1], artifact=twin, progress=False, threads=1)
    assert len(query_map(m.folder, db[:1], artifact=twin, threads=1)[0]["results"]) == 5  # queries: fine


def test_a_fixed_image_is_retried_when_the_build_resumes(tmp_path, art, db):
    images = tmp_path / "images"
    images.mkdir()
    for p in db[:8]:
        shutil.copy(p, images / p.name)
    broken = images / db[1].name
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "map"
    with pytest.raises(_StopAfter):
        build_map([images], art, out, progress=False, threads=1, chunk_size=4, on_commit=_kill_after_first_chunk)
    shutil.copy(db[1], broken)  # fixed before the build is resumed
    m = build_map([images], art, out, progress=False, threads=1, chunk_size=4)
    assert m.details["count"] == 8 and m.details["failed"] == 0


def test_an_index_too_large_for_the_map_is_refused_before_encoding(tmp_path, art, db):
    from vpr_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="ivfpq needs at least"):
        build_map(db, art, tmp_path / "map", index="ivfpq", progress=False, threads=1)
    assert not (tmp_path / "map" / "chunks").exists()


# -- 4. numbers that cannot be trusted are refused ---------------------------------------------------
def _nan_for(d, bad_path):
    """`d` made to output NaN for one image (a broken vocabulary, an FP16 overflow): the backend's output
    is NaN for the rows whose input is that image's."""
    bad = d.preprocess(bad_path).reshape(1, -1)
    real = d.run_backend

    def run_backend(x, batch=None):
        out = real(x, batch).copy()
        out[np.all(x.reshape(len(x), -1) == bad, axis=1)] = np.nan
        return out

    d.run_backend = run_backend
    return d


def test_non_finite_descriptors_are_reported_not_stored(tmp_path, art, db, capsys):
    from vpr_edge.runtime.describer import Describer

    with Describer.from_artifact(art, threads=1) as d:
        m = build_map(db, art, tmp_path / "map", describer=_nan_for(d, db[3]), progress=False, threads=1)
        assert m.details["count"] == len(db) - 1 and m.details["failed"] == 1
        report = (m.folder / "unreadable.tsv").read_text()
        assert db[3].name in report and "NaN/inf" in report
        got = query_map(m.folder, [db[3], db[4]], describer=d)
    assert "error" in got[0] and "NaN/inf" in got[0]["error"] and got[1]["results"]


def test_gates_refuse_degenerate_descriptors_whatever_the_error():
    from vpr_edge.engines.precision import table
    from vpr_edge.fidelity import compare_descriptors

    zeros = np.zeros((8, 16))
    rep = compare_descriptors(zeros, zeros, np.arange(4), np.arange(4, 8))  # an all-zero PCA: error 0
    assert rep["rel_err"] == 0.0
    for name in table.names():
        fails = table.get(name).gate(rep)
        assert any("zero norm" in f for f in fails) and any("same descriptor" in f for f in fails), (name, fails)


def test_an_all_zero_pca_or_vocabulary_is_refused_at_load(tmp_path):
    from vpr_edge.fitted import PCAWhitening, Vocabulary, load_pca, load_vocabulary

    np.savez(tmp_path / "pca.npz", mean=np.zeros(8, np.float32), proj=np.zeros((4, 8), np.float32))
    with pytest.raises(ArtifactError) as e:
        load_pca(tmp_path / "pca.npz")
    assert "projection rows are all zero" in _one_line(e)
    np.savez(tmp_path / "v.npz", centers=np.zeros((4, 8), np.float32))
    with pytest.raises(ArtifactError, match="centres are all zero"):
        load_vocabulary(tmp_path / "v.npz")
    assert PCAWhitening and Vocabulary


# -- 5. failures the user can act on -----------------------------------------------------------------
def _fail_writes(monkeypatch):
    from vpr_edge import atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)


def test_disk_full_during_map_build_is_one_line(tmp_path, art, db, monkeypatch, capsys):
    _fail_writes(monkeypatch)
    rc = main(["map", "build", str(db[0].parent), "--model", str(art), "-o", str(tmp_path / "map")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "disk full under" in err and "MiB free" in err
    assert not list((tmp_path / "map").glob("chunks/*.npy"))  # nothing under a final name


def test_disk_full_during_export_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    _fail_writes(monkeypatch)
    rc = main(["export", "--quiet", "--model", "anyloc-dinov2-gem@tiny", "--weights", "random",
               "--output", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "disk full under" in err
    assert list(tmp_path.iterdir()) == []


def test_disk_full_on_a_real_small_filesystem(tmp_path, art, db, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and a mount namespace); the faked ENOSPC tests cover it")
    try:
        rc = main(["map", "build", str(db[0].parent), "--model", str(art), "-o", str(small / "map"), "--chunk", "2"])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and ("disk full under" in err or "not enough disk" in err)
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_killed_export_leaves_no_worker_and_its_partial_folder_is_cleaned(tmp_path):
    pytest.importorskip("torch")
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "vpr_edge.cli.main", "export", "--quiet", "--model", "anyloc-dinov2-gem@tiny",
           "--weights", "random", "--torch-worker", "on", "--output", str(out)]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = psutil.Process(parent.pid)
        deadline = time.time() + 60
        while time.time() < deadline and not [c for c in proc.children(recursive=True) if "spawn" in " ".join(c.cmdline())]:
            time.sleep(0.2)
        workers = [c for c in proc.children(recursive=True)]
        assert workers, "the export never started its torch worker"
        assert list(tmp_path.glob(".art.*.partial"))
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()
    assert list(tmp_path.glob(".art.*.partial"))  # the killed run's partial folder is still there ...
    from vpr_edge.atomic import remove_stale_partials

    remove_stale_partials(tmp_path, "art")  # ... and the next run of that output removes it
    assert not list(tmp_path.glob(".art.*.partial")) and not out.exists()


def test_undecodable_file_names_print_and_one_bad_query_does_not_stop_the_others(tmp_path, art, db, capsys):
    images = tmp_path / "images"
    images.mkdir()
    odd = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    shutil.copy(db[0], images / odd)
    for p in db[1:4]:
        shutil.copy(p, images / p.name)
    assert main(["map", "build", str(images), "--model", str(art), "-o", str(tmp_path / "map")]) == 0
    capsys.readouterr()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    rc = main(["map", "query", str(tmp_path / "map"), str(images / odd), str(bad), str(db[2]), "--top-k", "1"])
    out, err = capsys.readouterr()
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "broken.jpg" in err
    assert "caf\ufffd.jpg" in out and out.count("  1  ") == 2  # the two good queries answered
    rc = main(["map", "query", str(tmp_path / "map"), str(images / odd), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)[0]["results"]


def test_options_that_do_nothing_for_the_precision_are_refused(capsys, tmp_path):
    for argv, fragment in (
        (["--precision", "fp32", "--io-dtype", "float16"], "--io-dtype float16 does not apply to fp32"),
        (["--precision", "fp16", "--calibration", str(tmp_path)], "--calibration do(es) nothing with --precision fp16"),
        (["--precision", "fp32", "--target-agreement", "0.9"], "--target-agreement do(es) nothing with --precision fp32"),
    ):
        rc = main(["export", "--quiet", "--model", "anyloc-dinov2-gem@tiny", "--weights", "random", *argv,
                   "--output", str(tmp_path / "a")])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "a").exists()


def test_a_folder_given_as_weights_says_so(tmp_path, capsys):
    pytest.importorskip("torch")
    rc = main(["export", "--quiet", "--model", "anyloc-dinov2-gem@tiny", "--weights", str(tmp_path),
               "--output", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "is a folder; pass the checkpoint file inside it" in err
