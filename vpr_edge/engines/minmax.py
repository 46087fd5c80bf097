"""Max calibration without a second copy of the model: the ranges ORT's MinMax calibrator computes,
written as ORT's own calibration cache, so `quantize_static` skips its calibration session.

Why: for ViT-G (3.3 GiB of FP32 weights) `quantize_static` holds its shape-inferred copy of the
model, the calibrator's augmented copy, and a calibration session that prepacks every weight again;
with the exporter's own process that went past 24 GiB and the INT8 export was killed (measured on
this machine). Here the augmented graph is written structure-only beside the original (it reads the
same external-data file), and its session skips weight prepacking: about one copy of the weights.

Same tensors and numbers as ORT's MinMaxCalibrater as quantize_static runs it (tested against it):
every float input and output of the quantised op types that is not an initializer, min/max over all
calibration batches; the quantizer makes them symmetric (ActivationSymmetric), as with ORT's ranges.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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


def minmax_ranges(
    model_path: str | Path, batches: Iterable[np.ndarray], op_types: Sequence[str], *, symmetric: bool = False,
    input_name: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (min, max)} over `batches` for the tensors ORT's MinMax calibrator would pick."""
    onnx = lazy_import("onnx")
    ort = lazy_import("onnxruntime")
    helper = onnx.helper
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    names = tensors_to_calibrate(model, op_types)
    input_name = input_name or model.graph.input[0].name
    outputs = []
    for i, t in enumerate(names):
        for op in ("ReduceMin", "ReduceMax"):
            out = f"__calib_{i}_{op}"
            model.graph.node.append(helper.make_node(op, [t], [out], keepdims=0, name=out))
            outputs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, []))
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    # beside the original so the initializers' external-data locations still resolve
    aug = model_path.parent / f".{model_path.stem}.calibrate.onnx"
    onnx.save_model(model, str(aug))
    del model
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's calibrator
        so.add_session_config_entry("session.disable_prepacking", "1")
        sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
        lo = np.full(len(names), np.inf, dtype=np.float32)
        hi = np.full(len(names), -np.inf, dtype=np.float32)
        seen = 0
        for batch in batches:
            vals = sess.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})
            lo = np.fmin(lo, np.asarray(vals[0::2], dtype=np.float32))
            hi = np.fmax(hi, np.asarray(vals[1::2], dtype=np.float32))
            seen += 1
        del sess
    finally:
        aug.unlink(missing_ok=True)
    if not seen:
        from vpr_edge.errors import ConfigError

        raise ConfigError("INT8 calibration got no images; pass --calibration DIR with a few hundred images")
    ranges = {}
    for t, a, b in zip(names, lo, hi):
        if symmetric:
            m = np.float32(max(abs(a), abs(b)))
            ranges[t] = (np.array(-m, dtype=np.float32), np.array(m, dtype=np.float32))
        else:
            ranges[t] = (np.array(a, dtype=np.float32), np.array(b, dtype=np.float32))
    return ranges


def write_ort_cache(ranges: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> None:
    """ORT's calibration cache (what `quantize_static(calibration_cache_path=...)` reads)."""
    cal = lazy_import("onnxruntime.quantization.calibrate")
    data = cal.TensorsData(cal.CalibrationMethod.MinMax, {t: cal.TensorData(lowest=a, highest=b) for t, (a, b) in ranges.items()})
    cal.save_tensors_data(data, path)
