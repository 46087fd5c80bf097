"""An artifact folder as every stage sees it: manifest, preset, space and identity, files by role; and
the one loader, which checks what the manifest promises before anything is used.

Checked on load: the manifest parses (format 1 is migrated), its kind is one the caller takes, every
listed file exists with the recorded size and sha256 (`integrity.file_sha256`: hashed once, then
remembered by inode/size/mtime, so a 3 GB artifact is re-hashed only when a file changed), and the
preset record rebuilds. `verify=False` (the CLI's `--no-verify`) skips the hashes, not the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpr_edge.errors import ArtifactError
from vpr_edge.manifest import MANIFEST_NAME, Manifest
from vpr_edge.presets import Preset, preset_from_dict
from vpr_edge.space import DescriptorSpace, Identity

SCOPES = ("backbone", "descriptor")


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

    @property
    def input_layout(self) -> str:
        """'float' (float [B, 3, H, W], normalised) or 'uint8' ([B, H, W, 3] RGB, normalised in the graph)."""
        return self.manifest.details.get("input_layout", "float")

    @property
    def space(self) -> DescriptorSpace:
        return DescriptorSpace.from_dict(self.manifest.space, str(self.folder))

    @property
    def identity(self) -> Identity:
        return Identity.from_dict(self.manifest.identity)

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


def verify_files(manifest: Manifest, folder: str | Path, *, hashes: bool = True) -> None:
    """Every listed file exists with the recorded size (and sha256 when `hashes`); one line naming the
    first file that does not."""
    from vpr_edge.integrity import file_sha256

    folder = Path(folder)
    for name, info in manifest.files.items():
        p = folder / name
        if not p.is_file():
            raise ArtifactError(f"{p} is listed in the manifest but missing; re-create the artifact")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(
                f"{p} has {size} bytes, the manifest says {info.get('bytes')}: truncated or replaced; re-create the artifact"
            )
        if hashes and info.get("sha256") and file_sha256(p) != info["sha256"]:
            raise ArtifactError(
                f"{p} does not match the sha256 its manifest records: replaced or corrupted after it was written; "
                "re-create the artifact (or restore the original file)"
            )


def load_artifact(path: str | Path, kinds: tuple[str, ...] = ("onnx", "engine"), *, verify: bool = True) -> Artifact:
    """Open an artifact folder (or a file inside it) and check what the manifest promises."""
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
    verify_files(manifest, folder, hashes=verify)
    try:
        preset = preset_from_dict(manifest.preset)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: manifest preset is malformed ({exc}); re-export it with vpr-export") from None
    art = Artifact(folder=folder, manifest=manifest, preset=preset)
    if art.scope not in SCOPES:
        raise ArtifactError(f"{folder}: details.scope is {art.scope!r}, expected one of {SCOPES}")
    if art.io_dtype not in ("float32", "float16"):
        raise ArtifactError(f"{folder}: details.io_dtype is {art.io_dtype!r}, expected float32 or float16")
    if art.input_layout not in ("float", "uint8"):
        raise ArtifactError(f"{folder}: details.input_layout is {art.input_layout!r}, expected float or uint8; "
                            "re-export the artifact or upgrade vpr-edge")
    return art
