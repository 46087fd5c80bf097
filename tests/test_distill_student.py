"""The student: config, token alignment, official weights, frozen teacher head, ONNX export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vpr_edge import presets
from vpr_edge.models.student import StudentConfig, align_tokens, build_head, build_student, check_grids
from vpr_edge.errors import ConfigError, WeightsError
from vpr_edge.models import weights as W

TEACHER = presets.get("anyloc-dinov2@tiny")  # ViT-G/14 shape at toy size: 48-d value facet, grid 8x11
TDIM, TGRID, TSIZE = TEACHER.feature_dim, TEACHER.grid(), TEACHER.preprocess.image_size


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _centers(k=4, d=TDIM, seed=0):
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32) * 0.3


def _student(**kw):
    cfg = StudentConfig(tiny=True, **kw).for_teacher(TDIM, TGRID, TSIZE)
    return build_student(cfg, build_head("vlad", centers=_centers()))


def test_config_defaults_resolve_and_round_trip():
    c = StudentConfig()
    assert c.arch == "vits14" and c.spec == presets.DINOV2["vits14"] and c.block_index == 11
    r = c.for_teacher(1536, (16, 16), (224, 224))
    assert r.resolved and r.image_size == (224, 224) and r.teacher_grid == (16, 16)
    assert check_grids(r, (224, 224)) == (16, 16)  # ViT-S/14 and ViT-G/14 at 224: the same grid
    assert StudentConfig.from_dict(r.to_dict()) == r
    assert StudentConfig(arch="vitb14").spec.embed_dim == 768
    with pytest.raises(ConfigError, match="teacher_dim is 1024"):
        StudentConfig(teacher_dim=1024).for_teacher(1536, (16, 16), (224, 224))
    for bad in ({"arch": "vit_tiny"}, {"align": "nearest"}, {"block": 12}, {"proj_hidden": -1}):
        with pytest.raises(ConfigError):
            StudentConfig(**bad)
    with pytest.raises(ConfigError, match="unknown student config fields"):
        StudentConfig.from_dict({"arch": "vits14", "depth": 3})


def test_same_grid_features_are_unit_and_the_descriptor_is_the_teacher_head():
    s = _student().eval()
    assert s.backbone.grid == TGRID and s.backbone.head_norm is None  # last block: DINOv2's own norm
    x = torch.randn(2, 3, *TSIZE)
    f = s.features(x)
    assert f.shape == (2, TGRID[0] * TGRID[1], TDIM)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2, f.shape[1]))
    torch.testing.assert_close(s(x), s.aggregator(f))
    assert s(x).shape == (2, 4 * TDIM)
    assert not any(p.requires_grad for p in s.aggregator.parameters())
    assert not s.backbone.vit.mask_token.requires_grad  # unused: DDP would refuse it
    mid = _student(block=1)
    assert len(mid.backbone.vit.blocks) == 2 and mid.backbone.vit.norm is None and mid.backbone.head_norm is not None


def test_other_grid_is_aligned_bilinearly_or_refused():
    s = _student(image_size=(84, 112)).eval()  # 6x8 tokens -> teacher's 8x11
    assert s.backbone.grid == (6, 8)
    assert s.features(torch.randn(1, 3, 84, 112)).shape == (1, 88, TDIM)
    cfg = StudentConfig(tiny=True, image_size=(84, 112), align="none").for_teacher(TDIM, TGRID, TSIZE)
    with pytest.raises(ConfigError, match=r"student grid 6x8 .* teacher grid 8x11 and align is 'none'"):
        build_student(cfg, build_head("gem"))
    cfg = StudentConfig(tiny=True, image_size=(112, 112)).for_teacher(TDIM, TGRID, TSIZE)
    with pytest.raises(ConfigError, match="another aspect ratio"):
        check_grids(cfg, TSIZE)


def test_align_tokens_maps_token_centres_onto_token_centres():
    sh, sw, dh, dw = 6, 8, 8, 11
    # a field linear in image coordinates, sampled at the student's token centres
    ys, xs = (np.arange(sh) + 0.5) / sh, (np.arange(sw) + 0.5) / sw
    field = torch.tensor(2 * ys[:, None] + 3 * xs[None, :], dtype=torch.float32).reshape(1, sh * sw, 1)
    out = align_tokens(field, (sh, sw), (dh, dw)).reshape(dh, dw).numpy()
    ty, tx = (np.arange(dh) + 0.5) / dh, (np.arange(dw) + 0.5) / dw
    want = 2 * ty[:, None] + 3 * tx[None, :]
    # exact wherever the teacher's centre lies between student centres (bilinear reproduces linear fields)
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(out[inner], want[inner], atol=1e-5)
    same = torch.randn(2, 48, 5)
    assert align_tokens(same, (6, 8), (6, 8)) is same


def test_official_checkpoint_loads_into_the_student(tmp_path):
    spec = StudentConfig(tiny=True).spec
    donor = W.load_backbone(spec, "random", seed=5)
    path = W.save_official(donor, tmp_path / "dinov2_vits14_pretrain.pth", "dinov2")
    s = _student(weights=str(path))
    for k, v in donor.state_dict().items():
        torch.testing.assert_close(s.backbone.vit.state_dict()[k], v, msg=k)
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.norm1.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="do not match the official 'dinov2' layout"):
        _student(weights=str(bad))


def test_pca_head_follows_the_teacher():
    mean = np.zeros(4 * TDIM, np.float32)
    proj = np.random.default_rng(0).standard_normal((8, 4 * TDIM)).astype(np.float32)
    head = build_head("vlad", centers=_centers(), pca_mean=mean, pca_proj=proj)
    cfg = StudentConfig(tiny=True).for_teacher(TDIM, TGRID, TSIZE)
    s = build_student(cfg, head).eval()
    assert s(torch.randn(1, 3, *TSIZE)).shape == (1, 8)
    with pytest.raises(ConfigError, match="48-d features"):
        build_student(dataclasses.replace(cfg, teacher_dim=32), head)


@pytest.mark.slow
def test_student_exports_with_dynamo_and_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    s = _student(image_size=(84, 112)).eval()  # with token alignment and hard VLAD
    x = torch.randn(2, 3, 84, 112)
    with torch.no_grad():
        ref = s(x).numpy()
    program = torch.onnx.export(
        s, (x,), dynamo=True, input_names=["images"], output_names=["descriptor"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False,
    )
    path = tmp_path / "student.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 84, 112)
    for inp in (x, x3):
        out = sess.run(None, {"images": inp.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, s(inp).numpy(), atol=2e-5)
    assert out.shape == (3, 4 * TDIM) and np.isfinite(ref).all()
