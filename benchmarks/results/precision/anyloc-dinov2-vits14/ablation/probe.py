"""Scratch: INT8 variants of ViT-S, latency/profile/fidelity. Not part of the repo."""
import json, sys, time, collections, os
from pathlib import Path
import numpy as np
import onnxruntime as ort

sys.path.insert(0, "/work/main")
from vpr_edge.engines.precision import calibration as C
from vpr_edge.presets import get

W = Path("/tmp/i8")
FP32 = W / "fp32/model.onnx"
pre = get("anyloc-dinov2-vits14").preprocess


def images():
    f = W / "images.npz"
    if f.exists():
        z = np.load(f)
        return z["db"], z["q"]
    db, _ = C.calibration_images("/work/shared/data/corridor/database", pre)
    q, _ = C.calibration_images("/work/shared/data/corridor/queries", pre)
    np.savez(f, db=db, q=q)
    return db, q


def session(path, threads=2, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, profile=None, extra=None):
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = threads
    o.graph_optimization_level = level
    if profile:
        o.enable_profiling = True
        o.profile_file_prefix = profile
    for k, v in (extra or {}).items():
        o.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def run(sess, x, bs=8):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + bs]})[0] for i in range(0, len(x), bs)])


def latency(path, runs=20, bs=1, extra=None):
    db, q = images()
    s = session(path, extra=extra)
    x = q[:bs]
    name = s.get_inputs()[0].name
    for _ in range(3):
        s.run(None, {name: x})
    t = []
    for i in range(runs):
        x = q[(i * bs) % 100:(i * bs) % 100 + bs]
        t0 = time.perf_counter()
        s.run(None, {name: x})
        t.append((time.perf_counter() - t0) * 1000 / bs)
    return float(np.median(t))


def reference():
    f = W / "ref.npz"
    if f.exists():
        z = np.load(f)
        return z["db"], z["q"]
    db, q = images()
    s = session(FP32)
    rd, rq = run(s, db), run(s, q)
    np.savez(f, db=rd, q=rq)
    return rd, rq


def fidelity(path):
    db, q = images()
    rd, rq = reference()
    s = session(path)
    d, qq = run(s, db), run(s, q)
    def n(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = np.concatenate([(n(d) * n(rd)).sum(1), (n(qq) * n(rq)).sum(1)])
    top_ref = (n(rq) @ n(rd).T).argmax(1)
    top = (n(qq) @ n(d).T).argmax(1)
    # also db-vs-db (leave one out) agreement
    sref = n(rd) @ n(rd).T; np.fill_diagonal(sref, -9)
    sx = n(d) @ n(d).T; np.fill_diagonal(sx, -9)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1_q": float((top == top_ref).mean()),
            "top1_db_loo": float((sx.argmax(1) == sref.argmax(1)).mean())}


def profile(path, n=10):
    db, q = images()
    s = session(path, profile=str(W / "prof"))
    name = s.get_inputs()[0].name
    for i in range(3 + n):
        s.run(None, {name: q[i:i + 1]})
    pf = s.end_profiling()
    ev = json.load(open(pf))
    os.unlink(pf)
    by = collections.defaultdict(float)
    cnt = collections.Counter()
    runs = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in runs:
        op = e["args"]["op_name"]
        by[op] += e["dur"] / 1000 / (3 + n)
        cnt[op] += 1
    tot = sum(by.values())
    print(f"profile {path}: node total {tot:.1f} ms/img")
    for op, ms in sorted(by.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {op:28s} {ms:7.2f} ms  ({cnt[op] // (3 + n)} nodes)")
    return by


if __name__ == "__main__":
    images(); reference()
    for p in sys.argv[1:]:
        print(p, "p50 ms b1", round(latency(p), 1))
        profile(p)
