"""File hashes that are checked, cheaply enough for a 3 GB ViT-G artifact.

A manifest records every file's sha256; loading an artifact, map or cache verifies them. Hashing
3.3 GB takes ~10 s, so a verified hash is remembered by the file's identity on disk (device, inode,
size, modification time in ns, ctime in ns): a file replaced or edited in place changes at least one of
them, and is hashed again. The memo lives in `$VPR_EDGE_CACHE` (default `~/.cache/vpr-edge`) as
`hashes.json`; it holds only hashes of files this user already verified, never decides alone (a
miss means hashing), and an unreadable memo is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from vpr_edge.atomic import write_json

_LOCK = threading.Lock()
_MEMO_LIMIT = 4096  # entries kept (newest)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("VPR_EDGE_CACHE", Path.home() / ".cache" / "vpr-edge"))


def _memo_path() -> Path:
    return cache_dir() / "hashes.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _read_memo() -> dict[str, str]:
    try:
        data = json.loads(_memo_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path, *, memo: bool = True) -> str:
    """sha256 of `path`, remembered by its on-disk identity (see module docstring)."""
    path = Path(path)
    if not memo:
        return sha256_file(path)
    key = _key(path)
    with _LOCK:
        known = _read_memo().get(key)
    if known:
        return known
    digest = sha256_file(path)
    with _LOCK:
        data = _read_memo()
        data[key] = digest
        if len(data) > _MEMO_LIMIT:
            data = dict(list(data.items())[-_MEMO_LIMIT:])
        try:
            write_json(_memo_path(), data)
        except Exception:  # noqa: BLE001 - a read-only home must not stop verification
            pass
    return digest
