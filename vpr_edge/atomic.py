"""Atomic writes: everything is written under a temporary name and renamed when complete,
so an interrupted job never leaves a half-written file under a final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from vpr_edge.errors import ArtifactError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_writable(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create output folder {parent}: {exc.strerror}; choose another --output") from exc
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"output folder {parent} is not writable; choose another --output")


def check_disk(parent: Path, need_bytes: int) -> None:
    """Refuse early when the disk cannot hold what is about to be written."""
    _check_writable(parent)
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise ArtifactError(
            f"not enough disk under {parent}: need about {need_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free; free space or choose another --output"
        )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to `path`; rename over `path` only if the block succeeds."""
    path = Path(path)
    _check_writable(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file reads like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; when the block succeeds it replaces `path`.

    An existing `path` is only replaced with force=True (the CLI's --force)."""
    path = Path(path)
    if path.exists() and not force:
        raise ArtifactError(f"{path} already exists; pass --force to overwrite it or choose another --output")
    _check_writable(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
