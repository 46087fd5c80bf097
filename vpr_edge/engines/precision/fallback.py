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
"""

from __future__ import annotations

import logging
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
    path: Path | None = None  # the graph of the final choice
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


class _Oracle:
    """Memoised `agreement(keep) >= target` with a budget; keeps the record of what was tried."""

    def __init__(self, build_fn, evaluate, target: float, max_evals: int, label: Callable[[frozenset], dict]):
        self.build_fn, self.evaluate, self.target = build_fn, evaluate, target
        self.max_evals = max_evals
        self.label = label
        self.cache: dict[frozenset, tuple[float, Path]] = {}
        self.record: list[dict[str, Any]] = []

    def score(self, keep: frozenset) -> tuple[float, Path]:
        if keep not in self.cache:
            if len(self.cache) >= self.max_evals:
                raise _Budget()
            path = self.build_fn(keep)
            agreement = float(self.evaluate(path))
            self.cache[keep] = (agreement, path)
            self.record.append({**self.label(keep), "agreement": agreement})
            log.info("fallback: %s -> top-1 agreement %.4f", self.label(keep), agreement)
        return self.cache[keep]

    def ok(self, keep: Iterable) -> bool:
        return self.score(frozenset(keep))[0] >= self.target


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
) -> FallbackResult:
    """Find what to keep in higher precision.

    build_fn(keep_nodes) writes the low-precision graph with `keep_nodes` (FP32 node names) kept in
    higher precision and returns its path; evaluate(path) returns its top-1 agreement with FP32.
    blocks: block index -> node names (`graph.nodes_by_block`). node_filter selects the nodes
    worth refining (e.g. MatMul/Gemm/Conv for INT8). flops: node -> FLOPs for the cost estimate."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target agreement must be in (0, 1], got {target}")
    order = sorted(blocks)
    nodes_of = {b: list(blocks[b]) for b in order}

    def nodes_for(bs: Iterable[int]) -> frozenset[str]:
        return frozenset(n for b in bs for n in nodes_of[b])

    def label_blocks(keep: frozenset) -> dict[str, Any]:
        return {"keep_blocks": sorted(keep)}

    block_oracle = _Oracle(lambda bs: build_fn(nodes_for(bs)), evaluate, target, max_evals, label_blocks)
    total = sum((flops or {}).values()) or 0.0

    def cost(nodes: Iterable[str]) -> float:
        return sum((flops or {}).get(n, 0.0) for n in nodes) / total if total else 0.0

    def result(chosen_blocks: frozenset, nodes: frozenset, oracle: _Oracle, met: bool, refined: bool) -> FallbackResult:
        agreement, path = oracle.score(nodes if refined else chosen_blocks)
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

    candidates = [n for n in nodes_for(chosen) if node_filter is None or node_filter(n)]
    fixed = chosen_nodes - set(candidates)  # nodes not worth refining stay with their blocks

    def label_nodes(keep: frozenset) -> dict[str, Any]:
        return {"keep_blocks": sorted(chosen), "keep_nodes": len(keep)}

    node_oracle = _Oracle(build_fn, evaluate, target, max_evals, label_nodes)
    node_oracle.cache[chosen_nodes] = block_oracle.cache[chosen]
    try:
        # candidates in graph order, so halves are contiguous stretches of the block
        refined = fixed | minimal_subset(node_oracle.ok, candidates, frozenset(fixed))
    except _Budget:
        log.warning("fallback: node refinement budget (%d) spent; keeping whole blocks", max_evals)
        return result(chosen, chosen_nodes, block_oracle, True, False)
    if not node_oracle.ok(refined):  # non-monotone corner: fall back to whole blocks
        return result(chosen, chosen_nodes, block_oracle, True, False)
    return result(chosen, refined, node_oracle, True, True)
