"""ResNet trunks from torchvision's Bottleneck, with torchvision's key names inside each stage.

Built stage by stage (rather than via torchvision.models.ResNet) so the width is a knob: tiny
test configs shrink every stage, while ResNet50 at width 64 has exactly torchvision's shapes.
"""

from __future__ import annotations

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.presets import Backbone

torch = lazy_import("torch")
_tv_resnet = lazy_import("torchvision.models.resnet")
nn = torch.nn



def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> "nn.Sequential":
    bottleneck = _tv_resnet.Bottleneck
    out = planes * bottleneck.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(_tv_resnet.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    layers = [bottleneck(inplanes, planes, stride, downsample)]
    layers += [bottleneck(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def resnet_modules(spec: Backbone, keep: int | None = None) -> dict[str, "nn.Module"]:
    """Ordered {torchvision name: module} for conv1, bn1, relu, maxpool, layer1..layer{keep}."""
    if spec.family != "resnet":
        raise ConfigError(f"resnet_modules needs a resnet backbone, got family {spec.family!r}")
    keep = spec.resnet_keep if keep is None else keep
    if not 1 <= keep <= len(spec.resnet_layers):
        raise ConfigError(f"{spec.arch}: resnet_keep must be in 1..{len(spec.resnet_layers)}, got {keep}")
    w = spec.resnet_width
    mods: dict[str, nn.Module] = {
        "conv1": nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False),
        "bn1": nn.BatchNorm2d(w),
        "relu": nn.ReLU(inplace=True),
        "maxpool": nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    }
    inplanes = w
    for i in range(keep):
        planes = w * 2**i
        mods[f"layer{i + 1}"] = _stage(inplanes, planes, spec.resnet_layers[i], 1 if i == 0 else 2)
        inplanes = planes * _tv_resnet.Bottleneck.expansion
    return mods


def build_resnet_trunk(spec: Backbone) -> "nn.Sequential":
    """conv1..layer{resnet_keep} as BoQ's nn.Sequential (children 0, 1, 2, 3, 4, 5, 6[, 7])."""
    return nn.Sequential(*resnet_modules(spec).values())


class TorchvisionResNet(nn.Module):
    """Full torchvision layout (conv1..layer4, avgpool, fc 1000): only used for its key layout."""

    def __init__(self, spec: Backbone, num_classes: int = 1000) -> None:
        super().__init__()
        for name, mod in resnet_modules(spec, keep=len(spec.resnet_layers)).items():
            self.add_module(name, mod)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        width = spec.resnet_width * 2 ** (len(spec.resnet_layers) - 1) * _tv_resnet.Bottleneck.expansion
        self.fc = nn.Linear(width, num_classes)
