"""CLI options defined once and shared by every subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpr_edge import presets
from vpr_edge.errors import ConfigError


def image_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '224x322' or '224,322' -> (H, W)."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        vals = [int(p) for p in parts if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must look like 224 or 224x322 (HxW), got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 8:
        raise argparse.ArgumentTypeError(f"image size must look like 224 or 224x322 (HxW), got {text!r}")
    return (vals[0], vals[1])


def int_list(text: str) -> tuple[int, ...]:
    """'1,4,8' -> (1, 4, 8): positive integers (batch sizes and the like)."""
    try:
        vals = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,8, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,8, got {text!r}")
    return vals


def add_model(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=required,
        metavar="PRESET",
        help="preset name (see `vpr-edge presets`; append @tiny for the toy-size configuration), or "
        "student:RUN_DIR for a student distilled with `vpr-edge distill train`",
    )
    g.add_argument(
        "--weights",
        default="auto",
        metavar="auto|random|random-outliers|PATH",
        help="auto: official checkpoint from the torch hub cache (downloaded if reachable); "
        "random: random init (offline); random-outliers: random init with the massive activations of trained "
        "ViTs planted (INT8 stress model, DINOv2 backbones); PATH: a local checkpoint in the official key layout",
    )
    g.add_argument("--image-size", type=image_size, default=None, metavar="HxW", help="fixed input size (default: preset's)")
    g.add_argument("--layer", type=int, default=None, help="override the facet block (0-based; AnyLoc presets)")
    g.add_argument("--facet", choices=presets.FACETS, default=None, help="override the facet (AnyLoc presets)")
    g.add_argument("--vocabulary", type=Path, default=None, metavar="FILE", help="VLAD vocabulary (.npz from `vpr-edge vocab fit` or AnyLoc c_centers.pt)")
    g.add_argument("--pca", type=Path, default=None, metavar="FILE", help="PCA-whitening file (.npz from `vpr-edge pca fit`)")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights / random vocabularies")


def add_output(p: argparse.ArgumentParser, *, required: bool = True, help: str = "output path") -> None:
    p.add_argument("--output", "-o", type=Path, required=required, metavar="PATH", help=help)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        type=Path,
        default=None,
        metavar="DIR",
        help="real images to verify on (a folder, or a dataset root with database/ and queries/); "
        "default: a deterministic synthetic set, recorded as such in the manifest",
    )


def resolve_preset(args: argparse.Namespace) -> presets.Preset:
    """The frozen preset named by --model with --image-size/--layer/--facet applied."""
    if not getattr(args, "model", None):
        raise ConfigError(f"--model is required; choose one of: {', '.join(presets.names())}")
    if str(args.model).startswith("student:"):  # a distilled student: student:RUN_DIR
        from vpr_edge.models.student import student_preset

        return student_preset(str(args.model).removeprefix("student:"))
    p = presets.get(args.model)
    return p.with_overrides(
        image_size=getattr(args, "image_size", None),
        layer=getattr(args, "layer", None),
        facet=getattr(args, "facet", None),
    )


def add_runtime(p: argparse.ArgumentParser, *, model: str | None = "required", batch: bool = True,
                title: str = "runtime") -> None:
    """The lean runtime's options (map build/add/query, bench, doctor): which artifact, which backend.

    model: 'required', 'optional' (a map knows the artifact it was built with) or None (no --model)."""
    from vpr_edge.runtime.backends import ORT_GRAPHS, SPIN, names

    g = p.add_argument_group(title)
    if model is not None:
        g.add_argument(
            "--model",
            type=Path,
            required=model == "required",
            metavar="ARTIFACT",
            help="artifact folder written by vpr-export or vpr-edge build-engine"
            + ("" if model == "required" else " (default: the one the map was built with)"),
        )
    if batch:
        g.add_argument("--batch", type=int, default=None, metavar="N",
                       help="images per forward pass (default: what the artifact's estimated activations fit in "
                            "1.2 GB, at most 8; 1 for anyloc-dino's 3025 tokens)")
    g.add_argument("--backend", choices=names(), default=None,
                   help="auto (default): TensorRT for engines, ONNX Runtime otherwise; torch: the PyTorch reference")
    g.add_argument("--providers", default=None, metavar="EP[,EP]",
                   help="ONNX Runtime execution providers, e.g. cuda or tensorrt,cuda (default: CPU)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for ONNX Runtime / PyTorch / faiss")
    g.add_argument("--cuda-graph", action="store_true", help="TensorRT: replay the engine as a CUDA graph")
    g.add_argument("--ort-graph", choices=ORT_GRAPHS, default="auto",
                   help="ONNX Runtime: auto (default) runs the artifact's fused-attention graph (model.ort.onnx) "
                        "where it has one, except on the TensorRT EP; portable: the standard-ops model.onnx")
    g.add_argument("--ort-spin", choices=SPIN, default="on",
                   help="ONNX Runtime: its threads spin between ops (on, ORT's default) or sleep (off), which may leave "
                        "the preprocessing threads more of a small CPU (benchmarks/results/ort_spin)")
    g.add_argument("--preprocess", choices=("exact", "fast"), default=None,
                   help="exact (default for float-input artifacts): the reference's float resize; fast: JPEG draft "
                        "decoding + uint8 resize, for camera frames (fidelity: benchmarks/results/preprocess); "
                        "uint8-input artifacts take only fast")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads decoding/preprocessing ahead of the backend (default: half the cores, at most 4; "
                        "0: none)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the artifact's files (sizes are still checked; hashes are "
                        "remembered per file, so the check costs seconds only the first time)")


def providers(args: argparse.Namespace) -> tuple[str, ...] | None:
    text = getattr(args, "providers", None)
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else None


def describer_kwargs(args: argparse.Namespace) -> dict:
    """Describer.from_artifact keywords from the `add_runtime` options."""
    return {
        "backend": getattr(args, "backend", None) or "auto",
        "providers": providers(args),
        "threads": getattr(args, "threads", None),
        "cuda_graph": bool(getattr(args, "cuda_graph", False)),
        "ort_graph": getattr(args, "ort_graph", None) or "auto",
        "spin": getattr(args, "ort_spin", None) or "on",
        "verify": not getattr(args, "no_verify", False),
        "preprocess": getattr(args, "preprocess", None),
        "workers": getattr(args, "workers", None),
    }
