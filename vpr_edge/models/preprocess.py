"""Reference preprocessing in torch, as the authors' code does it.

BoQ: ToTensor -> Resize((H, W), bicubic, antialias) -> Normalize. AnyLoc: ToTensor -> Normalize ->
bicubic resize -> CenterCrop to the fixed size. Normalisation is per-channel affine and bicubic
weights sum to 1, so resize-then-normalise equals the AnyLoc order up to float rounding; one order
is used here. The size arithmetic (`resize_plan`) is shared with the numpy runtime so both paths
crop the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from vpr_edge.presets import Preprocess
from vpr_edge.imaging.decode import load_rgb
from vpr_edge.imaging.geometry import resize_plan


def image_to_tensor(image, pre: Preprocess) -> torch.Tensor:
    """PIL image (RGB) -> normalised float tensor [3, H, W]."""
    t = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    (rh, rw), (top, left, h, w) = resize_plan((t.shape[1], t.shape[2]), pre)
    if (rh, rw) != (t.shape[1], t.shape[2]):
        t = TF.resize(t, [rh, rw], interpolation=TF.InterpolationMode.BICUBIC, antialias=pre.antialias)
    t = t[:, top : top + h, left : left + w]
    return TF.normalize(t, list(pre.mean), list(pre.std))


def load_tensor(path: str | Path, pre: Preprocess) -> torch.Tensor:
    return image_to_tensor(load_rgb(path), pre)


def load_batch(paths, pre: Preprocess) -> torch.Tensor:
    return torch.stack([load_tensor(p, pre) for p in paths])
