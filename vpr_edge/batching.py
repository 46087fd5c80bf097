"""The one batching rule: images go through a model in chunks; a model with a fixed batch size gets
exactly that many per run, padded by repeating the last image, and the padded rows are dropped.

Repeating a real image (not zeros) keeps padded rows in the range the model was verified on, so a
padded run never produces a NaN or an overflow that an unpadded one would not (an all-zero image
is an input no verification set contains).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """`x` with its last row repeated until it has `size` rows (unchanged when it has as many)."""
    if len(x) >= size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def chunks(n: int, step: int) -> Iterator[slice]:
    """Slices of range(n) of `step` items (the last may be shorter)."""
    for start in range(0, n, max(1, int(step))):
        yield slice(start, min(start + step, n))


def run_batched(
    run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, batch: int | None = 8, fixed: int | None = None
) -> np.ndarray:
    """`run` over `x` in chunks: `fixed` rows per call (padded) for fixed-batch models, else `batch`
    rows (None: all at once). Returns float32 outputs for the real rows only, in order."""
    if len(x) == 0:
        raise ValueError("run_batched needs at least one input row")
    step = fixed or batch or len(x)
    outs = []
    for part in chunks(len(x), step):
        chunk = x[part]
        n = len(chunk)
        if fixed:
            chunk = pad_to(chunk, fixed)
        outs.append(np.asarray(run(chunk), dtype=np.float32)[:n])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)
