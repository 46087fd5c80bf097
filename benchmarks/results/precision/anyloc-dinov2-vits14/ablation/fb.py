import sys, json, hashlib, logging
sys.path.insert(0, "/work/main")
logging.basicConfig(level=logging.INFO, format="%(message)s")
from variants import build
from probe import fidelity, FP32, latency
from vpr_edge.engines import graph as G
from vpr_edge.engines.precision.fallback import fallback_search
target = float(sys.argv[1])
m = G.load(FP32, load_weights=False)
blocks = G.nodes_by_block(m)
flops = G.node_flops(m)
ops = {n.name: n.op_type for n in m.graph.node}
def b(keep):
    tag = hashlib.sha1("\n".join(sorted(keep)).encode()).hexdigest()[:8]
    return build("fb_" + tag, exclude_more=["node_conv2d", *[n for n in keep if ops[n] in ("MatMul", "Conv")]])
fid = {}
def ev(p):
    f = fidelity(p); fid[str(p)] = f; print(p, f, flush=True); return f["top1_q"]
res = fallback_search(b, ev, blocks, target, flops=flops, refine_nodes=len(sys.argv) > 2,
                      node_filter=lambda n: ops[n] in ("MatMul", "Conv"), max_evals=40)
print("RESULT", res.met, res.blocks, len(res.nodes), res.agreement, res.cost, res.path)
print("latency", latency(res.path, runs=20), fid.get(str(res.path)))
