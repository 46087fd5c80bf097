"""Teacher cache: contents match the teacher, resume loses and recomputes nothing, refusals are one line."""

from __future__ import annotations

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
import torch

from vpr_edge.distill import views as V
from vpr_edge.distill.cache import MANIFEST, SHARDS, build_cache, open_cache, sha256_file
from vpr_edge.distill.toy import NumpyTeacher, toy_teacher
from vpr_edge.errors import ArtifactError, InputError
from vpr_edge.imaging.decode import load_rgb
from vpr_edge.imaging.exact import preprocess_rgb

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def teacher(imgs):
    return toy_teacher(imgs[:4])  # anyloc-dinov2@tiny, random weights, vocabulary fitted on 4 images


class Counting:
    """Wraps a teacher and counts the images it is asked about."""

    def __init__(self, inner):
        self._inner = inner
        self.seen = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, x):
        self.seen += len(x)
        return self._inner(x)


@pytest.fixture(scope="module")
def built(tmp_path_factory, imgs, teacher):
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(imgs, teacher, out, views=2, seed=3, shard_size=2, progress=False, batch_size=3)
    return out


def _files(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in sorted((folder / SHARDS).iterdir())}


def test_cache_holds_every_view_as_the_teacher_computed_it(built, teacher, imgs):
    c = open_cache(built, expect_space=teacher.space)
    top = json.loads((built / MANIFEST).read_text())
    assert (top["format"], top["kind"]) == ("vpr-edge-manifest", "teacher-cache")  # the one manifest format
    assert top["space"] == teacher.space and top["identity"] == teacher.identity
    m = top["details"]
    assert (m["format"], m["format_version"], m["kind"]) == ("vpr-edge-teacher-cache", 1, "teacher-cache")
    assert m["teacher"]["identity"] == teacher.identity and m["views"]["count"] == 2
    for name, info in top["files"].items():  # every file of the cache is listed with its sha256
        assert sha256_file(built / name) == info["sha256"]
    assert len(c) == 12 and c.items.tolist() == [[i, v] for i in range(6) for v in range(2)]
    assert [s["items"] for s in m["shard_list"]] == [4, 4, 4]
    for s in m["shard_list"]:  # sizes and hashes in the manifest are those of the files
        for info in s["files"].values():
            p = built / SHARDS / info["name"]
            assert p.stat().st_size == info["bytes"] and sha256_file(p) == info["sha256"]
    assert all(e["sha256"] == sha256_file(Path(m["images"]["root"]) / e["path"]) for e in m["images"]["files"])
    np.testing.assert_array_equal(c.centers, teacher.centers)
    from vpr_edge.models.vlad import HardVLAD

    vlad = HardVLAD(torch.from_numpy(teacher.centers))
    for i in (0, 3, 11):
        item = c[i]
        v = item["view"]
        assert isinstance(item["features"], np.memmap) or isinstance(item["features"].base, np.memmap)
        assert item["features"].dtype == np.float16 and item["assign"].dtype == np.uint8
        x = preprocess_rgb(V.render(load_rgb(imgs[v.image]), v), teacher.preprocess)[None]
        f, d = teacher(x)
        np.testing.assert_allclose(item["features"].astype(np.float32), f[0], atol=1e-3)
        np.testing.assert_array_equal(item["descriptor"], d[0])
        np.testing.assert_array_equal(item["assign"], vlad.assign(torch.from_numpy(f)).numpy()[0])
    # view 0 is what the reference computes for the plain image (torch preprocessing path)
    from vpr_edge.models.build import describe_paths

    ref = describe_paths(teacher.model, imgs[:2], progress=False)
    for k in range(2):
        d0 = c.descriptor(2 * k)
        assert float(d0 @ ref[k]) > 0.99


def test_a_failed_build_resumes_without_losing_or_recomputing_shards(tmp_path, imgs, teacher, built):
    out = tmp_path / "c"

    def fail_after_second(k):
        if k == 1:
            raise RuntimeError("injected failure after shard 1")

    first = Counting(teacher)
    with pytest.raises(RuntimeError, match="injected"):
        build_cache(imgs, first, out, views=2, seed=3, shard_size=2, progress=False, on_shard=fail_after_second)
    assert first.seen == 8
    assert (out / SHARDS / "00001.json").exists() and not (out / SHARDS / "00002.json").exists()
    with pytest.raises(ArtifactError, match="unfinished teacher cache build"):
        open_cache(out)
    before = _files(out)
    (out / SHARDS / ".00002.features.npy.abc.partial").write_bytes(b"half")  # what a kill leaves
    again = Counting(teacher)
    c = build_cache(imgs, again, out, views=2, seed=3, shard_size=2, progress=False)
    assert again.seen == 4  # only shard 2's two images x two views
    after = _files(out)
    assert all(after[name] == before[name] for name in before), "a committed shard was rewritten"
    assert not list((out / SHARDS).glob(".*.partial"))
    ref = open_cache(built)
    for i in range(len(ref)):
        np.testing.assert_array_equal(c.features(i), ref.features(i))
        np.testing.assert_array_equal(c.descriptor(i), ref.descriptor(i))
    # a complete cache: building again returns it without running the teacher
    third = Counting(teacher)
    build_cache(imgs, third, out, views=2, seed=3, shard_size=2, progress=False)
    assert third.seen == 0 and _files(out) == after


_KILL_SCRIPT = """
import sys
from vpr_edge.distill.cache import build_cache
from vpr_edge.distill.toy import NumpyTeacher
build_cache(sys.argv[2:], NumpyTeacher(delay=0.4), sys.argv[1], views=2, shard_size=1, progress=False)
"""


def test_a_killed_build_resumes(tmp_path, imgs):
    out = tmp_path / "c"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), *map(str, imgs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (out / SHARDS / "00001.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the build never committed two shards"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    committed = sorted(p.name for p in (out / SHARDS).glob("*.json"))
    assert 2 <= len(committed) < len(imgs)
    before = _files(out)
    t = NumpyTeacher()
    c = build_cache(imgs, t, out, views=2, shard_size=1, progress=False)
    assert sum(t.calls) == 2 * (len(imgs) - len(committed))
    after = _files(out)
    for name in before:  # committed shards untouched; arrays of the shard being written may be redone
        if name.split(".")[0] + ".json" in committed:
            assert after[name] == before[name], name
    fresh = build_cache(imgs, NumpyTeacher(), tmp_path / "fresh", views=2, shard_size=1, progress=False)
    assert len(c) == len(fresh) == 12
    for i in range(len(c)):
        np.testing.assert_array_equal(c.features(i), fresh.features(i))


def test_refusals(tmp_path, built, teacher, imgs):
    with pytest.raises(ArtifactError, match=r"teacher cache .* and the expected teacher are in different descriptor spaces \(weights"):
        open_cache(built, expect_space=teacher.space | {"weights": "random:seed=9"})
    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    feat = bad / SHARDS / "00001.features.npy"
    data = feat.read_bytes()
    feat.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ArtifactError, match=rf"{feat}.* truncated .* delete .*00001.json and re-run"):
        open_cache(bad, verify="size")
    flipped = bytearray(data)
    flipped[-7] ^= 0xFF
    feat.write_bytes(bytes(flipped))  # same size, other content
    open_cache(bad, verify="size")
    with pytest.raises(ArtifactError, match=rf"{feat} does not match its recorded sha256"):
        open_cache(bad)
    man = json.loads((built / MANIFEST).read_text())
    for change, msg in (({"kind": "onnx"}, "'onnx' manifest, not a teacher cache"),
                        ({"format_version": 3}, "upgrade vpr-edge"),
                        ({"format": "something"}, "is not a vpr-edge manifest"),
                        ({"details": {**man["details"], "format_version": 2}}, "records of format")):
        (bad / MANIFEST).write_text(json.dumps(man | change))
        with pytest.raises(ArtifactError, match=msg):
            open_cache(bad)
    with pytest.raises(ArtifactError, match=r"another plan \(views differ\)"):
        build_cache(imgs, teacher, built, views=3, seed=3, shard_size=2, progress=False)
    with pytest.raises(ArtifactError, match="not a teacher cache"):
        open_cache(tmp_path)


def test_unreadable_images_are_reported_and_skipped_empty_folders_refused(tmp_path, imgs):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in imgs[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "0000001b.jpg").write_bytes(b"not a jpeg")
    lines: list[str] = []
    c = build_cache(folder, NumpyTeacher(), tmp_path / "c", views=2, progress=False, report=lines.append)
    assert len(lines) == 1 and "0000001b.jpg" in lines[0] and "\n" not in lines[0]
    assert len(c) == 4 and c.head["kind"] == "gem" and c.centers is None
    assert [s["path"] for s in c.manifest["skipped"]] == ["0000001b.jpg"]
    assert [c.image_files[i] for i in np.unique(c.items[:, 0])] == [imgs[0].name, imgs[1].name]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=rf"{empty}: no images found"):
        build_cache(empty, NumpyTeacher(), tmp_path / "c2", progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    for n in ("a.jpg", "b.png"):
        (junk / n).write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match=r"none of the 2 images could be read"):
        build_cache(junk, NumpyTeacher(), tmp_path / "c3", progress=False, report=lambda s: None)
    assert not (tmp_path / "c3").exists()


def test_nordland_frames_build_a_cache(tmp_path):
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "nordland-summer"
    files = sorted(folder.glob("images-*.png"))[100:104]
    if not files:
        pytest.skip(f"Nordland frames not found under {folder}")
    c = build_cache(files, NumpyTeacher(), tmp_path / "c", views=3, progress=False, workers=2, batch_size=5)
    ref = build_cache(files, NumpyTeacher(), tmp_path / "ref", views=3, progress=False)
    for i in range(len(ref)):  # threads prepare images ahead; order and results do not change
        np.testing.assert_array_equal(c.features(i), ref.features(i))
    assert len(c) == 12 and c.view(1).src_h == 32 and c.view(1).src_w == 64
