"""TrainConfig: every knob that decides a distillation run's result (runtime choices such as the
device, workers or progress bars are arguments of `train`, not part of the config)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpr_edge.distill.losses import LossConfig
from vpr_edge.models.student import StudentConfig
from vpr_edge.errors import ConfigError

AMP = ("off", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    steps: int = 10_000  # optimizer steps
    batch_size: int = 64  # global batch: items (views) per optimizer step, whatever the world size
    micro_batch_size: int = 16  # items per forward; accumulation = batch_size / (micro_batch_size * world)
    lr: float = 5e-4  # peak learning rate (projection head; the ViT gets lr * backbone_lr_scale)
    backbone_lr_scale: float = 1.0  # e.g. 0.1 for a pretrained student
    weight_decay: float = 0.04  # AdamW, not on biases / norms / position embedding / tokens
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500  # linear warm-up from lr / warmup_steps to lr
    min_lr_ratio: float = 0.01  # cosine decay to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global gradient norm; 0: off
    amp: str = "off"  # 'off' | 'bf16' (CPU or CUDA autocast) | 'fp16' (CUDA, with a GradScaler)
    ema_decay: float = 0.999  # EMA of the student weights (the distilled model); 0: off
    heldout_fraction: float = 0.1  # the last images of the cache (in its order) are held out
    eval_every: int = 500  # steps between held-out evaluations (and at the end); 0: only at the end
    eval_limit: int = 256  # at most this many images per evaluation split
    checkpoint_every: int = 500  # steps between checkpoints (and at the end); 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.student, dict):
            object.__setattr__(self, "student", StudentConfig.from_dict(self.student))
        if isinstance(self.losses, dict):
            names = {f.name for f in dataclasses.fields(LossConfig)}
            unknown = sorted(set(self.losses) - names)
            if unknown:
                raise ConfigError(f"unknown loss fields {unknown}; expected some of {sorted(names)}")
            object.__setattr__(self, "losses", LossConfig(**self.losses))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1, "batch_size and micro_batch_size must be >= 1"),
            (self.batch_size % self.micro_batch_size == 0,
             f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}"),
            (self.lr > 0 and self.backbone_lr_scale >= 0, "lr must be > 0 and backbone_lr_scale >= 0"),
            (self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1,
             "warmup_steps must be >= 0 and min_lr_ratio in 0..1"),
            (self.amp in AMP, f"amp must be one of {AMP}, got {self.amp!r}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (0 <= self.heldout_fraction < 1, f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}"),
            (min(self.eval_every, self.checkpoint_every, self.grad_clip, self.weight_decay) >= 0,
             "eval_every, checkpoint_every, grad_clip, weight_decay must be >= 0"),
            (self.keep_checkpoints >= 1 and self.eval_limit >= 1, "keep_checkpoints and eval_limit must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"train config: {msg}")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per rank per step; the global batch is the same for every world size."""
        per_rank = self.batch_size // self.micro_batch_size
        if per_rank % world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} / micro_batch_size {self.micro_batch_size} = {per_rank} micro-batches "
                f"per step do not divide over {world_size} processes; choose a batch_size that is a multiple of "
                f"micro_batch_size x {world_size}"
            )
        return per_rank // world_size

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["student"] = self.student.to_dict()
        d["losses"] = self.losses.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown fields {unknown}; expected some of {sorted(names)}")
        try:
            return cls(**d)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: train config not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable JSON train config ({exc})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of TrainConfig fields, got {type(d).__name__}")
        d = d.get("config", d)  # a run folder's config.json works too
        return cls.from_dict(d, source=str(path))


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of fields that differ between two config dicts."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    out = []
    for k in sorted(a.keys() | b.keys()):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out
