"""Resize geometry shared by the PyTorch reference and the numpy runtime, so both crop the same pixels."""

from __future__ import annotations

from vpr_edge.errors import ConfigError, InputError
from vpr_edge.presets import Preprocess


def resize_plan(src_hw: tuple[int, int], pre: Preprocess) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resized (h, w) and the crop box (top, left, height, width) that give `pre.image_size`.

    'stretch': resize straight to (H, W); the crop box is the whole image.
    'cover_crop': scale keeping the aspect ratio so the image covers (H, W), then centre-crop.
      The side that decides the scale gets exactly H (or W); the other gets
      floor(side * H / h) (or floor(side * W / w)), but never less than the target. With a square
      target this is torchvision's Resize(int) (shorter side = size, longer = int(size * long /
      short)); integer arithmetic avoids float error in deciding either. The crop offset is
      torchvision's CenterCrop arithmetic: top = int(round((h' - H) / 2.0)) with Python's round
      (ties to even), same for left.
    """
    h, w = int(src_hw[0]), int(src_hw[1])
    th, tw = int(pre.image_size[0]), int(pre.image_size[1])
    if h < 1 or w < 1:
        raise InputError(f"image has size {h}x{w}; expected at least 1x1 pixels")
    if pre.resize == "stretch":
        return (th, tw), (0, 0, th, tw)
    if pre.resize != "cover_crop":
        raise ConfigError(f"unknown resize policy {pre.resize!r}; expected 'cover_crop' or 'stretch'")
    if th * w >= tw * h:  # scale = th / h covers the width too
        rh, rw = th, max(tw, (w * th) // h)
    else:  # scale = tw / w
        rh, rw = max(th, (h * tw) // w), tw
    top = int(round((rh - th) / 2.0))
    left = int(round((rw - tw) / 2.0))
    return (rh, rw), (top, left, th, tw)
