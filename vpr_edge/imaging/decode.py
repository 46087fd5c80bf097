"""Decoding images to HxWx3 uint8 RGB with Pillow: one policy for the runtime and the reference.

- EXIF orientation is applied (a phone or robot camera image tagged "rotate 90" is fed upright).
- Alpha is dropped, not composited: the result equals `Image.open(p).convert("RGB")`, which is
  what the AnyLoc and BoQ evaluation code does.
- Palette images with transparency go through RGBA first (Pillow warns otherwise); L, LA, 1,
  CMYK, YCbCr, ... use Pillow's own conversion to RGB.
- 16-bit images (I;16*, and 32-bit 'I', which Pillow's PNG/TIFF decoders produce for 16-bit data)
  are scaled to 8 bits with round(v * 255 / 65535); float 'F' images are rounded and clipped to
  0..255 (Pillow's own 'F' -> 'L' rule).
- Images above Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, or `max_pixels`) are
  refused with InputError before decoding, like missing, corrupt and truncated files; every error
  is one line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vpr_edge.errors import InputError

ImageSource = Union[str, os.PathLike, np.ndarray, Image.Image]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _pixel_limit(max_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int | None) -> None:
    limit = _pixel_limit(max_pixels)
    w, h = size
    if limit and w * h > limit:
        raise InputError(
            f"{name}: {w}x{h} = {w * h} pixels is above the decompression-bomb limit of {limit}; "
            "downscale the image (or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)"
        )


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in _SIXTEEN_BIT:
        v = np.asarray(im).astype(np.float64)
        v = np.clip(np.rint(np.clip(v, 0, 65535) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(v[:, :, None], 3, axis=2)
    if mode == "F":
        v = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(v[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise InputError(f"{name}: expected a uint8 image array, got dtype {arr.dtype}; decode it with load_rgb")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[:, :, :3])
    raise InputError(f"{name}: expected an HxW, HxWx3 or HxWx4 image array, got shape {arr.shape}")


def load_rgb(source: ImageSource, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file (or take a PIL image / uint8 array) as an HxWx3 uint8 RGB array."""
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, "array")
    if isinstance(source, Image.Image):
        _check_pixels("image", source.size, max_pixels)
        return _to_rgb_array(ImageOps.exif_transpose(source))
    path = Path(source)
    try:
        with Image.open(path) as im:
            _check_pixels(str(path), im.size, max_pixels)
            return _to_rgb_array(ImageOps.exif_transpose(im))
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected an image file") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused as a decompression bomb ({exc}); downscale the image") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can identify (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated"), SyntaxError
        # (broken headers of some formats) or ValueError.
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: unreadable image ({msg}); re-save or remove the file") from None
