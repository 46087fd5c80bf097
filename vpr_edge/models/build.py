"""The parts of the PyTorch reference model (backbone + aggregator), the path every other stage is
judged by; `models.reference.build_reference` assembles them from a preset.

`VprModel.backbone` maps images to features ([B, N, D] facet features for AnyLoc, [B, C, h, w]
maps for BoQ); `VprModel.aggregator` maps features to the descriptor. The module names
`backbone`/`aggregator` are the BoQ release checkpoints' key prefixes, so those load as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vpr_edge import presets
from vpr_edge.batching import chunks
from vpr_edge.errors import ConfigError
from vpr_edge.presets import Preset


class DescriptorHead(nn.Module):
    """A head of the registry (VLAD, GeM, ...) over facet features, optionally followed by PCA-whitening (+L2)."""

    def __init__(self, pool: nn.Module, pca: nn.Module | None = None):
        super().__init__()
        self.pool = pool
        self.pca = pca

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d = self.pool(features)
        return self.pca(d) if self.pca is not None else d


class VprModel(nn.Module):
    def __init__(self, preset: Preset, backbone: nn.Module, aggregator: nn.Module):
        super().__init__()
        self.preset = preset
        self.backbone = backbone
        self.aggregator = aggregator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.backbone(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


def build_backbone(preset: Preset, weights: str = "random", seed: int = 0, state_dict=None) -> nn.Module:
    """Image -> features. With a facet: a FacetExtractor holding blocks 0..layer only ([B, N, D]);
    without: the whole trunk's feature maps ([B, C, h, w], as BoQ's backbones give them).

    Release checkpoints holding backbone + head in one file (BoQ) are passed as `state_dict` (see
    `fetch_release`) so they are read once."""
    from vpr_edge.models import facets, weights as W

    size = preset.preprocess.image_size
    if preset.facet is not None:
        vit = W.load_backbone(preset.backbone, weights, num_blocks=preset.facet.layer + 1, seed=seed, image_size=size)
        return facets.FacetExtractor(vit, preset.facet, image_size=size)
    return W.load_boq_backbone(
        preset.backbone, weights, seed, source=preset.aggregator.weights, state_dict=state_dict, image_size=size
    )


def fetch_release(preset: Preset, weights: str) -> dict | None:
    """The release checkpoint of a preset whose head ships with its backbone in one file (BoQ), or None
    (random weights, or a head without weights of its own)."""
    from vpr_edge.models import weights as W

    if not presets.head(preset).release or weights in W.SYNTHETIC:
        return None

    return W.fetch_state_dict(weights, preset.aggregator.weights)


def build_aggregator(
    preset: Preset, vocabulary=None, pca=None, state_dict=None, seed: int = 0, origin: str = "the release checkpoint"
) -> nn.Module:
    """The preset's head (`presets.HEADS`: built by its model module), with PCA-whitening when the preset
    has a PCA size. `vocabulary`/`pca`: fitted records (`vpr_edge.fitted`) or paths to their files."""
    import importlib

    from vpr_edge import fitted
    from vpr_edge.models import pca as P

    kind = presets.head(preset)
    if isinstance(vocabulary, (str, Path)):
        from vpr_edge.models.vocabulary import load_vocabulary

        vocabulary = load_vocabulary(vocabulary)
    if isinstance(pca, (str, Path)):
        pca = fitted.load_pca(pca)
    builder = importlib.import_module(kind.module).build_head
    base = preset.without_pca() if preset.aggregator.pca_dim else preset
    pool = builder(base, vocabulary=vocabulary, pca=None, state_dict=state_dict, seed=seed, origin=origin)
    if not preset.aggregator.pca_dim:
        return pool if not kind.per_patch else DescriptorHead(pool)
    if pca is None:
        raise ConfigError(
            f"{preset.name} whitens to {preset.aggregator.pca_dim} dims and needs a PCA file; fit one with "
            f"`vpr-edge pca fit IMAGES --model {preset.name} --vocabulary V --output pca.npz`"
        )
    pca.check_for(preset, vocabulary)
    return DescriptorHead(pool, P.pca_module(pca))


@torch.inference_mode()
def iter_image_features(
    backbone: nn.Module, paths: Iterable[str | Path], preset: Preset, batch_size: int = 8, progress: bool = True
) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield (path, features [N, D]) per image, batch by batch (never all images in memory)."""
    from tqdm import tqdm

    from vpr_edge.models.preprocess import load_batch

    paths = [Path(p) for p in paths]
    bar = tqdm(total=len(paths), desc="features", unit="img", disable=not progress)
    for part in chunks(len(paths), batch_size):
        chunk = paths[part]
        feats = backbone(load_batch(chunk, preset.preprocess))
        if feats.dim() == 4:  # [B, C, h, w] maps -> [B, N, C]
            feats = feats.flatten(2).transpose(1, 2)
        for p, f in zip(chunk, feats.float().numpy()):
            yield p, f
        bar.update(len(chunk))
    bar.close()


@torch.inference_mode()
def describe_paths(model: VprModel, paths, batch_size: int = 8, progress: bool = True) -> np.ndarray:
    from tqdm import tqdm

    from vpr_edge.models.preprocess import load_batch

    paths = [Path(p) for p in paths]
    out = []
    for part in tqdm(list(chunks(len(paths), batch_size)), desc="describe", unit="batch", disable=not progress):
        out.append(model(load_batch(paths[part], model.preset.preprocess)).float().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.preset.descriptor_dim), np.float32)
