"""Distillation losses: zero at the teacher, gradients where they should be, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_edge.distill.losses import LossConfig, distill_losses, vlad_with_assignments
from vpr_edge.models.student import build_head
from vpr_edge.errors import ConfigError

K, D, N, B = 4, 16, 30, 5


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _setup(pca=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(K, D, generator=g) * 0.4
    noise = 0.3 * torch.randn(B, N, D, generator=g)
    feats = torch.nn.functional.normalize(centers[torch.randint(0, K, (B, N), generator=g)] + noise, dim=-1)
    kw = {}
    if pca:
        proj = np.random.default_rng(seed).standard_normal((8, K * D)).astype(np.float32)
        kw = {"pca_mean": np.zeros(K * D, np.float32), "pca_proj": proj}
    head = build_head("vlad", centers=centers.numpy(), **kw)
    with torch.no_grad():
        desc = head(feats)
        assign = head.pool.assign(feats)
    return head, feats, desc, assign


def test_vlad_with_own_assignments_is_hard_vlad():
    head, f, _, a = _setup()
    torch.testing.assert_close(vlad_with_assignments(f, a, head.pool), head.pool(f), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pca", [False, True])
def test_every_loss_is_zero_at_the_teacher(pca):
    head, f, d, a = _setup(pca=pca)
    cfg = LossConfig(patch=1, vlad=1, descriptor=1, relational=1, assignment=0)
    total, parts = distill_losses(cfg, head, f, f.half(), d, a)
    assert set(parts) == {"patch", "vlad", "descriptor", "relational"}
    for name, v in parts.items():
        assert abs(float(v)) < 2e-3, name  # FP16 teacher features, as the cache stores them
    mse = distill_losses(LossConfig(patch_kind="mse", vlad=0, descriptor=0, relational=0, assignment=0), head, f, f, d, a)[1]
    assert float(mse["patch"]) < 1e-10


def test_losses_grow_away_from_the_teacher_and_have_gradients():
    head, f, d, a = _setup()
    s = torch.nn.functional.normalize(f + 0.5 * torch.randn_like(f), dim=-1).requires_grad_(True)
    cfg = LossConfig(assignment=0.1)  # every loss but ranking (its own tests below)
    total, parts = distill_losses(cfg, head, s, f, d, a)
    assert all(float(v.detach()) > 1e-3 for v in parts.values()), parts
    for name in parts:
        (g,) = torch.autograd.grad(parts[name], s, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    expected = sum(getattr(cfg, n) * float(v.detach()) for n, v in parts.items())
    assert abs(float(total.detach()) - expected) < 1e-5


def test_assignment_loss_prefers_the_teachers_cluster():
    head, f, d, a = _setup()
    c = torch.nn.functional.normalize(head.pool.centers, dim=-1)
    good = c[a]  # every patch exactly on its teacher centre
    bad = c[(a + 1) % K]
    cfg = LossConfig(patch=0, vlad=0, descriptor=0, relational=0, assignment=1)
    lg = float(distill_losses(cfg, head, good, f, d, a)[1]["assignment"])
    lb = float(distill_losses(cfg, head, bad, f, d, a)[1]["assignment"])
    assert lg < 0.1 < lb


def test_relational_is_over_the_batch_against_teacher_descriptors():
    head, f, d, a = _setup()
    cfg = LossConfig(patch=0, vlad=0, descriptor=0, relational=1, assignment=0)
    shuffled = f[torch.tensor([1, 0, 2, 3, 4])]  # two students swapped: their rankings are wrong
    assert float(distill_losses(cfg, head, shuffled, f, d, a)[1]["relational"]) > 0.1


def test_refusals():
    with pytest.raises(ConfigError, match="all loss weights are 0"):
        LossConfig(patch=0, vlad=0, descriptor=0, relational=0, assignment=0)
    with pytest.raises(ConfigError, match="patch_kind"):
        LossConfig(patch_kind="l1")
    with pytest.raises(ConfigError, match=r"run.json: losses vlad, assignment need a VLAD teacher .* losses.vlad = 0"):
        LossConfig(assignment=0.1).check_head("gem", where="run.json")
    with pytest.raises(ConfigError, match=r"losses vlad need a VLAD teacher"):
        LossConfig().check_head("gem")
    LossConfig(vlad=0, assignment=0).check_head("gem")


def _bank(head, f, images):
    from vpr_edge.distill.losses import RankingBank, l2

    with torch.no_grad():
        return RankingBank(l2(head(f)), torch.as_tensor(images))


def test_ranking_is_zero_at_the_teacher_and_ignores_the_items_own_image():
    head, f, d, a = _setup()
    cfg = LossConfig(patch=0, vlad=0, descriptor=0, relational=0, assignment=0, ranking=1, ranking_neighbours=3)
    images = torch.tensor([10, 11, 12, 13, 14])
    bank = _bank(head, f, [10, 11, 12, 13, 14])
    assert float(distill_losses(cfg, head, f, f, d, a, bank=bank, images=images)[1]["ranking"]) < 1e-6
    # a student that is the teacher except for item 0: its own bank entry (same image) must not count
    s = f.clone()
    s[0] = torch.nn.functional.normalize(f[0] + 0.8 * torch.randn_like(f[0]), dim=-1)
    with_own = float(distill_losses(cfg, head, s, f, d, a, bank=bank, images=images)[1]["ranking"])
    other = _bank(head, f, [10, 11, 12, 13, 14])
    without = _without(other, 10)
    alone = float(distill_losses(cfg, head, s, f, d, a, bank=without, images=images)[1]["ranking"])
    assert with_own == pytest.approx(alone, abs=1e-6)


def _without(bank, image):
    from vpr_edge.distill.losses import RankingBank

    keep = bank.images != image
    return RankingBank(bank.descriptors[keep], bank.images[keep])


def test_ranking_penalises_a_wrong_order_of_neighbours_and_has_gradients():
    head, f, d, a = _setup()
    cfg = LossConfig(patch=0, vlad=0, descriptor=0, relational=0, assignment=0, ranking=1, ranking_neighbours=4,
                     ranking_temperature=0.01)
    bank = _bank(head, f, [0, 1, 2, 3, 4])
    images = torch.tensor([5, 6, 7, 8, 9])  # items of other images: every bank entry is a neighbour
    s = f[torch.tensor([1, 0, 3, 2, 4])].clone().requires_grad_(True)  # students ranking like other items
    loss = distill_losses(cfg, head, s, f, d, a, bank=bank, images=images)[1]["ranking"]
    assert float(loss.detach()) > 0.1 * cfg.ranking_temperature  # the loss is T x KL
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_ranking_refusals():
    head, f, d, a = _setup()
    cfg = LossConfig(patch=0, vlad=0, descriptor=0, relational=0, assignment=0, ranking=1)
    with pytest.raises(ConfigError, match="needs a bank"):
        distill_losses(cfg, head, f, f, d, a)
    tiny = _bank(head, f[:2], [0, 1])
    with pytest.raises(ConfigError, match="too few"):
        distill_losses(cfg, head, f[:2], f[:2], d[:2], a[:2], bank=tiny, images=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="ranking_neighbours"):
        LossConfig(ranking_neighbours=1)
