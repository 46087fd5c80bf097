"""A match grid (Pillow only): one row per query, the query then its top-k database images, each
retrieved image framed green when it is a ground-truth positive and red when it is not."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vpr_edge.atomic import atomic_file
from vpr_edge.imaging.decode import load_rgb

GREEN = (40, 170, 60)
RED = (210, 40, 40)
QUERY = (60, 90, 200)


def pick_queries(n_queries: int, count: int) -> list[int]:
    """`count` evenly spaced query indices (deterministic, spread over the sequence)."""
    if count <= 0 or n_queries == 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n_queries - 1, min(count, n_queries))})


def _thumb(path: Path, height: int, border: int, color: tuple[int, int, int]) -> Image.Image:
    img = Image.fromarray(load_rgb(path))
    w = max(1, round(img.width * height / img.height))
    img = img.resize((w, height), Image.Resampling.BILINEAR)
    framed = Image.new("RGB", (w + 2 * border, height + 2 * border), color)
    framed.paste(img, (border, border))
    return framed


def match_grid(
    queries: Sequence[Path],
    database: Sequence[Path],
    ranked: np.ndarray,
    positives: Sequence[np.ndarray],
    rows: Sequence[int],
    path: Path,
    k: int = 5,
    height: int = 96,
    border: int = 4,
    title: str = "",
) -> Path:
    """Write the grid PNG for query indices `rows` with their first `k` ranked database images."""
    gap, label_h = 6, 16 if title else 0
    tiles: list[list[Image.Image]] = []
    for qi in rows:
        row = [_thumb(queries[qi], height, border, QUERY)]
        pos = set(int(p) for p in positives[qi])
        for di in ranked[qi, :k]:
            row.append(_thumb(database[int(di)], height, border, GREEN if int(di) in pos else RED))
        tiles.append(row)
    width = max((sum(t.width for t in row) + gap * len(row) for row in tiles), default=100)
    h = label_h + sum(max(t.height for t in row) + gap for row in tiles) + gap
    canvas = Image.new("RGB", (width + 3 * gap, max(h, label_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 2), title, fill=(0, 0, 0))
    y = label_h + gap
    for row in tiles:
        x = gap
        for i, t in enumerate(row):
            canvas.paste(t, (x, y))
            x += t.width + gap + (gap if i == 0 else 0)  # a wider gap after the query
        y += max(t.height for t in row) + gap
    with atomic_file(path, "wb") as fh:
        canvas.save(fh, format="PNG")
    return path
