"""Preset -> PyTorch reference model (backbone + aggregator), the path every other stage is judged by.

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

from vpr_edge.errors import ConfigError
from vpr_edge.presets import Preset


class AnyLocHead(nn.Module):
    """VLAD or GeM over facet features, optionally followed by PCA-whitening (+L2)."""

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
    """Image -> features. AnyLoc: a FacetExtractor holding blocks 0..layer only.

    BoQ release checkpoints hold backbone + head in one file: pass it as `state_dict` (see
    `fetch_release`) so it is read once."""
    from vpr_edge.models import facets, weights as W

    size = preset.preprocess.image_size
    if preset.method == "anyloc":
        vit = W.load_backbone(preset.backbone, weights, num_blocks=preset.facet.layer + 1, seed=seed)
        return facets.FacetExtractor(vit, preset.facet, image_size=size)
    if preset.method == "boq":
        return W.load_boq_backbone(
            preset.backbone, weights, seed, source=preset.aggregator.weights, state_dict=state_dict, image_size=size
        )
    raise ConfigError(f"{preset.name}: unknown method {preset.method}")


def fetch_release(preset: Preset, weights: str) -> dict | None:
    """BoQ: the release checkpoint (backbone + head), or None for random weights / AnyLoc."""
    if preset.method != "boq" or weights == "random":
        return None
    from vpr_edge.models import weights as W

    return W.fetch_state_dict(weights, preset.aggregator.weights)


def build_aggregator(
    preset: Preset, vocabulary=None, pca=None, state_dict=None, seed: int = 0, origin: str = "the BoQ checkpoint"
) -> nn.Module:
    from vpr_edge.models import gem, pca as P, vlad, vocabulary as V

    a = preset.aggregator
    if a.kind == "boq":
        from vpr_edge.models.boq import BoQ

        from vpr_edge.models import weights as W

        head = BoQ.from_preset(preset)
        if state_dict is not None:
            _load_boq_head(head, W.subdict(state_dict, "aggregator."), preset, origin)
        else:
            # seeded per tensor name, like the backbones: a rebuilt reference gets the same head
            W.init_random_(head, seed)
        return head
    if a.kind == "vlad":
        if vocabulary is None:
            raise ConfigError(
                f"{preset.name} needs a VLAD vocabulary ({a.clusters} centres); fit one with "
                f"`vpr-edge vocab fit IMAGES --model {preset.name} --output vocab.npz` and pass --vocabulary"
            )
        vocab = vocabulary if isinstance(vocabulary, V.Vocabulary) else V.load_vocabulary(vocabulary)
        vocab.check_for(preset)
        pool: nn.Module = vlad.HardVLAD(torch.from_numpy(np.asarray(vocab.centers, dtype=np.float32)))
    else:
        pool = gem.GeM(p=a.gem_p)
    head_pca = None
    if a.pca_dim:
        if pca is None:
            raise ConfigError(
                f"{preset.name} whitens to {a.pca_dim} dims and needs a PCA file; fit one with "
                f"`vpr-edge pca fit IMAGES --model {preset.name} --vocabulary V --output pca.npz`"
            )
        pw = pca if isinstance(pca, P.PCAWhitening) else P.load_pca(pca)
        pw.check_for(preset)
        head_pca = pw.module()
    return AnyLocHead(pool, head_pca)


def _load_boq_head(head: nn.Module, sd: dict, preset: Preset, origin: str) -> None:
    """Strictly load the `aggregator.*` part of a BoQ release checkpoint."""
    from vpr_edge.models import weights as W

    w = preset.aggregator.weights
    expected = {f"aggregator.{k}": tuple(v.shape) for k, v in head.state_dict().items()}
    W.check_layout({f"aggregator.{k}": v for k, v in sd.items()}, expected, "boq-head", origin=origin,
                   url=w.url if w else None)
    head.load_state_dict(sd, strict=True)


def build_model(
    preset: Preset, weights: str = "random", vocabulary=None, pca=None, seed: int = 0
) -> VprModel:
    """The reference model in eval mode. VLAD presets need `vocabulary`, PCA presets `pca`."""
    torch.manual_seed(seed)
    release = fetch_release(preset, weights)
    backbone = build_backbone(preset, weights, seed=seed, state_dict=release)
    aggregator = build_aggregator(preset, vocabulary, pca, state_dict=release, seed=seed, origin=weights)
    return VprModel(preset, backbone, aggregator).eval()


def build_feature_model(preset: Preset, weights: str = "random", seed: int = 0) -> nn.Module:
    """Backbone only (what vocabulary fitting needs); no vocabulary required."""
    torch.manual_seed(seed)
    return build_backbone(preset, weights, seed=seed, state_dict=fetch_release(preset, weights)).eval()


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.inference_mode()
def iter_image_features(
    backbone: nn.Module, paths: Iterable[str | Path], preset: Preset, batch_size: int = 8, progress: bool = True
) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield (path, features [N, D]) per image, batch by batch (never all images in memory)."""
    from tqdm import tqdm

    from vpr_edge.models.preprocess import load_batch

    paths = [Path(p) for p in paths]
    bar = tqdm(total=len(paths), desc="features", unit="img", disable=not progress)
    for chunk in _batches(paths, batch_size):
        feats = backbone(load_batch(chunk, preset.preprocess))
        if feats.dim() == 4:  # [B, C, h, w] maps -> [B, N, C]
            feats = feats.flatten(2).transpose(1, 2)
        for p, f in zip(chunk, feats.float().numpy()):
            yield p, f
        bar.update(len(chunk))
    bar.close()


@torch.inference_mode()
def describe_tensors(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    out = [model(images[i : i + batch_size]).float().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out, axis=0)


@torch.inference_mode()
def describe_paths(model: VprModel, paths, batch_size: int = 8, progress: bool = True) -> np.ndarray:
    from tqdm import tqdm

    from vpr_edge.models.preprocess import load_batch

    paths = [Path(p) for p in paths]
    out = []
    for chunk in tqdm(list(_batches(paths, batch_size)), desc="describe", unit="batch", disable=not progress):
        out.append(model(load_batch(chunk, model.preset.preprocess)).float().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.preset.descriptor_dim), np.float32)
