"""Calibration images for INT8 (and extra overflow probes for FP16): a folder -> preprocessed batches.

numpy + Pillow preprocessing (`vpr_edge.runtime.preprocess`), the same the deployed runtime uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.errors import InputError
from vpr_edge.datasets import evenly_spaced
from vpr_edge.presets import Preprocess


def calibration_images(folder: str | Path, pre: Preprocess, *, limit: int = 512, progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Up to `limit` images from `folder` (searched recursively, spread evenly over the sorted list),
    preprocessed to float32 [n, 3, H, W]; plus a description for the manifest."""
    from tqdm import tqdm

    from vpr_edge import datasets
    from vpr_edge.imaging.exact import preprocess_image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--calibration {folder}: not a folder; give a folder of images from the deployment environment")
    paths = datasets.list_images(folder, recursive=True)
    chosen = [paths[i] for i in evenly_spaced(len(paths), limit)]
    h, w = pre.image_size
    out = np.empty((len(chosen), 3, h, w), dtype=np.float32)
    for i, p in enumerate(tqdm(chosen, desc="calibration images", disable=not progress)):
        out[i] = preprocess_image(p, pre)
    info = {"source": str(folder), "images": len(chosen), "available": len(paths), "limit": limit}
    return out, info
