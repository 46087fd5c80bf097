"""A toy teacher for tests and smoke runs: anyloc-dinov2@tiny (random weights) with a fitted vocabulary."""

from __future__ import annotations

import contextlib
from pathlib import Path

from vpr_edge import presets

TINY = "anyloc-dinov2@tiny"


@contextlib.contextmanager
def _one_faiss_thread():
    from vpr_edge.models.vocabulary import import_faiss

    faiss = import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # two spinning OpenMP threads on a busy 2-core box are ~30x slower
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def toy_teacher(vocab_images: list[Path], name: str = TINY, seed: int = 0, pca_images: list[Path] | None = None):
    """TorchTeacher for a tiny AnyLoc preset; its vocabulary is fitted on `vocab_images` (and its PCA,
    for PCA presets, on `pca_images` or the same images)."""
    from vpr_edge.distill.teacher import TorchTeacher
    from vpr_edge.models.build import build_feature_model, build_model, describe_paths, iter_image_features
    from vpr_edge.models.vocabulary import fit_vocabulary

    preset = presets.get(name)
    vocab = pca = None
    if preset.aggregator.kind == "vlad":
        feats = build_feature_model(preset, "random", seed=seed)
        with _one_faiss_thread():
            vocab = fit_vocabulary(
                iter_image_features(feats, vocab_images, preset, progress=False), preset=preset, seed=seed,
                niter=20, progress=False,
            )
    if preset.aggregator.pca_dim:
        from vpr_edge.models.pca import fit_pca_whitening

        base = build_model(preset.without_pca(), "random", vocabulary=vocab, seed=seed)
        desc = describe_paths(base, pca_images or vocab_images, progress=False)
        with _one_faiss_thread():
            pca = fit_pca_whitening(desc, preset, vocabulary=vocab)
    return TorchTeacher.from_preset(preset, "random", vocabulary=vocab, pca=pca, seed=seed)
