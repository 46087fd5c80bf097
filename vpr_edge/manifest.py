"""The one manifest format every artifact carries (ONNX export, engine, map, vocabulary, PCA, teacher
cache, student run), and the one writer of folder artifacts (`write_artifact`).

A manifest is `manifest.json` inside the artifact folder (a vocabulary/PCA `.npz` holds the same
record as its `meta` string). It says what the artifact is (`kind`), the network config it runs
(`preset`), the descriptor space its numbers live in (`space`) and who produced them (`identity`, see
`vpr_edge.space`), its files with size and sha256, how it was made and how it was verified. Readers
must not need the code that wrote it; what a manifest promises is checked when it is loaded
(`vpr_edge.artifact`).

Format 2 added `space`/`identity` as separate records; format-1 manifests (a `space` that was the
preset's architecture plus a `hashes` record) are migrated when read.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpr_edge import __version__
from vpr_edge.atomic import write_json
from vpr_edge.errors import ArtifactError
from vpr_edge.integrity import file_sha256

FORMAT = "vpr-edge-manifest"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
KINDS = ("onnx", "engine", "vocabulary", "pca", "map", "student", "descriptors", "teacher-cache", "distill-run")


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
    identity: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
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

    # -- files ------------------------------------------------------------------------------
    def add_file(self, folder: Path, name: str, role: str, *, sha256: bool = True) -> None:
        path = Path(folder) / name
        self.files[name] = {"role": role, "bytes": path.stat().st_size}
        if sha256:
            self.files[name]["sha256"] = file_sha256(path)

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
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ArtifactError(f"{source} is not a vpr-edge manifest (format={got!r})")
        version = d.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(
                f"{source} has manifest format_version {version!r}, this vpr-edge reads <= {FORMAT_VERSION}; "
                "upgrade vpr-edge"
            )
        missing = {"kind", "preset", "space"} - d.keys()
        if missing:
            raise ArtifactError(f"{source} lacks manifest fields {sorted(missing)}; re-create the artifact")
        if version < 2:
            d = migrate_v1(d)
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as exc:
            raise ArtifactError(f"{source}: malformed manifest ({exc}); re-create the artifact") from None

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


def migrate_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: `space` + `hashes` become the space and identity records (see vpr_edge.space)."""
    from vpr_edge.space import Identity, _legacy_weights, migrate_space

    d = dict(d)
    hashes = d.pop("hashes", None) or {}
    preset = d.get("preset") or {}
    details = d.get("details") or {}
    d["space"] = migrate_space(d.get("space") or {}, hashes)
    backbone = preset.get("backbone") or {}
    engine = f"tensorrt {details['trt_version']} sm_{details.get('compute_capability')}" if d.get("kind") == "engine" and details.get("trt_version") else None
    d["identity"] = Identity(
        network=preset.get("name", ""),
        backbone=f"{backbone.get('family', '?')} {backbone.get('arch', '?')}",
        weights=_legacy_weights(hashes.get("weights")) or "unknown",
        precision=details.get("precision", "fp32"),
        scope=details.get("scope", "descriptor"),
        engine=engine,
    ).to_dict()
    d["format_version"] = FORMAT_VERSION
    d.setdefault("details", {})["migrated_from_format"] = 1
    return d


def write_artifact(
    folder: str | Path,
    kind: str,
    files: dict[str, str],
    space: dict[str, Any],
    identity: dict[str, Any],
    details: dict[str, Any],
    *,
    preset: dict[str, Any] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    verification: dict[str, Any] | None = None,
    versions: dict[str, str] | None = None,
    hashes: bool = True,
) -> Manifest:
    """The one writer of an artifact folder's manifest: hash every listed file (name -> role) that is
    in `folder`, record the rest, write `manifest.json` atomically. Call it on the temporary folder
    of an `atomic_dir`, so nothing appears under the final name before the manifest is complete.
    hashes=False records sizes only (a provisional manifest inside the temporary folder, read back at once)."""
    folder = Path(folder)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ArtifactError(f"{folder}: cannot record {missing} in the manifest: not written")
    manifest = Manifest(
        kind=kind,
        preset=preset or {},
        space=space,
        identity=identity,
        inputs=inputs or [],
        outputs=outputs or [],
        versions=versions or package_versions("numpy", "onnx", "onnxruntime", "torch", "faiss-cpu"),
        verification=verification or {},
        details=details,
    )
    for name, role in files.items():
        manifest.add_file(folder, name, role, sha256=hashes)
    manifest.save(folder)
    return manifest
