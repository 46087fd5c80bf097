"""What the teacher cache needs from a teacher, and the PyTorch reference as one.

The protocol (duck-typed; an ONNX Runtime or TensorRT teacher can follow it without torch):

    space: dict            the descriptor space the teacher defines (stored, compared by open_cache)
    identity: dict         what produced the numbers (network, weights, precision; stored, not compared)
    preprocess: Preprocess how an image becomes the teacher's input (presets.Preprocess)
    feature_dim: int       facet dim D (1536 for ViT-G)
    grid: (int, int)       token grid (16, 16 for ViT-G/14 at 224)
    descriptor_dim: int    final descriptor size (49152, or the PCA dim)
    centers: ndarray|None  VLAD centres [K, D] (raw, as HardVLAD holds them), None for GeM
    pca: (mean, proj)|None optional: the PCA-whitening after the pool ([Dfull], [dim, Dfull])
    gem_p: float           optional (GeM teachers; default 3)
    __call__(images float32 [B, 3, H, W]) -> (features float32 [B, N, D] per-patch L2-normalised,
                                             descriptors float32 [B, descriptor_dim])
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from vpr_edge.errors import ConfigError
from vpr_edge.presets import Preprocess


class Teacher(Protocol):
    space: dict
    identity: dict
    preprocess: Preprocess
    feature_dim: int
    grid: tuple[int, int]
    descriptor_dim: int
    centers: np.ndarray | None

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def head_info(teacher: Any) -> dict[str, Any]:
    """The aggregator a student must reuse: kind, GeM p, cluster count, PCA dims."""
    centers = getattr(teacher, "centers", None)
    pca = getattr(teacher, "pca", None)
    return {
        "kind": "vlad" if centers is not None else "gem",
        "clusters": int(np.asarray(centers).shape[0]) if centers is not None else 0,
        "gem_p": float(getattr(teacher, "gem_p", 3.0)),
        "pca": None if pca is None else [int(np.asarray(pca[1]).shape[1]), int(np.asarray(pca[1]).shape[0])],
    }


class TorchTeacher:
    """The PyTorch reference (`models.reference.build_reference`) as a teacher.

    `space`/`identity` default to the reference's descriptor space (preset recipe, weights id, vocabulary
    and PCA fingerprints: `vpr_edge.space`) and identity."""

    def __init__(self, model, *, space: dict | None = None, identity: dict | None = None, device: str = "cpu") -> None:
        import torch

        from vpr_edge.fitted import array_fingerprint
        from vpr_edge.models.gem import GeM
        from vpr_edge.models.vlad import HardVLAD
        from vpr_edge.space import DescriptorSpace

        preset = model.preset
        if preset.facet is None or preset.aggregator.kind not in ("vlad", "gem"):
            raise ConfigError(f"distillation teachers are AnyLoc presets (facet + VLAD/GeM); {preset.name} is {preset.method}")
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.preprocess = preset.preprocess
        self.feature_dim = int(preset.feature_dim)
        self.grid = tuple(int(g) for g in preset.grid())
        self.descriptor_dim = int(preset.descriptor_dim)
        pool = model.aggregator.pool
        pca = model.aggregator.pca
        self.centers = pool.centers.detach().cpu().numpy().copy() if isinstance(pool, HardVLAD) else None
        self.gem_p = float(pool.p) if isinstance(pool, GeM) else 3.0
        self.pca = None
        if pca is not None:
            self.pca = (pca.mean.detach().cpu().numpy().copy(), pca.proj.detach().cpu().numpy().copy())
        if space is None:
            space = DescriptorSpace.of(
                preset, getattr(model, "weights_id", None),
                vocabulary=array_fingerprint(self.centers) if self.centers is not None else None,
                pca=array_fingerprint(np.concatenate([self.pca[0], self.pca[1].ravel()])) if self.pca is not None else None,
            ).to_dict()
        self.space = space
        self.identity = identity if identity is not None else {"network": "pytorch reference", "preset": preset.name}

    @classmethod
    def from_preset(
        cls, preset, weights: str = "random", vocabulary=None, pca=None, seed: int = 0, device: str = "cpu", **kw
    ):
        from vpr_edge.models.reference import build_reference

        ref = build_reference(preset, weights, vocabulary=vocabulary, pca=pca, seed=seed)
        kw.setdefault("space", ref.space().to_dict())
        kw.setdefault("identity", ref.identity(precision="fp32", scope="backbone").to_dict())
        return cls(ref.model, device=device, **kw)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            f = self.model.backbone(x)
            d = self.model.aggregator(f)
        return f.float().cpu().numpy(), d.float().cpu().numpy()


class ArtifactTeacher:
    """An exported teacher artifact as a teacher, through the lean runtime (ONNX Runtime or TensorRT): what a
    GPU machine or a cluster runs to fill a cache; ORT INT8 ViT-G is ~2x faster than PyTorch FP32 on a CPU.

    The artifact must output per-patch features (`vpr-export --scope backbone`); its descriptor space and
    identity are the artifact's, its head the artifact's vocabulary / PCA."""

    def __init__(self, path, *, backend: str = "auto", threads: int | None = None, verify: bool = True) -> None:
        from vpr_edge.fitted import load_pca, load_vocabulary
        from vpr_edge.runtime.describer import Describer

        self.describer = Describer.from_artifact(path, backend=backend, threads=threads, verify=verify)
        art = self.describer.artifact
        if self.describer.aggregation is None:
            self.describer.close()
            raise ConfigError(
                f"{art.folder} outputs descriptors only; a teacher cache stores per-patch features: export the teacher "
                f"with `vpr-export --model {art.preset.name} --scope backbone` (and the same vocabulary/PCA)"
            )
        preset = art.preset
        self.preprocess = preset.preprocess
        self.feature_dim = int(preset.feature_dim)
        self.grid = tuple(int(g) for g in preset.grid())
        self.descriptor_dim = int(preset.descriptor_dim)
        vfile, pfile = art.file("vocabulary", required=False), art.file("pca", required=False)
        self.centers = load_vocabulary(vfile).centers if vfile else None
        self.gem_p = float(preset.aggregator.gem_p)
        self.pca = None
        if pfile:
            pw = load_pca(pfile)
            self.pca = (pw.mean, pw.proj)
        self.space = dict(art.manifest.space)
        self.identity = dict(art.manifest.identity)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats = self.describer.run_backend(np.ascontiguousarray(images, dtype=np.float32))
        return feats, self.describer.aggregate(feats)

    def close(self) -> None:
        self.describer.close()
