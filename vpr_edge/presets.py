"""The single registry: a preset name maps to a frozen config holding everything that defines it.

Pure Python on purpose (no torch): the lean runtime, `vpr-edge presets` and manifests read it.
`Preset.tiny()` gives the same architecture at toy width/depth for tests, so every preset is
covered by tests that parametrize over the registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from vpr_edge.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FACETS = ("query", "key", "value", "token")
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{file}"
_BOQ_URL = "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/{file}"


@dataclass(frozen=True)
class Weights:
    """Where the official checkpoint lives and what it is called in the torch hub cache."""

    url: str
    file: str
    layout: str  # 'dinov2' | 'dino' | 'boq-resnet50' | 'boq-dinov2' | 'torchvision-resnet50'


@dataclass(frozen=True)
class Backbone:
    family: str  # 'dinov2' | 'dino' | 'resnet'
    arch: str  # 'vitg14', 'vits8', 'resnet50', ... (display / file naming)
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    patch_size: int = 14
    stride: int = 0  # patch-embedding stride; 0 means = patch_size. AnyLoc's DINO v1 path uses 4.
    mlp: str = "mlp"  # 'mlp' (GELU fc1/fc2) | 'swiglu' (packed w12/w3, ViT-G)
    mlp_ratio: float = 4.0
    layerscale: bool = True
    registers: int = 0
    pos_grid: int = 37  # grid of the trained position embedding (518/14 = 37, DINO v1 224/8 = 28)
    pos_offset: float = 0.1  # DINOv2/DINO interpolate with scale (n + offset) / M, not to a size
    # dinov2's *_reg hub models interpolate to a size (offset 0) with antialias=True instead
    pos_antialias: bool = False
    ln_eps: float = 1e-6
    # ResNet trunks
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: int = 64
    resnet_keep: int = 3  # conv1..layer3 (1024 channels, stride 16)
    weights: Weights | None = None

    @property
    def effective_stride(self) -> int:
        return self.stride or self.patch_size

    @property
    def out_channels(self) -> int:
        if self.family == "resnet":
            return self.resnet_width * 4 * 2 ** (self.resnet_keep - 1)
        return self.embed_dim


@dataclass(frozen=True)
class Facet:
    """Which intermediate feature of a ViT is used, and how it is laid out."""

    layer: int  # 0-based block index
    facet: str  # 'query' | 'key' | 'value' | 'token'
    layout: str = "head_major"  # DINOv2 path slices qkv; AnyLoc's DINO v1 path is 'dim_major'
    l2: bool = True  # per-patch L2 normalisation
    proj_dim: int = 0  # features projected to this width (a distilled student's learned projection); 0: none


@dataclass(frozen=True)
class Aggregator:
    kind: str  # 'vlad' | 'gem' | 'boq'
    clusters: int = 0  # VLAD
    gem_p: float = 3.0
    pca_dim: int = 0  # 0: no PCA-whitening
    # BoQ head
    proj_channels: int = 0
    num_queries: int = 64
    num_layers: int = 2
    row_dim: int = 32
    weights: Weights | None = None  # BoQ: the release checkpoint holds backbone + head


@dataclass(frozen=True)
class HeadKind:
    """A kind of descriptor head as the registry knows it, without torch: its descriptor size, its toy
    size, what it needs fitted, and where its PyTorch module is built.

    Adding a head family (say SALAD or MegaLoc) is a model file that defines
    `build_head(preset, *, vocabulary, pca, state_dict, seed, origin) -> nn.Module` plus one
    `register_head(HeadKind(...))` and its presets here: nothing else learns about it.
    """

    name: str
    module: str  # the models module holding `build_head` (imported by models.build when needed)
    dim: Callable[[Aggregator, int], int]  # descriptor size before PCA, given the backbone's feature dim
    tiny: Callable[[Aggregator], Aggregator]  # the same head at toy size (what the tests run)
    label: Callable[[Aggregator], str] = lambda a: a.kind
    vocabulary: bool = False  # needs VLAD centres (a fitted vocabulary file)
    runtime: bool = False  # the lean runtime aggregates it in numpy (backbone-scope artifacts)
    per_patch: bool = True  # consumes [B, N, D] per-patch features (a facet); False: [B, C, h, w] maps
    release: bool = False  # its weights ship with the backbone's in one release checkpoint (BoQ)


HEADS: dict[str, HeadKind] = {}


def register_head(kind: HeadKind) -> HeadKind:
    if kind.name in HEADS:
        raise ConfigError(f"head kind {kind.name} registered twice")
    HEADS[kind.name] = kind
    return kind


def head(preset_or_aggregator: "Preset | Aggregator") -> HeadKind:
    a = preset_or_aggregator.aggregator if isinstance(preset_or_aggregator, Preset) else preset_or_aggregator
    if a.kind not in HEADS:
        raise ConfigError(f"unknown aggregator {a.kind!r}; registered heads: {', '.join(HEADS)}")
    return HEADS[a.kind]


register_head(HeadKind(
    name="vlad", module="vpr_edge.models.vlad", dim=lambda a, d: a.clusters * d,
    tiny=lambda a: dataclasses.replace(a, clusters=8 if a.clusters >= 64 else 4, pca_dim=8 if a.pca_dim else 0, weights=None),
    label=lambda a: f"vlad{a.clusters}", vocabulary=True, runtime=True,
))
register_head(HeadKind(
    name="gem", module="vpr_edge.models.gem", dim=lambda a, d: d,
    tiny=lambda a: dataclasses.replace(a, pca_dim=8 if a.pca_dim else 0, weights=None), runtime=True,
))
register_head(HeadKind(
    name="boq", module="vpr_edge.models.boq", dim=lambda a, d: a.proj_channels * a.row_dim,
    tiny=lambda a: dataclasses.replace(a, proj_channels=32, num_queries=8, row_dim=4, weights=None), per_patch=False,
    release=True,
))


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network input (ImageNet mean/std, fixed size, bicubic)."""

    image_size: tuple[int, int]  # (H, W)
    resize: str = "cover_crop"  # 'cover_crop': keep aspect, cover, centre crop | 'stretch': resize to (H, W)
    interpolation: str = "bicubic"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Preset:
    name: str
    method: str  # 'anyloc' | 'boq' | 'student' (models.student.student_preset; not in the registry)
    summary: str
    backbone: Backbone
    aggregator: Aggregator
    preprocess: Preprocess
    facet: Facet | None = None  # None for BoQ (uses the backbone output)
    notes: str = ""
    tiny_of: str = ""  # set on tiny variants: the preset they shrink

    # -- derived ----------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        if self.facet is not None and self.facet.proj_dim:
            return self.facet.proj_dim
        return self.backbone.out_channels

    @property
    def descriptor_dim(self) -> int:
        a = self.aggregator
        return a.pca_dim or head(a).dim(a, self.feature_dim)

    def grid(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Spatial grid of output features for an input of `image_size` (H, W)."""
        h, w = image_size or self.preprocess.image_size
        b = self.backbone
        if b.family == "resnet":
            s = 2 ** (b.resnet_keep + 1)  # conv1+maxpool (4) then x2 per stage after the first
            return (-(-h // s), -(-w // s))
        st, p = b.effective_stride, b.patch_size
        return (1 + (h - p) // st, 1 + (w - p) // st)

    @property
    def weights(self) -> Weights | None:
        return self.aggregator.weights or self.backbone.weights

    @property
    def layer_label(self) -> str:
        if self.facet is None:
            return "all blocks" if self.backbone.family != "resnet" else f"layer{self.backbone.resnet_keep}"
        return str(self.facet.layer)

    def with_overrides(
        self,
        *,
        image_size: tuple[int, int] | None = None,
        layer: int | None = None,
        facet: str | None = None,
        clusters: int | None = None,
        pca_dim: int | None = None,
    ) -> "Preset":
        """A new frozen preset with user overrides applied and validated."""
        p = self
        if image_size is not None:
            p = dataclasses.replace(p, preprocess=dataclasses.replace(p.preprocess, image_size=tuple(image_size)))
        if layer is not None or facet is not None:
            if p.facet is None:
                raise ConfigError(f"preset {p.name} has no facet/layer knob (BoQ uses the whole backbone)")
            p = dataclasses.replace(
                p,
                facet=dataclasses.replace(
                    p.facet,
                    layer=p.facet.layer if layer is None else layer,
                    facet=p.facet.facet if facet is None else facet,
                ),
            )
        if clusters is not None:
            if p.aggregator.kind != "vlad":
                raise ConfigError(f"--clusters applies to VLAD presets; {p.name} uses {p.aggregator.kind}")
            p = dataclasses.replace(p, aggregator=dataclasses.replace(p.aggregator, clusters=clusters))
        if pca_dim is not None:
            p = dataclasses.replace(p, aggregator=dataclasses.replace(p.aggregator, pca_dim=pca_dim))
        validate(p)
        return p

    def without_pca(self) -> "Preset":
        """The same preset before PCA-whitening (what a PCA is fitted on)."""
        return dataclasses.replace(self, aggregator=dataclasses.replace(self.aggregator, pca_dim=0))

    def tiny(self) -> "Preset":
        """Same architecture (SwiGLU, registers, stride, facet layout, head type) at toy size."""
        if self.tiny_of:
            return self
        b, a = self.backbone, self.aggregator
        if b.family == "resnet":
            tb = dataclasses.replace(b, resnet_layers=(1, 1, 1, 1), resnet_width=8, weights=None)
        else:
            depth = 4
            tb = dataclasses.replace(
                b,
                embed_dim=32 if b.mlp == "mlp" else 48,
                num_heads=2 if b.mlp == "mlp" else 3,
                depth=depth,
                pos_grid=6,
                weights=None,
            )
        facet = dataclasses.replace(self.facet, layer=2) if self.facet else None
        ta = head(a).tiny(a)
        if b.family == "resnet":
            size = (64, 64)
        elif b.effective_stride != b.patch_size:
            size = (48, 64)  # overlapping patches: keep the token count small
        else:
            size = (112, 154)  # Corridor's 160x120 cropped to a multiple of 14, as AnyLoc does
        pre = dataclasses.replace(self.preprocess, image_size=size)
        t = dataclasses.replace(
            self, name=f"{self.name}@tiny", backbone=tb, aggregator=ta, facet=facet, preprocess=pre, tiny_of=self.name
        )
        validate(t)
        return t

    def describe(self) -> dict[str, Any]:
        """Flat row for `vpr-edge presets` and for manifests."""
        w = self.weights
        return {
            "name": self.name,
            "method": self.method,
            "backbone": f"{self.backbone.family} {self.backbone.arch}"
            + (f" +{self.backbone.registers} reg" if self.backbone.registers else "")
            + (f" stride {self.backbone.stride}" if self.backbone.stride else ""),
            "layer": self.layer_label,
            "facet": self.facet.facet if self.facet else "-",
            "aggregator": head(self.aggregator).label(self.aggregator)
            + (f"+pca{self.aggregator.pca_dim}" if self.aggregator.pca_dim else ""),
            "input": "x".join(map(str, self.preprocess.image_size)),
            "dim": self.descriptor_dim,
            "weights": w.url if w else "random only",
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_from_dict(d: dict[str, Any]) -> Preset:
    """Inverse of Preset.to_dict (manifests store the full preset)."""

    def w(x):
        return Weights(**x) if x else None

    b = dict(d["backbone"])
    b["weights"] = w(b.get("weights"))
    b["resnet_layers"] = tuple(b.get("resnet_layers", (3, 4, 6, 3)))
    a = dict(d["aggregator"])
    a["weights"] = w(a.get("weights"))
    pre = dict(d["preprocess"])
    for k in ("image_size", "mean", "std"):
        pre[k] = tuple(pre[k])
    return Preset(
        name=d["name"],
        method=d["method"],
        summary=d.get("summary", ""),
        backbone=Backbone(**b),
        aggregator=Aggregator(**a),
        preprocess=Preprocess(**pre),
        facet=Facet(**d["facet"]) if d.get("facet") else None,
        notes=d.get("notes", ""),
        tiny_of=d.get("tiny_of", ""),
    )


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------


def _dinov2(arch: str, dim: int, depth: int, heads: int, registers: int = 0) -> Backbone:
    swiglu = arch == "vitg14"
    name = f"dinov2_{arch}" + (f"_reg{registers}" if registers else "")
    file = f"{name}_pretrain.pth"
    return Backbone(
        family="dinov2",
        arch=arch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        patch_size=14,
        mlp="swiglu" if swiglu else "mlp",
        mlp_ratio=4.0,
        layerscale=True,
        registers=registers,
        pos_grid=37,
        pos_offset=0.0 if registers else 0.1,
        pos_antialias=bool(registers),
        weights=Weights(url=_DINOV2_URL.format(name=f"dinov2_{arch}", file=file), file=file, layout="dinov2"),
    )


DINOV2 = {
    "vits14": _dinov2("vits14", 384, 12, 6),
    "vitb14": _dinov2("vitb14", 768, 12, 12),
    "vitl14": _dinov2("vitl14", 1024, 24, 16),
    "vitg14": _dinov2("vitg14", 1536, 40, 24),
}

DINO_VITS8 = Backbone(
    family="dino",
    arch="vits8",
    embed_dim=384,
    depth=12,
    num_heads=6,
    patch_size=8,
    stride=4,  # AnyLoc lowers the stride to 4: overlapping patches, ~4x the tokens
    mlp="mlp",
    layerscale=False,
    pos_grid=28,
    weights=Weights(
        url="https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        file="dino_deitsmall8_pretrain.pth",
        layout="dino",
    ),
)

RESNET50_TRUNK = Backbone(family="resnet", arch="resnet50", resnet_layers=(3, 4, 6, 3), resnet_width=64, resnet_keep=3)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

REGISTRY: dict[str, Preset] = {}


def register(p: Preset) -> Preset:
    validate(p)
    if p.name in REGISTRY:
        raise ConfigError(f"preset {p.name} registered twice")
    REGISTRY[p.name] = p
    return p


def validate(p: Preset) -> None:
    b, a, f = p.backbone, p.aggregator, p.facet
    if b.family not in ("dinov2", "dino", "resnet"):
        raise ConfigError(f"{p.name}: unknown backbone family {b.family}")
    if f is not None:
        if f.facet not in FACETS:
            raise ConfigError(f"{p.name}: facet must be one of {FACETS}, got {f.facet!r}")
        if not 0 <= f.layer < b.depth:
            raise ConfigError(f"{p.name}: layer must be in 0..{b.depth - 1} for {b.arch}, got {f.layer}")
        if f.layout not in ("head_major", "dim_major"):
            raise ConfigError(f"{p.name}: facet layout must be head_major or dim_major")
    if a.kind not in HEADS:
        raise ConfigError(f"{p.name}: unknown aggregator {a.kind}; registered heads: {', '.join(HEADS)}")
    if head(a).per_patch != (f is not None):
        raise ConfigError(
            f"{p.name}: the {a.kind} head takes {'per-patch facet features' if head(a).per_patch else 'feature maps'}, "
            f"so the preset {'needs' if head(a).per_patch else 'must not have'} a facet"
        )
    if head(a).vocabulary and a.clusters < 1:
        raise ConfigError(f"{p.name}: VLAD needs clusters >= 1")
    h, w = p.preprocess.image_size
    if b.family != "resnet" and ((h - b.patch_size) % b.effective_stride or (w - b.patch_size) % b.effective_stride):
        raise ConfigError(
            f"{p.name}: image size {h}x{w} does not tile with patch {b.patch_size} / stride {b.effective_stride}; "
            f"use a size where (size - {b.patch_size}) is a multiple of {b.effective_stride}"
        )
    if p.preprocess.resize not in ("cover_crop", "stretch"):
        raise ConfigError(f"{p.name}: resize policy must be cover_crop or stretch")


def get(name: str) -> Preset:
    base, _, variant = name.partition("@")
    if base not in REGISTRY:
        raise ConfigError(f"unknown preset {base!r}; choose one of: {', '.join(REGISTRY)}")
    p = REGISTRY[base]
    if variant == "tiny":
        return p.tiny()
    if variant:
        raise ConfigError(f"unknown preset variant @{variant!r} in {name!r}; the only variant is @tiny")
    return p


def names() -> list[str]:
    return list(REGISTRY)


_ANYLOC_PRE = Preprocess(image_size=(224, 224), resize="cover_crop")
_VALUE31 = Facet(layer=31, facet="value")

register(
    Preset(
        name="anyloc-dinov2",
        method="anyloc",
        summary="AnyLoc-VLAD-DINOv2: ViT-G/14 block 31 value facet, hard VLAD 32 clusters",
        backbone=DINOV2["vitg14"],
        facet=_VALUE31,
        aggregator=Aggregator(kind="vlad", clusters=32),
        preprocess=_ANYLOC_PRE,
    )
)
register(
    Preset(
        name="anyloc-dinov2-pca",
        method="anyloc",
        summary="AnyLoc-VLAD-DINOv2-PCA: anyloc-dinov2 PCA-whitened to 512",
        backbone=DINOV2["vitg14"],
        facet=_VALUE31,
        aggregator=Aggregator(kind="vlad", clusters=32, pca_dim=512),
        preprocess=_ANYLOC_PRE,
    )
)
register(
    Preset(
        name="anyloc-dinov2-gem",
        method="anyloc",
        summary="AnyLoc-GeM-DINOv2: ViT-G/14 block 31 value facet, GeM p=3",
        backbone=DINOV2["vitg14"],
        facet=_VALUE31,
        aggregator=Aggregator(kind="gem", gem_p=3.0),
        preprocess=_ANYLOC_PRE,
    )
)
register(
    Preset(
        name="anyloc-dinov2-reg",
        method="anyloc",
        summary="anyloc-dinov2 on ViT-G/14 with 4 register tokens (registers dropped like CLS)",
        backbone=_dinov2("vitg14", 1536, 40, 24, registers=4),
        facet=_VALUE31,
        aggregator=Aggregator(kind="vlad", clusters=32),
        preprocess=_ANYLOC_PRE,
    )
)
register(
    Preset(
        name="anyloc-dino",
        method="anyloc",
        summary="AnyLoc-VLAD-DINO: DINO ViT-S/8 stride 4, block 9 key facet (dim-major), hard VLAD 128",
        backbone=DINO_VITS8,
        facet=Facet(layer=9, facet="key", layout="dim_major"),
        aggregator=Aggregator(kind="vlad", clusters=128),
        preprocess=Preprocess(image_size=(224, 224), resize="cover_crop"),
    )
)
# Smaller DINOv2 backbones: any block and facet via --layer/--facet; defaults at ~0.8 depth
for _arch, _layer in (("vits14", 9), ("vitb14", 9), ("vitl14", 19)):
    register(
        Preset(
            name=f"anyloc-dinov2-{_arch}",
            method="anyloc",
            summary=f"AnyLoc VLAD on DINOv2 {_arch.upper()} (block {_layer} value by default; our choice, not the paper's)",
            backbone=DINOV2[_arch],
            facet=Facet(layer=_layer, facet="value"),
            aggregator=Aggregator(kind="vlad", clusters=32),
            preprocess=_ANYLOC_PRE,
        )
    )
register(
    Preset(
        name="boq-resnet50",
        method="boq",
        summary="BoQ on ResNet50 (conv1..layer3, 1024 ch, stride 16): 16384-d",
        backbone=RESNET50_TRUNK,
        aggregator=Aggregator(
            kind="boq",
            proj_channels=512,
            num_queries=64,
            num_layers=2,
            row_dim=32,
            weights=Weights(url=_BOQ_URL.format(file="resnet50_16384.pth"), file="resnet50_16384.pth", layout="boq-resnet50"),
        ),
        preprocess=Preprocess(image_size=(384, 384), resize="stretch"),
    )
)
register(
    Preset(
        name="boq-dinov2",
        method="boq",
        summary="BoQ on DINOv2 ViT-B/14 (all 12 blocks, no final norm, 23x23 tokens at 322 px): 12288-d",
        backbone=dataclasses.replace(DINOV2["vitb14"], weights=None),
        aggregator=Aggregator(
            kind="boq",
            proj_channels=384,
            num_queries=64,
            num_layers=2,
            row_dim=32,
            weights=Weights(url=_BOQ_URL.format(file="dinov2_12288.pth"), file="dinov2_12288.pth", layout="boq-dinov2"),
        ),
        preprocess=Preprocess(image_size=(322, 322), resize="stretch"),
    )
)
