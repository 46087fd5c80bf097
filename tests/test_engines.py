"""TensorRT engines: manifest refusal, CLI without TensorRT, builder calls (fake TensorRT), doctor,
and the real build where TensorRT and a GPU exist."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from vpr_edge import presets  # noqa: E402
from vpr_edge.cli.main import main  # noqa: E402
from toy_artifact import write_manifest  # noqa: E402
from vpr_edge.engines.tensorrt.build import (  # noqa: E402
    EngineOptions,
    build_engine,
    engine_command,
    network_flags,
    profile_shapes,
)
from vpr_edge.engines.tensorrt.environment import check_engine_compatible  # noqa: E402
from vpr_edge.space import DescriptorSpace  # noqa: E402
from vpr_edge.errors import ArtifactError, ConfigError  # noqa: E402
from vpr_edge.lazy import available  # noqa: E402
from vpr_edge.manifest import Manifest  # noqa: E402

TINY = presets.get("anyloc-dinov2@tiny")
H, W = TINY.preprocess.image_size


def _onnx_artifact(folder: Path, precision: str = "fp32") -> Path:
    """A small but valid ONNX artifact (no torch): images -> pooled, L2-normalised colour descriptor."""
    from onnx import TensorProto, helper, numpy_helper

    dim = TINY.descriptor_dim
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, H, W])
    y = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", dim])
    proj = numpy_helper.from_array(np.random.default_rng(0).standard_normal((48, dim)).astype(np.float32), "proj")
    nodes = [
        helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[28, 38], strides=[28, 38]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["raw"]),
        helper.make_node("LpNormalization", ["raw"], ["descriptor"], axis=1, p=2),
    ]
    model = helper.make_model(helper.make_graph(nodes, "toy", [x], [y], initializer=[proj]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"))
    return write_manifest(folder, TINY, "onnx", {"model.onnx": "onnx"},
                          {"scope": "descriptor", "precision": precision, "io_dtype": "float32"})


def _engine_manifest(**details) -> Manifest:
    base = {"scope": "descriptor", "precision": "fp16", "trt_version": "10.3.0", "compute_capability": "8.7",
            "gpu_name": "Orin", "onnx_artifact": "artifacts/x-fp16"}
    return Manifest(kind="engine", preset=TINY.to_dict(), space=DescriptorSpace.of(TINY, "toy:seed=0").to_dict(),
                    details={**base, **details})


# ---------------------------------------------------------------------------------------------
# Pure parts: refusal, command, profile, flags
# ---------------------------------------------------------------------------------------------


def test_engine_for_another_tensorrt_or_gpu_is_refused():
    m = _engine_manifest().details
    check_engine_compatible(m, {"trt_version": "10.3.0", "compute_capability": "8.7", "gpu_name": "Orin"}, "eng")
    with pytest.raises(ArtifactError, match=r"TensorRT: engine built with 10\.3\.0, running 10\.7\.0.*build-engine"):
        check_engine_compatible(m, {"trt_version": "10.7.0", "compute_capability": "8.7", "gpu_name": "Orin"}, "eng")
    with pytest.raises(ArtifactError, match=r"compute capability 8\.7.*running 9\.0.*rebuild"):
        check_engine_compatible(m, {"trt_version": "10.3.0", "compute_capability": "9.0", "gpu_name": "H100"}, "eng")
    vc = _engine_manifest(version_compatible=True).details
    check_engine_compatible(vc, {"trt_version": "10.7.0", "compute_capability": "8.7"}, "eng")
    with pytest.raises(ArtifactError, match="version-compatible"):
        check_engine_compatible(vc, {"trt_version": "11.0.0", "compute_capability": "8.7"}, "eng")



def test_engine_manifest_mismatch_refused_at_load_without_tensorrt(tmp_path):
    """The runtime refuses before touching TensorRT: the check needs only the manifest."""
    from vpr_edge.artifact import load_artifact
    from vpr_edge.runtime.backends import BackendOptions, open_backend

    m = _engine_manifest()
    (tmp_path / "model.engine").write_bytes(b"not a real plan")
    m.add_file(tmp_path, "model.engine", "engine")
    m.save(tmp_path)
    art = load_artifact(tmp_path, kinds=("engine",))
    with pytest.raises(ArtifactError, match="rebuild it on this machine"):
        open_backend(art, "trt", BackendOptions(environment={"trt_version": "10.7.0", "compute_capability": "8.7"}))
    with pytest.raises(ConfigError, match="runs engine artifacts"):
        open_backend(load_artifact(_onnx_artifact(tmp_path / "onnx")), "trt")


def test_engine_command_and_options():
    assert engine_command("art/x") == "vpr-edge build-engine art/x"
    cmd = engine_command("art/x", EngineOptions(batch_sizes=(1, 4, 8), timing_cache=Path("t.cache"), version_compatible=True))
    assert cmd == "vpr-edge build-engine art/x --batch 1,4,8 --timing-cache t.cache --version-compatible"
    with pytest.raises(ConfigError):
        EngineOptions(opt_level=7).check()
    with pytest.raises(ConfigError):
        EngineOptions(exclude_lean_runtime=True).check()
    assert profile_shapes((-1, 3, 112, 154), (8, 1, 4)) == ((1, 3, 112, 154), (4, 3, 112, 154), (8, 3, 112, 154))
    assert profile_shapes((2, 3, 112, 154), (1, 4)) is None


def test_build_engine_cli_without_tensorrt(tmp_path, capsys):
    if available("tensorrt"):
        pytest.skip("tensorrt is importable here; this checks the message on machines without it")
    art = _onnx_artifact(tmp_path / "art")
    rc = main(["build-engine", str(art), "--batch", "1,4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "vpr-edge[tensorrt]" in err and "Jetson" in err
    assert f"`vpr-edge build-engine {art} --batch 1,4`" in err


# ---------------------------------------------------------------------------------------------
# Builder calls against a fake tensorrt (records what the real one would be asked)
# ---------------------------------------------------------------------------------------------


def _fake_trt(version: str) -> types.SimpleNamespace:
    calls: dict = {"flags": [], "set_flag": [], "profiles": [], "cache_blobs": []}

    class Enum:
        def __init__(self, **members):
            self.__dict__.update(members)

    class Cache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob + b"+timings"

    class Config:
        def __init__(self):
            self.builder_optimization_level = None
            self.hardware_compatibility_level = None
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def create_timing_cache(self, blob):
            calls["cache_blobs"].append(bytes(blob))
            return Cache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def set_flag(self, flag):
            calls["set_flag"].append(flag)

        def add_optimization_profile(self, p):
            calls["profiles"].append(p.shapes)

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class Network:
        def get_input(self, i):
            m = onnx.load(calls["onnx"], load_external_data=False)
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in m.graph.input[0].type.tensor_type.shape.dim]
            return types.SimpleNamespace(name=m.graph.input[0].name, shape=tuple(dims))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["flags"].append(flags)
            return Network()

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["config_at_build"] = config
            return b"PLAN"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            calls["onnx"] = path
            return True

    flags = dict(VERSION_COMPATIBLE="VC", EXCLUDE_LEAN_RUNTIME="EXCL")  # no FP16/INT8: removed in TensorRT 11
    return types.SimpleNamespace(
        __version__=version,
        calls=calls,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder,
        OnnxParser=OnnxParser,
        NetworkDefinitionCreationFlag=Enum(STRONGLY_TYPED=1) if version.startswith("10") else Enum(),
        MemoryPoolType=Enum(WORKSPACE="WORKSPACE"),
        BuilderFlag=Enum(**flags),
        HardwareCompatibilityLevel=Enum(AMPERE_PLUS="AMPERE_PLUS"),
    )


@pytest.mark.parametrize("version", ["10.3.0", "11.1.0"])
def test_build_engine_calls_and_manifest(tmp_path, version):
    from vpr_edge.artifact import load_artifact

    art = _onnx_artifact(tmp_path / "art", precision="fp16")
    trt = _fake_trt(version)
    env = {"trt_version": version, "gpu_name": "Orin", "compute_capability": "8.7"}
    cache = tmp_path / "timing.cache"
    opts = EngineOptions(workspace_gb=2, opt_level=4, batch_sizes=(1, 4, 8), timing_cache=cache, version_compatible=True)
    m = build_engine(art, tmp_path / "eng", options=opts, env=env, trt=trt)
    c = trt.calls
    assert network_flags(trt) == c["flags"][0] == (1 << 1 if version.startswith("10") else 0)
    assert c["workspace"] == ("WORKSPACE", 2 << 30)
    assert c["config"].builder_optimization_level == 4
    assert c["profiles"] == [("images", (1, 3, H, W), (4, 3, H, W), (8, 3, H, W))]
    assert c["set_flag"] == ["VC"]  # version compatibility only: precision comes from the graph
    assert cache.read_bytes() == b"+timings"
    assert (tmp_path / "eng" / "model.engine").read_bytes() == b"PLAN"
    d = m.details
    assert d["trt_version"] == version and d["gpu_name"] == "Orin" and d["compute_capability"] == "8.7"
    assert d["onnx_sha256"] == Manifest.load(art).files["model.onnx"]["sha256"]
    assert d["precision"] == "fp16" and d["strongly_typed"] and d["batch_sizes"] == [1, 4, 8]
    loaded = load_artifact(tmp_path / "eng", kinds=("engine",))
    assert loaded.kind == "engine" and loaded.file("engine").name == "model.engine"
    check_engine_compatible(loaded.manifest.details, env, "eng")

    # the timing cache is reused by the next build
    build_engine(art, tmp_path / "eng", options=opts, env=env, trt=trt, force=True)
    assert c["cache_blobs"] == [b"", b"+timings"]
    with pytest.raises(ArtifactError, match="already exists"):
        build_engine(art, tmp_path / "eng", options=opts, env=env, trt=trt)


def test_tensorrt_without_strongly_typed_networks_is_refused():
    old = _fake_trt("10.0.0")
    old.__version__ = "8.6.1"
    old.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    with pytest.raises(ArtifactError, match="strongly typed"):
        network_flags(old)


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def test_doctor_checks_onnx_runtime_and_prints_one_verdict(tmp_path, capsys):
    """Only ONNX Runtime can run this hand-made artifact here: nothing to compare, and the verdict says
    which comparisons it could not make instead of 'OK'."""
    art = _onnx_artifact(tmp_path / "art")
    rc = main(["doctor", str(art), "--limit", "8", "--repeat", "3"])
    out = capsys.readouterr().out
    verdicts = [line for line in out.splitlines() if line.startswith("verdict:")]
    assert rc == 4 and len(verdicts) == 1 and verdicts[0].startswith("verdict: INCOMPLETE")
    assert "not compared:" in verdicts[0] and "pytorch:" in verdicts[0] and "tensorrt:" in verdicts[0]
    assert "onnxruntime" in out and "median" in out
    assert "gpu" in out and "tensorrt" in out
    if not available("tensorrt"):
        assert f"vpr-edge build-engine {art}" in out


def test_doctor_reports_a_refused_engine(tmp_path, capsys):
    if available("tensorrt"):
        pytest.skip("with tensorrt importable the environment is real; this checks the refusal without it")
    m = _engine_manifest()
    (tmp_path / "model.engine").write_bytes(b"x")
    m.add_file(tmp_path, "model.engine", "engine")
    m.save(tmp_path)
    rc = main(["doctor", str(tmp_path), "--limit", "4", "--repeat", "1"])
    out = capsys.readouterr().out
    assert rc != 0 and out.strip().splitlines()[-1].startswith("verdict: FAIL")


# ---------------------------------------------------------------------------------------------
# Real TensorRT
# ---------------------------------------------------------------------------------------------


def _has_gpu() -> bool:
    try:
        from vpr_edge.engines.tensorrt.build import environment

        environment()
    except Exception:  # noqa: BLE001 - any failure means: no usable TensorRT + GPU here
        return False
    return True


@pytest.mark.tensorrt
@pytest.mark.skipif(not available("tensorrt"), reason="needs tensorrt (pip install 'vpr-edge[tensorrt]') and a CUDA GPU")
def test_tensorrt_build_and_run(tmp_path, corridor):
    if not _has_gpu():
        pytest.skip("tensorrt imports but no CUDA GPU is usable here")
    pytest.importorskip("torch")
    import toy_vit as toy
    from vpr_edge.verifyset import VerifySet, from_folder
    from vpr_edge.engines.precision.calibration import calibration_images
    from vpr_edge.engines.precision.lower import lower_onnx

    cal, _ = calibration_images(corridor, TINY.preprocess, limit=48)
    _vs = from_folder(corridor, TINY.preprocess, limit=32, with_fit=False)
    images, db, q, pos, src = _vs.images, _vs.db_idx, _vs.q_idx, _vs.positives, _vs.source
    art = tmp_path / "fp16"
    art.mkdir()
    lower_onnx(toy.toy_onnx(fit_images=cal), art / "model.onnx", "fp16", VerifySet(images, db, q, pos, src),
               accept_fidelity=True)
    write_manifest(art, TINY, "onnx", {"model.onnx": "onnx"}, {"scope": "descriptor", "precision": "fp16", "io_dtype": "float32"})
    build_engine(art, tmp_path / "engine", options=EngineOptions(batch_sizes=(1, 8), timing_cache=tmp_path / "t.cache"))
    from vpr_edge.doctor.engine_check import record_engine_check

    eng = record_engine_check(tmp_path / "engine", art, verify=corridor)
    rep = eng.verification["engine_vs_onnxruntime"]["report"]
    assert rep["nonfinite"] == 0 and rep["cos_mean"] > 0.999
    assert (tmp_path / "t.cache").stat().st_size > 0
    assert np.isfinite(rep["top1_agreement"])
