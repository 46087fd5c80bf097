"""Scratch: which INT8 nodes cost fidelity. Usage: sens.py [variant ...]"""
import sys, json
sys.path.insert(0, "/work/main")
from variants import build
from probe import fidelity, FP32, latency
from vpr_edge.engines import graph as G

m = G.load(FP32, load_weights=False)
idx = G.GraphIndex.of(m)
blocks = G.nodes_by_block(m)
roles = {"qkv": [], "proj": [], "fc1": [], "fc2": []}
per_block = {}
for b, names in blocks.items():
    w = [n for n in names if idx.nodes[n].op_type == "MatMul" and idx.is_constant(idx.nodes[n].input[1])]
    per_block[b] = w
    for r, n in zip(roles, w):
        roles[r].append(n)

out = {}
for v in sys.argv[1:]:
    kw = {}
    if v.startswith("no_"):
        r = v[3:]
        if r == "conv":
            kw["exclude_more"] = ["node_conv2d"]
        elif r.startswith("b"):
            bs = [int(x) for x in r[1:].split(",")]
            kw["exclude_more"] = [n for b in bs for n in per_block[b]]
        else:
            kw["exclude_more"] = roles[r]
    elif v.startswith("pct"):
        kw["method"] = "Percentile"; kw["pct"] = float(v[3:])
    elif v == "entropy":
        kw["method"] = "Entropy"
    p = build("s_" + v.replace(",", "_"), **kw)
    f = fidelity(p)
    out[v] = f
    print(v, {k: round(x, 4) for k, x in f.items()}, flush=True)
print(json.dumps(out))
