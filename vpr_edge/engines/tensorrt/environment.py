"""Is a serialized TensorRT engine usable here? Pure functions on the manifest + an environment dict.

A TensorRT engine is tied to the TensorRT version that built it and to the GPU's compute
capability (unless built version- or hardware-compatible). Loading a mismatched plan either fails
deep inside TensorRT with a cryptic message or, worse, works slowly; we refuse it up front and say
how to rebuild. Kept free of tensorrt so it is testable anywhere.
"""

from __future__ import annotations

from typing import Any

from vpr_edge.errors import ArtifactError


def normalize_cc(value: Any) -> str:
    """'8.7', (8, 7), [8, 7], 'sm_87', '87', 8.7 -> '8.7'."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if text.isdigit() and len(text) >= 2:
        return f"{int(text[:-1])}.{int(text[-1])}"
    return text


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def engine_mismatches(details: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """Reasons the engine described by `details` cannot run in `env` (empty: it can).

    `details` is the engine manifest's details (trt_version, compute_capability, gpu_name,
    optional version_compatible / hardware_compatibility); `env` has trt_version,
    compute_capability and gpu_name of the running TensorRT and GPU."""
    problems = []
    built_v, run_v = str(details.get("trt_version", "")), str(env.get("trt_version", ""))
    if not built_v:
        problems.append("the engine manifest does not record trt_version")
    elif details.get("version_compatible"):
        b, r = _version_tuple(built_v), _version_tuple(run_v)
        if not r or b[:1] != r[:1] or r < b:
            problems.append(f"TensorRT: engine built version-compatible with {built_v}, running {run_v or 'unknown'}")
    elif _version_tuple(built_v) != _version_tuple(run_v):
        problems.append(f"TensorRT: engine built with {built_v}, running {run_v or 'unknown'}")
    built_cc = normalize_cc(details.get("compute_capability"))
    run_cc = normalize_cc(env.get("compute_capability"))
    hw = str(details.get("hardware_compatibility", "none")).lower()
    if not built_cc:
        problems.append("the engine manifest does not record compute_capability")
    elif hw in ("ampere_plus", "ampere+"):
        if not run_cc or _version_tuple(run_cc) < (8, 0):
            problems.append(f"GPU: engine built for Ampere or newer, running compute capability {run_cc or 'unknown'}")
    elif built_cc != run_cc:
        problems.append(
            f"GPU: engine built for compute capability {built_cc} ({details.get('gpu_name', '?')}), "
            f"running {run_cc or 'unknown'} ({env.get('gpu_name', '?')})"
        )
    return problems


def check_engine_compatible(details: dict[str, Any], env: dict[str, Any], artifact: str) -> None:
    problems = engine_mismatches(details, env)
    if problems:
        source = details.get("onnx_artifact") or "the ONNX artifact it was built from"
        raise ArtifactError(
            f"{artifact}: engine cannot run here: {'; '.join(problems)}; rebuild it on this machine with "
            f"`vpr-edge build-engine {source}`"
        )


def current_environment(device: int = 0) -> dict[str, Any]:
    """trt_version / compute_capability / gpu_name of this machine (imports tensorrt and CUDA)."""
    from vpr_edge.lazy import lazy_import
    from vpr_edge.engines.tensorrt.cuda_api import open_cuda

    trt = lazy_import("tensorrt")
    cuda = open_cuda()
    name, cc = cuda.device_info(device)
    return {"trt_version": trt.__version__, "compute_capability": cc, "gpu_name": name}
