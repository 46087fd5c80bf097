"""Distillation losses, each switched on by a non-zero weight (the weights are part of TrainConfig).

Notation: s = student features [B, N, D] (per-patch L2), t = teacher features (FP16 in the cache,
re-normalised in FP32), a = the teacher's hard VLAD cluster per patch [B, N], d_t = the teacher's
descriptor [B, dim] (after its PCA if any), head = the teacher's frozen aggregator.

- patch       'cosine': mean over patches of 1 - cos(s, t); 'mse': mean over patches of ||s - t||^2.
              On unit vectors ||s - t||^2 = 2 (1 - cos): the two differ by a factor of 2 only;
              'mse' is kept for teachers whose features are not normalised.
- vlad        1 - cos(head_a(s), d_t), where head_a is the teacher's VLAD computed with the
              *teacher's* hard assignments a (one-hot(a)^T s - counts C, intra-L2, L2, then the
              teacher's PCA): differentiable in s everywhere, and equal to the teacher's descriptor
              exactly when s = t. The descriptor-level loss that does not depend on the student's argmax.
- descriptor  1 - cos(head(s), d_t): the student's own descriptor, with its own hard assignments, as
              it is computed at inference. The strong baseline of asymmetric retrieval (student
              queries against a teacher-built map); gradients flow through the residual sums.
- relational  Rows: each student descriptor against the batch of teacher descriptors (the map the
              robot queries), softmax(head(s) d_t^T / T); target: softmax(d_t d_t^T / T) (teacher
              vs teacher); KL(target || student), mean over rows. Rankings of the map by a student
              query then follow the teacher's. Computed over the micro-batch (see TrainConfig).
- assignment  Cross-entropy of logits cos(s, c_k) / T (c_k the normalised centres) against the
              teacher's cluster a: hard VLAD at inference puts student tokens in the teacher's clusters.
- ranking     Each student descriptor against a bank of teacher descriptors of *other* training images
              (a map of the training set, held in memory; see data.ranking_bank), on the teacher's k
              nearest bank entries: T x KL(softmax(d_t b^T / T) || softmax(head(s) b^T / T)). `relational`'s
              target is dominated by the item's own teacher descriptor (similarity 1 against near-ties),
              so it teaches "find yourself"; this one ranks the neighbours, which is what top-1 agreement
              against a teacher-built map asks (the query's own image is not in that map). The factor T
              keeps its gradient (that of the KL is 1/T times a difference of bank vectors) on the scale of
              the cosine losses: unscaled at T = 0.01 it took the whole clipped gradient and training
              stalled (benchmarks/results/distill_ranking, run-ranking-unscaled: held-out cos 0.08).

`vlad` and `assignment` need a VLAD teacher (assignments in the cache); a GeM teacher refuses them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import

torch = lazy_import("torch")
F = torch.nn.functional

NAMES = ("patch", "vlad", "descriptor", "relational", "assignment", "ranking")


@dataclass(frozen=True)
class LossConfig:
    patch: float = 1.0
    patch_kind: str = "cosine"  # 'cosine' | 'mse'
    vlad: float = 1.0
    descriptor: float = 1.0
    relational: float = 0.1
    relational_temperature: float = 0.05
    # off by default: switched on at 0.1 it lowered held-out assignment agreement itself and cosine in three
    # seeds of the ablation (README "What each loss contributes"; benchmarks/results/distill_ranking)
    assignment: float = 0.0
    assignment_temperature: float = 0.05
    ranking: float = 0.0  # off by default: benchmarks/results/distill_ranking measured what it does
    ranking_temperature: float = 0.01  # the teacher's top-1 margins are ~0.01-0.03 in cosine
    ranking_neighbours: int = 16  # the teacher's k nearest bank entries the ranking is taken over
    ranking_bank: int = 4096  # at most this many training images (view 0) in the bank

    def __post_init__(self) -> None:
        if self.patch_kind not in ("cosine", "mse"):
            raise ConfigError(f"patch_kind must be 'cosine' or 'mse', got {self.patch_kind!r}")
        for n in NAMES:
            if getattr(self, n) < 0:
                raise ConfigError(f"loss weight {n} must be >= 0, got {getattr(self, n)}")
        if not any(getattr(self, n) for n in NAMES):
            raise ConfigError(f"all loss weights are 0; switch on at least one of {', '.join(NAMES)}")
        if min(self.relational_temperature, self.assignment_temperature, self.ranking_temperature) <= 0:
            raise ConfigError("loss temperatures must be > 0")
        if self.ranking_neighbours < 2 or self.ranking_bank < 2:
            raise ConfigError("ranking_neighbours and ranking_bank must be >= 2")

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(n for n in NAMES if getattr(self, n) > 0)

    def check_head(self, head_kind: str, where: str = "") -> None:
        """Refuse losses that need hard assignments when the teacher has none."""
        if head_kind == "vlad":
            return
        bad = [n for n in ("vlad", "assignment") if getattr(self, n) > 0]
        if bad:
            at = f"{where}: " if where else ""
            raise ConfigError(
                f"{at}losses {', '.join(bad)} need a VLAD teacher (hard assignments), this teacher uses {head_kind}; "
                f"set {' and '.join(f'losses.{n} = 0' for n in bad)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def l2(x: torch.Tensor) -> torch.Tensor:
    from vpr_edge.models.vlad import l2_normalize

    return l2_normalize(x)


def vlad_with_assignments(features: torch.Tensor, assign: torch.Tensor, pool) -> torch.Tensor:
    """The HardVLAD descriptor of `features` with the given hard assignments instead of its own argmax.

    Same arithmetic as models.vlad.HardVLAD.residual_sums/forward (one-hot^T X - counts C, intra-L2,
    L2); a test checks it equals HardVLAD(features) when `assign` is HardVLAD.assign(features)."""
    x = l2(features)
    a = pool.one_hot(assign)  # [B, N, K]
    counts = a.sum(dim=1).unsqueeze(-1)
    r = a.transpose(1, 2) @ x - counts * pool.centers
    return l2(l2(r).flatten(1))


def _cos_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1.0 - (l2(a) * l2(b)).sum(-1)).mean()


def distill_losses(
    config: LossConfig,
    head,
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    teacher_descriptors: torch.Tensor,
    teacher_assign: torch.Tensor | None = None,
    student_descriptors: torch.Tensor | None = None,
    bank: RankingBank | None = None,
    images: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total, {name: unweighted loss}) for the active losses; all in FP32.

    `bank` and `images` (the cache image index of each item) are needed by the ranking loss only."""
    s = student_features.float()
    t = l2(teacher_features.float())
    dt = teacher_descriptors.float()
    pool, pca = getattr(head, "pool", head), getattr(head, "pca", None)
    parts: dict[str, torch.Tensor] = {}
    if config.patch:
        if config.patch_kind == "cosine":
            parts["patch"] = _cos_loss(s, t)
        else:
            parts["patch"] = ((s - t) ** 2).sum(-1).mean()
    need_assign = config.vlad or config.assignment
    if need_assign and teacher_assign is None:
        raise ConfigError("losses vlad/assignment need the teacher's hard assignments (a VLAD teacher cache)")
    if config.vlad:
        v = vlad_with_assignments(s, teacher_assign.long(), pool)
        if pca is not None:
            v = pca(v)
        parts["vlad"] = _cos_loss(v, dt)
    if config.descriptor or config.relational or config.ranking:
        ds = student_descriptors.float() if student_descriptors is not None else head(s)
        if config.descriptor:
            parts["descriptor"] = _cos_loss(ds, dt)
        if config.relational:
            tau = config.relational_temperature
            dtn = l2(dt)
            target = F.softmax(dtn @ dtn.T / tau, dim=-1)
            logp = F.log_softmax(l2(ds) @ dtn.T / tau, dim=-1)
            parts["relational"] = F.kl_div(logp, target, reduction="batchmean")
    if config.assignment:
        c = l2(pool.centers.float())
        logits = (s @ c.T) / config.assignment_temperature  # [B, N, K]
        parts["assignment"] = F.cross_entropy(logits.flatten(0, 1), teacher_assign.long().flatten())
    if config.ranking:
        if bank is None or images is None:
            raise ConfigError("the ranking loss needs a bank of teacher descriptors and the items' image indices")
        parts["ranking"] = ranking_loss(l2(ds), l2(dt), images, bank, config.ranking_neighbours,
                                        config.ranking_temperature)
    total = sum(getattr(config, n) * v for n, v in parts.items())
    return total, parts


@dataclass(frozen=True)
class RankingBank:
    """Teacher descriptors (L2-normalised, [M, dim]) and the cache image index of each ([M])."""

    descriptors: torch.Tensor
    images: torch.Tensor


def ranking_loss(ds: torch.Tensor, dt: torch.Tensor, images: torch.Tensor, bank: RankingBank, k: int,
                 temperature: float) -> torch.Tensor:
    """temperature x KL(teacher || student) of the rankings of the teacher's k nearest bank entries (own image
    excluded).

    ds, dt: L2-normalised student and teacher descriptors of the same items [B, dim]."""
    b = bank.descriptors.to(ds.device)
    own = images.to(b.device).view(-1, 1) == bank.images.view(1, -1)  # [B, M]
    st = (dt @ b.T).masked_fill(own, -math.inf)
    k = min(k, b.shape[0] - int(own.sum(1).max()))
    if k < 2:
        raise ConfigError(f"the ranking bank holds {b.shape[0]} descriptors: too few besides each item's own image")
    near = st.topk(k, dim=1).indices  # the teacher's neighbours of each item
    target = F.softmax(st.gather(1, near) / temperature, dim=-1)
    logp = F.log_softmax((ds @ b.T).gather(1, near) / temperature, dim=-1)
    return temperature * F.kl_div(logp, target, reduction="batchmean")
