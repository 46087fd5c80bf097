"""Place-recognition datasets and retrieval metrics with numpy only (no torch, no faiss).

Layouts read by `load_dataset(root)`:
- Corridor-like: `database/`, `queries/`, `ground_truth.csv` with rows `query,positives` where
  positives are space-separated database file names.
- VPR-datasets-downloader (gmberton): `images/test/database` and `images/test/queries` (root may
  also be the `images/test` folder itself); file names carry UTM as `@east@north@...`; positives
  are database images within 25 m of the query.
- VPR-Bench: `query/`, `ref/` and `ground_truth_new.npy`, an object array of rows
  `[query_index, [ref_indices]]` (indices into the numerically sorted file lists). It is a pickle, read
  by `safe_npy.load_npy`, which refuses any pickle that would call more than numpy's array rebuilders.

Images are listed in natural order (numbers inside names compare as numbers), which is also
VPR-Bench's `int(name)` order for its numeric names and plain sorting for zero-padded names.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from vpr_edge.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_RADIUS_M = 25.0


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (supported extensions, natural order); InputError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder not found (or not a folder)")
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = [p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    if not files:
        raise InputError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files, key=lambda p: natural_key(str(p.relative_to(folder))))


def parse_utm(filename: str | Path) -> tuple[float, float] | None:
    """(east, north) from a VPR-datasets-downloader name `@east@north@...`, else None."""
    parts = Path(filename).name.split("@")
    if len(parts) < 3:
        return None
    try:
        east, north = float(parts[1]), float(parts[2])
    except ValueError:
        return None
    if not (np.isfinite(east) and np.isfinite(north)):
        return None
    return east, north


@dataclass
class Dataset:
    name: str
    database: list[Path]
    queries: list[Path]
    positives: list[np.ndarray]  # per query: int64 database indices that show the same place
    layout: str = ""
    database_utm: np.ndarray | None = field(default=None, repr=False)  # [N, 2] where known
    queries_utm: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.positives) != len(self.queries):
            raise InputError(
                f"dataset {self.name}: {len(self.queries)} queries but {len(self.positives)} ground-truth rows"
            )

    def summary(self) -> dict:
        n_pos = [len(p) for p in self.positives]
        return {
            "name": self.name,
            "layout": self.layout,
            "database": len(self.database),
            "queries": len(self.queries),
            "queries_without_positives": int(sum(1 for n in n_pos if n == 0)),
            "mean_positives": float(np.mean(n_pos)) if n_pos else 0.0,
        }


# -- loaders ------------------------------------------------------------------------------------
def load_corridor_like(root: str | Path) -> Dataset:
    root = Path(root)
    db = list_images(root / "database")
    qs = list_images(root / "queries")
    gt = root / "ground_truth.csv"
    if not gt.exists():
        raise InputError(f"{gt}: ground truth not found; expected a CSV with rows `query,positives`")
    db_index = {p.name: i for i, p in enumerate(db)}
    rows: dict[str, np.ndarray] = {}
    with gt.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or [h.strip().lower() for h in header[:2]] != ["query", "positives"]:
            raise InputError(f"{gt}: expected header `query,positives`, got {header}")
        for line_no, row in enumerate(reader, start=2):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise InputError(f"{gt}:{line_no}: expected `query,positives`, got {row}")
            names = row[1].split()
            missing = [n for n in names if n not in db_index]
            if missing:
                raise InputError(f"{gt}:{line_no}: positives {missing[:3]} are not in {root / 'database'}")
            rows[row[0].strip()] = np.array(sorted(db_index[n] for n in names), dtype=np.int64)
    absent = [q.name for q in qs if q.name not in rows]
    if absent:
        raise InputError(f"{gt}: no ground-truth row for {len(absent)} queries (e.g. {absent[0]})")
    return Dataset(root.name, db, qs, [rows[q.name] for q in qs], layout="corridor")


def positives_within(db_utm: np.ndarray, q_utm: np.ndarray, radius: float = DEFAULT_RADIUS_M) -> list[np.ndarray]:
    """Per query, the database indices within `radius` metres (Euclidean in UTM, float64).

    Sort the database by easting, take the easting window by binary search, check the full
    distance there: exact, and O(Q log N + candidates) without a Q x N matrix."""
    db = np.asarray(db_utm, dtype=np.float64).reshape(-1, 2)
    q = np.asarray(q_utm, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(db[:, 0], kind="stable")
    east = db[order, 0]
    lo = np.searchsorted(east, q[:, 0] - radius, side="left")
    hi = np.searchsorted(east, q[:, 0] + radius, side="right")
    out = []
    for i in range(len(q)):
        cand = order[lo[i] : hi[i]]
        d2 = np.sum((db[cand] - q[i]) ** 2, axis=1)
        out.append(np.sort(cand[d2 <= radius * radius]).astype(np.int64))
    return out


def _utms(paths: Sequence[Path], folder: Path) -> np.ndarray:
    utm = []
    for p in paths:
        u = parse_utm(p.name)
        if u is None:
            raise InputError(
                f"{p}: no UTM in the file name; expected `@east@north@...` (VPR-datasets-downloader layout) in {folder}"
            )
        utm.append(u)
    return np.array(utm, dtype=np.float64)


def load_vpr_downloader(root: str | Path, radius: float = DEFAULT_RADIUS_M) -> Dataset:
    root = Path(root)
    nested = (root / "images" / "test").is_dir()
    base = root / "images" / "test" if nested else root
    db = list_images(base / "database", recursive=True)
    qs = list_images(base / "queries", recursive=True)
    db_utm, q_utm = _utms(db, base / "database"), _utms(qs, base / "queries")
    # root may be the dataset folder or its images/test folder; name the dataset either way
    name = root.name if nested or root.name != "test" else (root.parent.parent.name or root.name)
    return Dataset(
        name,
        db,
        qs,
        positives_within(db_utm, q_utm, radius),
        layout="vpr-datasets-downloader",
        database_utm=db_utm,
        queries_utm=q_utm,
    )


def load_vpr_bench(root: str | Path) -> Dataset:
    root = Path(root)
    db = list_images(root / "ref")
    qs = list_images(root / "query")
    gts = [root / "ground_truth_new.npy", root / "ground_truth.npy"]
    gt = next((g for g in gts if g.exists()), None)
    if gt is None:
        raise InputError(f"{root}: VPR-Bench ground truth not found (looked for {', '.join(g.name for g in gts)})")
    from vpr_edge.safe_npy import load_npy

    arr = load_npy(gt)  # an object array, read without running code
    positives: list[np.ndarray | None] = [None] * len(qs)
    for row_no, row in enumerate(arr):
        try:
            qi = int(row[0])
            refs = np.atleast_1d(np.asarray(row[1], dtype=np.int64))
        except (TypeError, ValueError, IndexError):
            raise InputError(f"{gt}: row {row_no} is not [query_index, [ref_indices]]: {row!r}") from None
        if not 0 <= qi < len(qs):
            raise InputError(f"{gt}: row {row_no} names query {qi}, but {root / 'query'} has {len(qs)} images")
        if refs.size and (refs.min() < 0 or refs.max() >= len(db)):
            raise InputError(f"{gt}: row {row_no} names refs outside 0..{len(db) - 1}")
        positives[qi] = np.unique(refs)
    absent = [i for i, p in enumerate(positives) if p is None]
    if absent:
        raise InputError(f"{gt}: no ground-truth row for {len(absent)} queries (e.g. index {absent[0]})")
    return Dataset(root.name, db, qs, positives, layout="vpr-bench")


def dataset_layout(root: str | Path) -> str | None:
    """'corridor' | 'vpr-downloader' | 'vpr-bench' when `root` looks like that layout, else None."""
    root = Path(root)
    if (root / "ground_truth.csv").exists() and (root / "database").is_dir() and (root / "queries").is_dir():
        return "corridor"
    if (root / "images" / "test" / "database").is_dir() or ((root / "database").is_dir() and (root / "queries").is_dir()):
        return "vpr-downloader"
    if (root / "query").is_dir() and (root / "ref").is_dir():
        return "vpr-bench"
    return None


def looks_like_dataset(root: str | Path) -> bool:
    return Path(root).is_dir() and dataset_layout(root) is not None


def collect_images(sources, recursive: bool = False, database_of_datasets: bool = False) -> list[Path]:
    """Files and folders -> absolute image paths, in order, without duplicates.

    recursive: also take images from sub-folders. database_of_datasets: a dataset root (any layout
    `dataset_layout` knows) contributes its database images only (what vocabularies and PCA are fitted on)."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir() and database_of_datasets and looks_like_dataset(p):
            out.extend(load_dataset(p).database)
        elif p.is_dir():
            out.extend(list_images(p, recursive=recursive))
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such image file or folder")
    seen, unique = set(), []
    for p in out:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(Path(key))
    return unique


@dataclass
class Split:
    """A few images to verify or compare on: database images first, then queries."""

    paths: list[Path]
    n_database: int
    positives: list[np.ndarray] | None  # per query: indices into the database part (None: no ground truth)
    source: str
    rest: list[Path] = field(default_factory=list)  # database-like images outside the split

    @property
    def n_queries(self) -> int:
        return len(self.paths) - self.n_database


def verify_split(folder: str | Path, limit: int = 64) -> Split:
    """At most `limit` images of `folder` for verification: the one rule for every stage.

    A dataset (any layout `load_dataset` reads): `limit // 2` evenly spaced database images, the rest
    of the budget evenly spaced queries, ground truth remapped to the kept database images. A plain
    folder: `limit` evenly spaced images, the first half the database, no ground truth. `rest` holds
    up to `limit` other database-like images (evenly spaced), for fitting a vocabulary or PCA on
    images outside the verified ones."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of images or a dataset root")
    if looks_like_dataset(folder):
        ds = load_dataset(folder)
        keep_db = evenly_spaced(len(ds.database), limit // 2)
        remap = {int(old): new for new, old in enumerate(keep_db)}
        keep_q = evenly_spaced(len(ds.queries), limit - len(keep_db))
        positives = [np.asarray([remap[int(p)] for p in ds.positives[qi] if int(p) in remap], dtype=np.int64)
                     for qi in keep_q]
        kept = set(keep_db.tolist())
        rest = [p for i, p in enumerate(ds.database) if i not in kept]
        paths = [ds.database[i] for i in keep_db] + [ds.queries[i] for i in keep_q]
        return Split(paths, len(keep_db), positives, str(folder), [rest[i] for i in evenly_spaced(len(rest), limit)])
    images = list_images(folder)
    if len(images) < 4:
        raise InputError(f"{folder}: found {len(images)} images, need at least 4 (half database, half queries)")
    keep = set(evenly_spaced(len(images), limit).tolist())
    rest = [p for i, p in enumerate(images) if i not in keep]
    paths = [p for i, p in enumerate(images) if i in keep]
    return Split(paths, len(paths) // 2, None, str(folder), [rest[i] for i in evenly_spaced(len(rest), limit)])


def load_dataset(root: str | Path) -> Dataset:
    """Detect the layout of `root` and load it (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    loader = {"corridor": load_corridor_like, "vpr-downloader": load_vpr_downloader, "vpr-bench": load_vpr_bench}
    layout = dataset_layout(root)
    if layout is None:
        raise InputError(
            f"{root}: unknown dataset layout; expected database/ + queries/ + ground_truth.csv (Corridor-like), "
            "images/test/{database,queries} with @east@north@ names (VPR-datasets-downloader), "
            "or query/ + ref/ + ground_truth_new.npy (VPR-Bench)"
        )
    return loader[layout](root)


def evenly_spaced(n: int, limit: int) -> np.ndarray:
    """At most `limit` indices spread evenly over range(n) (all of them when n <= limit)."""
    return np.unique(np.linspace(0, n - 1, num=min(n, limit)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
