"""Augmented views: view 0 is the plain image, others are seeded and fully described by their numbers."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_edge.distill import views as V
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.imaging.decode import load_rgb


@pytest.fixture(scope="module")
def rgb(corridor):
    return load_rgb(sorted((corridor / "database").glob("*.jpg"))[0])


def test_view_zero_is_the_plain_image(rgb):
    v = V.draw_view(3, 0, rgb.shape[:2], seed=7)
    assert (v.top, v.left, v.height, v.width, v.flip) == (0, 0, rgb.shape[0], rgb.shape[1], False)
    assert (v.brightness, v.contrast, v.saturation) == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(V.render(rgb, v), rgb)


def test_views_are_seeded_recorded_and_re_rendered_exactly(rgb):
    hw = rgb.shape[:2]
    a = V.draw_views(5, hw, 6, seed=1)
    assert a == V.draw_views(5, hw, 6, seed=1)
    assert a[1:] != V.draw_views(5, hw, 6, seed=2)[1:]
    assert a[1:] != V.draw_views(6, hw, 6, seed=1)[1:]  # per image
    cfg = V.ViewConfig()
    for v in a[1:]:
        assert 0 <= v.top and v.top + v.height <= hw[0] and 0 <= v.left and v.left + v.width <= hw[1]
        assert cfg.scale[0] * 0.9 <= v.height * v.width / (hw[0] * hw[1]) <= 1.0
        for f in (v.brightness, v.contrast, v.saturation):
            assert 0.7 <= f <= 1.3
        back = V.View.from_row(v.to_row())  # what the cache stores
        assert back == v
        out = V.render(rgb, back)
        assert out.dtype == np.uint8 and out.shape == (v.height, v.width, 3)
        np.testing.assert_array_equal(out, V.render(rgb, v))
    assert any(v.flip for v in V.draw_views(0, hw, 12, seed=0)[1:])


def test_photometric_definitions(rgb):
    h, w = rgb.shape[:2]
    base = dict(image=0, view=1, src_h=h, src_w=w, top=0, left=0, height=h, width=w)
    flipped = V.render(rgb, V.View(**base, flip=True))
    np.testing.assert_array_equal(flipped, rgb[:, ::-1])
    gray = V.render(rgb, V.View(**base, saturation=1e-9))  # saturation ~0: per-pixel grayscale
    assert np.abs(gray.astype(int) - gray[:, :, :1].astype(int)).max() <= 1
    bright = V.render(rgb, V.View(**base, brightness=1.2))
    np.testing.assert_array_equal(bright, np.clip(np.rint(rgb.astype(np.float32) * np.float32(1.2)), 0, 255).astype(np.uint8))
    flat = V.render(rgb, V.View(**base, contrast=1e-9))  # contrast ~0: the mean gray everywhere
    assert flat.max() - flat.min() <= 1


def test_refusals(rgb):
    v = V.draw_view(0, 1, (rgb.shape[0] + 1, rgb.shape[1]), seed=0)
    with pytest.raises(ArtifactError, match="changed since the teacher cache was built"):
        V.render(rgb, v, "img.jpg")
    with pytest.raises(ConfigError):
        V.ViewConfig(scale=(0.0, 1.0))
    with pytest.raises(ConfigError):
        V.ViewConfig(brightness=1.5)
