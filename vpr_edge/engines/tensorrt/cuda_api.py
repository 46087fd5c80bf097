"""The few CUDA runtime calls the TensorRT backend needs, over cuda-python or pycuda.

Every call checks its status and raises a one-line VprEdgeError naming the call; buffers are
returned as plain integer addresses plus, for pinned host memory, a numpy view that stays valid
until `free_host` (the caller owns the memory and must not use the view afterwards).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from vpr_edge.errors import ConfigError, MissingDependencyError, VprEdgeError
from vpr_edge.lazy import available, lazy_import


class CudaError(VprEdgeError):
    """A CUDA runtime call failed."""


class CudaPython:
    """cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` for cuda-python < 12.6)."""

    name = "cuda-python"
    supports_graphs = True

    def __init__(self) -> None:
        try:
            self.rt = lazy_import("cuda.bindings.runtime")
        except MissingDependencyError:
            self.rt = lazy_import("cuda.cudart")

    def _check(self, call: str, result: Any) -> Any:
        if isinstance(result, tuple):
            err, rest = result[0], result[1:]
        else:
            err, rest = result, ()
        if err != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(err)
            msg = text.decode() if isinstance(text, bytes) else str(text)
            if err in (self.rt.cudaError_t.cudaErrorNoDevice, self.rt.cudaError_t.cudaErrorInsufficientDriver):
                raise MissingDependencyError(
                    f"{call}: no usable CUDA GPU ({msg}); run on a machine with an NVIDIA GPU and driver"
                )
            raise CudaError(f"{call} failed: {msg}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def device_info(self, device: int) -> tuple[str, str]:
        prop = self._check("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(device))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00"), f"{prop.major}.{prop.minor}"

    def set_device(self, device: int) -> None:
        self._check("cudaSetDevice", self.rt.cudaSetDevice(device))

    def malloc(self, nbytes: int) -> int:
        return int(self._check("cudaMalloc", self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self._check("cudaFree", self.rt.cudaFree(ptr))

    def malloc_host(self, nbytes: int) -> tuple[int, np.ndarray]:
        ptr = int(self._check("cudaMallocHost", self.rt.cudaMallocHost(max(nbytes, 1))))
        view = np.frombuffer((ctypes.c_ubyte * max(nbytes, 1)).from_address(ptr), dtype=np.uint8)
        return ptr, view

    def free_host(self, ptr: int) -> None:
        self._check("cudaFreeHost", self.rt.cudaFreeHost(ptr))

    def stream_create(self) -> tuple[Any, int]:
        stream = self._check(
            "cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking)
        )
        return stream, int(stream)

    def stream_destroy(self, stream: Any) -> None:
        self._check("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def htod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check("cudaMemcpyAsync(HtoD)", self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream))

    def dtoh_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check("cudaMemcpyAsync(DtoH)", self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream))

    def sync(self, stream: Any) -> None:
        self._check("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def capture_begin(self, stream: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(stream, mode))

    def capture_end(self, stream: Any) -> Any:
        graph = self._check("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(stream))
        try:
            return self._check("cudaGraphInstantiate", self.rt.cudaGraphInstantiate(graph, 0))
        finally:
            self._check("cudaGraphDestroy", self.rt.cudaGraphDestroy(graph))

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        self._check("cudaGraphLaunch", self.rt.cudaGraphLaunch(graph_exec, stream))

    def graph_destroy(self, graph_exec: Any) -> None:
        self._check("cudaGraphExecDestroy", self.rt.cudaGraphExecDestroy(graph_exec))


class PyCuda:
    """pycuda, for JetPack images that ship it instead of cuda-python (no CUDA graphs)."""

    name = "pycuda"
    supports_graphs = False

    def __init__(self) -> None:
        self.drv = lazy_import("pycuda.driver")
        self.drv.init()
        self._context = None
        self._device_allocs: dict[int, Any] = {}
        self._host_arrays: dict[int, np.ndarray] = {}

    def device_info(self, device: int) -> tuple[str, str]:
        dev = self.drv.Device(device)
        major, minor = dev.compute_capability()
        return dev.name(), f"{major}.{minor}"

    def set_device(self, device: int) -> None:
        if self._context is None:
            self._context = self.drv.Device(device).retain_primary_context()
        self._context.push()

    def malloc(self, nbytes: int) -> int:
        alloc = self.drv.mem_alloc(max(nbytes, 1))
        self._device_allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._device_allocs.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def malloc_host(self, nbytes: int) -> tuple[int, np.ndarray]:
        arr = self.drv.pagelocked_empty(max(nbytes, 1), np.uint8)
        ptr = arr.ctypes.data
        self._host_arrays[ptr] = arr
        return ptr, arr

    def free_host(self, ptr: int) -> None:
        arr = self._host_arrays.pop(ptr, None)
        if arr is not None and getattr(arr, "base", None) is not None and hasattr(arr.base, "free"):
            arr.base.free()

    def stream_create(self) -> tuple[Any, int]:
        stream = self.drv.Stream()
        return stream, int(stream.handle)

    def stream_destroy(self, stream: Any) -> None:
        del stream  # pycuda frees a stream when its object goes

    def _host(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, arr in self._host_arrays.items():
            if base <= ptr and ptr + nbytes <= base + arr.nbytes:
                return arr[ptr - base : ptr - base + nbytes]
        raise CudaError(f"host address {ptr:#x} is not a pinned buffer allocated here")

    def htod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.drv.memcpy_htod_async(dst, self._host(src, nbytes), stream)

    def dtoh_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.drv.memcpy_dtoh_async(self._host(dst, nbytes), src, stream)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def capture_begin(self, stream: Any) -> None:
        raise ConfigError(
            "CUDA graph capture needs cuda-python (pip install 'vpr-edge[tensorrt]'); pycuda has none here"
        )

    def capture_end(self, stream: Any) -> Any:
        self.capture_begin(stream)

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        self.capture_begin(stream)

    def graph_destroy(self, graph_exec: Any) -> None:
        return None


def open_cuda(prefer: str = "auto") -> CudaPython | PyCuda:
    """cuda-python if importable (or asked for), else pycuda; error naming both extras otherwise."""
    if prefer == "pycuda":
        return PyCuda()
    if prefer == "cuda-python" or available("cuda.bindings.runtime") or available("cuda.cudart"):
        return CudaPython()
    if available("pycuda.driver"):
        return PyCuda()
    raise MissingDependencyError(
        "neither cuda-python nor pycuda is installed; install one: pip install 'vpr-edge[tensorrt]' "
        "(cuda-python) or 'vpr-edge[tensorrt-pycuda]'"
    )
