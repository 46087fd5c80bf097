"""The fast preprocessing: a camera frame -> the network input in a few milliseconds.

The exact path (`imaging.exact`) converts the whole frame to float and resizes each channel as a Pillow 'F'
image: faithful to torchvision to 4e-5, and 150-190 ms for a 1920x1080 JPEG on a server core. Here:
- JPEG frames are decoded at a reduced DCT scale (Pillow's `draft`, libjpeg(-turbo) decoding 1/2, 1/4 or
  1/8 of the pixels directly): the smallest scale whose size is still at least `DRAFT_OVERSAMPLE` x the
  resized size, so the bicubic filter still has more pixels than it outputs (measured in
  benchmarks/results/preprocess: 2x is where the descriptor agreement saturates);
- only the crop region is resized (`resize(..., box=...)`) with the same antialiased bicubic filter and the
  same geometry (`geometry.resize_plan`, mapped onto the drafted image): for float input (`fast_float`) each
  channel as a float image, as the exact path does, so nothing is rounded or clipped; for an artifact
  exported with `--input uint8` (`fast_rgb`) in uint8, HxWx3, and the graph normalises (so a GPU engine
  does it; `normalize` is the same arithmetic in numpy).
What it changes against the exact path is measured like any other stage (cosine and top-k agreement of the
descriptors) in benchmarks/preprocess.py; the exact path stays for verification (`--preprocess exact`).
Camera arrays (HxWx3 uint8) go straight to the uint8 resize (`imaging.prepare` turns BGR into RGB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vpr_edge.errors import ConfigError, InputError
from vpr_edge.imaging.decode import ImageSource, _check_pixels, _to_rgb_array, load_rgb
from vpr_edge.imaging.geometry import resize_plan
from vpr_edge.presets import Preprocess

DRAFT_OVERSAMPLE = 2.0  # decode at >= 2x the resized size (see module docstring)
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _open_drafted(path: Path, pre: Preprocess, max_pixels: int | None, oversample: float) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded RGB image, at a reduced DCT scale for JPEG, EXIF orientation applied; and the upright
    full-resolution size (h, w), which decides the resize plan (the drafted size is rounded)."""
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected an image file") from None
    except Exception:  # noqa: BLE001 - unidentified/corrupt: the exact loader words the error
        return _exact_fallback(path, max_pixels)
    with im:
        _check_pixels(str(path), im.size, max_pixels)
        if im.format != "JPEG" or im.mode not in ("RGB", "L", "YCbCr"):
            return _exact_fallback(path, max_pixels)  # no DCT scaling: the plain decode
        w, h = im.size
        full = (w, h) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)  # upright (h, w)
        (rh, rw), _ = resize_plan(full, pre)
        k = oversample * max(rh / full[0], rw / full[1])
        im.draft("RGB", (max(1, int(np.ceil(w * k))), max(1, int(np.ceil(h * k)))))
        try:
            im.load()
            up = ImageOps.exif_transpose(im)
            return (up if up.mode == "RGB" else Image.fromarray(_to_rgb_array(up))), full
        except (OSError, SyntaxError, ValueError, EOFError):
            return _exact_fallback(path, max_pixels)  # its error names the file


def _exact_fallback(path: Path, max_pixels: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """Files without DCT scaling, or that the drafted open cannot take: decoded (or refused, with the
    one-line error) by `load_rgb`."""
    rgb = load_rgb(path, max_pixels=max_pixels)
    return Image.fromarray(rgb), tuple(rgb.shape[:2])


def _decoded(source: ImageSource, pre: Preprocess, max_pixels: int | None, oversample: float):
    """(decoded RGB image, JPEGs at a reduced DCT scale; upright full-resolution size (h, w))."""
    if pre.interpolation not in _FILTERS:
        raise ConfigError(f"interpolation {pre.interpolation!r} is not supported; expected one of {sorted(_FILTERS)}")
    if isinstance(source, (np.ndarray, Image.Image)):
        rgb = load_rgb(source, max_pixels=max_pixels)  # validates dtype/shape, applies EXIF
        return Image.fromarray(rgb), tuple(rgb.shape[:2])
    if isinstance(source, (str, os.PathLike)):
        return _open_drafted(Path(source), pre, max_pixels, oversample)
    raise InputError(f"expected an image path, PIL image or uint8 array, got {type(source).__name__}")


def _crop_box(im: Image.Image, full: tuple[int, int], pre: Preprocess) -> tuple[tuple[int, int], tuple[float, ...]]:
    """((width, height) of the network input, the crop's box in the decoded image's pixels): the exact
    path's resize-then-crop (`resize_plan` on the full-resolution size) as one resize of a box."""
    (rh, rw), (top, left, ch, cw) = resize_plan(full, pre)
    sy, sx = im.size[1] / rh, im.size[0] / rw  # resized-image pixels -> decoded-image pixels
    return (cw, ch), (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)


def fast_rgb(
    source: ImageSource, pre: Preprocess, max_pixels: int | None = None, size: list | None = None,
    oversample: float = DRAFT_OVERSAMPLE,
) -> np.ndarray:
    """One image (path, PIL image, HxWx3 uint8 RGB array) -> uint8 [H, W, 3] at `pre.image_size`, resized
    and cropped as `resize_plan` says (for `--input uint8` artifacts). The upright source size (h, w) is
    appended to `size` when given; `oversample`: JPEGs are decoded at the smallest DCT scale giving at
    least this many pixels per output pixel."""
    im, full = _decoded(source, pre, max_pixels, oversample)
    if size is not None:
        size.append(full)
    out_size, box = _crop_box(im, full, pre)
    return np.asarray(im.resize(out_size, _FILTERS[pre.interpolation], box=box), dtype=np.uint8)


def fast_float(
    source: ImageSource, pre: Preprocess, max_pixels: int | None = None, size: list | None = None,
    oversample: float = DRAFT_OVERSAMPLE,
) -> np.ndarray:
    """The fast path to float32 [3, H, W], normalised: the drafted decode of `fast_rgb`, then each channel
    of the crop box resized as a float ('F') image, as the exact path resizes, so nothing is rounded to
    uint8 or clipped (uint8 resizing moved hard-VLAD descriptors by up to cos 0.68 on Corridor; an image
    not drafted, a PNG or a JPEG too small to reduce, then equals the exact path up to float rounding).
    Converting a channel to 'F' in Pillow is ~2x faster than numpy's float copy of the frame."""
    im, full = _decoded(source, pre, max_pixels, oversample)
    if size is not None:
        size.append(full)
    (cw, ch), box = _crop_box(im, full, pre)
    flt = _FILTERS[pre.interpolation]
    out = np.empty((3, ch, cw), dtype=np.float32)
    scale = np.float32(1.0 / 255.0)
    for c, band in enumerate(im.split()):
        out[c] = np.asarray(band.convert("F").resize((cw, ch), flt, box=box), dtype=np.float32) * scale
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return (out - mean) / std


def normalize(rgb: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] normalised with the preset's mean/std (the same float32
    constants and order of operations as the graph of a uint8-input artifact: `engines.uint8_input`)."""
    mean = np.asarray(pre.mean, dtype=np.float32) * np.float32(255.0)
    inv = np.float32(1.0) / (np.asarray(pre.std, dtype=np.float32) * np.float32(255.0))
    return np.ascontiguousarray(np.moveaxis((rgb.astype(np.float32) - mean) * inv, -1, -3))


def preprocess_fast(source: ImageSource, pre: Preprocess, max_pixels: int | None = None) -> np.ndarray:
    """The fast path as float32 [3, H, W] (for artifacts that take normalised float input)."""
    return fast_float(source, pre, max_pixels)
