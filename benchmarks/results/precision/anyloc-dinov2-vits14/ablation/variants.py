"""Scratch: build INT8 variants with quantize_static directly; time + profile them."""
import sys, time, json
from pathlib import Path
sys.path.insert(0, "/work/main")
import numpy as np
import onnx
from onnxruntime import quantization as q
from probe import images, FP32, W, latency, profile, fidelity
from vpr_edge.engines.precision.int8 import default_exclusions, _reader_class, _quiet_ort
from vpr_edge.engines import graph as G


def build(name, src=FP32, attention=False, qk_only=False, out_q=False, method="MinMax", extra_types=(), pct=99.999,
          exclude_more=()):
    dst = W / f"{name}.onnx"
    if dst.exists():
        return dst
    db, _ = images()
    model = G.load(src, load_weights=False)
    exc = default_exclusions(model, quantize_attention=attention)
    if qk_only:
        idx = G.GraphIndex.of(model)
        for n, node in idx.nodes.items():
            if node.op_type == "MatMul" and not idx.is_constant(node.input[0]) and not idx.is_constant(node.input[1]):
                if not idx.reaches(n, {"Softmax"}) and n not in exc:
                    exc[n] = "attn*V"
    for n in exclude_more:
        exc[n] = "more"
    reader = _reader_class()([db[i:i + 1] for i in range(len(db))] if method != "MinMax" else [db[i:i + 8] for i in range(0, len(db), 8)], "images")
    ops = ["MatMul", "Conv", *extra_types]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Conv": 0, "Gemm": 0}}
    if not out_q:
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm", "Conv"]
    if method == "Percentile":
        extra["CalibPercentile"] = pct
    t = time.time()
    with _quiet_ort():
        q.quantize_static(str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ, op_types_to_quantize=ops,
                          per_channel=True, reduce_range=False, activation_type=q.QuantType.QInt8,
                          weight_type=q.QuantType.QInt8, nodes_to_exclude=sorted(exc),
                          calibrate_method=getattr(q.CalibrationMethod, method), extra_options=extra,
                          calibration_cache_path=str(W / f"cache_{Path(src).stem}_{method}{pct if method == 'Percentile' else ''}.json"))
    print(f"built {name} in {time.time() - t:.0f}s", flush=True)
    return dst


def pre(src=FP32):
    dst = W / "pre.onnx"
    if not dst.exists():
        q.quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


if __name__ == "__main__":
    which = sys.argv[1:]
    res = {}
    for v in which:
        kw = {}
        if v == "v0": p = build("v0")
        elif v == "outq": p = build("outq", out_q=True)
        elif v == "attn": p = build("attn", attention=True)
        elif v == "qk": p = build("qk", attention=True, qk_only=True)
        elif v == "pre": p = build("prev0", src=pre())
        elif v == "fp32": p = FP32
        elif v == "fp32g": p = W / "fp32g.onnx"
        elif v == "fp32gl": p = W / "fp32gl.onnx"
        elif v == "g": p = build("g", src=W / "fp32g.onnx", exclude_more=["node_conv2d"])
        elif v == "gl": p = build("gl", src=W / "fp32gl.onnx", exclude_more=["node_conv2d"])
        elif v == "glattn": p = build("glattn", src=W / "fp32gl.onnx", exclude_more=["node_conv2d"], attention=True)
        elif v == "preattn": p = build("preattn", src=pre(), attention=True)
        else: raise SystemExit(v)
        lat = latency(p, runs=20)
        print(v, "p50 b1", round(lat, 1), flush=True)
        profile(p)
        if v != "fp32":
            f = fidelity(p)
            print(v, f, flush=True)
            res[v] = {"lat": lat, **f}
        else:
            res[v] = {"lat": lat}
    print(json.dumps(res, indent=1))
