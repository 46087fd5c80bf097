"""`vpr-edge bench DATASET`: accuracy, fidelity and latency of several variants in one run.

Per variant, in this order (each variant is opened, measured and closed before the next, so memory
numbers are its own):
1. accuracy: describe database + queries, rank by inner product (`fidelity.rank_database`),
   recall@k (`fidelity.recall_at_k`); against the reference (PyTorch FP32, measured first) the
   descriptor cosine and top-k agreement (`fidelity.compare_descriptors`) when both live in the same
   descriptor space (`vpr_edge.space.differences`: same features, weights, aggregator, vocabulary, PCA);
2. search: exact faiss inner-product search over the database descriptors, one query at a time
   (the runtime map's 'flat' index);
3. latency per batch size: warm-up batches, then timed batches of query images (decode included),
   wall time per image from `time.perf_counter` and the describer's own per-stage clocks; then the same
   images as one pipelined stream (end-to-end throughput) and preprocessed beforehand (backend-only
   throughput), and the peak RSS at that batch size (`measure_latency`);
4. peak RSS over the whole variant and GPU memory where there is one.
Ratios against the baseline (PyTorch FP32 when included) come from the same run.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.datasets import evenly_spaced
from vpr_edge import fidelity
from vpr_edge.measure import PeakRss, gpu_process_memory_mb, percentiles
from vpr_edge.benchmarks.variants import PYTORCH_FP32, OpenedVariant, VariantSpec, open_variant
from vpr_edge.errors import ConfigError
from vpr_edge.manifest import Manifest

log = logging.getLogger(__name__)

STAGES = ("preprocess", "backbone", "aggregation")
KS = (1, 5, 10, 20)
OVERHEAD_TARGET = 0.10  # issue 5: preprocess + aggregation + search <= 10% of backbone time


@dataclass
class BenchConfig:
    dataset: Path
    variants: list[VariantSpec]
    batches: tuple[int, ...] = (1, 4, 8)
    runs: int = 50
    warmup: int = 5
    limit: int | None = None
    describe_batch: int | None = None  # None: the artifact's default batch (memory estimate)
    ks: tuple[int, ...] = KS
    fidelity_ks: tuple[int, ...] = (1, 5, 10)
    search_runs: int = 200
    match_grid: int = 4
    grid_k: int = 5
    baseline: str | None = None  # None: PyTorch FP32 if present
    backend: str = "auto"
    providers: list[str] | None = None
    threads: int | None = None
    weights: str | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    preprocess: str | None = None  # 'exact' | 'fast' (None: the artifact's default)
    workers: int | None = None  # preprocessing threads
    ort_graph: str = "auto"  # ONNX Runtime variants: 'auto' | 'portable' (per variant: NAME@portable=DIR)
    spin: str = "on"  # ONNX Runtime threads between ops: 'on' (spin, ORT's default) | 'off' (sleep)

    def check(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"--batches must be positive integers, got {self.batches}")
        if self.runs < 3:
            raise ConfigError(f"--runs must be >= 3 for percentiles to mean anything, got {self.runs}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"--limit must be >= 2, got {self.limit}")
        if self.describe_batch is not None and self.describe_batch < 1:
            raise ConfigError(f"--describe-batch must be >= 1, got {self.describe_batch}")
        names = [v.name for v in self.variants]
        if self.baseline is not None and self.baseline not in names:
            raise ConfigError(f"--baseline {self.baseline!r} is not a variant; variants: {', '.join(names)}")


@dataclass
class Subset:
    """The images benchmarked: all of the dataset, or `--limit` of it with ground truth remapped."""

    name: str
    database: list[Path]
    queries: list[Path]
    positives: list[np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


def select_subset(ds, limit: int | None) -> Subset:
    """`limit` evenly spaced queries; the database keeps every positive of those queries and is
    filled with evenly spaced other images up to `limit` (so recall stays meaningful on a sample)."""
    info = {"dataset": ds.summary(), "limited": False}
    if limit is None or (limit >= len(ds.queries) and limit >= len(ds.database)):
        return Subset(ds.name, list(ds.database), list(ds.queries), list(ds.positives), info)
    q_idx = evenly_spaced(len(ds.queries), limit)
    keep = np.unique(np.concatenate([ds.positives[i] for i in q_idx] + [np.zeros(0, np.int64)])).astype(np.int64)
    if len(keep) < limit:
        others = np.setdiff1d(np.arange(len(ds.database)), keep)
        keep = np.union1d(keep, others[evenly_spaced(len(others), limit - len(keep))] if len(others) else others)
    new_of = {int(old): new for new, old in enumerate(keep)}
    positives = [np.array([new_of[int(p)] for p in ds.positives[i]], dtype=np.int64) for i in q_idx]
    info.update({"limited": True, "limit": limit, "query_indices": q_idx.tolist(), "database_indices": keep.tolist()})
    return Subset(ds.name, [ds.database[i] for i in keep], [ds.queries[i] for i in q_idx], positives, info)


# -- measuring ----------------------------------------------------------------------------------
def measure_latency(describer, paths: list[Path], batch: int, runs: int, warmup: int) -> dict[str, Any]:
    """At one batch size, three ways (each after `warmup` untimed batches):
    - latency: `runs` batches of `batch` images drawn cyclically from `paths`, one `describe` call each
      (decode included, nothing overlaps the next batch): wall time per image and the stage clocks;
    - pipelined throughput: the same `runs` x `batch` images as one stream (`Describer.stream`), decoding
      and preprocessing in the pool ahead of the backend;
    - backend-only throughput: the same batches preprocessed beforehand, fed to `forward` (the ceiling
      the pipeline is measured against);
    and the peak RSS over the three."""
    pool = cycle(paths)
    with PeakRss() as rss:
        for _ in range(warmup):
            describer.describe(list(islice(pool, batch)), batch=batch)
        per_image, batch_ms = [], []
        stages: dict[str, list[float]] = {s: [] for s in STAGES}
        timed: list[list[Path]] = []
        for _ in range(runs):
            chunk = list(islice(pool, batch))
            timed.append(chunk)
            describer.reset_timings()
            t0 = time.perf_counter()
            describer.describe(chunk, batch=batch)
            dt = time.perf_counter() - t0
            batch_ms.append(1000.0 * dt)
            per_image.append(1000.0 * dt / batch)
            for s in STAGES:
                stages[s].append(1000.0 * describer.timings.get(s, 0.0) / batch)
        stream = [p for chunk in timed for p in chunk]
        t0 = time.perf_counter()
        done = sum(1 for d in describer.stream(stream, batch) if d.ok)
        pipelined_s = time.perf_counter() - t0
        arrays = [np.stack([describer.preprocess(p) for p in chunk]) for chunk in timed]
        t0 = time.perf_counter()
        for x in arrays:
            describer.forward(x, batch)
        backend_s = time.perf_counter() - t0
    del arrays
    stage_ms = {s: float(np.median(v)) for s, v in stages.items()}
    median = float(np.median(per_image))
    stage_ms["other"] = max(0.0, median - sum(stage_ms.values()))
    pipelined_ips = done / pipelined_s if pipelined_s > 0 else None
    backend_ips = batch * runs / backend_s if backend_s > 0 else None
    return {
        "batch": batch,
        "warmup": warmup,
        "runs": runs,
        "preprocess": describer.preprocess_mode,
        "workers": describer.workers,
        "per_image_ms": percentiles(per_image),
        "batch_ms": percentiles(batch_ms),
        "throughput_ips": float(batch * runs / (sum(batch_ms) / 1000.0)),
        "pipelined_ips": pipelined_ips,
        "backend_only_ips": backend_ips,
        "pipelined_vs_backend_only": pipelined_ips / backend_ips if pipelined_ips and backend_ips else None,
        "preprocess_share": stage_ms["preprocess"] / median if median > 0 else None,
        "stages_ms_per_image": stage_ms,
        "memory": rss.report(),
    }


def measure_search(db: np.ndarray, queries: np.ndarray, k: int, runs: int, warmup: int) -> dict[str, Any]:
    """Exact inner-product search in the runtime's 'flat' map index, one query at a time."""
    from vpr_edge.runtime import map_index

    index = map_index.build_index(db, {"type": "flat"})
    q = np.ascontiguousarray(queries, dtype=np.float32)
    order = cycle(range(len(q)))
    for _ in range(warmup):
        i = next(order)
        map_index.search(index, q[i : i + 1], k)
    times = []
    for _ in range(runs):
        i = next(order)
        t0 = time.perf_counter()
        map_index.search(index, q[i : i + 1], k)
        times.append(1000.0 * (time.perf_counter() - t0))
    return {"index": "flat", "database": int(len(db)), "k": int(k), "per_query_ms": percentiles(times)}


def overhead_ratio(lat: dict[str, Any], search_ms: float) -> dict[str, float]:
    """(preprocess + aggregation + search) / backbone, per image at that batch size."""
    st = lat["stages_ms_per_image"]
    runtime = st["preprocess"] + st["aggregation"] + search_ms
    return {
        "runtime_ms": runtime,
        "backbone_ms": st["backbone"],
        "ratio": runtime / st["backbone"] if st["backbone"] > 0 else float("inf"),
    }


def space_differences(a: Path, b: Path) -> list[str]:
    """Why descriptors of artifacts `a` and `b` are not comparable (empty: they are): `space.differences`
    of their manifests, the one rule maps use too."""
    from vpr_edge.space import differences

    return differences(Manifest.load(a).space, Manifest.load(b).space)


def _fidelity(ref: dict | None, spec: VariantSpec, desc: np.ndarray, sub: Subset, ks) -> dict[str, Any] | None:
    if ref is None or ref["name"] == spec.name:
        return None
    diffs = space_differences(spec.path, ref["path"])
    if diffs:
        return {"comparable": False, "reference": ref["name"], "why": diffs}
    if desc.shape != ref["descriptors"].shape:
        return {"comparable": False, "reference": ref["name"], "why": [f"shape {desc.shape} != {ref['descriptors'].shape}"]}
    n_db = len(sub.database)
    rep = fidelity.compare_descriptors(
        ref["descriptors"], desc, np.arange(n_db), np.arange(n_db, n_db + len(sub.queries)), sub.positives, ks
    )
    return {"comparable": True, "reference": ref["name"], **rep}


def bench_variant(cfg: BenchConfig, spec: VariantSpec, sub: Subset, ref: dict | None) -> tuple[dict[str, Any], dict]:
    """Measure one variant; returns (its results, arrays kept for plots / the reference)."""
    paths = list(sub.database) + list(sub.queries)
    n_db = len(sub.database)
    kmax = max(max(cfg.ks), cfg.grid_k)
    gpu_before = gpu_process_memory_mb()
    with PeakRss() as rss:
        t0 = time.perf_counter()
        v: OpenedVariant = open_variant(
            spec, backend=cfg.backend, providers=cfg.providers, threads=cfg.threads, weights=cfg.weights,
            device=cfg.device, preprocess=cfg.preprocess, workers=cfg.workers, ort_graph=cfg.ort_graph,
            spin=cfg.spin,
        )
        load_s = time.perf_counter() - t0
        try:
            log.info("%s: describing %d images", spec.name, len(paths))
            t0 = time.perf_counter()
            desc = v.describer.describe(paths, batch=cfg.describe_batch, progress=cfg.progress)
            describe_s = time.perf_counter() - t0
            if not np.isfinite(desc).all():
                log.warning("%s: %d non-finite descriptor values", spec.name, int((~np.isfinite(desc)).sum()))
            db, q = desc[:n_db], desc[n_db:]
            ranked = fidelity.rank_database(db, q, kmax)
            recall = fidelity.recall_at_k(ranked, sub.positives, cfg.ks)
            fid = _fidelity(ref, spec, desc, sub, cfg.fidelity_ks)
            search = measure_search(db, q, max(cfg.ks), cfg.search_runs, max(cfg.warmup, 1))
            latency, overhead = {}, {}
            for b in cfg.batches:
                log.info("%s: latency at batch %d (%d warm-up + %d runs)", spec.name, b, cfg.warmup, cfg.runs)
                lat = measure_latency(v.describer, list(sub.queries), b, cfg.runs, cfg.warmup)
                latency[str(b)] = lat
                overhead[str(b)] = overhead_ratio(lat, search["per_query_ms"]["p50"])
            gpu_now = gpu_process_memory_mb()
            gpu_peak = v.gpu_peak_mb()
        finally:
            v.close()
    memory = {**rss.report()}
    if gpu_peak is not None:
        memory["gpu_peak_allocated_mb"] = gpu_peak
    if gpu_now is not None:
        memory["gpu_process_mb"] = gpu_now
        memory["gpu_process_increase_mb"] = gpu_now - (gpu_before or 0.0)
    result = {
        "info": v.info,
        "load_s": load_s,
        "describe_s": describe_s,
        "describe_ips": len(paths) / describe_s if describe_s > 0 else None,
        "accuracy": recall,
        "fidelity": fid,
        "search": search,
        "latency": latency,
        "overhead": overhead,
        "memory": memory,
    }
    arrays = {"ranked": ranked, "descriptors": desc}
    gc.collect()
    return result, arrays


def ratios(results: dict[str, dict], baseline: str) -> dict[str, dict[str, Any]]:
    """Each variant against `baseline`: latency speed-up (baseline p50 / variant p50 per image),
    throughput ratio, recall@1 difference (points), peak RSS ratio."""
    base = results[baseline]
    out = {}
    for name, r in results.items():
        row: dict[str, Any] = {"speedup_p50": {}, "throughput_ratio": {}}
        for b, lat in r["latency"].items():
            bl = base["latency"].get(b)
            if bl is None:
                continue
            row["speedup_p50"][b] = bl["per_image_ms"]["p50"] / lat["per_image_ms"]["p50"]
            row["throughput_ratio"][b] = lat["throughput_ips"] / bl["throughput_ips"]
        row["recall_at_1_delta"] = r["accuracy"]["R@1"] - base["accuracy"]["R@1"]
        row["peak_rss_ratio"] = r["memory"]["rss_peak_mb"] / base["memory"]["rss_peak_mb"]
        out[name] = row
    return out


def run_dataset_bench(cfg: BenchConfig, header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict], Subset]:
    """All variants on one dataset. Returns (results JSON, per-variant arrays, the subset used)."""
    from vpr_edge import datasets

    cfg.check()
    ds = datasets.load_dataset(cfg.dataset)
    sub = select_subset(ds, cfg.limit)
    if not len(sub.queries) or not len(sub.database):
        raise ConfigError(f"{cfg.dataset}: nothing to benchmark ({len(sub.database)} database, {len(sub.queries)} queries)")
    results: dict[str, dict] = {}
    arrays: dict[str, dict] = {}
    ref = None
    for spec in cfg.variants:
        res, arr = bench_variant(cfg, spec, sub, ref)
        results[spec.name] = res
        arrays[spec.name] = {"ranked": arr["ranked"][:, : max(cfg.grid_k, max(cfg.ks))]}
        if spec.name == PYTORCH_FP32 and ref is None:
            ref = {"name": spec.name, "path": spec.path, "descriptors": arr["descriptors"]}
        del arr
    baseline = cfg.baseline or (PYTORCH_FP32 if PYTORCH_FP32 in results else None)
    ratio = ratios(results, baseline) if baseline else None
    targets = {
        "overhead_le_10pct_of_backbone": {
            name: {b: {"ratio": o["ratio"], "met": bool(o["ratio"] <= OVERHEAD_TARGET)} for b, o in r["overhead"].items()}
            for name, r in results.items()
        }
    }
    out = {
        **header,
        "dataset": {"path": str(cfg.dataset), "name": sub.name, "database": len(sub.database),
                    "queries": len(sub.queries), **sub.info},
        "reference": ref["name"] if ref else None,
        "baseline": baseline,
        "variants": results,
        "ratios": ratio,
        "targets": targets,
    }
    return out, arrays, sub
