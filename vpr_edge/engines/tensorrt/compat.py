"""`check_onnx`: will TensorRT's ONNX parser take this graph, and build it strongly typed? Offline, no TensorRT.

Pure Python over the ONNX protobuf, never the weights: a model on disk is read with its external data left
where it is (`graph.load(path, load_weights=False)`); only tensors of at most `VALUE_READ_LIMIT` bytes (Q/DQ
scales and zero points, shape constants) are read, by offset, from the external-data file. A full-size ViT-G
graph (3.3 GB of weights beside it) checks in seconds.

What is checked, per target in `onnx_support.TABLES` (default TensorRT 10.3 and 11):

1. **operator** / **operator-limit**: every node's op against onnx-tensorrt's `docs/operators.md` table of that
   version (supported, data-input types, the documented restrictions that can be read off a graph: Resize
   modes, pooling rank/dilations, constant `axes`/`K`/`depth`/`axis` inputs, only LayerNormalization's first
   output, TopK `sorted`/K < 3840, ScatterND reduction, ...); custom domains need a plugin; local functions
   and subgraph bodies are checked for operator support (not types).
   Not in the table, not enforced: ArgMax/ArgMin `select_last_index` (supported: the parser flips the input,
   importerUtils.cpp `argMinMaxHelper`); Gather/Scatter axes (10.x documents no axis limit).
2. **type**: a tensor type TensorRT lacks (DOUBLE activations; DOUBLE weights are only cast down, a warning;
   STRING, INT16, UINT16/32/64, complex, FP8 E5M2 and FNUZ variants, UINT4); UINT8 anywhere but a network
   input/output; INT8/INT4/FP8/FP4 anywhere but QuantizeLinear -> DequantizeLinear or a constant into a DQ
   ("quantized types ... only through quantization", operators.md 10.x); an input type the op's row does not
   list. INT64 rule: TensorRT >= 9 parses INT64 natively (Changelog 9.0 EA: "no longer automatically casts
   INT64 to INT32"), so INT64 is a problem exactly where the op's row lacks INT64 - "needs INT32" where the
   row lists INT32, "needs a float type" where it lists floats only.
3. **strong-typing**: TensorRT 10's STRONGLY_TYPED networks (the only mode in 11) take every tensor type from
   the ONNX types and insert no casts. With types from `onnx.shape_inference` (data_prop), every node's
   inputs/outputs bound to one ONNX type parameter must have one type and that type must be allowed by the
   op's schema at the model's opset; strict ONNX type inference must pass (declared value_info agrees with
   inferred types); mixed-precision BatchNormalization only from 10.7 (Changelog 10.7).
4. **qdq** (explicit quantization, onnxOpImporters.cpp `QuantDequantLinearHelper` + TensorRT's Quantize /
   Dequantize operator docs + "Explicit Quantization" guide): a scale input that is a build-time constant,
   non-empty, all positive, FP32/FP16/BF16; zero points constant, all zero, same volume as the scale, INT8 /
   FP8 / INT4 / FP4 (UINT8 is DLA-only: a UINT8 DQ input is rejected, a UINT8 Q zero point is replaced by
   INT8, which changes the clamp range); scale either a scalar (per tensor), 1-D with dims[axis] entries (per
   channel) or of the input's rank (block, INT4/FP4 weights only, opset >= 21 for `block_size`); per channel
   only on constant weights, on the output-channel axis of the consuming layer (Conv [K, C, R, S]: 0;
   ConvTranspose [C, K, R, S]: 1; MatMul [.., K, N]: last; Gemm B: 1, or 0 with transB); per-axis needs
   opset >= 13; every Q feeds only DQs and every DQ reads a Q or a constant; FP8/FP4 on the Jetson target
   (a warning: Orin is Ampere, SM 8.7). Per-tensor activations / per-channel weights for INT8, FP8 from Ada
   and FP4 from Blackwell: TensorRT Model Optimizer's support matrix
   (nvidia.github.io/Model-Optimizer/guides/0_support_matrix.html), which produces what TensorRT takes.
5. **shape**: only axis 0 of an input may be dynamic (`engines/build.py` builds one optimisation profile over
   the batch); every output has an inferred rank and static non-batch dims; a dynamic input batch must reach
   the outputs (an output with a literal batch means a Reshape baked it); a static batch must match
   `batch_sizes`; no tensor may exceed 2^31-1 elements at the largest batch (TensorRT's volume limit).
6. **external-data** / **model-size**: locations relative to the model's folder (what `parse_from_file`
   reads), files present, offset + length inside the file and length = dims x dtype; the protobuf without
   weights under protobuf's 2 GB.

Not checked (a real build is the only proof): kernel/tactic availability for a GPU, workspace and memory,
plugin presence, If/Loop branch shapes, numerics.

Polygraphy is not used here: its TensorRT-side tools (`inspect capability`, `supports_model`) need
TensorRT; its ONNX loaders add nothing to `onnx.load(load_external_data=False)`; its `InferShapes` prefers
ONNX Runtime's symbolic inference over a fully loaded model (weights read); its graph tools and `check lint`
need onnx-graphsurgeon (not installed) and an ONNX Runtime session. On the Jetson, `polygraphy inspect
capability model.onnx` is the dynamic counterpart of this check.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterable, Sequence

import numpy as np

from vpr_edge.engines import graph as G
from vpr_edge.engines.tensorrt import onnx_support as S
from vpr_edge.errors import ArtifactError, ConfigError

VALUE_READ_LIMIT = 1 << 20  # bytes: larger tensors are never read (weights)
SKELETON_KEEP = 1 << 16  # inline tensors up to this size stay in the inference copy (shape constants)
MAX_VOLUME = 2**31 - 1
PROTOBUF_LIMIT = G.TWO_GB  # one protobuf file; TensorRT's parser reads the .onnx through protobuf
SEVERITIES = ("error", "warning")
RULES = ("model-size", "opset", "operator", "operator-limit", "type", "strong-typing", "qdq", "shape",
         "external-data")
_EXTERNAL = 1  # TensorProto.EXTERNAL
FLOAT, UINT8, INT8, INT32, INT64, BOOL, FLOAT16, DOUBLE, BFLOAT16 = 1, 2, 3, 6, 7, 9, 10, 11, 16
FP8, INT4, FP4 = 17, 22, 23
_FLOATS = {FLOAT, FLOAT16, BFLOAT16}
_ZERO_POINT_TYPES = {INT8, UINT8, FP8, INT4, FP4}
_QUANTIZED = {INT8, FP8, INT4, FP4}
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
             17: 1, 18: 1, 19: 1, 20: 1, 24: 1}
_NIBBLE = {21, 22, 23}  # 4-bit types, two per byte
_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16,
       11: np.float64}
_RESIZE_CTM = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_NODE_IN_ERROR = re.compile(r"node name: ([^)]*)\)")


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing TensorRT would refuse (error) or handle differently than ONNX Runtime (warning)."""

    rule: str  # one of RULES
    node: str  # node name; `input:x` / `output:x` / `tensor:x` / `file:x` / `model` when no node is to blame
    op: str  # op type ("" for model-level problems)
    targets: tuple[str, ...]  # TensorRT versions affected
    message: str  # what was found and what TensorRT needs
    severity: str = "error"

    def line(self) -> str:
        what = f"{self.node} [{self.op}]" if self.op else self.node
        tag = "" if self.severity == "error" else " (warning)"
        return f"{what} TensorRT {', '.join(self.targets)} {self.rule}{tag}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "node": self.node, "op": self.op, "targets": list(self.targets),
                "severity": self.severity, "message": self.message}


@dataclass
class CompatReport:
    model: str
    targets: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    problems: list[Problem]
    op_counts: dict[str, int]
    opset: int
    tables: dict[str, dict[str, Any]]
    checks: dict[str, str]  # check -> "done" or why it was skipped / partial
    io: dict[str, list[dict[str, Any]]]  # inputs/outputs: name, type, dims
    profile: list[list[int]] | None  # (min, opt, max) input shape of a dynamic batch, else None
    seconds: float = 0.0

    def errors(self, target: str | None = None) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error" and (target is None or target in p.targets)]

    def warnings(self, target: str | None = None) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning" and (target is None or target in p.targets)]

    def verdict(self, target: str) -> str:
        """'ok' (warnings allowed) or 'problems' for one target."""
        if target not in self.targets:
            raise ConfigError(f"{target!r} was not checked; checked targets: {', '.join(self.targets)}")
        return "problems" if self.errors(target) else "ok"

    @property
    def ok(self) -> bool:
        return not self.errors()

    def lines(self) -> list[str]:
        return [p.line() for p in self.problems]

    def summary(self) -> str:
        verdicts = ", ".join(f"TensorRT {t}: {self.verdict(t)}" for t in self.targets)
        return (f"{self.model}: {verdicts} ({len(self.errors())} errors, {len(self.warnings())} warnings, "
                f"{sum(self.op_counts.values())} nodes, opset {self.opset}, {self.seconds:.2f} s)")

    def __str__(self) -> str:
        return "\n".join([self.summary(), *self.lines()])

    def raise_if_problems(self, target: str | None = None) -> None:
        errors = self.errors(target)
        if errors:
            shown = "\n".join(p.line() for p in errors[:20])
            more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise ArtifactError(f"{self.model} would not build with TensorRT "
                                f"{target or ', '.join(self.targets)}:\n{shown}{more}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.ok,
            "verdicts": {t: self.verdict(t) for t in self.targets},
            "errors": {t: len(self.errors(t)) for t in self.targets},
            "warnings": {t: len(self.warnings(t)) for t in self.targets},
            "batch_sizes": list(self.batch_sizes),
            "profile": self.profile,
            "opset": self.opset,
            "op_counts": dict(self.op_counts),
            "io": self.io,
            "tables": self.tables,
            "checks": dict(self.checks),
            "problems": [p.to_dict() for p in self.problems],
            "seconds": round(self.seconds, 3),
        }


class _Sink:
    """Collects problems per target and merges identical findings of several targets into one line."""

    def __init__(self, targets: Sequence[str]):
        self.targets = tuple(targets)
        self._found: dict[tuple[str, str, str, str, str], list[str]] = {}

    def add(self, rule: str, node: str, op: str, message: str, targets: Iterable[str] | None = None,
            severity: str = "error") -> None:
        key = (rule, node, op, message, severity)
        bucket = self._found.setdefault(key, [])
        for t in (self.targets if targets is None else targets):
            if t not in bucket:
                bucket.append(t)

    def has(self, node: str, rules: Iterable[str]) -> bool:
        rules = set(rules)
        return any(k[1] == node and k[0] in rules for k in self._found)

    def problems(self) -> list[Problem]:
        order = {t: i for i, t in enumerate(self.targets)}
        out = [Problem(rule=k[0], node=k[1], op=k[2], message=k[3], severity=k[4],
                       targets=tuple(sorted(ts, key=order.__getitem__)))
               for k, ts in self._found.items() if ts]
        rank = {r: i for i, r in enumerate(RULES)}
        return sorted(out, key=lambda p: (SEVERITIES.index(p.severity), rank.get(p.rule, 99)))


# ---------------------------------------------------------------------------------------------------------
# The model, without its weights
# ---------------------------------------------------------------------------------------------------------


def _inline_nbytes(t) -> int:
    if t.data_location == _EXTERNAL:
        return 0
    return t.ByteSize()


def _skeleton(model):
    """A copy for shape inference: structure, types and dims, small inline tensors; large data left out."""
    onnx = G.onnx_module()
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    src, dst = model.graph, m.graph
    dst.name = src.name
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    dst.node.extend(src.node)
    for t in src.initializer:
        if _inline_nbytes(t) <= SKELETON_KEEP:
            dst.initializer.append(t)
        else:  # name, type and dims are all shape inference needs
            s = dst.initializer.add()
            s.name, s.data_type = t.name, t.data_type
            s.dims.extend(t.dims)
            s.data_location = _EXTERNAL
            s.external_data.add(key="location", value="__not_loaded__")
    return m


def _nbytes(t) -> int | None:
    n = math.prod(t.dims) if t.dims else 1
    if t.data_type in _NIBBLE:
        return (n + 1) // 2
    size = _ITEMSIZE.get(t.data_type)
    return None if size is None else n * size


def _ext_info(t) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _tensor_values(t, base_dir: Path | None) -> np.ndarray | None:
    """Values of a small tensor (inline or external, read by offset); None for large or unreadable ones."""
    size = _nbytes(t)
    if size is None or size > VALUE_READ_LIMIT:
        return None
    dims = tuple(t.dims)
    if t.data_location == _EXTERNAL:
        info = _ext_info(t)
        if base_dir is None or "location" not in info:
            return None
        path = base_dir / info["location"]
        try:
            with open(path, "rb") as fh:
                fh.seek(int(info.get("offset", 0)))
                raw = fh.read(int(info.get("length", size)))
        except (OSError, ValueError):
            return None
        if len(raw) < size:
            return None
        return _from_raw(raw[:size], t.data_type, dims)
    if t.raw_data:
        return _from_raw(t.raw_data, t.data_type, dims)
    try:
        from onnx import numpy_helper

        arr = numpy_helper.to_array(t)
    except Exception:  # exotic types numpy cannot hold: treat as unreadable
        return None
    if t.data_type == BFLOAT16 and arr.dtype.kind not in "fc":
        return _bf16_to_f32(arr.astype(np.uint16)).reshape(dims)
    return np.asarray(arr)


def _from_raw(raw: bytes, data_type: int, dims: tuple[int, ...]) -> np.ndarray | None:
    if data_type == BFLOAT16:
        return _bf16_to_f32(np.frombuffer(raw, dtype=np.uint16)).reshape(dims)
    if data_type in (FP8, INT4, FP4):  # raw bytes: enough to tell zero from non-zero
        return np.frombuffer(raw, dtype=np.uint8)
    dtype = _NP.get(data_type)
    if dtype is None:
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _dims(vi) -> list[int | str | None] | None:
    """Dims of a value_info: int, the dim_param string, or None; None when the rank is unknown."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or None)
    return out


@dataclass
class _Ctx:
    model: Any  # inferred skeleton
    idx: G.GraphIndex
    types: dict[str, int]
    shapes: dict[str, list[int | str | None] | None]
    opset: int
    base_dir: Path | None
    originals: dict[str, Any]  # initializer name -> TensorProto of the model as given
    constant_nodes: dict[str, Any] = field(default_factory=dict)  # Constant output -> TensorProto
    _values: dict[str, np.ndarray | None] = field(default_factory=dict)

    def values(self, tensor: str) -> np.ndarray | None:
        """Values of an initializer or Constant output (small ones only)."""
        if tensor not in self._values:
            t = self.originals.get(tensor)
            t = self.constant_nodes.get(tensor) if t is None else t
            self._values[tensor] = None if t is None else _tensor_values(t, self.base_dir)
        return self._values[tensor]

    def direct_constant(self, tensor: str) -> bool:
        """An initializer or a Constant node's output: what the tables call 'an initializer'."""
        return tensor in self.idx.initializers or tensor in self.constant_nodes

    def used(self, tensor: str) -> bool:
        return bool(tensor) and (tensor in self.idx.consumers or tensor in self.idx.graph_outputs)

    def rank(self, tensor: str) -> int | None:
        dims = self.shapes.get(tensor)
        return None if dims is None else len(dims)

    def producer_op(self, tensor: str) -> str | None:
        name = self.idx.producer.get(tensor)
        return None if name is None else self.idx.nodes[name].op_type

    def blame(self, tensor: str) -> tuple[str, str]:
        """(node, op) to name for a tensor: its producer, else its first consumer, else the tensor."""
        name = self.idx.producer.get(tensor) or next(iter(self.idx.consumers.get(tensor, ())), None)
        if name is None:
            return f"tensor:{tensor}", ""
        return name, self.idx.nodes[name].op_type


def _attrs(node) -> dict[str, Any]:
    onnx = G.onnx_module()
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _load(model_or_path) -> tuple[Any, Path | None, str, int | None]:
    """(model without weights, its path, label, protobuf bytes on disk)."""
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        model = G.load(path, load_weights=False)
        return model, path, str(path), path.stat().st_size
    if not hasattr(model_or_path, "graph"):
        raise ConfigError("check_onnx takes an ONNX file path or an onnx.ModelProto, "
                          f"got {type(model_or_path).__name__}")
    return model_or_path, None, model_or_path.graph.name or "<in-memory model>", None


def _default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _resolve_targets(targets: Sequence[str]) -> tuple[S.OperatorTable, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    unknown = [t for t in targets if t not in S.TABLES]
    if unknown or not targets:
        raise ConfigError(f"unknown TensorRT target(s) {unknown or list(targets)}; known: {', '.join(S.TABLES)}")
    return tuple(S.TABLES[t] for t in dict.fromkeys(targets))


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def check_onnx(model_or_path, *, targets: Sequence[str] = S.DEFAULT_TARGETS,
               batch_sizes: Sequence[int] = (1,)) -> CompatReport:
    """Check an ONNX graph (path or ModelProto) against TensorRT's ONNX parser and strongly typed build rules.

    targets: TensorRT versions (`onnx_support.TABLES`: "10.3", "10.15", "11").
    batch_sizes: the batch sizes the engine must serve (a static batch must be one of them; a dynamic batch
    gets a (min, opt, max) profile over them, as `engines.build.profile_shapes` does)."""
    t0 = time.perf_counter()
    tables = _resolve_targets(targets)
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch_sizes must be positive integers like (1, 4, 8), got {tuple(batch_sizes)}")
    onnx = G.onnx_module()
    model, path, label, file_bytes = _load(model_or_path)
    sink = _Sink([t.target for t in tables])
    checks: dict[str, str] = {}

    _check_size(model, file_bytes, sink, checks)
    skeleton = _skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
        checks["inference"] = "onnx.shape_inference (data_prop)"
    except Exception as exc:  # inference is best effort: fall back to the exporter's value_info
        inferred = skeleton
        checks["inference"] = f"failed ({str(exc).splitlines()[0][:200]}); using the graph's own value_info"
    idx = G.GraphIndex.of(inferred)
    shapes: dict[str, list[int | str | None] | None] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        shapes[vi.name] = _dims(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    constant_nodes = {}
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    constant_nodes[node.output[0]] = a.t
    types = {t: et for t, et in G.tensor_types(inferred).items() if et}  # 0: UNDEFINED, i.e. not known
    ctx = _Ctx(model=inferred, idx=idx, types=types, shapes=shapes,
               opset=_default_opset(model), base_dir=path.parent if path else None,
               originals={t.name: t for t in model.graph.initializer}, constant_nodes=constant_nodes)

    _check_opset(ctx, tables, sink)
    _check_operators(ctx, tables, sink, checks)
    _check_tensor_types(ctx, sink)
    _check_strong_typing(ctx, tables, sink, skeleton, checks)
    _check_qdq(ctx, tables, sink)
    profile = _check_shapes(ctx, sizes, sink)
    _check_external_data(model, path, ctx, sink, checks)
    for name in ("operator", "type", "strong-typing", "qdq", "shape"):
        checks.setdefault(name, "done")

    counts = Counter((f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
                     for n in inferred.graph.node)
    real_inputs = [i for i in inferred.graph.input if i.name not in idx.initializers]
    io = {
        "inputs": [{"name": i.name, "type": S.type_name(ctx.types.get(i.name)), "dims": shapes.get(i.name)}
                   for i in real_inputs],
        "outputs": [{"name": o.name, "type": S.type_name(ctx.types.get(o.name)), "dims": shapes.get(o.name)}
                    for o in inferred.graph.output],
    }
    return CompatReport(
        model=label, targets=tuple(t.target for t in tables), batch_sizes=sizes, problems=sink.problems(),
        op_counts=dict(counts.most_common()), opset=ctx.opset, tables={t.target: t.to_dict() for t in tables},
        checks=checks, io=io, profile=profile, seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------------------
# 1. operators
# ---------------------------------------------------------------------------------------------------------


def _check_opset(ctx: _Ctx, tables, sink: _Sink) -> None:
    for t in tables:
        lo, hi = t.opsets
        if not lo <= ctx.opset <= hi:
            sink.add("opset", "model", "", f"default-domain opset {ctx.opset} is outside the opsets the parser "
                     f"supports ({lo}-{hi}): re-export with --opset {min(max(ctx.opset, lo), hi)}", [t.target])


def _sub_nodes(node) -> Iterable[Any]:
    """Nodes of the subgraphs (If/Loop/Scan bodies) of a node, recursively."""
    for a in node.attribute:
        graphs = [a.g] if a.HasField("g") else list(a.graphs)
        for g in graphs:
            for n in g.node:
                yield n
                yield from _sub_nodes(n)


def _check_operators(ctx: _Ctx, tables, sink: _Sink, checks: dict[str, str]) -> None:
    functions = {(f.domain, f.name): f for f in ctx.model.functions}
    used_functions: set[tuple[str, str]] = set()
    nested = 0
    for name, node in ctx.idx.nodes.items():
        key = (node.domain, node.op_type)
        if key in functions:  # local functions are inlined by the parser (TensorRT >= 9.0)
            used_functions.add(key)
            continue
        for t in tables:
            row = _op_row(name, node, t, sink)
            if row is not None:
                _check_node_types(name, node, row, ctx, t, sink)
                for msg in _restrictions(node, ctx, t):
                    msg, severity = msg if isinstance(msg, tuple) else (msg, "error")
                    sink.add("operator-limit", name, node.op_type, msg, [t.target], severity=severity)
        for sub in _sub_nodes(node):
            nested += 1
            for t in tables:
                _op_row(f"{name}/{sub.name or sub.op_type}", sub, t, sink)
    for key in sorted(used_functions):
        for fnode in functions[key].node:
            for t in tables:
                _op_row(f"function {key[1]}/{fnode.name or fnode.op_type}", fnode, t, sink)
    if nested or used_functions:
        checks["operator"] = (f"done; {nested} subgraph nodes and {len(used_functions)} local functions "
                              "checked for operator support only")


def _op_row(name: str, node, table: S.OperatorTable, sink: _Sink) -> S.OpSupport | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        sink.add("operator", name, f"{node.domain}::{op}", f"op of custom domain '{node.domain}': the parser has no "
                 f"importer for it; TensorRT needs a plugin registered as '{op}' (or export it as standard ONNX)",
                 [table.target])
        return None
    row = table.get(op)
    if row is None:
        sink.add("operator", name, op, f"'{op}' is not in the parser's operator table; rewrite it with supported "
                 "ops or provide a plugin", [table.target])
        return None
    if not row.supported:
        sink.add("operator", name, op, f"the ONNX parser does not support '{op}' (operators.md: N); rewrite it "
                 "with supported ops or provide a plugin", [table.target])
        return None
    return row


def _type_order(tn: str) -> int:
    order = ("FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "FP8", "INT4", "FP4", "UINT8", "BOOL")
    return order.index(tn) if tn in order else 99


def _check_node_types(name: str, node, row: S.OpSupport, ctx: _Ctx, table: S.OperatorTable, sink: _Sink) -> None:
    if not row.types:
        return
    which = S.DATA_INPUTS.get(node.op_type, (0,))
    picked = list(enumerate(node.input)) if which == S.ALL else [(i, node.input[i]) for i in which
                                                                  if i < len(node.input)]
    items = [(f"input {i} '{t}'", t) for i, t in picked if t]
    if node.op_type in S.TYPED_OUTPUTS and node.output:
        items.append((f"output '{node.output[0]}'", node.output[0]))
    listed = ", ".join(sorted(row.types, key=_type_order))
    for role, tensor in items:
        et = ctx.types.get(tensor)
        tn = S.TRT_TYPE.get(et) if et is not None else None
        # DOUBLE, non-TensorRT and quantized types are `_check_tensor_types`' findings
        if tn is None or tn == "DOUBLE" or tn in S.QUANTIZED_TYPES or tn in row.types:
            continue
        if tn == "UINT8":
            continue  # UINT8 is legal only at the network's edge: `_check_tensor_types`
        if tn == "INT64" and "INT32" in row.types:
            need = f"needs INT32 ({listed}): Cast it to INT32"
        elif tn in ("INT64", "INT32", "BOOL") and row.types <= S.FLOAT_TRT | {"INT8", "FP8"}:
            need = f"needs a float type ({listed}): Cast it (or compute it) in FP32"
        else:
            need = f"takes {listed}"
        sink.add("type", name, node.op_type, f"{role} is {tn}; '{node.op_type}' {need}", [table.target])


def _restrictions(node, ctx: _Ctx, table: S.OperatorTable) -> list[str | tuple[str, str]]:
    """The table's restrictions that can be read off the graph: messages, or (message, severity)."""
    op, ins = node.op_type, list(node.input)
    a = _attrs(node) if node.attribute else {}
    out: list[str | tuple[str, str]] = []

    def arg(i: int) -> str:
        return ins[i] if i < len(ins) else ""

    if op == "Resize":
        mode = a.get("mode", "nearest")
        if mode not in ("nearest", "linear"):
            out.append(f"mode '{mode}' is unsupported (nearest or linear; bicubic must be resampled before export)")
        ctm = a.get("coordinate_transformation_mode", "half_pixel")
        if ctm not in _RESIZE_CTM:
            out.append(f"coordinate_transformation_mode '{ctm}' is unsupported ({', '.join(sorted(_RESIZE_CTM))})")
        if mode == "nearest" and a.get("nearest_mode", "round_prefer_floor") not in _RESIZE_NEAREST:
            out.append(f"nearest_mode '{a['nearest_mode']}' is unsupported ({', '.join(sorted(_RESIZE_NEAREST))})")
        if a.get("antialias", 0):
            out.append("antialias is unsupported")
        if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            out.append("keep_aspect_ratio_policy must be 'stretch'")
        scales, rank = arg(2), ctx.rank(arg(0))
        if "axes" in a and scales and not ctx.idx.is_constant(scales) and rank is not None \
                and list(a["axes"]) != list(range(rank)):
            out.append("with tensor scales, axes must be 0..rank-1")
    elif op in ("AveragePool", "MaxPool", "LpPool"):
        kernel = a.get("kernel_shape")
        if op != "LpPool" and kernel is not None and len(kernel) not in (2, 3):
            out.append(f"{len(kernel)}-D pooling; only 2-D or 3-D pooling is supported")
        if any(d != 1 for d in a.get("dilations", ())):
            out.append("dilations must be empty or all ones")
        if op == "MaxPool" and len(node.output) > 1 and ctx.used(node.output[1]):
            out.append("the Indices output is unsupported")
    elif op == "LayerNormalization":
        if any(ctx.used(o) for o in node.output[1:]):
            out.append("only the first output (Y) is supported; Mean/InvStdDev must be unused")
    elif op.startswith("Reduce") and arg(1):
        if not ctx.direct_constant(arg(1)):
            out.append("the axes input must be an initializer")
    elif op in ("Squeeze", "Unsqueeze"):
        if arg(1):
            constant = ctx.idx.is_constant(arg(1)) if table.has("squeeze_dynamic_axes") else ctx.direct_constant(arg(1))
            if not constant:
                out.append("the axes input must be " + ("resolvable to a constant" if table.has("squeeze_dynamic_axes")
                                                        else "an initializer"))
        elif op == "Squeeze" and ctx.opset >= 13 and not table.has("squeeze_omitted_axes"):
            msg = "Squeeze without an axes input is parsed only from TensorRT 11.5: give axes explicitly"
            out.append((msg, "warning") if table.target.startswith("11") else msg)
    elif op == "CumSum" and arg(1) and not ctx.idx.is_constant(arg(1)):
        out.append("axis must be a build-time constant")
    elif op == "TopK":
        if a.get("sorted", 1) != 1:
            out.append("sorted must be 1")
        k = ctx.values(arg(1)) if arg(1) else None
        if k is not None and k.size and int(np.max(k)) >= 3840:
            out.append(f"K = {int(np.max(k))}; TensorRT needs K < 3840")
    elif op == "Dropout" and arg(2):
        mode = ctx.values(arg(2))
        if mode is None or bool(np.any(mode)):
            out.append("training_mode must be an initializer that is False")
    elif op == "Constant":
        bad = [k for k in ("sparse_value", "value_string", "value_strings") if k in a]
        if bad:
            out.append(f"attribute {', '.join(bad)} unsupported")
    elif op == "ScatterND" and a.get("reduction", "none") != "none":
        out.append(f"reduction '{a['reduction']}' unsupported (none only)")
    elif op == "EyeLike":
        dims = ctx.shapes.get(arg(0))
        if dims is None or not all(isinstance(d, int) for d in dims):
            out.append("the input must have static dimensions")
    elif op == "OneHot" and arg(1) and not ctx.idx.is_constant(arg(1)):
        out.append("depth must be a build-time constant")
    elif op == "GridSample":
        rank = ctx.rank(arg(0))
        allowed = (4, 5) if table.has("gridsample_5d") else (4,)
        if rank is not None and rank not in allowed:
            out.append(f"{rank}-D input; TensorRT takes {' or '.join(map(str, allowed))}-D")
    elif op == "LSTM":
        if a.get("input_forget", 0) or a.get("layout", 0):
            out.append("input_forget and layout must be 0")
    elif op == "Pad" and arg(3) and not table.has("pad_tensor_axes") and not ctx.direct_constant(arg(3)):
        out.append("the axes input must be an initializer (tensor axes from TensorRT 10.4)")
    elif op == "Hardmax":
        dims, axis = ctx.shapes.get(arg(0)), a.get("axis", -1)
        if dims is not None and -len(dims) <= axis < len(dims) and not isinstance(dims[axis], int):
            out.append("the axis dimension must be a build-time constant")
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. types
# ---------------------------------------------------------------------------------------------------------


def _check_tensor_types(ctx: _Ctx, sink: _Sink) -> None:
    idx = ctx.idx
    edge = idx.graph_inputs | idx.graph_outputs
    for tensor, et in ctx.types.items():
        tn = S.TRT_TYPE.get(et)
        if tensor in idx.initializers and tensor not in idx.consumers:
            continue  # unused initializer: never imported
        node, op = ctx.blame(tensor)
        where = (f"graph input '{tensor}'" if tensor in idx.graph_inputs and tensor not in idx.initializers else
                 f"graph output '{tensor}'" if tensor in idx.graph_outputs else
                 f"initializer '{tensor}'" if tensor in idx.initializers else f"tensor '{tensor}'")
        if node.startswith("tensor:") and tensor in edge:
            node = f"{'input' if tensor in idx.graph_inputs else 'output'}:{tensor}"
        if tn is None:
            sink.add("type", node, op, f"{where} is {S.type_name(et)}: not a TensorRT type (TensorRT has FP32, "
                     "FP16, BF16, INT32, INT64, INT8, FP8, INT4, FP4, UINT8 and BOOL)")
        elif tn == "DOUBLE":
            if tensor in idx.initializers or tensor in ctx.constant_nodes:
                sink.add("type", node, op, f"{where} is DOUBLE: the parser casts it to FLOAT, clamping to "
                         "+-FLT_MAX; store it as FLOAT", severity="warning")
            else:
                sink.add("type", node, op, f"{where} is DOUBLE: TensorRT has no DOUBLE tensors; compute in FP32")
        elif tn == "UINT8":
            zero_point_only = all(idx.nodes[c].op_type in ("QuantizeLinear", "DequantizeLinear")
                                  and tensor in idx.nodes[c].input[2:] for c in idx.consumers.get(tensor, ()))
            if tensor not in edge and not (tensor in idx.initializers and zero_point_only):
                sink.add("type", node, op, f"{where} is UINT8: TensorRT supports UINT8 only as a network input or "
                         "output; Cast to a supported type")
        elif et in _QUANTIZED:
            _check_quantized_tensor(tensor, et, where, ctx, sink)


def _check_quantized_tensor(tensor: str, et: int, where: str, ctx: _Ctx, sink: _Sink) -> None:
    """INT8/FP8/INT4/FP4 exist only between QuantizeLinear (or a constant) and DequantizeLinear."""
    idx, tn = ctx.idx, S.type_name(et)
    why = (f"TensorRT carries {tn} only from a QuantizeLinear (or a constant) into a DequantizeLinear "
           "(quantized types exist only through Q/DQ)")
    if tensor in idx.graph_inputs and tensor not in idx.initializers:
        sink.add("type", f"input:{tensor}", "", f"{where} is {tn}: {why}; feed floats and quantize in the graph")
    if tensor in idx.graph_outputs:
        sink.add("type", f"output:{tensor}", "", f"{where} is {tn}: {why}; dequantize before the output")
    producer = idx.producer.get(tensor)
    if producer is not None:
        pop = idx.nodes[producer].op_type
        if pop not in ("QuantizeLinear", "Constant", "Identity", "Cast"):
            sink.add("type", producer, pop, f"produces {tn} tensor '{tensor}': {why}")
    for c in idx.consumers.get(tensor, ()):
        cnode = idx.nodes[c]
        pos = [i for i, t in enumerate(cnode.input) if t == tensor]
        if cnode.op_type == "DequantizeLinear" and 0 in pos:
            continue
        if cnode.op_type in ("QuantizeLinear", "DequantizeLinear") and all(i == 2 for i in pos):
            continue  # zero point
        sink.add("type", c, cnode.op_type, f"reads {tn} tensor '{tensor}': {why}")


# ---------------------------------------------------------------------------------------------------------
# 3. strongly typed networks
# ---------------------------------------------------------------------------------------------------------


def _type_str(et: int) -> str:
    return f"tensor({S.ONNX_TYPE_NAMES.get(et, str(et)).lower()})"


def _check_strong_typing(ctx: _Ctx, tables, sink: _Sink, skeleton, checks: dict[str, str]) -> None:
    onnx = G.onnx_module()
    untyped = 0
    for name, node in ctx.idx.nodes.items():
        untyped += sum(1 for o in node.output if o and o not in ctx.types)
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, ctx.opset, node.domain)
        except Exception:  # unknown op: `_check_operators` reports it
            continue
        _check_schema_types(name, node, schema, ctx, sink)
        _check_attributes(name, node, schema, ctx, sink)
        if node.op_type == "BatchNormalization":
            kinds = {ctx.types.get(t) for t in node.input[:5] if t} - {None}
            if len(kinds) > 1:
                found = ", ".join(sorted(S.type_name(k) for k in kinds))
                sink.add("strong-typing", name, node.op_type, f"mixed-precision BatchNormalization ({found}) parses "
                         "in strongly typed mode only from TensorRT 10.7: give scale, bias, mean and var the input's "
                         "type", [t.target for t in tables if not t.has("bn_mixed_precision")])
        if node.op_type == "Pow" and len(node.input) == 2:
            a, b = (ctx.types.get(t) for t in node.input)
            if a is not None and b is not None and a != b:
                sink.add("strong-typing", name, node.op_type, f"base {S.type_name(a)} and exponent {S.type_name(b)}: "
                         "ONNX allows it, TensorRT's elementwise layer computes on one type; make the exponent "
                         "the base's type with a Cast (not verified whether the parser casts it)", severity="warning")
    if untyped:
        checks["strong-typing"] = f"done; {untyped} node outputs without an inferred type were not checked"
    try:
        onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError or a schema error: the message names the node
        text = " ".join(str(exc).split())
        m = _NODE_IN_ERROR.search(text)
        node = m.group(1).strip() if m else ""
        node = node if node in ctx.idx.nodes else "model"  # unnamed nodes are named by GraphIndex only
        if not sink.has(node, ("strong-typing", "type", "operator")):
            op = ctx.idx.nodes[node].op_type if node in ctx.idx.nodes else ""
            sink.add("strong-typing", node, op, f"ONNX strict type inference fails: {text[:300]}; a strongly typed "
                     "network takes the ONNX types as declared, so they must be consistent")


def _check_schema_types(name: str, node, schema, ctx: _Ctx, sink: _Sink) -> None:
    onnx = G.onnx_module()
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    bound: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def bind(formals, actuals, kind: str) -> None:
        for i, tensor in enumerate(actuals):
            if not tensor:
                continue
            if i < len(formals):
                formal = formals[i]
            elif formals and formals[-1].option == variadic:
                formal = formals[-1]
            else:
                continue
            if formal.option == variadic and not formal.is_homogeneous:
                continue
            et = ctx.types.get(tensor)
            if et is not None:
                bound[formal.type_str].append((f"{kind} {i} '{tensor}'", et))

    bind(schema.inputs, node.input, "input")
    bind(schema.outputs, node.output, "output")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for param, items in bound.items():
        kinds = {et for _, et in items}
        if len(kinds) > 1:
            found = ", ".join(f"{role} {S.type_name(et)}" for role, et in items)
            sink.add("strong-typing", name, node.op_type, f"{found} share ONNX type {param}: a strongly typed "
                     "network inserts no implicit casts; make them one type with an explicit Cast")
        ok = allowed.get(param, {param})
        for et in kinds:
            if _type_str(et) not in ok:
                roles = ", ".join(role for role, k in items if k == et)
                hint = (" (FP16/BF16 Q/DQ inputs and scales need opset >= 19)"
                        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and ctx.opset < 19 else "")
                sink.add("strong-typing", name, node.op_type, f"{roles} is {S.type_name(et)}, which "
                         f"{node.op_type}-{schema.since_version} does not allow for {param}{hint}")


def _attribute_since(op: str, attribute: str, domain: str, after: int) -> int | None:
    """The first opset after `after` whose schema of `op` defines `attribute`."""
    onnx = G.onnx_module()
    for version in range(after + 1, onnx.defs.onnx_opset_version() + 1):
        try:
            if attribute in onnx.defs.get_schema(op, version, domain).attributes:
                return version
        except Exception:  # no schema at that version
            continue
    return None


def _check_attributes(name: str, node, schema, ctx: _Ctx, sink: _Sink) -> None:
    for a in node.attribute:
        if a.name not in schema.attributes:
            since = _attribute_since(node.op_type, a.name, node.domain, ctx.opset)
            need = f"; it needs opset >= {since}" if since else ""
            sink.add("strong-typing", name, node.op_type, f"attribute '{a.name}' is not defined for "
                     f"{node.op_type}-{schema.since_version} (opset {ctx.opset}){need}")


# ---------------------------------------------------------------------------------------------------------
# 4. explicit quantization
# ---------------------------------------------------------------------------------------------------------


def _weight_axis(consumer, k: int, rank: int | None, ctx: _Ctx) -> tuple[int | None, str]:
    """The output-channel axis TensorRT needs for a per-channel constant feeding input k of `consumer`."""
    op = consumer.op_type
    if op == "Conv" and k == 1:
        return 0, "Conv weights [K, C/g, R, S]: K, axis 0"
    if op == "ConvTranspose" and k == 1:
        return 1, "ConvTranspose weights [C, K/g, R, S]: K, axis 1"
    if op == "MatMul" and k == 1 and rank:
        return rank - 1, f"MatMul weights [.., K, N]: N, axis {rank - 1}"
    if op == "Gemm" and k == 1:
        trans = _attrs(consumer).get("transB", 0)
        return (0, "Gemm B with transB=1 [N, K]: N, axis 0") if trans else (1, "Gemm B [K, N]: N, axis 1")
    return None, ""


def _check_qdq(ctx: _Ctx, tables, sink: _Sink) -> None:
    idx = ctx.idx
    orin = [t.target for t in tables if t.target == "10.3"]
    for name, node in idx.nodes.items():
        op = node.op_type
        if op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_dq = op == "DequantizeLinear"
        ins = list(node.input) + ["", "", ""]
        x, scale, zp = ins[0], ins[1], ins[2]
        a = _attrs(node) if node.attribute else {}

        # pairs: every Q feeds DQs only; every DQ reads a Q or a constant
        if not is_dq:
            for c in idx.consumers.get(node.output[0], ()):
                if idx.nodes[c].op_type != "DequantizeLinear":
                    sink.add("qdq", name, op, f"its output feeds {idx.nodes[c].op_type} '{c}': TensorRT's explicit "
                             "quantization needs every QuantizeLinear followed by a DequantizeLinear")
            if node.output[0] in idx.graph_outputs:
                sink.add("qdq", name, op, "its quantized output is a graph output: add a DequantizeLinear")
        elif x and not idx.is_constant(x) and ctx.producer_op(x) != "QuantizeLinear":
            src = ctx.producer_op(x) or "a graph input"
            sink.add("qdq", name, op, f"input '{x}' comes from {src}, not from a QuantizeLinear or a constant: "
                     "TensorRT dequantizes only Q outputs or pre-quantized constant weights")

        # scale
        if not scale:
            sink.add("qdq", name, op, "no scale input: TensorRT needs at least 2 inputs (x, scale)")
            continue
        if not idx.is_constant(scale):
            sink.add("qdq", name, op, f"scale '{scale}' is computed at run time: TensorRT needs a build-time "
                     "constant scale (initializer or Constant)")
        else:
            vals = ctx.values(scale)
            if vals is not None:
                if vals.size == 0:
                    sink.add("qdq", name, op, f"scale '{scale}' has no coefficients")
                elif not bool(np.all(vals > 0)):
                    sink.add("qdq", name, op, f"scale '{scale}' has non-positive coefficients (min "
                             f"{float(np.min(vals)):g}): TensorRT needs all scale coefficients > 0")
        st = ctx.types.get(scale)
        if st is not None and st not in _FLOATS:
            sink.add("qdq", name, op, f"scale '{scale}' is {S.type_name(st)}: TensorRT takes FP32, FP16 or BF16 scales")

        # zero point and quantized type
        if zp:
            qtype = ctx.types.get(zp)
        elif is_dq:
            qtype = ctx.types.get(x)
        elif "output_dtype" in a:
            qtype = a["output_dtype"]
        else:
            qtype = INT8  # TensorRT defaults a missing zero point to INT8 (ONNX: UINT8)
            sink.add("qdq", name, op, "no zero point: ONNX quantizes to UINT8 [0, 255], TensorRT to INT8 "
                     "[-128, 127]; give an INT8 zero point of 0 so both agree", severity="warning")
        if is_dq and ctx.types.get(x) == UINT8:
            sink.add("qdq", name, op, f"input '{x}' is UINT8: TensorRT dequantizes UINT8 only on DLA "
                     "(kENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA); quantize symmetrically to INT8")
        elif zp and qtype == UINT8:
            sink.add("qdq", name, op, f"zero point '{zp}' is UINT8: TensorRT supports UINT8 Q/DQ only on DLA and "
                     "quantizes to INT8 instead, so the clamp range changes from [0, 255] to [-128, 127]; use an "
                     "INT8 zero point of 0")
        elif zp and qtype is not None and qtype not in _ZERO_POINT_TYPES:
            sink.add("qdq", name, op, f"zero point '{zp}' is {S.type_name(qtype)}: TensorRT quantizes to INT8, FP8, "
                     "INT4 or FP4")
        if qtype in (FP8, FP4) and orin:
            gpus = "FP8 needs Ada (8.9) or later" if qtype == FP8 else "FP4 needs Blackwell or later"
            sink.add("qdq", name, op, f"{S.type_name(qtype)} quantization: Jetson Orin (compute capability 8.7, "
                     f"Ampere) has no such kernels ({gpus}); use INT8 for the Jetson engine", orin, severity="warning")
        if zp:
            if not idx.is_constant(zp):
                sink.add("qdq", name, op, f"zero point '{zp}' is computed at run time: TensorRT needs a constant, "
                         "all-zero zero point")
            else:
                zv = ctx.values(zp)
                if zv is not None and bool(np.any(zv != 0)):
                    sink.add("qdq", name, op, f"zero point '{zp}' is not all zero: TensorRT quantization is "
                             "symmetric (zero points must be 0)")
            zdims, sdims = ctx.shapes.get(zp), ctx.shapes.get(scale)
            if zdims is not None and sdims is not None and all(isinstance(d, int) for d in zdims + sdims) \
                    and math.prod(zdims) != math.prod(sdims):
                sink.add("qdq", name, op, f"zero point volume {math.prod(zdims)} != scale volume {math.prod(sdims)}: "
                         "TensorRT needs equal volumes")

        # granularity
        if "block_size" in a and ctx.opset < 21:
            sink.add("qdq", name, op, f"block_size needs opset >= 21 (model: {ctx.opset})")
        sdims = ctx.shapes.get(scale)
        if sdims is None or not all(isinstance(d, int) for d in sdims):
            continue
        svol = math.prod(sdims)
        if svol == 1:
            continue  # per tensor
        xdims = ctx.shapes.get(x)
        rank = None if xdims is None else len(xdims)
        if ctx.opset < 13:
            sink.add("qdq", name, op, f"per-axis scale ({svol} entries) needs opset >= 13 (the axis attribute)")
            continue
        if len(sdims) == 1:
            _check_per_channel(name, node, x, a.get("axis", 1), svol, xdims, is_dq, ctx, sink)
        elif rank is not None and len(sdims) == rank:
            if qtype not in (INT4, FP4):
                sink.add("qdq", name, op, f"block quantization (scale {sdims}) of {S.type_name(qtype)}: TensorRT "
                         "documents block quantization for INT4 / FP4 weights only")
            if not idx.is_constant(x if not is_dq else _q_source(x, ctx)):
                sink.add("qdq", name, op, "block quantization of an activation: TensorRT block-quantizes "
                         "constant weights only")
        else:
            sink.add("qdq", name, op, f"scale of rank {len(sdims)} for an input of rank {rank}: TensorRT takes a "
                     "scalar (per tensor), a 1-D scale (per channel) or one of the input's rank (block)")


def _q_source(tensor: str, ctx: _Ctx) -> str:
    """What a DQ's input quantizes: the Q's own input when it comes from a Q, else the tensor itself."""
    name = ctx.idx.producer.get(tensor)
    if name is not None and ctx.idx.nodes[name].op_type == "QuantizeLinear":
        return ctx.idx.nodes[name].input[0]
    return tensor


def _check_per_channel(name: str, node, x: str, axis: int, svol: int, xdims, is_dq: bool, ctx: _Ctx,
                       sink: _Sink) -> None:
    op, idx = node.op_type, ctx.idx
    rank = None if xdims is None else len(xdims)
    if rank is not None:
        if not -rank <= axis < rank:
            sink.add("qdq", name, op, f"axis {axis} outside the input's rank {rank}")
            return
        axis %= rank
        if isinstance(xdims[axis], int) and xdims[axis] != svol:
            sink.add("qdq", name, op, f"{svol} scales for {xdims[axis]} channels on axis {axis}: TensorRT needs one "
                     "scale per output channel")
    source = _q_source(x, ctx) if is_dq else x
    if not idx.is_constant(source):
        sink.add("qdq", name, op, f"per-channel scale ({svol} entries, axis {axis}) on activation '{source}': "
                 "TensorRT quantizes activations per tensor; per-channel scales are for constant weights")
        return
    # the layer the dequantized weight feeds
    dq_outputs = [node.output[0]] if is_dq else [idx.nodes[c].output[0] for c in idx.consumers.get(node.output[0], ())
                                                  if idx.nodes[c].op_type == "DequantizeLinear"]
    for out in dq_outputs:
        for c in idx.consumers.get(out, ()):
            consumer = idx.nodes[c]
            for k, t in enumerate(consumer.input):
                if t != out:
                    continue
                expected, why = _weight_axis(consumer, k, rank, ctx)
                if expected is None:
                    sink.add("qdq", name, op, f"per-channel weights feed {consumer.op_type} '{c}' input {k}: TensorRT "
                             "documents per-channel weights for Conv, ConvTranspose, Gemm and MatMul weight inputs "
                             "only; axis not verified", severity="warning")
                elif rank is not None and axis != expected:
                    sink.add("qdq", name, op, f"per-channel axis {axis} on the weights of {consumer.op_type} '{c}': "
                             f"TensorRT needs the output-channel axis ({why})")


# ---------------------------------------------------------------------------------------------------------
# 5. shapes
# ---------------------------------------------------------------------------------------------------------


def _check_shapes(ctx: _Ctx, sizes: tuple[int, ...], sink: _Sink) -> list[list[int]] | None:
    idx = ctx.idx
    inputs = [i for i in ctx.model.graph.input if i.name not in idx.initializers]
    batch_symbols: set[str | None] = set()
    static_batch: set[int] = set()
    profile = None
    for inp in inputs:
        dims = ctx.shapes.get(inp.name)
        where = f"input:{inp.name}"
        readers = ctx.idx.consumers.get(inp.name, [])
        read_by = f" (read by {', '.join(readers[:3])}{', ...' if len(readers) > 3 else ''})" if readers else ""
        if not dims:
            sink.add("shape", where, "", "no shape (rank unknown or 0): TensorRT needs a rank and static non-batch "
                     "dims for every input")
            continue
        if isinstance(dims[0], int):
            static_batch.add(dims[0])
            if any(b != dims[0] for b in sizes):
                sink.add("shape", where, "", f"the batch is fixed to {dims[0]} in the graph{read_by} but batch sizes "
                         f"{list(sizes)} were asked for: re-export with --batch dynamic (or ask for {dims[0]})")
        else:
            batch_symbols.add(dims[0])
        for k, d in enumerate(dims[1:], start=1):
            if not isinstance(d, int) or d <= 0:
                sink.add("shape", where, "", f"dim {k} is dynamic ({d or '?'}){read_by}: only the batch axis may be "
                         "dynamic (the engine takes one optimisation profile over the batch); re-export with a fixed "
                         "image size")
        if not isinstance(dims[0], int) and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            lo, hi = min(sizes), max(sizes)
            opt = sorted(set(sizes))[(len(set(sizes)) - 1) // 2]
            profile = [[b, *dims[1:]] for b in (lo, opt, hi)]
    for out in ctx.model.graph.output:
        dims = ctx.shapes.get(out.name)
        where = f"output:{out.name}"
        node, op = ctx.blame(out.name)
        if dims is None:
            sink.add("shape", node, op, f"the shape of output '{out.name}' cannot be inferred: TensorRT must know "
                     "its rank; check the ops before it")
            continue
        for k, d in enumerate(dims):
            if k == 0 and batch_symbols:
                if isinstance(d, int):
                    sink.add("shape", node, op, f"output '{out.name}' has batch {d} while the input batch is dynamic: "
                             "a Reshape/Expand with a literal shape fixed it; make it follow the input batch")
                elif d not in batch_symbols:
                    sink.add("shape", node, op, f"output '{out.name}' dim 0 is '{d or '?'}', not proven equal to the "
                             f"input batch ({', '.join(str(s) for s in batch_symbols)})", severity="warning")
            elif k == 0 and static_batch and isinstance(d, int) and d not in static_batch:
                sink.add("shape", node, op, f"output '{out.name}' has batch {d}, the input {sorted(static_batch)}",
                         severity="warning")
            elif k > 0 and not isinstance(d, int):
                sink.add("shape", node, op, f"output '{out.name}' dim {k} is dynamic ({d or '?'}): a data-dependent "
                         "output shape; TensorRT needs it static to size the output buffer")
    # TensorRT's per-tensor volume limit at the largest batch
    top = max(sizes)
    for tensor, dims in ctx.shapes.items():
        if not dims or tensor in idx.initializers:
            continue
        vol = 1
        for k, d in enumerate(dims):
            if isinstance(d, int):
                vol *= d
            elif k == 0 and (d in batch_symbols or not batch_symbols):
                vol *= top
            else:
                vol = 0
                break
        if vol > MAX_VOLUME:
            node, op = ctx.blame(tensor)
            sink.add("shape", node, op, f"tensor '{tensor}' has {vol} elements at batch {top}: TensorRT layers take "
                     f"at most 2^31-1 elements per tensor; use a smaller batch")
    return profile


# ---------------------------------------------------------------------------------------------------------
# 6. external data and size
# ---------------------------------------------------------------------------------------------------------


def _check_size(model, file_bytes: int | None, sink: _Sink, checks: dict[str, str]) -> None:
    if file_bytes is not None:
        too_big = file_bytes > PROTOBUF_LIMIT
        size = file_bytes
    else:
        too_big = G.over_size(model, PROTOBUF_LIMIT)
        size = None if too_big else model.ByteSize()
    if too_big:
        sink.add("model-size", "model", "", f"the ONNX protobuf is {size or 'over 2^31'} bytes: protobuf (and so "
                 "TensorRT's parser) reads at most 2 GB from one file; save the weights as external data")
    checks["model-size"] = f"done ({size} bytes)" if size is not None else "done (over 2 GB)"


def _all_tensors(model) -> Iterable[Any]:
    yield from model.graph.initializer
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    yield a.t


def _check_external_data(model, path: Path | None, ctx: _Ctx, sink: _Sink, checks: dict[str, str]) -> None:
    external = [t for t in _all_tensors(model) if t.data_location == _EXTERNAL]
    if not external:
        checks["external-data"] = "done (no external data)"
        return
    if path is None:
        checks["external-data"] = "skipped: in-memory model with external data; pass the file path"
        sink.add("external-data", "model", "", f"{len(external)} tensors reference external data but the model was "
                 "given in memory: their files cannot be checked; pass the .onnx path", severity="warning")
        return
    base = path.parent
    files: dict[str, int | None] = {}
    missing: dict[str, list[str]] = defaultdict(list)
    for t in external:
        info = _ext_info(t)
        loc = info.get("location", "")
        node, op = ctx.blame(t.name)
        if not loc:
            sink.add("external-data", node, op, f"initializer '{t.name}' is external but has no location")
            continue
        pure = PurePath(loc)
        if pure.is_absolute() or ".." in pure.parts:
            sink.add("external-data", node, op, f"initializer '{t.name}' points at '{loc}': TensorRT's parse_from_file "
                     "reads external data relative to the model's folder; save with a relative location beside "
                     "the model")
            continue
        if loc not in files:
            f = base / loc
            files[loc] = f.stat().st_size if f.is_file() else None
        fsize = files[loc]
        if fsize is None:
            missing[loc].append(t.name)
            continue
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            sink.add("external-data", node, op, f"initializer '{t.name}' has a non-integer offset/length")
            continue
        expected = _nbytes(t)
        if length is not None and expected is not None and length != expected:
            sink.add("external-data", node, op, f"initializer '{t.name}' has length {length} bytes; its dims and type "
                     f"need {expected}")
        need = length if length is not None else expected
        if need is not None and offset + need > fsize:
            sink.add("external-data", node, op, f"initializer '{t.name}' reads bytes {offset}..{offset + need} of "
                     f"'{loc}', which has {fsize}: the file is truncated or belongs to another export")
    for loc, names in missing.items():
        node, op = ctx.blame(names[0])
        sink.add("external-data", node, op, f"external data file '{loc}' is missing beside the model ({base}); "
                 f"{len(names)} initializers (first '{names[0]}') live in it: copy it next to the .onnx")
    checks["external-data"] = f"done ({len(external)} tensors in {len(files)} files)"
