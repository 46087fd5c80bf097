"""The export job: preset -> verified ONNX artifact folder with its manifest.

Steps (each named for what it makes): the torch half (export.torch_side: verify set, reference model,
vocabulary/PCA given or fitted, reference outputs, FP32 ONNX; in a worker process for full-size
models) -> graph checks -> ONNX Runtime vs PyTorch -> optional FP16/INT8 graph -> manifest.
Everything is written in a temporary folder that replaces the output only when verification passed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vpr_edge import fidelity
from vpr_edge.atomic import atomic_dir
from vpr_edge.errors import ArtifactError, ConfigError, FidelityError
from vpr_edge.export import graph
from vpr_edge.export.steps import Steps
from vpr_edge.manifest import Manifest, package_versions, sha256_file
from vpr_edge.presets import Preset

log = logging.getLogger(__name__)

# top-5 identical up to swaps of images the reference scores within fidelity.TIE_EPS (numerical ties)
FP32_TOLERANCE = {"rel_err": 1e-4, "top5_agreement_ties": 1.0}
PRECISIONS = ("fp32", "fp16", "int8")
SCOPES = ("backbone", "descriptor")


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    scope: str = "descriptor"
    batch: int | None = None  # None: dynamic batch axis
    opset: int = 18
    verify: Path | None = None
    verify_limit: int = 64
    accept_fidelity: bool = False
    calibration: Path | None = None
    calibration_method: str = "max"
    calibration_limit: int = 512  # images taken from `calibration`, evenly spaced
    target_agreement: float | None = None
    io_dtype: str = "float32"
    engine: bool = False
    progress: bool = True
    torch_worker: str = "auto"  # on | off | auto (on for full-size presets, off for tiny test configs)

    def uses_worker(self, preset: Preset) -> bool:
        return self.torch_worker == "on" or (self.torch_worker == "auto" and not preset.tiny_of)

    def check(self, preset: Preset) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope must be one of {SCOPES}, got {self.scope!r}")
        if self.opset < 17:
            raise ConfigError(f"--opset must be >= 17 (LayerNormalization as one node), got {self.opset}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be a positive number or 'dynamic', got {self.batch}")
        if self.torch_worker not in ("auto", "on", "off"):
            raise ConfigError(f"--torch-worker must be auto, on or off, got {self.torch_worker!r}")
        if self.calibration_limit < 1:
            raise ConfigError(f"--calibration-limit must be >= 1, got {self.calibration_limit}")
        if self.verify_limit < 4:
            raise ConfigError(f"--verify-limit must be >= 4, got {self.verify_limit}")


def _ort_session(path: Path):
    from vpr_edge.engines.ortrun import cpu_session

    # verification runs a few images: peak ~1x the weights instead of ~2x
    return cpu_session(path, prepack=False)


def run_onnx(path: Path, images: np.ndarray, batch: int | None) -> np.ndarray:
    """The artifact's outputs on `images` (fixed-batch graphs are padded by engines.ortrun)."""
    from vpr_edge.engines.ortrun import run_onnx as run

    return run(_ort_session(path), images, batch_size=batch or 8)


def _check_fp32(report: dict) -> list[str]:
    fails = []
    if report["rel_err"] > FP32_TOLERANCE["rel_err"]:
        fails.append(f"rel_err {report['rel_err']:.2e} > {FP32_TOLERANCE['rel_err']:.0e}")
    if report["top5_agreement_ties"] < FP32_TOLERANCE["top5_agreement_ties"]:
        fails.append(
            f"top-5 agreement {report['top5_agreement_ties']:.3f} < 1.0 (swaps of images the reference scores within "
            f"{fidelity.TIE_EPS:.0e} counted as ties; score error {report['score_err_max']:.1e})"
        )
    if report["nonfinite"]:
        fails.append(f"{report['nonfinite']} non-finite outputs")
    return fails


def _graph_report(preset: Preset, onnx_path: Path) -> dict:
    """What the graph computes; refuses a graph that computes more than the facet needs."""
    model = graph.load_structure(onnx_path)
    blocks = graph.blocks_in_graph(model)
    ops = graph.op_counts(model)
    rep = {
        "blocks": sorted(blocks),
        "ops": dict(sorted(ops.items())),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }
    if "Resize" in ops or "Upsample" in ops:
        raise ArtifactError(f"{onnx_path}: graph contains a Resize; the position embedding must be precomputed")
    if preset.facet is not None:
        L = preset.facet.layer
        facet = graph.facet_ops(model)
        rep["facet_block"] = L
        rep["facet_block_ops"] = dict(facet)
        if rep["blocks"] != list(range(L)):
            raise ArtifactError(f"{onnx_path}: graph computes full blocks {rep['blocks']}, expected exactly 0..{L - 1}")
        if preset.facet.facet != "token" and (facet.get("Softmax") or facet.get("MatMul", 0) != 1):
            raise ArtifactError(
                f"{onnx_path}: block {L} should contribute norm1 + one {preset.facet.facet} projection, got {dict(facet)}"
            )
    return rep


def export_artifact(
    preset: Preset,
    output: Path,
    *,
    weights: str = "random",
    vocabulary=None,
    pca=None,
    options: ExportOptions = ExportOptions(),
    force: bool = False,
    seed: int = 0,
) -> Manifest:
    """Export, verify and write the artifact folder `output`; return its manifest."""
    from vpr_edge.export import torch_side as T
    from vpr_edge.export.onnx_from_torch import onnx_files

    options.check(preset)
    output = Path(output)
    if output.exists() and not force:
        raise ArtifactError(f"{output} already exists; pass --force to overwrite it or choose another --output")
    steps = Steps(options.progress)
    hashes: dict[str, str | None] = {"weights": _weights_hash(weights), "vocabulary": None, "pca": None}
    in_worker = options.uses_worker(preset)

    with atomic_dir(output, force=force) as tmp:
        # a lowered artifact holds only its FP16/INT8 graph as model.onnx; FP32 is an intermediate
        onnx_path = tmp / ("model.onnx" if options.precision == "fp32" else "model.fp32.onnx")
        run_torch = T.torch_side_in_worker if in_worker else T.torch_side
        side = run_torch(preset, weights, vocabulary, pca, options, seed, onnx_path)
        steps.merge(side.times, side.peak_rss_gib)
        vs, vocab_obj, pca_obj = side.verify, side.vocabulary, side.pca
        ref_out, ref_desc = side.reference, side.reference_desc
        aggregator = None  # rebuilt (torch imported) only when backbone-scope outputs need it, after ORT ran
        graph_rep = _graph_report(preset, onnx_path)
        ort_out = steps.run("verifying with ONNX Runtime", run_onnx, onnx_path, vs.images, options.batch)
        if options.scope == "backbone":
            aggregator = T.head_from_state(preset, side, seed, weights)
            ort_desc = T.descriptors_from_features(aggregator, ort_out)
        else:
            ort_desc = ort_out
        report = fidelity.compare_descriptors(ref_desc, ort_desc, vs.db_idx, vs.q_idx, vs.positives)
        if options.scope == "backbone":
            raw = fidelity.compare_descriptors(ref_out.reshape(len(ref_out), -1), ort_out.reshape(len(ort_out), -1),
                                               vs.db_idx, vs.q_idx)
            report["features_rel_err"] = raw["rel_err"]
            report["rel_err"] = max(report["rel_err"], raw["rel_err"])
        fails = _check_fp32(report)
        verification = {
            "set": vs.describe(),
            "reference": "PyTorch FP32 eager",
            "fp32": {"report": report, "tolerance": FP32_TOLERANCE, "passed": not fails},
        }
        if fails and not options.accept_fidelity:
            raise FidelityError(f"FP32 ONNX does not match PyTorch on {vs.source}: {'; '.join(fails)}; nothing was written")

        precision_details: dict = {}
        if options.precision != "fp32":
            from vpr_edge.export import precision as P

            precision_details = steps.run(
                f"lowering to {options.precision} + verifying", P.lower_precision, preset, aggregator, onnx_path, vs,
                ref_desc, options, tmp / "model.onnx",
            )
            verification[options.precision] = precision_details.pop("verification")
            P.remove_graph(onnx_path)

        files_role = {}
        for name in onnx_files(tmp / "model.onnx"):
            files_role[name] = "onnx" if name == "model.onnx" else "onnx-data"
        extra = [p.name for p in tmp.iterdir() if p.name not in files_role and not p.name.startswith(".")]
        if vocab_obj is not None:
            vocab_obj.save(tmp / "vocabulary.npz")
            files_role["vocabulary.npz"] = "vocabulary"
            hashes["vocabulary"] = vocab_obj.fingerprint  # content, not the file (which holds a timestamp)
        if pca_obj is not None:
            pca_obj.save(tmp / "pca.npz")
            files_role["pca.npz"] = "pca"
            hashes["pca"] = pca_obj.fingerprint
        for name in extra:
            files_role.setdefault(name, "precision-report" if name.endswith(".json") else "onnx-extra")

        import onnx

        g = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
        manifest = Manifest(
            kind="onnx",
            preset=preset.to_dict(),
            space=preset.space(),
            inputs=[_io(v) for v in g.graph.input],
            outputs=[_io(v) for v in g.graph.output],
            hashes=hashes,
            versions=package_versions("torch", "timm", "onnx", "onnxruntime", "onnxscript", "onnxconverter-common", "faiss-cpu"),
            verification=verification,
            details={
                "scope": options.scope,
                "precision": options.precision,
                "io_dtype": options.io_dtype if options.precision == "fp16" else "float32",
                "batch": options.batch or "dynamic",
                "opset": graph_rep["opset"],
                "image_size": list(preset.preprocess.image_size),
                "preprocess": asdict(preset.preprocess),
                "descriptor_dim": preset.descriptor_dim,
                "weights": weights if weights in ("random", "auto") else str(Path(weights).name),
                "vocabulary_source": vocab_obj.meta.get("source") if vocab_obj is not None else None,
                "pca_source": pca_obj.meta.get("source") if pca_obj is not None else None,
                "graph": graph_rep,
                "torch_worker": in_worker,
                "timings_s": steps.times,
                "peak_rss_gib": steps.peak_rss_gib,
                **precision_details,
            },
        )
        for name, role in files_role.items():
            if (tmp / name).exists():
                manifest.add_file(tmp, name, role)
        manifest.save(tmp)
    return manifest


def _io(v) -> dict:
    import onnx

    dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}



def _weights_hash(weights: str) -> str | None:
    if weights in ("random", "auto"):
        return weights
    p = Path(weights)
    return sha256_file(p) if p.is_file() else None
