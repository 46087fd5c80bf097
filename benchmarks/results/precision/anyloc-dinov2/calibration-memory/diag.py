import sys, time, numpy as np, functools
sys.stdout.reconfigure(line_buffering=True)
def rss():
    d = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return f"rss {int(d['VmRSS'].split()[0])/2**20:.2f} GiB hwm {int(d['VmHWM'].split()[0])/2**20:.2f} GiB"
def wrap(mod, name):
    f = getattr(mod, name)
    @functools.wraps(f)
    def g(*a, **k):
        print(f"> {name} {rss()}")
        t = time.time(); r = f(*a, **k)
        print(f"< {name} {rss()} {time.time()-t:.0f}s")
        return r
    setattr(mod, name, g)
from vpr_edge.engines.precision import int8 as I, minmax as M, rewrites as R, graph as G
import onnxruntime as ort, onnxruntime.quantization as q
wrap(R, "tidy_for_ort"); wrap(G, "load"); wrap(G, "save"); wrap(M, "minmax_ranges"); wrap(M, "tensors_to_calibrate"); wrap(q, "quantize_static")
orig_sess = ort.InferenceSession
class S(orig_sess):
    def __init__(self, *a, **k):
        print(f"> session {rss()}"); super().__init__(*a, **k); print(f"< session {rss()}")
    def run(self, *a, **k):
        r = super().run(*a, **k); print(f"  run {rss()}"); return r
ort.InferenceSession = S
src = sys.argv[1]
x = np.random.default_rng(0).normal(size=(int(sys.argv[2]), 3, 224, 224)).astype(np.float32)
print("start", rss())
I.int8_from_onnx(src, "/work/runs/memdiag/out/int8.onnx", [x[i:i+4] for i in range(0, len(x), 4)], "max")
print("end", rss())
