"""Reading an exported ONNX graph: which transformer block a node belongs to, who feeds whom, FLOPs.

How nodes are mapped to blocks (what torch 2.14's dynamo exporter writes, checked on a ViT):
node *names* carry no module path (`node_MatMul_7`, `node_layer_norm_3`, `node_softmax`), and
initializers may be shared between blocks after the exporter's constant deduplication (identical
LayerNorm weights of different blocks become one tensor). The module path is in each node's
`metadata_props`:

- `pkg.torch.onnx.name_scopes`: a Python list literal of scopes, outermost first, e.g.
  `['', 'blocks.0', 'blocks.0.attn', 'blocks.0.attn.qkv', 'linear']`;
- `namespace`: the same as one string, `': TinyViT/blocks.0: Block/blocks.0.attn: Attn/...'`.

`block_of` reads `name_scopes`, then `namespace`, then falls back to the node name, which the
TorchScript exporter writes as `/blocks.3/attn/MatMul` (older dynamo versions wrote
`node_blocks_3_attn_...`). Nodes added by later passes (casts, Q/DQ) carry no metadata, so block
maps are always computed on the FP32 source graph and used by node name afterwards.
"""

from __future__ import annotations

import ast
import re
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from vpr_edge.errors import ArtifactError
from vpr_edge.lazy import lazy_import

TWO_GB = 2**31 - 1
FLOAT, FLOAT16 = 1, 10

# one scope element that *is* a block: "blocks.3", "backbone.blocks.3", "model.trunk.blocks.12"
_SCOPE_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?blocks)\.(?P<idx>\d+)$")
_NAMESPACE_SPLIT = re.compile(r"/(?=[^/]*: )")
_NAME_BLOCK = (
    re.compile(r"(?:^|/)(?P<prefix>(?:[^/]*\.)?blocks)\.(?P<idx>\d+)(?:/|$)"),  # TorchScript: /blocks.3/attn/MatMul
    re.compile(r"(?:^|_)(?P<prefix>blocks)_(?P<idx>\d+)_"),  # node_blocks_3_attn_...
)

# ops that move or rescale values without mixing tensors: pattern walks go through them
PASSTHROUGH = frozenset(
    {"Mul", "Div", "Add", "Sub", "Where", "Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze",
     "Expand", "Clip", "Max", "Min", "Flatten", "Gather", "Slice", "Equal", "Neg", "Abs", "Sqrt", "Concat"}
)


def onnx_module():
    return lazy_import("onnx")


def load(path: str | Path, load_weights: bool = True):
    """Load an ONNX model (external data beside it is read too)."""
    onnx = onnx_module()
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; expected an ONNX file (export one with vpr-export)")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # onnx raises DecodeError/ValueError/OSError depending on the damage
        raise ArtifactError(f"{path} is not a readable ONNX model ({exc}); re-export it") from exc


def over_size(model: Any, limit: int) -> bool:
    """Whether the serialised model exceeds `limit` bytes (protobuf refuses to even size one over 2 GB)."""
    try:
        return model.ByteSize() > limit
    except Exception as exc:  # google.protobuf.message.EncodeError
        if "serialize" in str(exc).lower():
            return True
        raise


def save(model: Any, path: str | Path) -> Path:
    """Save, switching to one external-data file when the protobuf would exceed 2 GB."""
    onnx = onnx_module()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    def external() -> None:
        data = path.name + ".data"
        (path.parent / data).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)

    # margin below protobuf's 2 GB: ByteSize() is the payload, serialisation needs a little more
    if over_size(model, int(TWO_GB * 0.8)):
        external()
        return path
    try:
        onnx.save_model(model, str(path))
    except (ValueError, Exception) as exc:  # protobuf EncodeError near the limit
        if "serialize" not in str(exc).lower() and "2gb" not in str(exc).lower():
            raise
        external()
    return path


def external_data_files(path: str | Path) -> list[Path]:
    """External-data files an ONNX file refers to (to copy or hash them with it)."""
    onnx = onnx_module()
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return [Path(path).parent / n for n in sorted(names)]


def fixed_batch(path: str | Path) -> int | None:
    """The static batch size of an ONNX file's first input, None when its batch axis is dynamic."""
    dims = load(path, load_weights=False).graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def is_external(init) -> bool:
    """Whether an initializer's values live in an external-data file (not loaded into the proto)."""
    return init.data_location == onnx_module().TensorProto.EXTERNAL


def tensor_array(init, weights_dir: str | Path | None = None):
    """An initializer's values; external ones are read from `weights_dir` (that tensor only)."""
    numpy_helper = onnx_module().numpy_helper
    if is_external(init):
        if weights_dir is None:
            raise ArtifactError(f"initializer {init.name} lives in external data; its folder is needed to read it")
        return numpy_helper.to_array(init, base_dir=str(weights_dir))
    return numpy_helper.to_array(init)


def save_streamed(model: Any, path: str | Path, weights_dir: str | Path | None, convert=None,
                  threshold: int = 1024) -> Path:
    """Save `model`, whose big initializers may still be external files in `weights_dir` (loaded with
    load_weights=False), with every initializer of `threshold` bytes or more in one external-data file
    `<path>.data`, reading and writing one tensor at a time: a big graph is rewritten in ~one tensor of
    memory (ViT-G: 3.4 GB of weights; a whole-proto load + save held 8-12 GiB). `convert(init, array)`
    may replace each array (FP16 conversion, FP32 emulation). The data file is written under a temporary
    name and renamed, so `weights_dir` may be the folder being rewritten in place."""
    import numpy as np

    onnx = onnx_module()
    helper, TensorProto = onnx.helper, onnx.TensorProto
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    tmp = path.parent / (data_name + ".partial")
    tmp_graph = path.parent / (path.name + ".partial")
    offset = 0
    try:
        with open(tmp, "wb") as fh:
            for init in model.graph.initializer:
                if init.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
                    continue
                external = is_external(init)
                if not external and init.ByteSize() < threshold and convert is None:
                    continue
                arr = tensor_array(init, weights_dir)
                if convert is not None:
                    arr = convert(init, arr)
                if not external and arr.nbytes < threshold:
                    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
                    continue
                buf = memoryview(np.ascontiguousarray(arr)).cast("B")
                fh.write(buf)
                new = TensorProto()
                new.name = init.name
                new.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
                new.dims.extend(arr.shape)
                new.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(buf)))):
                    entry = new.external_data.add()
                    entry.key, entry.value = key, value
                init.CopyFrom(new)
                offset += len(buf)
                del arr, buf
        # the structure only (every big tensor is a reference now), also under a temporary name: both files
        # are complete before either final name changes, so an interrupted save leaves the old pair readable
        onnx.save_model(model, str(tmp_graph))
        tmp.replace(path.parent / data_name)
        tmp_graph.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_graph.unlink(missing_ok=True)
    return path


def insert_after(model, after_tensor: Mapping[str, list] | None = None, after_node: Mapping[str, list] | None = None) -> None:
    """Insert nodes in place: `after_tensor[t]` right after the node producing t (first, for a graph input),
    `after_node[n]` right after node n. The graph stays in topological order, and a run in written order
    (`onnxrt.session(written_order=True)`) reads each tensor while it is still alive."""
    after_tensor, after_node = after_tensor or {}, after_node or {}
    nodes = [n for t in model.graph.input for n in after_tensor.get(t.name, ())]
    for node in model.graph.node:
        nodes.append(node)
        for t in node.output:
            nodes.extend(after_tensor.get(t, ()))
        nodes.extend(after_node.get(node.name, ()))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


# ---------------------------------------------------------------------------------------------
# Node -> block
# ---------------------------------------------------------------------------------------------


def _meta(node) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _block_from_scopes(scopes: Iterable[str]) -> tuple[str, int] | None:
    for scope in scopes:
        m = _SCOPE_BLOCK.match(scope.strip())
        if m:
            return m["prefix"], int(m["idx"])
    return None


def block_of(node) -> tuple[str, int] | None:
    """(module prefix, block index) of the transformer block this node was traced in, else None."""
    meta = _meta(node)
    raw = meta.get("pkg.torch.onnx.name_scopes")
    if raw:
        try:
            scopes = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, (list, tuple)):
            hit = _block_from_scopes(str(s) for s in scopes)
            if hit:
                return hit
    ns = meta.get("namespace")
    if ns:
        hit = _block_from_scopes(part.split(":")[0] for part in _NAMESPACE_SPLIT.split(ns))
        if hit:
            return hit
    for pattern in _NAME_BLOCK:
        m = pattern.search(node.name)
        if m:
            return m["prefix"], int(m["idx"])
    return None


def block_map(model) -> dict[str, int]:
    """Node name -> block index for the graph's main stack of blocks.

    When several module lists are called `blocks` (e.g. a backbone and a head), the one with the
    most nodes is the transformer the fallback search works on."""
    by_prefix: dict[str, dict[str, int]] = defaultdict(dict)
    for node in model.graph.node:
        hit = block_of(node)
        if hit:
            by_prefix[hit[0]][node.name] = hit[1]
    if not by_prefix:
        return {}
    return max(by_prefix.values(), key=len)


def blocks_in_graph(model) -> dict[int, Counter]:
    """block index -> Counter of op types computed in that block (the main stack, as `block_map`)."""
    ops = {n.name: n.op_type for n in model.graph.node}
    out: dict[int, Counter] = {}
    for name, idx in block_map(model).items():
        out.setdefault(idx, Counter())[ops[name]] += 1
    return dict(sorted(out.items()))


def facet_ops(model) -> Counter:
    """Ops the FacetExtractor computes for block L itself (norm1 and one third of qkv, outside its trunk)."""
    in_blocks = block_map(model)
    c: Counter = Counter()
    for node in model.graph.node:
        scope = _meta(node).get("namespace", node.name)
        if "FacetExtractor" in scope and node.name not in in_blocks and any(k in scope for k in ("norm1", "linear", "block")):
            c[node.op_type] += 1
    return c


def op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def nodes_by_block(model) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for name, idx in block_map(model).items():
        out[idx].append(name)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Graph structure
# ---------------------------------------------------------------------------------------------


@dataclass
class GraphIndex:
    """Producer/consumer maps of one (top-level) graph; node names must be unique."""

    nodes: dict[str, Any]
    producer: dict[str, str]  # tensor -> node name
    consumers: dict[str, list[str]]  # tensor -> node names
    initializers: set[str]
    graph_inputs: set[str]
    graph_outputs: set[str]

    @classmethod
    def of(cls, model) -> "GraphIndex":
        g = model.graph
        nodes: dict[str, Any] = {}
        producer: dict[str, str] = {}
        consumers: dict[str, list[str]] = defaultdict(list)
        for i, node in enumerate(g.node):
            if not node.name or node.name in nodes:
                node.name = f"{node.op_type}_{i}_{node.name}"  # unnamed/duplicate nodes get a stable name
            nodes[node.name] = node
            for t in node.output:
                if t:
                    producer[t] = node.name
            for t in node.input:
                if t:
                    consumers[t].append(node.name)
        return cls(
            nodes=nodes,
            producer=producer,
            consumers=dict(consumers),
            initializers={i.name for i in g.initializer},
            graph_inputs={i.name for i in g.input},
            graph_outputs={o.name for o in g.output},
        )

    def is_constant(self, tensor: str) -> bool:
        """Initializer or computed only from initializers/Constant nodes (weights after exporter folding)."""
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if t in seen or t in self.initializers:
                continue
            seen.add(t)
            if t in self.graph_inputs or t not in self.producer:
                return t in self.initializers
            node = self.nodes[self.producer[t]]
            if node.op_type in ("Shape", "Size"):
                return False
            stack.extend(i for i in node.input if i)
        return True

    def downstream(self, starts: Iterable[str]) -> set[str]:
        """Node names reachable from the outputs of `starts` (excluding the starts themselves)."""
        seen: set[str] = set()
        queue = deque(starts)
        start_set = set(queue)
        while queue:
            name = queue.popleft()
            for t in self.nodes[name].output:
                for c in self.consumers.get(t, ()):
                    if c not in seen:
                        seen.add(c)
                        queue.append(c)
        return seen - start_set

    def reaches(self, start: str, targets: set[str], through: frozenset[str] = PASSTHROUGH, depth: int = 6) -> bool:
        """Does `start`'s output reach a node of op type in `targets` through `through` ops only?"""
        frontier = [start]
        for _ in range(depth):
            nxt = []
            for name in frontier:
                for t in self.nodes[name].output:
                    for c in self.consumers.get(t, ()):
                        op = self.nodes[c].op_type
                        if op in targets:
                            return True
                        if op in through:
                            nxt.append(c)
            frontier = nxt
            if not frontier:
                break
        return False

    def fed_by(self, tensor: str, sources: set[str], through: frozenset[str] = PASSTHROUGH, depth: int = 6) -> bool:
        """Is `tensor` computed from an op of type in `sources` through `through` ops only?"""
        frontier = [tensor]
        for _ in range(depth):
            nxt = []
            for t in frontier:
                name = self.producer.get(t)
                if name is None:
                    continue
                node = self.nodes[name]
                if node.op_type in sources:
                    return True
                if node.op_type in through:
                    nxt.extend(i for i in node.input if i and i not in self.initializers)
            frontier = nxt
            if not frontier:
                break
        return False


# ---------------------------------------------------------------------------------------------
# Types, shapes, FLOPs
# ---------------------------------------------------------------------------------------------


def _dims(value_info) -> list[int | None]:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def with_shapes(model):
    """The model with inferred value_info (a copy; models over 2 GB are returned as they are)."""
    onnx = onnx_module()
    if over_size(model, TWO_GB):
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort; callers fall back to the exporter's value_info
        return model


def tensor_types(model) -> dict[str, int]:
    """Tensor name -> ONNX elem type, from inputs, outputs, initializers, value_info and Constant nodes."""
    out: dict[str, int] = {}
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        out[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t.data_type
    return out


def tensor_shapes(model) -> dict[str, list[int | None]]:
    g = model.graph
    out = {vi.name: _dims(vi) for vi in list(g.input) + list(g.output) + list(g.value_info)}
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def _prod(xs: Iterable[int | None]) -> int:
    p = 1
    for x in xs:
        p *= x if x else 1  # symbolic dims (batch) count as 1: FLOPs are per image
    return p


def node_flops(model) -> dict[str, float]:
    """Multiply-accumulate FLOPs (2*MACs) per image of every MatMul/Gemm/Conv node, from inferred shapes."""
    shaped = with_shapes(model)
    shapes = tensor_shapes(shaped)
    out: dict[str, float] = {}
    for node in shaped.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        y = shapes.get(node.output[0])
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if not y or not a:
            out[node.name] = 0.0
            continue
        if node.op_type == "MatMul":
            k = a[-1] or (b[-2] if b and len(b) >= 2 else 1) or 1
            out[node.name] = 2.0 * _prod(y) * k
        elif node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = (a[0] if trans_a else a[-1]) or 1
            out[node.name] = 2.0 * _prod(y) * k
        else:  # Conv: weight [Cout, Cin/groups, kh, kw]
            k = _prod(b[1:]) if b else 1
            out[node.name] = 2.0 * _prod(y) * k
    return out
