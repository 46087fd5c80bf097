"""Numpy/Pillow preprocessing: geometry, decoding policy, error cases, and agreement with torch."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from PIL import Image

from vpr_edge import presets
from vpr_edge.errors import ConfigError, InputError
from vpr_edge.presets import Preprocess
from vpr_edge.imaging.decode import load_rgb
from vpr_edge.imaging import preprocess_image, preprocess_rgb, resize_plan

SQUARE = Preprocess(image_size=(224, 224), resize="cover_crop")
# Measured against vpr_edge.models.preprocess on all 222 Corridor images (torch 2.14,
# torchvision 0.29, Pillow 13): max |numpy - torch| = 3.4e-05 (224 cover-crop), 3.0e-05 (112x154),
# 3.6e-05 (322 stretch), 4.1e-05 (384 stretch) after normalisation, i.e. <= 9.4e-06 in [0, 1]
# pixel units. The tolerance leaves room for other library versions while staying far below one
# 8-bit level (1/255/0.225 = 0.017).
TOL_NORMALISED = 1e-4


# -- geometry ------------------------------------------------------------------------------------
def test_resize_plan_known_answers():
    # Corridor 120x160 -> 224: shorter side 224, longer int(224*160/120) = 298, left = round(37.0)
    assert resize_plan((120, 160), SQUARE) == ((224, 298), (0, 37, 224, 224))
    # portrait
    assert resize_plan((160, 120), SQUARE) == ((298, 224), (37, 0, 224, 224))
    # tiny AnyLoc 112x154: width decides (154/160 > 112/120), h = 120*154//160 = 115, top = round(1.5) = 2
    tiny = Preprocess(image_size=(112, 154))
    assert resize_plan((120, 160), tiny) == ((115, 154), (2, 0, 112, 154))
    # ties go to even like Python's round (torchvision's CenterCrop arithmetic): (225-224)/2 = 0.5 -> 0
    assert resize_plan((224, 225), SQUARE) == ((224, 225), (0, 0, 224, 224))
    assert resize_plan((224, 227), SQUARE) == ((224, 227), (0, 2, 224, 224))  # 1.5 -> 2
    stretch = Preprocess(image_size=(322, 322), resize="stretch")
    assert resize_plan((120, 160), stretch) == ((322, 322), (0, 0, 322, 322))
    with pytest.raises(ConfigError):
        resize_plan((10, 10), dataclasses.replace(SQUARE, resize="letterbox"))


def test_resize_plan_matches_torchvision_resize_and_center_crop():
    torch = pytest.importorskip("torch")
    TF = pytest.importorskip("torchvision.transforms.v2.functional")
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(30, 700, size=2))
        size = int(rng.integers(20, 400))
        pre = Preprocess(image_size=(size, size))
        (rh, rw), (top, left, ch, cw) = resize_plan((h, w), pre)
        t = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
        resized = TF.resize(t, size, interpolation=TF.InterpolationMode.NEAREST)  # shorter side = size
        assert tuple(resized.shape[1:]) == (rh, rw), (h, w, size)
        ref = TF.center_crop(resized, [size, size])
        assert torch.equal(ref, resized[:, top : top + ch, left : left + cw]), (h, w, size)


def test_cover_crop_covers_non_square_targets():
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w, th, tw = (int(v) for v in rng.integers(14, 900, size=4))
        (rh, rw), (top, left, ch, cw) = resize_plan((h, w), Preprocess(image_size=(th, tw)))
        assert (ch, cw) == (th, tw)
        assert rh >= th and rw >= tw and (rh == th or rw == tw)
        assert 0 <= top <= rh - th and 0 <= left <= rw - tw
        # aspect ratio kept to within the floor's rounding
        assert abs(rh * w - rw * h) <= max(h, w)


# -- agreement with the torch reference ----------------------------------------------------------
def _torch_reference(path, pre):
    """vpr_edge.models.preprocess when it imports, else the same recipe spelled out with torchvision."""
    try:
        from vpr_edge.models.preprocess import load_tensor

        return load_tensor(path, pre).numpy(), "vpr_edge.models.preprocess"
    except ImportError:
        import torch
        from torchvision.transforms.v2 import functional as TF

        t = torch.from_numpy(load_rgb(path).copy()).permute(2, 0, 1).float() / 255.0
        (rh, rw), (top, left, h, w) = resize_plan(tuple(t.shape[1:]), pre)
        t = TF.resize(t, [rh, rw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        t = TF.normalize(t[:, top : top + h, left : left + w], list(pre.mean), list(pre.std))
        return t.numpy(), "torchvision"


@pytest.mark.parametrize(
    "pre",
    [
        SQUARE,
        presets.get("anyloc-dinov2").tiny().preprocess,
        presets.get("boq-dinov2").preprocess,  # stretch 322x322 (upsampling)
        Preprocess(image_size=(56, 70), resize="cover_crop"),  # strong downsampling
    ],
    ids=["cover224", "cover112x154", "stretch322", "cover56x70"],
)
def test_numpy_preprocessing_matches_torch_on_corridor(corridor, pre):
    pytest.importorskip("torchvision")
    files = sorted((corridor / "database").glob("*.jpg"))
    worst = 0.0
    for f in files:
        ours = preprocess_image(f, pre)
        ref, _ = _torch_reference(f, pre)
        assert ours.shape == ref.shape == (3, *pre.image_size) and ours.dtype == np.float32
        worst = max(worst, float(np.max(np.abs(ours - ref))))
    assert worst < TOL_NORMALISED, f"max |numpy - torch| = {worst:.3g}"


def test_uint8_resize_would_not_match():
    """Guards the reason for float resizing: a uint8 Pillow resize is off by ~1/255 levels."""
    pre = SQUARE
    rgb = (np.random.default_rng(2).random((120, 160, 3)) * 255).astype(np.uint8)
    ours = preprocess_rgb(rgb, pre)
    (rh, rw), (top, left, h, w) = resize_plan((120, 160), pre)
    u8 = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    u8 = (u8[top : top + h, left : left + w] - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    assert np.max(np.abs(ours - u8.transpose(2, 0, 1))) > 0.01


def test_preprocess_rejects_unsupported_settings():
    rgb = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ConfigError, match="interpolation"):
        preprocess_rgb(rgb, dataclasses.replace(SQUARE, interpolation="lanczos"))
    with pytest.raises(ConfigError, match="antialias"):
        preprocess_rgb(rgb, dataclasses.replace(SQUARE, antialias=False))


# -- decoding policy -----------------------------------------------------------------------------
def _rgb(h=24, w=32, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = _rgb()[:, :, 0]
    Image.fromarray(g).save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[:, :, c], g) for c in range(3))


def test_rgba_alpha_is_dropped(tmp_path):
    rgba = np.concatenate([_rgb(), np.full((24, 32, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.array_equal(load_rgb(tmp_path / "a.png"), rgba[:, :, :3])
    Image.fromarray(rgba[:, :, [0, 3]]).save(tmp_path / "la.png")  # LA
    assert np.array_equal(load_rgb(tmp_path / "la.png")[:, :, 1], rgba[:, :, 0])


def test_palette_with_transparency_converts_without_warning(tmp_path):
    im = Image.fromarray(_rgb()).convert("P")
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_rgb(tmp_path / "p.png")
    ref = np.asarray(Image.open(tmp_path / "p.png").convert("RGBA").convert("RGB"))
    assert np.array_equal(out, ref)


def test_cmyk_uses_pillows_conversion(tmp_path):
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "c.jpg")
    out = load_rgb(tmp_path / "c.jpg")
    assert out.shape == (24, 32, 3)
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(v).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = load_rgb(tmp_path / "d.png")
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(out[:, :, 0], out[:, :, 2])


def test_exif_orientation_is_applied(tmp_path):
    rgb = _rgb(20, 40)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "o.jpg")
    assert out.shape == (40, 20, 3)


def test_array_and_pil_inputs():
    rgb = _rgb()
    assert np.array_equal(load_rgb(rgb), rgb)
    assert np.array_equal(load_rgb(np.concatenate([rgb, rgb[:, :, :1]], axis=2)), rgb)
    assert load_rgb(rgb[:, :, 0]).shape == (24, 32, 3)
    assert np.array_equal(load_rgb(Image.fromarray(rgb)), rgb)
    with pytest.raises(InputError, match="uint8"):
        load_rgb(rgb.astype(np.float32))
    with pytest.raises(InputError, match="shape"):
        load_rgb(np.zeros((4, 4, 2), np.uint8))


# -- error cases ----------------------------------------------------------------------------------
def test_corrupt_file_is_one_line_input_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not an image" * 10)
    with pytest.raises(InputError) as e:
        load_rgb(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_truncated_file_is_input_error(tmp_path):
    Image.fromarray(_rgb(200, 200)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.jpg: unreadable image"):
        load_rgb(cut)
    png = tmp_path / "full.png"
    Image.fromarray(_rgb(200, 200)).save(png)
    (tmp_path / "cut.png").write_bytes(png.read_bytes()[:-300])
    with pytest.raises(InputError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_rgb(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="folder"):
        load_rgb(tmp_path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "big.png")
    # explicit limit
    with pytest.raises(InputError, match="decompression-bomb limit of 5000"):
        load_rgb(tmp_path / "big.png", max_pixels=5000)
    # Pillow's global limit: between 1x and 2x Pillow only warns; we refuse
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(InputError, match="big.png"):
            load_rgb(tmp_path / "big.png")
    # above 2x Pillow raises DecompressionBombError itself
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="decompression"):
        load_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_rgb(tmp_path / "big.png").shape == (100, 100, 3)
