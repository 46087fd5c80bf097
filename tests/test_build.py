"""The assembled reference models: every preset's tiny configuration, BoQ release round trips,
describe on Corridor with recall@k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_edge import presets
from vpr_edge.cli.main import main
from vpr_edge.errors import ConfigError, WeightsError
from vpr_edge.models import vocabulary as V, weights as W
from vpr_edge.models.reference import build_reference

TINY = [presets.get(n).tiny() for n in presets.names()]


def _vocab(p, seed=0):
    rng = np.random.default_rng(seed)
    return V.Vocabulary.for_preset(rng.standard_normal((p.aggregator.clusters, p.feature_dim)).astype(np.float32), p)


@pytest.mark.parametrize("preset", [p for p in TINY if not p.aggregator.pca_dim], ids=lambda p: p.name)
def test_tiny_models_give_unit_descriptors_of_the_preset_size(preset):
    vocab = _vocab(preset) if preset.aggregator.kind == "vlad" else None
    m = build_reference(preset, "random", vocabulary=vocab).model
    x = torch.randn(2, 3, *preset.preprocess.image_size)
    with torch.no_grad():
        d = m(x)
    assert d.shape == (2, preset.descriptor_dim)
    assert torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)


def test_vlad_preset_without_vocabulary_says_how_to_fit_one():
    with pytest.raises(ConfigError, match="vpr-edge vocab fit"):
        build_reference(presets.get("anyloc-dinov2").tiny(), "random")


def _save_release(model, path, layout):
    """A random checkpoint in the BoQ release layout: backbone.{net,dino}.* + aggregator.*."""
    W.save_official(model.backbone, path, layout)
    sd = torch.load(path, weights_only=True)
    sd.update({f"aggregator.{k}": v for k, v in model.aggregator.state_dict().items() if k != "query_cache"})
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("name,layout", [("boq-resnet50", "boq-resnet50"), ("boq-dinov2", "boq-dinov2")])
def test_boq_release_checkpoint_round_trip(name, layout, tmp_path):
    """A checkpoint in the release key layout (backbone.* + aggregator.*) loads strictly into backbone and head."""
    p = presets.get(name).tiny()
    src = build_reference(p, "random", seed=7).model
    path = _save_release(src, tmp_path / "release.pth", layout)
    keys = torch.load(path, weights_only=True).keys()
    assert any(k.startswith("aggregator.boqs.0.queries") for k in keys)
    assert any(k.startswith("backbone.net." if "resnet" in name else "backbone.dino.") for k in keys)
    loaded = build_reference(p, str(path), seed=0).model  # a different seed: everything must come from the file
    x = torch.randn(2, 3, *p.preprocess.image_size)
    with torch.no_grad():
        assert torch.allclose(src(x), loaded(x), atol=1e-6)


def test_boq_release_with_a_wrong_head_is_refused(tmp_path):
    p = presets.get("boq-resnet50").tiny()
    src = build_reference(p, "random").model
    sd = torch.load(_save_release(src, tmp_path / "r.pth", "boq-resnet50"), weights_only=True)
    sd["aggregator.fc.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="aggregator.fc.weight"):
        build_reference(p, str(tmp_path / "bad.pth"))


def test_describe_corridor_prints_recall(corridor, capsys):
    code = main(["describe", str(corridor), "--model", "anyloc-dinov2@tiny", "--weights", "random", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "R@1" in out and "111 queries" in out
