"""`EngineFromOnnx`: an ONNX artifact folder -> a TensorRT engine artifact folder.

Precision is in the graph (FP16 casts, INT8 Q/DQ), so the network is strongly typed and no
precision builder flag is ever set: TensorRT 11 removed BuilderFlag.FP16/INT8 and the
calibrators, and in 10.x they conflict with a strongly typed network.

TensorRT API across versions (Python, checked against NVIDIA's API docs):
- 10.x: `create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))`; EXPLICIT_BATCH
  is deprecated and ignored (networks are always explicit batch), so it is never passed.
- 11.x: strongly typed is always on and the STRONGLY_TYPED flag is kept only for compatibility and
  ignored, so no flag is passed.
- both: `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`,
  `builder_optimization_level` (0..5), `create_timing_cache(blob)` + `set_timing_cache(cache,
  ignore_mismatch=False)`, `IOptimizationProfile.set_shape(name, min, opt, max)`,
  `BuilderFlag.VERSION_COMPATIBLE` (+ `EXCLUDE_LEAN_RUNTIME`), `hardware_compatibility_level`,
  `OnnxParser.parse_from_file` (reads external weights beside the file), `build_serialized_network`.

The engine's manifest is the ONNX manifest plus what makes an engine usable only where it was built:
TensorRT version, GPU name and compute capability, and the SHA-256 of the ONNX it came from.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vpr_edge.atomic import atomic_dir, atomic_file
from vpr_edge.errors import ArtifactError, ConfigError, MissingDependencyError
from vpr_edge.lazy import lazy_import
from vpr_edge.manifest import Manifest, package_versions, write_artifact

log = logging.getLogger(__name__)

ENGINE_NAME = "model.engine"
OPT_LEVELS = range(0, 6)


@dataclass(frozen=True)
class EngineOptions:
    workspace_gb: float = 4.0
    opt_level: int = 3
    batch_sizes: tuple[int, ...] = (1,)
    timing_cache: Path | None = None
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    hardware_compatible: bool = False  # Ampere+ engines that run on any GPU of that generation or newer

    def check(self) -> None:
        if self.workspace_gb <= 0:
            raise ConfigError(f"--workspace-gb must be > 0, got {self.workspace_gb}")
        if self.opt_level not in OPT_LEVELS:
            raise ConfigError(f"--opt-level must be 0..5 (TensorRT builder optimisation level), got {self.opt_level}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"--batch needs positive sizes like 1,4,8, got {self.batch_sizes}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise ConfigError("--exclude-lean-runtime only applies with --version-compatible")


def engine_command(artifact_dir: str | Path, options: EngineOptions | None = None) -> str:
    """The one command to run on the Jetson/GPU machine to build the engine from this artifact."""
    o = options or EngineOptions()
    parts = ["vpr-edge", "build-engine", str(artifact_dir)]
    if tuple(o.batch_sizes) != (1,):
        parts += ["--batch", ",".join(map(str, o.batch_sizes))]
    if o.workspace_gb != EngineOptions.workspace_gb:
        parts += ["--workspace-gb", f"{o.workspace_gb:g}"]
    if o.opt_level != EngineOptions.opt_level:
        parts += ["--opt-level", str(o.opt_level)]
    if o.timing_cache:
        parts += ["--timing-cache", str(o.timing_cache)]
    if o.version_compatible:
        parts.append("--version-compatible")
    if o.exclude_lean_runtime:
        parts.append("--exclude-lean-runtime")
    if o.hardware_compatible:
        parts.append("--hardware-compatible")
    return shlex.join(parts)


def missing_tensorrt_message(artifact_dir: str | Path, options: EngineOptions | None = None) -> str:
    return (
        "TensorRT is not importable here; engines are built on the machine that runs them (the Jetson or "
        "GPU machine, with JetPack's tensorrt or pip install 'vpr-edge[tensorrt]'): run there "
        f"`{engine_command(artifact_dir, options)}`"
    )


def trt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 0


def network_flags(trt: Any) -> int:
    """Strongly typed, and nothing else (see module docstring for 10.x vs 11.x)."""
    if trt_major(trt) >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise ArtifactError(
            f"TensorRT {trt.__version__} has no strongly typed networks (needs >= 10.0; JetPack 6 ships 10.3); "
            "upgrade TensorRT"
        )
    return 1 << int(flag)


def profile_shapes(shape: Sequence[int], batch_sizes: Sequence[int]) -> tuple[tuple[int, ...], ...] | None:
    """(min, opt, max) for a dynamic batch axis: min/max of the sizes, opt the middle one; None if static."""
    if shape[0] >= 0:
        return None
    rest = tuple(int(s) for s in shape[1:])
    if any(s < 0 for s in rest):
        raise ArtifactError(f"ONNX input has dynamic non-batch dims {tuple(shape)}; re-export with a fixed image size")
    sizes = sorted(set(int(b) for b in batch_sizes))
    opt = sizes[(len(sizes) - 1) // 2]
    return ((sizes[0], *rest), (opt, *rest), (sizes[-1], *rest))


def environment(device: int = 0) -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine."""
    trt = lazy_import("tensorrt")
    try:
        from vpr_edge.engines.tensorrt.environment import current_environment

        return current_environment(device)
    except MissingDependencyError:
        torch = lazy_import("torch")  # no cuda-python/pycuda: torch knows the GPU too
        if not torch.cuda.is_available():
            raise MissingDependencyError("no CUDA GPU visible; build engines on the Jetson/GPU machine") from None
        p = torch.cuda.get_device_properties(device)
        return {"trt_version": trt.__version__, "gpu_name": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ArtifactError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors[:3]) or 'unknown error'}")


def build_engine(
    artifact_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    options: EngineOptions = EngineOptions(),
    force: bool = False,
    device: int = 0,
    env: dict[str, Any] | None = None,
    trt: Any = None,
) -> Manifest:
    """Build the engine artifact for the ONNX artifact `artifact_dir` (default output: `<dir>-engine`).

    env/trt: the machine description and tensorrt module (default: detected/imported). Comparing the
    engine with ONNX Runtime is `doctor.engine_check.compare_engine` (it runs the runtime's backends)."""
    from vpr_edge.artifact import load_artifact

    options.check()
    artifact_dir = Path(artifact_dir)
    src = load_artifact(artifact_dir, kinds=("onnx",)).manifest
    onnx_name = src.file_for("onnx")
    onnx_path = artifact_dir / onnx_name
    output_dir = Path(output_dir) if output_dir else artifact_dir.with_name(artifact_dir.name + "-engine")
    if trt is None:
        try:
            trt = lazy_import("tensorrt")
        except MissingDependencyError:
            raise MissingDependencyError(missing_tensorrt_message(artifact_dir, options)) from None
    env = env if env is not None else environment(device)
    if output_dir.exists() and not force:
        raise ArtifactError(f"{output_dir} already exists; pass --force to overwrite it or choose another --output")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    _parse(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.opt_level

    inp = network.get_input(0)
    shapes = profile_shapes(tuple(inp.shape), options.batch_sizes)
    if shapes:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(profile)
    elif tuple(options.batch_sizes) not in ((1,), (int(inp.shape[0]),)):
        log.warning("ONNX has a static batch of %d; --batch %s is ignored", inp.shape[0], options.batch_sizes)

    cache_blob = b""
    if options.timing_cache and Path(options.timing_cache).is_file():
        cache_blob = Path(options.timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if options.exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise ArtifactError(
            f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above); "
            "try a larger --workspace-gb or a lower --opt-level"
        )
    if options.timing_cache:
        with atomic_file(options.timing_cache) as fh:
            fh.write(bytes(config.get_timing_cache().serialize()))

    onnx_sha = src.files[onnx_name].get("sha256")
    details = dict(src.details)
    details.update(
        {
            "trt_version": str(trt.__version__),
            "gpu_name": env.get("gpu_name"),
            "compute_capability": env.get("compute_capability"),
            "onnx_sha256": onnx_sha,
            "onnx_artifact": str(artifact_dir),
            "strongly_typed": True,
            "version_compatible": options.version_compatible,
            "lean_runtime_excluded": options.exclude_lean_runtime,
            "hardware_compatibility": "ampere_plus" if options.hardware_compatible else "none",
            "batch_sizes": sorted(set(options.batch_sizes)) if shapes else [int(inp.shape[0])],
            "profile": [list(s) for s in shapes] if shapes else None,
            "workspace_gb": options.workspace_gb,
            "builder_optimization_level": options.opt_level,
            "timing_cache": str(options.timing_cache) if options.timing_cache else None,
            "build_seconds": round(build_s, 1),
        }
    )
    versions = {**src.versions, **package_versions("tensorrt", "onnxruntime", "cuda-python", "pycuda"), "tensorrt": str(trt.__version__)}
    identity = {**src.identity, "engine": f"tensorrt {trt.__version__} sm_{env.get('compute_capability')}"}
    with atomic_dir(output_dir, force=force) as tmp:
        with atomic_file(tmp / ENGINE_NAME) as fh:
            fh.write(bytes(plan))
        files = {ENGINE_NAME: "engine"}
        for name, info in src.files.items():  # vocabulary / PCA travel with the engine for the runtime
            if info.get("role") in ("vocabulary", "pca"):
                (tmp / name).write_bytes((artifact_dir / name).read_bytes())
                files[name] = info["role"]
        manifest = write_artifact(tmp, "engine", files, src.space, identity, details, preset=src.preset,
                                  inputs=src.inputs, outputs=src.outputs, verification=dict(src.verification),
                                  versions=versions)
    return manifest
