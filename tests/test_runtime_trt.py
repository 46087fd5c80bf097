"""TensorRT backend: engine/environment compatibility (pure), the backend's buffer and context
logic against an in-memory fake of the TensorRT 10 + CUDA API it uses, and a real-engine test
that skips where tensorrt or a GPU is missing."""

from __future__ import annotations

import dataclasses
import json
import threading
import types

import numpy as np
import pytest

from vpr_edge import presets
from vpr_edge.errors import ArtifactError, ConfigError
from toy_artifact import write_manifest
from vpr_edge.engines.tensorrt.environment import check_engine_compatible, engine_mismatches, normalize_cc
from vpr_edge.runtime.trt_backend import TrtBackend

BUILT = {"trt_version": "10.3.0", "compute_capability": "8.7", "gpu_name": "Orin"}


# -- compatibility (no tensorrt needed) ----------------------------------------------------------
def test_normalize_cc_forms():
    for v in ("8.7", (8, 7), [8, 7], "sm_87", "87", 8.7):
        assert normalize_cc(v) == "8.7"
    assert normalize_cc("12.1") == normalize_cc("sm_121") == "12.1"


def test_matching_engine_passes_and_mismatches_are_named():
    assert engine_mismatches(BUILT, dict(BUILT)) == []
    env = {"trt_version": "10.7.0", "compute_capability": (9, 0), "gpu_name": "H100"}
    problems = engine_mismatches(BUILT, env)
    assert any("TensorRT: engine built with 10.3.0, running 10.7.0" in p for p in problems)
    assert any("compute capability 8.7 (Orin), running 9.0 (H100)" in p for p in problems)
    with pytest.raises(ArtifactError, match=r"rebuild it on this machine with `vpr-edge build-engine /art/onnx`"):
        check_engine_compatible(BUILT | {"onnx_artifact": "/art/onnx"}, env, "/art/engine")
    with pytest.raises(ArtifactError, match="build-engine"):
        check_engine_compatible(BUILT, env, "/art/engine")
    assert engine_mismatches({}, env) == [
        "the engine manifest does not record trt_version",
        "the engine manifest does not record compute_capability",
    ]


def test_version_and_hardware_compatible_engines():
    vc = BUILT | {"version_compatible": True, "hardware_compatibility": "ampere_plus"}
    assert engine_mismatches(vc, {"trt_version": "10.8.1", "compute_capability": "9.0"}) == []
    assert engine_mismatches(vc, {"trt_version": "10.1.0", "compute_capability": "9.0"})  # older runtime
    assert engine_mismatches(vc, {"trt_version": "11.0.0", "compute_capability": "9.0"})  # other major
    assert engine_mismatches(vc, {"trt_version": "10.3.0", "compute_capability": "7.5"})  # pre-Ampere


# -- an in-memory fake of the API surface TrtBackend uses ----------------------------------------
H, W, DIM = 8, 10, 4


def _proj(dim: int) -> np.ndarray:
    return np.arange(3 * dim, dtype=np.float32).reshape(3, dim) / 10


class FakeCuda:
    name = "fake-cuda"
    supports_graphs = True

    def __init__(self):
        self.device: dict[int, np.ndarray] = {}
        self.host: dict[int, np.ndarray] = {}
        self.freed_device, self.freed_host, self.streams_destroyed, self.graphs_destroyed = [], [], [], []
        self.capturing = None
        self._next = 0x1000
        self.launches = 0

    def device_info(self, device):
        return "Fake GPU", "8.7"

    def set_device(self, device):
        pass

    def malloc(self, nbytes):
        self._next += 0x100000
        self.device[self._next] = np.zeros(nbytes, np.uint8)
        return self._next

    def free(self, ptr):
        assert ptr in self.device, "double or foreign free"
        self.freed_device.append(ptr)
        del self.device[ptr]

    def malloc_host(self, nbytes):
        arr = np.zeros(nbytes, np.uint8)
        self.host[arr.ctypes.data] = arr
        return arr.ctypes.data, arr

    def free_host(self, ptr):
        assert ptr in self.host, "double or foreign free"
        self.freed_host.append(ptr)
        del self.host[ptr]

    def stream_create(self):
        s = object()
        return s, id(s)

    def stream_destroy(self, stream):
        self.streams_destroyed.append(stream)

    def htod_async(self, dst, src, nbytes, stream):
        self.device[dst][:nbytes] = self.host[src][:nbytes]

    def dtoh_async(self, dst, src, nbytes, stream):
        self.host[dst][:nbytes] = self.device[src][:nbytes]

    def sync(self, stream):
        pass

    def capture_begin(self, stream):
        self.capturing = []

    def capture_end(self, stream):
        ops, self.capturing = self.capturing, None
        return {"ops": ops}

    def graph_launch(self, graph, stream):
        self.launches += 1
        for op in graph["ops"]:
            op()

    def graph_destroy(self, graph):
        self.graphs_destroyed.append(graph)


class FakeContext:
    def __init__(self, engine):
        self.engine = engine
        self.shapes = {}
        self.addresses = {}
        self.executions = 0

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        if not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        b = self.shapes.get("images", self.engine.shape)[0]
        return (b, 3, H, W) if name == "images" else (b, self.engine.dim)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def _compute(self):
        cuda, e = self.engine.cuda, self.engine
        b = self.get_tensor_shape("images")[0]
        n_in = b * 3 * H * W * e.in_dtype.itemsize
        x = cuda.device[self.addresses["images"]][:n_in].view(e.in_dtype).reshape(b, 3, H, W).astype(np.float32)
        y = (x.mean(axis=(2, 3)) @ _proj(e.dim)).astype(e.out_dtype)
        cuda.device[self.addresses["descriptor"]][: y.nbytes] = y.view(np.uint8).reshape(-1)
        self.executions += 1

    def execute_async_v3(self, stream_handle):
        if self.engine.cuda.capturing is not None:
            self.engine.cuda.capturing.append(self._compute)
        else:
            self._compute()
        return True


class FakeEngine:
    def __init__(self, cuda, cfg):
        self.cuda = cuda
        self.shape = tuple(cfg["shape"])
        self.profile = [tuple(p) for p in cfg["profile"]] if cfg.get("profile") else [self.shape] * 3
        self.in_dtype = np.dtype(cfg.get("io", "float32"))
        self.out_dtype = self.in_dtype
        self.dim = int(cfg.get("dim", DIM))
        self.num_io_tensors = 2
        self.contexts = []

    def get_tensor_name(self, i):
        return ["images", "descriptor"][i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if name == "images" else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return str(self.in_dtype)

    def get_tensor_shape(self, name):
        return self.shape if name == "images" else (self.shape[0], self.dim)

    def get_tensor_profile_shape(self, name, profile):
        return self.profile

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeTrt:
    __version__ = "10.3.0"
    TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, cuda):
        self.cuda = cuda
        self.engines = []
        outer = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                if not data.startswith(b"FAKE"):
                    return None
                e = FakeEngine(outer.cuda, json.loads(data[4:]))
                outer.engines.append(e)
                return e

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type


def _engine_file(
    tmp_path, shape=(-1, 3, H, W), profile=((1, 3, H, W), (4, 3, H, W), (8, 3, H, W)), io="float32", dim=DIM
):
    p = tmp_path / "model.engine"
    p.write_bytes(b"FAKE" + json.dumps({"shape": shape, "profile": profile, "io": io, "dim": dim}).encode())
    return p


def _expected(x, dim=DIM):
    return x.astype(np.float32).mean(axis=(2, 3)) @ _proj(dim)


@pytest.fixture
def fake():
    cuda = FakeCuda()
    return cuda, FakeTrt(cuda)


def test_dynamic_engine_runs_any_batch_in_range(tmp_path, fake):
    cuda, trt = fake
    x = np.random.default_rng(0).random((8, 3, H, W)).astype(np.float32)
    with TrtBackend(_engine_file(tmp_path), cuda=cuda, trt=trt) as be:
        assert be.dynamic and be.max_batch == 8 and be.batch_size is None and be.input_hw == (H, W)
        for b in (1, 5, 8, 2):
            np.testing.assert_allclose(be.run(x[:b]), _expected(x[:b]), rtol=1e-5)
        with pytest.raises(ConfigError, match="outside the engine's range"):
            be.run(np.zeros((9, 3, H, W), np.float32))
        with pytest.raises(ConfigError, match="outside"):
            be.run(np.zeros((2, 3, H + 1, W), np.float32))
        assert len(cuda.device) == 2 and len(cuda.host) == 2  # one record per I/O tensor


def test_close_frees_everything_once(tmp_path, fake):
    cuda, trt = fake
    be = TrtBackend(_engine_file(tmp_path), cuda=cuda, trt=trt)
    be.run(np.zeros((2, 3, H, W), np.float32))
    be.close()
    be.close()  # idempotent
    assert not cuda.device and not cuda.host
    assert len(cuda.freed_device) == len(cuda.freed_host) == 2 and len(cuda.streams_destroyed) == 1
    with pytest.raises(ConfigError, match="closed"):
        be.run(np.zeros((2, 3, H, W), np.float32))


def test_external_stream_is_not_destroyed(tmp_path, fake):
    cuda, trt = fake
    with TrtBackend(_engine_file(tmp_path), cuda=cuda, trt=trt, stream=12345) as be:
        be.run(np.zeros((1, 3, H, W), np.float32))
    assert cuda.streams_destroyed == []


def test_one_context_and_buffers_per_thread(tmp_path, fake):
    cuda, trt = fake
    x = np.random.default_rng(1).random((4, 3, H, W)).astype(np.float32)
    results = {}
    with TrtBackend(_engine_file(tmp_path), cuda=cuda, trt=trt) as be:
        results["main"] = be.run(x)

        def work():
            results["thread"] = be.run(x[:3])

        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert len(trt.engines[0].contexts) == 2 and len(cuda.device) == 4
    np.testing.assert_allclose(results["thread"], _expected(x[:3]), rtol=1e-5)
    assert not cuda.device and len(cuda.streams_destroyed) == 2


def test_cuda_graph_is_captured_once_per_shape_and_replayed(tmp_path, fake):
    cuda, trt = fake
    rng = np.random.default_rng(2)
    with TrtBackend(_engine_file(tmp_path), cuda=cuda, trt=trt, cuda_graph=True) as be:
        for _ in range(3):
            x = rng.random((4, 3, H, W)).astype(np.float32)  # new values each time: replay reads the buffers
            np.testing.assert_allclose(be.run(x), _expected(x), rtol=1e-5)
        x = rng.random((2, 3, H, W)).astype(np.float32)
        np.testing.assert_allclose(be.run(x), _expected(x), rtol=1e-5)
        assert cuda.launches == 2  # calls 2 and 3 of batch 4 replayed; each shape's first call ran plainly
    assert len(cuda.graphs_destroyed) == 2


def test_fixed_shape_fp16_engine(tmp_path, fake):
    cuda, trt = fake
    x = np.random.default_rng(3).random((2, 3, H, W)).astype(np.float32)
    with TrtBackend(_engine_file(tmp_path, shape=(2, 3, H, W), profile=None, io="float16"), cuda=cuda, trt=trt) as be:
        assert be.batch_size == 2 and not be.dynamic and be.input_dtype == np.float16
        out = be.run(x)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, _expected(x.astype(np.float16)), rtol=2e-3)


def test_unreadable_engine_says_rebuild(tmp_path, fake):
    cuda, trt = fake
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine")
    with pytest.raises(ArtifactError, match="rebuild it with vpr-edge build-engine"):
        TrtBackend(bad, cuda=cuda, trt=trt)


def _engine_artifact(tmp_path, details):
    """An engine artifact folder (manifest kind 'engine') around a fake engine with H x W input."""
    preset = presets.get("boq-resnet50").tiny()
    preset = dataclasses.replace(preset, preprocess=dataclasses.replace(preset.preprocess, image_size=(H, W)))
    folder = tmp_path / "engine_art"
    folder.mkdir()
    _engine_file(folder, dim=preset.descriptor_dim)
    write_manifest(folder, preset, "engine", {"model.engine": "engine"},
                   {"scope": "descriptor", "precision": "fp16", **details})
    return folder, preset


def test_describer_refuses_a_mismatched_engine_before_loading(tmp_path, monkeypatch, fake):
    from vpr_edge.runtime import describer as D
    from vpr_edge.engines.tensorrt import environment as engine_compat

    cuda, trt = fake
    folder, _ = _engine_artifact(tmp_path, BUILT)
    monkeypatch.setattr(
        engine_compat, "current_environment", lambda device=0: {"trt_version": "10.9.0", "compute_capability": "8.7"}
    )
    with pytest.raises(ArtifactError, match="engine built with 10.3.0, running 10.9.0.*vpr-edge build-engine"):
        D.Describer.from_artifact(folder)


def test_describer_runs_an_engine_artifact_through_the_fake(tmp_path, monkeypatch, fake):
    """from_artifact -> compat check -> TrtBackend -> descriptors, with the fake standing in."""
    import sys

    from vpr_edge.engines.tensorrt import environment as engine_compat
    from vpr_edge.runtime import trt_backend

    cuda, trt = fake
    folder, preset = _engine_artifact(tmp_path, BUILT)
    monkeypatch.setattr(engine_compat, "current_environment", lambda device=0: dict(BUILT))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "open_cuda", lambda: cuda)
    from vpr_edge.runtime.describer import Describer

    rgb = (np.random.default_rng(4).random((5, H, W, 3)) * 255).astype(np.uint8)
    with Describer.from_artifact(folder) as d:
        assert d.backend.describe()["backend"] == "trt"
        out = d.describe(list(rgb), batch=8)
        x = np.stack([d.preprocess(im) for im in rgb])
    assert out.shape == (5, preset.descriptor_dim)
    np.testing.assert_allclose(out, _expected(x, preset.descriptor_dim), rtol=1e-5)
    assert not cuda.device


# -- the real thing, where it exists -------------------------------------------------------------
def _real_trt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("tensorrt not importable")
    from vpr_edge.engines.tensorrt.cuda_api import open_cuda

    try:
        name, cc = open_cuda().device_info(0)
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means: no usable GPU here
        pytest.skip(f"no CUDA GPU ({exc})")
    return tensorrt


@pytest.mark.tensorrt
def test_real_engine_matches_onnxruntime(tmp_path):
    trt = _real_trt()
    from vpr_edge.runtime.ort_backend import OrtBackend
    from toy_artifact import write_toy_artifact

    preset = presets.get("boq-resnet50").tiny()
    art = write_toy_artifact(tmp_path / "onnx", preset, "descriptor")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((art / "model.onnx").read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    h, w = preset.preprocess.image_size
    profile.set_shape("images", (1, 3, h, w), (4, 3, h, w), (8, 3, h, w))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    (tmp_path / "model.engine").write_bytes(bytes(plan))
    x = np.random.default_rng(0).standard_normal((5, 3, h, w)).astype(np.float32)
    with TrtBackend(tmp_path / "model.engine", cuda_graph=True) as be, OrtBackend(art / "model.onnx") as ort_be:
        for _ in range(2):
            np.testing.assert_allclose(be.run(x), ort_be.run(x), atol=1e-3)
