"""The PyTorch half of an export: verify images, the reference model (`models.reference`, fitting a
map-specific vocabulary/PCA when none is given), reference outputs and the FP32 ONNX file.

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
from vpr_edge.presets import Preset
from vpr_edge.verifyset import VerifySet


@dataclass
class TorchSide:
    """What the verification half needs from the torch half (numpy and small objects only, so it
    crosses a process boundary by plain pickling)."""

    verify: VerifySet
    vocabulary: object | None
    pca: object | None
    reference: np.ndarray  # the exported module's outputs on verify.images
    reference_desc: np.ndarray  # descriptors (= reference for descriptor scope)
    reference_ties: list | None  # hard-VLAD presets: `export.ties.TieRecord` per verify image
    weights_id: str  # what identifies the weights (vpr_edge.space)
    space: dict  # the descriptor space (a student's: its teacher's)
    weights_bytes: int
    times: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: dict[str, float] = field(default_factory=dict)


def torch_outputs(module, images: np.ndarray, batch: int = 2) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [module(torch.from_numpy(images[i : i + batch])).float().numpy() for i in range(0, len(images), batch)]
        )


def _fit_set(vs: VerifySet) -> tuple[np.ndarray, str]:
    if vs.fit_images is not None and len(vs.fit_images):
        return vs.fit_images, f"{len(vs.fit_images)} {vs.source} images outside the verify set"
    # nothing else available: the verify database (the manifest says so; fidelity may read worse)
    return vs.images[vs.db_idx], f"the {len(vs.db_idx)} {vs.source} verify database images"


def _vocabulary_fitter(preset: Preset, vs: VerifySet, seed: int, steps: Steps):
    """Map-specific vocabulary (AnyLoc's 'map' vocabulary) when none is given."""

    def fit(backbone, weights_id: str):
        return steps.run("fitting vocabulary", _fit_vocabulary, backbone, weights_id)

    def _fit_vocabulary(backbone, weights_id: str):
        from vpr_edge.models import vocabulary as V

        images, where = _fit_set(vs)
        feats = torch_outputs(backbone, images)
        k = preset.aggregator.clusters
        if feats.shape[0] * feats.shape[1] < 4 * k:
            raise ConfigError(
                f"cannot fit {k} clusters on {feats.shape[0]} images; pass --vocabulary or more --verify images"
            )
        return V.fit_vocabulary(
            ((str(i), f) for i, f in enumerate(feats)), preset=preset, k=k, per_image=feats.shape[1], seed=seed,
            progress=False, source=f"fitted on {where}", weights=weights_id,
        )

    return fit


def _pca_fitter(preset: Preset, vs: VerifySet, steps: Steps):
    def fit(model_no_pca, weights_id: str, vocabulary):
        from vpr_edge.models import pca as P

        images, where = _fit_set(vs)
        return steps.run("fitting PCA", lambda: P.fit_pca_whitening(
            torch_outputs(model_no_pca, images), preset=preset, source=f"fitted on {where}", weights=weights_id,
            vocabulary=vocabulary))

    return fit


def torch_side(
    preset: Preset, weights: str, vocabulary, pca, options, seed: int, onnx_path: Path
) -> TorchSide:
    """Build, fit what is missing, run the reference and write the FP32 graph to `onnx_path`."""
    from vpr_edge.atomic import check_disk
    from vpr_edge.export.onnx_from_torch import onnx_from_torch, param_bytes
    from vpr_edge.models.preprocess import load_batch
    from vpr_edge.models.reference import build_reference
    from vpr_edge.verifyset import verify_set

    steps = Steps(options.progress)
    vs = steps.run(
        "verify images", verify_set, options.verify, preset.preprocess, options.verify_limit, seed=seed,
        load=lambda paths: load_batch(paths, preset.preprocess).numpy(),  # the reference's own preprocessing
    )
    ref = steps.run(
        "building model", build_reference, preset, weights, vocabulary=vocabulary, pca=pca, seed=seed,
        fit_vocabulary=_vocabulary_fitter(preset, vs, seed, steps), fit_pca=_pca_fitter(preset, vs, steps),
    )
    model = ref.model
    module = model.backbone if options.scope == "backbone" else model
    out_name = "features" if options.scope == "backbone" else "descriptor"
    ties: list | None = None
    hook = None
    if preset.aggregator.kind == "vlad" and ref.vocabulary is not None:  # for the FP32 check's assignment ties
        from vpr_edge.export.ties import tie_records

        centers = ref.vocabulary.centers
        ties = []
        if options.scope != "backbone":
            hook = model.aggregator.register_forward_pre_hook(
                lambda m, args: ties.extend(tie_records(args[0].float().numpy(), centers)))
    try:
        ref_out = steps.run("PyTorch reference", torch_outputs, module, vs.images)
    finally:
        if hook is not None:
            hook.remove()
    if ties is not None and options.scope == "backbone":
        for i in range(0, len(ref_out), 8):
            ties.extend(tie_records(ref_out[i:i + 8], centers))
    ref_desc = ref_out if options.scope == "descriptor" else torch_outputs(model.aggregator, ref_out)
    weights_bytes = param_bytes(module)
    check_disk(onnx_path.parent, int(weights_bytes * 2.2) + (64 << 20))
    steps.run("tracing + writing ONNX", onnx_from_torch, module, preset.preprocess.image_size, onnx_path,
              output_name=out_name, batch=options.batch, opset=options.opset)
    return TorchSide(
        verify=vs,
        vocabulary=ref.vocabulary,
        pca=ref.pca,
        reference=ref_out,
        reference_desc=ref_desc,
        reference_ties=ties,
        weights_id=ref.weights_id,
        space=ref.space().to_dict(),
        weights_bytes=weights_bytes,
        times=steps.times,
        peak_rss_gib=steps.peak_rss_gib,
    )


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a worker whose parent was killed exits instead of blocking on its pipe and later
    writing into the parent's partial folder. Linux: the kernel sends SIGKILL when the parent dies
    (prctl PR_SET_PDEATHSIG); elsewhere a thread polls the parent's pid."""
    import ctypes
    import os
    import signal
    import threading
    import time

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def torch_side_in_worker(preset: Preset, weights: str, vocabulary, pca, options, seed: int, onnx_path: Path) -> TorchSide:
    """`torch_side` in a spawned process (a fresh interpreter: no fork of a process holding threads) that
    dies with its parent."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        try:
            return pool.submit(torch_side, preset, weights, vocabulary, pca, options, seed, onnx_path).result()
        except BrokenProcessPool as exc:
            raise ArtifactError(
                f"the PyTorch export worker for {preset.name} died before finishing {onnx_path.name} (killed, most "
                f"likely out of memory); free memory or retry with --torch-worker off"
            ) from exc
