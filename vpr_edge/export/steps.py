"""Progress of an export's slow steps: one line each on stderr, with wall time and peak RSS
(`vpr_edge.measure.PeakRss`) kept per step for the manifest."""

from __future__ import annotations

import sys
import time

from vpr_edge.measure import PeakRss


class Steps:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.times: dict[str, float] = {}
        self.peak_rss_gib: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        if self.enabled:
            print(f"{name} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with PeakRss() as rss:
            out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss_gib[name] = round(rss.peak_bytes / 2**30, 2)
        if self.enabled:
            print(f" {self.times[name]:.1f} s", file=sys.stderr, flush=True)
        return out

    def merge(self, times: dict[str, float], peaks: dict[str, float]) -> None:
        """Steps that ran in another process (the torch worker)."""
        self.times.update(times)
        self.peak_rss_gib.update(peaks)
