"""ViT-S/14 INT8 on this AVX2 CPU: signed (S8S8, what TensorRT takes) vs unsigned asymmetric (U8S8) activations."""
import subprocess, sys, time, numpy as np
import onnxruntime.quantization as q
from vpr_edge.engines.precision import int8 as I
from vpr_edge.engines.precision.calibration import calibration_images, batches
from vpr_edge.onnxrt import session as cpu_session, run_onnx
from vpr_edge import presets
art = "/work/runs/u8/fp32"
subprocess.run([sys.executable, "-m", "vpr_edge.cli.main", "export", "--model", "anyloc-dinov2-vits14", "--weights", "random",
                "--verify", "/work/shared/data/corridor", "--verify-limit", "16", "--quiet", "--force", "--output", art], check=True)
src = art + "/model.onnx"
pre = presets.get("anyloc-dinov2-vits14").preprocess
cal, _ = calibration_images("/work/shared/data/corridor/database", pre, limit=64)
ver, _ = calibration_images("/work/shared/data/corridor/queries", pre, limit=16)
orig = q.quantize_static
def u8(*a, **kw):
    eo = dict(kw["extra_options"]); eo["ActivationSymmetric"] = False
    kw["extra_options"] = eo; kw["activation_type"] = q.QuantType.QUInt8
    return orig(*a, **kw)
ref = run_onnx(cpu_session(src, threads=2), ver)
def bench(path):
    s = cpu_session(path, threads=2)
    x = ver[:1]
    for _ in range(3): s.run(None, {"images": x})
    t = []
    for _ in range(20):
        t0 = time.perf_counter(); s.run(None, {"images": x}); t.append(time.perf_counter() - t0)
    out = run_onnx(s, ver)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    return round(np.median(t) * 1e3, 1), round(float(cos.mean()), 4)
print("fp32", bench(src), flush=True)
I.int8_from_onnx(src, "/work/runs/u8/s8.onnx", batches(cal), "max")
print("s8s8 (TensorRT form)", bench("/work/runs/u8/s8.onnx"), flush=True)
q.quantize_static = u8
try:
    I.int8_from_onnx(src, "/work/runs/u8/u8.onnx", batches(cal), "max")
except Exception as e:
    print("u8 check_qdq refused (expected: asymmetric):", str(e)[:200])
print("u8s8 asymmetric", bench("/work/runs/u8/u8.onnx"), flush=True)
