"""Max calibration without a second copy of the model: the ranges ORT's MinMax calibrator computes,
written as ORT's own calibration cache, so `quantize_static` skips its calibration session.

Why: the ViT-G INT8 export (3.3 GiB of FP32 weights) was OOM-killed on this 24 GiB machine inside
ORT's calibration: its calibrator loads its own augmented copy of the model next to quantize_static's
copy, its session prepacks every weight again, and it runs whole batches through a graph that keeps
every calibrated activation alive. Here the augmented graph is written structure-only beside the
original (it reads the same external-data file), its session skips prepacking, and it runs one image
at a time: measured 6.1 GiB RSS for the calibration session.

Same tensors and numbers as ORT's MinMaxCalibrater as quantize_static runs it (tested against it):
every float input and output of the quantised op types that is not an initializer, min/max over all
calibration batches; the quantizer makes them symmetric (ActivationSymmetric), as with ORT's ranges.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vpr_edge.engines.graph import insert_after
from vpr_edge.onnxrt import session as cpu_session
from vpr_edge.lazy import lazy_import

_FLOAT = (1, 10)  # TensorProto.FLOAT, FLOAT16


def tensors_to_calibrate(model, op_types: Sequence[str]) -> list[str]:
    """Float inputs/outputs (not initializers) of nodes of `op_types`, in ORT's selection."""
    onnx = lazy_import("onnx")
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    infos = {vi.name: vi for vi in itertools.chain(g.value_info, g.output, g.input)}
    inits = {i.name for i in g.initializer}
    out = []
    for node in g.node:
        if node.op_type not in op_types:
            continue
        for t in itertools.chain(node.input, node.output):
            vi = infos.get(t)
            if (vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _FLOAT
                    and t not in inits and t not in out):
                out.append(t)
    return out


def _channel_absmax_nodes(helper, model, t: str, k: int, tag: str) -> tuple[list, str]:
    """Nodes computing max |t| per channel of its last axis (size k) -> [k]."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    shape = helper.make_tensor(f"{tag}_shape", 7, [2], [-1, k])
    nodes = [helper.make_node("Constant", [], [f"{tag}_shape_v"], value=shape, name=f"{tag}_shape"),
             helper.make_node("Reshape", [t, f"{tag}_shape_v"], [f"{tag}_2d"], name=f"{tag}_reshape"),
             helper.make_node("Abs", [f"{tag}_2d"], [f"{tag}_abs"], name=f"{tag}_abs")]
    if opset >= 18:
        axes = helper.make_tensor(f"{tag}_axes", 7, [1], [0])
        nodes.append(helper.make_node("Constant", [], [f"{tag}_axes_v"], value=axes, name=f"{tag}_axes"))
        nodes.append(helper.make_node("ReduceMax", [f"{tag}_abs", f"{tag}_axes_v"], [tag], keepdims=0, name=tag))
    else:
        nodes.append(helper.make_node("ReduceMax", [f"{tag}_abs"], [tag], axes=[0], keepdims=0, name=tag))
    return nodes, tag


def write_augmented(model_path: Path, op_types: Sequence[str], channels: dict[str, int] | None = None
                    ) -> tuple[Path, list[str]]:
    """A structure-only copy of the graph beside `model_path` (so its external data still resolves)
    whose outputs are ReduceMin/ReduceMax of every tensor to calibrate: (its path, those tensors), then
    per-channel max |x| of each tensor in `channels` ({tensor: channels of its last axis}).
    For FP32 graphs (the only ones INT8 lowering quantises): the reductions are declared float32."""
    onnx = lazy_import("onnx")
    helper = onnx.helper
    model = onnx.load(str(model_path), load_external_data=False)
    names = tensors_to_calibrate(model, op_types)
    outputs = []
    reducers: dict[str, list] = {}
    for i, t in enumerate(names):
        for op in ("ReduceMin", "ReduceMax"):
            out = f"__calib_{i}_{op}"
            reducers.setdefault(t, []).append(helper.make_node(op, [t], [out], keepdims=0, name=out))
            outputs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, []))
    for i, (t, k) in enumerate((channels or {}).items()):
        nodes, out = _channel_absmax_nodes(helper, model, t, k, f"__calib_channels_{i}")
        reducers.setdefault(t, []).extend(nodes)
        outputs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [k]))
    # each reduction right after its tensor's producer (ORT picks its own execution order: this alone
    # did not lower the ViT-G peak, running one image per call did; see minmax_ranges)
    insert_after(model, reducers)
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    aug = model_path.parent / f".{model_path.stem}.calibrate.onnx"
    onnx.save_model(model, str(aug))
    return aug, names


def minmax_ranges(
    model_path: str | Path, batches: Iterable[np.ndarray], op_types: Sequence[str], *,
    input_name: str | None = None, channels: dict[str, int] | None = None, channel_absmax: dict | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (min, max)} over `batches` for the tensors ORT's MinMax calibrator would pick. With
    `channels` ({tensor: K}), the same pass also fills `channel_absmax` with {tensor: max |x| per channel [K]}
    (what `smoothing` decides from)."""
    model_path = Path(model_path)
    channels = dict(channels or {})
    aug, names = write_augmented(model_path, op_types, channels)
    chan = {t: np.zeros(k, dtype=np.float32) for t, k in channels.items()}
    try:
        sess = cpu_session(aug, prepack=False)
        input_name = input_name or sess.get_inputs()[0].name
        lo = np.full(len(names), np.inf, dtype=np.float32)
        hi = np.full(len(names), -np.inf, dtype=np.float32)
        seen = 0
        dim0 = sess.get_inputs()[0].shape[0]
        step = dim0 if isinstance(dim0, int) else 1
        for batch in batches:
            # one image per run where the batch axis is dynamic (min/max are exact over any split): ORT
            # kept every calibrated activation of a run alive, ~1.1 GiB per ViT-G image (measured RSS:
            # 14.2 GiB at 4 images per run, 6.1 GiB at 1; the plain graph: 3.9 GiB)
            for start in range(0, len(batch), step):
                part = np.ascontiguousarray(batch[start : start + step], dtype=np.float32)
                vals = sess.run(None, {input_name: part})
                pairs, per_channel = vals[: 2 * len(names)], vals[2 * len(names):]
                lo = np.fmin(lo, np.asarray(pairs[0::2], dtype=np.float32))
                hi = np.fmax(hi, np.asarray(pairs[1::2], dtype=np.float32))
                for t, v in zip(chan, per_channel):
                    chan[t] = np.fmax(chan[t], np.asarray(v, dtype=np.float32))
            seen += 1
        del sess
    finally:
        aug.unlink(missing_ok=True)
    if not seen:
        from vpr_edge.errors import ConfigError

        raise ConfigError("INT8 calibration got no images; pass --calibration DIR with a few hundred images")
    if channel_absmax is not None:
        channel_absmax.update(chan)
    # raw min/max, as ORT's calibrator stores them: the quantiser makes them symmetric
    return {t: (np.array(a, dtype=np.float32), np.array(b, dtype=np.float32)) for t, a, b in zip(names, lo, hi)}


def write_ort_cache(ranges: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> None:
    """ORT's calibration cache (what `quantize_static(calibration_cache_path=...)` reads)."""
    cal = lazy_import("onnxruntime.quantization.calibrate")
    data = cal.TensorsData(cal.CalibrationMethod.MinMax, {t: cal.TensorData(lowest=a, highest=b) for t, (a, b) in ranges.items()})
    cal.save_tensors_data(data, path)
