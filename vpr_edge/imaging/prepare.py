"""One place decides how an image becomes a network input: the preprocessing mode and the input layout.

- mode 'exact' (`imaging.exact`): float resize, equal to the PyTorch reference to 4e-5; the default, and
  what export verification uses;
- mode 'fast' (`imaging.fast`): JPEG draft decoding (fewer pixels decoded), then only the crop box
  resized: in float for the float layout (`fast_float`), in uint8 for the uint8 layout (`fast_rgb`); its
  effect on descriptors is measured in benchmarks/preprocess.py;
- layout 'float' (float32 [3, H, W], normalised) or 'uint8' (uint8 [H, W, 3], for artifacts exported with
  `--input uint8`, which normalise inside the graph). A uint8 input can only come from the fast path: the
  exact path's float resize has no uint8 form.
Camera arrays are HxWx3 uint8 in the stated channel order ('rgb' or 'bgr').
"""

from __future__ import annotations

import numpy as np

from vpr_edge.errors import ConfigError
from vpr_edge.imaging.decode import ImageSource, load_rgb
from vpr_edge.imaging.exact import preprocess_rgb
from vpr_edge.imaging.fast import fast_float, fast_rgb
from vpr_edge.presets import Preprocess

MODES = ("exact", "fast")
LAYOUTS = ("float", "uint8")
CHANNELS = ("rgb", "bgr")


def check(mode: str, layout: str = "float", channels: str = "rgb") -> None:
    if mode not in MODES:
        raise ConfigError(f"--preprocess must be one of {MODES}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"input layout must be one of {LAYOUTS}, got {layout!r}")
    if channels not in CHANNELS:
        raise ConfigError(f"channels must be one of {CHANNELS}, got {channels!r}")
    if layout == "uint8" and mode != "fast":
        raise ConfigError(
            "this artifact takes uint8 input (exported with --input uint8), which only the fast preprocessing "
            "produces; use --preprocess fast, or export a float-input artifact for exact preprocessing"
        )


def prepare(
    source: ImageSource,
    pre: Preprocess,
    mode: str = "exact",
    layout: str = "float",
    *,
    max_pixels: int | None = None,
    channels: str = "rgb",
    size: list | None = None,
) -> np.ndarray:
    """One image -> the network input (see the module docstring). When `size` is a list, the decoded
    upright source size (h, w) is appended to it (a student's views are drawn on the source image)."""
    check(mode, layout, channels)
    if isinstance(source, np.ndarray) and channels == "bgr":
        source = np.ascontiguousarray(load_rgb(source)[:, :, ::-1])
    if mode == "exact":
        rgb = load_rgb(source, max_pixels=max_pixels)
        if size is not None:
            size.append(tuple(rgb.shape[:2]))
        return preprocess_rgb(rgb, pre)
    if layout == "uint8":
        return fast_rgb(source, pre, max_pixels=max_pixels, size=size)
    return fast_float(source, pre, max_pixels=max_pixels, size=size)
