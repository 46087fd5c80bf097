"""The export job: preset -> verified ONNX artifact folder with its manifest.

Steps (each named for what it makes): the torch half (export.torch_side: verify set, reference model,
vocabulary/PCA given or fitted, reference outputs, FP32 ONNX; in a worker process for full-size
models) -> graph checks -> the artifact run by the lean runtime's own Describer (the path users run on
the robot: manifest, files, backend, batching, numpy aggregation) vs PyTorch -> optional FP16/INT8
graph (`engines.precision.lower`), verified the same way -> for float graphs, ONNX Runtime's own copy
with fused attention (`engines.ort_graph`, checked equal to the portable one) -> manifest
(`manifest.write_artifact`). Everything is written in a temporary folder that replaces the output only when verification passed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge import fidelity, presets
from vpr_edge.atomic import atomic_dir
from vpr_edge.engines import graph
from vpr_edge.engines.precision import table
from vpr_edge.errors import ArtifactError, ConfigError, FidelityError
from vpr_edge.export.steps import Steps
from vpr_edge.manifest import Manifest, package_versions, write_artifact
from vpr_edge.presets import Preset
from vpr_edge.space import DescriptorSpace, Identity

log = logging.getLogger(__name__)

SCOPES = ("backbone", "descriptor")
VERIFY_BATCH = 8  # images per verification run (ViT-G activations of 64 images at once would not fit)
_VERSIONS = ("torch", "timm", "onnx", "onnxruntime", "onnxscript", "onnxconverter-common", "faiss-cpu")


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
    int8_outliers: str = "auto"  # auto: split outlier channels + SmoothQuant where calibration finds them; off
    smooth_alpha: float = 0.5
    io_dtype: str = "float32"
    input: str = "float"  # 'float': normalised float [B, 3, H, W]; 'uint8': camera pixels [B, H, W, 3]
    engine: bool = False
    progress: bool = True
    torch_worker: str = "auto"  # on | off | auto (on for full-size presets, off for tiny test configs)

    def uses_worker(self, preset: Preset) -> bool:
        return self.torch_worker == "on" or (self.torch_worker == "auto" and not preset.tiny_of)

    def check(self, preset: Preset) -> None:
        record = table.get(self.precision)
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "backbone" and not presets.head(preset).runtime:
            raise ConfigError(
                f"--scope backbone: the {preset.aggregator.kind} head of {preset.name} runs only inside the graph (the "
                "runtime aggregates VLAD/GeM in numpy, not this head); export it with --scope descriptor"
            )
        if self.input not in ("float", "uint8"):
            raise ConfigError(f"--input must be float or uint8, got {self.input!r}")
        if self.opset < 17:
            raise ConfigError(f"--opset must be >= 17 (LayerNormalization as one node), got {self.opset}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be a positive number or 'dynamic', got {self.batch}")
        if self.torch_worker not in ("auto", "on", "off"):
            raise ConfigError(f"--torch-worker must be auto, on or off, got {self.torch_worker!r}")
        if self.calibration_limit < 1:
            raise ConfigError(f"--calibration-limit must be >= 1, got {self.calibration_limit}")
        if self.int8_outliers not in ("auto", "off"):
            raise ConfigError(f"--int8-outliers must be auto or off, got {self.int8_outliers!r}")
        if self.verify_limit < 4:
            raise ConfigError(f"--verify-limit must be >= 4, got {self.verify_limit}")
        if self.io_dtype not in record.io_dtypes:
            raise ConfigError(f"--io-dtype {self.io_dtype} does not apply to {self.precision} (it takes {', '.join(record.io_dtypes)})")
        # options that would do nothing for this precision are refused, not silently ignored
        given = {
            "calibration": self.calibration is not None,
            "calibration_method": self.calibration_method != "max",
            "calibration_limit": self.calibration_limit != 512,
            "target_agreement": self.target_agreement is not None,
            "int8_outliers": self.int8_outliers != "auto",
            "smooth_alpha": self.smooth_alpha != 0.5,
            "io_dtype": self.io_dtype != "float32",
        }
        idle = sorted(k for k, on in given.items() if on and k not in record.options)
        if idle:
            opts = ", ".join("--" + k.replace("_", "-") for k in idle)
            users = sorted(n for n, p in table.PRECISIONS.items() if set(idle) <= p.options)
            raise ConfigError(f"{opts} do(es) nothing with --precision {self.precision}"
                              + (f"; it applies to --precision {', '.join(users)}" if users else ""))
        _outlier_options(self)  # --smooth-alpha checked here, before any model is built


def _graph_report(preset: Preset, onnx_path: Path) -> dict:
    """What the graph computes; refuses a graph that computes more than the facet needs."""
    model = graph.load(onnx_path, load_weights=False)
    blocks = graph.blocks_in_graph(model)
    ops = graph.op_counts(model)
    rep: dict[str, Any] = {
        "blocks": sorted(blocks),
        "ops": dict(sorted(ops.items())),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }
    # A Resize of a constant is a position table resampled at run time (it must be precomputed for the fixed
    # size); a Resize of activations is a computation (a student's token alignment to its teacher's grid).
    index = graph.GraphIndex.of(model)
    constant = [n.name for n in index.nodes.values() if n.op_type in ("Resize", "Upsample") and index.is_constant(n.input[0])]
    if constant:
        raise ArtifactError(f"{onnx_path}: graph resizes a constant ({constant[0]}); the position embedding must be "
                            "precomputed for the fixed input size")
    if preset.facet is not None and preset.method != "student":  # a student computes all its blocks + projection
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


def _io(v) -> dict:
    import onnx

    dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}


def _onnx_files(path: Path) -> dict[str, str]:
    """The model file and its external-data files, by name -> manifest role."""
    from vpr_edge.export.onnx_from_torch import onnx_files

    return {name: "onnx" if name == path.name else "onnx-data" for name in onnx_files(path)}


class _Writer:
    """Writes the artifact's manifest (provisional ones too, so the runtime can open the folder)."""

    def __init__(self, tmp: Path, preset: Preset, side, options: ExportOptions, weights: str, seed: int):
        self.tmp, self.preset, self.options = tmp, preset, options
        self.files: dict[str, str] = {}  # artifact files beside the graph, name -> manifest role
        if side.vocabulary is not None:
            side.vocabulary.save(tmp / "vocabulary.npz")
            self.files["vocabulary.npz"] = "vocabulary"
        if side.pca is not None:
            side.pca.save(tmp / "pca.npz")
            self.files["pca.npz"] = "pca"
        self.space = DescriptorSpace.from_dict(side.space)  # a student declares its teacher's
        self.weights_id = side.weights_id
        self.weights_label = weights if weights in ("random", "random-outliers", "auto") else Path(weights).name
        self.weights_path = weights
        self.seed = seed
        self.side = side

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def io_dtype(self) -> str:
        return self.options.io_dtype if self.options.precision == "fp16" else "float32"

    def write(self, onnx_path: Path, precision: str, details: dict, verification: dict, *, final: bool) -> Manifest:
        import onnx

        g = onnx.load(str(onnx_path), load_external_data=False)
        o = self.options
        files = {**_onnx_files(onnx_path), **self.files}
        if final:  # anything else the lowering left in the folder travels with the artifact, recorded
            for p in self.tmp.iterdir():
                if p.is_file() and p.name not in files and p.name != "manifest.json" and not p.name.startswith("."):
                    files[p.name] = "precision-report" if p.suffix == ".json" else "onnx-extra"
        identity = Identity.of(self.preset, self.weights_id, precision=precision, scope=o.scope)
        return write_artifact(
            self.tmp, "onnx", files, self.space.to_dict(), identity.to_dict(),
            {
                "scope": o.scope,
                "precision": precision,
                "io_dtype": self.io_dtype if precision == "fp16" else "float32",
                "batch": o.batch or "dynamic",
                "image_size": list(self.preset.preprocess.image_size),
                "preprocess": asdict(self.preset.preprocess),
                "descriptor_dim": self.preset.descriptor_dim,
                "weights": self.weights_label,
                "seed": self.seed,
                **({"student_run": str(Path(self.weights_path).resolve())} if self.preset.method == "student" else {}),
                "vocabulary_source": self.side.vocabulary.meta.get("source") if self.side.vocabulary is not None else None,
                "pca_source": self.side.pca.meta.get("source") if self.side.pca is not None else None,
                **details,
            },
            preset=self.preset.to_dict(),
            inputs=[_io(v) for v in g.graph.input],
            outputs=[_io(v) for v in g.graph.output],
            verification=verification,
            versions=package_versions(*_VERSIONS),
            hashes=final,
        )


def _runtime_outputs(tmp: Path, images: np.ndarray, raw: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(descriptors, raw backend outputs or None) of the artifact in `tmp`, through the runtime's Describer."""
    from vpr_edge.runtime.backends import BackendOptions
    from vpr_edge.runtime.describer import Describer

    # verification runs a few images: no weight prepacking, ~1x the weights resident instead of ~2x
    with Describer.from_artifact(tmp, verify=False, options=BackendOptions(prepack=False)) as d:
        out = d.run_backend(images, batch=VERIFY_BATCH)
        return d.aggregate(out), (out if raw else None)


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

    options.check(preset)
    output = Path(output)
    if output.exists() and not force:
        raise ArtifactError(f"{output} already exists; pass --force to overwrite it or choose another --output")
    steps = Steps(options.progress)
    in_worker = options.uses_worker(preset)
    record = table.get(options.precision)
    fp32 = table.get("fp32")

    # the fallback search's scores, beside the output so an interrupted export resumes its search (the
    # manifest keeps them once the artifact is written; then the journal goes)
    journal = search_journal(output)
    with atomic_dir(output, force=force) as tmp:
        # a lowered artifact holds only its FP16/INT8 graph as model.onnx; FP32 is an intermediate
        onnx_path = tmp / ("model.onnx" if record.lowering is None else "model.fp32.onnx")
        run_torch = T.torch_side_in_worker if in_worker else T.torch_side
        side = run_torch(preset, weights, vocabulary, pca, options, seed, onnx_path)
        steps.merge(side.times, side.peak_rss_gib)
        vs, ref_out, ref_desc = side.verify, side.reference, side.reference_desc
        graph_rep = _graph_report(preset, onnx_path)  # on the exporter's graph, whose nodes carry module scopes
        graph_rep["rewrites"] = steps.run("exact rewrites for ONNX Runtime", _rewrite, onnx_path)
        writer = _Writer(tmp, preset, side, options, weights, seed)
        writer.write(onnx_path, "fp32", {"graph": graph_rep}, {}, final=False)
        backbone = options.scope == "backbone"
        scan = None
        if options.precision == "fp16":
            # the FP32 graph is an intermediate here (the artifact ships the FP16 graph, verified through the
            # runtime below): one run both verifies it and scans it for FP16 overflow (one network pass less)
            ort_desc, ort_raw, scan = steps.run("verifying with ONNX Runtime + FP16 overflow scan", _verify_with_scan,
                                                preset, tmp, onnx_path, vs.images, side)
        else:
            ort_desc, ort_raw = steps.run("verifying with the runtime (ONNX Runtime)", _runtime_outputs, tmp, vs.images,
                                          backbone)
        report = fidelity.compare_descriptors(ref_desc, ort_desc, vs.db_idx, vs.q_idx, vs.positives)
        if backbone:
            raw = fidelity.compare_descriptors(ref_out.reshape(len(ref_out), -1), ort_raw.reshape(len(ort_raw), -1),
                                               vs.db_idx, vs.q_idx)
            report["features_rel_err"] = raw["rel_err"]
            report["rel_err"] = max(report["rel_err"], raw["rel_err"])
        report["rel_err_ties"] = report["rel_err"]
        if side.reference_ties is not None:
            from vpr_edge.export.ties import tie_rel_err

            report.update(tie_rel_err(side.reference_ties, _aggregation(preset, tmp, side), ort_desc,
                                      float(np.abs(ref_desc).max())))
            report["rel_err_ties"] = max(report["rel_err_ties"], report.get("features_rel_err", 0.0))
        fails = fp32.gate(report)
        verification: dict[str, Any] = {
            "set": vs.describe(),
            "reference": "PyTorch FP32 eager",
            "run_by": "the runtime's Describer (ONNX Runtime, CPU)" if scan is None else
            "ONNX Runtime (CPU), the FP32 graph as written, in the FP16 overflow scan's run",
            "fp32": {"report": report, "tolerance": fp32.threshold_record(), "passed": not fails},
        }
        if fails and not options.accept_fidelity:
            raise FidelityError(f"FP32 ONNX does not match PyTorch on {vs.source}: {'; '.join(fails)}; nothing was written")

        details: dict[str, Any] = {"graph": graph_rep, "torch_worker": in_worker}
        final_onnx = onnx_path
        if record.lowering is not None:
            lowered = steps.run(f"lowering to {options.precision} + verifying", _lower, preset, tmp, onnx_path, side,
                                options, writer, graph_rep, scan, journal)
            verification[options.precision] = {**lowered.verification, "reference": "PyTorch FP32 eager"}
            details.update(lowered.details)
            _remove_graph(onnx_path)
            final_onnx = tmp / "model.onnx"
        if options.input == "uint8":
            verification["uint8_input"] = steps.run("uint8 input (normalised in the graph) + verifying", _uint8_input,
                                                    preset, tmp, final_onnx, vs.images, writer, graph_rep)
            details["input_layout"] = "uint8"
        details["tensorrt_check"] = steps.run("TensorRT compatibility (offline)", _tensorrt_check, final_onnx, options)
        if options.precision in ORT_GRAPH_PRECISIONS:  # engines.ort_graph: the CPU kernels have no FP16 form
            details["ort_graph"] = steps.run("ONNX Runtime graph (fused attention) + checking", _ort_graph, preset,
                                             final_onnx, vs, ref_desc, options.input, writer, details)
        details.update({"timings_s": steps.times, "peak_rss_gib": steps.peak_rss_gib})
        manifest = writer.write(final_onnx, options.precision, details, verification, final=True)
    journal.unlink(missing_ok=True)
    return manifest


def search_journal(output: Path) -> Path:
    """Where the export into `output` journals its fallback search (`fallback.SearchJournal`)."""
    return output.parent / f".{output.name}.fallback.jsonl"


def _outlier_options(options: ExportOptions):
    from vpr_edge.engines.precision.smoothing import OFF, OutlierOptions

    return OFF if options.int8_outliers == "off" else OutlierOptions(alpha=options.smooth_alpha)


def _verify_with_scan(preset: Preset, tmp: Path, onnx_path: Path, images: np.ndarray, side):
    """(descriptors, raw outputs, `fp16.OverflowScan`) of the FP32 graph on the verify images, from the FP16
    overflow scan's run; backbone features are aggregated as the runtime does (`runtime.aggregate`)."""
    from vpr_edge.engines.precision.fp16 import scan_with_outputs

    scan = scan_with_outputs(onnx_path, images)
    raw = scan.outputs
    if raw.ndim == 3:  # backbone scope: per-patch features
        return np.ascontiguousarray(_aggregation(preset, tmp, side)(raw), np.float32), raw, scan
    return raw, raw, scan


def _aggregation(preset: Preset, tmp: Path, side):
    """The runtime's numpy aggregation of backbone features, with the artifact's vocabulary/PCA files."""
    from vpr_edge.runtime.aggregate import Aggregation

    return Aggregation.for_preset(preset, tmp / "vocabulary.npz" if side.vocabulary is not None else None,
                                  tmp / "pca.npz" if side.pca is not None else None)


def _lower(preset: Preset, tmp: Path, fp32_path: Path, side, options: ExportOptions, writer: _Writer, graph_rep: dict,
           scan=None, journal: Path | None = None):
    """The FP16/INT8 graph of `fp32_path` as tmp/model.onnx, verified against PyTorch FP32 through the
    runtime (`run_final`), with a provisional manifest naming it so the runtime can open the folder."""
    from vpr_edge.engines.precision import calibration as C
    from vpr_edge.engines.precision.lower import lower_onnx

    vs = side.verify
    calib, calib_info, calib_source = None, {}, ""
    if options.calibration is not None:
        calib, calib_info = C.calibration_images(
            options.calibration, preset.preprocess, limit=options.calibration_limit, progress=options.progress
        )
        calib_source = str(options.calibration)
    # backbone scope: search candidates are judged on descriptors, aggregated as the runtime does
    to_desc = _aggregation(preset, tmp, side) if options.scope == "backbone" else None

    def run_final(path: Path) -> np.ndarray:
        writer.write(path, options.precision, {"graph": graph_rep}, {}, final=False)
        return _runtime_outputs(tmp, vs.images)[0]

    res = lower_onnx(
        fp32_path, tmp / "model.onnx", options.precision, vs,
        reference=side.reference_desc, to_descriptors=to_desc, run_final=run_final,
        calibration=calib, calibration_method=options.calibration_method, calibration_source=calib_source,
        io_dtype=options.io_dtype, target_agreement=options.target_agreement, accept_fidelity=options.accept_fidelity,
        outliers=_outlier_options(options) if options.precision == "int8" else None,
        # INT8's fallback goes on from blocks to single MatMuls (measured on the ViT-S stress model: 3.3% of the
        # MatMul FLOPs kept instead of whole blocks); FP16 keeps blocks (its islands are already node-level)
        refine_nodes=options.precision == "int8",
        prepared=scan, journal=journal,
    )
    if calib_info:
        res.details["calibration_set"] = calib_info
    return res


# relative: the same float32 ops as numpy's normalisation, in the same order (measured 0.0 on FP32, FP16 and
# INT8 graphs with float32 input). With float16 graph input the uint8 graph's float -> float16 Cast may be
# folded by ONNX Runtime into a following Cast back to float (the value is then not rounded to float16 where
# the float-input graph rounded it): measured 7.4e-4, so one float16 step (2^-10 ~ 9.8e-4) twice over.
UINT8_TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


def _pixels(images: np.ndarray, pre) -> np.ndarray:
    """Normalised float images [n, 3, H, W] back to the uint8 RGB pixels [n, H, W, 3] they came from."""
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    return np.clip(np.rint((images * std + mean) * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


ORT_GRAPH_PRECISIONS = ("fp32", "int8")
ORT_GRAPH_PROBE = 4  # verify images the fused graph is checked on (an exact rewrite: equality, not fidelity)


def _ort_graph(preset: Preset, onnx_path: Path, vs, ref_desc: np.ndarray, input_layout: str, writer: _Writer,
               details: dict) -> dict:
    """The ONNX-Runtime-only graph with fused attention (`engines.ort_graph`), listed in the manifest only
    when its check passes (otherwise removed, with a warning: the portable graph is verified and serves ONNX
    Runtime too). FP32: an exact rewrite, checked against the portable graph on the first verify images to
    the FP32 gate's relative error. INT8: the float rounding inside the fused kernel differs from the
    unfused ops' by ~1e-6, and the next QuantizeLinear turns that into one-step differences here and there
    (measured: 1e-6 after block 0, up to one quantum after), so the fused graph is another INT8 implementation
    of the same Q/DQ graph and is judged like the portable one: the INT8 gate against the PyTorch reference
    on the whole verify set, run through the runtime."""
    from vpr_edge.batching import run_batched
    from vpr_edge.engines.ort_graph import ORT_GRAPH_NAME, write_ort_graph
    from vpr_edge.onnxrt import fixed_batch, session

    rep = write_ort_graph(onnx_path)
    if not rep["attention"]:
        return rep
    fused = onnx_path.parent / ORT_GRAPH_NAME
    pre = preset.preprocess
    if writer.precision == "fp32":
        probe = vs.images[:ORT_GRAPH_PROBE]
        x = np.ascontiguousarray(_pixels(probe, pre) if input_layout == "uint8" else probe)

        def outputs(path: Path) -> np.ndarray:
            s = session(path, prepack=False)
            name = s.get_inputs()[0].name
            return run_batched(lambda b: s.run(None, {name: b})[0], x, batch=len(x), fixed=fixed_batch(s)).astype(np.float32)

        want, got = outputs(onnx_path), outputs(fused)
        err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12)) if np.isfinite(got).all() else float("inf")
        bound = next(t.bound for t in table.get("fp32").thresholds if t.metric == "rel_err_ties")
        rep["check"] = {"compared_with": f"model.onnx in ONNX Runtime on {len(x)} verify images", "rel_err": err,
                        "tolerance": bound, "passed": err <= bound}
        problem = None if err <= bound else f"differs from the portable graph (relative error {err:.2e} > {bound})"
        if problem is None:
            writer.files[ORT_GRAPH_NAME] = "onnx-ort"
    else:
        writer.files[ORT_GRAPH_NAME] = "onnx-ort"  # a provisional manifest lists it, so the runtime runs it
        writer.write(onnx_path, writer.precision, details, {}, final=False)
        images = np.ascontiguousarray(_pixels(vs.images, pre)) if input_layout == "uint8" else vs.images
        desc, _ = _runtime_outputs(writer.tmp, images)
        report = fidelity.compare_descriptors(ref_desc, desc, vs.db_idx, vs.q_idx, vs.positives)
        fails = table.get(writer.precision).gate(report)
        rep["check"] = {"compared_with": f"PyTorch FP32 eager on the verify set, through the runtime "
                        f"({writer.precision.upper()} gate)", "report": report, "failures": fails, "passed": not fails}
        problem = f"outside the {writer.precision.upper()} gate ({'; '.join(fails)})" if fails else None
        if problem is not None:
            del writer.files[ORT_GRAPH_NAME]
    if problem is not None:
        fused.unlink()
        rep.update(file=None, reason=f"{problem}; not shipped")
        log.warning("%s: %s", onnx_path.parent.name, rep["reason"])
    return rep


def _uint8_input(preset: Preset, tmp: Path, onnx_path: Path, images: np.ndarray, writer: _Writer, graph_rep: dict) -> dict:
    """Make the verified graph take uint8 [B, H, W, 3] and check it equals the float graph fed numpy's
    normalisation (`imaging.fast.normalize`) of the same pixels: the verify images, quantised to uint8."""
    from vpr_edge.engines.uint8_input import add_uint8_input
    from vpr_edge.imaging.fast import normalize

    pre = preset.preprocess
    pixels = _pixels(images, pre)
    _, want = _runtime_outputs(tmp, normalize(pixels, pre), raw=True)
    add_uint8_input(onnx_path, pre)
    writer.write(onnx_path, writer.precision, {"graph": graph_rep, "input_layout": "uint8"}, {}, final=False)
    _, got = _runtime_outputs(tmp, np.ascontiguousarray(pixels), raw=True)
    err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
    tol = UINT8_TOLERANCE[writer.io_dtype]
    if not err <= tol:
        raise FidelityError(f"{onnx_path}: with uint8 input the graph differs from the float graph fed the same pixels "
                            f"(relative error {err:.2e} > {tol}); nothing was written")
    return {"compared_with": "the float-input graph fed imaging.fast.normalize of the same uint8 pixels",
            "images": int(len(pixels)), "rel_err": err, "tolerance": tol, "passed": True}


def _rewrite(onnx_path: Path) -> dict[str, int]:
    """`engines.precision.rewrites.tidy_for_ort` on the FP32 graph, in place, before it is verified: GELU in
    the order ONNX Runtime fuses and LayerScale folded into the weights (standard ops; the FP16/INT8
    lowerings start from it). What changed is recorded; a graph with nothing to rewrite is left as it is."""
    from vpr_edge.engines.precision.rewrites import tidy_for_ort

    external = bool(graph.external_data_files(onnx_path))
    # a big graph as structure only, its weights streamed while saving (ViT-G: 8.5 GiB loaded whole)
    model = graph.load(onnx_path, load_weights=not external)
    counts = tidy_for_ort(model, onnx_path.parent if external else None)
    if any(counts.values()):
        if external:
            graph.save_streamed(model, onnx_path, onnx_path.parent)
        else:
            graph.save(model, onnx_path)
    return counts


def _tensorrt_check(onnx_path: Path, options: ExportOptions) -> dict:
    """The offline check of the graph against TensorRT 10.3 (JetPack 6) and 11 (`engines.tensorrt.compat`),
    recorded in the manifest; problems are warned about, not fatal (the ONNX itself is verified and usable)."""
    from vpr_edge.engines.tensorrt.compat import check_onnx

    report = check_onnx(onnx_path, batch_sizes=(options.batch,) if options.batch else (1, 8))
    for line in report.lines():
        log.warning("TensorRT check: %s", line)
    return report.to_dict()


def _remove_graph(path: Path) -> None:
    """Delete an ONNX file and its external-data files."""
    for name in _onnx_files(path):
        os.unlink(path.parent / name)
