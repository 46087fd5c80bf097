"""Automatic precision fallback: the fewest transformer blocks (then nodes) kept in higher precision
so that top-1 retrieval agreement with FP32 reaches a target.

Search: divide and conquer over the candidate blocks (the QuickXplain scheme of Junker, 2004).
Given candidates C that together suffice, split C into halves A and B; if A alone suffices
recurse into A, else if B alone does recurse into B, else the answer needs both: find the minimal
part of A with all of B kept, then the minimal part of B with that part of A kept. Assuming more
higher-precision blocks never lower the agreement (monotone), this returns a set from which no block
can be dropped, with about 2 k log2(n/k) evaluations for k needed blocks out of n, instead of 2^n
subsets. Every evaluated set is memoised and recorded. Node-level refinement runs the same search
over the nodes of the chosen blocks.

At ViT-G size one evaluation (quantise 1.1 B parameters, run the verify set twice) takes minutes, so a
search can be given a `SearchJournal`: every score is appended to a JSON-lines file as it is known
(readable while the search runs: it is the search's log), and a rerun with the same inputs reads the
scores back instead of recomputing them. A journal line carries the digest of everything the score
depends on (`context`); lines of another context are ignored, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)


@dataclass
class FallbackResult:
    target: float
    met: bool
    blocks: list[int]  # blocks kept in higher precision (before node refinement)
    nodes: list[str]  # nodes kept in higher precision (the final choice)
    agreement: float  # top-1 agreement of the final choice
    cost: float  # share of MatMul/Gemm/Conv FLOPs that the fallback keeps in higher precision
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None  # the graph of the final choice (None: its score came from a journal, no graph built)
    refined: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_agreement": self.target,
            "met": self.met,
            "blocks": self.blocks,
            "nodes": self.nodes,
            "agreement": self.agreement,
            "estimated_cost_flops_fraction": self.cost,
            "node_refinement": self.refined,
            "evaluations": self.evaluations,
            "search": "divide-and-conquer minimal subset (QuickXplain) over blocks, then over nodes",
        }


def nodes_digest(nodes: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(sorted(nodes)).encode()).hexdigest()[:16]


class SearchJournal:
    """Append-only JSON lines `{"context", "keep", ..., "agreement", "seconds"}`, one per evaluated set
    (keep: `nodes_digest` of the nodes kept in higher precision). Each line is flushed and fsynced, so a
    killed search loses at most the evaluation it was in; a torn last line is skipped on reading."""

    def __init__(self, path: str | Path, context: str):
        self.path, self.context = Path(path), context

    def scores(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("context") == self.context:
                out[str(row["keep"])] = float(row["agreement"])
        return out

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a line torn by a kill: end it, so it does not swallow this one
                    fh.write(b"\n")
            fh.write((json.dumps({"context": self.context, **row}) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())


class _Oracle:
    """Memoised `agreement(keep) >= target` with a budget; keeps the record of what was tried.
    nodes_of(keep) -> the node names `keep` stands for (the journal's key). Scores read back from a
    journal cost no evaluation but count against the budget as before; their graphs are built only when asked
    for (`path`)."""

    def __init__(self, build_fn, evaluate, target: float, max_evals: int, label: Callable[[frozenset], dict],
                 nodes_of: Callable[[frozenset], frozenset[str]], journal: SearchJournal | None = None,
                 known: dict[str, float] | None = None):
        self.build_fn, self.evaluate, self.target = build_fn, evaluate, target
        self.max_evals = max_evals
        self.label, self.nodes_of = label, nodes_of
        self.journal = journal
        self.known = known if known is not None else {}
        self.cache: dict[frozenset, float] = {}
        self.paths: dict[frozenset, Path] = {}
        self.record: list[dict[str, Any]] = []

    def score(self, keep: frozenset) -> float:
        if keep not in self.cache:
            if len(self.cache) >= self.max_evals:  # scores read back count too: a resumed search ends where a whole one would
                raise _Budget()
            digest = nodes_digest(self.nodes_of(keep))
            resumed = digest in self.known
            if resumed:
                agreement, seconds = self.known[digest], None
            else:
                t0 = time.perf_counter()
                agreement = float(self.evaluate(self.path(keep)))
                seconds = round(time.perf_counter() - t0, 1)
            self.cache[keep] = agreement
            row = {**self.label(keep), "agreement": agreement}
            self.record.append({**row, **({"from_journal": True} if resumed else {})})
            if self.journal is not None and not resumed:
                self.journal.append({"keep": digest, **row, "seconds": seconds})
                self.known[digest] = agreement
            log.info("fallback: %s -> top-1 agreement %.4f%s", self.label(keep), agreement,
                     " (from the journal)" if resumed else f" ({seconds} s)")
        return self.cache[keep]

    def path(self, keep: frozenset) -> Path:
        if keep not in self.paths:
            self.paths[keep] = self.build_fn(keep)
        return self.paths[keep]

    def ok(self, keep: Iterable) -> bool:
        return self.score(frozenset(keep)) >= self.target


class _Budget(Exception):
    pass


def minimal_subset(ok: Callable[[frozenset], bool], candidates: Sequence[Any], required: frozenset = frozenset()) -> frozenset:
    """A subset S of `candidates` with ok(required | S), from which no element can be dropped
    (under monotonicity). Precondition: ok(required | set(candidates))."""
    if ok(required):
        return frozenset()
    if len(candidates) == 1:
        return frozenset(candidates)
    half = len(candidates) // 2
    a, b = list(candidates[:half]), list(candidates[half:])
    if ok(required | set(a)):
        return minimal_subset(ok, a, required)
    if ok(required | set(b)):
        return minimal_subset(ok, b, required)
    need_a = minimal_subset(ok, a, required | frozenset(b))
    need_b = minimal_subset(ok, b, required | need_a)
    return need_a | need_b


def fallback_search(
    build_fn: Callable[[frozenset[str]], Path],
    evaluate: Callable[[Path], float],
    blocks: Mapping[int, Sequence[str]],
    target: float,
    *,
    refine_nodes: bool = False,
    node_filter: Callable[[str], bool] | None = None,
    flops: Mapping[str, float] | None = None,
    max_evals: int = 64,
    journal: SearchJournal | None = None,
) -> FallbackResult:
    """Find what to keep in higher precision.

    build_fn(keep_nodes) writes the low-precision graph with `keep_nodes` (FP32 node names) kept in
    higher precision and returns its path; evaluate(path) returns its top-1 agreement with FP32.
    blocks: block index -> node names (`graph.nodes_by_block`). node_filter selects the nodes
    worth refining (e.g. MatMul/Gemm/Conv for INT8). flops: node -> FLOPs for the cost estimate.
    journal: where scores are logged as they come and read back from on a rerun (module docstring);
    The result's path is None where its score was read back and its graph never built."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target agreement must be in (0, 1], got {target}")
    order = sorted(blocks)
    nodes_of = {b: list(blocks[b]) for b in order}

    def nodes_for(bs: Iterable[int]) -> frozenset[str]:
        return frozenset(n for b in bs for n in nodes_of[b])

    def label_blocks(keep: frozenset) -> dict[str, Any]:
        return {"keep_blocks": sorted(keep)}

    known = journal.scores() if journal is not None else {}
    if known:
        log.info("fallback: %d scores read back from %s", len(known), journal.path)
    block_oracle = _Oracle(lambda bs: build_fn(nodes_for(bs)), evaluate, target, max_evals, label_blocks,
                           nodes_for, journal, known)
    total = sum((flops or {}).values()) or 0.0

    def cost(nodes: Iterable[str]) -> float:
        return sum((flops or {}).get(n, 0.0) for n in nodes) / total if total else 0.0

    def result(chosen_blocks: frozenset, nodes: frozenset, oracle: _Oracle, met: bool, refined: bool) -> FallbackResult:
        keep = nodes if refined else chosen_blocks
        agreement, path = oracle.score(keep), oracle.paths.get(keep)
        evaluations = block_oracle.record + ([] if oracle is block_oracle else oracle.record)
        return FallbackResult(
            target=target, met=met, blocks=sorted(chosen_blocks), nodes=sorted(nodes), agreement=agreement,
            cost=cost(nodes), evaluations=evaluations, path=path, refined=refined,
        )

    empty = frozenset()
    if block_oracle.ok(empty):
        return result(empty, frozenset(), block_oracle, True, False)
    everything = frozenset(order)
    if not block_oracle.ok(everything):
        log.warning("fallback: even with all %d blocks in higher precision agreement is below %.3f", len(order), target)
        return result(everything, nodes_for(everything), block_oracle, False, False)
    try:
        chosen = minimal_subset(block_oracle.ok, order)
    except _Budget:
        log.warning("fallback: evaluation budget (%d) spent; keeping all blocks", max_evals)
        return result(everything, nodes_for(everything), block_oracle, True, False)
    chosen_nodes = nodes_for(chosen)
    if not refine_nodes or not chosen:
        return result(chosen, chosen_nodes, block_oracle, True, False)

    # in graph order (block by block, each block's nodes as the graph lists them), so halves are contiguous
    # stretches of a block and the search is the same on every run (a set's order changes with the hash seed,
    # and a resumed search must ask the questions the interrupted one asked)
    candidates = [n for b in sorted(chosen) for n in nodes_of[b] if node_filter is None or node_filter(n)]
    fixed = chosen_nodes - set(candidates)  # nodes not worth refining stay with their blocks

    def label_nodes(keep: frozenset) -> dict[str, Any]:
        return {"keep_blocks": sorted(chosen), "keep_nodes": len(keep)}

    node_oracle = _Oracle(build_fn, evaluate, target, max_evals, label_nodes, lambda keep: keep, journal, known)
    node_oracle.cache[chosen_nodes] = block_oracle.cache[chosen]
    if chosen in block_oracle.paths:
        node_oracle.paths[chosen_nodes] = block_oracle.paths[chosen]
    try:
        refined = fixed | minimal_subset(node_oracle.ok, candidates, frozenset(fixed))
    except _Budget:
        log.warning("fallback: node refinement budget (%d) spent; keeping whole blocks", max_evals)
        return result(chosen, chosen_nodes, block_oracle, True, False)
    if not node_oracle.ok(refined):  # non-monotone corner: fall back to whole blocks
        return result(chosen, chosen_nodes, block_oracle, True, False)
    return result(chosen, refined, node_oracle, True, True)
