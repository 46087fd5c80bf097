"""The student: a DINOv2 ViT whose patch tokens are projected into the teacher's facet space.

    images [B,3,H,W] -> ViT blocks 0..block (official parameter names, so dinov2_vits14_pretrain.pth
    loads) -> final norm (DINOv2's `norm` when `block` is the last one, else a fresh LayerNorm) ->
    CLS/registers dropped -> token alignment to the teacher grid -> Linear to the teacher's facet
    dim -> per-patch L2  = features [B, N_teacher, D_teacher]
    features -> the teacher's own aggregator, frozen (HardVLAD with the teacher's vocabulary or
    GeM, then the teacher's PCA if any) = descriptor in the teacher's space.

`Student.backbone` / `Student.aggregator` mirror `models.build.VprModel`, so whatever consumes a
reference model's two stages consumes a student the same way.

Token alignment: the student's token map (its own grid, from its input size and patch size) is
resampled to the teacher's grid with bilinear interpolation (align_corners=False: token centres
map onto token centres, both grids tiling the same crop) *before* the projection; projection and
bilinear weights (which sum to 1) commute, so this is the same as resampling projected tokens at
a quarter of the cost for ViT-S -> ViT-G. Same patch size and input size give the same grid and no
resampling at all. align='none' refuses a grid mismatch. The student's input is the same view
through the product's preprocessing at the student's size; the bilinear map assumes both inputs
show the same region, which holds when the aspect ratios match (a cover-crop at another aspect
would crop other pixels), so sizes whose aspect differs by more than ASPECT_TOLERANCE are refused.

Everything is decided at construction (grid, alignment, head): forward has no data-dependent
control flow and exports with torch.onnx.export(dynamo=True).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from vpr_edge import presets
from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import
from vpr_edge.presets import Backbone

torch = lazy_import("torch")
nn = torch.nn
F = torch.nn.functional

ARCHS = ("vits14", "vitb14", "vitl14", "vitg14")
ALIGN = ("bilinear", "none")
ASPECT_TOLERANCE = 0.05  # relative difference of H/W between student and teacher inputs


def tiny_backbone(spec: Backbone) -> Backbone:
    """The same architecture at toy size, by the rule presets use for `@tiny` (one place decides it)."""
    base = presets.REGISTRY["anyloc-dinov2"]
    return dataclasses.replace(base, backbone=spec).tiny().backbone


@dataclass(frozen=True)
class StudentConfig:
    """What defines a student. None fields are taken from the teacher (`for_teacher`)."""

    arch: str = "vits14"  # a DINOv2 backbone: vits14 (default), vitb14, vitl14, vitg14
    tiny: bool = False  # the same architecture at toy size (tests)
    block: int = -1  # 0-based block whose output tokens are used; negative counts from the end (-1: last)
    image_size: tuple[int, int] | None = None  # student input (H, W); None: the teacher's
    teacher_dim: int | None = None  # teacher facet dim (1536 for ViT-G)
    teacher_grid: tuple[int, int] | None = None  # teacher token grid (16x16 for ViT-G/14 at 224)
    align: str = "bilinear"  # 'bilinear': resample the token map to the teacher grid; 'none': refuse a mismatch
    proj_hidden: int = 0  # 0: Linear projection; > 0: Linear-GELU-Linear with this hidden width
    # 'random' (seeded) | 'auto' (official checkpoint) | PATH (official key layout) | a distillation RUN folder
    # (its student.pt: ViT, norm and projection; fine-tuning, e.g. a map-specific student from a generic one)
    weights: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "teacher_grid"):  # JSON gives lists
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(int(x) for x in v))
        if self.arch not in ARCHS:
            raise ConfigError(f"student arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.align not in ALIGN:
            raise ConfigError(f"student align must be one of {ALIGN}, got {self.align!r}")
        depth = self.spec.depth
        if not -depth <= self.block < depth:
            raise ConfigError(f"student block must be in 0..{depth - 1} (or -{depth}..-1) for {self.arch}, got {self.block}")
        if self.proj_hidden < 0:
            raise ConfigError(f"proj_hidden must be >= 0, got {self.proj_hidden}")

    @property
    def spec(self) -> Backbone:
        spec = presets.DINOV2[self.arch]
        return tiny_backbone(spec) if self.tiny else spec

    @property
    def block_index(self) -> int:
        return self.block % self.spec.depth

    @property
    def resolved(self) -> bool:
        return None not in (self.image_size, self.teacher_dim, self.teacher_grid)

    def for_teacher(
        self, dim: int, grid: tuple[int, int], image_size: tuple[int, int], where: str = ""
    ) -> "StudentConfig":
        """Fill None fields from the teacher; refuse given values that contradict it."""
        at = f"{where}: " if where else ""
        given = {"teacher_dim": (self.teacher_dim, int(dim)), "teacher_grid": (self.teacher_grid, tuple(grid))}
        for name, (have, want) in given.items():
            if have is not None and have != want:
                raise ConfigError(f"{at}student {name} is {have}, the teacher's is {want}; drop it or set {want}")
        return dataclasses.replace(
            self,
            teacher_dim=int(dim),
            teacher_grid=tuple(int(g) for g in grid),
            image_size=self.image_size or tuple(int(s) for s in image_size),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown student config fields {unknown}; expected some of {sorted(names)}")
        return cls(**d)


def align_tokens(tokens: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """[B, sh*sw, C] token map -> [B, dh*dw, C], bilinear (align_corners=False); identity when equal."""
    if tuple(src_grid) == tuple(dst_grid):
        return tokens
    b, n, c = tokens.shape
    sh, sw = src_grid
    x = tokens.transpose(1, 2).reshape(b, c, sh, sw)
    x = F.interpolate(x, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def check_grids(
    config: StudentConfig, teacher_image_size: tuple[int, int] | None = None, where: str = ""
) -> tuple[int, int]:
    """The student's token grid; refuses a mismatch it cannot align. Returns the student grid."""
    from vpr_edge.models.vit import token_grid

    at = f"{where}: " if where else ""
    grid = token_grid(config.spec, config.image_size)
    tg = tuple(config.teacher_grid)
    if grid != tg and config.align == "none":
        raise ConfigError(
            f"{at}student grid {grid[0]}x{grid[1]} (input {config.image_size[0]}x{config.image_size[1]}, patch "
            f"{config.spec.patch_size}) differs from the teacher grid {tg[0]}x{tg[1]} and align is 'none'; "
            f"set align='bilinear' or an input size that gives the teacher's grid"
        )
    if teacher_image_size is not None:
        sh, sw = config.image_size
        th, tw = teacher_image_size
        if abs((sh / sw) / (th / tw) - 1.0) > ASPECT_TOLERANCE:
            raise ConfigError(
                f"{at}student input {sh}x{sw} has another aspect ratio than the teacher's {th}x{tw}: the product's "
                f"cover-crop would show the student other pixels than the teacher's tokens describe; "
                f"choose a student size with the teacher's aspect ratio"
            )
    return grid


class StudentBackbone(nn.Module):
    """images -> L2-normalised features [B, N_teacher, D_teacher] (the student's 'facet')."""

    def __init__(self, config: StudentConfig, vit: nn.Module) -> None:
        super().__init__()
        if not config.resolved:
            raise ConfigError("StudentBackbone needs image_size, teacher_dim and teacher_grid; use config.for_teacher(...)")
        self.config = config
        self.vit = vit
        self.grid = check_grids(config)
        self.teacher_grid = tuple(config.teacher_grid)
        self.num_prefix_tokens = vit.num_prefix_tokens
        d = vit.embed_dim
        # DINOv2's final norm when the last block is used; otherwise a LayerNorm of our own (identity
        # init) so intermediate tokens are normalised before the projection the same way.
        self.head_norm = None if vit.norm is not None else nn.LayerNorm(d, eps=config.spec.ln_eps)
        if config.proj_hidden:
            self.proj = nn.Sequential(
                nn.Linear(d, config.proj_hidden), nn.GELU(), nn.Linear(config.proj_hidden, config.teacher_dim)
            )
        else:
            self.proj = nn.Linear(d, config.teacher_dim)
        g = torch.Generator().manual_seed(int(config.seed) * 7919 + 17)
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                    m.bias.zero_()

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens of the chosen block on the student's own grid [B, gh*gw, C]."""
        t = self.vit(images)  # applies vit.norm when it holds the last block
        t = t[:, self.num_prefix_tokens :]
        return self.head_norm(t) if self.head_norm is not None else t

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        t = align_tokens(self.tokens(images), self.grid, self.teacher_grid)
        return F.normalize(self.proj(t), p=2, dim=-1)


class Student(nn.Module):
    """StudentBackbone + the teacher's frozen aggregator; forward(images) -> descriptor."""

    def __init__(self, backbone: StudentBackbone, aggregator: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator
        for p in self.aggregator.parameters():
            p.requires_grad_(False)

    @property
    def config(self) -> StudentConfig:
        return self.backbone.config

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.backbone(images))

    def trainable_parameters(self):
        return [p for p in self.backbone.parameters() if p.requires_grad]


def build_head(kind: str, *, centers=None, gem_p: float = 3.0, pca_mean=None, pca_proj=None) -> nn.Module:
    """The teacher's aggregator as a frozen module: HardVLAD(centers) or GeM(p), then PCAWhiten if given."""
    from vpr_edge.models.build import DescriptorHead
    from vpr_edge.models.gem import GeM
    from vpr_edge.models.pca import PCAWhiten
    from vpr_edge.models.vlad import HardVLAD

    if kind == "vlad":
        if centers is None:
            raise ConfigError("a VLAD head needs the teacher's centres")
        pool = HardVLAD(torch.as_tensor(np.asarray(centers, dtype=np.float32)))
    elif kind == "gem":
        pool = GeM(p=gem_p)
    else:
        raise ConfigError(f"student heads are the teacher's VLAD or GeM, got aggregator {kind!r}")
    pca = None
    if (pca_mean is None) != (pca_proj is None):
        raise ConfigError("a PCA head needs both its mean and its projection")
    if pca_mean is not None:
        pca = PCAWhiten(
            torch.as_tensor(np.asarray(pca_mean, np.float32)), torch.as_tensor(np.asarray(pca_proj, np.float32))
        )
    head = DescriptorHead(pool, pca).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def build_vit(config: StudentConfig):
    """The ViT part with its initial weights ('random' seeded by name, 'auto' or an official PATH)."""
    from vpr_edge.models import weights as W

    vit = W.load_backbone(config.spec, config.weights, num_blocks=config.block_index + 1, seed=config.seed)
    vit.set_image_size(config.image_size)
    if vit.mask_token is not None:
        vit.mask_token.requires_grad_(False)  # part of the file format, never used at inference
    return vit


def build_student(config: StudentConfig, head: nn.Module) -> Student:
    """A student for a resolved config and the teacher's head (see build_head / head_from_cache)."""
    if not config.resolved:
        raise ConfigError("build_student needs a resolved StudentConfig (image_size, teacher_dim, teacher_grid)")
    pool = getattr(head, "pool", head)
    want = getattr(pool, "dim", None)
    if want is not None and want != config.teacher_dim:
        raise ConfigError(f"the teacher head works on {want}-d features, the student config says {config.teacher_dim}")
    if not names_run(config.weights):
        return Student(StudentBackbone(config, build_vit(config)), head)
    _, record = read_student_record(config.weights)
    check_run_student(config, record, config.weights)
    state = {k: v.clone() for k, v in load_student(config.weights).backbone.state_dict().items()}
    student = Student(StudentBackbone(config, build_vit(dataclasses.replace(config, weights="random"))), head)
    student.backbone.load_state_dict(state, strict=True)
    return student


# What fixes the shapes of a student's weights: a run started from another run must agree on these.
SHAPE_FIELDS = ("arch", "tiny", "block_index", "image_size", "teacher_dim", "teacher_grid", "proj_hidden")


def names_run(weights: str) -> bool:
    """True when a weights argument names a folder (a distillation run), not 'random'/'auto'/a checkpoint file."""
    from pathlib import Path

    return weights not in ("random", "auto") and Path(weights).is_dir()


def check_run_student(config: StudentConfig, record: dict, run) -> None:
    """Refuse (one line) to start `config` from the student of `run` unless its architecture, block, input and
    projection are `config`'s: only then do its weights (ViT, norm, projection) fit."""
    have = StudentConfig.from_dict(record["student"])
    diff = [f"{f} {getattr(have, f)!r} vs {getattr(config, f)!r}" for f in SHAPE_FIELDS
            if getattr(have, f) != getattr(config, f)]
    if diff:
        raise ConfigError(
            f"{run}: its student differs from the one asked for ({'; '.join(diff)}); start from a run with the same "
            "arch, block, input size and projection, or from --student-weights random|auto|PATH"
        )


# ---------------------------------------------------------------------------------------------
# A distilled student on disk: RUN/student.pt (state dict) + RUN/student.json (what it is)
# ---------------------------------------------------------------------------------------------

STUDENT_FORMAT = "vpr-edge-distilled-student"
STUDENT_FORMAT_VERSION = 1
STUDENT_PT = "student.pt"
STUDENT_JSON = "student.json"


def save_student(run_dir, model: Student, config: StudentConfig, head: dict, preprocess, *, teacher: dict,
                 extra: dict | None = None) -> None:
    """Write the student's weights and its record (config, teacher head, preprocessing, teacher space and
    identity) into `run_dir`, atomically."""
    from pathlib import Path

    from vpr_edge.atomic import atomic_file, write_json

    run_dir = Path(run_dir)
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_file(run_dir / STUDENT_PT, "wb") as fh:
        torch.save(sd, fh)
    write_json(run_dir / STUDENT_JSON, {
        "format": STUDENT_FORMAT,
        "format_version": STUDENT_FORMAT_VERSION,
        "kind": "distilled-student",
        "student": config.to_dict(),
        "head": head,
        "preprocess": dataclasses.asdict(preprocess),
        "teacher": teacher,
        **(extra or {}),
    })


def read_student_record(path) -> tuple[Any, dict]:
    """(path of student.json, its record) for a run folder or the file itself; one-line errors."""
    import json
    from pathlib import Path

    from vpr_edge.errors import ArtifactError

    path = Path(path)
    meta_path = path / STUDENT_JSON if path.is_dir() else path
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{meta_path} not found; a finished distillation run folder holds it "
                            "(train one with `vpr-edge distill train`)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{meta_path} is not readable JSON ({exc}); re-run the training or re-copy the run") from None
    if not isinstance(meta, dict) or meta.get("format") != STUDENT_FORMAT or meta.get("format_version") != STUDENT_FORMAT_VERSION:
        raise ArtifactError(f"{meta_path} is not a distilled-student record of format version {STUDENT_FORMAT_VERSION}")
    return meta_path, meta


def load_student(path, device: str = "cpu") -> Student:
    """The distilled student of a run folder (or its student.json) in eval mode."""
    from vpr_edge.errors import ArtifactError

    meta_path, meta = read_student_record(path)
    scfg = dataclasses.replace(StudentConfig.from_dict(meta["student"]), weights="random")
    head = meta["head"]
    d = int(meta["teacher"]["feature_dim"])
    centers = np.ones((head["clusters"], d), np.float32) if head["kind"] == "vlad" else None  # replaced by the file
    pca = head.get("pca")
    mean, proj = (np.zeros(pca[0], np.float32), np.ones((pca[1], pca[0]), np.float32)) if pca else (None, None)
    student = build_student(scfg, build_head(head["kind"], centers=centers, gem_p=head.get("gem_p", 3.0),
                                             pca_mean=mean, pca_proj=proj))
    weights = meta_path.parent / STUDENT_PT
    try:
        sd = torch.load(str(weights), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{weights} not found next to {meta_path}") from None
    except Exception as exc:  # pickle / zip / runtime errors of a damaged file
        from vpr_edge.models.weights import torch_load_refusal

        raise ArtifactError(torch_load_refusal(weights, exc, "the student's state dict")) from None
    try:
        student.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise ArtifactError(f"{weights} does not fit the student {meta_path} describes ({first}); re-run the training") from None
    return student.to(device).eval()


def student_preset(path) -> "presets.Preset":
    """The preset-like config of a distilled student: its own backbone and input, the teacher's head, a facet
    that says 'token features of block B, projected to the teacher's width'. What export, the runtime and
    manifests take like any preset; its descriptor space is the teacher's (`student_reference`)."""
    from pathlib import Path

    meta_path, meta = read_student_record(path)
    scfg = StudentConfig.from_dict(meta["student"])
    space = meta["teacher"]["space"]
    agg = dict(space["aggregator"])
    agg["weights"] = None
    pre = dict(meta["preprocess"])
    for k in ("image_size", "mean", "std"):
        pre[k] = tuple(pre[k])
    run = Path(meta_path).parent
    return presets.Preset(
        name=f"student-{scfg.arch}{'@tiny' if scfg.tiny else ''}:{run.name}",
        method="student",
        summary=f"DINOv2 {scfg.arch} distilled into the descriptor space of {space.get('preset')} ({run})",
        backbone=dataclasses.replace(scfg.spec, weights=None),
        facet=presets.Facet(layer=scfg.block_index, facet="token", proj_dim=int(meta["teacher"]["feature_dim"])),
        aggregator=presets.Aggregator(**agg),
        preprocess=presets.Preprocess(**pre),
        notes=f"teacher {space.get('preset')}",
    )


def student_reference(path):
    """A `models.reference.Reference` for a distilled student: the trained model, its weights id (sha256 of
    student.pt), the teacher's vocabulary/PCA (from the student's own frozen head) and, declared, the
    teacher's descriptor space."""
    from vpr_edge.fitted import PCAWhitening, Vocabulary
    from vpr_edge.integrity import file_sha256
    from vpr_edge.models.build import VprModel
    from vpr_edge.models.reference import Reference
    from vpr_edge.space import DescriptorSpace, file_weights_id

    meta_path, meta = read_student_record(path)
    preset = student_preset(meta_path)
    student = load_student(meta_path)
    pool, pca = getattr(student.aggregator, "pool", student.aggregator), getattr(student.aggregator, "pca", None)
    vocab = None
    if hasattr(pool, "centers"):
        vocab = Vocabulary(pool.centers.detach().numpy().copy(), {"source": "the teacher's, from the student's head"})
    pw = None
    if pca is not None:
        pw = PCAWhitening(pca.mean.detach().numpy().copy(), pca.proj.detach().numpy().copy(),
                          {"source": "the teacher's, from the student's head"})
    ref = Reference(VprModel(preset, student.backbone, student.aggregator).eval(), preset, str(meta_path.parent),
                    file_weights_id(file_sha256(meta_path.parent / STUDENT_PT)), 0, vocab, pw)
    ref.declared_space = DescriptorSpace.from_dict(meta["teacher"]["space"], str(meta_path))
    return ref
