"""faiss indexes over L2-normalised descriptors (inner product = cosine similarity).

'flat' (exact, the default) suits maps up to ~1e5 images; 'ivfflat' and 'ivfpq' are trained on
the map itself. Sizes follow faiss' guidance of >= 39 training points per centroid:
nlist = clamp(4 * sqrt(n), 1, n // 39); IVF-PQ uses 2^nbits codewords per sub-quantizer with
nbits = clamp(log2(n / 39), 4, 8) and m = the largest divisor of d that is <= 64 and <= d / 2.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from vpr_edge.atomic import atomic_file
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.lazy import lazy_import

INDEX_TYPES = ("flat", "ivfflat", "ivfpq")
POINTS_PER_CENTROID = 39


def _faiss():
    # faiss' loader logs its AVX2/AVX512 probing at INFO; that is noise in a CLI running at INFO
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return lazy_import("faiss")


def index_params(kind: str, n: int, d: int) -> dict:
    """Training parameters for an index of `kind` over n vectors of dimension d."""
    if kind not in INDEX_TYPES:
        raise ConfigError(f"index must be one of {INDEX_TYPES}, got {kind!r}")
    if kind == "flat":
        return {"type": "flat"}
    if n < POINTS_PER_CENTROID:
        raise ConfigError(
            f"--index {kind} needs at least {POINTS_PER_CENTROID} map images to train, the map has {n}; use --index flat"
        )
    nlist = max(1, min(int(4 * math.sqrt(n)), n // POINTS_PER_CENTROID))
    params = {"type": kind, "nlist": nlist, "nprobe": min(nlist, max(8, nlist // 8))}
    if kind == "ivfpq":
        need = POINTS_PER_CENTROID * 16
        if n < need:
            raise ConfigError(
                f"--index ivfpq needs at least {need} map images to train its codebooks, the map has {n}; use --index flat or ivfflat"
            )
        nbits = max(4, min(8, int(math.log2(n / POINTS_PER_CENTROID))))
        limit = max(1, min(64, d // 2))
        m = next(c for c in range(limit, 0, -1) if d % c == 0)
        params.update({"m": m, "nbits": nbits})
    return params


def build_index(vectors: np.ndarray, params: dict):
    """A trained faiss index holding `vectors` (float32 [n, d])."""
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    d = x.shape[1]
    kind = params["type"]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivfflat":
            index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(
                quantizer, d, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
            )
        index.train(x)  # faiss' Python constructors keep `quantizer` referenced by the index
        index.nprobe = params["nprobe"]
    if len(x):
        index.add(x)
    return index


def add_to_index(index, vectors: np.ndarray) -> None:
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))


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
    if params and "nprobe" in params and hasattr(index, "nprobe"):
        index.nprobe = params["nprobe"]
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]); ids are -1 where fewer than k results exist."""
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
