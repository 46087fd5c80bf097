"""The camera loop: frames in, the map's top-k places out, with each frame's latency.

    with Localizer("corridor-map", preprocess="fast") as loc:
        for place in loc.locate(camera_frames()):      # paths, uint8 arrays, or (name, image) pairs
            print(place.name, place.best, place.latency_ms)

Frames go through `Describer.stream` (decoding in threads ahead of the backend, order kept, an unreadable
frame answered with its error while the stream goes on) and each descriptor is searched on its own as it
arrives, so a frame's answer never waits for the next frame. The map is opened, checked and its search
settings validated before the model loads; the artifact must be in the map's descriptor space.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from vpr_edge.measure import percentiles
from vpr_edge.runtime import map_index
from vpr_edge.runtime.maps import Map, _space_refusal, ranked_results


@dataclass
class Place:
    """One frame's answer."""

    index: int
    name: str
    results: list[dict] | None  # [{"rank", "file", "score", "id", "utm"}], None on error
    error: str | None
    latency_ms: float  # from taking the frame off the input to its places

    @property
    def best(self) -> dict | None:
        return self.results[0] if self.results else None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"frame": self.index, "name": self.name, "latency_ms": round(self.latency_ms, 3)}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["results"] = self.results
        return out


@dataclass
class LatencyLog:
    """Per-frame latencies of a run, summarised as percentiles and frames per second."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, place: Place) -> None:
        self.latencies_ms.append(place.latency_ms)
        self.errors += place.error is not None

    def summary(self) -> dict:
        wall = time.perf_counter() - self.started
        n = len(self.latencies_ms)
        return {"frames": n, "errors": self.errors, "wall_s": wall, "fps": n / wall if wall > 0 else None,
                "latency_ms": percentiles(self.latencies_ms) if n else None}


class Localizer:
    def __init__(self, map_folder: str | Path, *, artifact: str | Path | None = None, top_k: int = 1,
                 batch: int = 1, nprobe: int | None = None, rerank: int | None = None, describer=None,
                 **describer_kwargs):
        from vpr_edge.errors import ConfigError
        from vpr_edge.runtime.describer import Describer

        if top_k < 1:
            raise ConfigError(f"--top-k must be >= 1, got {top_k}")
        self.map = Map.open(map_folder, verify=describer_kwargs.get("verify", True))
        self.index = self.map.index(nprobe=nprobe, rerank=rerank)  # bad settings fail before the model loads
        self.entries = self.map.entries()
        self.top_k, self.batch = top_k, batch
        source = self.map.artifact_path(artifact)
        self._own = describer is None
        self.describer = describer or Describer.from_artifact(source, **describer_kwargs)
        try:
            _space_refusal(self.map.manifest, self.describer.artifact.manifest, self.map.folder, str(source))
        except BaseException:
            self.close()
            raise

    def locate(self, frames: Iterable[Any]) -> Iterator[Place]:
        """Frames (paths, arrays, or (name, image) pairs) -> one `Place` per frame, in order."""
        names: deque[str] = deque()

        def images():
            for i, f in enumerate(frames):
                name, image = f if isinstance(f, tuple) else (str(f) if isinstance(f, (str, Path)) else f"frame {i}", f)
                names.append(name)
                yield image

        for d in self.describer.stream(images(), self.batch):
            name = names.popleft()
            if d.error is not None:
                yield Place(d.index, name, None, d.error, 1000.0 * (time.perf_counter() - d.submitted))
                continue
            scores, ids = map_index.search(self.index, d.descriptor[None].astype(np.float32), self.top_k)
            results = ranked_results(self.entries, scores[0], ids[0])
            yield Place(d.index, name, results, None, 1000.0 * (time.perf_counter() - d.submitted))

    def close(self) -> None:
        if self._own and self.describer is not None:
            self.describer.close()
        self.describer = None

    def __enter__(self) -> "Localizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
