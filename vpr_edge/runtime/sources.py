"""Frames for the streaming runtime: a folder (followed as a camera writes into it) or a video file.

Each source yields `(name, image)`: a path for files, an HxWx3 uint8 RGB array for video frames, named
`VIDEO#N` (frame index) so a result can be traced back to its frame.

Following a folder: a file is taken once its size is the same on two scans `poll_s` apart (a camera
writing a JPEG in place is not read half-written); files appear in natural name order; the folder is
followed until `idle_s` seconds pass without a new file (None: until interrupted).
Video: decoded with PyAV (FFmpeg; `pip install 'vpr-edge[video]'`), every `every`-th frame.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from vpr_edge.datasets import IMAGE_EXTENSIONS, list_images, natural_key
from vpr_edge.errors import InputError
from vpr_edge.lazy import lazy_import

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".h264", ".h265", ".ts", ".m4v")

Frame = tuple[str, Union[str, Path, np.ndarray]]  # (name, image)


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def folder_frames(folder: str | Path, *, follow: bool = False, poll_s: float = 0.2,
                  idle_s: float | None = None) -> Iterator[Frame]:
    """The images of `folder` in natural order; with `follow`, then each new one as it is completed."""
    folder = Path(folder)
    if not follow:
        for p in list_images(folder):
            yield str(p), p
        return
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder not found (or not a folder)")
    seen: set[str] = set()
    sizes: dict[str, int] = {}
    last_new = time.monotonic()
    while True:
        ready = []
        for p in folder.iterdir():
            if p.name in seen or p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                size = p.stat().st_size
            except FileNotFoundError:  # renamed or removed between listing and stat
                continue
            if size > 0 and sizes.get(p.name) == size:
                ready.append(p)
            sizes[p.name] = size
        for p in sorted(ready, key=lambda q: natural_key(q.name)):
            seen.add(p.name)
            sizes.pop(p.name, None)
            last_new = time.monotonic()
            yield str(p), p
        if idle_s is not None and time.monotonic() - last_new > idle_s:
            return
        time.sleep(poll_s)


def video_frames(path: str | Path, *, every: int = 1) -> Iterator[Frame]:
    """Every `every`-th decoded frame of a video file as (`VIDEO#index`, HxWx3 uint8 RGB)."""
    path = Path(path)
    if every < 1:
        raise InputError(f"--every must be >= 1, got {every}")
    av = lazy_import("av")
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: video file not found") from None
    except av.FFmpegError as exc:
        raise InputError(f"{path}: not a video FFmpeg can open ({exc}); re-encode it or pass a folder of frames") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i % every == 0:
                    yield f"{path}#{i}", frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            raise InputError(f"{path}: video decoding failed at frame {i + 1} ({exc})") from None


def open_source(source: str | Path, *, follow: bool = False, poll_s: float = 0.2, idle_s: float | None = None,
                every: int = 1) -> Iterator[Frame]:
    """A folder (optionally followed) or a video file -> frames."""
    source = Path(source)
    if source.is_dir():
        return folder_frames(source, follow=follow, poll_s=poll_s, idle_s=idle_s)
    if is_video(source):
        if follow:
            raise InputError(f"{source}: --follow follows a folder of frames, not a video file")
        return video_frames(source, every=every)
    if not source.exists():
        raise InputError(f"{source}: no such folder or video file")
    raise InputError(f"{source}: expected a folder of images or a video file ({', '.join(VIDEO_EXTENSIONS)})")
