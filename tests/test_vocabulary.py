"""Vocabularies: streaming cosine k-means, files, provenance checks, AnyLoc c_centers.pt, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vpr_edge import presets
from vpr_edge.cli.main import main
from vpr_edge.errors import ArtifactError, ConfigError, InputError
from vpr_edge.space import DescriptorSpace
from vpr_edge.models.vocabulary import (
    Reservoir,
    Vocabulary,
    fit_vocabulary,
    import_anyloc_centers,
    load_vocabulary,
)

TINY = presets.get("anyloc-dinov2").tiny()  # K=4 x D=48 at toy size
K, D = TINY.aggregator.clusters, TINY.feature_dim


def _clustered_images(k=6, d=16, images=40, per=60, noise=0.03, seed=0):
    """Images whose patches scatter around k unit directions (what a facet's clusters look like)."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((k, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    feats = []
    for _ in range(images):
        lab = rng.integers(0, k, per)
        x = dirs[lab] + noise * rng.standard_normal((per, d))
        feats.append((x * rng.uniform(0.5, 3.0, (per, 1))).astype(np.float32))  # unnormalised on purpose
    return dirs, feats


def test_fit_recovers_clusters_and_stores_raw_means_of_normalised_members():
    dirs, feats = _clustered_images()
    vocab = fit_vocabulary(iter(feats), k=6, dim=16, per_image=1000, seed=0, progress=False)
    c = vocab.centers
    assert c.shape == (6, 16) and c.dtype == np.float32
    unit = c / np.linalg.norm(c, axis=1, keepdims=True)
    match = (dirs @ unit.T).argmax(axis=1)
    assert sorted(match.tolist()) == list(range(6)), "each true cluster should get its own centre"
    assert (dirs @ unit.T).max(axis=1).min() > 0.99
    # AnyLoc's convention: centres are plain means of the L2-normalised members (norm < 1), not unit
    x = np.concatenate(feats)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lab = (x @ unit.T).argmax(axis=1)
    for j in range(6):
        np.testing.assert_allclose(c[j], x[lab == j].mean(axis=0), atol=1e-5)
    assert np.all(np.linalg.norm(c, axis=1) < 1.0)
    assert vocab.meta["patches_used"] == len(x) and vocab.meta["empty_clusters"] == 0


def test_fit_is_seeded():
    _, feats = _clustered_images(seed=1)
    a = fit_vocabulary(iter(feats), 6, 16, per_image=30, seed=3, progress=False)
    b = fit_vocabulary(iter(feats), 6, 16, per_image=30, seed=3, progress=False)
    np.testing.assert_array_equal(a.centers, b.centers)


def test_streaming_bounds_per_image_and_in_total():
    rng = np.random.default_rng(0)
    seen_shapes = []

    def stream():  # a generator: the images never exist all at once
        for i in range(50):
            n = 500 if i % 2 else 7  # some images have fewer patches than the cap
            seen_shapes.append(n)
            yield f"img{i}.jpg", rng.standard_normal((n, 8)).astype(np.float32)

    vocab = fit_vocabulary(stream(), k=4, dim=8, per_image=20, seed=0, progress=False, max_patches=300)
    assert vocab.meta["images"] == 50
    assert vocab.meta["patches_seen"] == 25 * 20 + 25 * 7  # at most per_image from each image
    assert vocab.meta["patches_used"] == 300  # the reservoir bound


def test_reservoir_is_a_uniform_sample():
    res = Reservoir(1000, 1, np.random.default_rng(0))
    for start in range(0, 20000, 700):
        rows = np.arange(start, min(start + 700, 20000), dtype=np.float32)[:, None]
        res.add(rows)
    s = res.rows()[:, 0]
    assert res.seen == 20000 and s.shape == (1000,) and len(np.unique(s)) == 1000
    assert abs((s < 10000).mean() - 0.5) < 0.06  # early and late rows equally likely
    assert abs(s.mean() - 10000) < 800


def test_fit_errors():
    with pytest.raises(InputError, match="needs at least 8 patches, got 5"):
        fit_vocabulary(iter([np.ones((5, 4), np.float32)]), k=8, dim=4, progress=False)
    with pytest.raises(InputError, match=r"\[N, 4\]"):
        fit_vocabulary(iter([np.ones((5, 3), np.float32)]), k=2, dim=4, progress=False)


def test_fit_with_preset_records_provenance(tmp_path):
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((30, D)).astype(np.float32) for _ in range(6)]
    vocab = fit_vocabulary(iter(feats), preset=TINY, per_image=25, seed=1, progress=False, weights="random:seed=3")
    assert (vocab.k, vocab.dim) == (K, D)
    m = vocab.meta
    facet = m["space"]["features"]["facet"]
    assert m["preset"] == TINY.name and facet["layer"] == TINY.facet.layer and facet["facet"] == "value"
    assert m["images"] == 6 and m["patches_used"] == 150 and m["seed"] == 1 and m["space"]["weights"] == "random:seed=3"
    vocab.check_for(TINY)
    vocab.check_for(TINY, "random:seed=3")
    with pytest.raises(ArtifactError, match="weights random:seed=3 vs random:seed=4"):
        vocab.check_for(TINY, "random:seed=4")  # features of another network


def test_save_load_round_trip(tmp_path):
    centers = np.random.default_rng(0).standard_normal((K, D)).astype(np.float32)
    vocab = Vocabulary.for_preset(centers, TINY, source="test", images=3)
    path = vocab.save(tmp_path / "v.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npz"]  # written atomically, nothing partial left
    again = Vocabulary.load(path, TINY)
    np.testing.assert_array_equal(again.centers, centers)
    assert again.fingerprint == vocab.fingerprint
    assert again.meta["space"] == DescriptorSpace.of(TINY, None).to_dict()
    assert again.meta["images"] == 3 and again.meta["k"] == K
    with np.load(path) as z:  # what the lean runtime reads
        assert set(z.files) == {"centers", "meta"} and json.loads(str(z["meta"]))["details"]["intra_norm"] is True
    with pytest.raises(ConfigError, match=r"\.npz"):
        vocab.save(tmp_path / "v.pt")


def test_wrong_shape_and_wrong_provenance_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    path = Vocabulary.for_preset(rng.standard_normal((K, D)).astype(np.float32), TINY).save(tmp_path / "mine.npz")

    cases = [
        (TINY.with_overrides(clusters=2 * K), rf"mine.npz has {K} centres of dim {D}.*needs {2 * K} x {D}"),
        (TINY.with_overrides(facet="key"), r"mine.npz was made for .* facet value .* uses .* facet key .*features.facet.facet 'value' vs 'key'"),
        (TINY.with_overrides(layer=1), r"mine.npz was made for .* layer 2 .*features.facet.layer 2 vs 1"),
    ]
    for preset, pattern in cases:
        with pytest.raises(ArtifactError, match=pattern) as e:
            Vocabulary.load(path, preset)
        assert "\n" not in str(e.value) and "vpr-edge vocab fit" in str(e.value)

    # same shape, another backbone (ViT-B vs ViT-S at toy size have the same widths)
    b = presets.get("anyloc-dinov2-vitb14").tiny()
    s = presets.get("anyloc-dinov2-vits14").tiny()
    assert (b.aggregator.clusters, b.feature_dim) == (s.aggregator.clusters, s.feature_dim)
    p2 = Vocabulary.for_preset(np.ones((b.aggregator.clusters, b.feature_dim), np.float32), b).save(tmp_path / "b.npz")
    with pytest.raises(ArtifactError, match=r"b.npz was made for dinov2 vitb14.*vits14.*features.backbone.arch 'vitb14' vs 'vits14'"):
        load_vocabulary(p2, s)

    with pytest.raises(ConfigError, match="not VLAD"):
        Vocabulary.load(path, presets.get("anyloc-dinov2-gem").tiny())


def test_bad_files(tmp_path):
    with pytest.raises(ArtifactError, match="nope.npz not found"):
        Vocabulary.load(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="junk.npz is not a readable"):
        Vocabulary.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, mean=np.zeros(3), proj=np.zeros((2, 3)))
    with pytest.raises(ArtifactError, match=r"other.npz lacks \['centers'\]"):
        Vocabulary.load(other)
    with pytest.raises(ArtifactError, match="NaN"):
        Vocabulary(np.full((2, 3), np.nan, np.float32))


def test_import_anyloc_c_centers(tmp_path):
    centers = torch.randn(K, D) * 0.5
    pt = tmp_path / "c_centers.pt"
    torch.save(centers, pt)

    bare = load_vocabulary(pt)  # no preset: no provenance, shape-only checks
    np.testing.assert_array_equal(bare.centers, centers.numpy())
    assert bare.space is None and bare.meta["source"] == "anyloc-c_centers"
    bare.check_for(TINY)
    with pytest.raises(ArtifactError, match="c_centers.pt has"):
        bare.check_for(TINY.with_overrides(clusters=K + 1))

    vocab = import_anyloc_centers(pt, TINY)
    assert vocab.meta["source_sha256"] and vocab.meta["space"]["features"]["facet"]["layer"] == TINY.facet.layer
    again = Vocabulary.load(vocab.save(tmp_path / "imported.npz"), TINY)
    np.testing.assert_array_equal(again.centers, centers.numpy())

    torch.save(torch.randn(K, D, 2), tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match=r"bad.pt should hold AnyLoc's \[K, D\]"):
        import_anyloc_centers(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="junk.pt is not a readable PyTorch file") as e:
        import_anyloc_centers(tmp_path / "junk.pt")
    assert "PyTorch 2.6" not in str(e.value) and "weights_only=False" not in str(e.value)  # ours, not torch's advice


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_vocab_import_and_info(tmp_path, capsys):
    pt = tmp_path / "c_centers.pt"
    torch.save(torch.randn(K, D), pt)
    out = tmp_path / "v.npz"
    assert main(["vocab", "import", str(pt), "--model", TINY.name, "--output", str(out)]) == 0
    assert load_vocabulary(out, TINY).k == K
    assert main(["vocab", "import", str(pt), "--model", TINY.name, "--output", str(out)]) != 0  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["vocab", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["clusters"] == K and info["dim"] == D and "layer 2" in info["made_for"]
    assert main(["vocab", "import", str(pt), "--model", "anyloc-dino@tiny", "--output", str(tmp_path / "x.npz")]) != 0
    err = capsys.readouterr().err.strip()
    assert "c_centers.pt" in err and len(err.splitlines()) == 1


def test_cli_vocab_fit_refuses_non_vlad_presets_and_existing_outputs(tmp_path, capsys):
    out = tmp_path / "v.npz"
    out.write_bytes(b"keep")
    assert main(["vocab", "fit", str(tmp_path), "--model", "boq-resnet50@tiny", "-o", str(out)]) != 0
    assert "VLAD presets" in capsys.readouterr().err
    assert main(["vocab", "fit", str(tmp_path), "--model", TINY.name, "-o", str(out)]) != 0
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_cli_pca_fit_refuses_too_few_images_before_any_work(tmp_path, capsys, corridor):
    imgs = sorted((corridor / "database").glob("*.jpg"))[:5]
    code = main(["pca", "fit", *map(str, imgs), "--model", "anyloc-dinov2-gem@tiny", "--dim", "16",
                 "--weights", "random", "-o", str(tmp_path / "p.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "too few images to do PCA" in err and "got 5" in err
    assert not (tmp_path / "p.npz").exists()


def test_cli_vocab_and_pca_fit_on_corridor_with_the_tiny_model(tmp_path, capsys, corridor):
    imgs = sorted((corridor / "database").glob("*.jpg"))[:24]
    v = tmp_path / "v.npz"
    argv = ["vocab", "fit", *map(str, imgs), "--model", TINY.name, "--weights", "random", "--per-image", "40",
            "--quiet", "-o", str(v)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    vocab = Vocabulary.load(v, TINY)
    assert vocab.meta["images"] == 24 and vocab.meta["patches_seen"] == 24 * 40
    pca_preset = presets.get("anyloc-dinov2-pca").tiny()
    p = tmp_path / "p.npz"
    argv = ["pca", "fit", *map(str, imgs), "--model", pca_preset.name, "--weights", "random", "--vocabulary", str(v),
            "--dim", str(pca_preset.aggregator.pca_dim), "--quiet", "-o", str(p)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    from vpr_edge.fitted import load_pca

    pw = load_pca(p, pca_preset)
    pw.check_for(pca_preset, vocab)
    assert (pw.in_dim, pw.out_dim) == (pca_preset.without_pca().descriptor_dim, pca_preset.aggregator.pca_dim)
