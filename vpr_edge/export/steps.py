"""Progress of an export's slow steps: one line each on stderr, with wall time and peak RSS kept
per step for the manifest.

Peak RSS comes from the kernel's high-water mark (VmHWM, reset per step through
/proc/self/clear_refs) where Linux offers it. A sampling thread is the fallback only: it cannot run
while C code holds the GIL (protobuf serialisation, session creation), and on ViT-G's FP16 lowering
it read 8.0 GiB where the kernel's mark was 11.8 GiB.
"""

from __future__ import annotations

import sys
import threading
import time


class Steps:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.times: dict[str, float] = {}
        self.peak_rss_gib: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        if _reset_hwm():
            return self._timed(name, fn, args, kwargs, _hwm_bytes)
        return self._sampled(name, fn, args, kwargs)

    def _timed(self, name: str, fn, args, kwargs, peak_bytes):
        if self.enabled:
            print(f"{name} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss_gib[name] = round(peak_bytes() / 2**30, 2)
        if self.enabled:
            print(f" {self.times[name]:.1f} s", file=sys.stderr, flush=True)
        return out

    def _sampled(self, name: str, fn, args, kwargs):
        import psutil

        proc, peak, done = psutil.Process(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def stop_and_read() -> int:
            done.set()
            sampler.join()
            return peak[0]

        try:
            return self._timed(name, fn, args, kwargs, stop_and_read)
        finally:
            done.set()

    def merge(self, times: dict[str, float], peaks: dict[str, float]) -> None:
        """Steps that ran in another process (the torch worker)."""
        self.times.update(times)
        self.peak_rss_gib.update(peaks)


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _hwm_bytes() > 0
    except OSError:
        return False


def _hwm_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
