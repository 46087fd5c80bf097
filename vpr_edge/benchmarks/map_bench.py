"""`vpr-edge bench map`: IVF-PQ on a large synthetic map against exact search (faiss IndexFlatIP).

The data: place descriptors are not uniform on the sphere (uniform random vectors in 512-d are all
nearly orthogonal, so every index looks alike and IVF buys nothing). We draw `clusters` centres
uniformly on the unit sphere (normalised Gaussians), give each map vector a uniformly chosen
centre and add isotropic Gaussian noise of total norm about `spread` (per-coordinate std
spread / sqrt(dim)), then L2-normalise: vectors of one cluster have cosine about 1 / (1 + spread^2)
with each other, like frames of one street. A query revisits a map vector: the same construction
around that vector with noise `query_noise`, normalised, so its exact nearest neighbour is usually
(not always: `data.exact_top1_is_source` says how often) the vector it was made from.

The defaults (spread 0.1, query noise 0.2) model a dense map built from image sequences: each
place has many near-duplicate frames (cosine ~0.99 with each other), so exact search separates
them by small margins and PQ's quantisation error can swap the first two. That is the hard case
for top-1 agreement; `--spread 0.25 --query-noise 0.25` is an easier, better separated map.
Measured on 100k x 512 with the runtime's IVF-PQ parameters (nlist 1264, m 64, nbits 8, nprobe
158): top-1 agreement 0.54 at the defaults, 0.96 with `--refine 4`, 1.0 on the easier map.

Vectors are generated in chunks of `chunk` rows from a generator seeded by (seed, chunk number),
so any chunk can be regenerated and the whole map never exists twice in memory: 1e6 x 512 float32
is 2 GB, held once by the exact index (IVF-PQ holds m bytes per vector at nbits=8).

Measured: per-query latency at batch 1 after warm-up (p50/p95/p99) for IVF-PQ and, on fewer
queries, for exact search; top-1 agreement of IVF-PQ with exact search; how often exact top-1 is in
the IVF-PQ top 10; train/add times; index memory. Defaults follow the runtime's own choice for
`vpr-edge map build --index ivfpq` (`runtime.map_index.index_params`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vpr_edge.benchmarks.measure import MB, RssSampler, percentiles
from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import

log = logging.getLogger(__name__)

LATENCY_TARGET_MS = 10.0
AGREEMENT_TARGET = 0.95


@dataclass
class MapBenchConfig:
    size: int = 1_000_000
    dim: int = 512
    nlist: int | None = None
    m: int | None = None
    nbits: int | None = None
    nprobe: int | None = None
    refine: int = 0  # >0: re-rank refine * k IVF-PQ candidates with the exact vectors (faiss IndexRefine)
    queries: int = 1000
    exact_queries: int = 50
    train: int | None = None
    clusters: int | None = None
    spread: float = 0.1
    query_noise: float = 0.2
    chunk: int = 50_000
    warmup: int = 20
    threads: int | None = None
    seed: int = 0
    progress: bool = True

    def resolved(self) -> "MapBenchConfig":
        """Fill what was left out (the runtime's index parameters, a training size, a cluster count)."""
        from vpr_edge.runtime import map_index

        if self.size < 1000 or self.dim < 8:
            raise ConfigError(f"--size must be >= 1000 and --dim >= 8, got {self.size} and {self.dim}")
        try:
            auto = map_index.index_params("ivfpq", self.size, self.dim)
        except ConfigError:
            auto = {"nlist": 16, "nprobe": 8, "m": 8, "nbits": 4}
        c = MapBenchConfig(**asdict(self))
        c.nlist = c.nlist or auto["nlist"]
        c.m = c.m or auto["m"]
        c.nbits = c.nbits or auto["nbits"]
        c.nprobe = min(c.nprobe or auto["nprobe"], c.nlist)
        c.clusters = c.clusters or max(16, self.size // 500)
        c.train = min(self.size, c.train or max(50 * c.nlist, 40 * 2**c.nbits))
        if c.dim % c.m:
            raise ConfigError(f"--m must divide --dim ({c.dim}), got {c.m}; e.g. --m {math.gcd(c.dim, 64)}")
        if not 1 <= c.nbits <= 16:
            raise ConfigError(f"--nbits must be in 1..16, got {c.nbits}")
        if c.nlist < 1 or c.nlist > c.train:
            raise ConfigError(f"--nlist must be in 1..--train ({c.train}), got {c.nlist}")
        if c.queries < 1 or c.exact_queries < 1 or c.chunk < 1:
            raise ConfigError("--queries, --exact-queries and --chunk must be >= 1")
        if c.refine < 0:
            raise ConfigError(f"--refine must be >= 0, got {c.refine}")
        if c.spread < 0 or c.query_noise < 0:
            raise ConfigError("--spread and --query-noise must be >= 0")
        return c


class ClusteredVectors:
    """Deterministic clustered unit vectors, chunk by chunk (see the module docstring)."""

    def __init__(self, size: int, dim: int, clusters: int, spread: float, chunk: int, seed: int):
        self.size, self.dim, self.spread, self.chunk, self.seed = size, dim, spread, chunk, seed
        rng = np.random.default_rng([seed, 0xC3])
        c = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk)

    def get(self, i: int) -> np.ndarray:
        start = i * self.chunk
        n = min(self.chunk, self.size - start)
        rng = np.random.default_rng([self.seed, 1, i])
        x = self.centres[rng.integers(0, len(self.centres), n)]
        x += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(self.spread / math.sqrt(self.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The vectors with the given ids (regenerating only the chunks they are in)."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for c in np.unique(ids // self.chunk):
            sel = np.flatnonzero(ids // self.chunk == c)
            out[sel] = self.get(int(c))[ids[sel] - c * self.chunk]
        return out

    def first(self, n: int) -> np.ndarray:
        return np.concatenate([self.get(i) for i in range(-(-n // self.chunk))])[:n]


def _per_query_latency(index, q: np.ndarray, k: int, warmup: int) -> tuple[dict, np.ndarray]:
    for i in range(min(warmup, len(q))):
        index.search(q[i : i + 1], k)
    times, ids = [], np.zeros((len(q), k), dtype=np.int64)
    for i in range(len(q)):
        t0 = time.perf_counter()
        _, idx = index.search(q[i : i + 1], k)
        times.append(1000.0 * (time.perf_counter() - t0))
        ids[i] = idx[0]
    return percentiles(times), ids


def run_map_bench(cfg: MapBenchConfig) -> dict[str, Any]:
    from tqdm import tqdm

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise here
    faiss = lazy_import("faiss")
    c = cfg.resolved()
    if c.threads:
        faiss.omp_set_num_threads(c.threads)
    gen = ClusteredVectors(c.size, c.dim, c.clusters, c.spread, c.chunk, c.seed)
    rng = np.random.default_rng([c.seed, 2])
    source = rng.choice(c.size, size=min(c.queries, c.size), replace=False)
    q = gen.rows(source)
    q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(c.query_noise / math.sqrt(c.dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = np.ascontiguousarray(q, dtype=np.float32)

    with RssSampler(interval_s=0.05) as rss:
        t0 = time.perf_counter()
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(c.dim), c.dim, c.nlist, c.m, c.nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.train(gen.first(c.train))
        train_s = time.perf_counter() - t0
        ivf.nprobe = c.nprobe
        exact = faiss.IndexFlatIP(c.dim)
        t0 = time.perf_counter()
        for i in tqdm(range(gen.chunks), desc="map vectors", unit="chunk", disable=not c.progress):
            x = gen.get(i)
            exact.add(x)
            ivf.add(x)
        add_s = time.perf_counter() - t0
        searcher = ivf
        if c.refine:
            searcher = faiss.IndexRefine(ivf, exact)  # holds Python references to both (faiss' SWIG wrapper)
            searcher.k_factor = float(c.refine)
        k = 10
        _, truth = exact.search(q, k)  # batched exact search: the ground truth
        lat, got = _per_query_latency(searcher, q, k, c.warmup)
        n_exact = min(c.exact_queries, len(q))
        lat_exact, _ = _per_query_latency(exact, q[:n_exact], k, min(c.warmup, 5))
    agreement = {
        "top1": float(np.mean(got[:, 0] == truth[:, 0])),
        "exact_top1_in_top10": float(np.mean([truth[i, 0] in got[i] for i in range(len(q))])),
        "top10_overlap": float(np.mean([len(np.intersect1d(truth[i], got[i])) / k for i in range(len(q))])),
    }
    code_bytes = ivf.code_size
    result = {
        "size": c.size,
        "dim": c.dim,
        "queries": len(q),
        "params": {"nlist": c.nlist, "m": c.m, "nbits": c.nbits, "nprobe": c.nprobe, "refine": c.refine,
                   "train": c.train, "metric": "inner product"},
        "data": {
            "clusters": c.clusters, "spread": c.spread, "query_noise": c.query_noise, "seed": c.seed,
            "exact_top1_is_source": float(np.mean(truth[:, 0] == source)),
            "description": f"{c.clusters} Gaussian clusters on the unit sphere, spread {c.spread}, "
                           f"queries = map vectors + noise {c.query_noise}",
        },
        "threads": int(faiss.omp_get_max_threads()),
        "train_s": train_s,
        "add_s": add_s,
        "ivfpq": {"per_query_ms": lat, "batch": 1, "warmup": c.warmup},
        "exact": {"per_query_ms": lat_exact, "batch": 1, "queries": n_exact},
        "agreement": agreement,
        "memory": {
            "exact_index_mb": c.size * c.dim * 4 / MB,
            "ivfpq_code_bytes": int(code_bytes),
            # codes + 8-byte ids per vector; centroids and codebooks are per index, not per vector
            "ivfpq_bytes_per_vector": float(code_bytes + 8),
            "ivfpq_index_mb": (c.size * (code_bytes + 8) + c.nlist * c.dim * 4 + c.dim * 2**c.nbits * 4) / MB,
            **rss.report(),
        },
        "targets": {
            "latency_ms": LATENCY_TARGET_MS,
            "agreement": AGREEMENT_TARGET,
            "latency_met": bool(lat["p50"] <= LATENCY_TARGET_MS),
            "agreement_met": bool(agreement["top1"] >= AGREEMENT_TARGET),
        },
    }
    return {"config": asdict(c), "result": result}
