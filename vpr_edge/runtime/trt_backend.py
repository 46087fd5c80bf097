"""TensorRT engine backend (TensorRT 10/11 tensor-name API, cuda-python or pycuda).

Ownership: the backend owns the runtime, the engine, and per thread one execution context with
its own stream, pinned host buffers and device buffers (one `TensorBinding` record per I/O tensor,
sized for the largest batch the engine accepts). A stream passed in by the caller is used but
never destroyed (`owns_stream` False). `close()` frees everything exactly once and is also the
context-manager exit. Inputs are copied into our own pinned buffer before the async copy, so no
address of a temporary array is ever handed to CUDA.

`tensorrt` is imported when a backend is created, never at module import.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.engines.tensorrt.cuda_api import open_cuda

log = logging.getLogger(__name__)


@dataclass
class TensorBinding:
    """One I/O tensor of one execution context: its buffers, capacity and dtype."""

    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    nbytes: int
    device_ptr: int
    host_ptr: int
    host: np.ndarray  # uint8 view over the pinned buffer (valid until close)

    def host_array(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * self.dtype.itemsize
        return self.host[:n].view(self.dtype).reshape(shape)


@dataclass
class _Slot:
    """What one thread needs to run the engine: its context, buffers, stream and graphs."""

    context: Any
    bindings: dict[str, TensorBinding]
    stream: Any
    stream_handle: int
    owns_stream: bool
    graphs: dict[tuple[int, ...], Any] = field(default_factory=dict)
    graph_failed: bool = False
    last_shape: tuple[int, ...] | None = None


class TrtBackend:
    """Runs a serialized engine: images [B, 3, H, W] -> its (first) output, as float32."""

    name = "trt"
    kinds = ("engine",)

    @classmethod
    def for_artifact(cls, art: Any, options) -> "TrtBackend":
        """The engine of an engine artifact, after refusing one built for another TensorRT or GPU."""
        from vpr_edge.engines.tensorrt.environment import check_engine_compatible, current_environment

        env = options.environment if options.environment is not None else current_environment(int(options.device))
        check_engine_compatible(art.manifest.details, env, str(art.folder))
        return cls(art.file("engine"), device=int(options.device), cuda_graph=options.cuda_graph)

    def __init__(
        self,
        engine_path: str | Path,
        device: int = 0,
        cuda_graph: bool = False,
        stream: Any = None,
        cuda: Any = None,
        trt: Any = None,
    ) -> None:
        self.path = Path(engine_path)
        self._trt = trt or lazy_import("tensorrt")
        self._cuda = cuda or open_cuda()
        self._device = device
        self._external_stream = stream
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and not self._cuda.supports_graphs:
            raise ConfigError(f"CUDA graphs need cuda-python; {self._cuda.name} has none: drop --cuda-graph")
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._closed = False
        self._cuda.set_device(device)
        trt_ = self._trt
        self._logger = trt_.Logger(trt_.Logger.WARNING)
        self._runtime = trt_.Runtime(self._logger)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ArtifactError(
                f"{self.path}: cannot read the engine ({exc.strerror}); rebuild it with vpr-edge build-engine"
            ) from None
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise ArtifactError(
                f"{self.path}: TensorRT {getattr(trt_, '__version__', '?')} could not deserialize the engine "
                "(built by another TensorRT version or for another GPU?); rebuild it with vpr-edge build-engine"
            )
        self._inspect()

    # -- engine I/O ---------------------------------------------------------------------------
    def _inspect(self) -> None:
        trt_, eng = self._trt, self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt_.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise ArtifactError(
                f"{self.path}: expected one input and at least one output, got inputs {inputs}, outputs {outputs}"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.output = "features" if self.output_name == "features" else "descriptor"
        self.io_names = names
        self._dtypes = {}
        for n in names:
            try:
                self._dtypes[n] = np.dtype(trt_.nptype(eng.get_tensor_dtype(n)))
            except TypeError:
                raise ArtifactError(
                    f"{self.path}: tensor {n} has type {eng.get_tensor_dtype(n)} with no numpy equivalent; "
                    "export with float32 or float16 I/O"
                ) from None
        shape = tuple(eng.get_tensor_shape(self.input_name))
        if len(shape) != 4:
            raise ArtifactError(f"{self.path}: input {self.input_name} must be 4-d ([B, 3, H, W] or uint8 [B, H, W, 3]), got {shape}")
        self.dynamic = any(s < 0 for s in shape)
        if self.dynamic:
            lo, _opt, hi = (tuple(s) for s in eng.get_tensor_profile_shape(self.input_name, 0))
            self.min_shape, self.max_shape = lo, hi
            self.batch_size: int | None = None
        else:
            self.min_shape = self.max_shape = shape
            self.batch_size = shape[0]
        self.max_batch = int(self.max_shape[0])
        self.input_dtype = self._dtypes[self.input_name]
        # uint8 input (`vpr-export --input uint8`): [B, H, W, 3], normalised inside the engine
        self.input_layout = "uint8" if self.input_dtype == np.uint8 else "float"
        hw = self.max_shape[1:3] if self.input_layout == "uint8" else self.max_shape[2:4]
        self.input_hw = (int(hw[0]), int(hw[1]))

    # -- per-thread slots -----------------------------------------------------------------------
    def _slot(self) -> _Slot:
        if self._closed:
            raise ConfigError(f"{self.path}: backend is closed")
        key = threading.get_ident()
        slot = self._slots.get(key)
        if slot is None:
            with self._lock:
                slot = self._slots.get(key) or self._make_slot()
                self._slots[key] = slot
        return slot

    def _make_slot(self) -> _Slot:
        self._cuda.set_device(self._device)
        context = self._engine.create_execution_context()
        if context is None:
            raise ArtifactError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        if self._external_stream is not None:
            stream, handle, owns = self._external_stream, int(self._external_stream), False
        else:
            stream, handle = self._cuda.stream_create()
            owns = True
        slot = _Slot(context=context, bindings={}, stream=stream, stream_handle=handle, owns_stream=owns)
        try:
            if self.dynamic and not context.set_input_shape(self.input_name, self.max_shape):
                raise ArtifactError(f"{self.path}: engine refused input shape {self.max_shape}")
            for name in self.io_names:
                is_input = name == self.input_name
                max_shape = tuple(int(s) for s in (self.max_shape if is_input else context.get_tensor_shape(name)))
                if any(s < 0 for s in max_shape):
                    raise ArtifactError(
                        f"{self.path}: output {name} has data-dependent shape {max_shape}; not supported"
                    )
                dtype = self._dtypes[name]
                nbytes = int(np.prod(max_shape)) * dtype.itemsize
                dptr = self._cuda.malloc(nbytes)
                try:
                    hptr, host = self._cuda.malloc_host(nbytes)
                except BaseException:
                    self._cuda.free(dptr)
                    raise
                slot.bindings[name] = TensorBinding(name, is_input, dtype, max_shape, nbytes, dptr, hptr, host)
                if not context.set_tensor_address(name, dptr):
                    raise ArtifactError(f"{self.path}: TensorRT refused the address of tensor {name}")
        except BaseException:
            self._free_slot(slot)
            raise
        return slot

    def _free_slot(self, slot: _Slot) -> None:
        for g in slot.graphs.values():
            self._cuda.graph_destroy(g)
        slot.graphs.clear()
        for b in slot.bindings.values():
            self._cuda.free(b.device_ptr)
            self._cuda.free_host(b.host_ptr)
        slot.bindings.clear()
        slot.context = None
        if slot.owns_stream and slot.stream is not None:
            self._cuda.stream_destroy(slot.stream)
        slot.stream = None

    # -- inference ------------------------------------------------------------------------------
    def _enqueue(self, slot: _Slot, shape: tuple[int, ...]) -> None:
        if not self.cuda_graph or slot.graph_failed:
            if not slot.context.execute_async_v3(slot.stream_handle):
                raise ArtifactError(f"{self.path}: TensorRT execute_async_v3 failed (see TensorRT's log above)")
            return
        graph = slot.graphs.get(shape)
        if graph is None:
            # one plain enqueue first: TensorRT does deferred work on the first run after a shape change
            if not slot.context.execute_async_v3(slot.stream_handle):
                raise ArtifactError(f"{self.path}: TensorRT execute_async_v3 failed (see TensorRT's log above)")
            try:
                self._cuda.capture_begin(slot.stream)
                ok = slot.context.execute_async_v3(slot.stream_handle)
                graph = self._cuda.capture_end(slot.stream)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run without graphs
                log.warning("CUDA graph capture failed for %s (%s); running without graphs", self.path.name, exc)
                slot.graph_failed = True
                return
            if not ok:
                self._cuda.graph_destroy(graph)
                slot.graph_failed = True
                return
            slot.graphs[shape] = graph
            return  # the plain enqueue above already produced this batch's output
        self._cuda.graph_launch(graph, slot.stream)

    def run(self, images: np.ndarray) -> np.ndarray:
        slot = self._slot()
        x = np.asarray(images)
        shape = tuple(int(s) for s in x.shape)
        lo, hi = self.min_shape, self.max_shape
        if len(shape) != 4 or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise ConfigError(
                f"{self.path}: input shape {shape} is outside the engine's range {tuple(lo)}..{tuple(hi)}"
            )
        ctx = slot.context
        if self.dynamic and shape != slot.last_shape:
            if not ctx.set_input_shape(self.input_name, shape):
                raise ConfigError(f"{self.path}: engine refused input shape {shape}")
        slot.last_shape = shape
        inp = slot.bindings[self.input_name]
        np.copyto(inp.host_array(shape), x, casting="same_kind")
        self._cuda.htod_async(inp.device_ptr, inp.host_ptr, int(np.prod(shape)) * inp.dtype.itemsize, slot.stream)
        self._enqueue(slot, shape)
        out = slot.bindings[self.output_name]
        out_shape = tuple(int(s) for s in ctx.get_tensor_shape(self.output_name))
        self._cuda.dtoh_async(out.host_ptr, out.device_ptr, int(np.prod(out_shape)) * out.dtype.itemsize, slot.stream)
        self._cuda.sync(slot.stream)
        return out.host_array(out_shape).astype(np.float32, copy=True)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            self._free_slot(slot)
        self._engine = None
        self._runtime = None

    def __enter__(self) -> "TrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {
            "backend": "trt",
            "engine": str(self.path),
            "cuda": self._cuda.name,
            "cuda_graph": self.cuda_graph,
            "tensorrt": getattr(self._trt, "__version__", "?"),
        }
