"""ViT / ResNet backbones and facet extraction (tiny configs on CPU, full sizes on `meta`)."""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from vpr_edge import presets  # noqa: E402
from vpr_edge.errors import ConfigError, InputError  # noqa: E402
from vpr_edge.models import weights as W  # noqa: E402
from vpr_edge.models.boq_backbones import BoQDinoV2, BoQResNet  # noqa: E402
from vpr_edge.models.facets import FacetExtractor  # noqa: E402
from vpr_edge.models.vit import VisionTransformer, interpolate_pos_embed, swiglu_hidden, token_grid  # noqa: E402

VIT_PRESETS = [n for n in presets.names() if presets.get(n).facet is not None]
BOQ_PRESETS = [n for n in presets.names() if presets.get(n).method == "boq"]


def _tiny(name: str) -> presets.Preset:
    return presets.get(f"{name}@tiny")


def _images(p: presets.Preset, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, *p.preprocess.image_size, generator=g)


def _vit(spec, seed=0, **kw) -> VisionTransformer:
    return W.init_random_(VisionTransformer(spec, **kw), seed).eval()


# ---------------------------------------------------------------------------------------------
# Every preset's tiny config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_tiny_vit_presets_build_and_extract(name):
    p = _tiny(name)
    vit = W.load_backbone(p.backbone, "random", num_blocks=p.facet.layer + 1)
    assert len(vit.blocks) == p.facet.layer + 1 and vit.norm is None
    fx = FacetExtractor(vit, p.facet, image_size=p.preprocess.image_size)
    assert fx.grid == p.grid()
    with torch.no_grad():
        f = fx(_images(p))
    gh, gw = p.grid()
    assert f.shape == (2, gh * gw, p.feature_dim)
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2, gh * gw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", BOQ_PRESETS)
def test_tiny_boq_backbones_output_maps(name):
    p = _tiny(name)
    bb = W.load_boq_backbone(p.backbone, "random", image_size=p.preprocess.image_size)
    assert isinstance(bb, BoQResNet if p.backbone.family == "resnet" else BoQDinoV2)
    with torch.no_grad():
        y = bb(_images(p))
    assert y.shape == (2, p.feature_dim, *p.grid())


def test_full_size_grids():
    assert presets.get("boq-dinov2").grid() == (23, 23)
    assert presets.get("boq-resnet50").grid() == (24, 24)
    assert presets.get("anyloc-dinov2").grid() == (16, 16)
    spec = presets.get("anyloc-dino").backbone
    assert token_grid(spec, (224, 224)) == (55, 55)
    with pytest.raises(InputError, match="does not tile"):
        token_grid(presets.get("anyloc-dinov2").backbone, (225, 224))


def test_dino_v1_stride4_has_about_4x_tokens():
    p = _tiny("anyloc-dino")
    assert p.backbone.effective_stride == 4 and p.backbone.patch_size == 8
    s8 = dataclasses.replace(p.backbone, stride=8)
    full4 = token_grid(presets.get("anyloc-dino").backbone, (224, 224))
    full8 = token_grid(dataclasses.replace(presets.get("anyloc-dino").backbone, stride=8), (224, 224))
    assert full4[0] * full4[1] == 3025 and full8[0] * full8[1] == 784
    assert 3.5 < 3025 / 784 < 4.0
    h, w = 64, 64  # tiles with both strides
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        n4 = _vit(p.backbone, num_blocks=1)(x).shape[1] - 1
        n8 = _vit(s8, num_blocks=1)(x).shape[1] - 1
    assert (n4, n8) == (15 * 15, 8 * 8)
    # overlapping patches: the conv really has kernel 8, stride 4
    conv = _vit(p.backbone, num_blocks=1).patch_embed.proj
    assert conv.kernel_size == (8, 8) and conv.stride == (4, 4)


# ---------------------------------------------------------------------------------------------
# Full-size shapes and parameter counts on `meta`
# ---------------------------------------------------------------------------------------------


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def test_vitg_parameter_counts_on_meta():
    spec = presets.get("anyloc-dinov2").backbone
    assert swiglu_hidden(1536) == 4096
    with torch.device("meta"):
        full = VisionTransformer(spec)
        cut = VisionTransformer(spec, num_blocks=32)
    assert _numel(full.parameters()) == 1_136_480_768  # incl. mask_token (1536)
    assert full.mask_token.shape == (1, 1536) and full.pos_embed.shape == (1, 1370, 1536)
    qkv = cut.blocks[31].attn.qkv
    assert qkv.weight.shape == (4608, 1536) and qkv.bias.shape == (4608,)
    mlp = cut.blocks[31].mlp
    assert mlp.fc1.weight.shape == (8192, 1536) and mlp.fc2.weight.shape == (1536, 4096)
    stem = [cut.cls_token, cut.pos_embed, cut.mask_token, *cut.patch_embed.parameters()]
    upto_qkv = (
        _numel(stem)
        + _numel(p for b in cut.blocks[:31] for p in b.parameters())
        + _numel(cut.blocks[31].norm1.parameters())
        + _numel(qkv.parameters())
    )
    assert upto_qkv == 888_533_504  # with the unused mask_token; 888_531_968 without
    fx = FacetExtractor(cut, presets.get("anyloc-dinov2").facet)
    assert _numel(fx.parameters()) == 888_531_968  # what the AnyLoc cut model holds (no mask_token)


def test_official_layout_full_sizes():
    lay = W.official_layout(presets.get("anyloc-dinov2").backbone)
    assert len(lay) == 5 + 40 * 14 + 2
    assert lay["blocks.31.mlp.w12.weight"] == (8192, 1536) and lay["blocks.31.mlp.w3.weight"] == (1536, 4096)
    assert not any(".mlp.fc" in k for k in lay)
    reg = W.official_layout(presets.get("anyloc-dinov2-reg").backbone)
    assert reg["register_tokens"] == (1, 4, 1536)
    dino = W.official_layout(presets.get("anyloc-dino").backbone)
    assert "mask_token" not in dino and not any("ls1" in k for k in dino)
    assert dino["pos_embed"] == (1, 785, 384) and dino["patch_embed.proj.weight"] == (384, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# Position embedding: dinov2's scale-factor formula, not a resize to a size
# ---------------------------------------------------------------------------------------------


def _dinov2_reference(pos_embed, H, W_, patch=14, offset=0.1):
    """Straight transcription of dinov2's interpolate_pos_encoding(x, w, h) for an H x W image.

    dinov2 unpacks `B, nc, w, h = x.shape`, so its "w" is the height (dim 2).
    """
    w, h = H, W_
    npatch = (w // patch) * (h // patch)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    dim = pos_embed.shape[-1]
    M = int(math.sqrt(N))
    w0, h0 = w // patch, h // patch
    sx, sy = float(w0 + offset) / M, float(h0 + offset) / M
    pp = F.interpolate(
        pos_embed[:, 1:].float().reshape(1, M, M, dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    assert (w0, h0) == pp.shape[-2:]
    pp = pp.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((pos_embed[:, :1].float(), pp), dim=1)


def _dino_vit_features_reference(pos_embed, H, W_, patch=8, stride=4):
    """dino-vit-features' _fix_pos_enc: grid from the stride, + 0.1, recompute_scale_factor=False."""
    w, h = H, W_
    N = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0 = 1 + (w - patch) // stride
    h0 = 1 + (h - patch) // stride
    if w0 * h0 == N and w == h:
        return pos_embed
    w0, h0 = w0 + 0.1, h0 + 0.1
    pp = F.interpolate(
        pos_embed[:, 1:].reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert int(w0) == pp.shape[-2] and int(h0) == pp.shape[-1]
    pp = pp.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((pos_embed[:, :1], pp), dim=1)


@pytest.fixture(scope="module")
def pos37():
    return torch.randn(1, 1 + 37 * 37, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("hw", [(224, 224), (322, 322), (112, 154), (154, 112), (700, 560)])
def test_pos_embed_matches_dinov2_formula(pos37, hw):
    grid = (hw[0] // 14, hw[1] // 14)
    ours = interpolate_pos_embed(pos37, grid, offset=0.1)
    torch.testing.assert_close(ours, _dinov2_reference(pos37, *hw), atol=1e-6, rtol=0)


def test_pos_embed_differs_from_timm_target_size_resampling(pos37):
    from timm.layers import resample_abs_pos_embed

    ours = interpolate_pos_embed(pos37, (16, 16), offset=0.1)
    for aa in (False, True):
        timm_way = resample_abs_pos_embed(pos37, new_size=(16, 16), num_prefix_tokens=1, antialias=aa)
        assert (ours - timm_way).abs().max() > 1e-2  # the test above would catch a size-based resize


def test_pos_embed_no_interpolation_at_native_grid(pos37):
    assert interpolate_pos_embed(pos37, (37, 37)) is pos37
    half = pos37.half()
    assert interpolate_pos_embed(half, (16, 16)).dtype == torch.float16  # resampled in fp32, cast back


@pytest.mark.parametrize("hw", [(224, 224), (48, 64), (116, 116), (64, 48)])
def test_pos_embed_matches_dino_vit_features_stride(hw):
    pe = torch.randn(1, 1 + 28 * 28, 8, generator=torch.Generator().manual_seed(4))
    spec = presets.get("anyloc-dino").backbone
    ours = interpolate_pos_embed(pe, token_grid(spec, hw), offset=spec.pos_offset)
    torch.testing.assert_close(ours, _dino_vit_features_reference(pe, *hw), atol=1e-6, rtol=0)


def test_pos_embed_register_models_resize_with_antialias(pos37):
    spec = presets.get("anyloc-dinov2-reg").backbone
    assert spec.pos_offset == 0.0 and spec.pos_antialias  # dinov2 hub *_reg settings
    ours = interpolate_pos_embed(pos37, (16, 16), offset=spec.pos_offset, antialias=spec.pos_antialias)
    ref = F.interpolate(
        pos37[:, 1:].reshape(1, 37, 37, 16).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic", antialias=True
    )
    torch.testing.assert_close(ours[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 16), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["anyloc-dinov2", "anyloc-dinov2-reg", "anyloc-dino"])
def test_prepare_tokens_order_and_position(name):
    """CLS + pos[0], then registers without position, then patches + interpolated pos (H/W order)."""
    p = _tiny(name)
    vit = _vit(p.backbone, num_blocks=1)
    x = _images(p, b=1)
    with torch.no_grad():
        t = vit.prepare_tokens(x)
        patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h, w = p.preprocess.image_size
        if p.backbone.family == "dino":
            pe = _dino_vit_features_reference(vit.pos_embed, h, w, 8, 4)
        elif p.backbone.registers:
            pe = interpolate_pos_embed(vit.pos_embed, p.grid(), 0.0, True)
        else:
            pe = _dinov2_reference(vit.pos_embed, h, w)
    r = p.backbone.registers
    assert vit.num_prefix_tokens == 1 + r
    assert t.shape[1] == 1 + r + p.grid()[0] * p.grid()[1]
    torch.testing.assert_close(t[:, 0], vit.cls_token[:, 0] + pe[:, 0], atol=1e-6, rtol=0)
    if r:
        torch.testing.assert_close(t[:, 1 : 1 + r], vit.register_tokens, atol=0, rtol=0)
    torch.testing.assert_close(t[:, 1 + r :], patches + pe[:, 1:], atol=1e-5, rtol=0)


def test_fixed_table_used_in_eval_and_on_the_fly_in_training():
    p = _tiny("anyloc-dinov2")
    vit = _vit(p.backbone, num_blocks=2)
    vit.set_image_size(p.preprocess.image_size)
    assert vit.grid == p.grid() and "pos_embed_fixed" not in vit.state_dict()
    x = _images(p, b=1)
    with torch.no_grad():
        vit.pos_embed_fixed.add_(1.0)  # poison: eval must read the cached table
        poisoned = vit(x)
        vit.eval()  # eval() recomputes the table from pos_embed
        clean = vit(x)
    assert not torch.allclose(poisoned, clean)
    vit.train()
    y = vit(x)
    y.sum().backward()
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0
    vit.eval()
    # loading new weights refreshes the table
    other = _vit(p.backbone, seed=5, num_blocks=2)
    vit.load_state_dict(other.state_dict())
    other.set_image_size(p.preprocess.image_size)
    torch.testing.assert_close(vit.pos_embed_fixed, other.pos_embed_fixed, atol=0, rtol=0)
    # a size other than the fixed one interpolates on the fly
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 84, 84)).shape[1] == 1 + 36
    # the table is a buffer: it follows dtype/device moves of a model that contains the ViT
    fx = FacetExtractor(vit, dataclasses.replace(p.facet, layer=1), image_size=p.preprocess.image_size).double()
    assert fx.trunk.pos_embed_fixed.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Equivalence with timm's own VisionTransformer at the native grid
# ---------------------------------------------------------------------------------------------


def _timm_twin(spec):
    from timm.layers import Mlp, SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    swiglu = spec.mlp == "swiglu"
    ratio = (2 * swiglu_hidden(spec.embed_dim) + 0.5) / spec.embed_dim if swiglu else spec.mlp_ratio
    return TimmViT(
        img_size=spec.pos_grid * spec.patch_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=ratio,
        qkv_bias=True,
        init_values=1.0,
        reg_tokens=spec.registers,
        no_embed_class=bool(spec.registers),
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.SiLU if swiglu else nn.GELU,
        mlp_layer=SwiGLUPacked if swiglu else Mlp,
    ).eval()


@pytest.mark.parametrize("name", ["anyloc-dinov2-vits14", "anyloc-dinov2", "anyloc-dinov2-reg"])
def test_equals_timm_vit_at_native_grid(name, tmp_path):
    from timm.models.vision_transformer import checkpoint_filter_fn

    spec = _tiny(name).backbone
    ours = _vit(spec, seed=7)
    twin = _timm_twin(spec)
    path = W.save_official(ours, tmp_path / "w.pth", "dinov2")
    official = torch.load(path, weights_only=True)
    assert ("blocks.0.mlp.w12.weight" in official) == (spec.mlp == "swiglu")
    twin.load_state_dict(checkpoint_filter_fn(official, twin), strict=True)  # timm's own dinov2 filter
    s = spec.pos_grid * spec.patch_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), twin.forward_features(x)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Facets
# ---------------------------------------------------------------------------------------------


def _hooked(vit, layer, x):
    """Full-model forward; capture block `layer`'s qkv output and block output."""
    seen = {}
    h1 = vit.blocks[layer].attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
    h2 = vit.blocks[layer].register_forward_hook(lambda m, i, o: seen.__setitem__("block", o))
    with torch.no_grad():
        vit(x)
    h1.remove()
    h2.remove()
    return seen


@pytest.mark.parametrize("facet", ["query", "key", "value", "token"])
@pytest.mark.parametrize("name", ["anyloc-dinov2", "anyloc-dinov2-reg"])
def test_head_major_facets_equal_hooked_full_model(name, facet):
    p = _tiny(name)
    f = dataclasses.replace(p.facet, facet=facet)
    full = _vit(p.backbone, seed=2)  # all blocks, norm: the facet must not depend on them
    x = _images(p)
    seen = _hooked(full, f.layer, x)
    r, d = full.num_prefix_tokens, p.feature_dim
    if facet == "token":
        ref = seen["block"][:, r:]
    else:
        i = {"query": 0, "key": 1, "value": 2}[facet]
        ref = seen["qkv"][:, r:, i * d : (i + 1) * d]
    ref = F.normalize(ref, dim=-1)
    fx = FacetExtractor(full, f, image_size=p.preprocess.image_size).eval()
    cut = FacetExtractor(W.load_backbone(p.backbone, "random", num_blocks=f.layer + 1, seed=2), f)
    with torch.no_grad():
        torch.testing.assert_close(fx(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cut(x), ref, atol=1e-5, rtol=1e-5)  # name-seeded init: same weights


def test_value_facet_includes_qkv_bias():
    p = _tiny("anyloc-dinov2")
    vit = _vit(p.backbone, num_blocks=p.facet.layer + 1)
    raw = dataclasses.replace(p.facet, l2=False)
    x = _images(p, b=1)
    with torch.no_grad():
        a = FacetExtractor(vit, raw)(x)
        vit.blocks[p.facet.layer].attn.qkv.bias[2 * p.feature_dim :] += 1.0
        b = FacetExtractor(vit, raw)(x)
    torch.testing.assert_close(b - a, torch.ones_like(a), atol=1e-5, rtol=0)


def test_dim_major_key_facet_matches_dino_vit_features():
    p = _tiny("anyloc-dino")
    assert p.facet.layout == "dim_major" and p.facet.facet == "key"
    vit = _vit(p.backbone, seed=4)
    x = _images(p)
    qkv = _hooked(vit, p.facet.layer, x)["qkv"]
    b, t, c3 = qkv.shape
    heads = p.backbone.num_heads
    # dino-vit-features: reshape(B,N,3,h,d).permute(2,0,3,1,4)[1] -> Bxhxtxd; drop CLS;
    # permute(0,2,3,1).flatten(-2) -> B x t x (d*h)
    k = qkv.reshape(b, t, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4)[1]
    ref = F.normalize(k[:, :, 1:, :].permute(0, 2, 3, 1).flatten(start_dim=-2), dim=-1)
    fx = FacetExtractor(vit, p.facet, image_size=p.preprocess.image_size).eval()
    with torch.no_grad():
        got = fx(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    head_major = FacetExtractor(vit, dataclasses.replace(p.facet, layout="head_major"))
    with torch.no_grad():
        assert not torch.allclose(head_major(x), got, atol=1e-3)


@pytest.mark.parametrize("facet", ["value", "token"])
def test_cut_model_holds_nothing_beyond_what_it_computes(facet):
    p = _tiny("anyloc-dinov2")
    f = dataclasses.replace(p.facet, facet=facet)
    full = _vit(p.backbone)
    fx = FacetExtractor(full, f)
    names = {n for n, _ in fx.named_modules() if n}
    later = [n for n in names if n.startswith("trunk.blocks.") and int(n.split(".")[2]) >= f.layer]
    assert not later
    assert {n.split(".")[0] for n in names} == ({"trunk", "norm1", "qkv"} if facet == "value" else {"trunk", "block"})
    params = dict(fx.named_parameters())
    assert not any("mask_token" in n for n in params) and "trunk.norm.weight" not in params
    if facet == "value":
        assert not any(n.startswith(("block.", "proj", "mlp")) for n in params)
    with pytest.raises(ConfigError, match="num_blocks"):
        FacetExtractor(VisionTransformer(p.backbone, num_blocks=f.layer), f)


def test_boq_dinov2_drops_cls_and_skips_final_norm():
    p = _tiny("boq-dinov2")
    bb = W.init_random_(BoQDinoV2(p.backbone), 1).eval()
    assert bb.dino.norm is not None  # kept for strict loading
    x = _images(p)
    with torch.no_grad():
        y = bb(x)
        tokens = bb.dino.forward_features(x)[:, 1:]  # BoQ: blocks, no norm, x[:, 1:]
        gh, gw = p.grid()
        ref = tokens.permute(0, 2, 1).reshape(2, p.feature_dim, gh, gw)
        normed = bb.dino(x)[:, 1:].permute(0, 2, 1).reshape(2, p.feature_dim, gh, gw)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    assert not torch.allclose(y, normed, atol=1e-3)


def test_boq_resnet_trunk_keys_match_torchvision():
    from torchvision.models import resnet50

    spec = presets.get("boq-resnet50").backbone
    with torch.device("meta"):
        ours = BoQResNet(spec).state_dict()
        tv = resnet50().state_dict()
    stage = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6}
    expected = {
        f"net.{stage[k.split('.')[0]]}.{k.split('.', 1)[1]}": tuple(v.shape)
        for k, v in tv.items()
        if k.split(".")[0] in stage
    }
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert not any(k.startswith(("net.7", "fc", "avgpool")) for k in ours)


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------


def test_facet_extractor_exports_to_onnx_and_ort_matches(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    p = _tiny("anyloc-dinov2-reg")
    vit = W.load_backbone(p.backbone, "random", num_blocks=p.facet.layer + 1, seed=3)
    fx = FacetExtractor(vit, p.facet, image_size=p.preprocess.image_size).eval()
    x = _images(p, b=1)
    path = tmp_path / "fx.onnx"
    with torch.no_grad():
        ref = fx(x).numpy()
        prog = torch.onnx.export(fx, (x,), dynamo=True, opset_version=18, verbose=False)
    prog.save(str(path))
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "Resize" not in ops  # the position table is a constant for the fixed size
    d = p.feature_dim
    full_qkv = [i for i in model.graph.initializer if sorted(i.dims) == sorted([3 * d, d])]
    assert len(full_qkv) == p.facet.layer  # blocks 0..L-1 only; block L holds a D x D slice
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == ref.shape
    assert abs(out - ref).max() < 1e-4
