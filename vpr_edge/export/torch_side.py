"""The PyTorch half of an export: verify images, reference model, vocabulary/PCA, reference
outputs and the FP32 ONNX file.

For full-size models it runs in a spawned worker process. Measured on ViT-G (issue 3): after the
exporter has run, about 1x of the FP32 weights stays resident in the process even with the model
deleted, and ONNX Runtime then loads its own copy for verification (2.46x the weights at peak).
A worker's memory goes back to the system when it exits, before ONNX Runtime starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.export.steps import Steps
from vpr_edge.export.verify_set import VerifySet
from vpr_edge.presets import Preset


@dataclass
class TorchSide:
    """What the verification half needs from the torch half (numpy and small objects only, so it
    crosses a process boundary by plain pickling)."""

    verify: VerifySet
    vocabulary: object | None
    pca: object | None
    reference: np.ndarray  # the exported module's outputs on verify.images
    reference_desc: np.ndarray  # descriptors (= reference for descriptor scope)
    head_state: dict[str, np.ndarray]  # aggregator state, to turn backbone-scope outputs into descriptors
    weights_bytes: int
    times: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: dict[str, float] = field(default_factory=dict)


def torch_outputs(module, images: np.ndarray, batch: int = 2) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [module(torch.from_numpy(images[i : i + batch])).float().numpy() for i in range(0, len(images), batch)]
        )


def descriptors_from_features(aggregator, feats: np.ndarray) -> np.ndarray:
    """Backbone-scope artifacts are judged on the descriptors they lead to (same torch aggregator)."""
    import torch

    with torch.inference_mode():
        return aggregator(torch.from_numpy(feats)).float().numpy()


def head_from_state(preset: Preset, side: TorchSide, seed: int, weights: str):
    """The aggregator the torch half used, rebuilt from its state (BoQ: caches frozen)."""
    import torch

    from vpr_edge.models import build as B

    head = B.build_aggregator(preset, side.vocabulary, side.pca, seed=seed, origin=weights)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in side.head_state.items()}, strict=True)
    head.eval()
    if hasattr(head, "freeze"):
        head.freeze()
    return head


def _fit_set(vs: VerifySet) -> tuple[np.ndarray, str]:
    if vs.fit_images is not None and len(vs.fit_images):
        return vs.fit_images, f"{len(vs.fit_images)} {vs.source} images outside the verify set"
    # nothing else available: the verify database (the manifest says so; fidelity may read worse)
    return vs.images[vs.db_idx], f"the {len(vs.db_idx)} {vs.source} verify database images"


def _fit_vocabulary(preset: Preset, backbone, vs: VerifySet, seed: int):
    """Map-specific vocabulary (AnyLoc's 'map' vocabulary) when none is given."""
    from vpr_edge.models import vocabulary as V

    images, where = _fit_set(vs)
    feats = torch_outputs(backbone, images)
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
        progress=False,
        source=f"fitted on {where}",
    )


def _fit_pca(preset: Preset, model_no_pca, vs: VerifySet):
    from vpr_edge.models import pca as P

    images, where = _fit_set(vs)
    desc = torch_outputs(model_no_pca, images)
    return P.fit_pca_whitening(desc, preset=preset, source=f"fitted on {where}")


def torch_side(
    preset: Preset, weights: str, vocabulary, pca, options, seed: int, onnx_path: Path
) -> TorchSide:
    """Build, fit what is missing, run the reference and write the FP32 graph to `onnx_path`."""
    from vpr_edge.atomic import check_disk
    from vpr_edge.export import verify_set
    from vpr_edge.export.onnx_from_torch import onnx_from_torch, param_bytes
    from vpr_edge.models import build as B

    steps = Steps(options.progress)
    vs = steps.run(
        "verify images",
        lambda: verify_set.from_folder(options.verify, preset.preprocess, options.verify_limit)
        if options.verify
        else verify_set.synthetic(preset.preprocess, seed=seed),
    )
    release = B.fetch_release(preset, weights)
    backbone = steps.run("building model", B.build_backbone, preset, weights, seed, release)
    backbone.eval()
    vocab_obj = pca_obj = None
    if preset.aggregator.kind == "vlad":
        if vocabulary is None:
            vocab_obj = steps.run("fitting vocabulary", _fit_vocabulary, preset, backbone, vs, seed)
        else:
            from vpr_edge.models import vocabulary as V

            vocab_obj = vocabulary if isinstance(vocabulary, V.Vocabulary) else V.load_vocabulary(vocabulary)
    if preset.aggregator.pca_dim:
        if pca is None:
            no_pca = B.VprModel(preset, backbone, B.build_aggregator(preset.without_pca(), vocab_obj)).eval()
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
    ref_out = steps.run("PyTorch reference", torch_outputs, module, vs.images)
    ref_desc = ref_out if options.scope == "descriptor" else descriptors_from_features(model.aggregator, ref_out)
    weights_bytes = param_bytes(module)
    check_disk(onnx_path.parent, int(weights_bytes * 2.2) + (64 << 20))
    steps.run("tracing + writing ONNX", onnx_from_torch, module, preset.preprocess.image_size, onnx_path,
              output_name=out_name, batch=options.batch, opset=options.opset)
    return TorchSide(
        verify=vs,
        vocabulary=vocab_obj,
        pca=pca_obj,
        reference=ref_out,
        reference_desc=ref_desc,
        head_state={k: v.detach().cpu().numpy().copy() for k, v in model.aggregator.state_dict().items()},
        weights_bytes=weights_bytes,
        times=steps.times,
        peak_rss_gib=steps.peak_rss_gib,
    )


def torch_side_in_worker(preset: Preset, weights: str, vocabulary, pca, options, seed: int, onnx_path: Path) -> TorchSide:
    """`torch_side` in a spawned process (a fresh interpreter: no fork of a process holding threads)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(torch_side, preset, weights, vocabulary, pca, options, seed, onnx_path).result()
        except BrokenProcessPool as exc:
            raise ArtifactError(
                f"the PyTorch export worker for {preset.name} died before finishing {onnx_path.name} (killed, most "
                f"likely out of memory); free memory or retry with --torch-worker off"
            ) from exc
