"""The teacher cache: what the teacher said about every view of every image, on disk, memory-mapped.

Layout of a cache folder:

    manifest.json              the vpr-edge manifest (kind 'teacher-cache', `vpr_edge.manifest`), written
                               last (its presence = the cache is complete): the teacher's descriptor
                               space and identity, every file with role, bytes and sha256, and in
                               `details` the build plan (preprocessing, head, views and their config,
                               image list with byte sizes and sha256, shard size, array layout), the
                               shard list (items, files with shape and dtype) and skipped images
    plan.json                  the build plan alone, written first: a resumed build must match it
    centers.npy                VLAD centres [K, D] float32 (VLAD teachers)
    pca_mean.npy, pca_proj.npy the teacher's PCA-whitening (PCA teachers)
    shards/00000.features.npy     float16 [n, N, D]  per-patch facet features (L2-normalised)
    shards/00000.descriptors.npy  float32 [n, dim]   teacher descriptors
    shards/00000.assign.npy       uint8/int16 [n, N] hard VLAD cluster per patch (VLAD teachers)
    shards/00000.views.npy        float64 [n, 12]    views.COLUMNS: image, view, crop box, flip, jitter
    shards/00000.json             the shard record, written after its arrays: its presence commits
                                  the shard (files with bytes / sha256, image sha256s, skipped images)

A shard holds the views of `shard_size` consecutive images of the plan (fewer items when images
were unreadable), so shard k always covers the same images and a killed build resumes at the first
uncommitted shard without recomputing or losing a committed one. Every file is written under a
temporary name and renamed when complete (`atomic.atomic_file`); one builder at a time (flock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.atomic import atomic_file, write_json
from vpr_edge.datasets import list_images
from vpr_edge.distill import views as V
from vpr_edge.distill.teacher import head_info
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.integrity import file_sha256 as sha256_file
from vpr_edge.presets import Preprocess

FORMAT = "vpr-edge-teacher-cache"  # of the plan and shard records; the cache's manifest is a vpr-edge manifest
FORMAT_VERSION = 1
KIND = "teacher-cache"
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARDS = "shards"
ARRAYS = ("features", "descriptors", "assign", "views")
DEFAULT_SHARD_SIZE = 64  # images per shard: 64 x 4 views of ViT-G features = 200 MB in RAM while built

def _canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so dicts from code and from files compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def plan_diff(have: dict | None, want: dict | None) -> list[str]:
    """Top-level keys whose values differ between two build plans (empty: the same plan)."""
    a, b = _canonical(have or {}), _canonical(want or {})
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _header(kind: str) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind}


def _shard_name(k: int) -> str:
    return f"{k:05d}"


def _read_json(path: Path, kind: str, fix: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ArtifactError(f"{path} is not a vpr-edge teacher cache file (format {got!r}, expected {FORMAT!r}); {fix}")
    if d.get("kind") != kind:
        raise ArtifactError(f"{path} is a {d.get('kind')!r} file, expected {kind!r}; {fix}")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        what = "upgrade vpr-edge" if isinstance(version, int) and version > FORMAT_VERSION else "rebuild the cache"
        raise ArtifactError(f"{path} has format_version {version!r}, this vpr-edge reads {FORMAT_VERSION}; {what}")
    return d


def _resolve_images(images) -> tuple[Path, list[Path]]:
    """A folder (listed with datasets.list_images) or a sequence of files -> (root, files)."""
    # absolute, not resolved: a folder of symlinks keeps its files inside it
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        files = list_images(folder)  # InputError for a missing or empty folder
        return Path(os.path.abspath(folder)), [Path(os.path.abspath(p)) for p in files]
    files = [Path(os.path.abspath(p)) for p in images]
    if not files:
        raise InputError("no images given to build a teacher cache from; pass a folder or a list of image files")
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    return root, files


def _plan(
    teacher, root: Path, files: list[Path], views: int, seed: int, shard_size: int, view_config: V.ViewConfig
) -> dict:
    pre = teacher.preprocess
    if not isinstance(pre, Preprocess):
        raise ConfigError(f"teacher.preprocess must be a presets.Preprocess, got {type(pre).__name__}")
    grid = tuple(int(g) for g in teacher.grid)
    head = head_info(teacher)
    entries = []
    for p in files:
        try:
            size = p.stat().st_size
        except OSError:
            size = None
        entries.append({"path": p.relative_to(root).as_posix(), "bytes": size})
    n_shards = -(-len(files) // shard_size)
    return _header("teacher-cache-plan") | {
        "teacher": {
            "space": teacher.space,
            "identity": teacher.identity,
            "preprocess": asdict(pre),
            "feature_dim": int(teacher.feature_dim),
            "grid": list(grid),
            "tokens": grid[0] * grid[1],
            "descriptor_dim": int(teacher.descriptor_dim),
            "head": head,
        },
        "views": {"count": int(views), "seed": int(seed), "config": view_config.to_dict(), "columns": list(V.COLUMNS)},
        "images": {"root": str(root), "count": len(files), "files": entries},
        "shard_size": int(shard_size),
        "shards": n_shards,
        "arrays": {
            "features": "float16 [items, tokens, feature_dim]",
            "descriptors": "float32 [items, descriptor_dim]",
            "assign": ("uint8" if head["clusters"] <= 255 else "int16") + " [items, tokens] (VLAD teachers)",
            "views": f"float64 [items, {len(V.COLUMNS)}] (views.columns)",
        },
    }


def _plan_key(plan: dict) -> str:
    return hashlib.sha256(json.dumps(_canonical(plan), sort_keys=True).encode()).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    with atomic_file(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    return {
        "name": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
    }


def _check_file(path: Path, info: dict, deep: bool, fix: str) -> None:
    """A shard/side file is present with its recorded size, shape, dtype (and sha256 when deep)."""
    try:
        size = path.stat().st_size
    except OSError:
        raise ArtifactError(f"{path} is missing; {fix}") from None
    if size != info["bytes"]:
        raise ArtifactError(f"{path} has {size} bytes, its record says {info['bytes']}: truncated or replaced; {fix}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"{path} is not a readable .npy file ({exc}); {fix}") from None
    if list(arr.shape) != list(info["shape"]) or str(arr.dtype) != info["dtype"]:
        raise ArtifactError(
            f"{path} holds {arr.dtype} {list(arr.shape)}, its record says {info['dtype']} {info['shape']}; {fix}"
        )
    if deep and sha256_file(path) != info["sha256"]:
        raise ArtifactError(f"{path} does not match its recorded sha256: the file is corrupt; {fix}")


@contextlib.contextmanager
def _lock(folder: Path):
    import fcntl

    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(
                f"{folder} is being written by another cache build; wait for it or choose another output"
            ) from None
        yield
    finally:
        os.close(fd)


def _report(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_cache(
    images,
    teacher,
    output: str | os.PathLike,
    *,
    views: int = 1,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    batch_size: int = 16,
    workers: int = 0,
    view_config: V.ViewConfig = V.ViewConfig(),
    report: Callable[[str], None] = _report,
    on_shard: Callable[[int], None] | None = None,
) -> "TeacherCache":
    """Run `teacher` (see distill.teacher.Teacher) on `views` views of every image; write the cache.

    `images`: a folder (listed like every other command lists images) or a sequence of files.
    Resumable: an existing `output` with the same plan continues at its first uncommitted shard; one
    with another plan is refused. Unreadable images are reported (one line naming the file) and
    skipped; if no image is readable it is an InputError. `workers` threads decode and preprocess
    images ahead of the teacher. `on_shard(k)` is called after shard k is committed (tests inject
    failures there). Returns the opened cache.
    """
    if views < 1:
        raise ConfigError(f"views must be >= 1 (view 0 is the plain image), got {views}")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    out = Path(output)
    root, files = _resolve_images(images)
    plan = _plan(teacher, root, files, views, seed, shard_size, view_config)
    key = _plan_key(plan)
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder; choose another cache output")
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    with _lock(out):
        if (out / PLAN).exists():
            old = _read_json(out / PLAN, "teacher-cache-plan", f"delete {out} or choose another output")
            diff = plan_diff(old, plan)
            if diff:
                detail = ", ".join(diff)
                if "teacher" in diff:
                    detail += " (" + ", ".join(plan_diff(old.get("teacher"), plan["teacher"])) + ")"
                raise ArtifactError(
                    f"{out} holds a teacher cache built with another plan ({detail} differ); "
                    f"choose another output, or delete {out} to rebuild it"
                )
        else:
            write_json(out / PLAN, plan)
        if (out / MANIFEST).exists():
            return open_cache(out, verify="size")
        _write_side_files(out, teacher)
        for tmp in (out / SHARDS).glob(".*.partial"):  # left by a killed build
            tmp.unlink(missing_ok=True)

        n_shards = plan["shards"]
        records: list[dict | None] = [_committed(out, k, key) for k in range(n_shards)]
        from tqdm import tqdm

        done_images = sum(r["images"][1] - r["images"][0] for r in records if r is not None)
        bar = tqdm(total=len(files), initial=done_images, desc="teacher cache", unit="img", disable=not progress)
        try:
            for k in range(n_shards):
                if records[k] is not None:
                    continue
                lo, hi = k * shard_size, min(len(files), (k + 1) * shard_size)
                records[k] = _build_shard(
                    out, k, lo, hi, files, root, teacher, plan, key, batch_size, workers, view_config, report, bar
                )
                if on_shard is not None:
                    on_shard(k)
        finally:
            bar.close()
        total = sum(r["items"] for r in records)
        if total == 0:
            if created:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
            raise InputError(f"{root}: none of the {len(files)} images could be read; nothing to distill from")
        _write_manifest(out, plan, key, records)
    return open_cache(out, verify="size")


def _write_side_files(out: Path, teacher) -> None:
    centers = getattr(teacher, "centers", None)
    if centers is not None:
        _save_npy(out / "centers.npy", np.ascontiguousarray(centers, dtype=np.float32))
    pca = getattr(teacher, "pca", None)
    if pca is not None:
        for name, arr in zip(("pca_mean", "pca_proj"), pca):
            _save_npy(out / f"{name}.npy", np.ascontiguousarray(arr, dtype=np.float32))


def _committed(out: Path, k: int, key: str) -> dict | None:
    """Shard k's record when the shard is complete and intact, else None (it gets rebuilt)."""
    path = out / SHARDS / f"{_shard_name(k)}.json"
    if not path.exists():
        return None
    try:
        rec = _read_json(path, "teacher-cache-shard", "")
        if rec.get("plan") != key or rec.get("shard") != k:
            return None
        for info in rec["files"].values():
            _check_file(out / SHARDS / info["name"], info, deep=True, fix="")
    except (ArtifactError, KeyError, TypeError):
        _report(f"{path}: shard record or files damaged; rebuilding shard {k}")
        path.unlink(missing_ok=True)
        return None
    return rec


def _prepare(idx: int, path: Path, views: int, seed: int, vc: V.ViewConfig, pre: Preprocess):
    """Decode image idx, draw and render its views, preprocess them for the teacher."""
    from vpr_edge.imaging.decode import load_rgb
    from vpr_edge.imaging.exact import preprocess_rgb

    try:
        rgb = load_rgb(path)
    except InputError as exc:
        return idx, None, str(exc), None
    vs = V.draw_views(idx, rgb.shape[:2], views, seed, vc)
    x = np.stack([preprocess_rgb(V.render(rgb, v, str(path)), pre) for v in vs])
    return idx, vs, x, sha256_file(path)


def _build_shard(out, k, lo, hi, files, root, teacher, plan, key, batch_size, workers, vc, report, bar) -> dict:
    from vpr_edge.models.vlad import HardVLAD

    t = plan["teacher"]
    n_tok, dim, ddim = t["tokens"], t["feature_dim"], t["descriptor_dim"]
    centers = getattr(teacher, "centers", None)
    vlad = None
    if centers is not None:
        import torch

        vlad = HardVLAD(torch.as_tensor(np.asarray(centers, dtype=np.float32)))
    assign_dtype = np.uint8 if t["head"]["clusters"] <= 255 else np.int16
    feats, descs, assigns, rows, skipped, shas = [], [], [], [], [], {}
    pending: list[np.ndarray] = []  # preprocessed views waiting for a full teacher batch

    def flush() -> None:
        if not pending:
            return
        x = np.stack(pending)
        pending.clear()
        f, d = teacher(x)
        f, d = np.asarray(f), np.asarray(d)
        if f.shape != (len(x), n_tok, dim) or d.shape != (len(x), ddim):
            raise ArtifactError(
                f"teacher returned features {f.shape} and descriptors {d.shape} for {len(x)} images, it declares "
                f"[{len(x)}, {n_tok}, {dim}] and [{len(x)}, {ddim}]; fix the teacher's grid/feature_dim/descriptor_dim"
            )
        if not (np.isfinite(f).all() and np.isfinite(d).all()):
            raise ArtifactError(f"teacher returned NaN/inf for images of shard {k} ({files[lo]} ...); check the teacher")
        feats.append(f.astype(np.float16))
        descs.append(d.astype(np.float32))
        if vlad is not None:
            import torch

            assigns.append(vlad.assign(torch.from_numpy(f.astype(np.float32))).numpy().astype(assign_dtype))

    args = [(i, files[i], plan["views"]["count"], plan["views"]["seed"], vc, teacher.preprocess) for i in range(lo, hi)]
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        results = pool.map(lambda a: _prepare(*a), args) if pool else (_prepare(*a) for a in args)
        for idx, vs, x, sha in results:
            if vs is None:
                report(f"skipped: {x}")
                skipped.append({"image": idx, "path": files[idx].relative_to(root).as_posix(), "error": x})
            else:
                shas[str(idx)] = sha
                rows.extend(v.to_row() for v in vs)
                for row in x:
                    pending.append(row)
                    if len(pending) == batch_size:
                        flush()
            bar.update(1)
        flush()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    name = _shard_name(k)
    record = _header("teacher-cache-shard") | {
        "plan": key,
        "shard": k,
        "images": [lo, hi],
        "items": len(rows),
        "files": {},
        "image_sha256": shas,
        "skipped": skipped,
    }
    if rows:
        arrays = {
            "features": np.concatenate(feats),
            "descriptors": np.concatenate(descs),
            "views": np.stack(rows),
        }
        if vlad is not None:
            arrays["assign"] = np.concatenate(assigns)
        for a, arr in arrays.items():
            record["files"][a] = _save_npy(out / SHARDS / f"{name}.{a}.npy", arr)
    write_json(out / SHARDS / f"{name}.json", record)  # commits the shard
    return record


def _write_manifest(out: Path, plan: dict, key: str, records: list[dict]) -> None:
    side = {}
    for name in ("centers", "pca_mean", "pca_proj"):
        p = out / f"{name}.npy"
        if p.exists():
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            side[name] = {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p),
                          "shape": list(arr.shape), "dtype": str(arr.dtype)}
    shas = {}
    for r in records:
        shas.update(r["image_sha256"])
    files = plan["images"]["files"]
    for i, e in enumerate(files):
        e["sha256"] = shas.get(str(i))
    manifest = _header(KIND) | {k: v for k, v in plan.items() if k not in ("format", "format_version", "kind")}
    manifest |= {
        "plan": key,
        "complete": True,
        "items": sum(r["items"] for r in records),
        "side_files": side,
        "shard_list": [
            {"shard": r["shard"], "record": f"{SHARDS}/{_shard_name(r['shard'])}.json", "images": r["images"],
             "items": r["items"], "files": r["files"]}
            for r in records
        ],
        "skipped": [s for r in records for s in r["skipped"]],
    }
    from vpr_edge.manifest import Manifest, package_versions

    m = Manifest(kind=KIND, preset={}, space=plan["teacher"]["space"], identity=plan["teacher"]["identity"],
                 versions=package_versions("numpy", "torch", "onnxruntime"), details=manifest)
    for info in side.values():
        m.files[info["name"]] = {"role": "teacher-head", "bytes": info["bytes"], "sha256": info["sha256"]}
    for r in records:
        for a, info in r["files"].items():
            m.files[f"{SHARDS}/{info['name']}"] = {"role": f"shard-{a}", "bytes": info["bytes"], "sha256": info["sha256"]}
    m.save(out)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class TeacherCache:
    """A complete cache, memory-mapped. Item i = one view of one image; `cache[i]` gives its arrays."""

    def __init__(self, path: Path, manifest: dict, image_root: Path | None, verify: str) -> None:
        self.path = path
        self.manifest = manifest
        t = manifest["teacher"]
        self.space: dict = t["space"]
        self.identity: dict = t["identity"]
        pre = dict(t["preprocess"])
        for k in ("image_size", "mean", "std"):
            pre[k] = tuple(pre[k])
        self.preprocess = Preprocess(**pre)
        self.feature_dim = int(t["feature_dim"])
        self.grid = tuple(t["grid"])
        self.descriptor_dim = int(t["descriptor_dim"])
        self.head: dict = t["head"]
        self.views_per_image = int(manifest["views"]["count"])
        self.image_root = Path(image_root) if image_root is not None else Path(manifest["images"]["root"])
        self.image_files = [e["path"] for e in manifest["images"]["files"]]
        deep = verify == "sha256"
        side = manifest.get("side_files", {})
        fix_side = f"the cache is damaged: rebuild it (delete {path})"
        for info in side.values():
            _check_file(path / info["name"], info, deep, fix_side)
        self.centers = np.load(path / "centers.npy", allow_pickle=False) if "centers" in side else None
        self.pca = (
            (np.load(path / "pca_mean.npy", allow_pickle=False), np.load(path / "pca_proj.npy", allow_pickle=False))
            if "pca_mean" in side else None
        )
        if self.head["kind"] == "vlad" and self.centers is None:
            raise ArtifactError(f"{path / MANIFEST} declares a VLAD teacher but lists no centers.npy; {fix_side}")
        self._shards = []
        for s in manifest["shard_list"]:
            if not s["items"]:
                continue
            fix = f"the shard is corrupt: delete {path / s['record']} and re-run the cache build to recompute it"
            arrays = {}
            for a, info in s["files"].items():
                f = path / SHARDS / info["name"]
                _check_file(f, info, deep, fix)
                arrays[a] = np.load(f, mmap_mode="r", allow_pickle=False)
            self._shards.append(arrays)
        counts = np.array([len(s["views"]) for s in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.views_table = (
            np.concatenate([s["views"] for s in self._shards]) if self._shards else np.zeros((0, len(V.COLUMNS)))
        )
        self.items = self.views_table[:, :2].astype(np.int64)  # (image, view) per item

    def __len__(self) -> int:
        return int(self._offsets[-1])

    # DataLoader workers started by spawn/forkserver get the cache pickled: send the path, map again
    def __getstate__(self) -> dict:
        return {"path": self.path, "manifest": self.manifest, "image_root": self.image_root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["manifest"], state["image_root"], verify="size")

    @property
    def num_images(self) -> int:
        return len(self.image_files)

    def _locate(self, i: int) -> tuple[dict, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for a cache of {len(self)} items")
        s = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return self._shards[s], i - int(self._offsets[s])

    def view(self, i: int) -> V.View:
        return V.View.from_row(self.views_table[i])

    def image_path(self, image: int) -> Path:
        return self.image_root / self.image_files[image]

    def features(self, i: int) -> np.ndarray:
        s, r = self._locate(i)
        return s["features"][r]

    def descriptor(self, i: int) -> np.ndarray:
        s, r = self._locate(i)
        return s["descriptors"][r]

    def assignment(self, i: int) -> np.ndarray | None:
        s, r = self._locate(i)
        return s["assign"][r] if "assign" in s else None

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, r = self._locate(int(i))
        return {
            "features": s["features"][r],
            "descriptor": s["descriptors"][r],
            "assign": s["assign"][r] if "assign" in s else None,
            "view": V.View.from_row(s["views"][r]),
        }

    def items_of_images(self, images) -> np.ndarray:
        """Item indices whose image is in `images` (cache order)."""
        return np.flatnonzero(np.isin(self.items[:, 0], np.asarray(list(images), dtype=np.int64)))

    def image_sha256(self) -> dict[int, str]:
        return {i: e["sha256"] for i, e in enumerate(self.manifest["images"]["files"]) if e.get("sha256")}

    def head_module(self):
        """The teacher's aggregator as a frozen torch module (what the student reuses)."""
        from vpr_edge.models.student import build_head

        mean, proj = self.pca if self.pca is not None else (None, None)
        gem_p = self.head.get("gem_p", 3.0)
        return build_head(self.head["kind"], centers=self.centers, gem_p=gem_p, pca_mean=mean, pca_proj=proj)

    @property
    def fingerprint(self) -> str:
        """The build plan's hash: identifies the cache's content."""
        return self.manifest["plan"]


def open_cache(
    path: str | os.PathLike,
    expect_space: dict | None = None,
    *,
    verify: str = "sha256",
    image_root: str | os.PathLike | None = None,
) -> TeacherCache:
    """Open a complete cache; refuse another format/kind/version, another teacher space than
    `expect_space`, an incomplete build and missing/truncated/corrupt shards. `verify`: 'sha256'
    hashes every file, 'size' checks sizes, shapes and dtypes only. `image_root` relocates the images."""
    if verify not in ("sha256", "size"):
        raise ConfigError(f"verify must be 'sha256' or 'size', got {verify!r}")
    path = Path(path)
    man = path / MANIFEST
    if man.exists() and json.loads(man.read_text()).get("kind") == "map":  # a map that kept its teacher features
        from vpr_edge.distill.map_cache import MapTeacherCache
        from vpr_edge.space import require_same

        cache = MapTeacherCache(path, verify=verify)
        if expect_space is not None:
            require_same(cache.space, expect_space, have_name=f"map {path}", want_name="the expected teacher")
        return cache
    if not man.exists():
        if (path / PLAN).exists():
            raise ArtifactError(
                f"{path} is an unfinished teacher cache build (no {MANIFEST}); re-run the same cache build to resume it"
            )
        raise ArtifactError(f"{man} not found: {path} is not a teacher cache; build one with `vpr-edge distill cache`")
    from vpr_edge.manifest import Manifest
    from vpr_edge.space import require_same

    m = Manifest.load(man)
    if m.kind != KIND:
        raise ArtifactError(f"{man} is a {m.kind!r} manifest, not a teacher cache; build one with `vpr-edge distill cache`")
    manifest = m.details
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{man}: teacher cache records of format {manifest.get('format')!r} "
                            f"{manifest.get('format_version')!r}, this vpr-edge reads {FORMAT} {FORMAT_VERSION}; rebuild it")
    if not manifest.get("complete"):
        raise ArtifactError(f"{man} says the cache is incomplete; re-run the cache build to finish it")
    if expect_space is not None:
        require_same(m.space, expect_space, have_name=f"teacher cache {path}", want_name="the expected teacher",
                     fix="use a cache built with this teacher, or rebuild it")
    try:
        return TeacherCache(path, manifest, Path(image_root) if image_root else None, verify)
    except (KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{man} lacks or misstates {exc}; rebuild the cache") from None


def plain_items(cache: TeacherCache, images: Sequence[int] | None = None) -> np.ndarray:
    """Items that are view 0 (the plain image), optionally of the given images only."""
    mask = cache.items[:, 1] == 0
    if images is not None:
        mask &= np.isin(cache.items[:, 0], np.asarray(list(images), dtype=np.int64))
    return np.flatnonzero(mask)
