"""The one manifest format every artifact carries (ONNX export, engine, vocabulary, PCA, map, student).

A manifest is `manifest.json` inside the artifact folder (or `<file>.json` beside a single-file
artifact). It says what the artifact is, how it was made, hashes of what went in, and how it was
verified. Readers must not need the code that wrote it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpr_edge import __version__
from vpr_edge.atomic import write_json
from vpr_edge.errors import ArtifactError

FORMAT = "vpr-edge-manifest"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("onnx", "engine", "vocabulary", "pca", "map", "student", "descriptors")

# What makes two descriptors comparable: same numbers in the same space.
_SPACE_KEYS = ("preset", "backbone", "layer", "facet", "image_size", "aggregator", "descriptor_dim")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_versions(*names: str) -> dict[str, str]:
    """Versions of the named packages that are installed (no import of heavy modules)."""
    from importlib import metadata

    out = {"vpr-edge": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Manifest:
    kind: str
    preset: dict[str, Any]
    space: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    hashes: dict[str, str | None] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ArtifactError(f"manifest kind {self.kind!r} is not one of {KINDS}")

    # -- descriptor space -------------------------------------------------------------------
    def same_space(self, other: "Manifest") -> list[str]:
        """Differences that make descriptors of `self` and `other` incomparable (empty = compatible)."""
        diffs = []
        for key in _SPACE_KEYS:
            if self.space.get(key) != other.space.get(key):
                diffs.append(f"{key}: {self.space.get(key)!r} != {other.space.get(key)!r}")
        for key in ("weights", "vocabulary", "pca"):
            a, b = self.hashes.get(key), other.hashes.get(key)
            if a != b:
                diffs.append(f"{key} hash: {str(a)[:12]} != {str(b)[:12]}")
        return diffs

    # -- files ------------------------------------------------------------------------------
    def add_file(self, folder: Path, name: str, role: str) -> None:
        path = Path(folder) / name
        self.files[name] = {"role": role, "bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def file_for(self, role: str) -> str:
        for name, info in self.files.items():
            if info.get("role") == role:
                return name
        raise ArtifactError(f"artifact has no file with role {role!r} (files: {sorted(self.files)})")

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # put the identification first for a human reader
        head = {k: d.pop(k) for k in ("format", "format_version", "kind", "created")}
        return {**head, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Manifest":
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{source} is not a vpr-edge manifest (format={d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ArtifactError(
                f"{source} has manifest format_version {d.get('format_version')}, this vpr-edge reads "
                f"<= {FORMAT_VERSION}; upgrade vpr-edge"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"kind", "preset", "space"} - d.keys()
        if missing:
            raise ArtifactError(f"{source} lacks manifest fields {sorted(missing)}; re-create the artifact")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, folder: str | Path, name: str = MANIFEST_NAME) -> Path:
        path = Path(folder) / name
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.exists():
            raise ArtifactError(
                f"{path} not found: an artifact folder needs its manifest.json; re-export it with vpr-export"
            )
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path} is not valid JSON ({exc}); re-create the artifact") from exc
        return cls.from_dict(d, source=str(path))

    def verify_files(self, folder: str | Path) -> None:
        """Check every listed file exists with the recorded size (hashing is left to `deep=True` users)."""
        for name, info in self.files.items():
            p = Path(folder) / name
            if not p.exists():
                raise ArtifactError(f"{p} is listed in the manifest but missing; re-create the artifact")
            if p.stat().st_size != info.get("bytes"):
                raise ArtifactError(
                    f"{p} has {p.stat().st_size} bytes, manifest says {info.get('bytes')}: truncated or replaced; "
                    "re-create the artifact"
                )
