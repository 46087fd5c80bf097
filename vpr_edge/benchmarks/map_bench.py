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
On 1e6 x 512 (nlist 4000, PQ64x8) PQ's own top-1 agrees with exact search for ~44% of queries
while the exact top-1 lies in the query's nearest 4 lists for all of them: agreement is lost to
PQ's ranking, not to the probes, which is why the runtime re-ranks (see `runtime.map_index`;
benchmarks/results/map-1m-diagnosis has the breakdown by nprobe and re-rank count).

Vectors are generated in chunks of `chunk` rows from a generator seeded by (seed, chunk number),
so any chunk can be regenerated and the whole map never exists twice in memory: 1e6 x 512 float32
is 2 GB, held once by the exact index (IVF-PQ holds m bytes per vector at nbits=8, an 8-byte id,
and its re-rank copy: dim bytes for sq8).

Measured: per-query latency at batch 1 after warm-up (p50/p95/p99) for IVF-PQ (with its re-ranking)
and, on fewer queries, for exact search; top-1 agreement of IVF-PQ with exact search; how often
exact top-1 is in the IVF-PQ top 10; where the disagreements come from (exact top-1 in a list
that was not probed, or probed but out-ranked) and PQ's own top-1 agreement before re-ranking;
train/add times; index memory. The index is the runtime's own (`runtime.map_index.new_index`,
searched with `map_index.search`), and every parameter left out is the runtime's choice for
`vpr-edge map build --index ivfpq` (`runtime.map_index.index_params`): nprobe, re-rank store and
count included (`--refine F` re-ranks F x 10 candidates instead; `--refine 0` turns it off).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vpr_edge.measure import MB, PeakRss, percentiles
from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import

log = logging.getLogger(__name__)

LATENCY_TARGET_MS = 10.0
AGREEMENT_TARGET = 0.95
TOP_K = 10


@dataclass
class MapBenchConfig:
    size: int = 1_000_000
    dim: int = 512
    nlist: int | None = None
    m: int | None = None
    nbits: int | None = None
    nprobe: int | None = None
    # re-rank refine * k (k = 10) IVF-PQ candidates with the refine_store copy of the vectors;
    # None: the runtime's rerank count; 0: PQ order only
    refine: int | None = None
    refine_store: str | None = None  # sq8 / flat; None: the runtime's choice
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
        if self.refine is not None and self.refine < 0:
            raise ConfigError(f"--refine must be >= 0, got {self.refine}")
        if self.refine_store not in (None, *map_index.REFINE_TYPES):
            raise ConfigError(f"refine_store must be one of {map_index.REFINE_TYPES}, got {self.refine_store!r}")
        try:
            auto = map_index.index_params("ivfpq", self.size, self.dim)
        except ConfigError:
            auto = {"nlist": 16, "nprobe": 8, "m": 8, "nbits": 4, "refine": map_index.DEFAULT_REFINE,
                    "rerank": map_index.DEFAULT_RERANK}
        c = MapBenchConfig(**asdict(self))
        c.nlist = c.nlist or auto["nlist"]
        c.m = c.m or auto["m"]
        c.nbits = c.nbits or auto["nbits"]
        # the runtime's nprobe follows nlist, so an explicit --nlist gets its own default
        c.nprobe = min(c.nprobe or map_index.default_nprobe(c.nlist), c.nlist)
        if c.refine is None:
            c.refine = -(-auto.get("rerank", 0) // TOP_K)
        c.refine_store = "none" if c.refine == 0 else (c.refine_store or auto["refine"])
        if c.refine_store == "none":
            c.refine = 0
        c.clusters = c.clusters or max(16, self.size // 500)
        c.train = min(self.size, c.train or map_index.training_size(
            {"type": "ivfpq", "nlist": c.nlist, "nbits": c.nbits}, self.size))
        if c.dim % c.m:
            raise ConfigError(f"--m must divide --dim ({c.dim}), got {c.m}; e.g. --m {math.gcd(c.dim, 64)}")
        if not 1 <= c.nbits <= 16:
            raise ConfigError(f"--nbits must be in 1..16, got {c.nbits}")
        if c.nlist < 1 or c.nlist > c.train:
            raise ConfigError(f"--nlist must be in 1..--train ({c.train}), got {c.nlist}")
        if c.queries < 1 or c.exact_queries < 1 or c.chunk < 1:
            raise ConfigError("--queries, --exact-queries and --chunk must be >= 1")
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
    from vpr_edge.runtime import map_index

    for i in range(min(warmup, len(q))):
        map_index.search(index, q[i : i + 1], k)
    times, ids = [], np.zeros((len(q), k), dtype=np.int64)
    for i in range(len(q)):
        t0 = time.perf_counter()
        _, idx = map_index.search(index, q[i : i + 1], k)
        times.append(1000.0 * (time.perf_counter() - t0))
        ids[i] = idx[0]
    return percentiles(times), ids


def _where_lost(index, exact, q: np.ndarray, truth: np.ndarray, got: np.ndarray) -> dict:
    """Split the top-1 disagreements into probe misses (exact top-1 in a list not visited) and
    ranking losses (visited, but ranked below another vector), and PQ's own top-1 agreement."""
    faiss = lazy_import("faiss")
    ivf = faiss.extract_index_ivf(index)
    _, true_list = ivf.quantizer.search(exact.reconstruct_batch(truth[:, 0]), 1)
    _, probed = ivf.quantizer.search(q, ivf.nprobe)
    in_probed = (probed == true_list).any(axis=1)
    wrong = got[:, 0] != truth[:, 0]
    out = {
        "exact_top1_list_probed": float(np.mean(in_probed)),
        "lost_to_probe_miss": float(np.mean(wrong & ~in_probed)),
        "lost_to_ranking": float(np.mean(wrong & in_probed)),
    }
    if isinstance(index, faiss.IndexRefine):
        _, pq = faiss.downcast_index(index.base_index).search(q, 1)
        out["pq_only_top1"] = float(np.mean(pq[:, 0] == truth[:, 0]))
    return out


def run_map_bench(cfg: MapBenchConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from vpr_edge.runtime import map_index

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise here
    faiss = lazy_import("faiss")
    c = cfg.resolved()
    if c.threads:
        faiss.omp_set_num_threads(c.threads)
    params = {"type": "ivfpq", "nlist": c.nlist, "nprobe": c.nprobe, "m": c.m, "nbits": c.nbits,
              "refine": c.refine_store}
    if c.refine:
        params["rerank"] = c.refine * TOP_K
    gen = ClusteredVectors(c.size, c.dim, c.clusters, c.spread, c.chunk, c.seed)
    rng = np.random.default_rng([c.seed, 2])
    source = rng.choice(c.size, size=min(c.queries, c.size), replace=False)
    q = gen.rows(source)
    q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(c.query_noise / math.sqrt(c.dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = np.ascontiguousarray(q, dtype=np.float32)

    with PeakRss(interval_s=0.05) as rss:
        t0 = time.perf_counter()
        index = map_index.new_index(params, gen.first(c.train))  # what `vpr-edge map build` builds
        train_s = time.perf_counter() - t0
        exact = faiss.IndexFlatIP(c.dim)
        t0 = time.perf_counter()
        for i in tqdm(range(gen.chunks), desc="map vectors", unit="chunk", disable=not c.progress):
            x = gen.get(i)
            exact.add(x)
            map_index.add_to_index(index, x)
        add_s = time.perf_counter() - t0
        k = TOP_K
        _, truth = exact.search(q, k)  # batched exact search: the ground truth
        lat, got = _per_query_latency(index, q, k, c.warmup)
        n_exact = min(c.exact_queries, len(q))
        lat_exact, _ = _per_query_latency(exact, q[:n_exact], k, min(c.warmup, 5))
    agreement = {
        "top1": float(np.mean(got[:, 0] == truth[:, 0])),
        "exact_top1_in_top10": float(np.mean([truth[i, 0] in got[i] for i in range(len(q))])),
        "top10_overlap": float(np.mean([len(np.intersect1d(truth[i], got[i])) / k for i in range(len(q))])),
        **_where_lost(index, exact, q, truth, got),
    }
    ivf = faiss.extract_index_ivf(index)
    per_vector = map_index.bytes_per_vector(params, c.dim)
    refine_label = f"{c.refine_store}, top {params['rerank']}" if c.refine else "none"
    result = {
        "size": c.size,
        "dim": c.dim,
        "queries": len(q),
        "params": {"nlist": c.nlist, "m": c.m, "nbits": c.nbits, "nprobe": c.nprobe, "refine": refine_label,
                   "refine_store": c.refine_store, "rerank": params.get("rerank", 0), "k": k,
                   "factory": map_index.factory_string(params), "train": c.train, "metric": "inner product"},
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
            "ivfpq_code_bytes": int(ivf.code_size),
            # PQ code + 8-byte id + the re-rank copy (sq8: dim bytes) per vector; centroids and
            # codebooks are per index, not per vector
            "ivfpq_bytes_per_vector": per_vector,
            "refine_bytes_per_vector": per_vector - ivf.code_size - map_index.ID_BYTES,
            "ivfpq_index_mb": (c.size * per_vector + c.nlist * c.dim * 4 + c.dim * 2**c.nbits * 4) / MB,
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
