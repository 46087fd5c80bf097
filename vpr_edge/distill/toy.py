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
    from vpr_edge.models.build import describe_paths, iter_image_features
    from vpr_edge.models.reference import build_reference
    from vpr_edge.models.vocabulary import fit_vocabulary

    preset = presets.get(name)

    def fit_vocab(backbone, weights_id):
        with _one_faiss_thread():
            return fit_vocabulary(iter_image_features(backbone, vocab_images, preset, progress=False), preset=preset,
                                  seed=seed, niter=20, progress=False, weights=weights_id)

    def fit_pca(no_pca, weights_id, vocab):
        from vpr_edge.models.pca import fit_pca_whitening

        desc = describe_paths(no_pca, pca_images or vocab_images, progress=False)
        with _one_faiss_thread():
            return fit_pca_whitening(desc, preset, vocabulary=vocab, weights=weights_id)

    ref = build_reference(preset, "random", seed=seed, fit_vocabulary=fit_vocab, fit_pca=fit_pca)
    return TorchTeacher(ref.model, space=ref.space().to_dict(),
                        identity=ref.identity(precision="fp32", scope="backbone").to_dict())


class NumpyTeacher:
    """A torch-free teacher following the distill.teacher protocol (GeM-like head): per 14x14 patch,
    a fixed random projection of its mean colour and colour products, tanh, L2; the descriptor is the
    L2-normalised mean of the patch features. `delay` seconds per call make builds slow enough to kill.
    `calls` records how many images each call saw (what a resumed build recomputes)."""

    def __init__(self, dim: int = 8, image_size: tuple[int, int] = (56, 84), seed: int = 0, delay: float = 0.0):
        import numpy as np

        from vpr_edge.presets import Preprocess

        self.preprocess = Preprocess(image_size=tuple(image_size))
        self.grid = (image_size[0] // 14, image_size[1] // 14)
        self.feature_dim = dim
        self.descriptor_dim = dim
        self.centers = None
        self.gem_p = 3.0
        self.space = {"teacher": "numpy toy", "dim": dim, "image_size": list(image_size), "seed": seed}
        self.identity = {"network": "numpy toy"}
        self._w = np.random.default_rng(seed).standard_normal((9, dim)).astype(np.float32)
        self.delay = delay
        self.calls: list[int] = []

    def __call__(self, images):
        import time

        import numpy as np

        self.calls.append(len(images))
        if self.delay:
            time.sleep(self.delay)
        b, _, h, w = images.shape
        gh, gw = self.grid
        p = images.reshape(b, 3, gh, 14, gw, 14).mean(axis=(3, 5)).reshape(b, 3, gh * gw).transpose(0, 2, 1)
        feats = np.concatenate([p, p * np.roll(p, 1, axis=-1), p ** 2], axis=-1) @ self._w
        feats = np.tanh(feats)
        feats /= np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-6)
        desc = feats.mean(axis=1)
        desc /= np.maximum(np.linalg.norm(desc, axis=-1, keepdims=True), 1e-6)
        return feats.astype(np.float32), desc.astype(np.float32)
