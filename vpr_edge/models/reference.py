"""The one recipe "preset + weights + vocabulary + PCA -> PyTorch reference model", used by export's
worker, `describe`, `doctor`, the benchmarks' PyTorch variant and the distillation teacher.

`build_reference` makes the model from a preset (fitting what is missing through callbacks, e.g. a
map-specific vocabulary); `reference_from_artifact` rebuilds the model an artifact was exported from,
from its manifest: the same preset, the artifact's own vocabulary/PCA files, and the same weights,
checked by their id (a random seed, or the sha256 of the checkpoint file: pass that file as
`weights` or have it in the torch hub cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpr_edge.errors import WeightsError
from vpr_edge.fitted import PCAWhitening, Vocabulary
from vpr_edge.presets import Preset
from vpr_edge.space import DescriptorSpace, Identity, short_id


@dataclass
class Reference:
    """A built reference model and what defines its descriptors."""

    model: Any  # models.build.VprModel, in eval mode, BoQ caches frozen
    preset: Preset
    weights: str  # the weights argument it was built with ('random', 'auto' or a path)
    weights_id: str
    seed: int
    vocabulary: Vocabulary | None = None
    pca: PCAWhitening | None = None
    declared_space: DescriptorSpace | None = None  # a student's: its teacher's space

    def space(self) -> DescriptorSpace:
        if self.declared_space is not None:
            return self.declared_space
        return DescriptorSpace.of(
            self.preset,
            self.weights_id,
            vocabulary=self.vocabulary.fingerprint if self.vocabulary is not None else None,
            pca=self.pca.fingerprint if self.pca is not None else None,
        )

    def identity(self, **kw: Any) -> Identity:
        return Identity.of(self.preset, self.weights_id, **kw)


def build_reference(
    preset: Preset,
    weights: str = "random",
    *,
    vocabulary: Vocabulary | str | Path | None = None,
    pca: PCAWhitening | str | Path | None = None,
    seed: int = 0,
    fit_vocabulary: Callable[[Any, str], Vocabulary] | None = None,
    fit_pca: Callable[[Any, str, Vocabulary | None], PCAWhitening] | None = None,
) -> Reference:
    """The reference model of `preset`. A VLAD preset without `vocabulary` calls
    `fit_vocabulary(backbone, weights_id)`; a PCA preset without `pca` calls `fit_pca(model before PCA,
    weights_id, vocabulary)`; without the callback it is a one-line error saying how to fit one."""
    import torch

    from vpr_edge import presets
    from vpr_edge.models import build as B
    from vpr_edge.models import weights as W
    from vpr_edge.models.vocabulary import load_vocabulary

    if preset.method == "student":  # `weights` is the run folder: the student and its teacher's head are in it
        from vpr_edge.models.student import student_reference

        return student_reference(weights)
    torch.manual_seed(seed)
    wid = W.weights_id(weights, preset.weights, seed)
    release = B.fetch_release(preset, weights)
    backbone = B.build_backbone(preset, weights, seed=seed, state_dict=release).eval()
    vocab = vocabulary
    if presets.head(preset).vocabulary:
        if vocab is None and fit_vocabulary is not None:
            vocab = fit_vocabulary(backbone, wid)
        elif isinstance(vocab, (str, Path)):
            vocab = load_vocabulary(vocab)
        if vocab is not None:
            vocab.check_for(preset, wid)
    pca_obj = pca
    if preset.aggregator.pca_dim:
        if pca_obj is None and fit_pca is not None:
            no_pca = B.VprModel(preset, backbone, B.build_aggregator(preset.without_pca(), vocab, seed=seed)).eval()
            pca_obj = fit_pca(no_pca, wid, vocab)
        elif isinstance(pca_obj, (str, Path)):
            from vpr_edge.fitted import load_pca

            pca_obj = load_pca(pca_obj)
        if pca_obj is not None:
            pca_obj.check_for(preset, vocab, wid)
    aggregator = B.build_aggregator(preset, vocab, pca_obj, state_dict=release, seed=seed, origin=weights)
    del release
    model = B.VprModel(preset, backbone, aggregator).eval()
    from vpr_edge.models.boq import freeze_caches

    freeze_caches(model)  # BoQ: the image-independent query self-attention becomes a constant
    return Reference(model, preset, weights, wid, seed, vocab, pca_obj)


def weights_for(identity_weights: str, weights: str | None, preset: Preset, source: str) -> tuple[str, int]:
    """(weights argument, seed) that rebuild the network whose weights id is `identity_weights`.

    random:seed=N -> ('random', N); sha256:... -> `weights` (a PATH or 'auto') when its file has that hash,
    else the official file in the hub cache when it does; otherwise a one-line error asking for the file."""
    from vpr_edge.models import weights as W

    scheme, _, rest = identity_weights.partition(":")
    if scheme in W.SYNTHETIC and rest.startswith("seed="):
        if weights not in (None, scheme):
            raise WeightsError(f"{source} was exported with {scheme} weights ({identity_weights}); drop --weights {weights}")
        return scheme, int(rest.removeprefix("seed="))
    if scheme == "legacy":  # format-1 manifests recorded only 'random' / 'auto'
        return (weights or rest), 0
    if scheme != "sha256":
        raise WeightsError(f"{source} records weights {identity_weights!r}, which vpr-edge cannot rebuild as a PyTorch model")
    candidates = [weights] if weights else []
    if not weights and preset.weights and W.checkpoint_file("auto", preset.weights).is_file():
        candidates = ["auto"]  # the official file is in the hub cache (never downloaded just to compare)
    for cand in candidates:
        got = W.weights_id(cand, preset.weights, 0)
        if got == identity_weights:
            return cand, 0
        raise WeightsError(
            f"--weights {cand} has {short_id(got)}, but {source} was exported from a checkpoint with "
            f"{short_id(identity_weights)}; pass the checkpoint file it was exported from"
        )
    raise WeightsError(
        f"{source} was exported from the checkpoint {short_id(identity_weights)}; pass --weights PATH of that file "
        "to rebuild its PyTorch reference"
    )


def reference_from_artifact(artifact: Any, weights: str | None = None) -> Reference:
    """The PyTorch model `artifact` (an `artifact.Artifact` or its folder) was exported from."""
    from vpr_edge.artifact import load_artifact

    art = artifact if hasattr(artifact, "manifest") else load_artifact(artifact)
    ident = art.identity
    if art.preset.method == "student":
        run = weights or art.manifest.details.get("student_run")
        ref = build_reference(art.preset, str(run))
        if ref.weights_id != ident.weights:
            raise WeightsError(f"the student in {run} has {short_id(ref.weights_id)}, {art.folder} was exported from "
                               f"{short_id(ident.weights)}; pass --weights RUN of the run it was exported from")
        return ref
    w, seed = weights_for(ident.weights, weights, art.preset, str(art.folder))
    return build_reference(
        art.preset, w, vocabulary=art.file("vocabulary", required=False), pca=art.file("pca", required=False), seed=seed
    )
