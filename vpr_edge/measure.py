"""Measuring, one way each: latency percentiles, peak resident memory, GPU memory, the machine.

Latencies are wall-clock `time.perf_counter` differences taken after warm-up; percentiles are
numpy's linear interpolation (the one definition: doctor, benchmarks and the runtime's stream
all report these), so p50 <= p95 <= p99 always holds.
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


_ACTIVE: "set[PeakRss]" = set()  # open blocks: a nested block's reset must not lose their peak so far


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    before = hwm_bytes()
    for block in _ACTIVE:
        block.peak_bytes = max(block.peak_bytes, before)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return hwm_bytes() > 0
    except OSError:
        return False


def hwm_bytes() -> int:
    """The kernel's peak-RSS mark of this process (VmHWM) in bytes; 0 where /proc has none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakRss:
    """Peak resident memory over a block: the one way vpr-edge measures it.

    Where Linux offers it, the kernel's own high-water mark (VmHWM), reset at the start of the block
    through /proc/self/clear_refs: exact, and it sees allocations made while C code holds the GIL
    (protobuf serialisation, ONNX Runtime session creation). Elsewhere a daemon thread samples RSS
    every `interval_s`; it cannot run while the GIL is held and under-reads such peaks (measured on
    ViT-G's FP16 lowering: 8.0 GiB sampled where the kernel's mark was 11.8 GiB)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.end_bytes = 0
        self.method = ""
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

    def __enter__(self) -> "PeakRss":
        self._proc = lazy_import("psutil").Process()
        self.start_bytes = self._sample()
        if _reset_hwm():
            self.method = "VmHWM"
            _ACTIVE.add(self)
        else:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_bytes = self._sample()
        if self.method == "VmHWM":
            _ACTIVE.discard(self)
            self.peak_bytes = max(self.peak_bytes, hwm_bytes())

    def report(self) -> dict[str, float | str]:
        return {
            "rss_start_mb": self.start_bytes / MB,
            "rss_peak_mb": self.peak_bytes / MB,
            "rss_end_mb": self.end_bytes / MB,
            "rss_peak_increase_mb": (self.peak_bytes - self.start_bytes) / MB,
            "rss_peak_method": self.method,
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


_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "asimddp", "sve", "i8mm")


def cpu_features() -> list[str]:
    """The CPU's SIMD features that decide ONNX Runtime's integer kernels (AVX2, AVX-512 VNNI, AMX; NEON
    dot-product on ARM), from /proc/cpuinfo; recorded in every benchmark result, since INT8 speed and
    accuracy depend on them."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(val.split())
    return [f for f in _FEATURES if f in flags]


def machine_info() -> dict[str, Any]:
    """What a result depends on: CPU, cores, RAM, GPUs (nvidia-smi), Jetson release, OS."""
    psutil = lazy_import("psutil")
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_features": cpu_features(),
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
