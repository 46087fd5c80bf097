"""Atomic writes: everything is written under a temporary name and renamed when complete, so an
interrupted job never leaves a half-written file under a final name.

Temporary names carry the writer's pid (`.NAME.PID.XXXX.partial`). A process killed before it could
clean up leaves its partial file or folder behind; the next writer of the same name removes those
whose pid is no longer alive (never another live writer's). A full disk is one line naming the folder,
the free space and what was written so far, not an OSError traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from vpr_edge.errors import ArtifactError

log = logging.getLogger(__name__)


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


def _free_mib(parent: Path) -> float:
    try:
        return shutil.disk_usage(parent).free / 2**20
    except OSError:
        return float("nan")


def check_disk(parent: Path, need_bytes: int) -> None:
    """Refuse early when the disk cannot hold what is about to be written."""
    _check_writable(parent)
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise ArtifactError(
            f"not enough disk under {parent}: need about {need_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free; free space or choose another --output"
        )


def disk_full(parent: Path, what: str, written: int | None = None) -> ArtifactError:
    done = f", {written / 2**20:.1f} MiB written before it filled" if written is not None else ""
    return ArtifactError(
        f"disk full under {parent} while writing {what} ({_free_mib(parent):.0f} MiB free{done}); nothing was "
        "written under the final name: free space (or choose another --output) and rerun"
    )


def _is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_partials(parent: Path, name: str) -> list[Path]:
    """Remove `.NAME.PID.*.partial` files/folders of writers that are no longer running."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.glob(f".{name}.*.partial"):
        pid_text = p.name[len(name) + 2 :].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    if removed:
        log.info("removed %d unfinished %s of killed runs next to %s", len(removed), "item(s)", parent / name)
    return removed


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to `path`; rename over `path` only if the block succeeds."""
    path = Path(path)
    _check_writable(path.parent)
    remove_stale_partials(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file reads like any other
        os.replace(tmp, path)
    except BaseException as exc:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_enospc(exc):
            raise disk_full(path.parent, path.name, written) from None
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
    remove_stale_partials(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent))
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
    except BaseException as exc:
        written = _tree_bytes(tmp) if tmp.exists() else None
        shutil.rmtree(tmp, ignore_errors=True)
        cause = exc.__cause__ or exc.__context__
        if _is_enospc(exc) or (isinstance(exc, ArtifactError) and cause is not None and _is_enospc(cause)):
            raise disk_full(path.parent, f"{path.name}/", written) from None
        raise
