"""What a benchmark compares: named variants, each an exported artifact (any backend/precision) or
the PyTorch reference rebuilt from an artifact's manifest. All are opened into objects with the
runtime Describer's interface, so the measuring code has one path."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpr_edge.errors import ConfigError

PYTORCH_FP32 = "pytorch-fp32"
PYTORCH_FP16 = "pytorch-fp16"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    path: Path  # the artifact (PyTorch variants: the artifact whose manifest they are built from)
    pytorch: bool = False
    fp16: bool = False
    options: dict[str, Any] = field(default_factory=dict, compare=False)


def parse_variant(text: str) -> tuple[str, Path]:
    """'NAME=ARTIFACT_DIR' -> (name, path). A bare path is named after its folder."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    name = name.strip().partition("@")[0]
    if not _NAME.match(name):
        raise ConfigError(
            f"variant name {name!r} must start with a letter or digit and use only letters, digits, '.', '_', '+', '-' "
            "(it names files); write --variant NAME=ARTIFACT_DIR"
        )
    if not path:
        raise ConfigError(f"--variant {text!r} has no artifact folder; write --variant NAME=ARTIFACT_DIR")
    return name, Path(path)


def variant_options(text: str) -> dict[str, Any]:
    """Per-variant runtime choice written after the name: NAME@trt=DIR, NAME@ort=DIR, NAME@portable=DIR
    (ONNX Runtime on the standard-ops graph, not the artifact's fused-attention one), or ONNX Runtime
    execution providers NAME@cuda=DIR / NAME@tensorrt,cuda=DIR (so CPU and CUDA runs, or both graphs, of
    one artifact sit side by side)."""
    name, sep, _ = text.partition("=")
    if not sep or "@" not in name:
        return {}
    choice = name.partition("@")[2].strip()
    if not choice:
        raise ConfigError(f"--variant {text!r}: nothing after '@'; write NAME@cuda=DIR, NAME@trt=DIR or NAME@ort=DIR")
    if choice in ("ort", "trt"):
        return {"backend": choice}
    if choice == "portable":
        return {"backend": "ort", "ort_graph": "portable"}
    return {"backend": "ort", "providers": [p.strip() for p in choice.split(",") if p.strip()]}


def plan_variants(
    variants: list[str],
    pytorch: str | None,
    fp16: str = "auto",
    cuda: bool = False,
) -> list[VariantSpec]:
    """The ordered variant list: PyTorch FP32 first (every other variant is compared with it),
    then PyTorch FP16 (with CUDA, unless fp16='off'), then the artifacts in the order given.

    `pytorch`: None (no reference), '' (built from the first variant's artifact), a variant name, or
    an artifact folder."""
    specs = [VariantSpec(n, p, options=variant_options(v)) for v, (n, p) in zip(variants, map(parse_variant, variants))]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"variant names must be unique; repeated: {', '.join(dupes)}")
    if pytorch is None:
        if not specs:
            raise ConfigError("nothing to benchmark: pass --variant NAME=ARTIFACT_DIR (repeatable) and/or --pytorch")
        return specs
    reserved = {PYTORCH_FP32, PYTORCH_FP16} & set(names)
    if reserved:
        raise ConfigError(f"variant names {sorted(reserved)} are reserved for the PyTorch reference; rename them")
    if pytorch == "":
        if not specs:
            raise ConfigError("--pytorch without a value builds the reference from the first --variant; pass one, or --pytorch ARTIFACT_DIR")
        source = specs[0].path
    elif pytorch in names:
        source = specs[names.index(pytorch)].path
    else:
        source = Path(pytorch)
        if not (source / "manifest.json").exists():
            raise ConfigError(
                f"--pytorch {pytorch!r} is neither a variant name ({', '.join(names) or 'none given'}) nor an artifact "
                "folder with a manifest.json"
            )
    if fp16 not in ("auto", "on", "off"):
        raise ConfigError(f"--pytorch-fp16 must be auto, on or off, got {fp16!r}")
    if fp16 == "on" and not cuda:
        raise ConfigError("--pytorch-fp16 on needs a CUDA GPU (PyTorch FP16 on the CPU is not a meaningful baseline)")
    ref = [VariantSpec(PYTORCH_FP32, source, pytorch=True)]
    if fp16 == "on" or (fp16 == "auto" and cuda):
        ref.append(VariantSpec(PYTORCH_FP16, source, pytorch=True, fp16=True))
    return ref + specs


class OpenedVariant:
    """A describer (runtime or PyTorch) plus what the report says about it."""

    def __init__(self, spec: VariantSpec, describer: Any, info: dict[str, Any]):
        self.spec = spec
        self.describer = describer
        self.info = info

    @property
    def name(self) -> str:
        return self.spec.name

    def gpu_peak_mb(self) -> float | None:
        fn = getattr(getattr(self.describer, "backend", None), "gpu_peak_mb", None)
        return fn() if fn else None

    def close(self) -> None:
        if self.describer is not None:
            self.describer.close()
            self.describer = None


def open_variant(
    spec: VariantSpec,
    *,
    backend: str = "auto",
    providers: list[str] | None = None,
    threads: int | None = None,
    weights: str | None = None,
    device: str = "cpu",
    preprocess: str | None = None,
    workers: int | None = None,
    ort_graph: str = "auto",
    spin: str = "on",
) -> OpenedVariant:
    """A Describer for the variant: the artifact on its backend, or (PyTorch variants) the reference rebuilt
    from the artifact's manifest as the runtime's 'torch' backend, fed the same preprocessing."""
    from vpr_edge.runtime.backends import BackendOptions
    from vpr_edge.runtime.describer import Describer

    if spec.pytorch:
        opts = BackendOptions(weights=weights, device=device, fp16=spec.fp16, threads=threads)
        d = Describer.from_artifact(spec.path, backend="torch", options=opts, preprocess=preprocess, workers=workers)
        return OpenedVariant(spec, d, {**d.backend.describe(), "dim": d.dim, "preprocess": d.preprocess_mode})
    backend = spec.options.get("backend", backend)
    providers = spec.options.get("providers", providers)
    d = Describer.from_artifact(spec.path, backend=backend, providers=providers, threads=threads,
                                preprocess=preprocess, workers=workers,
                                ort_graph=spec.options.get("ort_graph", ort_graph), spin=spin)
    art = d.artifact
    be = d.backend.describe() if hasattr(d.backend, "describe") else {}
    info = {
        "backend": be.get("backend", backend),
        "providers": be.get("providers"),
        "graph": be.get("graph"),
        "kind": art.kind,
        "precision": art.precision,
        "scope": art.scope,
        "io_dtype": art.io_dtype,
        "input_layout": art.input_layout,
        "preprocess": d.preprocess_mode,
        "batch": art.manifest.details.get("batch"),
        "preset": art.preset.name,
        "dim": d.dim,
        "artifact": str(art.folder),
    }
    return OpenedVariant(spec, d, {k: v for k, v in info.items() if v is not None})
