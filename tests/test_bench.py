"""`vpr-edge bench`: dataset benchmark outputs and metrics, synthetic map, soak, option checks.

The end-to-end runs use tiny AnyLoc artifacts (backbone and descriptor scope, same vocabulary)
exported on Corridor images and a few Corridor queries, with small run counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpr_edge import fidelity
from vpr_edge.benchmarks import match_grid as MG
from vpr_edge.cli.bench import mode_of
from vpr_edge.benchmarks.dataset_bench import BenchConfig, bench_variant, select_subset
from vpr_edge.measure import PeakRss, percentiles
from vpr_edge.benchmarks.variants import PYTORCH_FP16, PYTORCH_FP32, VariantSpec, parse_variant, plan_variants
from vpr_edge.cli.main import main
from vpr_edge.datasets import Dataset
from vpr_edge.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- fixtures: tiny artifacts and one benchmark run shared by the end-to-end tests --------------
@pytest.fixture(scope="module")
def artifacts(corridor, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("torch")
    from vpr_edge import presets
    from vpr_edge.export.artifact import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("bench_artifacts")
    preset = presets.get("anyloc-dinov2").tiny()
    opts = dict(verify=corridor, verify_limit=12, progress=False)
    export_artifact(preset, root / "bb", weights="random", options=ExportOptions(scope="backbone", **opts))
    # the same vocabulary, so both artifacts (and the PyTorch reference) share one descriptor space
    export_artifact(preset, root / "desc", weights="random", vocabulary=root / "bb" / "vocabulary.npz",
                    options=ExportOptions(scope="descriptor", **opts))
    return {"backbone": root / "bb", "descriptor": root / "desc"}


@pytest.fixture(scope="module")
def bench_run(artifacts, corridor, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_run") / "run"
    argv = [
        "bench", str(corridor), "--variant", f"onnx-bb={artifacts['backbone']}",
        "--variant", f"onnx-desc={artifacts['descriptor']}", "--pytorch", "onnx-bb", "--device", "cpu",
        "--limit", "8", "--batches", "1,2", "--runs", "4", "--warmup", "1", "--search-runs", "20",
        "--match-grid", "2", "--grid-k", "3", "--quiet", "--output", str(out),
    ]
    assert main(argv) == 0
    return {"out": out, "res": json.loads((out / "results.json").read_text()), "argv": argv}


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dataset_bench_writes_json_markdown_and_pngs(bench_run):
    out, res = bench_run["out"], bench_run["res"]
    for key in ("schema", "command", "argv", "config", "versions", "machine", "dataset", "variants", "ratios", "targets"):
        assert key in res
    assert res["command"].startswith("vpr-edge bench ") and "--variant" in res["command"]
    assert (out / "command.txt").read_text().strip() == res["command"]
    assert res["config"]["batches"] == [1, 2] and res["config"]["runs"] == 4
    assert {"cpu", "cores_logical", "ram_gb", "gpus"} <= res["machine"].keys()
    assert "numpy" in res["versions"] and "onnxruntime" in res["versions"]
    assert res["dataset"]["limited"] and res["dataset"]["queries"] == 8
    assert list(res["variants"]) == [PYTORCH_FP32, "onnx-bb", "onnx-desc"]  # no CUDA: no FP16 reference
    for name, v in res["variants"].items():
        assert list(v["accuracy"]) == ["R@1", "R@5", "R@10", "R@20"]
        assert all(0.0 <= x <= 1.0 for x in v["accuracy"].values())
        assert set(v["latency"]) == {"1", "2"}
        assert v["memory"]["rss_peak_mb"] >= v["memory"]["rss_start_mb"] > 0
    assert res["variants"]["onnx-bb"]["info"]["scope"] == "backbone"
    assert res["variants"]["onnx-desc"]["info"]["scope"] == "descriptor"
    md = (out / "results.md").read_text()
    assert "## Accuracy" in md and "## Latency" in md and "## Memory" in md and "## Throughput" in md
    for name in res["variants"]:
        assert f"| {name} |" in md
    pngs = ["latency_vs_recall.png", "recall_at_k.png", "latency_breakdown.png"] + [
        f"match_grid_{n}.png" for n in res["variants"]
    ]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert name in res["files"]
    with Image.open(out / "match_grid_onnx-bb.png") as im:
        assert im.width > 3 * 96 and im.height > 2 * 96  # query + 3 results, 2 rows


@pytest.mark.slow
def test_latency_statistics_are_sane(bench_run):
    for v in bench_run["res"]["variants"].values():
        for b, lat in v["latency"].items():
            p = lat["per_image_ms"]
            assert 0 < p["min"] <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
            assert p["n"] == 4 and lat["batch"] == int(b)
            assert lat["throughput_ips"] > 0
            st = lat["stages_ms_per_image"]
            assert set(st) == {"preprocess", "backbone", "aggregation", "other"}
            assert all(x >= 0 for x in st.values()) and st["backbone"] > 0 and st["preprocess"] > 0
            # preprocessing runs in a pool of threads (its clock sums them); the backend and aggregation do not
            assert st["backbone"] + st["aggregation"] <= p["max"] * 1.01
            assert lat["pipelined_ips"] > 0 and lat["backend_only_ips"] > 0 and lat["preprocess"] == "exact"
            assert lat["pipelined_vs_backend_only"] == pytest.approx(lat["pipelined_ips"] / lat["backend_only_ips"])
            assert 0 < lat["preprocess_share"] and lat["memory"]["rss_peak_mb"] > 0
            o = v["overhead"][b]
            assert o["ratio"] == pytest.approx(o["runtime_ms"] / o["backbone_ms"])
        s = v["search"]["per_query_ms"]
        assert 0 < s["p50"] <= s["p95"] <= s["p99"]
    # backbone scope aggregates in numpy (timed), descriptor scope inside the graph (0)
    assert bench_run["res"]["variants"]["onnx-bb"]["latency"]["1"]["stages_ms_per_image"]["aggregation"] > 0
    assert bench_run["res"]["variants"]["onnx-desc"]["latency"]["1"]["stages_ms_per_image"]["aggregation"] == 0


@pytest.mark.slow
def test_fidelity_and_ratios_against_pytorch(bench_run):
    res = bench_run["res"]
    assert res["reference"] == PYTORCH_FP32 and res["baseline"] == PYTORCH_FP32
    assert res["variants"][PYTORCH_FP32]["fidelity"] is None
    for name in ("onnx-bb", "onnx-desc"):
        fid = res["variants"][name]["fidelity"]
        assert fid["comparable"], fid
        assert fid["cos_min"] > 0.9999 and fid["top1_agreement"] == 1.0
        assert fid["R@1_test"] == pytest.approx(res["variants"][name]["accuracy"]["R@1"])
    ratios = res["ratios"]
    assert set(ratios) == set(res["variants"])
    assert ratios[PYTORCH_FP32]["speedup_p50"] == {"1": 1.0, "2": 1.0}
    for name in ("onnx-bb", "onnx-desc"):
        r, v, base = ratios[name], res["variants"][name], res["variants"][PYTORCH_FP32]
        want = base["latency"]["1"]["per_image_ms"]["p50"] / v["latency"]["1"]["per_image_ms"]["p50"]
        assert r["speedup_p50"]["1"] == pytest.approx(want)
        assert r["recall_at_1_delta"] == pytest.approx(v["accuracy"]["R@1"] - base["accuracy"]["R@1"])
    assert "speed-up vs pytorch-fp32" in (bench_run["out"] / "results.md").read_text()


def test_an_fp32_variant_off_its_reference_is_flagged_with_both_causes(bench_run):
    import copy

    from vpr_edge.benchmarks.report import dataset_markdown

    res = copy.deepcopy(bench_run["res"])
    assert "is FP32 but differs" not in dataset_markdown(res)  # the real run agrees
    fid = next(v["fidelity"] for v in res["variants"].values() if v["fidelity"] and v["info"]["precision"] == "fp32")
    fid["cos_min"] = 0.95
    md = dataset_markdown(res)
    assert "is FP32 but differs" in md and "cos min 0.9500" in md
    assert "assignment ties" in md and "--weights/--seed" in md


@pytest.mark.slow
def test_recall_equals_fidelity_recall_on_the_same_rankings(artifacts, corridor):
    from vpr_edge import datasets
    from vpr_edge.runtime.describer import Describer

    sub = select_subset(datasets.load_dataset(corridor), 8)
    cfg = BenchConfig(dataset=corridor, variants=[], batches=(1,), runs=3, warmup=0, search_runs=3, progress=False)
    spec = VariantSpec("onnx-bb", artifacts["backbone"])
    res, arrays = bench_variant(cfg, spec, sub, None)
    assert res["accuracy"] == fidelity.recall_at_k(arrays["ranked"], sub.positives, (1, 5, 10, 20))
    # and the rankings are those of an independent describe + rank_database
    with Describer.from_artifact(artifacts["backbone"]) as d:
        desc = d.describe(list(sub.database) + list(sub.queries))
    ranked = fidelity.rank_database(desc[: len(sub.database)], desc[len(sub.database) :], arrays["ranked"].shape[1])
    np.testing.assert_array_equal(ranked, arrays["ranked"])


def test_map_bench_small(tmp_path):
    out = tmp_path / "map"
    argv = ["bench", "map", "--size", "20000", "--dim", "64", "--nlist", "32", "--m", "8", "--nbits", "6",
            "--nprobe", "4", "--queries", "100", "--exact-queries", "10", "--clusters", "50", "--quiet", "-o", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    r = res["result"]
    assert r["params"] == {"nlist": 32, "m": 8, "nbits": 6, "nprobe": 4, "refine": "sq8, top 500",
                           "refine_store": "sq8", "rerank": 500, "k": 10, "factory": "IVF32,PQ8x6np,Refine(SQ8)",
                           "train": 2560, "metric": "inner product"}  # re-ranking: the runtime's default
    assert r["size"] == 20000 and r["dim"] == 64 and r["queries"] == 100
    for key in ("top1", "exact_top1_in_top10", "top10_overlap"):
        assert 0.0 <= r["agreement"][key] <= 1.0
    assert r["agreement"]["exact_top1_in_top10"] >= r["agreement"]["top1"]
    p = r["ivfpq"]["per_query_ms"]
    assert 0 < p["p50"] <= p["p95"] <= p["p99"] and p["n"] == 100
    assert r["exact"]["per_query_ms"]["n"] == 10
    assert r["memory"]["ivfpq_code_bytes"] == 6  # 8 sub-quantizers x 6 bits
    assert set(r["targets"]) == {"latency_ms", "agreement", "latency_met", "agreement_met"}
    assert "IVF-PQ" in (out / "results.md").read_text()


def test_map_vectors_are_clustered_unit_vectors_and_regenerable():
    from vpr_edge.benchmarks.map_bench import ClusteredVectors

    gen = ClusteredVectors(size=2500, dim=32, clusters=5, spread=0.3, chunk=1000, seed=1)
    chunks = [gen.get(i) for i in range(gen.chunks)]
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    allv = np.concatenate(chunks)
    np.testing.assert_allclose(np.linalg.norm(allv, axis=1), 1.0, rtol=1e-5)
    ids = np.array([3, 1999, 2000, 2499])
    np.testing.assert_array_equal(gen.rows(ids), allv[ids])
    # clustered: every vector is much closer to its best centre than random directions are
    best = (allv @ gen.centres.T).max(axis=1)
    assert best.min() > 0.85


def test_soak_small_reports_growth(toy_artifact, corridor, tmp_path):
    out = tmp_path / "soak"
    argv = ["bench", "soak", str(toy_artifact), "--queries", "60", "--sample-every", "20", "--warmup", "5",
            "--images", str(corridor / "queries"), "--map-size", "300", "--quiet", "-o", str(out)]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())["result"]
    assert r["queries"] == 60 and r["map_size"] == 300
    assert [s["queries"] for s in r["samples"]] == [0, 20, 40, 60]
    assert np.isfinite(r["growth_pct"]) and r["max_growth_pct"] >= r["growth_pct"]
    assert r["rss_end_mb"] == pytest.approx(r["samples"][-1]["rss_mb"])
    assert r["growth_pct"] == pytest.approx(100 * (r["rss_end_mb"] - r["rss_baseline_mb"]) / r["rss_baseline_mb"])
    assert isinstance(r["target_met"], bool) and r["per_query_ms"]["n"] == 60


@pytest.fixture(scope="module")
def toy_artifact(tmp_path_factory) -> Path:
    """A torch-free toy artifact (the runtime helper's contract builder) for the soak test."""
    from vpr_edge import presets
    from toy_artifact import write_toy_artifact

    path = tmp_path_factory.mktemp("soak") / "toy"
    write_toy_artifact(path, presets.get("anyloc-dinov2").tiny(), scope="backbone")
    return path


def _layout(kind: str, corridor: Path, root: Path) -> tuple[Path, list[list[int]]]:
    """6 database + 4 query Corridor images in another dataset layout; query i shows database i+1."""
    import shutil

    db = sorted((corridor / "database").glob("*.jpg"))[:6]
    qs = sorted((corridor / "queries").glob("*.jpg"))[1:5]
    truth = [[i + 1] for i in range(4)]
    if kind == "vpr-bench":
        (root / "ref").mkdir(parents=True)
        (root / "query").mkdir()
        for i, p in enumerate(db):
            shutil.copy(p, root / "ref" / f"{i}.jpg")
        for i, p in enumerate(qs):
            shutil.copy(p, root / "query" / f"{i}.jpg")
        gt = np.empty((4, 2), dtype=object)
        for i, t in enumerate(truth):
            gt[i, 0], gt[i, 1] = i, t
        np.save(root / "ground_truth_new.npy", gt, allow_pickle=True)
    else:  # VPR-datasets-downloader: UTM in the names, positives within 25 m
        for sub, files, east in (("database", db, lambda i: 100.0 * i), ("queries", qs, lambda i: 100.0 * (i + 1) + 3)):
            folder = root / "images" / "test" / sub
            folder.mkdir(parents=True)
            for i, p in enumerate(files):
                shutil.copy(p, folder / f"@{east(i):.2f}@4000000.00@{i:03d}@.jpg")
    return root, truth


@pytest.mark.parametrize("kind", ["vpr-bench", "vpr-datasets-downloader"])
def test_dataset_bench_reads_other_layouts(kind, toy_artifact, corridor, tmp_path):
    from vpr_edge import datasets
    from vpr_edge.runtime.describer import Describer

    root, truth = _layout(kind, corridor, tmp_path / kind)
    out = tmp_path / "run"
    argv = ["bench", str(root), "--variant", f"toy={toy_artifact}", "--batches", "1", "--runs", "3", "--warmup", "0",
            "--search-runs", "3", "--match-grid", "0", "--no-plots", "--quiet", "-o", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    ds = datasets.load_dataset(root)
    assert ds.layout == kind and [list(p) for p in ds.positives] == truth
    with Describer.from_artifact(toy_artifact) as d:
        desc = d.describe(list(ds.database) + list(ds.queries))
    ranked = fidelity.rank_database(desc[:6], desc[6:], 20)
    assert res["variants"]["toy"]["accuracy"] == fidelity.recall_at_k(ranked, ds.positives, (1, 5, 10, 20))
    assert res["dataset"]["queries"] == 4 and res["dataset"]["database"] == 6
    assert sorted(res["files"]) == ["command.txt", "results.json", "results.md"]


# -- units ----------------------------------------------------------------------------------------
def test_percentiles_are_ordered():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = percentiles(rng.exponential(size=rng.integers(1, 200)))
        assert p["min"] <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
    assert percentiles([]) == {"n": 0}


def test_rss_sampler_sees_an_allocation():
    with PeakRss(interval_s=0.001) as s:
        block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
        import time

        time.sleep(0.05)
        del block
    assert s.report()["rss_peak_increase_mb"] > 32


def test_subset_keeps_positives_and_remaps_them():
    db = [Path(f"db{i}.jpg") for i in range(50)]
    qs = [Path(f"q{i}.jpg") for i in range(30)]
    pos = [np.array([i, i + 1]) for i in range(30)]
    ds = Dataset("toy", db, qs, pos)
    sub = select_subset(ds, 5)
    assert len(sub.queries) == 5 and len(sub.database) == 10  # 5 queries x 2 positives, no room left
    for q, p in zip(sub.queries, sub.positives):
        qi = int(q.stem[1:])
        assert sorted(sub.database[j].name for j in p) == [f"db{qi}.jpg", f"db{qi + 1}.jpg"]
    few_positives = Dataset("sparse", db, qs, [np.array([i]) for i in range(30)])
    filled = select_subset(few_positives, 8)
    assert len(filled.queries) == 8 and len(filled.database) == 8  # 8 positives, nothing to fill
    wide = select_subset(Dataset("wide", db, qs[:4], [np.array([i]) for i in range(4)]), 10)
    assert len(wide.queries) == 4 and len(wide.database) == 10  # 4 positives + 6 evenly spaced others
    assert {f"db{i}.jpg" for i in range(4)} <= {p.name for p in wide.database}
    assert [wide.database[int(p[0])].name for p in wide.positives] == [f"db{i}.jpg" for i in range(4)]
    assert select_subset(ds, None).database == db


def test_match_grid_frames_positives_green_and_others_red(tmp_path):
    for i, c in enumerate([(200, 200, 200), (10, 10, 10), (90, 90, 90)]):
        Image.new("RGB", (40, 30), c).save(tmp_path / f"{i}.png")
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    out = MG.match_grid(paths[:1], paths, np.array([[1, 2]]), [np.array([2])], [0], tmp_path / "g.png", k=2, height=30, border=3)
    im = np.asarray(Image.open(out).convert("RGB"))
    row = im[6 + 1]  # inside the top border of the first row (gap 6, border 3)
    colours = {tuple(int(v) for v in px) for px in row}
    assert MG.QUERY in colours and MG.GREEN in colours and MG.RED in colours
    xs_red = np.flatnonzero((row == MG.RED).all(axis=1))
    xs_green = np.flatnonzero((row == MG.GREEN).all(axis=1))
    assert xs_red.max() < xs_green.min()  # rank 1 (not a positive) left of rank 2 (positive)
    assert MG.pick_queries(10, 4) == [0, 3, 6, 9] and MG.pick_queries(3, 0) == []


def test_variant_plan_orders_and_checks():
    specs = plan_variants(["a=/x/a", "b=/x/b"], pytorch="b", fp16="auto", cuda=True)
    assert [s.name for s in specs] == [PYTORCH_FP32, PYTORCH_FP16, "a", "b"]
    assert specs[0].path == Path("/x/b") and specs[1].fp16
    assert [s.name for s in plan_variants(["a=/x/a"], pytorch="", cuda=False)] == [PYTORCH_FP32, "a"]
    assert [s.name for s in plan_variants(["a=/x/a"], pytorch=None)] == ["a"]
    assert parse_variant("/some/dir/fp16") == ("fp16", Path("/some/dir/fp16"))
    gpu = plan_variants(["cpu=/x/a", "gpu@cuda=/x/a", "eng@trt=/x/e"], pytorch=None)
    assert [s.name for s in gpu] == ["cpu", "gpu", "eng"]
    assert [s.options for s in gpu] == [{}, {"backend": "ort", "providers": ["cuda"]}, {"backend": "trt"}]
    for bad in (["a=/x", "a=/y"], ["bad name=/x"], ["pytorch-fp32=/x"]):
        with pytest.raises(ConfigError):
            plan_variants(bad, pytorch="")
    with pytest.raises(ConfigError, match="CUDA"):
        plan_variants(["a=/x"], pytorch="", fp16="on", cuda=False)
    with pytest.raises(ConfigError, match="nothing to benchmark"):
        plan_variants([], pytorch=None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "map", "--variant", "a=b", "-o", "X"], "--variant"),
        (["bench", "map", "--images", "d", "-o", "X"], "--images"),
        (["bench", "soak", "-o", "X"], "needs the artifact"),
        (["bench", "DIR", "--size", "10", "-o", "X"], "--size"),
        (["bench", "DIR", "ART", "-o", "X"], "second argument"),
    ],
)
def test_cli_refuses_options_of_another_benchmark(argv, message, capsys, tmp_path):
    argv = [a.replace("X", str(tmp_path / "out")).replace("DIR", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_mode_and_missing_dataset(capsys, tmp_path):
    import argparse

    assert mode_of(argparse.Namespace(target="map")) == "map"
    assert mode_of(argparse.Namespace(target="./map")) == "dataset"
    assert main(["bench", str(tmp_path / "nope"), "--variant", "a=b", "--no-plots", "-o", str(tmp_path / "o")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
