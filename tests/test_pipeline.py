"""Camera-speed input (issue 14): the fast preprocessing against the exact one, camera arrays, the pipelined
stream (order, errors in place, bounded read-ahead), uint8-input artifacts, frame sources and `vpr-edge run`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toy_artifact import write_toy_artifact
from vpr_edge import fidelity, presets
from vpr_edge.errors import ConfigError, InputError
from vpr_edge.imaging import prepare, preprocess_image
from vpr_edge.imaging.fast import fast_rgb, normalize

PRESETS = ("anyloc-dinov2", "boq-dinov2", "boq-resnet50")  # 224 cover-crop, 322 and 384 stretch


@pytest.fixture(scope="module")
def queries(corridor):
    return sorted((corridor / "queries").iterdir())


@pytest.fixture(scope="module")
def database(corridor):
    return sorted((corridor / "database").iterdir())


@pytest.fixture(scope="module")
def frames(tmp_path_factory, queries):
    """Full-resolution camera-like frames: Corridor queries upscaled to 1920x1080, JPEG quality 90."""
    folder = tmp_path_factory.mktemp("frames")
    out = []
    for p in queries[:6]:
        dst = folder / p.name
        Image.open(p).convert("RGB").resize((1920, 1080), Image.Resampling.BICUBIC).save(dst, quality=90)
        out.append(dst)
    return out


# -- the fast preprocessing ----------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_fast_is_close_to_exact_on_corridor_and_full_resolution_frames(name, queries, frames):
    """Per-pixel difference in normalised units. Float layout (float resize of the drafted decode): an image
    too small to draft (Corridor's 160x120) is the exact path up to float rounding (measured 2.2e-5); a 1080p JPEG differs by what DCT draft decoding
    changes (measured mean 0.0014, max 0.016 at 224 px; 384 px decodes in full: 1e-6). uint8 layout
    (uint8 resize, what --input uint8 artifacts get): mean 0.0044-0.0053 (uint8 rounding, ~0.25 of one
    8-bit level = 0.017), 99th percentile <= 0.016, max 0.4 where upsampling a 160x120 image overshoots
    and uint8 clips it."""
    pre = presets.get(name).preprocess
    for f in queries[:12]:
        assert np.abs(prepare(f, pre, "fast") - preprocess_image(f, pre)).max() < 1e-4, (name, f)
    for f in frames:
        d = np.abs(prepare(f, pre, "fast") - preprocess_image(f, pre))
        assert d.mean() < 0.003 and d.max() < 0.05, (name, f, d.mean(), d.max())
    for files in (queries[:12], frames):
        for f in files:
            d = np.abs(normalize(prepare(f, pre, "fast", "uint8"), pre) - preprocess_image(f, pre))
            assert d.mean() < 0.008, (name, f, d.mean())
            assert np.percentile(d, 99) < 0.03, (name, f)
    for f in frames:  # downscaling a camera frame: no clipping, every pixel within a few 8-bit levels
        assert np.abs(normalize(prepare(f, pre, "fast", "uint8"), pre) - preprocess_image(f, pre)).max() < 0.1


def test_fast_descriptors_agree_with_exact(tmp_path, queries, database, frames):
    """Through a (toy) artifact: BoQ-like descriptor cosine >= 0.9999 and the same top-1 on Corridor."""
    pre = presets.get("boq-dinov2@tiny")
    art = write_toy_artifact(tmp_path / "boq", pre, "descriptor")
    from vpr_edge.runtime.describer import Describer

    with Describer.from_artifact(art) as exact, Describer.from_artifact(art, preprocess="fast") as fast:
        assert (exact.preprocess_mode, fast.preprocess_mode) == ("exact", "fast")
        images = list(queries) + list(database) + list(frames)
        a, b = exact.describe(images), fast.describe(images)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.999, cos.min()
    nq = len(queries)
    db_a = a[nq : nq + len(database)]
    same = fidelity.rank_database(db_a, a[:nq], 1)[:, 0] == fidelity.rank_database(db_a, b[:nq], 1)[:, 0]
    assert same.all()


def test_camera_arrays_rgb_and_bgr(queries):
    pre = presets.get("anyloc-dinov2").preprocess
    rgb = np.asarray(Image.open(queries[0]).convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    for mode in ("exact", "fast"):
        want = prepare(rgb, pre, mode)
        np.testing.assert_array_equal(prepare(bgr, pre, mode, channels="bgr"), want)
        assert not np.array_equal(prepare(bgr, pre, mode), want)  # the stated order matters
    u8 = prepare(rgb, pre, "fast", "uint8")
    assert u8.dtype == np.uint8 and u8.shape == (224, 224, 3)
    assert np.abs(normalize(u8, pre) - prepare(rgb, pre, "fast")).mean() < 0.01  # uint8 rounding apart
    with pytest.raises(InputError, match="uint8 image array"):
        prepare(rgb.astype(np.float32), pre, "fast")
    with pytest.raises(ConfigError, match="only the fast preprocessing"):
        prepare(rgb, pre, "exact", "uint8")
    with pytest.raises(ConfigError, match="channels"):
        prepare(rgb, pre, "fast", channels="rgba")


def test_fast_applies_exif_orientation_and_reports_the_upright_size(tmp_path, queries):
    pre = presets.get("anyloc-dinov2").preprocess
    upright = Image.open(queries[0]).convert("RGB").resize((1280, 960))
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways, tagged "rotate 270 to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=95)
    size: list = []
    got = fast_rgb(tmp_path / "tagged.jpg", pre, size=size)
    assert size == [(960, 1280)]
    want = fast_rgb(tmp_path / "upright.jpg", pre)
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 2.0  # same pixels up to JPEG re-encoding


def test_fast_errors_name_the_file(tmp_path):
    pre = presets.get("anyloc-dinov2").preprocess
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    for path, msg in ((bad, "broken.jpg: not an image"), (tmp_path / "missing.jpg", "missing.jpg: image file not found"),
                      (tmp_path, "is a folder")):
        with pytest.raises(InputError, match=msg):
            prepare(path, pre, "fast")
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (640, 480), (90, 120, 30)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:400])
    with pytest.raises(InputError, match="truncated.jpg"):
        prepare(truncated, pre, "fast")


# -- the pipeline --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_artifact(tmp_path_factory.mktemp("toy") / "anyloc", presets.get("anyloc-dinov2@tiny"), "backbone")


def test_stream_keeps_order_reports_a_corrupt_image_and_goes_on(toy, queries, tmp_path):
    from vpr_edge.runtime.describer import Describer

    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"garbage")
    items = list(queries[:9]) + [bad] + list(queries[9:20])
    taken: list[int] = []

    def camera():  # a generator: the stream must not need a list
        for i, it in enumerate(items):
            taken.append(i)
            yield it

    with Describer.from_artifact(toy, workers=3) as d:
        ref = np.stack([d.describe([p], batch=1)[0] for p in queries[:20]])
        for batch in (1, 4):
            taken.clear()
            got = []
            for r in d.stream(camera(), batch=batch):
                got.append(r)
                assert len(taken) - r.index <= 2 * max(batch, 3) + batch  # read-ahead is bounded
            assert [r.index for r in got] == list(range(len(items)))
            assert [r.item for r in got] == items
            assert not got[9].ok and "corrupt.jpg" in got[9].error and got[9].descriptor is None
            desc = np.stack([r.descriptor for r in got if r.ok])
            np.testing.assert_allclose(desc, ref, atol=1e-6)
            assert all(r.latency_s >= 0 for r in got)
        with pytest.raises(InputError, match="corrupt.jpg"):
            d.describe(items)


def test_stream_with_sizes_and_raw_features(toy, queries):
    from vpr_edge.runtime.describer import Describer

    with Describer.from_artifact(toy, workers=2) as d:
        out = list(d.stream(queries[:5], batch=2, keep_raw=True, sizes=True))
        n, dim = d.preset.grid()[0] * d.preset.grid()[1], d.preset.feature_dim
    assert all(r.size == (120, 160) and r.raw.shape == (n, dim) for r in out)


# -- uint8-input artifacts -----------------------------------------------------------------------
@pytest.mark.parametrize("precision,io", [("fp32", "float32"), ("fp16", "float16")])
def test_uint8_input_artifact_equals_the_float_one_fed_the_same_pixels(precision, io, tmp_path, queries, frames):
    pytest.importorskip("torch")
    from vpr_edge.artifact import load_artifact
    from vpr_edge.export.artifact import ExportOptions, export_artifact
    from vpr_edge.runtime.describer import Describer

    preset = presets.get("anyloc-dinov2-vits14@tiny")
    arts = {}
    for layout in ("float", "uint8"):
        opts = ExportOptions(precision=precision, scope="backbone", input=layout, io_dtype=io, progress=False)
        export_artifact(preset, tmp_path / layout, options=opts)
        arts[layout] = tmp_path / layout
    art = load_artifact(arts["uint8"])
    assert art.input_layout == "uint8" and art.manifest.inputs[0]["dtype"] == "uint8"
    assert art.manifest.inputs[0]["shape"][1:] == [*preset.preprocess.image_size, 3]
    rec = art.manifest.verification["uint8_input"]
    assert rec["passed"] and rec["rel_err"] <= (1e-5 if io == "float32" else 2e-3)
    assert art.manifest.details["tensorrt_check"]["ok"], art.manifest.details["tensorrt_check"]
    images = list(queries[:8]) + list(frames[:2])
    pre = preset.preprocess
    pixels = np.stack([fast_rgb(p, pre) for p in images])
    with Describer.from_artifact(arts["float"]) as f, Describer.from_artifact(arts["uint8"]) as u:
        assert u.preprocess_mode == "fast"  # the only one a uint8 artifact takes
        want = f.forward(normalize(pixels, pre))
        tol = 1e-6 if io == "float32" else 2e-3  # see export.artifact.UINT8_TOLERANCE
        np.testing.assert_allclose(u.forward(pixels), want, atol=tol)
        np.testing.assert_allclose(u.describe(images), want, atol=tol)  # files: the fast path feeds uint8
        with pytest.raises(InputError, match="uint8 images"):
            u.forward(normalize(pixels, pre))
    with pytest.raises(ConfigError, match="only the fast preprocessing"):
        Describer.from_artifact(arts["uint8"], preprocess="exact")


# -- sources and the camera loop -----------------------------------------------------------------
def test_following_a_folder_takes_files_once_complete_in_order(tmp_path, queries):
    from vpr_edge.runtime.sources import folder_frames

    live = tmp_path / "live"
    live.mkdir()

    def camera():
        for p in queries[:5]:
            (live / p.name).write_bytes(p.read_bytes())
            time.sleep(0.15)
        (live / "notes.txt").write_text("not an image")

    t = threading.Thread(target=camera)
    t.start()
    got = [name for name, _ in folder_frames(live, follow=True, poll_s=0.05, idle_s=1.0)]
    t.join()
    assert [Path(n).name for n in got] == [p.name for p in queries[:5]]


def _cli(*argv: str) -> int:
    from vpr_edge.cli.main import main

    return main(list(argv))


def test_run_on_a_folder_and_a_video(toy, queries, database, tmp_path, capsys):
    from vpr_edge.runtime.maps import build_map

    m = build_map(database[:30], toy, tmp_path / "map", progress=False, threads=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    for p in queries[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_corrupt.jpg").write_bytes(b"garbage")
    out = tmp_path / "places.jsonl"
    assert _cli("run", str(m.folder), str(folder), "--output", str(out), "--threads", "1") == 1  # one frame failed
    text = capsys.readouterr()
    assert "zz_corrupt.jpg" in text.err and "5 frames, 1 unreadable" in text.out
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(5)) and "error" in lines[4]
    assert all(x["results"][0]["file"].endswith(".jpg") and x["latency_ms"] > 0 for x in lines[:4])
    assert not (tmp_path / "places.jsonl.partial").exists()
    assert _cli("run", str(m.folder), str(folder), "--output", str(out)) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err

    av = pytest.importorskip("av")
    video = tmp_path / "drive.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for p in queries[:6]:
            frame = av.VideoFrame.from_ndarray(np.asarray(Image.open(p).convert("RGB")), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert _cli("run", str(m.folder), str(video), "--every", "2", "--top-k", "3", "--quiet", "--output",
                str(tmp_path / "video.jsonl")) == 0
    lines = [json.loads(x) for x in (tmp_path / "video.jsonl").read_text().splitlines()]
    assert [x["name"].rsplit("#", 1)[1] for x in lines] == ["0", "2", "4"] and len(lines[0]["results"]) == 3
    assert "3 frames, 0 unreadable" in capsys.readouterr().out


def test_run_refuses_bad_sources(toy, database, tmp_path, capsys):
    from vpr_edge.runtime.maps import build_map

    m = build_map(database[:8], toy, tmp_path / "map", progress=False, threads=1)
    (tmp_path / "notes.txt").write_text("x")
    for source, msg in ((tmp_path / "nope", "no such folder or video file"),
                        (tmp_path / "notes.txt", "expected a folder of images or a video file")):
        assert _cli("run", str(m.folder), str(source)) == 2
        assert msg in capsys.readouterr().err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    pytest.importorskip("av")
    assert _cli("run", str(m.folder), str(broken)) == 2
    assert "broken.mp4: not a video FFmpeg can open" in capsys.readouterr().err


# -- memory and graph rewrites -------------------------------------------------------------------
def test_default_batch_follows_the_memory_estimate(toy):
    from vpr_edge.runtime.describer import Describer
    from vpr_edge.runtime.memory import DEFAULT_BUDGET_BYTES, activation_bytes, default_batch

    dino = presets.get("anyloc-dino")  # 3025 tokens at stride 4: measured 1.15 GB per image
    assert 1.0e9 < activation_bytes(dino) < 2.0e9 and default_batch(dino) == 1
    assert default_batch(presets.get("anyloc-dinov2-vits14")) == 8
    assert default_batch(presets.get("anyloc-dinov2")) * activation_bytes(presets.get("anyloc-dinov2")) <= DEFAULT_BUDGET_BYTES
    assert default_batch(dino, budget_bytes=1) == 1  # never below one image
    with Describer.from_artifact(toy) as d:
        assert d.default_batch == default_batch(d.preset) == 8


def test_fp32_export_rewrites_are_recorded_and_exact():
    pytest.importorskip("torch")
    from vpr_edge.export.artifact import ExportOptions, export_artifact

    preset = presets.get("anyloc-dinov2-vits14@tiny")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = export_artifact(preset, Path(tmp) / "a", options=ExportOptions(scope="backbone", progress=False))
    blocks = preset.facet.layer  # full blocks computed before the facet's block
    rw = m.details["graph"]["rewrites"]
    assert rw == {"gelu_reordered_for_ort_fusion": blocks, "layerscale_folded_into_weights": 2 * blocks}
    assert m.verification["fp32"]["report"]["rel_err"] < 1e-5 and m.verification["fp32"]["passed"]


def test_ort_threads_spin_or_sleep_as_asked(toy, queries):
    from vpr_edge import onnxrt
    from vpr_edge.errors import ConfigError
    from vpr_edge.runtime.backends import BackendOptions
    from vpr_edge.runtime.describer import Describer

    out = {}
    for choice, entry in (("on", ""), ("off", "0")):  # 'on' leaves ORT's default (spinning) untouched
        with Describer.from_artifact(toy, threads=2, workers=1, spin=choice) as d:
            opts = d.backend.session.get_session_options()
            try:
                got = opts.get_session_config_entry(onnxrt.ALLOW_SPINNING)
            except Exception:  # noqa: BLE001 - ORT's untyped "does not have configuration with key"
                got = ""
            assert got == entry, choice
            assert d.backend.describe()["spin"] == choice
            out[choice] = d.describe(queries[:3], batch=1)
    np.testing.assert_array_equal(out["on"], out["off"])  # a scheduling choice only
    with pytest.raises(ConfigError, match="spin must be one of on, off, got 'sometimes'"):
        Describer.from_artifact(toy, options=BackendOptions(spin="sometimes"))
