"""The artifact's second graph, for ONNX Runtime only: each ViT attention as one `com.microsoft.Attention` node.

Why a second graph: ONNX Runtime's own attention fusion (in-session level 2, and `onnxruntime.transformers`
with model_type vit) matches the BERT patterns of the TorchScript exporter; torch's dynamo exporter unbinds
q/k/v with Slice + Squeeze and transposes k through Reshape/Transpose/Reshape, so nothing fuses (issue 14,
measured). The portable `model.onnx` keeps standard ops for TensorRT; `model.ort.onnx` replaces, per block,

    x @ W_qkv + b -> Reshape [B, S, 3, H, Dh] -> Transpose -> Slice/Squeeze q, k, v -> (q*c)(k*c)^T
      -> Softmax -> @ v -> Transpose -> Reshape [B, S, D]

by `Attention(x, W_qkv, b_qkv, num_heads=H, scale=c*c)`, whose CPU/CUDA kernels do the projection, the
head split and the softmax in one pass. Measured (benchmarks/ort_graphs.py, 2 threads, FP32): 1.01-1.11x
the portable graph's speed on ViT-S/14, ViT-B/14 at 322 px and ViT-S/8 at 3025 tokens; fusing Add +
LayerNorm into SkipLayerNormalization as well measured no faster (noise level), so it is not done. Only float graphs: the CPU kernel has no FP16 form, and INT8 graphs quantise
the qkv projection (no float weight to hand over).

Both graphs read the same weights: `model.ort.onnx` takes no initializer the portable graph lacks, and
shares its external-data file (a graph with embedded weights is first rewritten to one external file), so
the second graph costs kilobytes, not a copy of the weights. The export checks it against the portable
graph on real images before it is listed in the manifest (`vpr_edge.export.artifact`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge.engines import graph as G
from vpr_edge.lazy import lazy_import

ORT_GRAPH_NAME = "model.ort.onnx"
MS_DOMAIN = "com.microsoft"


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

    def attention(self, softmax) -> tuple[Any, list[str], int, float] | None:
        """(node whose output the fused node produces, [x, W_qkv, b_qkv], heads, scale) or None."""
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
        proj = None if bias_add is None else self.up(bias_add.input[0], "MatMul")
        if proj is None or bias_add.input[1] not in self.inits or proj.input[1] not in self.inits:
            return None
        w, b = self.inits[proj.input[1]], self.inits[bias_add.input[1]]
        dim = heads * head_dim
        if list(w.dims) != [w.dims[0], 3 * dim] or list(b.dims) != [3 * dim] or w.data_type != G.FLOAT:
            return None
        return merge, [proj.input[0], proj.input[1], bias_add.input[1]], heads, cq * ck


def fuse_attention(model) -> int:
    """Replace every matching attention block of `model` (in place) by one `com.microsoft.Attention` node
    writing the block's merged-heads output tensor; returns how many. Nodes left without consumers are
    removed, with initializers no node reads any more."""
    helper = lazy_import("onnx").helper
    match = _Match(model)
    replace: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        found = match.attention(node)
        if found is None:
            continue
        merge, inputs, heads, scale = found
        replace[merge.output[0]] = helper.make_node(
            "Attention", inputs, [merge.output[0]], name=f"ort_attention_{len(replace)}", domain=MS_DOMAIN,
            num_heads=heads, scale=scale)
    if not replace:
        return 0
    nodes = [replace.get(n.output[0], n) if n.output else n for n in model.graph.node]
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


def write_ort_graph(onnx_path: str | Path) -> dict[str, Any]:
    """Write `ORT_GRAPH_NAME` next to the float graph `onnx_path` with its attention fused; returns what was
    done ({"attention": count, "file": name} or {"attention": 0, "reason": ...}). A graph with embedded
    weights is first rewritten in place to one external-data file, which both graphs then read."""
    onnx_path = Path(onnx_path)
    model = G.load(onnx_path, load_weights=False)
    if any(i.data_type == G.FLOAT16 for i in model.graph.initializer):
        return {"attention": 0, "reason": "FP16 graph (the CPU Attention kernel is float only)"}
    probe = type(model)()
    probe.CopyFrom(model)
    if fuse_attention(probe) == 0:
        return {"attention": 0, "reason": "no attention block of the exported form (or a quantised projection)"}
    if not G.external_data_files(onnx_path):
        G.save_streamed(G.load(onnx_path), onnx_path, None)
        model = G.load(onnx_path, load_weights=False)
        probe = type(model)()
        probe.CopyFrom(model)
    count = fuse_attention(probe)
    dst = onnx_path.parent / ORT_GRAPH_NAME
    tmp = dst.with_name("." + dst.name + ".partial")
    # structure only: its external initializers keep pointing at the portable graph's data file
    lazy_import("onnx").save_model(probe, str(tmp))
    tmp.replace(dst)
    return {"attention": count, "file": dst.name, "shares": [p.name for p in G.external_data_files(onnx_path)]}
