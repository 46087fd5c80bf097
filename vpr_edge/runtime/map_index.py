"""faiss indexes over L2-normalised descriptors (inner product = cosine similarity).

'flat' (exact, the default) suits maps up to ~1e5 images; 'ivfflat' and 'ivfpq' are trained on
the map itself. Sizes follow faiss' guidance of >= 39 training points per centroid:
nlist = clamp(4 * sqrt(n), 1, n // 39); IVF-PQ uses 2^nbits codewords per sub-quantizer with
nbits = clamp(log2(n / 39), 4, 8) and m = the largest divisor of d that is <= 64 and <= d / 2.
Training uses an evenly spaced sample of max(50 nlist, 40 * 2^nbits) rows (maps are recorded
along routes, so the first rows would be one stretch of road).

IVF-PQ re-ranks by default. PQ codes find candidates cheaply but rank the near-duplicate frames
of one place badly: on the dense synthetic map of `vpr-edge bench map` (1e6 x 512, nlist 4000,
PQ64x8) PQ's own top-1 agrees with exact search for 44% of queries, the exact top-1 is within
PQ's best 300 for 97% and best 500 for all 1000, and it lies in the query's nearest 4 lists for
every query: agreement is lost to PQ's ranking, not to the probes. So the index keeps a
second copy of the vectors at 8 bits per dimension (faiss IndexRefine over an SQ8
IndexScalarQuantizer: d bytes per vector, 4x less than float32; 'flat' keeps float32) and
re-scores the best `rerank` PQ candidates with it. `rerank` is a candidate count, not faiss'
k_factor multiple of k, so a top-1 query gets as many candidates as a top-10 one: it is stored as
the IndexRefine's k_factor (what a k=1 search re-ranks) and `search` scales it by 1/k per call.
nprobe and rerank are search settings: recorded in the map's params, applied on load, and
changeable without rebuilding.
"""

from __future__ import annotations

import logging
import math
import numbers
from pathlib import Path

import numpy as np

from vpr_edge.atomic import atomic_file
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.lazy import lazy_import

INDEX_TYPES = ("flat", "ivfflat", "ivfpq")
REFINE_TYPES = ("none", "sq8", "flat")  # how IVF-PQ keeps the vectors it re-ranks with
OPTION_KEYS = ("nprobe", "refine", "rerank")  # what a user may set; the rest follows from n and d
POINTS_PER_CENTROID = 39
TRAIN_PER_LIST = 50
DEFAULT_REFINE = "sq8"
DEFAULT_RERANK = 500
ID_BYTES = 8  # faiss inverted lists store an int64 id next to each code

_REFINE_FACTORY = {"none": "", "sq8": ",Refine(SQ8)", "flat": ",RFlat"}
_REFINE_BYTES = {"none": lambda d: 0, "sq8": lambda d: d, "flat": lambda d: 4 * d}


def _faiss():
    # faiss' loader logs its AVX2/AVX512 probing at INFO; that is noise in a CLI running at INFO
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return lazy_import("faiss")


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: nlist / 32, at least 16 (all of them for small maps).

    A place's frames fall in a handful of neighbouring lists (the exact top-1 is in the nearest 4
    of 4000 lists for every query of the 1e6 synthetic map); the 30x margin is for real maps,
    whose places are less tight. Scanning PQ codes costs ~linear in nprobe (1e6 map: ~2 ms at
    125 lists, ~6 ms at 500, with re-ranking), re-ranking does not depend on it.
    """
    return min(nlist, max(16, nlist // 32))


def check_options(kind: str, nprobe: int | None = None, refine: str | None = None, rerank: int | None = None) -> None:
    """Refuse options that do not fit an index of `kind` (before any image is described)."""
    if kind not in INDEX_TYPES:
        raise ConfigError(f"index must be one of {INDEX_TYPES}, got {kind!r}")
    if nprobe is not None and kind == "flat":
        raise ConfigError("--nprobe applies to --index ivfflat or ivfpq, not to the exact flat index")
    if (refine is not None or rerank is not None) and kind != "ivfpq":
        raise ConfigError(f"--refine and --rerank apply to --index ivfpq, not to {kind} (which ranks exactly)")
    if refine is not None and refine not in REFINE_TYPES:
        raise ConfigError(f"--refine must be one of {REFINE_TYPES}, got {refine!r}")
    for name, value in (("nprobe", nprobe), ("rerank", rerank)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}")
    if refine == "none" and rerank is not None:
        raise ConfigError("--rerank needs re-ranking; drop it or pass --refine sq8 or flat")


def index_params(
    kind: str,
    n: int,
    d: int,
    *,
    nprobe: int | None = None,
    refine: str | None = None,
    rerank: int | None = None,
) -> dict:
    """Parameters of an index of `kind` over n vectors of dimension d; None = the default choice."""
    check_options(kind, nprobe, refine, rerank)
    if kind == "flat":
        return {"type": "flat"}
    if n < POINTS_PER_CENTROID:
        raise ConfigError(
            f"--index {kind} needs at least {POINTS_PER_CENTROID} map images to train, the map has {n}; use --index flat"
        )
    nlist = max(1, min(int(4 * math.sqrt(n)), n // POINTS_PER_CENTROID))
    params = {"type": kind, "nlist": nlist, "nprobe": int(min(nlist, nprobe or default_nprobe(nlist)))}
    if kind == "ivfpq":
        need = POINTS_PER_CENTROID * 16
        if n < need:
            raise ConfigError(
                f"--index ivfpq needs at least {need} map images to train its codebooks, the map has {n}; use --index flat or ivfflat"
            )
        nbits = max(4, min(8, int(math.log2(n / POINTS_PER_CENTROID))))
        limit = max(1, min(64, d // 2))
        m = next(c for c in range(limit, 0, -1) if d % c == 0)
        params.update({"m": m, "nbits": nbits, "refine": refine or DEFAULT_REFINE})
        if params["refine"] != "none":
            params["rerank"] = int(rerank or DEFAULT_RERANK)
    return params


def factory_string(params: dict) -> str:
    """faiss index_factory description of `params` (metric: inner product)."""
    kind = params["type"]
    if kind == "flat":
        return "Flat"
    if kind == "ivfflat":
        return f"IVF{params['nlist']},Flat"
    # maps saved before re-ranking existed have no "refine" key: plain IVF-PQ
    return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}np" + _REFINE_FACTORY[params.get("refine", "none")]


def bytes_per_vector(params: dict, d: int) -> float:
    """Index memory per map vector (codes, ids, re-rank copy); per-index tables are not counted."""
    kind = params["type"]
    if kind == "flat":
        return 4.0 * d
    if kind == "ivfflat":
        return 4.0 * d + ID_BYTES
    code = math.ceil(params["m"] * params["nbits"] / 8)
    return float(code + ID_BYTES + _REFINE_BYTES[params.get("refine", "none")](d))


def training_size(params: dict, n: int) -> int:
    """Rows to train on: enough for the coarse quantizer and the PQ codebooks, at most n."""
    if params["type"] == "flat":
        return 0
    want = TRAIN_PER_LIST * params["nlist"]
    if params["type"] == "ivfpq":
        want = max(want, 40 * 2 ** params["nbits"])
    return min(n, want)


def new_index(params: dict, train: np.ndarray):
    """An empty faiss index for `params`, trained on `train` (float32 [t, d]), search settings applied."""
    faiss = _faiss()
    x = np.ascontiguousarray(train, dtype=np.float32)
    index = faiss.index_factory(x.shape[1], factory_string(params), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(x)
    apply_search_settings(index, params)
    return index


def build_index(vectors: np.ndarray, params: dict):
    """A trained faiss index holding `vectors` (float32 [n, d])."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    t = training_size(params, len(x))
    sample = x[np.linspace(0, len(x) - 1, t).astype(np.int64)] if 0 < t < len(x) else x
    index = new_index(params, sample)
    if len(x):
        index.add(x)
    return index


def add_to_index(index, vectors: np.ndarray) -> None:
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))


def _ivf(index):
    faiss = _faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index (flat)
        return None


def apply_search_settings(index, params: dict | None) -> None:
    """Set nprobe / rerank from `params` (keys that are absent or None are left as they are)."""
    faiss = _faiss()
    params = params or {}
    nprobe, rerank = params.get("nprobe"), params.get("rerank")
    for name, value in (("nprobe", nprobe), ("rerank", rerank)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}")
    if nprobe is not None:
        ivf = _ivf(index)
        if ivf is None:
            raise ConfigError("--nprobe applies to IVF indexes; this map's index is exact (flat)")
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    if rerank is not None:
        if not isinstance(index, faiss.IndexRefine):
            raise ConfigError("--rerank applies to IVF-PQ maps built with re-ranking (--refine sq8 or flat)")
        index.k_factor = float(rerank)


def search_settings(index) -> dict:
    """{"nprobe": ..., "rerank": ...} of a loaded index (keys only where they apply)."""
    faiss = _faiss()
    out = {}
    ivf = _ivf(index)
    if ivf is not None:
        out["nprobe"] = int(ivf.nprobe)
    if isinstance(index, faiss.IndexRefine):
        out["rerank"] = int(round(index.k_factor))
    return out


def save_index(index, path: Path) -> None:
    faiss = _faiss()
    data = faiss.serialize_index(index)
    with atomic_file(path, "wb") as fh:
        fh.write(np.asarray(data).tobytes())


def load_index(path: Path, params: dict | None = None):
    faiss = _faiss()
    if not Path(path).exists():
        raise ArtifactError(
            f"{path} is missing: the map was not finished; rerun `vpr-edge map build` with the same arguments"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: unreadable faiss index ({str(exc).splitlines()[0]}); rebuild the map") from None
    apply_search_settings(index, params)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]); ids are -1 where fewer than k results exist.

    A re-ranking index re-scores max(rerank, k) candidates whatever k is (see the module docstring).
    """
    faiss = _faiss()
    k = max(1, min(k, index.ntotal))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if isinstance(index, faiss.IndexRefine):
        sp = faiss.IndexRefineSearchParameters()
        sp.k_factor = float(max(1, math.ceil(index.k_factor / k)))  # faiss truncates k * k_factor
        return index.search(q, k, params=sp)
    return index.search(q, k)
