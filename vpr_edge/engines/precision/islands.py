"""Which nodes stay in FP32 when the rest of the graph is lowered (FP16) or quantised (INT8).

The rules, each with the reason recorded in reports and manifests:

- op types whose FP16 error is large or whose range is unbounded: LayerNormalization (variance of
  large residuals), Softmax, ReduceL2/ReduceSumSquare/LpNormalization/Sqrt/Pow (norms, GeM), ArgMax
  and OneHot (the hard VLAD assignment: a flipped argmax moves a whole token to another cluster);
- the attention logits: the MatMul whose output reaches a Softmax through scaling/masking ops (QK^T);
- the VLAD assignment similarity: a MatMul whose output reaches an ArgMax;
- the VLAD aggregation: a MatMul fed by a OneHot/Equal (the one-hot matrix);
- final normalisations: a Div whose divisor is a norm;
- the descriptor head: every node downstream of the last transformer block that is not itself in a
  block (facet L2, VLAD/GeM/BoQ head, PCA, final L2). The head is a small share of the FLOPs, and
  descriptors are compared by cosine, so its precision is where agreement is decided.
"""

from __future__ import annotations

from vpr_edge.engines.graph import GraphIndex, block_map

KEEP_OP_TYPES: dict[str, str] = {
    "LayerNormalization": "LayerNorm (variance of large residuals)",
    "Softmax": "Softmax",
    "ReduceL2": "norm",
    "ReduceSumSquare": "norm",
    "LpNormalization": "norm",
    "Sqrt": "norm",
    "Pow": "power (GeM / norm)",
    "ArgMax": "VLAD assignment",
    "OneHot": "VLAD assignment",
}
_NORM_SOURCES = {"ReduceL2", "ReduceSumSquare", "Sqrt", "LpNormalization"}
_NORM_PATH = frozenset({"Clip", "Max", "Expand", "Add", "Cast", "Identity", "Unsqueeze", "Reshape"})


def default_fp32_islands(model, *, keep_head: bool = True) -> dict[str, str]:
    """Node name -> reason for every node the default rules keep in FP32."""
    idx = GraphIndex.of(model)
    keep: dict[str, str] = {}
    for name, node in idx.nodes.items():
        op = node.op_type
        if op in KEEP_OP_TYPES:
            keep[name] = KEEP_OP_TYPES[op]
        elif op == "MatMul":
            a, b = node.input[0], node.input[1]
            both_activations = not idx.is_constant(a) and not idx.is_constant(b)
            if both_activations and idx.reaches(name, {"Softmax"}):
                keep[name] = "attention logits QK^T (feeds Softmax)"
            elif idx.reaches(name, {"ArgMax"}):
                keep[name] = "VLAD assignment similarity (feeds ArgMax)"
            elif idx.fed_by(a, {"OneHot", "Equal"}) or idx.fed_by(b, {"OneHot", "Equal"}):
                keep[name] = "VLAD aggregation (one-hot MatMul)"
        elif op == "Div" and len(node.input) > 1 and idx.fed_by(node.input[1], _NORM_SOURCES, through=_NORM_PATH):
            keep[name] = "normalisation (divide by norm)"
    if keep_head:
        for name in descriptor_head(model, idx):
            keep.setdefault(name, "descriptor head (after the last block)")
    return keep


def descriptor_head(model, idx: GraphIndex | None = None) -> set[str]:
    """Nodes downstream of the transformer blocks that are not in a block."""
    idx = idx or GraphIndex.of(model)
    blocks = block_map(model)
    if not blocks:
        return set()
    return {n for n in idx.downstream(blocks) if n not in blocks}
