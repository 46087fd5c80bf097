"""Decode and preprocess ahead of the backend in a bounded pool of threads, results in input order.

Pillow's decoders and resizes, and numpy, release the GIL, so preprocessing threads overlap the backend's
run (ONNX Runtime and TensorRT release it too). The pool is bounded twice: `workers` threads, and at most
`depth` images submitted and not yet consumed, so a camera generator or a folder of a million images
holds a few frames in memory, never the stream. An image whose preprocessing raises InputError comes back
as that error in its place; anything else (a bug, MemoryError) stops the stream.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from vpr_edge.errors import InputError


def default_workers() -> int:
    """Preprocessing threads: enough to keep a backend fed, few enough to leave it its cores."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class Prefetched:
    index: int
    item: Any
    value: Any  # fn(item), or None when it failed
    error: str | None  # the InputError's message
    submitted: float  # perf_counter() when the item was taken from the input


def prefetch(items: Iterable[Any], fn: Callable[[Any], Any], workers: int | None = None,
             depth: int | None = None) -> Iterator[Prefetched]:
    """fn(item) for every item, computed by `workers` threads at most `depth` items ahead, yielded in order.

    workers=0 runs fn in the caller's thread (no overlap; for debugging and for measuring the overlap)."""
    workers = default_workers() if workers is None else workers
    source = enumerate(items)
    if workers == 0:
        for i, item in source:
            t = time.perf_counter()
            try:
                yield Prefetched(i, item, fn(item), None, t)
            except InputError as exc:
                yield Prefetched(i, item, None, str(exc), t)
        return
    depth = max(depth or 2 * workers, workers)
    queue: deque[tuple[int, Any, float, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vpr-preprocess") as pool:
        try:
            exhausted = False
            while True:
                while not exhausted and len(queue) < depth:
                    try:
                        i, item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    queue.append((i, item, time.perf_counter(), pool.submit(fn, item)))
                if not queue:
                    return
                i, item, t, fut = queue.popleft()
                try:
                    yield Prefetched(i, item, fut.result(), None, t)
                except InputError as exc:
                    yield Prefetched(i, item, None, str(exc), t)
        finally:  # a consumer that stops early (or an error) must not wait for the whole queue
            for *_, fut in queue:
                fut.cancel()
