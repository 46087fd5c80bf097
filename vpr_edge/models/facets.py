"""Facet extraction: image -> per-patch query/key/value/token features of one ViT block.

For query/key/value only block L's norm1 and the needed third of attn.qkv are computed (a row
slice of the shared weight; the exporter folds the slice into a constant, so an exported graph
holds D x D of qkv, not 3D x D). Nothing of block L beyond that is kept as a submodule.
"""

from __future__ import annotations

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.models.vit import VisionTransformer
from vpr_edge.presets import Facet

torch = lazy_import("torch")
nn = torch.nn
F = torch.nn.functional
Tensor = torch.Tensor

_THIRD = {"query": 0, "key": 1, "value": 2}


class FacetExtractor(nn.Module):
    """images [B, 3, H, W] -> facet features [B, N_patches, D] (CLS and registers dropped).

    `vit` must hold blocks 0..facet.layer. Layout 'head_major' keeps qkv's channel order (AnyLoc's
    DINOv2 path); 'dim_major' reorders channels to d_i * heads + h_i as dino-vit-features does
    for AnyLoc's DINO v1 path. Features are L2-normalised per patch when facet.l2.
    """

    def __init__(self, vit: VisionTransformer, facet: Facet, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        layer = facet.layer
        if not 0 <= layer < len(vit.blocks):
            raise ConfigError(
                f"facet layer {layer} needs blocks 0..{layer}, the ViT holds {len(vit.blocks)}; "
                f"build it with num_blocks={layer + 1}"
            )
        if facet.facet not in ("query", "key", "value", "token"):
            raise ConfigError(f"facet must be query, key, value or token, got {facet.facet!r}")
        if facet.layout not in ("head_major", "dim_major"):
            raise ConfigError(f"facet layout must be head_major or dim_major, got {facet.layout!r}")
        self.facet = facet
        self.num_heads = vit.num_heads
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.embed_dim = vit.embed_dim
        self.trunk = vit.truncated(layer)  # blocks 0..L-1, sharing vit's parameters
        blk = vit.blocks[layer]
        if facet.facet == "token":
            self.block = blk
        else:
            self.norm1 = blk.norm1
            self.qkv = blk.attn.qkv
        if image_size is not None:
            self.set_image_size(image_size)

    @property
    def grid(self) -> tuple[int, int] | None:
        """Token grid (rows, cols) of the fixed input size; None until set_image_size."""
        return self.trunk.grid

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        self.trunk.set_image_size(image_size)

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.trunk.grid_for(image_size)

    def forward(self, x: Tensor) -> Tensor:
        t = self.trunk.forward_features(x)
        if self.facet.facet == "token":
            f = self.block(t)[:, self.num_prefix_tokens :]
        else:
            # Per-token ops: drop CLS/registers first, then norm1 and the needed third of qkv.
            t = self.norm1(t[:, self.num_prefix_tokens :])
            d = self.embed_dim
            lo = _THIRD[self.facet.facet] * d
            bias = self.qkv.bias[lo : lo + d] if self.qkv.bias is not None else None
            f = F.linear(t, self.qkv.weight[lo : lo + d], bias)
        if self.facet.layout == "dim_major":
            b, n, c = f.shape
            f = f.reshape(b, n, self.num_heads, c // self.num_heads).transpose(2, 3).reshape(b, n, c)
        if self.facet.l2:
            f = F.normalize(f, p=2, dim=-1)
        return f
