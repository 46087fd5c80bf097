"""A map built with `--keep-teacher-features` read as a teacher cache: one item per map image (its plain
view), the teacher's per-patch features and descriptor as the map stored them, assignments computed from
the features and the teacher's centres as hard VLAD does. The same interface as `cache.TeacherCache`, so
`distill train --cache MAP` distils a map-specific student without running the teacher again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.distill import views as V
from vpr_edge.errors import ArtifactError
from vpr_edge.presets import preset_from_dict


class MapTeacherCache:
    def __init__(self, folder: Path, verify: str = "sha256") -> None:
        from vpr_edge.fitted import load_pca, load_vocabulary
        from vpr_edge.runtime.maps import Map

        m = Map.open(folder, verify=verify == "sha256")
        record = m.details.get("teacher_features")
        if not record:
            raise ArtifactError(f"{folder} is a map without teacher features; build it with `vpr-edge map build "
                                "--keep-teacher-features` and the teacher artifact (backbone scope)")
        self.path = Path(folder)
        self.map = m
        self.manifest = m.manifest.to_dict()
        self.space: dict = m.manifest.space
        self.identity: dict = m.manifest.identity
        preset = preset_from_dict(m.manifest.preset)
        self.preprocess = preset.preprocess
        self.feature_dim = int(record["shape"][1])
        self.grid = tuple(record["grid"])
        self.descriptor_dim = int(preset.descriptor_dim)
        files = record.get("files", {})
        self.centers = load_vocabulary(self.path / files["vocabulary"]).centers if "vocabulary" in files else None
        self.pca = None
        if "pca" in files:
            pw = load_pca(self.path / files["pca"])
            self.pca = (pw.mean, pw.proj)
        self.head = {
            "kind": preset.aggregator.kind,
            "clusters": int(self.centers.shape[0]) if self.centers is not None else 0,
            "gem_p": float(preset.aggregator.gem_p),
            "pca": None if self.pca is None else [int(self.pca[1].shape[1]), int(self.pca[1].shape[0])],
        }
        self.views_per_image = 1
        self.image_root = Path("/")
        self._chunks = m.store.committed()
        self.image_files: list[str] = [f for c in self._chunks for f in c.files]
        rows, self._where = [], []
        for c in self._chunks:
            if c.sizes is None or len(c.sizes) != len(c.files):
                raise ArtifactError(f"{m.store.dir}: chunk {c.id:06d} has no source sizes; rebuild the map")
            for r, hw in enumerate(c.sizes):
                rows.append(V.View.plain(len(self._where), tuple(hw)).to_row())
                self._where.append((c, r))
        self.views_table = np.stack(rows) if rows else np.zeros((0, len(V.COLUMNS)))
        self.items = self.views_table[:, :2].astype(np.int64)
        self._features: dict[int, np.ndarray] = {}
        self._descriptors: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], verify="size")

    @property
    def num_images(self) -> int:
        return len(self.image_files)

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for a map of {len(self)} images")
        c, r = self._where[i]
        if c.id not in self._features:
            self._features[c.id] = self.map.store.load_features(c)
            self._descriptors[c.id] = self.map.store.load(c)
        return self._features[c.id], self._descriptors[c.id], r

    def view(self, i: int) -> V.View:
        return V.View.from_row(self.views_table[i])

    def image_path(self, image: int) -> Path:
        return Path(self.image_files[image])

    def features(self, i: int) -> np.ndarray:
        f, _, r = self._arrays(i)
        return f[r]

    def descriptor(self, i: int) -> np.ndarray:
        _, d, r = self._arrays(i)
        return d[r]

    def assignment(self, i: int) -> np.ndarray | None:
        if self.centers is None:
            return None
        x = np.asarray(self.features(i), dtype=np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        c = self.centers / np.maximum(np.linalg.norm(self.centers, axis=-1, keepdims=True), 1e-12)
        return np.argmax(x @ c.T, axis=-1).astype(np.int16)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return {"features": self.features(i), "descriptor": self.descriptor(i), "assign": self.assignment(i),
                "view": self.view(i)}

    def items_of_images(self, images) -> np.ndarray:
        return np.flatnonzero(np.isin(self.items[:, 0], np.asarray(list(images), dtype=np.int64)))

    def image_sha256(self) -> dict[int, str]:
        return {}

    def head_module(self):
        from vpr_edge.models.student import build_head

        mean, proj = self.pca if self.pca is not None else (None, None)
        return build_head(self.head["kind"], centers=self.centers, gem_p=self.head["gem_p"], pca_mean=mean, pca_proj=proj)

    @property
    def fingerprint(self) -> str:
        """Identifies the content: the map's chunk records (ids, counts, hashes of descriptors and features)."""
        chunks = [(c.id, len(c.files), c.sha256, c.features_sha256) for c in self._chunks]
        return hashlib.sha256(json.dumps(chunks).encode()).hexdigest()
