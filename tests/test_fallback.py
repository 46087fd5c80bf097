"""Automatic precision fallback: bisection over blocks (then nodes), and a planted overflow found."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpr_edge.engines.precision.fallback import SearchJournal, fallback_search, minimal_subset


def _counting(needed: set):
    calls = []

    def ok(keep) -> bool:
        calls.append(frozenset(keep))
        return needed <= set(keep)

    return ok, calls


@pytest.mark.parametrize("needed", [set(), {3}, {3, 11}, {0, 7, 8, 15}])
def test_minimal_subset_finds_exactly_the_needed_blocks(needed):
    ok, calls = _counting(needed)
    assert minimal_subset(ok, list(range(16))) == frozenset(needed)
    assert len(set(calls)) <= 2 * max(1, len(needed)) * 4 + 2  # ~2 k log2(n), not 2**16


def _fake_graph(tmp_path: Path, needed_nodes: set[str]):
    """build_fn writes nothing heavy: the 'graph' is the kept set; agreement 1 iff the culprits are kept."""
    built: list[frozenset] = []

    def build(keep: frozenset) -> Path:
        built.append(keep)
        p = tmp_path / f"g{len(built)}.txt"
        p.write_text("\n".join(sorted(keep)))
        return p

    def evaluate(path: Path) -> float:
        keep = set(path.read_text().split("\n")) - {""}
        return 1.0 if needed_nodes <= keep else 0.5

    return build, evaluate


def test_fallback_search_blocks_then_nodes(tmp_path):
    blocks = {b: [f"b{b}.{k}" for k in ("qkv", "proj", "fc1", "fc2", "add")] for b in range(8)}
    flops = {n: (4.0 if n.endswith(("fc1", "fc2")) else 1.0) for ns in blocks.values() for n in ns}
    build, evaluate = _fake_graph(tmp_path, {"b2.fc1", "b5.qkv"})
    res = fallback_search(build, evaluate, blocks, 0.99, flops=flops)
    assert res.met and res.blocks == [2, 5] and not res.refined
    assert res.cost == pytest.approx(2 * 11 / (8 * 11))
    refined = fallback_search(build, evaluate, blocks, 0.99, flops=flops, refine_nodes=True,
                              node_filter=lambda n: not n.endswith("add"))
    assert refined.refined and refined.blocks == [2, 5]
    assert set(refined.nodes) == {"b2.fc1", "b5.qkv", "b2.add", "b5.add"}  # unfiltered nodes stay with their block
    assert refined.cost < res.cost
    assert refined.agreement == 1.0 and len(refined.evaluations) < 40


def test_fallback_reports_unreachable_targets(tmp_path):
    blocks = {b: [f"n{b}"] for b in range(4)}
    res = fallback_search(lambda keep: tmp_path, lambda p: 0.5, blocks, 0.99)
    assert not res.met and res.blocks == [0, 1, 2, 3] and res.agreement == 0.5
    assert len(res.evaluations) == 2  # none, then all: no search when all blocks are not enough
    nothing = fallback_search(lambda keep: tmp_path, lambda p: 1.0, blocks, 0.99)
    assert nothing.met and nothing.blocks == [] and nothing.cost == 0.0


class _Interrupt(Exception):
    pass


def test_an_interrupted_search_resumes_from_its_journal(tmp_path):
    """Scores are journalled as they come; a rerun reads them back instead of evaluating again, and ends
    with the answer (and the record) of an uninterrupted search."""
    blocks = {b: [f"b{b}.{k}" for k in ("qkv", "fc1")] for b in range(8)}
    build, evaluate = _fake_graph(tmp_path, {"b2.fc1", "b5.qkv"})
    whole = fallback_search(build, evaluate, blocks, 0.99, refine_nodes=True)
    n_whole = len(whole.evaluations)
    assert n_whole > 6

    calls = []

    def dies_after(k: int):
        def ev(path: Path) -> float:
            if len(calls) == k:
                raise _Interrupt()
            calls.append(path)
            return evaluate(path)
        return ev

    journal = SearchJournal(tmp_path / "search.jsonl", context="same inputs")
    with pytest.raises(_Interrupt):
        fallback_search(build, dies_after(5), blocks, 0.99, refine_nodes=True, journal=journal)
    assert len(journal.scores()) == 5
    with (tmp_path / "search.jsonl").open("a") as fh:  # a line torn by the kill
        fh.write('{"context": "same inputs", "keep": "abc", "agr')
    calls.clear()
    resumed = fallback_search(build, dies_after(10**6), blocks, 0.99, refine_nodes=True, journal=journal)
    distinct = len(journal.scores())  # node sets the search asked about (a few twice: as blocks, then as nodes)
    assert distinct <= n_whole and len(calls) == distinct - 5  # only what the first run did not finish
    assert (resumed.blocks, resumed.nodes, resumed.agreement) == (whole.blocks, whole.nodes, whole.agreement)
    assert [e["agreement"] for e in resumed.evaluations] == [e["agreement"] for e in whole.evaluations]
    assert sum(bool(e.get("from_journal")) for e in resumed.evaluations) == n_whole - len(calls)

    calls.clear()
    again = fallback_search(build, dies_after(0), blocks, 0.99, refine_nodes=True, journal=journal)
    assert again.nodes == whole.nodes and again.path is None  # every score read back, no graph built
    other = SearchJournal(tmp_path / "search.jsonl", context="other weights")
    assert other.scores() == {}  # lines of another context are never trusted
    fresh = fallback_search(build, dies_after(10**6), blocks, 0.99, refine_nodes=True, journal=other)
    assert len(calls) == distinct and fresh.nodes == whole.nodes


@pytest.mark.slow
def test_fallback_keeps_the_block_with_a_planted_overflow(corridor, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxconverter_common")
    from vpr_edge.engines import graph as G
    import toy_vit as toy
    from vpr_edge.verifyset import VerifySet, from_folder
    from vpr_edge.engines.precision.calibration import calibration_images
    from vpr_edge.engines.precision.lower import lower_onnx
    from vpr_edge.presets import Preprocess

    pre = Preprocess(image_size=(112, 154))
    _vs = from_folder(corridor, pre, limit=32, with_fit=False)
    images, db, q, positives, source = _vs.images, _vs.db_idx, _vs.q_idx, _vs.positives, _vs.source
    cal, _ = calibration_images(corridor, pre, limit=48)  # the same toy the other tests use
    planted = toy.plant_overflow(toy.toy_onnx(fit_images=cal), tmp_path / "planted.onnx", block=2)
    verify = VerifySet(images, db, q, positives, source)
    # overflow guard off: the fallback search alone must find the block
    journal = tmp_path / "search.jsonl"
    result = lower_onnx(planted, tmp_path / "fp16.onnx", "fp16", verify, overflow_guard=False,
                        target_agreement=0.99, accept_fidelity=True, journal=journal)
    fb = result.details["fallback"]
    assert len(journal.read_text().splitlines()) == len(fb["evaluations"])
    # the same inputs again: every score is read back; another target is another search
    again = lower_onnx(planted, tmp_path / "fp16b.onnx", "fp16", verify, overflow_guard=False,
                       target_agreement=0.99, accept_fidelity=True, journal=journal).details["fallback"]
    assert again["blocks"] == [2] and all(e.get("from_journal") for e in again["evaluations"])
    other = lower_onnx(planted, tmp_path / "fp16c.onnx", "fp16", verify, overflow_guard=False,
                       target_agreement=0.995, accept_fidelity=True, journal=journal).details["fallback"]
    assert not any(e.get("from_journal") for e in other["evaluations"])
    assert fb["met"] and fb["blocks"] == [2]
    assert fb["evaluations"][0]["keep_blocks"] == [] and fb["evaluations"][0]["agreement"] < 0.99
    assert len(fb["evaluations"]) <= 8  # none, all, then halving: not the 2**5 subsets
    assert 0.0 < fb["estimated_cost_flops_fraction"] < 0.5
    model = G.load(tmp_path / "fp16.onnx")
    kept = set(result.details["fp16"]["fp32_node_names"])
    block2 = G.nodes_by_block(G.load(planted))[2]
    assert set(block2) <= kept
    assert result.verification["report"]["nonfinite"] == 0
    assert model.graph.output[0].type.tensor_type.elem_type == G.FLOAT
