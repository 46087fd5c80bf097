"""`vpr-edge bench soak ARTIFACT`: many queries through one runtime; does memory creep?

One Describer and one map index live for the whole run, as on a robot. Each query describes one
image (decode + preprocess + backend + aggregation) and searches the map (faiss, the runtime's
`map_index`). The map holds the descriptors of up to 256 query images plus random unit vectors
up to `map_size`. Query images cycle through a folder, or through synthetic uint8 images (seeded noise
with smooth structure) when no folder is given.

RSS is sampled after `warmup` queries (the baseline: allocators and backends have reached their
working set by then) and every `sample_every` queries after. Growth = (last - baseline) / baseline;
the least-squares slope over the samples says whether it keeps growing. Target: growth < 5%.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.measure import MB, percentiles, rss_bytes
from vpr_edge.errors import ConfigError

GROWTH_TARGET_PCT = 5.0
MAP_OWN = 256  # query images described into the map; the rest is random (content does not matter here)


@dataclass
class SoakConfig:
    artifact: Path
    queries: int = 10_000
    sample_every: int = 100
    warmup: int = 50
    images: Path | None = None
    map_size: int = 10_000
    index: str = "flat"
    top_k: int = 5
    synthetic_images: int = 32
    synthetic_size: tuple[int, int] = (480, 640)
    backend: str = "auto"
    providers: list[str] | None = None
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    preprocess: str | None = None
    workers: int | None = None

    def check(self) -> None:
        if self.queries < 1 or self.sample_every < 1 or self.warmup < 1:
            raise ConfigError(
                f"--queries, --sample-every and --warmup must be >= 1, got {self.queries}, {self.sample_every}, {self.warmup}"
            )
        if self.queries < 2 * self.sample_every:
            raise ConfigError(
                f"--queries ({self.queries}) must be at least twice --sample-every ({self.sample_every}) to see a trend"
            )
        if self.map_size < 1 or self.top_k < 1:
            raise ConfigError("--map-size and --top-k must be >= 1")


def synthetic_images(n: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """Smooth random uint8 RGB images (low-frequency noise upsampled, plus fine noise)."""
    from PIL import Image

    rng = np.random.default_rng([seed, 7])
    h, w = size
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        img = img + rng.integers(-12, 13, img.shape, dtype=np.int16)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng([seed, 9]).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from vpr_edge import datasets
    from vpr_edge.runtime import map_index
    from vpr_edge.runtime.describer import Describer

    cfg.check()
    if cfg.images is not None:
        items: list = list(datasets.list_images(cfg.images, recursive=True))
        source = str(cfg.images)
    else:
        items = synthetic_images(cfg.synthetic_images, cfg.synthetic_size, cfg.seed)
        source = f"{cfg.synthetic_images} synthetic {cfg.synthetic_size[0]}x{cfg.synthetic_size[1]} images"
    rss_start = rss_bytes()
    with Describer.from_artifact(cfg.artifact, backend=cfg.backend, providers=cfg.providers, threads=cfg.threads,
                                 preprocess=cfg.preprocess, workers=cfg.workers) as d:
        own = d.describe(items[: min(cfg.map_size, MAP_OWN)], batch=8)
        fill = _unit_rows(max(0, cfg.map_size - len(own)), d.dim, cfg.seed)
        vectors = np.concatenate([own, fill]) if len(fill) else own
        index = map_index.build_index(vectors, map_index.index_params(cfg.index, len(vectors), d.dim))
        del vectors, fill
        times = np.zeros(cfg.queries)  # preallocated: a growing list would be growth we cause ourselves
        samples: list[tuple[int, int]] = []
        baseline = None
        total = cfg.warmup + cfg.queries
        bar = tqdm(total=total, desc="soak", unit="query", disable=not cfg.progress)
        try:
            for i in range(total):
                item = items[i % len(items)]
                t0 = time.perf_counter()
                q = d.describe([item], batch=1)
                map_index.search(index, q, cfg.top_k)
                dt = time.perf_counter() - t0
                done = i + 1 - cfg.warmup
                if done == 0:
                    baseline = rss_bytes()
                    samples.append((0, baseline))
                elif done > 0:
                    times[done - 1] = 1000.0 * dt
                    if done % cfg.sample_every == 0 or done == cfg.queries:
                        samples.append((done, rss_bytes()))
                bar.update(1)
        finally:
            bar.close()
        backend = d.backend.describe() if hasattr(d.backend, "describe") else {}
    n = np.array([s[0] for s in samples], dtype=np.float64)
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    slope = float(np.polyfit(n, rss, 1)[0]) if len(samples) >= 2 else 0.0  # bytes per query
    growth = 100.0 * (rss[-1] - baseline) / baseline
    result = {
        "artifact": str(cfg.artifact),
        "backend": backend,
        "images": source,
        "queries": cfg.queries,
        "warmup": cfg.warmup,
        "map_size": int(index.ntotal),
        "index": cfg.index,
        "per_query_ms": percentiles(times),
        "rss_before_load_mb": rss_start / MB,
        "rss_baseline_mb": baseline / MB,
        "rss_end_mb": rss[-1] / MB,
        "rss_max_mb": rss.max() / MB,
        "growth_pct": float(growth),
        "max_growth_pct": float(100.0 * (rss.max() - baseline) / baseline),
        "slope_kb_per_1k_queries": slope * 1000.0 / 1024.0,
        "samples": [{"queries": int(a), "rss_mb": b / MB} for a, b in samples],
        "target_growth_pct": GROWTH_TARGET_PCT,
        "target_met": bool(growth < GROWTH_TARGET_PCT),
    }
    return {"config": {**asdict(cfg), "images": str(cfg.images) if cfg.images else None}, "result": result}
