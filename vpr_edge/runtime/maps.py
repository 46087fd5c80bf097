"""Maps: a folder of database descriptors + a faiss index, built resumably from images.

Layout of MAP/:
  manifest.json     kind "map"; preset/space/identity copied from the building artifact (so
                    `space.differences` compares a map with any artifact), details: artifact
                    (path, kind, scope, precision, manifest sha256), index parameters, metadata,
                    chunk_size, complete, count, dim, failed
  chunks/NNNNNN.npy descriptors of one chunk, float32 [n, dim]
  chunks/NNNNNN.json the chunk's files (and UTM), and the images that failed to load; written
                    after the .npy, so its presence is what commits a chunk
  images.jsonl      one line per descriptor row: {"id", "path", "utm"}
  index.faiss       faiss index over all rows (ids = row numbers)
  unreadable.tsv    images that could not be read: path <TAB> error
  teacher/          with `--keep-teacher-features` (backbone-scope artifacts): the artifact's vocabulary/PCA;
                    chunks/NNNNNN.features.npy then holds each row's per-patch features (float16) and the
                    chunk record their source sizes, so a map-specific student is distilled on the map's own
                    images without running the teacher again (`vpr-edge distill train --cache MAP`)

A build killed at any point loses at most the chunk in progress: rerunning the same command
skips every committed image and builds the index at the end from all chunks. `add` appends
chunks the same way (and retries images that were unreadable before).

One writer at a time: `build` and `add` hold an exclusive lock on `.MAP.lock` next to the map
folder (beside it, not inside: `--force` removes the folder), so a second build/add of the same map
is refused instead of interleaving chunk numbers. Where fcntl is missing (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vpr_edge.atomic import atomic_file, check_disk
from vpr_edge.datasets import collect_images, parse_utm
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.integrity import file_sha256, sha256_file
from vpr_edge.manifest import MANIFEST_NAME, Manifest, package_versions
from vpr_edge.space import Identity, require_same
from vpr_edge.runtime import map_index

log = logging.getLogger(__name__)

CHUNKS = "chunks"
IMAGES = "images.jsonl"
INDEX = "index.faiss"
TEACHER = "teacher"
REPORT = "unreadable.tsv"
METADATA = (None, "utm")

OnCommit = Callable[[int, int], None]  # (chunk id, images committed so far)


@contextlib.contextmanager
def writer_lock(folder: Path):
    """Exclusive right to write map `folder`; refused at once (one line, with the holder's pid) if taken."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # keyed on what the path really is: a map reached through a symlink or `..` takes the same lock
    real = Path(os.path.realpath(folder))
    real.parent.mkdir(parents=True, exist_ok=True)
    path = real.parent / f".{real.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ArtifactError(
                f"{folder} is being written by another `vpr-edge map build/add` (pid {holder}); wait for it to "
                "finish, or write to another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race a waiting writer)


# -- chunk store ---------------------------------------------------------------------------------
@dataclass
class Chunk:
    id: int
    files: list[str]
    utm: list[list[float] | None]
    failed: list[dict]
    sha256: str | None = None  # of the chunk's .npy, recorded when it is committed
    features_sha256: str | None = None  # of its teacher features (maps that keep them)
    sizes: list[list[int]] | None = None  # (h, w) of each source image (maps that keep features)


class ChunkStore:
    """Append-only chunks; a chunk exists once its .json (written after its .npy) exists."""

    def __init__(self, folder: Path) -> None:
        self.dir = Path(folder) / CHUNKS

    def committed(self) -> list[Chunk]:
        if not self.dir.is_dir():
            return []
        out = []
        for meta_path in sorted(self.dir.glob("[0-9]*.json")):
            try:
                meta = json.loads(meta_path.read_text())
                out.append(Chunk(int(meta["id"]), list(meta["files"]), list(meta["utm"]), list(meta["failed"]),
                                 meta.get("sha256"), meta.get("features_sha256"), meta.get("sizes")))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ArtifactError(
                    f"{meta_path}: corrupt chunk record ({exc}); delete it and its .npy to re-encode that chunk"
                ) from None
        return sorted(out, key=lambda c: c.id)

    def next_id(self) -> int:
        chunks = self.committed()
        return chunks[-1].id + 1 if chunks else 0

    def commit(self, chunk: Chunk, descriptors: np.ndarray, features: np.ndarray | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        npy = self.dir / f"{chunk.id:06d}.npy"
        with atomic_file(npy, "wb") as fh:
            np.save(fh, np.ascontiguousarray(descriptors, dtype=np.float32))
        chunk.sha256 = file_sha256(npy)
        if features is not None:
            fpath = self.features_path(chunk)
            with atomic_file(fpath, "wb") as fh:
                np.save(fh, np.ascontiguousarray(features, dtype=np.float16))
            chunk.features_sha256 = file_sha256(fpath)
        meta = {
            "id": chunk.id,
            "count": len(chunk.files),
            "files": chunk.files,
            "utm": chunk.utm,
            "failed": chunk.failed,
            "sha256": chunk.sha256,
            **({"features_sha256": chunk.features_sha256, "sizes": chunk.sizes} if chunk.features_sha256 else {}),
        }
        with atomic_file(self.dir / f"{chunk.id:06d}.json", "w") as fh:
            json.dump(meta, fh)

    def features_path(self, chunk: Chunk) -> Path:
        return self.dir / f"{chunk.id:06d}.features.npy"

    def load_features(self, chunk: Chunk, mmap: bool = True) -> np.ndarray:
        """The chunk's teacher features [n, N, D] float16 (maps built with --keep-teacher-features)."""
        path = self.features_path(chunk)
        if not chunk.features_sha256 or not path.is_file():
            raise ArtifactError(f"{path}: no teacher features for this chunk; build the map with --keep-teacher-features")
        if file_sha256(path) != chunk.features_sha256:
            raise ArtifactError(f"{path}: does not match the sha256 its chunk record holds; delete the chunk's files "
                                "and rerun the map build to re-encode it")
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if arr.ndim != 3 or len(arr) != len(chunk.files):
            raise ArtifactError(f"{path}: {arr.shape} features for {len(chunk.files)} files; rebuild the map")
        return arr

    def load(self, chunk: Chunk) -> np.ndarray:
        path = self.dir / f"{chunk.id:06d}.npy"
        if not path.is_file():
            raise ArtifactError(f"{path}: descriptor chunk missing; delete {path.with_suffix('.json').name} to re-encode it")
        if chunk.sha256 and file_sha256(path) != chunk.sha256:
            raise ArtifactError(
                f"{path}: does not match the sha256 its chunk record holds (replaced or corrupted); delete it and its "
                ".json, then rerun the command to re-encode that chunk"
            )
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(
                f"{path}: unreadable descriptor chunk ({exc}); delete it and its .json to re-encode"
            ) from None
        if arr.ndim != 2 or len(arr) != len(chunk.files):
            raise ArtifactError(
                f"{path}: {arr.shape} descriptors for {len(chunk.files)} files; delete it and its .json to re-encode"
            )
        return arr


# -- the map -------------------------------------------------------------------------------------
class Map:
    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.store = ChunkStore(self.folder)

    @classmethod
    def open(cls, folder: str | Path, require_complete: bool = True, verify: bool = True) -> "Map":
        """Open a map; a complete one has its index and image list checked against the manifest (sizes and
        sha256, remembered per file) and its chunks against the recorded list. verify=False: sizes only."""
        from vpr_edge.artifact import verify_files

        folder = Path(folder)
        if not (folder / MANIFEST_NAME).exists():
            raise ArtifactError(f"{folder}: not a map (no {MANIFEST_NAME}); build one with `vpr-edge map build`")
        man = Manifest.load(folder)
        if man.kind != "map":
            raise ArtifactError(f"{folder}: manifest kind is {man.kind!r}, expected 'map'")
        m = cls(folder, man)
        if require_complete and not m.complete:
            pending = m.details.get("pending", "build")
            raise ArtifactError(
                f"{folder}: the last `vpr-edge map {pending}` of this map did not finish; rerun that same command to "
                "resume it"
            )
        if m.complete:
            verify_files(man, folder, hashes=verify)
            m.check_chunks()
        return m

    def check_chunks(self) -> None:
        """Every chunk the finished map recorded is still committed (a deleted chunk is noticed)."""
        recorded = self.details.get("chunks")
        if recorded is None:  # maps written before chunk lists were recorded
            return
        have = {c.id: c for c in self.store.committed()}
        for rec in recorded:
            c = have.get(rec["id"])
            if c is None or len(c.files) != rec["count"] or (rec.get("sha256") and c.sha256 != rec["sha256"]):
                name = self.store.dir / f"{rec['id']:06d}.json"
                raise ArtifactError(
                    f"{name}: chunk {rec['id']:06d} of the finished map is missing or was replaced; rebuild the map "
                    "(`vpr-edge map build --force`) or restore the chunk"
                )

    @property
    def details(self) -> dict:
        return self.manifest.details

    @property
    def complete(self) -> bool:
        return bool(self.details.get("complete"))

    def artifact_path(self, override: str | Path | None = None) -> str:
        """The artifact to describe images with: `override`, else the one the map was built with."""
        if override:
            return str(override)
        recorded = self.details.get("artifact", {}).get("path", "")
        if not recorded or not Path(recorded).exists():
            raise ArtifactError(
                f"map {self.folder} was built with artifact {recorded or '?'}, which is not on this machine; "
                "pass --model ARTIFACT (an artifact of the same descriptor space)"
            )
        return recorded

    def entries(self) -> list[dict]:
        path = self.folder / IMAGES
        if not path.exists():
            raise ArtifactError(f"{path} is missing; rerun `vpr-edge map build` to finish the map")
        out = []
        with path.open() as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ArtifactError(f"{path}:{n}: not a JSON line (truncated?); rebuild the map") from None
        if len(out) != int(self.details.get("count", len(out))):
            raise ArtifactError(f"{path}: {len(out)} entries, the map holds {self.details.get('count')}; rebuild the map")
        return out

    def descriptors(self) -> np.ndarray:
        chunks = self.store.committed()
        parts = [self.store.load(c) for c in chunks]
        dim = int(self.details.get("dim", 0))
        return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)

    def index(self, **search_settings):
        """The loaded faiss index; `search_settings` (nprobe, rerank) override the recorded ones."""
        params = {**self.details.get("index", {}), **{k: v for k, v in search_settings.items() if v is not None}}
        return map_index.load_index(self.folder / INDEX, params)

    def info(self) -> dict:
        chunks = self.store.committed()
        art = self.details.get("artifact", {})
        size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
        return {
            "map": str(self.folder),
            "complete": self.complete,
            "images": sum(len(c.files) for c in chunks),
            "unreadable": int(self.details.get("failed", 0)),
            "dim": self.details.get("dim"),
            "index": self.details.get("index"),
            "metadata": self.details.get("metadata"),
            "chunks": len(chunks),
            "bytes": size,
            "preset": self.manifest.space.get("preset"),
            "artifact": {k: art.get(k) for k in ("path", "kind", "scope", "precision")},
            "created": self.manifest.created,
        }


def _space_refusal(map_man: Manifest, art_man: Manifest, map_folder: Path, artifact: str) -> None:
    """Descriptors of `artifact` may meet the map's exactly when their spaces agree (`space.differences`);
    the identity (network, precision, engine) does not matter for a query: a student that declares the
    teacher's space queries the teacher's map."""
    require_same(
        art_man.space, map_man.space, have_name=f"artifact {artifact}", want_name=f"map {map_folder}",
        fix="use an artifact of the map's descriptor space (the one it was built with, or a student of its teacher), "
        "or rebuild the map with this one",
    )


def _identity_refusal(m: "Map", art_man: Manifest, artifact: str) -> None:
    """A map holds descriptors of one producer: extending or resuming it with another network, weights,
    precision or engine would mix descriptors whose errors differ in one index."""
    have, want = Identity.from_dict(art_man.identity), Identity.from_dict(m.manifest.identity)
    if have != want:
        raise ArtifactError(
            f"map {m.folder} holds descriptors of {want.describe()}; {artifact} is {have.describe()}: a map takes "
            "descriptors of one artifact identity; extend it with the artifact it was built with, or build a new map"
        )


def _map_manifest(art, describer, index: dict, metadata: str | None, chunk_size: int) -> Manifest:
    am = art.manifest
    return Manifest(
        kind="map",
        preset=am.preset,
        space=am.space,
        identity=am.identity,
        versions=package_versions("numpy", "faiss-cpu", "onnxruntime"),
        details={
            "artifact": {
                "path": str(art.folder.resolve()),
                "kind": art.kind,
                "scope": art.scope,
                "precision": art.precision,
                "manifest_sha256": sha256_file(art.folder / MANIFEST_NAME),
            },
            "index": index,
            "metadata": metadata,
            "preprocess": describer.preprocess_mode,  # of the database images (queries may use the other)
            "chunk_size": chunk_size,
            "complete": False,
            "count": 0,
            "dim": describer.dim,
            "failed": 0,
        },
    )


def _encode(
    m: Map,
    describer,
    images: Sequence[Path],
    *,
    retry_failed: bool,
    batch: int,
    chunk_size: int,
    progress: bool,
    on_commit: OnCommit | None,
) -> list[str]:
    """Encode the images not yet committed, chunk by chunk. Returns the paths encoded by this call."""
    chunks = m.store.committed()
    done = {f for c in chunks for f in c.files}
    if not retry_failed:
        done |= {f["path"] for c in chunks for f in c.failed}
    pending = [p for p in images if str(p) not in done]
    if not pending:
        return []
    want_utm = m.details.get("metadata") == "utm"
    keep = bool(m.details.get("teacher_features"))
    next_id = chunks[-1].id + 1 if chunks else 0
    committed = len(done)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), initial=len(images) - len(pending), unit="img", desc=f"map {m.folder.name}")
    encoded: list[str] = []
    try:
        for start in range(0, len(pending), chunk_size):
            part = pending[start : start + chunk_size]
            chunk = Chunk(next_id, [], [], [], sizes=[] if keep else None)
            descs, feats = [], []
            for d in describer.stream(part, batch, keep_raw=keep, sizes=keep):
                if d.error is not None:  # unreadable, or a descriptor that stored would never be returned
                    # (NaN) or would match everything (zero)
                    log.warning("skipping %s: %s", "unreadable image" if d.descriptor is None else "image", d.error)
                    chunk.failed.append({"path": str(d.item), "error": d.error})
                else:
                    chunk.files.append(str(d.item))
                    utm = parse_utm(d.item.name) if want_utm else None
                    chunk.utm.append(list(utm) if utm else None)
                    descs.append(d.descriptor[None])
                    if keep:  # the source size is what a student's views are drawn on
                        feats.append(d.raw[None].astype(np.float16))
                        chunk.sizes.append(list(d.size))
                if bar is not None:
                    bar.update(1)
            arr = np.concatenate(descs) if descs else np.zeros((0, describer.dim), dtype=np.float32)
            if keep:
                shape = (0, *(m.details["teacher_features"]["shape"]))
                m.store.commit(chunk, arr, np.concatenate(feats) if feats else np.zeros(shape, np.float16))
            else:
                m.store.commit(chunk, arr)
            encoded += chunk.files
            committed += len(part)
            next_id += 1
            if on_commit is not None:
                on_commit(chunk.id, committed)
    finally:
        if bar is not None:
            bar.close()
    return encoded


def _rows_from(m: Map, chunks: list[Chunk], start: int) -> np.ndarray:
    """Descriptor rows start.. (reading only the chunks that hold them)."""
    parts, offset = [], 0
    for c in chunks:
        n = len(c.files)
        if offset + n > start:
            parts.append(m.store.load(c)[max(0, start - offset) :])
        offset += n
    return np.concatenate(parts) if parts else np.zeros((0, int(m.details.get("dim", 0))), dtype=np.float32)


def _finalize(m: Map, encoded: Sequence[str] = ()) -> Map:
    """Index + images.jsonl + report from all committed chunks; mark the map complete. Every path in
    `encoded` (what this call reports as added) must be in the final map."""
    chunks = m.store.committed()
    entries, encoded = [], set()
    for c in chunks:
        for f, u in zip(c.files, c.utm):
            entries.append({"id": len(entries), "path": f, "utm": u})
            encoded.add(f)
    failed = {f["path"]: f["error"] for c in chunks for f in c.failed if f["path"] not in encoded}
    report = m.folder / REPORT
    if failed:
        with atomic_file(report, "w") as fh:
            fh.write("path\terror\n")
            for path, err in failed.items():  # a name that is not UTF-8 is written with replacement characters
                line = f"{path}\t{err}\n"
                fh.write(line.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        log.warning("%d unreadable images were skipped; see %s", len(failed), report)
    elif report.exists():
        report.unlink()
    if not entries:
        raise InputError(f"map {m.folder}: no image could be encoded; see {report}")
    lost = [f for f in encoded if f not in {e["path"] for e in entries}]
    if lost:  # never report success for rows that are not in the map
        raise ArtifactError(f"map {m.folder}: {len(lost)} images encoded by this run are not in its chunks (e.g. "
                            f"{lost[0]}); another writer changed the map: rerun the command")
    with atomic_file(m.folder / IMAGES, "w") as fh:
        for e in entries:
            fh.write(json.dumps(e) + "\n")
    missing_utm = sum(1 for e in entries if e["utm"] is None)
    if m.details.get("metadata") == "utm" and missing_utm:
        log.warning("%d map images have no @east@north@ UTM in their file names", missing_utm)
    old = m.details.get("index", {})
    index_path = m.folder / INDEX
    index = None
    if index_path.exists() and old.get("trained_on"):
        # `add`: rows are only ever appended, so the trained index just takes the new ones
        index = map_index.load_index(index_path, old)
        if index.ntotal <= len(entries):
            map_index.add_to_index(index, _rows_from(m, chunks, index.ntotal))
        else:
            index = None
    if index is None:
        descs = _rows_from(m, chunks, 0)
        options = {k: old[k] for k in map_index.OPTION_KEYS if old.get(k) is not None}
        params = map_index.index_params(old.get("type", "flat"), len(descs), descs.shape[1], **options)
        index = map_index.build_index(descs, params)
        params["trained_on"] = len(descs)
        m.details["index"] = params
    map_index.save_index(index, index_path)
    m.details.update({"complete": True, "count": len(entries), "dim": int(index.d), "failed": len(failed),
                      "chunks": [{"id": c.id, "count": len(c.files), "sha256": c.sha256} for c in chunks]})
    m.details.pop("pending", None)
    m.manifest.files = {}
    m.manifest.add_file(m.folder, INDEX, "index")
    m.manifest.add_file(m.folder, IMAGES, "images")
    for role, name in (m.details.get("teacher_features") or {}).get("files", {}).items():
        m.manifest.add_file(m.folder, name, role)
    m.manifest.save(m.folder)
    return m


def build_map(
    images: Sequence[str | Path],
    artifact: str | Path,
    output: str | Path,
    *,
    batch: int | None = None,
    index: str = "flat",
    index_options: dict | None = None,
    metadata: str | None = None,
    chunk_size: int = 256,
    force: bool = False,
    recursive: bool = False,
    describer=None,
    progress: bool = True,
    on_commit: OnCommit | None = None,
    keep_teacher_features: bool = False,
    **describer_kwargs,
) -> Map:
    """Build (or resume building) a map at `output` from image files/folders.

    `index_options` (nprobe, refine, rerank; see `map_index.index_params`) override the defaults.
    keep_teacher_features: also keep every row's per-patch features (backbone-scope artifacts; see the
    module docstring), for distilling a map-specific student.
    """
    from vpr_edge.runtime.describer import Describer

    if index not in map_index.INDEX_TYPES:
        raise ConfigError(f"--index must be one of {map_index.INDEX_TYPES}, got {index!r}")
    options = {k: v for k, v in (index_options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(map_index.OPTION_KEYS))
    if unknown:
        raise ConfigError(f"index options must be among {map_index.OPTION_KEYS}, got {unknown}")
    map_index.check_options(index, **options)
    spec = {"type": index, **options}
    if metadata not in METADATA:
        raise ConfigError(f"--metadata must be 'utm' or absent, got {metadata!r}")
    if (batch is not None and batch < 1) or chunk_size < 1:
        raise ConfigError(f"--batch and --chunk must be >= 1, got {batch} and {chunk_size}")
    out = Path(output)
    paths = collect_images(images, recursive=recursive)
    own = describer is None
    describer = describer or Describer.from_artifact(artifact, **describer_kwargs)
    try:
        if keep_teacher_features and describer.aggregation is None:
            raise ConfigError(
                f"--keep-teacher-features needs per-patch features: {artifact} outputs descriptors only; build the map "
                "with the teacher artifact exported with --scope backbone"
            )
        with writer_lock(out):
            return _build(
                out, paths, describer, str(artifact), batch, spec, metadata, chunk_size, force, progress, on_commit,
                keep_teacher_features,
            )
    finally:
        if own:
            describer.close()


def _keep_features(out: Path, describer) -> dict:
    """The map-specific teacher record: feature shape, and the artifact's vocabulary/PCA copied beside."""
    folder = out / TEACHER
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for role in ("vocabulary", "pca"):
        src = describer.artifact.file(role, required=False)
        if src is not None:
            shutil.copyfile(src, folder / src.name)
            files[role] = f"{TEACHER}/{src.name}"
    preset = describer.preset
    gh, gw = preset.grid()
    return {"dtype": "float16", "shape": [gh * gw, preset.feature_dim], "grid": [gh, gw], "files": files}


def _build(out, paths, describer, artifact, batch, index, metadata, chunk_size, force, progress, on_commit,
           keep_teacher_features: bool = False) -> Map:
    art = describer.artifact
    if (out / MANIFEST_NAME).exists():
        existing = Map.open(out, require_complete=False)
        if force:
            shutil.rmtree(out)
        elif existing.complete:
            raise ArtifactError(
                f"{out} is a finished map; add images with `vpr-edge map add {out} IMAGES` or pass --force to rebuild"
            )
        elif existing.details.get("pending") == "add":
            raise ArtifactError(
                f"{out}: the last `vpr-edge map add` of this map did not finish; rerun that command to resume it"
            )
        else:
            _space_refusal(existing.manifest, art.manifest, out, artifact)
            _identity_refusal(existing, art.manifest, artifact)
            d = existing.details
            if d.get("index", {}).get("type") != index["type"] or d.get("metadata") != metadata:
                raise ConfigError(
                    f"{out}: unfinished build used --index {d.get('index', {}).get('type')} --metadata {d.get('metadata')}; "
                    "resume with the same options or pass --force to start over"
                )
            log.info("resuming the unfinished map build in %s", out)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out} exists and is not a map; choose another --output")
    # an index the map's size cannot train is refused now, not after encoding every image
    options = {k: v for k, v in index.items() if k in map_index.OPTION_KEYS}
    map_index.index_params(index["type"], len(paths), describer.dim, **options)
    # chunks + index + image list: about twice the float32 descriptors
    check_disk(out.parent, 2 * 4 * describer.dim * len(paths) + (1 << 20))
    if not (out / MANIFEST_NAME).exists():
        out.mkdir(parents=True, exist_ok=True)
        man = _map_manifest(art, describer, index, metadata, chunk_size)
        man.details["pending"] = "build"
        if keep_teacher_features:
            man.details["teacher_features"] = _keep_features(out, describer)
        man.save(out)
    elif keep_teacher_features != bool(Map.open(out, require_complete=False).details.get("teacher_features")):
        raise ConfigError(f"{out}: resume the unfinished build with the same --keep-teacher-features choice, or --force")
    m = Map.open(out, require_complete=False)
    current = m.details.get("index", {})
    if any(current.get(k) != v for k, v in index.items()):  # resumed with other options
        if "refine" in index and index["refine"] != current.get("refine"):
            current.pop("trained_on", None)  # another re-rank store: build the index anew
        m.details["index"] = {**current, **index}
        m.manifest.save(m.folder)
    encoded = _encode(
        m,
        describer,
        paths,
        retry_failed=True,  # an image fixed since the last run is tried again
        batch=batch,
        chunk_size=chunk_size,
        progress=progress,
        on_commit=on_commit,
    )
    return _finalize(m, encoded)


def add_to_map(
    map_folder: str | Path,
    images: Sequence[str | Path],
    *,
    artifact: str | Path | None = None,
    batch: int | None = None,
    recursive: bool = False,
    describer=None,
    progress: bool = True,
    on_commit: OnCommit | None = None,
    **describer_kwargs,
) -> tuple[Map, int]:
    """Append images to a map (skipping those already in it). Returns (map, images encoded)."""
    from vpr_edge.runtime.describer import Describer

    m = Map.open(map_folder, require_complete=False)
    source = m.artifact_path(artifact)
    paths = collect_images(images, recursive=recursive)
    own = describer is None
    describer = describer or Describer.from_artifact(source, **describer_kwargs)
    try:
        with writer_lock(m.folder):
            return _add(m, describer, source, paths, batch, progress, on_commit)
    finally:
        if own:
            describer.close()


def _add(m: Map, describer, source, paths, batch: int, progress: bool, on_commit) -> tuple[Map, int]:
    if not m.complete and m.details.get("pending", "build") == "build":
        raise ArtifactError(
            f"{m.folder}: its `vpr-edge map build` did not finish; rerun that build command to resume it before "
            "adding images (an add would mark the unfinished build complete)"
        )
    _space_refusal(m.manifest, describer.artifact.manifest, m.folder, str(source))
    _identity_refusal(m, describer.artifact.manifest, str(source))
    m.details["complete"] = False  # an interrupted add leaves the map visibly unfinished
    m.details["pending"] = "add"
    m.manifest.save(m.folder)
    encoded = _encode(
        m,
        describer,
        paths,
        retry_failed=True,
        batch=batch,
        chunk_size=int(m.details.get("chunk_size", 256)),
        progress=progress,
        on_commit=on_commit,
    )
    return _finalize(m, encoded), len(encoded)


def query_map(
    map_folder: str | Path,
    images: Sequence[str | Path],
    *,
    top_k: int = 5,
    artifact: str | Path | None = None,
    batch: int | None = None,
    describer=None,
    nprobe: int | None = None,
    rerank: int | None = None,
    **describer_kwargs,
) -> list[dict]:
    """Top-k map images for each query image: [{"query", "results": [{"rank", "file", "score", "id", "utm"}]}];
    a query image that cannot be read, or whose descriptor cannot be trusted (NaN/inf, zero), gets
    {"query", "error"} instead, and the others are answered.

    nprobe / rerank override the map's recorded search settings for this query only.
    """
    from vpr_edge.runtime.describer import Describer

    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    m = Map.open(map_folder, verify=describer_kwargs.get("verify", True))
    index = m.index(nprobe=nprobe, rerank=rerank)  # bad settings fail before the model loads
    source = m.artifact_path(artifact)
    own = describer is None
    describer = describer or Describer.from_artifact(source, **describer_kwargs)
    paths = [Path(p) for p in images]
    errors: dict[int, str] = {}
    rows: dict[int, np.ndarray] = {}
    try:
        _space_refusal(m.manifest, describer.artifact.manifest, m.folder, str(source))
        for d in describer.stream(paths, batch):
            if d.error is not None:
                errors[d.index] = d.error
            else:
                rows[d.index] = d.descriptor
    finally:
        if own:
            describer.close()
    entries = m.entries()
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if rows:
        order = sorted(rows)
        scores, ids = map_index.search(index, np.stack([rows[i] for i in order]), top_k)
        found = {i: (s, d) for i, s, d in zip(order, scores, ids)}
    results_out = []
    for i, path in enumerate(paths):
        if i in errors:
            results_out.append({"query": str(path), "error": errors[i]})
            continue
        results_out.append({"query": str(path), "results": ranked_results(entries, *found[i])})
    return results_out


def ranked_results(entries: list[dict], scores: np.ndarray, ids: np.ndarray) -> list[dict]:
    """One query's search row -> [{"rank", "file", "score", "id", "utm"}] (faiss pads misses with id -1)."""
    out = []
    for rank, (s, j) in enumerate(((s, j) for s, j in zip(scores, ids) if j >= 0), start=1):
        e = entries[int(j)]
        out.append({"rank": rank, "file": e["path"], "score": float(s), "id": int(j), "utm": e.get("utm")})
    return out
