"""The artifact's second graph, for ONNX Runtime only: each ViT attention as one fused contrib node.

Why a second graph: ONNX Runtime's own attention fusion (in-session level 2, and `onnxruntime.transformers`
with model_type vit) matches the BERT patterns of the TorchScript exporter; torch's dynamo exporter unbinds
q/k/v with Slice + Squeeze and transposes k through Reshape/Transpose/Reshape, so nothing fuses (issue 14,
measured). The portable `model.onnx` keeps standard ops for TensorRT; `model.ort.onnx` replaces, per block,

    x @ W_qkv + b -> Reshape [B, S, 3, H, Dh] -> Transpose -> Slice/Squeeze q, k, v -> (q*c)(k*c)^T
      -> Softmax -> @ v -> Transpose -> Reshape [B, S, D]

by `x @ W_qkv -> Split -> MultiHeadAttention(q, k, v, b, num_heads=H, scale=c*c)` (the default), or by
`Attention(x, W_qkv, b)`, which also does the projection. Both kernels add the bias, split the heads and run
the softmax in one pass; MultiHeadAttention's CPU kernel also avoids the [B, H, S, S] score tensor's round
trips, which is what counts at ViT-S/8's 3025 tokens (`benchmarks/ort_graphs.py` times both forms against
the portable graph and PyTorch; its results say which is faster where). Fusing Add + LayerNorm into
SkipLayerNormalization as well measured no faster (noise level), so it is not done. No FP16 graphs: the CPU
kernels have no FP16 form. INT8 graphs quantise the qkv projection, so only MultiHeadAttention applies there
(the Q/DQ MatMul stays as it is; `Attention` wants a float weight).

Both graphs read the same weights: `model.ort.onnx` takes no initializer the portable graph lacks (the split
sizes are Constant nodes), and shares its external-data file (a graph with embedded weights is first
rewritten to one external file), so the second graph costs kilobytes, not a copy of the weights. The export
checks it on real images before it is listed in the manifest (`vpr_edge.export.artifact._ort_graph`: FP32
against the portable graph, INT8 through the INT8 gate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vpr_edge.engines import graph as G
from vpr_edge.lazy import lazy_import

ORT_GRAPH_NAME = "model.ort.onnx"
MS_DOMAIN = "com.microsoft"
OPS = ("MultiHeadAttention", "Attention")


def _constant(model, producer: dict[str, Any], inits: dict[str, Any], tensor: str) -> np.ndarray | None:
    onnx = lazy_import("onnx")
    if tensor in inits:
        init = inits[tensor]
        return None if G.is_external(init) else onnx.numpy_helper.to_array(init)
    node = producer.get(tensor)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return onnx.numpy_helper.to_array(node.attribute[0].t)
    return None


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return lazy_import("onnx").helper.get_attribute_value(a)
    return default


class _Match:
    """One attention block of the dynamo export, read back from its Softmax (on `graph.GraphIndex`)."""

    def __init__(self, model):
        self.model = model
        self.idx = G.GraphIndex.of(model)
        # tensor -> producing node, as `_constant` reads Constant nodes
        self.producer = {t: self.idx.nodes[n] for t, n in self.idx.producer.items()}
        self.inits = {i.name: i for i in model.graph.initializer}

    def up(self, tensor: str, *ops: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type in ops else None

    def only_down(self, tensor: str, op: str):
        users = self.idx.consumers.get(tensor, [])
        node = self.idx.nodes[users[0]] if len(users) == 1 else None
        return node if node is not None and node.op_type == op else None

    def scalar(self, tensor: str) -> float | None:
        arr = _constant(self.model, self.producer, self.inits, tensor)
        return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None

    def unbound(self, tensor: str, index: int, through: tuple[str, ...] = ()):
        """The [B, H, S, Dh] slice `index` of q/k/v (Squeeze(Slice(perm, index:index+1, axis 0))), reached
        from `tensor` through single-input reshapes/transposes `through`; its source Transpose, else None."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in through:
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "Squeeze":
            return None
        sl = self.up(node.input[0], "Slice")
        if sl is None or len(sl.input) < 4:
            return None
        starts, ends, axes = (_constant(self.model, self.producer, self.inits, t) for t in sl.input[1:4])
        if any(a is None for a in (starts, ends, axes)) or list(axes.reshape(-1)) != [0]:
            return None
        if int(starts.reshape(-1)[0]) != index or int(ends.reshape(-1)[0]) != index + 1:
            return None
        return self.up(sl.input[0], "Transpose")

    def attention(self, softmax) -> "_Block | None":
        """The attention block whose Softmax is `softmax`, or None."""
        if _attr(softmax, "axis", -1) not in (-1, 3):
            return None
        scores = self.up(softmax.input[0], "MatMul")
        probs_v = self.only_down(softmax.output[0], "MatMul")
        if scores is None or probs_v is None or probs_v.input[0] != softmax.output[0]:
            return None
        back = self.only_down(probs_v.output[0], "Transpose")
        if back is None or list(_attr(back, "perm", [])) != [0, 2, 1, 3]:
            return None
        merge = self.only_down(back.output[0], "Reshape")
        qmul, kmul = self.up(scores.input[0], "Mul"), self.up(scores.input[1], "Mul")
        if merge is None or qmul is None or kmul is None:
            return None
        cq, ck = self.scalar(qmul.input[1]), self.scalar(kmul.input[1])
        if cq is None or ck is None:
            return None
        perm = self.unbound(qmul.input[0], 0)
        if (perm is None or self.unbound(kmul.input[0], 1, ("Reshape", "Transpose")) is not perm
                or self.unbound(probs_v.input[1], 2) is not perm or list(_attr(perm, "perm", [])) != [2, 0, 3, 1, 4]):
            return None
        split = self.up(perm.input[0], "Reshape")
        shape = None if split is None else _constant(self.model, self.producer, self.inits, split.input[1])
        if shape is None or shape.size != 5 or int(shape[2]) != 3:
            return None
        heads, head_dim = int(shape[3]), int(shape[4])
        bias_add = self.up(split.input[0], "Add")
        bias = None if bias_add is None else self.inits.get(bias_add.input[1])
        dim = heads * head_dim
        if bias is None or list(bias.dims) != [3 * dim] or bias.data_type != G.FLOAT:
            return None
        # the projection's weight as Attention takes it: a float initializer (an INT8 graph's comes from a
        # DequantizeLinear: only MultiHeadAttention, which leaves the projection as it is, applies there)
        proj = self.up(bias_add.input[0], "MatMul")
        w = None if proj is None else self.inits.get(proj.input[1])
        weight = proj.input[1] if w is not None and list(w.dims) == [w.dims[0], 3 * dim] and w.data_type == G.FLOAT else None
        return _Block(merge, None if weight is None else proj.input[0], weight, bias_add.input[1], heads, cq * ck,
                      bias_add.input[0])


class _Block(NamedTuple):
    merge: Any  # the head-merging Reshape whose output the fused node writes
    x: str | None  # the projection's input, with `weight` (None: Attention cannot take this block)
    weight: str | None
    bias: str  # the qkv bias [3 * dim]
    heads: int
    scale: float
    projected: str  # x @ W_qkv before the bias


def fuse_attention(model, op: str = "MultiHeadAttention") -> int:
    """Replace every matching attention block of `model` (in place) by ORT's fused attention writing the
    block's merged-heads output tensor; returns how many. `op`: "MultiHeadAttention" (the qkv MatMul kept,
    Split into q, k, v, one MultiHeadAttention node adding the bias) or "Attention" (one node doing the
    projection too). Nodes left without consumers are removed, with initializers no node reads any more."""
    if op not in OPS:
        raise ValueError(f"fuse_attention: op must be one of {OPS}, not {op!r}")
    helper = lazy_import("onnx").helper
    match = _Match(model)
    replace: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        found = match.attention(node)
        if found is None:
            continue
        name = f"ort_attention_{len(replace)}"
        if op == "Attention":
            if found.weight is None:
                continue
            replace[found.merge.output[0]] = [helper.make_node(
                "Attention", [found.x, found.weight, found.bias], [found.merge.output[0]], name=name,
                domain=MS_DOMAIN, num_heads=found.heads, scale=found.scale)]
            continue
        dim = int(match.inits[found.bias].dims[0]) // 3
        sizes = f"{name}_split_sizes"  # a Constant node: the graph keeps no initializer the portable one lacks
        split_sizes = helper.make_node("Constant", [], [sizes], name=sizes, value=lazy_import("onnx").numpy_helper
                                       .from_array(np.array([dim, dim, dim], dtype=np.int64), sizes))
        q, k, v = (f"{name}_{t}" for t in "qkv")
        replace[found.merge.output[0]] = [
            split_sizes,
            helper.make_node("Split", [found.projected, sizes], [q, k, v], name=f"{name}_split", axis=-1),
            helper.make_node("MultiHeadAttention", [q, k, v, found.bias], [found.merge.output[0]], name=name,
                             domain=MS_DOMAIN, num_heads=found.heads, scale=found.scale),
        ]
    if not replace:
        return 0
    nodes = [m for n in model.graph.node for m in (replace.get(n.output[0], [n]) if n.output else [n])]
    del model.graph.node[:]
    model.graph.node.extend(_live(model, nodes))
    used = {t for n in model.graph.node for t in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replace)


def _live(model, nodes: list) -> list:
    """`nodes` without those whose outputs nothing reads (walked backwards: one pass removes whole chains)."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(nodes):
        if any(t in needed for t in node.output):
            keep.append(node)
            needed.update(t for t in node.input if t)
    return keep[::-1]


def write_ort_graph(onnx_path: str | Path, op: str = OPS[0], name: str = ORT_GRAPH_NAME) -> dict[str, Any]:
    """Write `name` next to the float graph `onnx_path` with its attention fused into `op` nodes; returns what
    was done ({"attention": count, "op": op, "file": name, ...} or {"attention": 0, "reason": ...}). A graph
    with embedded weights is first rewritten in place to one external-data file, which both graphs then read."""
    onnx_path = Path(onnx_path)
    model = G.load(onnx_path, load_weights=False)
    if any(i.data_type == G.FLOAT16 for i in model.graph.initializer):
        return {"attention": 0, "reason": "FP16 graph (the CPU attention kernels are float only)"}
    count = fuse_attention(model, op)
    if count == 0:
        return {"attention": 0, "reason": "no attention block of the exported form"}
    if not G.external_data_files(onnx_path):
        G.save_streamed(G.load(onnx_path), onnx_path, None)
        model = G.load(onnx_path, load_weights=False)
        count = fuse_attention(model, op)
    dst = onnx_path.parent / name
    tmp = dst.with_name("." + dst.name + ".partial")
    # structure only: its external initializers keep pointing at the portable graph's data file
    lazy_import("onnx").save_model(model, str(tmp))
    tmp.replace(dst)
    return {"attention": count, "op": op, "file": dst.name, "shares": [p.name for p in G.external_data_files(onnx_path)]}
