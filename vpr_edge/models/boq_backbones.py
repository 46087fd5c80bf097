"""BoQ's two backbones, with the module paths of the release checkpoints (backbone.net.*,
backbone.dino.*). Both map images [B, 3, H, W] to feature maps [B, C, h, w].

Matches amaralibey/Bag-of-Queries src/backbones.py: the ResNet keeps conv1..layer3 in an
nn.Sequential (layer4/avgpool/fc are cropped and absent from the checkpoint); the DINOv2 ViT-B/14
runs all blocks, drops CLS and does NOT apply the final norm (it stays in the state dict).
"""

from __future__ import annotations

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.models.resnet import build_resnet_trunk
from vpr_edge.models.vit import VisionTransformer
from vpr_edge.presets import Backbone

torch = lazy_import("torch")
nn = torch.nn
Tensor = torch.Tensor


class BoQResNet(nn.Module):
    def __init__(self, spec: Backbone) -> None:
        super().__init__()
        if spec.family != "resnet":
            raise ConfigError(f"BoQResNet needs a resnet backbone, got family {spec.family!r}")
        self.spec = spec
        self.net = build_resnet_trunk(spec)
        self.out_channels = spec.out_channels
        self.stride = 2 ** (spec.resnet_keep + 1)

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = image_size
        return (-(-int(h) // self.stride), -(-int(w) // self.stride))

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        """Nothing to precompute; present so both BoQ backbones share one interface."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BoQDinoV2(nn.Module):
    def __init__(self, spec: Backbone, *, init_values: float = 1.0, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if spec.family != "dinov2":
            raise ConfigError(f"BoQDinoV2 needs a dinov2 backbone, got family {spec.family!r}")
        self.spec = spec
        # All blocks and the final norm are built (strict loading), the norm is never applied.
        self.dino = VisionTransformer(spec, init_values=init_values, include_norm=True, image_size=image_size)
        self.out_channels = spec.embed_dim

    @property
    def grid(self) -> tuple[int, int] | None:
        return self.dino.grid

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.dino.grid_for(image_size)

    def set_image_size(self, image_size: tuple[int, int]) -> None:
        self.dino.set_image_size(image_size)

    def forward(self, x: Tensor) -> Tensor:
        gh, gw = self.dino.grid_for((x.shape[-2], x.shape[-1]))
        t = self.dino.forward_features(x)[:, self.dino.num_prefix_tokens :]
        b, _, c = t.shape
        return t.transpose(1, 2).reshape(b, c, gh, gw)
