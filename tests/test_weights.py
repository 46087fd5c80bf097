"""Checkpoints: strict round trips in each official layout, one-line errors, no network."""

from __future__ import annotations

import dataclasses
import urllib.error

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from vpr_edge import presets  # noqa: E402
from vpr_edge.errors import ConfigError, WeightsError  # noqa: E402
from vpr_edge.models import weights as W  # noqa: E402
from vpr_edge.models.boq_backbones import BoQDinoV2, BoQResNet  # noqa: E402
from vpr_edge.models.resnet import TorchvisionResNet  # noqa: E402
from vpr_edge.models.vit import VisionTransformer  # noqa: E402

# (preset, layout) pairs: SwiGLU, registers, DINO v1, plain MLP, both BoQ backbones
CASES = [
    ("anyloc-dinov2", "dinov2"),
    ("anyloc-dinov2-reg", "dinov2"),
    ("anyloc-dinov2-vits14", "dinov2"),
    ("anyloc-dino", "dino"),
    ("boq-resnet50", "boq-resnet50"),
    ("boq-dinov2", "boq-dinov2"),
]


def _spec(name):
    return presets.get(f"{name}@tiny").backbone


def _model(spec, layout, seed=1):
    return W.init_random_(W.build_for_layout(spec, layout), seed).eval()


def _equal_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name,layout", CASES)
def test_strict_round_trip(name, layout, tmp_path):
    spec = _spec(name)
    src = _model(spec, layout)
    path = W.save_official(src, tmp_path / "ckpt.pth", layout)
    raw = torch.load(path, weights_only=True)
    expected = W.official_layout(spec, layout)
    assert {k: tuple(v.shape) for k, v in raw.items()} == expected
    if layout in ("boq-resnet50", "boq-dinov2"):
        assert all(k.startswith("backbone.") for k in raw)
        loaded = W.load_boq_backbone(spec, str(path))
    else:
        loaded = W.load_backbone(spec, str(path), seed=99)
    _equal_state(loaded.state_dict(), src.state_dict())


def _mapped_file(ptr: int) -> str | None:
    """The file backing address `ptr` in this process (Linux /proc/self/maps), None if anonymous."""
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_checkpoint_weights_are_mapped_not_copied(tmp_path):
    """A zip-format checkpoint is memory-mapped and the model takes its tensors (no second copy of
    ViT-G's weights in RAM); legacy-format files still load (read, not mapped)."""
    spec = _spec("anyloc-dinov2")
    src = _model(spec, "dinov2")
    path = W.save_official(src, tmp_path / "g.pth", "dinov2")
    loaded = W.load_backbone(spec, str(path))
    w = loaded.blocks[0].attn.qkv.weight
    assert _mapped_file(w.data_ptr()) == str(path)
    assert isinstance(w, torch.nn.Parameter) and w.requires_grad  # a student can still train through it
    _equal_state(loaded.state_dict(), src.state_dict())
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    again = W.load_backbone(spec, str(legacy))
    assert _mapped_file(again.blocks[0].attn.qkv.weight.data_ptr()) != str(legacy)
    _equal_state(again.state_dict(), src.state_dict())


def test_official_keys_of_each_layout():
    g = W.official_layout(_spec("anyloc-dinov2"), "dinov2")
    assert "blocks.0.mlp.w12.weight" in g and "blocks.0.mlp.w3.bias" in g and "mask_token" in g
    assert not any(".fc1." in k or ".fc2." in k for k in g)
    r = W.official_layout(_spec("anyloc-dinov2-reg"), "dinov2")
    assert r["register_tokens"][1] == 4
    d = W.official_layout(_spec("anyloc-dino"), "dino")
    assert "mask_token" not in d and not any("gamma" in k for k in d)
    b = W.official_layout(presets.get("boq-dinov2").backbone, "boq-dinov2")
    assert b["backbone.dino.pos_embed"] == (1, 1370, 768) and "backbone.dino.norm.weight" in b
    assert "backbone.dino.mask_token" in b and len(b) == 5 + 12 * 14 + 2
    rn = W.official_layout(presets.get("boq-resnet50").backbone, "boq-resnet50")
    assert rn["backbone.net.6.5.conv3.weight"] == (1024, 256, 1, 1)
    assert not any(k.startswith("backbone.net.7") for k in rn)


def test_torchvision_layout_matches_torchvision_and_loads_trunk(tmp_path):
    from torchvision.models import resnet50

    spec = presets.get("boq-resnet50").backbone
    with torch.device("meta"):
        tv = {k: tuple(v.shape) for k, v in resnet50().state_dict().items()}
    assert W.official_layout(spec, "torchvision-resnet50") == tv
    tiny = _spec("boq-resnet50")
    full = W.init_random_(TorchvisionResNet(tiny), 3)
    path = tmp_path / "tv.pth"
    sd = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)  # old torchvision files lack BN counters
    trunk = W.load_backbone(tiny, str(path), layout="torchvision-resnet50")
    assert isinstance(trunk, BoQResNet)
    torch.testing.assert_close(trunk.net[0].weight, full.conv1.weight, atol=0, rtol=0)
    torch.testing.assert_close(trunk.net[6][0].conv3.weight, full.layer3[0].conv3.weight, atol=0, rtol=0)


def test_partial_model_loads_only_its_blocks_after_full_check(tmp_path):
    spec = _spec("anyloc-dinov2")
    src = _model(spec, "dinov2")
    path = W.save_official(src, tmp_path / "g.pth", "dinov2")
    cut = W.load_backbone(spec, str(path), num_blocks=3)
    assert len(cut.blocks) == 3 and cut.norm is None
    want = {k: v for k, v in src.state_dict().items() if k in cut.state_dict()}
    _equal_state(cut.state_dict(), want)
    # the full layout is still checked: a file lacking a later block is refused
    raw = torch.load(path, weights_only=True)
    raw.pop("blocks.3.mlp.w3.bias")
    torch.save(raw, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match=r"blocks\.3\.mlp\.w3\.bias"):
        W.load_backbone(spec, str(tmp_path / "cut.pth"), num_blocks=3)


def test_boq_file_with_aggregator_part_loads_backbone_part(tmp_path):
    spec = _spec("boq-dinov2")
    src = _model(spec, "boq-dinov2")
    sd = W.to_official(src.state_dict(), "boq-dinov2")
    sd["aggregator.proj_c.weight"] = torch.zeros(4, 4)
    bb = W.load_boq_backbone(spec, state_dict=sd)
    _equal_state(bb.state_dict(), src.state_dict())
    assert W.subdict(sd, "aggregator.") == {"proj_c.weight": sd["aggregator.proj_c.weight"]}
    sd["stray.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="stray.weight"):
        W.load_boq_backbone(spec, state_dict=sd)


def test_swiglu_key_conversion_both_ways():
    spec = _spec("anyloc-dinov2")
    internal = VisionTransformer(spec).state_dict()
    official = W.to_official(internal, "dinov2")
    assert "blocks.1.mlp.w12.weight" in official and "blocks.1.mlp.fc1.weight" not in official
    assert W.from_official(official, "dinov2").keys() == internal.keys()
    plain = VisionTransformer(_spec("anyloc-dinov2-vits14")).state_dict()
    assert W.to_official(plain, "dinov2").keys() == plain.keys()  # fc1/fc2 stay for GELU MLPs


# ---------------------------------------------------------------------------------------------
# Mismatches and bad files: one-line WeightsError naming keys, shapes and the file
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def good(tmp_path):
    spec = _spec("anyloc-dinov2")
    path = W.save_official(_model(spec, "dinov2"), tmp_path / "good.pth", "dinov2")
    return spec, torch.load(path, weights_only=True), tmp_path


def test_mismatched_shape_lists_expected_and_got(good):
    spec, sd, tmp = good
    sd["pos_embed"] = torch.zeros(1, 50, spec.embed_dim)
    torch.save(sd, tmp / "bad.pth")
    with pytest.raises(WeightsError) as e:
        W.load_backbone(spec, str(tmp / "bad.pth"))
    msg = _one_line(e)
    assert "pos_embed: expected 1x37x48, got 1x50x48" in msg and "bad.pth" in msg
    w = presets.Weights(url="https://example.invalid/official.pth", file="official.pth", layout="dinov2")
    with pytest.raises(WeightsError, match="example.invalid/official.pth"):
        W.load_backbone(spec, str(tmp / "bad.pth"), source=w)


def test_missing_and_unexpected_keys_are_listed(good):
    spec, sd, tmp = good
    for k in [k for k in sd if k.startswith("blocks.2.")]:
        sd.pop(k)
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp / "bad.pth")
    with pytest.raises(WeightsError) as e:
        W.load_backbone(spec, str(tmp / "bad.pth"))
    msg = _one_line(e)
    assert "14 missing" in msg and "blocks.2.norm1.weight" in msg and "(+9)" in msg
    assert "1 unexpected (head.weight)" in msg


def test_wrong_layout_is_recognised_by_keys(tmp_path):
    dino = _spec("anyloc-dino")
    path = W.save_official(_model(dino, "dino"), tmp_path / "dino.pth", "dino")
    v2 = dataclasses.replace(dino, family="dinov2", stride=0, layerscale=True)
    with pytest.raises(WeightsError, match="looks like a 'dino' checkpoint"):
        W.load_backbone(v2, str(path))
    with pytest.raises(ConfigError, match="resnet"):
        W.load_backbone(dino, str(path), layout="boq-resnet50")


def test_wrapped_checkpoint_is_refused_with_a_hint(good):
    spec, sd, tmp = good
    torch.save({"model": sd, "epoch": 3}, tmp / "wrapped.pth")
    with pytest.raises(WeightsError) as e:
        W.load_backbone(spec, str(tmp / "wrapped.pth"))
    assert "wrapper dict" in _one_line(e) and "['model']" in str(e.value)


class _NotWeights:
    pass


def test_non_weights_pickle_is_refused(good):
    spec, sd, tmp = good
    sd["extra"] = _NotWeights()
    torch.save(sd, tmp / "obj.pth")
    with pytest.raises(WeightsError) as e:
        W.fetch_state_dict(str(tmp / "obj.pth"), None)
    msg = _one_line(e)
    assert "refused" in msg and "_NotWeights" in msg and "obj.pth" in msg


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_corrupt_or_missing_file(good, content):
    spec, sd, tmp = good
    path = tmp / "corrupt.pth"
    if content == "truncated":
        data = (tmp / "good.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError) as e:
        W.fetch_state_dict(str(path), None)
    assert "corrupt.pth" in _one_line(e)
    with pytest.raises(WeightsError, match="not found"):
        W.fetch_state_dict(str(tmp / "nope.pth"), None)


# ---------------------------------------------------------------------------------------------
# 'auto': torch hub cache, download, and no network
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """Empty hub dir and every download path raising, so nothing can hang on the network."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def refuse(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tmp_path / "hub" / "checkpoints", calls


def test_auto_without_network_names_url_file_and_place(offline):
    where, calls = offline
    w = presets.get("anyloc-dinov2").weights
    with pytest.raises(WeightsError) as e:
        W.fetch_state_dict("auto", w)
    msg = _one_line(e)
    assert w.url in msg and w.file in msg and str(where / w.file) in msg
    assert calls == [w.url]


def test_auto_reads_the_hub_cache_without_downloading(offline):
    where, calls = offline
    spec = _spec("anyloc-dinov2-vits14")
    src = _model(spec, "dinov2")
    w = presets.Weights(url="https://example.invalid/tiny.pth", file="tiny.pth", layout="dinov2")
    where.mkdir(parents=True)
    W.save_official(src, where / "tiny.pth", "dinov2")
    loaded = W.load_backbone(spec, "auto", source=w)
    _equal_state(loaded.state_dict(), src.state_dict())
    assert calls == []


def test_auto_without_official_checkpoint():
    with pytest.raises(WeightsError, match="no official checkpoint"):
        W.fetch_state_dict("auto", None)


def test_boq_presets_point_at_release_files():
    for name, file in (("boq-resnet50", "resnet50_16384.pth"), ("boq-dinov2", "dinov2_12288.pth")):
        w = presets.get(name).weights
        assert w.file == file and w.url.endswith(file) and w.layout == name


# ---------------------------------------------------------------------------------------------
# Random init
# ---------------------------------------------------------------------------------------------


def test_random_init_is_deterministic_and_name_seeded():
    spec = _spec("anyloc-dinov2-reg")
    a = W.load_backbone(spec, "random", seed=0).state_dict()
    b = W.load_backbone(spec, "random", seed=0).state_dict()
    c = W.load_backbone(spec, "random", seed=1).state_dict()
    _equal_state(a, b)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    cut = W.load_backbone(spec, "random", num_blocks=2, seed=0).state_dict()
    _equal_state(cut, {k: a[k] for k in cut})
    # LayerScale near 1 (not dinov2's 1e-5), biases non-zero
    assert 0.5 < a["blocks.1.ls1.gamma"].mean() < 1.5
    assert a["blocks.1.attn.qkv.bias"].abs().min() >= 0 and a["blocks.1.attn.qkv.bias"].abs().max() > 0


def test_random_init_every_block_matters():
    p = presets.get("anyloc-dinov2@tiny")
    x = torch.randn(1, 3, *p.preprocess.image_size)
    vit = W.load_backbone(p.backbone, "random", seed=0)
    with torch.no_grad():
        ref = vit(x)
        vit.blocks[0].mlp.fc2.weight.mul_(0.5)
        changed = vit(x)
    rel = (ref - changed).norm() / ref.norm()
    assert rel > 1e-2


def test_boq_dinov2_random_and_meta():
    spec = _spec("boq-dinov2")
    bb = W.load_boq_backbone(spec, "random", seed=0)
    assert isinstance(bb, BoQDinoV2) and not bb.training
    with pytest.raises(ConfigError, match="expects"):
        W.load_boq_backbone(spec, source=presets.get("anyloc-dinov2").weights)
