"""Measuring: latency percentiles, resident memory (peak by a sampling thread), GPU memory, the machine.

Latencies are wall-clock `time.perf_counter` differences taken after warm-up; percentiles are
numpy's linear interpolation, so p50 <= p95 <= p99 always holds.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.lazy import lazy_import

MB = float(1 << 20)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Summary of latency samples (same unit in and out): p50/p95/p99, mean, min, max and n."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(x, [50, 95, 99])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(lazy_import("psutil").Process().memory_info().rss)


class RssSampler:
    """Peak RSS over a block, sampled by a daemon thread every `interval_s` (RSS has no per-block peak
    counter; the OS high-water mark `ru_maxrss` only ever grows over the process lifetime)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.end_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = None

    def _sample(self) -> int:
        rss = int(self._proc.memory_info().rss)
        self.peak_bytes = max(self.peak_bytes, rss)
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self._proc = lazy_import("psutil").Process()
        self.start_bytes = self._sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_bytes = self._sample()

    def report(self) -> dict[str, float]:
        return {
            "rss_start_mb": self.start_bytes / MB,
            "rss_peak_mb": self.peak_bytes / MB,
            "rss_end_mb": self.end_bytes / MB,
            "rss_peak_increase_mb": (self.peak_bytes - self.start_bytes) / MB,
        }


def _nvidia_smi(*query: str) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def gpu_process_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory this process holds now according to nvidia-smi (None without a GPU/driver).

    Jetson's nvidia-smi has no per-process query; there the answer is None and the CUDA-side numbers
    (torch's max_memory_allocated) are what the report has."""
    rows = _nvidia_smi("--query-compute-apps=pid,used_memory")
    if rows is None:
        return None
    pid = os.getpid() if pid is None else pid
    used = [float(r[1]) for r in rows if len(r) >= 2 and r[0] == str(pid) and r[1].replace(".", "").isdigit()]
    return float(sum(used)) if used else 0.0


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and val.strip():
                return val.strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a result depends on: CPU, cores, RAM, GPUs (nvidia-smi), Jetson release, OS."""
    psutil = lazy_import("psutil")
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    gpus = _nvidia_smi("--query-gpu=name,memory.total,driver_version")
    info["gpus"] = [{"name": r[0], "memory_mb": r[1], "driver": r[2]} for r in gpus if len(r) >= 3] if gpus else []
    tegra = Path("/etc/nv_tegra_release")
    if tegra.exists():
        info["jetson"] = tegra.read_text(errors="replace").splitlines()[0].strip()
    return info
