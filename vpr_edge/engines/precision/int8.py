"""INT8 in the graph: `Int8FromOnnx`, explicit QuantizeLinear/DequantizeLinear (QDQ) pairs.

What TensorRT's strongly typed INT8 path expects, and what we ask onnxruntime.quantization for:
- weights: symmetric, per output channel (MatMul [K, N] -> axis 1, Conv [Cout, ...] -> axis 0);
- activations: symmetric, per tensor (zero point 0), INT8;
- Q/DQ only around MatMul/Gemm/Conv; biases stay float (TensorRT fuses float bias; `QuantizeBias`
  off); LayerNorm, Softmax, GELU and everything else run in the graph's float type;
- not quantised by default: MatMuls of two activations (QK^T and attention x V: no weights, and
  Softmax outputs in [0, 1] lose most of their 256 levels to the logits' range), the descriptor
  head (VLAD assignment/aggregation, PCA, norms), where a flipped argmax moves whole tokens, and the
  first layer reading the image (patch embedding / stem conv).

Measured on ViT-S/14 (AnyLoc, Corridor, 2 AMD EPYC cores, ORT 1.31; benchmarks/results/precision/):
- ORT's CPU provider turns DQ -> MatMul (no Q on the output) into MatMulIntegerToFloat, the fast
  U8S8 path; Q/DQ on outputs too (QLinearMatMul + a DQ before the float bias add) is no faster.
  A DQ -> Conv without an output Q stays a float Conv, so quantising the patch embedding buys
  nothing on CPU, and it is the single most sensitive layer (min descriptor cosine 0.84 -> 0.88).
- quantised attention MatMuls save ~2 ms of ~42 ms but cost top-1 agreement (0.82 -> 0.75 on 111
  queries): off by default (`quantize_attention=True` quantises both inputs of both).
- onnxruntime.quantization.quant_pre_process gains nothing here (ORT applies the same basic
  optimisations at load) and renames nodes, which breaks name-based exclusions: not used.
  `rewrites.tidy_for_ort` (GELU order, LayerScale folding) is what lets ORT fuse more; applied
  before quantisation and recorded in the report.
- calibration: 'max' is best here; ORT's entropy calibrator returns the max ranges on this model,
  and percentile clipping (99.99 / 99.999) lowers cosine (0.968 -> 0.951 / 0.960).

Calibration: 'max' runs `engines.minmax` (ORT's MinMax ranges from a session holding one copy of the
weights; ORT's own calibrator OOM-killed the ViT-G INT8 export on 24 GiB) and hands them to ORT as its
calibration cache; 'entropy'/'percentile' use ORT's histogram calibrators. Ranges can be cached in a
file so the fallback search, which re-quantises with different exclusions, calibrates once.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from vpr_edge.engines import graph as G
from vpr_edge.engines.precision.islands import descriptor_head
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.lazy import lazy_import

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
CALIBRATION_METHODS = {"max": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
RECOMMENDED_CALIBRATION_IMAGES = 200  # "hundreds": below this the ranges of rare activations are guesses


@dataclass
class Int8Report:
    quantized: list[str]
    excluded: dict[str, str]  # node -> reason (MatMul/Gemm/Conv left in float)
    calibration: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)  # rewrites.tidy_for_ort counts (empty: not applied)
    quantize_attention: bool = False
    outliers: dict[str, Any] = field(default_factory=dict)  # smoothing.SmoothReport.to_dict() (empty: off)
    split_share: dict[str, float] = field(default_factory=dict)  # MatMul -> share of its FLOPs split off to float

    def to_dict(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for why in self.excluded.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {
            "format": "QDQ",
            "weights": "int8 symmetric per-channel",
            "activations": "int8 symmetric per-tensor",
            "quantized_ops": list(QUANTIZED_OPS),
            "quantized_nodes": len(self.quantized),
            "excluded_nodes": len(self.excluded),
            "excluded_reasons": reasons,
            "excluded_node_names": sorted(self.excluded),
            "calibration": self.calibration,
            "attention_matmuls_quantized": self.quantize_attention,
            "graph_rewrites": self.rewrites or "not applied",
            "ort_quant_pre_process": "not applied (no gain on ViT-S; renames nodes)",
            "outlier_channels": self.outliers or "off",
            "warnings": self.warnings,
        }


def calibration_warning(n_images: int) -> str | None:
    if n_images < RECOMMENDED_CALIBRATION_IMAGES:
        return (
            f"calibration uses {n_images} images; give a few hundred ({RECOMMENDED_CALIBRATION_IMAGES}+) images "
            "from the deployment environment for stable INT8 ranges"
        )
    return None


def _reader_class():
    q = lazy_import("onnxruntime.quantization")

    class BatchReader(q.CalibrationDataReader):
        """Feeds numpy batches [b, 3, H, W] to ORT's calibrator; rewindable so it can be read twice."""

        def __init__(self, batches: list[np.ndarray], input_name: str):
            self.batches = batches
            self.input_name = input_name
            self._it: Iterator[np.ndarray] = iter(self.batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {self.input_name: batch}

        def rewind(self) -> None:
            self._it = iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

    return BatchReader


def batch_reader(batches: Iterable[np.ndarray], input_name: str = "images"):
    """A CalibrationDataReader over numpy batches (materialised: calibration sets are hundreds of images)."""
    return _reader_class()([np.ascontiguousarray(b, dtype=np.float32) for b in batches], input_name)


def _uniform_batches(batches: Iterable[np.ndarray], fixed: int | None, method: str) -> list[np.ndarray]:
    """ORT's histogram calibrators stack per-batch outputs, so batches must all have one size:
    the graph's static batch (last one padded by repetition), or single images for entropy/percentile."""
    batches = [np.asarray(b, dtype=np.float32) for b in batches]
    if not batches:
        return []
    if not fixed and (method == "max" or len({len(b) for b in batches}) == 1):
        return batches
    from vpr_edge.batching import chunks, pad_to

    images = np.concatenate(batches)
    step = fixed or 1
    return [pad_to(images[s], step) for s in chunks(len(images), step)]


_IMAGE_PATH = frozenset({"Cast", "Identity", "Pad", "Reshape", "Transpose", "Slice", "Resize", "Sub", "Div", "Mul", "Add"})


def reads_image(idx: G.GraphIndex, tensor: str, depth: int = 6) -> bool:
    """Is `tensor` a graph input, or computed from one through element-wise/layout ops only?"""
    frontier = [tensor]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            if t in idx.graph_inputs:
                return True
            name = idx.producer.get(t)
            if name is None or idx.nodes[name].op_type not in _IMAGE_PATH:
                continue
            nxt.extend(i for i in idx.nodes[name].input if i and i not in idx.initializers)
        frontier = nxt
        if not frontier:
            break
    return False


def default_exclusions(model, *, quantize_attention: bool = False, keep_first_layer: bool = True) -> dict[str, str]:
    """MatMul/Gemm/Conv nodes left unquantised by default, with the reason."""
    idx = G.GraphIndex.of(model)
    head = descriptor_head(model, idx)
    out: dict[str, str] = {}
    for name, node in idx.nodes.items():
        if node.op_type not in QUANTIZED_OPS:
            continue
        if name in head:
            out[name] = "descriptor head (VLAD/GeM/BoQ/PCA, norms)"
        elif keep_first_layer and reads_image(idx, node.input[0]):
            out[name] = "first layer on the image (patch embedding / stem): most sensitive, ~1% of FLOPs"
        elif node.op_type == "MatMul" and not quantize_attention:
            if not idx.is_constant(node.input[0]) and not idx.is_constant(node.input[1]):
                out[name] = "activation x activation MatMul (attention)"
        if name not in out and node.op_type == "MatMul":
            if idx.reaches(name, {"ArgMax"}):
                out[name] = "VLAD assignment similarity (feeds ArgMax)"
    return out


def int8_from_onnx(
    src_onnx: str | Path,
    dst_onnx: str | Path,
    calibration: Iterable[np.ndarray] | Any,
    method: str = "max",
    exclude_nodes: Iterable[str] | Mapping[str, str] = (),
    *,
    quantize_attention: bool = False,
    keep_first_layer: bool = True,
    rewrite: bool = True,
    calibration_cache: str | Path | None = None,
    percentile: float = 99.999,
    calibration_source: str = "",
    outliers: Any = None,
) -> Int8Report:
    """Write a QDQ INT8 copy of `src_onnx` to `dst_onnx`.

    calibration: numpy batches [b, 3, H, W] float32 (preprocessed like the model input) or an
    onnxruntime CalibrationDataReader. exclude_nodes: extra node names left in float.
    quantize_attention: also quantise the activation x activation MatMuls (QK^T, attention x V),
    Q/DQ on both inputs. keep_first_layer: leave the layer reading the image in float.
    rewrite: apply `rewrites.tidy_for_ort` first (exact; node names kept, so exclusions still apply).
    calibration_cache: a JSON file for ORT's tensor ranges; an existing one is reused (the
    fallback search quantises many times from one calibration; pass the same `rewrite` and `outliers`).
    outliers: `smoothing.OutlierOptions` (split outlier channels into a float MatMul, SmoothQuant the
    rest; default off). Applied to the MatMuls the default exclusions leave quantised, whatever
    `exclude_nodes` says, so every graph of one fallback search shares one calibration."""
    from vpr_edge.engines.precision import minmax, smoothing

    q = lazy_import("onnxruntime.quantization")
    outliers = outliers or smoothing.OFF
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"--calibration-method must be one of {sorted(CALIBRATION_METHODS)}, got {method!r}")
    src_onnx, dst_onnx = Path(src_onnx), Path(dst_onnx)
    model = G.load(src_onnx, load_weights=False)
    G.GraphIndex.of(model)
    names = {n.name for n in model.graph.node}
    excluded = default_exclusions(model, quantize_attention=quantize_attention, keep_first_layer=keep_first_layer)
    by_default = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in excluded]
    extra = dict(exclude_nodes) if isinstance(exclude_nodes, Mapping) else {n: "requested" for n in exclude_nodes}
    unknown = sorted(set(extra) - names)
    if unknown:
        raise ConfigError(f"exclude_nodes names nodes not in {src_onnx}: {unknown[:5]}; use names from the FP32 graph")
    for n, why in extra.items():
        excluded.setdefault(n, why)
    targets = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    quantized = [n for n in targets if n not in excluded]

    input_name = model.graph.input[0].name
    if hasattr(calibration, "get_next"):
        reader = calibration
        n_images = sum(len(b) for b in getattr(calibration, "batches", [])) or None
    else:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        reader = batch_reader(_uniform_batches(calibration, fixed, method), input_name)
        n_images = sum(len(b) for b in reader.batches)
        if n_images == 0 and not (calibration_cache and Path(calibration_cache).is_file()):
            raise ConfigError("INT8 calibration got no images; pass --calibration DIR with a few hundred images")
    warnings = []
    if n_images is not None:
        w = calibration_warning(n_images)
        if w:
            warnings.append(w)
            log.debug(w)  # returned in the report; the caller says it once (the fallback calls this repeatedly)

    extra_options: dict[str, Any] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Conv": 0, "Gemm": 0},
        # Q/DQ on inputs only, as TensorRT places them: outputs feed float ops (bias, GELU, residual)
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
    }
    if method == "percentile":
        extra_options["CalibPercentile"] = percentile
    external = G.external_data_files(src_onnx)
    big = bool(external) and sum(f.stat().st_size for f in external) > G.TWO_GB // 2
    dst_onnx.parent.mkdir(parents=True, exist_ok=True)
    rewrites: dict[str, int] = {}
    quant_src = src_onnx
    grps: list = []
    smooth_rep = smoothing.SmoothReport(options=outliers.to_dict())
    full = None
    if rewrite or outliers.active:
        full = G.load(src_onnx)
        if rewrite:
            from vpr_edge.engines.precision.rewrites import tidy_for_ort

            rewrites = tidy_for_ort(full)
        if outliers.active:
            grps = smoothing.groups(full, by_default)
        if any(rewrites.values()) or grps:
            quant_src = dst_onnx.parent / f".{dst_onnx.stem}.rewritten.onnx"
            G.save(full, quant_src)
    channel_cache = Path(f"{calibration_cache}.channels.npz") if calibration_cache else None
    have_ranges = bool(calibration_cache and Path(calibration_cache).is_file())
    temp_cache = None  # our ranges, when the caller keeps no cache of its own
    try:
        ranges = None
        absmax: dict[str, np.ndarray] = {}
        if grps and channel_cache is not None and channel_cache.is_file() and have_ranges:
            with np.load(channel_cache, allow_pickle=False) as z:
                absmax = {g.tensor: z[f"c{i}"] for i, g in enumerate(grps) if f"c{i}" in z}
        elif (method == "max" and not have_ranges) or grps:
            # our own lean pass (one copy of the weights), handed to ORT as its calibration cache; the same
            # pass takes the per-channel statistics the outlier rewrite decides from
            ranges = minmax.minmax_ranges(quant_src, _read_all(reader), QUANTIZED_OPS, input_name=input_name,
                                          channels={g.tensor: g.channels for g in grps}, channel_absmax=absmax)
            if channel_cache is not None and grps:
                np.savez(channel_cache, **{f"c{i}": absmax[g.tensor] for i, g in enumerate(grps)})
            if method != "max" or have_ranges:
                ranges = None  # ORT's histogram calibrators (or the cache) give the ranges
        if grps:
            # a big graph's first save moved its weights to quant_src's data file (onnx rewrites the proto to
            # external references): read them there, and rewrite that file one tensor at a time
            ext_dir = quant_src.parent if any(G.is_external(i) for i in full.graph.initializer) else None
            smooth_rep = smoothing.smooth_(full, absmax, grps, outliers, weights_dir=ext_dir)
            if smooth_rep.smoothed:
                if ext_dir is None:
                    G.save(full, quant_src)
                else:
                    G.save_streamed(full, quant_src, ext_dir)
            if ranges is not None:
                for t, r in smooth_rep.ranges.items():
                    ranges[t] = (np.array(-r, dtype=np.float32), np.array(r, dtype=np.float32))
        del full
        if ranges is not None:
            if not calibration_cache:
                calibration_cache = temp_cache = dst_onnx.parent / f".{dst_onnx.stem}.ranges.json"
            minmax.write_ort_cache(ranges, calibration_cache)
        for n in smooth_rep.split_nodes:
            excluded[n] = "outlier channels split off the INT8 product (float)"
        with _quiet_ort():
            q.quantize_static(
                str(quant_src),
                str(dst_onnx),
                reader,
                quant_format=q.QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                reduce_range=False,
                activation_type=q.QuantType.QInt8,
                weight_type=q.QuantType.QInt8,
                nodes_to_exclude=sorted(excluded),
                use_external_data_format=big,
                calibrate_method=getattr(q.CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options=extra_options,
                calibration_cache_path=str(calibration_cache) if calibration_cache else None,
            )
    except (ValueError, RuntimeError, TypeError) as exc:  # ORT reports bad inputs/graphs this way
        raise ArtifactError(f"INT8 quantisation of {src_onnx} failed: {exc}") from exc
    finally:
        if temp_cache is not None:
            temp_cache.unlink(missing_ok=True)
        if quant_src != src_onnx:
            for f in G.external_data_files(quant_src):
                f.unlink(missing_ok=True)
            quant_src.unlink(missing_ok=True)
    if not big:
        _inline_external_data(dst_onnx)
    problems = check_qdq(G.load(dst_onnx, load_weights=False), quantized)
    if problems:
        raise ArtifactError(f"INT8 graph {dst_onnx} is not what TensorRT expects: {problems[:3]}")
    return Int8Report(
        quantized=quantized,
        excluded={n: why for n, why in excluded.items() if n in set(targets) | set(smooth_rep.split_nodes)},
        calibration={
            "method": method,
            "ort_method": CALIBRATION_METHODS[method],
            "images": n_images,
            "source": calibration_source,
            **({"percentile": percentile} if method == "percentile" else {}),
        },
        warnings=warnings,
        rewrites=rewrites,
        quantize_attention=quantize_attention,
        outliers=smooth_rep.to_dict() if outliers.active else {},
        split_share=dict(smooth_rep.split_share),
    )


def _read_all(reader) -> Iterator[np.ndarray]:
    """The batches of a CalibrationDataReader (rewound first when it can be, and after)."""
    if hasattr(reader, "rewind"):
        reader.rewind()
    while (item := reader.get_next()) is not None:
        yield next(iter(item.values()))
    if hasattr(reader, "rewind"):
        reader.rewind()


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ort():
    """ORT's calibrators print progress to stdout and advise pre-processing on the root logger;
    our pre-processing is the exporter's own, and progress is ours to report."""
    root = logging.getLogger()
    flt = _DropAdvice()
    root.addFilter(flt)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(flt)


def _inline_external_data(path: Path) -> None:
    """ORT may write weights beside the model; small models are kept as one file."""
    external = G.external_data_files(path)
    if not external:
        return
    onnx = lazy_import("onnx")
    model = onnx.load(str(path))
    onnx.save_model(model, str(path))
    for f in external:
        f.unlink(missing_ok=True)


def check_qdq(model, quantized: Iterable[str]) -> list[str]:
    """Every quantised node reads its inputs through DequantizeLinear; weights are INT8 per-channel
    symmetric, activations per-tensor symmetric. Returns problems (empty: as TensorRT expects)."""
    idx = G.GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    problems = []

    def zero_points_zero(dq) -> bool:
        if len(dq.input) < 3 or not dq.input[2]:
            return True
        zp = inits.get(dq.input[2])
        if zp is None:
            return False
        arr = lazy_import("onnx").numpy_helper.to_array(zp)
        return arr.dtype == np.int8 and not arr.any()

    for name in quantized:
        node = idx.nodes.get(name)
        if node is None:
            problems.append(f"{name}: missing after quantisation")
            continue
        for pos, t in enumerate(node.input[:2]):
            src = idx.producer.get(t)
            if src is None or idx.nodes[src].op_type != "DequantizeLinear":
                problems.append(f"{name}: input {pos} is not read through DequantizeLinear")
                continue
            dq = idx.nodes[src]
            if not zero_points_zero(dq):
                problems.append(f"{name}: input {pos} is not symmetric (non-zero or non-int8 zero point)")
            scale = inits.get(dq.input[1])
            weight = dq.input[0] in inits
            per_channel = scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1
            if weight and not per_channel and node.op_type != "Gemm":
                problems.append(f"{name}: weight is not quantised per channel")
            if not weight:
                qsrc = idx.producer.get(dq.input[0])
                if qsrc is None or idx.nodes[qsrc].op_type != "QuantizeLinear":
                    problems.append(f"{name}: activation input {pos} has no QuantizeLinear before its DequantizeLinear")
                elif per_channel:
                    problems.append(f"{name}: activation input {pos} is quantised per channel")
    return problems


class Int8Lowering:
    """The `int8` record's lowering (`table.PRECISIONS`): calibrate once (ranges cached in the work
    folder), then QDQ graphs leaving the default exclusions and whatever the fallback search asks for
    in float."""

    emulated = False  # ORT runs the integer kernels it will run on a CPU; no emulation graph
    prepare_step = "calibration"
    candidate_ops: tuple[str, ...] | None = QUANTIZED_OPS  # only these can be kept in float

    def __init__(self, fp32_onnx: Path, verify, *, calibration: np.ndarray | None = None,
                 calibration_method: str = "max", calibration_source: str = "", work: Path | None = None,
                 outliers: Any = None, **_: Any):
        from vpr_edge.engines.precision.smoothing import OutlierOptions

        self.src = Path(fp32_onnx)
        self.outliers = OutlierOptions() if outliers is None else outliers  # on by default: it leaves tame graphs alone
        self.split_share: dict[str, float] = {}
        self.verify = verify
        self.method = calibration_method
        self.warnings: list[str] = []
        self.calib = calibration
        self.source = calibration_source
        if self.calib is None:
            self.calib = verify.images
            self.source = self.source or f"verify images ({verify.source or 'verify set'})"
            self.warnings.append("INT8 calibrated on the verify images; pass --calibration DIR with a few hundred other images")
        w = calibration_warning(len(self.calib))
        if w:
            self.warnings.append(w)
        self.cache = (work or self.src.parent) / "calibration_ranges.json"
        self.batches: list[np.ndarray] = []
        self.details: dict[str, Any] = {}
        self.kept: set[str] = set()

    def prepare(self, fixed_batch: int | None) -> None:
        from vpr_edge.batching import chunks, pad_to

        step = fixed_batch or 8
        self.batches = [np.ascontiguousarray(pad_to(self.calib[s], fixed_batch) if fixed_batch else self.calib[s],
                                             dtype=np.float32) for s in chunks(len(self.calib), step)]

    def build(self, keep: frozenset[str], dst: Path) -> None:
        rep = int8_from_onnx(self.src, dst, self.batches, self.method, exclude_nodes={n: "fallback search" for n in keep},
                             calibration_cache=self.cache, calibration_source=self.source, outliers=self.outliers)
        rep.calibration["images"] = int(len(self.calib))
        self.kept = set(rep.excluded)
        self.split_share = dict(rep.split_share)
        self.details["int8"] = rep.to_dict()
        self.warnings.extend(x for x in rep.warnings if x not in self.warnings)

    def final_details(self, model) -> dict[str, Any]:
        return dict(self.details)
