"""Does quantising Conv outputs (QLinearConv in ORT) speed up BoQ-ResNet50 INT8 on this CPU?"""
import time, sys, numpy as np
import onnxruntime.quantization as q
from vpr_edge.engines.precision import int8 as I
from vpr_edge.engines.precision.calibration import calibration_images, batches
from vpr_edge.onnxrt import session as cpu_session, run_onnx
from vpr_edge import presets
src = "/work/runs/boq-r50-fp32/model.onnx"
pre = presets.get("boq-resnet50").preprocess
cal, _ = calibration_images("/work/shared/data/corridor/database", pre, limit=48)
ver, _ = calibration_images("/work/shared/data/corridor/queries", pre, limit=16)
orig = q.quantize_static
def variant(conv_out, relu):
    def qs(*a, **kw):
        eo = dict(kw["extra_options"])
        if conv_out:
            eo["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
        kw["extra_options"] = eo
        if relu:
            kw["op_types_to_quantize"] = list(kw["op_types_to_quantize"]) + ["Relu"]
        return orig(*a, **kw)
    return qs
ref = run_onnx(cpu_session(src, threads=2), ver)
def bench(path):
    s = cpu_session(path, threads=2)
    x = ver[:1]
    for _ in range(3): s.run(None, {"images": x})
    t = []
    for _ in range(15):
        t0 = time.perf_counter(); s.run(None, {"images": x}); t.append(time.perf_counter() - t0)
    out = run_onnx(s, ver)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    return np.median(t) * 1e3, cos.min()
print("fp32", bench(src), flush=True)
for name, co, relu in [("inputs-only", False, False), ("conv-out", True, False), ("conv-out+relu", True, True)]:
    q.quantize_static = variant(co, relu)
    dst = f"/work/runs/convq/{name}.onnx"
    try:
        I.int8_from_onnx(src, dst, batches(cal), "max")
        print(name, bench(dst), flush=True)
    except Exception as e:
        print(name, "failed", str(e)[:300], flush=True)
