"""Checks on an exported ONNX graph: which transformer blocks it computes, which ops it holds."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_BLOCK = re.compile(r"blocks[._](\d+)[._]")


def node_scope(node) -> str:
    """The torch module path a node came from (dynamo exporter metadata), else its name."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            return prop.value
    return node.name


def node_block(node) -> int | None:
    """Transformer block index a node belongs to (from its module scope), or None."""
    m = _BLOCK.search(node_scope(node).replace(": ", "."))
    return int(m.group(1)) if m else None


def blocks_in_graph(model) -> dict[int, Counter]:
    """block index -> Counter of op types computed in that block."""
    out: dict[int, Counter] = {}
    for node in model.graph.node:
        b = node_block(node)
        if b is not None:
            out.setdefault(b, Counter())[node.op_type] += 1
    return out


def facet_ops(model) -> Counter:
    """Ops the FacetExtractor computes for block L itself (outside its trunk of blocks 0..L-1)."""
    c: Counter = Counter()
    for node in model.graph.node:
        scope = node_scope(node)
        if "FacetExtractor" in scope and node_block(node) is None and ("norm1" in scope or "linear" in scope or "block" in scope):
            c[node.op_type] += 1
    return c


def op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def load_structure(path: str | Path):
    """The graph without weights (fast, small) for structural checks."""
    import onnx

    return onnx.load(str(path), load_external_data=False)
