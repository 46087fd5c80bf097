"""`--artifact NAME=DIR` arguments of the benchmark scripts, opened with the one artifact loader (so a wrong
folder is a one-line error naming it, and the manifest's files are checked before anything is measured)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Named:
    name: str
    folder: Path
    identity: dict  # the manifest's identity record (network, precision, scope, ...)
    size_bytes: int  # every file of the folder


def named_artifacts(specs: list[str]) -> list[Named]:
    from vpr_edge.artifact import load_artifact
    from vpr_edge.errors import VprEdgeError

    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--artifact {spec!r}: expected NAME=DIR")
        try:
            art = load_artifact(folder)
        except VprEdgeError as exc:
            raise SystemExit(f"--artifact {name}: {exc}") from None
        size = sum(p.stat().st_size for p in art.folder.iterdir() if p.is_file())
        out.append(Named(name, art.folder, dict(art.manifest.identity), size))
    return out
