"""The export job: preset -> verified ONNX artifact folder with its manifest.

Steps (each named for what it makes): reference model -> verify set -> vocabulary/PCA (given or
fitted on the verify database) -> ONNX (FP32) -> graph checks -> ONNX Runtime vs PyTorch ->
optional FP16/INT8 graph -> manifest. Everything is written in a temporary folder that replaces
the output only when verification passed.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vpr_edge import fidelity
from vpr_edge.atomic import atomic_dir, check_disk
from vpr_edge.errors import ArtifactError, ConfigError, FidelityError
from vpr_edge.export import graph
from vpr_edge.export.verify_set import VerifySet
from vpr_edge.manifest import Manifest, package_versions, sha256_file
from vpr_edge.presets import Preset

log = logging.getLogger(__name__)

FP32_TOLERANCE = {"rel_err": 1e-4, "top5_agreement": 1.0}
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
    target_agreement: float | None = None
    io_dtype: str = "float32"
    engine: bool = False
    progress: bool = True

    def check(self, preset: Preset) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope must be one of {SCOPES}, got {self.scope!r}")
        if self.opset < 17:
            raise ConfigError(f"--opset must be >= 17 (LayerNormalization as one node), got {self.opset}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be a positive number or 'dynamic', got {self.batch}")
        if self.verify_limit < 4:
            raise ConfigError(f"--verify-limit must be >= 4, got {self.verify_limit}")


class _Steps:
    """Progress of the slow steps (one line each on stderr), with time and peak RSS per step for the manifest."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.times: dict[str, float] = {}
        self.peak_rss_gib: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        import sys
        import threading

        import psutil

        proc, peak, done = psutil.Process(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if self.enabled:
            print(f"{name} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        finally:
            done.set()
            sampler.join()
        self.times[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss_gib[name] = round(peak[0] / 2**30, 2)
        if self.enabled:
            print(f" {self.times[name]:.1f} s", file=sys.stderr, flush=True)
        return out


def _ort_session(path: Path):
    from vpr_edge.lazy import lazy_import

    ort = lazy_import("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Verification runs a few images: read the (memory-mapped) weights in place instead of
    # prepacking a second copy of every MatMul weight (peak ~1x weights instead of ~2x).
    so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, images: np.ndarray, batch: int | None) -> np.ndarray:
    """The artifact's outputs on `images` (fixed-batch graphs are padded by engines.ortrun)."""
    from vpr_edge.engines.ortrun import run_onnx as run

    return run(_ort_session(path), images, batch_size=batch or 8)


def _torch_outputs(module, images: np.ndarray, batch: int = 8) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [module(torch.from_numpy(images[i : i + batch])).float().numpy() for i in range(0, len(images), batch)]
        )


def _descriptors_from_features(aggregator, feats: np.ndarray) -> np.ndarray:
    """Backbone-scope artifacts are judged on the descriptors they lead to (same torch aggregator)."""
    import torch

    with torch.inference_mode():
        return aggregator(torch.from_numpy(feats)).float().numpy()


def _fit_set(vs: VerifySet) -> tuple[np.ndarray, str]:
    if vs.fit_images is not None and len(vs.fit_images):
        return vs.fit_images, f"{len(vs.fit_images)} {vs.source} images outside the verify set"
    # nothing else available: the verify database (the manifest says so; fidelity may read worse)
    return vs.images[vs.db_idx], f"the {len(vs.db_idx)} {vs.source} verify database images"


def _fit_vocabulary(preset: Preset, backbone, vs: VerifySet, seed: int, progress: bool):
    """Map-specific vocabulary (AnyLoc's 'map' vocabulary) when none is given."""
    from vpr_edge.models import vocabulary as V

    images, where = _fit_set(vs)
    feats = _torch_outputs(backbone, images)
    k = preset.aggregator.clusters
    if feats.shape[0] * feats.shape[1] < 4 * k:
        raise ConfigError(
            f"cannot fit {k} clusters on {feats.shape[0]} images; pass --vocabulary or more --verify images"
        )
    return V.fit_vocabulary(
        ((str(i), f) for i, f in enumerate(feats)),
        preset=preset,
        k=k,
        per_image=feats.shape[1],
        seed=seed,
        progress=progress,
        source=f"fitted on {where}",
    )


def _fit_pca(preset: Preset, model_no_pca, vs: VerifySet):
    from vpr_edge.models import pca as P

    images, where = _fit_set(vs)
    desc = _torch_outputs(model_no_pca, images)
    return P.fit_pca_whitening(desc, preset=preset, source=f"fitted on {where}")


def _check_fp32(report: dict) -> list[str]:
    fails = []
    if report["rel_err"] > FP32_TOLERANCE["rel_err"]:
        fails.append(f"rel_err {report['rel_err']:.2e} > {FP32_TOLERANCE['rel_err']:.0e}")
    if report["top5_agreement"] < FP32_TOLERANCE["top5_agreement"]:
        fails.append(f"top-5 agreement {report['top5_agreement']:.3f} < 1.0")
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
    from vpr_edge.export import verify_set
    from vpr_edge.export.onnx_from_torch import onnx_files, onnx_from_torch, param_bytes
    from vpr_edge.models import build as B

    options.check(preset)
    output = Path(output)
    if output.exists() and not force:
        raise ArtifactError(f"{output} already exists; pass --force to overwrite it or choose another --output")
    steps = _Steps(options.progress)

    vs = steps.run(
        "verify images",
        lambda: verify_set.from_folder(options.verify, preset.preprocess, options.verify_limit)
        if options.verify
        else verify_set.synthetic(preset.preprocess, seed=seed),
    )
    release = B.fetch_release(preset, weights)
    backbone = steps.run("building model", B.build_backbone, preset, weights, seed, release)
    backbone.eval()
    hashes: dict[str, str | None] = {"weights": _weights_hash(weights), "vocabulary": None, "pca": None}
    vocab_obj = pca_obj = None
    if preset.aggregator.kind == "vlad":
        if vocabulary is None:
            vocab_obj = steps.run("fitting vocabulary", _fit_vocabulary, preset, backbone, vs, seed, False)
        else:
            from vpr_edge.models import vocabulary as V

            vocab_obj = vocabulary if isinstance(vocabulary, V.Vocabulary) else V.load_vocabulary(vocabulary)
    if preset.aggregator.pca_dim:
        if pca is None:
            no_pca = B.VprModel(
                preset, backbone, B.build_aggregator(preset.without_pca(), vocab_obj)
            ).eval()
            pca_obj = steps.run("fitting PCA", _fit_pca, preset, no_pca, vs)
        else:
            from vpr_edge.models import pca as P

            pca_obj = pca if isinstance(pca, P.PCAWhitening) else P.load_pca(pca)
    aggregator = B.build_aggregator(preset, vocab_obj, pca_obj, state_dict=release, seed=seed, origin=weights)
    model = B.VprModel(preset, backbone, aggregator).eval()
    del release
    if hasattr(model.aggregator, "freeze"):
        model.aggregator.freeze()  # BoQ: image-independent query self-attention becomes a constant

    module = model.backbone if options.scope == "backbone" else model
    out_name = "features" if options.scope == "backbone" else "descriptor"
    ref_out = steps.run("PyTorch reference", _torch_outputs, module, vs.images)
    aggregator = model.aggregator  # small; the backbone is dropped once the graph is written
    ref_desc = ref_out if options.scope == "descriptor" else _descriptors_from_features(aggregator, ref_out)

    check_disk(output.parent, int(param_bytes(module) * 2.2) + (64 << 20))
    with atomic_dir(output, force=force) as tmp:
        # a lowered artifact holds only its FP16/INT8 graph as model.onnx; FP32 is an intermediate
        onnx_path = tmp / ("model.onnx" if options.precision == "fp32" else "model.fp32.onnx")
        steps.run("tracing + writing ONNX", onnx_from_torch, module, preset.preprocess.image_size, onnx_path,
                  output_name=out_name, batch=options.batch, opset=options.opset)
        # ONNX Runtime loads its own copy of the weights; drop ours first. Measured on ViT-G, about 1x of
        # torch-side memory still stays resident after this (issue 3's note: trace in a worker process next).
        del module, model, backbone
        gc.collect()
        graph_rep = _graph_report(preset, onnx_path)
        ort_out = steps.run("verifying with ONNX Runtime", run_onnx, onnx_path, vs.images, options.batch)
        ort_desc = ort_out if options.scope == "descriptor" else _descriptors_from_features(aggregator, ort_out)
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
