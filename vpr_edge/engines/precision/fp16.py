"""FP16 in the graph: `Fp16FromOnnx`, with FP32 islands and overflow detection.

Library choice: onnxconverter-common's `float16.convert_float_to_float16`, not ModelOpt AutoCast.
It is pure Python, already in the `export` extra, runs with the CPU `onnxruntime` package (ModelOpt's
ONNX extra pulls `onnxruntime-gpu` and CUDA-oriented dependencies, which would break the CPU
install), and takes an explicit node block list, which is all we need because the islands are
decided here (`islands.py`, overflow scan, fallback search). Its known rough edges are handled
around the call, not by patching it:

- a `Cast(to=FLOAT)` outside the block list keeps casting to FP32 while its output is declared FP16:
  such casts are retargeted to FP16 before conversion;
- an FP32 initializer shared by a kept and a converted node (the exporter deduplicates identical
  tensors across blocks) would feed FP32 into an FP16 node: shared float initializers are
  duplicated per side before conversion;
- `Cast16 -> Cast32` pairs between two kept nodes are only removed when the producer has a single
  consumer, so an island boundary could round-trip values through FP16: every such pair is
  rewired to the FP32 original afterwards;
- the result is checked: ONNX strict type inference, then every island node's float inputs and
  outputs must be FP32 (`check_fp32_islands`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from vpr_edge.engines import graph as G
from vpr_edge.engines.precision.islands import default_fp32_islands
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.lazy import lazy_import

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
SCAN_BATCH = 4  # overflow-scan images per run at most (`scan_batch` lowers it for big token counts)
OVERFLOW_FRACTION = 0.5  # flag values above half the FP16 range: one more add or square overflows
_IO_DTYPES = {"float32": G.FLOAT, "float16": G.FLOAT16}


@dataclass
class Fp16Report:
    kept: dict[str, str]  # node name -> why it stays FP32
    converted: int  # float compute nodes now in FP16
    casts: int  # Cast nodes in the result
    input_dtype: str
    output_dtype: str
    library: str
    overflow: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> stats (when scanned)

    def to_dict(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for why in self.kept.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {
            "library": self.library,
            "input_dtype": self.input_dtype,
            "output_dtype": self.output_dtype,
            "fp32_nodes": len(self.kept),
            "fp32_reasons": reasons,
            "fp32_node_names": sorted(self.kept),
            "fp16_nodes": self.converted,
            "casts": self.casts,
            "overflow_tensors": self.overflow,
        }


def _io_dtypes(io_dtype: str | tuple[str, str]) -> tuple[str, str]:
    pair = (io_dtype, io_dtype) if isinstance(io_dtype, str) else tuple(io_dtype)
    if len(pair) != 2 or any(d not in _IO_DTYPES for d in pair):
        raise ConfigError(f"io_dtype must be 'float32', 'float16' or an (input, output) pair of them; got {io_dtype!r}")
    return pair[0], pair[1]


# ---------------------------------------------------------------------------------------------
# Fixes around onnxconverter-common
# ---------------------------------------------------------------------------------------------


def _retarget_float_casts(model, keep: set[str]) -> None:
    for node in model.graph.node:
        if node.op_type == "Cast" and node.name not in keep:
            for a in node.attribute:
                if a.name == "to" and a.i == G.FLOAT:
                    a.i = G.FLOAT16


def _split_shared_initializers(model, keep: set[str]) -> int:
    """Give kept nodes their own copy of float initializers they share with converted nodes."""
    g = model.graph
    float_inits = {i.name: i for i in g.initializer if i.data_type == G.FLOAT}
    users: dict[str, set[bool]] = {}
    for node in g.node:
        for t in node.input:
            if t in float_inits:
                users.setdefault(t, set()).add(node.name in keep)
    copies = 0
    for name, sides in users.items():
        if len(sides) < 2:
            continue
        copy = g.initializer.add()
        copy.CopyFrom(float_inits[name])
        copy.name = f"{name}__fp32"
        for node in g.node:
            if node.name in keep:
                for i, t in enumerate(node.input):
                    if t == name:
                        node.input[i] = copy.name
        copies += 1
    return copies


def _ensure_value_info(model):
    """onnxconverter-common decides casts from value_info: every computed float tensor needs one, and
    initializers must have none (the exporter writes some; the converter would retype them to FP16 and
    cast kept nodes' FP32 weights through FP16)."""
    produced = {t for n in model.graph.node for t in n.output if t}
    known = {v.name for v in model.graph.value_info} | {o.name for o in model.graph.output}
    if not produced <= known:
        model = G.with_shapes(model)
    inits = {i.name for i in model.graph.initializer}
    for v in [v for v in model.graph.value_info if v.name in inits]:
        model.graph.value_info.remove(v)
    return model


def _fuse_cast_roundtrips(model) -> int:
    """x(fp32) -> Cast16 -> Cast32 -> y  becomes  x -> y for every consumer; unused casts are dropped."""
    g = model.graph
    idx = G.GraphIndex.of(model)
    types = G.tensor_types(model)

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    rewired = 0
    for node in list(g.node):
        if cast_to(node) != G.FLOAT:
            continue
        src = idx.producer.get(node.input[0])
        if src is None or cast_to(idx.nodes[src]) != G.FLOAT16:
            continue
        original = idx.nodes[src].input[0]
        if types.get(original) != G.FLOAT:
            continue
        out = node.output[0]
        if out in idx.graph_outputs:
            continue
        for consumer in idx.consumers.get(out, ()):
            c = idx.nodes[consumer]
            for i, t in enumerate(c.input):
                if t == out:
                    c.input[i] = original
                    rewired += 1
    _drop_dead_nodes(model, only_ops={"Cast"})
    return rewired


def _drop_dead_nodes(model, only_ops: set[str]) -> None:
    g = model.graph
    while True:
        used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in only_ops and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)


def _cast_output(model, idx, src, name: str, suffix: str, to: int, cast_name: str) -> None:
    """Rename graph output `name` inside the graph to name+suffix and re-create it through a Cast(to)."""
    helper = lazy_import("onnx").helper
    inner = f"{name}{suffix}"
    for i, t in enumerate(src.output):
        if t == name:
            src.output[i] = inner
    for cname in idx.consumers.get(name, []):
        c = idx.nodes[cname]
        for i, t in enumerate(c.input):
            if t == name:
                c.input[i] = inner
    model.graph.node.append(helper.make_node("Cast", [inner], [name], to=to, name=cast_name))


def _restore_fp32_outputs(model) -> None:
    """When the node producing a graph output is kept in FP32, the converter casts its output to FP16
    and retypes the graph output itself (its keep_io_types then sees no FP32 output to protect).
    Undo that: the output stays FP32, exactly as the kept node computed it."""
    idx = G.GraphIndex.of(model)
    types = G.tensor_types(model)
    for out in model.graph.output:
        if out.type.tensor_type.elem_type != G.FLOAT16:
            continue
        src = idx.nodes.get(idx.producer.get(out.name, ""))
        to = next((a for a in src.attribute if a.name == "to"), None) if src is not None and src.op_type == "Cast" else None
        if to is not None and types.get(src.input[0]) == G.FLOAT:
            to.i = G.FLOAT  # the converter's Cast16 of an FP32 value becomes a no-op cast
        else:
            _cast_output(model, idx, src, out.name, "__fp16", G.FLOAT, f"cast32_{out.name}")
        out.type.tensor_type.elem_type = G.FLOAT


def _set_io_dtypes(model, input_dtype: str, output_dtype: str) -> None:
    """The converter ran with FP32 I/O; switch the graph's float inputs/outputs to FP16 where asked."""
    helper = lazy_import("onnx").helper
    g = model.graph
    if input_dtype == "float16":
        for inp in g.input:
            if inp.type.tensor_type.elem_type != G.FLOAT:
                continue
            inp.type.tensor_type.elem_type = G.FLOAT16
            idx = G.GraphIndex.of(model)
            for cname in idx.consumers.get(inp.name, []):
                c = idx.nodes[cname]
                cast_16 = c.op_type == "Cast" and any(a.name == "to" and a.i == G.FLOAT16 for a in c.attribute)
                if cast_16:  # the converter's input cast is now a no-op: bypass it
                    for other in idx.consumers.get(c.output[0], []):
                        o = idx.nodes[other]
                        for i, t in enumerate(o.input):
                            if t == c.output[0]:
                                o.input[i] = inp.name
                else:  # an FP32 consumer of the input: give it an FP32 copy
                    new = f"{inp.name}__fp32_for_{cname}"
                    g.node.insert(0, helper.make_node("Cast", [inp.name], [new], to=G.FLOAT, name=f"cast32_{new}"))
                    for i, t in enumerate(c.input):
                        if t == inp.name:
                            c.input[i] = new
        _drop_dead_nodes(model, only_ops={"Cast"})
    if output_dtype == "float16":
        for out in g.output:
            if out.type.tensor_type.elem_type != G.FLOAT:
                continue
            idx = G.GraphIndex.of(model)
            src = idx.nodes[idx.producer[out.name]]
            _cast_output(model, idx, src, out.name, "__fp32", G.FLOAT16, f"cast16_{out.name}")
            out.type.tensor_type.elem_type = G.FLOAT16
    if input_dtype == "float16" or output_dtype == "float16":
        _topological_sort(model)


def _topological_sort(model) -> None:
    g = model.graph
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(t in available for t in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ArtifactError("FP16 graph has a cycle or a dangling input after I/O retyping; report this as a bug")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def check_fp32_islands(model, names: Iterable[str]) -> list[str]:
    """Violations: island nodes whose float inputs/outputs are not FP32 (empty list = all FP32)."""
    typed = G.with_shapes(model)
    types = G.tensor_types(typed)
    nodes = {n.name: n for n in typed.graph.node}
    bad = []
    for name in names:
        node = nodes.get(name)
        if node is None:
            bad.append(f"{name}: missing from the graph")
            continue
        for t in [*node.input, *node.output]:
            if t and types.get(t) in (G.FLOAT16, 16):
                bad.append(f"{name} ({node.op_type}): tensor {t} is FP16")
    return bad


# ---------------------------------------------------------------------------------------------
# Public steps
# ---------------------------------------------------------------------------------------------


def fp16_from_onnx(
    src_onnx: str | Path,
    dst_onnx: str | Path,
    *,
    keep_fp32: Iterable[str] | Mapping[str, str] = (),
    io_dtype: str | tuple[str, str] = "float32",
    default_islands: bool = True,
    keep_head: bool = True,
) -> Fp16Report:
    """Write an FP16 copy of `src_onnx` to `dst_onnx`, keeping FP32 islands.

    keep_fp32: extra node names (or name -> reason) kept in FP32, e.g. from `find_fp16_overflow`
    or the fallback search. io_dtype: 'float32' (default; casts inside the graph), 'float16', or
    an (input, output) pair."""
    f16 = lazy_import("onnxconverter_common.float16")
    onnx = lazy_import("onnx")
    in_dt, out_dt = _io_dtypes(io_dtype)
    # a big graph (external data) is converted as structure only; its weights are cast one tensor at a
    # time while saving (`G.save_streamed`): ViT-G peaked at 11.8 GiB converting the loaded proto
    external = bool(G.external_data_files(src_onnx))
    model = G.load(src_onnx, load_weights=not external)
    if any(i.data_type == G.FLOAT16 for i in model.graph.initializer):
        raise ArtifactError(f"{src_onnx} already holds FP16 weights; convert the FP32 export instead")
    G.GraphIndex.of(model)  # names unnamed nodes, which block lists need
    kept: dict[str, str] = default_fp32_islands(model, keep_head=keep_head) if default_islands else {}
    extra = dict(keep_fp32) if isinstance(keep_fp32, Mapping) else {n: "requested" for n in keep_fp32}
    names = {n.name for n in model.graph.node}
    unknown = sorted(set(extra) - names)
    if unknown:
        raise ConfigError(f"keep_fp32 names nodes not in {src_onnx}: {unknown[:5]}; use names from the FP32 graph")
    for n, why in extra.items():
        kept.setdefault(n, why)
    for node in model.graph.node:
        if node.op_type in f16.DEFAULT_OP_BLOCK_LIST:
            kept.setdefault(node.name, f"{node.op_type}: no FP16 kernel (onnxconverter-common block list)")
    keep = set(kept)

    _retarget_float_casts(model, keep)
    _split_shared_initializers(model, keep)
    model = _ensure_value_info(model)
    on_disk = {i.name: i.data_type for i in model.graph.initializer if G.is_external(i)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-tensor "truncated to 1e-07" warnings; clipping is expected
        model = f16.convert_float_to_float16(
            model,
            keep_io_types=True,
            node_block_list=sorted(keep),
            op_block_list=list(f16.DEFAULT_OP_BLOCK_LIST),
            max_finite_val=FP16_MAX,
            disable_shape_infer=True,
            check_fp16_ready=False,  # our retargeted casts look like FP16 to it; FP16 weights are refused above
        )
    _restore_fp32_outputs(model)
    _fuse_cast_roundtrips(model)
    _set_io_dtypes(model, in_dt, out_dt)
    if external:
        _save_converted(model, on_disk, Path(src_onnx), Path(dst_onnx))
    elif not G.over_size(model, G.TWO_GB):
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:  # onnx raises ValidationError / InferenceError
            raise ArtifactError(f"FP16 conversion of {src_onnx} produced an invalid graph: {exc}") from exc
    bad = check_fp32_islands(model, keep)
    if bad:
        raise ArtifactError(f"FP16 conversion of {src_onnx} left FP32 islands partly in FP16: {bad[:3]}")
    if not external:
        G.save(model, dst_onnx)
    casts = sum(1 for n in model.graph.node if n.op_type == "Cast")
    converted = sum(1 for n in model.graph.node if n.name not in keep and n.op_type not in ("Cast", "Shape", "Constant"))
    return Fp16Report(
        kept=kept,
        converted=converted,
        casts=casts,
        input_dtype=in_dt,
        output_dtype=out_dt,
        library=f"onnxconverter-common {_version('onnxconverter-common')}",
    )


def _save_converted(model, on_disk: dict[str, int], src: Path, dst: Path) -> None:
    """Save a graph converted as structure only: the converter retyped the external initializers it
    converts (their data never loaded); read each from `src`'s data file and cast it exactly as the
    converter casts loaded ones (`to_float16`: `convert_np_to_float16`'s clipping and rounding, bit for bit)."""
    halves = set()
    for init in model.graph.initializer:
        if G.is_external(init):
            if init.name not in on_disk:
                raise ArtifactError(f"FP16 conversion of {src} made an external initializer {init.name} it cannot read")
            if init.data_type != on_disk[init.name]:
                halves.add(init.name)
                init.data_type = on_disk[init.name]  # read as stored; cast while saving

    def cast(init, arr: np.ndarray) -> np.ndarray:
        return to_float16(arr) if init.name in halves else arr

    G.save_streamed(model, dst, src.parent, cast)


MIN_POSITIVE = 1e-7  # the converter's min_positive_val: smaller non-zero magnitudes become +-1e-7


def to_float16(arr: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """onnxconverter-common's `convert_np_to_float16(arr, 1e-7, FP16_MAX)`, bit for bit (a test compares them,
    edge values included), in one pass over cache-sized chunks: non-zero magnitudes below 1e-7 become
    +-1e-7, finite ones above FP16_MAX become +-FP16_MAX, then round to float16. The converter makes ~15
    full-size temporaries per tensor (about a minute for ViT-G's 1.1 B weights here, a third of the FP16
    conversion step)."""
    lo, hi = np.float32(MIN_POSITIVE), np.float32(FP16_MAX)
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, np.float16)
    for s in range(0, flat.size, chunk):
        part = flat[s : s + chunk]
        mag = np.abs(part)
        with np.errstate(invalid="ignore"):
            tiny = (mag < lo) & (part != 0)
            big = (mag > hi) & np.isfinite(part)
        if tiny.any() or big.any():
            part = part.copy()
            part[tiny] = np.copysign(lo, part[tiny])
            part[big] = np.copysign(hi, part[big])
        out[s : s + chunk] = part
    return out.reshape(np.shape(arr))


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------------------------
# Overflow scan
# ---------------------------------------------------------------------------------------------


def scan_batch(fp32_onnx: str | Path, budget: int = 2 << 30) -> int:
    """Images per overflow-scan run: SCAN_BATCH, fewer where ~8 copies of the graph's largest tensor per
    image (a rough activation peak) would pass `budget` (ViT-S/8 at 3025 tokens: 1; ViT-G/14 at 224: 4)."""
    model = G.with_shapes(G.load(fp32_onnx, load_weights=False))
    largest = 0
    for vi in model.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        n = 1
        for d in dims[1:] if dims else ():
            n *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
        largest = max(largest, 4 * n)
    return int(max(1, min(SCAN_BATCH, budget // max(1, 8 * largest))))


def _scan_candidates(model, keep: set[str]) -> list[str]:
    """Float tensors that would be FP16: outputs of nodes unless producer and consumers all stay FP32."""
    idx = G.GraphIndex.of(model)
    types = G.tensor_types(G.with_shapes(model))
    out = []
    for name, node in idx.nodes.items():
        for t in node.output:
            if not t or types.get(t) != G.FLOAT:
                continue
            if name in keep and all(c in keep for c in idx.consumers.get(t, [])):
                continue
            out.append(t)
    return out


def _scan_graph(model, candidates: list[str], keep_outputs: bool = False):
    """A copy of the graph that reduces every candidate tensor inside the graph to two scalars: max |t|
    and sum(t * 0), which is NaN exactly when t holds a non-finite value; (graph, [(t, max, nan probe)]).
    keep_outputs: the graph's own outputs stay, first (so the scan's run is also a run of the graph)."""
    onnx = lazy_import("onnx")
    helper = onnx.helper
    probe = type(model)()
    probe.CopyFrom(model)
    zero = "__overflow_scan_zero"
    probe.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), zero))
    # each reduction right after its producer, run in that order (`session(written_order=True)`), so
    # tensors die as they would in the plain graph
    reductions: dict[str, list] = {}
    outs = []
    for i, t in enumerate(candidates):
        a, m, z, s = (f"__overflow_scan_{k}_{i}" for k in ("abs", "max", "zero", "nf"))
        reductions[t] = [
            helper.make_node("Abs", [t], [a], name=a),
            helper.make_node("ReduceMax", [a], [m], name=m, keepdims=0),
            helper.make_node("Mul", [t, zero], [z], name=z),
            helper.make_node("ReduceSum", [z], [s], name=s, keepdims=0),
        ]
        outs.append((t, m, s))
    G.insert_after(probe, reductions)
    if not keep_outputs:
        del probe.graph.output[:]
    for _, m, s in outs:
        probe.graph.output.extend([helper.make_tensor_value_info(m, G.FLOAT, []),
                                   helper.make_tensor_value_info(s, G.FLOAT, [])])
    return probe, outs


def _reduced_scan(model, candidates: list[str], batches: list[np.ndarray], weights_dir: Path | None,
                  outputs: list | None = None):
    """max |t| of every candidate over `batches` and the tensors holding non-finite values, in one run
    per batch of `_scan_graph`. Only scalars leave the session, so every tensor is scanned in one pass
    (exposing the tensors themselves took ~2 GB per ViT-G image, hence several passes, each loading
    the weights again). `outputs`: a list that receives the graph's first output of each batch."""
    from vpr_edge.onnxrt import session

    probe, outs = _scan_graph(model, candidates, keep_outputs=outputs is not None)
    # the graph as written (no fusions), so every reduced tensor is the one the FP16 graph will hold
    sess = session(probe, optimize=False, prepack=False, weights_dir=weights_dir, written_order=True)
    input_name = model.graph.input[0].name
    names = [n for _, m, s in outs for n in (m, s)]
    first = [model.graph.output[0].name] if outputs is not None else []
    max_abs = dict.fromkeys(candidates, 0.0)
    suspect: set[str] = set()
    for batch in batches:
        got = sess.run(first + names, {input_name: batch})
        if outputs is not None:
            outputs.append(np.asarray(got[0], dtype=np.float32))
        values = dict(zip(names, got[len(first):]))
        for t, m, s in outs:
            mv, sv = float(values[m]), float(values[s])
            if not (np.isfinite(mv) and np.isfinite(sv)):
                suspect.add(t)
            else:
                max_abs[t] = max(max_abs[t], mv)
    return max_abs, suspect


def _exposed_stats(model, tensors: list[str], batches: list[np.ndarray], weights_dir: Path | None):
    """max |finite value| and non-finite count of `tensors`, exposed as graph outputs (for the few tensors
    the reduced scan found non-finite values in: their count and finite maximum need the values)."""
    from vpr_edge.onnxrt import session

    onnx = lazy_import("onnx")
    probe = type(model)()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(t, G.FLOAT, None))
    sess = session(probe, optimize=False, prepack=False, weights_dir=weights_dir)
    input_name = model.graph.input[0].name
    stats = {t: {"max_abs": 0.0, "nonfinite": 0} for t in tensors}
    for batch in batches:
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {input_name: batch})))
        for t in tensors:
            v = values[t]
            finite = np.isfinite(v)
            stats[t]["nonfinite"] += int(v.size - finite.sum())
            if finite.any():
                stats[t]["max_abs"] = max(stats[t]["max_abs"], float(np.abs(v[finite]).max()))
        del values
    return stats


def fp16_overflow_scan(
    fp32_onnx: str | Path,
    inputs: Iterable[np.ndarray],
    *,
    keep_fp32: Iterable[str] | None = None,
    threshold: float = OVERFLOW_FRACTION * FP16_MAX,
    outputs: list | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the FP32 graph once per input batch and return the tensors that would be FP16 and exceed
    `threshold` or are non-finite: tensor -> {producer, consumers, max_abs, nonfinite}.

    keep_fp32: nodes that stay FP32 anyway (default: the default islands); a tensor produced and
    consumed only by them is never FP16 and is not flagged. Memory is the graph's own activations
    at the batch size given (the statistics are reduced inside the graph). `outputs`: a list that
    receives the graph's first output per batch, from the same run (`scan_with_outputs`)."""
    external = G.external_data_files(fp32_onnx)
    weights_dir = Path(fp32_onnx).parent if external else None
    model = G.load(fp32_onnx, load_weights=not external)
    idx = G.GraphIndex.of(model)
    keep = set(default_fp32_islands(model)) if keep_fp32 is None else set(keep_fp32)
    candidates = _scan_candidates(model, keep)
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in inputs]
    if not batches:
        raise ConfigError("fp16 overflow scan needs at least one input batch")
    max_abs, suspect = _reduced_scan(model, candidates, batches, weights_dir, outputs)
    stats = {t: {"max_abs": v, "nonfinite": 0} for t, v in max_abs.items() if t not in suspect}
    if suspect:
        stats.update(_exposed_stats(model, sorted(suspect), batches, weights_dir))
    flagged = {}
    for t, s in stats.items():
        if s["nonfinite"] or s["max_abs"] > threshold:
            flagged[t] = {**s, "producer": idx.producer.get(t), "consumers": list(idx.consumers.get(t, []))}
    return flagged


def _scan_batches(fp32_onnx: Path, images: np.ndarray, fixed_batch: int | None) -> tuple[list[np.ndarray], list[int]]:
    """The scan's input batches, `scan_batch` images each (padded to a fixed batch), and their real rows."""
    from vpr_edge.batching import chunks, pad_to

    # the scan reduces every tensor inside the graph: memory is the activations of SCAN_BATCH images
    parts = [images[s] for s in chunks(len(images), fixed_batch or scan_batch(fp32_onnx))]
    return [pad_to(p, fixed_batch) if fixed_batch else p for p in parts], [len(p) for p in parts]


@dataclass
class OverflowScan:
    """An overflow scan's result (`fp16_overflow_scan`) with the FP32 graph's outputs from the same run."""

    flagged: dict[str, dict[str, Any]]
    outputs: np.ndarray  # first graph output for each image scanned, in order
    images: int


def scan_with_outputs(fp32_onnx: str | Path, images: np.ndarray, fixed_batch: int | None = None) -> OverflowScan:
    """The FP16 overflow scan of `images` whose run also returns the FP32 graph's outputs, so an export
    verifies its FP32 graph and scans it in one pass of the network (ViT-G: ~100 s per pass of 16 images
    here) instead of two. The graph runs as written (no ORT fusions): outputs equal the optimised
    session's to float reassociation."""
    fp32_onnx = Path(fp32_onnx)
    outs: list[np.ndarray] = []
    batches, rows = _scan_batches(fp32_onnx, images, G.fixed_batch(fp32_onnx) if fixed_batch is None else fixed_batch)
    flagged = fp16_overflow_scan(fp32_onnx, batches, outputs=outs)
    return OverflowScan(flagged=flagged, outputs=np.concatenate([o[:n] for o, n in zip(outs, rows)]),
                        images=len(images))


def find_fp16_overflow(fp32_onnx: str | Path, inputs: Iterable[np.ndarray], **kwargs: Any) -> set[str]:
    """Nodes to keep in FP32 so no flagged tensor passes through FP16: producers and consumers.

    Keeping only the producer would not help: its FP32 output is cast to FP16 for the next node,
    and the cast overflows."""
    nodes: set[str] = set()
    for info in fp16_overflow_scan(fp32_onnx, inputs, **kwargs).values():
        if info["producer"]:
            nodes.add(info["producer"])
        nodes.update(info["consumers"])
    return nodes


class Fp16Lowering:
    """The `fp16` record's lowering (`table.PRECISIONS`): overflow scan, then FP16 graphs keeping the
    default islands, the flagged nodes and whatever the fallback search asks for in FP32."""

    emulated = True  # ORT's CPU provider computes FP16 chains in FP32: verify an emulation graph too
    prepare_step = "overflow scan"
    candidate_ops: tuple[str, ...] | None = None  # fallback refinement may keep any node

    def __init__(self, fp32_onnx: Path, verify, *, io_dtype="float32", overflow_guard: bool = True,
                 calibration: np.ndarray | None = None, prepared: OverflowScan | None = None, **_: Any):
        self.src = Path(fp32_onnx)
        self.prepared = prepared  # the scan already run with the export's FP32 verification
        self.verify = verify
        self.io_dtype = io_dtype
        self.overflow_guard = overflow_guard
        self.probe = verify.images if calibration is None else np.concatenate([verify.images, calibration])
        self.overflow: dict[str, str] = {}
        self.details: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.kept: set[str] = set()

    def prepare(self, fixed_batch: int | None) -> None:
        if not self.overflow_guard:
            return
        if self.prepared is not None:
            if self.prepared.images != len(self.probe):
                raise ConfigError(f"the overflow scan given covers {self.prepared.images} images, the lowering probes "
                                  f"{len(self.probe)}; scan the same images (verify + calibration)")
            flagged = self.prepared.flagged
            self.details["fp16_overflow_scan"] = "run once with the FP32 verification (scan_with_outputs)"
        else:
            flagged = fp16_overflow_scan(self.src, _scan_batches(self.src, self.probe, fixed_batch)[0])
        for t, info in flagged.items():
            for n in [info["producer"], *info["consumers"]]:
                if n:
                    self.overflow[n] = f"FP16 overflow guard: {t} reaches {info['max_abs']:.3g} (non-finite {info['nonfinite']})"
        self.details["fp16_overflow"] = {t: {k: v for k, v in i.items() if k != "consumers"} for t, i in flagged.items()}

    def build(self, keep: frozenset[str], dst: Path) -> None:
        rep = fp16_from_onnx(self.src, dst, keep_fp32={**self.overflow, **{n: "fallback search" for n in keep}},
                             io_dtype=self.io_dtype)
        self.kept = set(rep.kept)
        self.details["fp16"] = rep.to_dict()

    def final_details(self, model) -> dict[str, Any]:
        return {**self.details, "default_islands": len(default_fp32_islands(model))}
