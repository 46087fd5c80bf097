import sys, numpy as np
from pathlib import Path
import onnxruntime as ort
from vpr_edge.engines.precision import minmax as M
from vpr_edge.engines.precision.int8 import QUANTIZED_OPS
def rss():
    d = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return f"rss {int(d['VmRSS'].split()[0])/2**20:.2f} GiB hwm {int(d['VmHWM'].split()[0])/2**20:.2f} GiB"
src = Path(sys.argv[1]); which = sys.argv[2]; level = sys.argv[3]
path = src if which == "plain" else M.write_augmented(src, QUANTIZED_OPS)[0]
so = ort.SessionOptions(); so.log_severity_level = 3
so.add_session_config_entry("session.disable_prepacking", "1")
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
x = np.zeros((int(sys.argv[4]), 3, 224, 224), np.float32)
for i in range(2):
    s.run(None, {"images": x}); print(which, level, "run", i, rss(), flush=True)
if which != "plain": path.unlink()
