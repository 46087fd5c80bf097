"""Seeded augmented views of an image, each fully described by recorded numbers.

A view is rendered on the decoded uint8 RGB image with numpy only, before the product's
preprocessing (`preprocess_rgb`): crop -> horizontal flip -> photometric jitter -> uint8. The teacher
cache stores every view's parameters, so the trainer re-renders exactly the pixels the teacher saw
(for the student's own input size) instead of trusting a random generator to repeat itself.

- View 0 is always the plain image (full crop, no flip, factors 1): what the robot sees.
- Views 1.. draw, from numpy's PCG64 seeded by (seed, image index, view index):
  a random-resized crop (area fraction in `scale`, aspect ratio in `ratio` relative to the
  image's own aspect, log-uniform, as torchvision's RandomResizedCrop; 10 tries, then the full image),
  a horizontal flip with probability `flip`, and brightness / contrast / saturation factors
  uniform in [1 - j, 1 + j] applied in that order, as torchvision's ColorJitter defines them
  (brightness: x*b; contrast: blend with the mean of the grayscale image; saturation: blend with
  the per-pixel grayscale; grayscale = 0.299 R + 0.587 G + 0.114 B; clipped to 0..255 after each
  step, rounded to uint8 at the end). No hue jitter: it has no exact cheap numpy form.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vpr_edge.errors import ArtifactError, ConfigError

# one row per view in the cache (float64 holds the integers exactly)
COLUMNS = (
    "image", "view", "src_h", "src_w", "top", "left", "height", "width", "flip", "brightness", "contrast", "saturation"
)
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class ViewConfig:
    """How views 1.. are drawn (view 0 is always the plain image)."""

    scale: tuple[float, float] = (0.35, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect relative to the image's
    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"view scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"view ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 <= self.flip <= 1:
            raise ConfigError(f"view flip probability must be in 0..1, got {self.flip}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"view {name} jitter must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class View:
    """One view of image `image`: the crop box in source pixels, flip, jitter factors."""

    image: int
    view: int
    src_h: int
    src_w: int
    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    @classmethod
    def plain(cls, image: int, src_hw: tuple[int, int]) -> "View":
        h, w = int(src_hw[0]), int(src_hw[1])
        return cls(image, 0, h, w, 0, 0, h, w)

    def to_row(self) -> np.ndarray:
        return np.array([float(getattr(self, c)) for c in COLUMNS], dtype=np.float64)

    @classmethod
    def from_row(cls, row) -> "View":
        r = [float(x) for x in row]
        ints = {c: int(round(v)) for c, v in zip(COLUMNS[:8], r[:8])}
        return cls(**ints, flip=bool(round(r[8])), brightness=r[9], contrast=r[10], saturation=r[11])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rng(seed: int, image: int, view: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(image), int(view)])))


def draw_view(image: int, view: int, src_hw: tuple[int, int], seed: int, config: ViewConfig = ViewConfig()) -> View:
    """View `view` of image `image` (source size src_hw): view 0 plain, others seeded random."""
    h, w = int(src_hw[0]), int(src_hw[1])
    if view == 0:
        return View.plain(image, (h, w))
    rng = _rng(seed, image, view)
    area, aspect = h * w, w / h
    box = (0, 0, h, w)
    log_lo, log_hi = math.log(config.ratio[0]), math.log(config.ratio[1])
    for _ in range(10):
        a = area * rng.uniform(*config.scale)
        r = aspect * math.exp(rng.uniform(log_lo, log_hi))  # width / height of the crop
        cw = int(round(math.sqrt(a * r)))
        ch = int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            box = (top, left, ch, cw)
            break
    flip = bool(rng.uniform() < config.flip)
    b = float(rng.uniform(1 - config.brightness, 1 + config.brightness))
    c = float(rng.uniform(1 - config.contrast, 1 + config.contrast))
    s = float(rng.uniform(1 - config.saturation, 1 + config.saturation))
    return View(image, view, h, w, *box, flip=flip, brightness=b, contrast=c, saturation=s)


def draw_views(
    image: int, src_hw: tuple[int, int], count: int, seed: int, config: ViewConfig = ViewConfig()
) -> list[View]:
    return [draw_view(image, v, src_hw, seed, config) for v in range(count)]


def render(rgb: np.ndarray, v: View, source: str = "image") -> np.ndarray:
    """HxWx3 uint8 -> the view as uint8 (crop, flip, jitter). Refuses an image of another size."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ArtifactError(f"{source}: expected an HxWx3 uint8 image, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] != (v.src_h, v.src_w):
        raise ArtifactError(
            f"{source} is {rgb.shape[0]}x{rgb.shape[1]} now, the cache recorded {v.src_h}x{v.src_w}: the image "
            f"changed since the teacher cache was built; rebuild the cache or restore the image"
        )
    x = rgb[v.top : v.top + v.height, v.left : v.left + v.width]
    if v.flip:
        x = x[:, ::-1]
    if (v.brightness, v.contrast, v.saturation) == (1.0, 1.0, 1.0):
        return np.ascontiguousarray(x)
    f = x.astype(np.float32)
    if v.brightness != 1.0:
        f = np.clip(f * np.float32(v.brightness), 0, 255)
    if v.contrast != 1.0:
        m = np.float32((f @ _GRAY).mean())
        f = np.clip((f - m) * np.float32(v.contrast) + m, 0, 255)
    if v.saturation != 1.0:
        g = (f @ _GRAY)[:, :, None]
        f = np.clip((f - g) * np.float32(v.saturation) + g, 0, 255)
    return np.rint(f).astype(np.uint8)
