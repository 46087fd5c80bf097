"""An exported artifact folder as the runtime sees it: manifest, preset, scope, files by role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpr_edge.errors import ArtifactError
from vpr_edge.manifest import MANIFEST_NAME, Manifest
from vpr_edge.presets import Preset, preset_from_dict

SCOPES = ("backbone", "descriptor")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class Artifact:
    folder: Path
    manifest: Manifest
    preset: Preset

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def scope(self) -> str:
        return self.manifest.details.get("scope", "descriptor")

    @property
    def precision(self) -> str:
        return self.manifest.details.get("precision", "fp32")

    @property
    def io_dtype(self) -> str:
        return self.manifest.details.get("io_dtype", "float32")

    def file(self, role: str, required: bool = True) -> Path | None:
        for name, info in self.manifest.files.items():
            if info.get("role") == role:
                return self.folder / name
        if required:
            raise ArtifactError(
                f"{self.folder}: manifest lists no file with role {role!r} (files: {sorted(self.manifest.files)}); "
                "re-export it with vpr-export"
            )
        return None

    def summary(self) -> dict:
        return {
            "path": str(self.folder),
            "kind": self.kind,
            "preset": self.preset.name,
            "scope": self.scope,
            "precision": self.precision,
            "descriptor_dim": self.preset.descriptor_dim,
        }


def load_artifact(path: str | Path, kinds: tuple[str, ...] = ("onnx", "engine")) -> Artifact:
    """Open an artifact folder (or a file inside it) and check what the runtime relies on."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: artifact not found; pass the folder written by vpr-export")
    folder = p if p.is_dir() else p.parent
    if not (folder / MANIFEST_NAME).exists():
        raise ArtifactError(
            f"{folder} has no {MANIFEST_NAME}: not a vpr-edge artifact (a bare .onnx/.engine is not enough); "
            "re-export it with vpr-export"
        )
    manifest = Manifest.load(folder)
    if manifest.kind not in kinds:
        raise ArtifactError(f"{folder}: artifact kind is {manifest.kind!r}, expected one of {kinds}")
    manifest.verify_files(folder)
    try:
        preset = preset_from_dict(manifest.preset)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: manifest preset is malformed ({exc}); re-export it with vpr-export") from None
    art = Artifact(folder=folder, manifest=manifest, preset=preset)
    if art.scope not in SCOPES:
        raise ArtifactError(f"{folder}: details.scope is {art.scope!r}, expected one of {SCOPES}")
    if art.precision not in PRECISIONS:
        raise ArtifactError(f"{folder}: details.precision is {art.precision!r}, expected one of {PRECISIONS}")
    if art.io_dtype not in ("float32", "float16"):
        raise ArtifactError(f"{folder}: details.io_dtype is {art.io_dtype!r}, expected float32 or float16")
    return art
