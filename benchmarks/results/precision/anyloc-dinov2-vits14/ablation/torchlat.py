import sys, time; sys.path.insert(0,"/work/main")
import numpy as np, torch
from vpr_edge.benchmarks.torch_reference import TorchDescriber
from probe import images
print("threads", torch.get_num_threads())
d = TorchDescriber.from_artifact("/tmp/i8/fp32", weights="random")
db, q = images()
m = d.model
with torch.inference_mode():
    for bs in (1, 8):
        x = torch.from_numpy(q[:bs])
        for _ in range(3): m(x)
        t=[]
        for i in range(15 if bs==1 else 5):
            x = torch.from_numpy(q[i*bs % 100: i*bs%100+bs]); t0=time.perf_counter(); m(x); t.append((time.perf_counter()-t0)*1000/bs)
        print("torch fp32 bs", bs, "p50 ms/img", round(float(np.median(t)),1), flush=True)
