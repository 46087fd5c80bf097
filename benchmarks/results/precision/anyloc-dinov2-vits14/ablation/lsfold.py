import sys; sys.path.insert(0, "/work/main")
import onnx, numpy as np
from onnx import numpy_helper as nh
from vpr_edge.engines import graph as G

def fold_layerscale(model):
    idx = G.GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    drop = []
    for name, mul in list(idx.nodes.items()):
        if mul.op_type != "Mul": continue
        g = [t for t in mul.input if t in inits]
        if len(g) != 1: continue
        src = [t for t in mul.input if t not in inits][0]
        add = idx.nodes.get(idx.producer.get(src, ""))
        if add is None or add.op_type != "Add" or len(idx.consumers[src]) != 1: continue
        b = [t for t in add.input if t in inits]
        if len(b) != 1: continue
        mm_out = [t for t in add.input if t not in inits][0]
        mm = idx.nodes.get(idx.producer.get(mm_out, ""))
        if mm is None or mm.op_type != "MatMul" or mm.input[1] not in inits or len(idx.consumers[mm_out]) != 1: continue
        if len(idx.consumers[mm.input[1]]) != 1 or len(idx.consumers[b[0]]) != 1: continue
        gamma = nh.to_array(inits[g[0]]); W = nh.to_array(inits[mm.input[1]]); bias = nh.to_array(inits[b[0]])
        if gamma.ndim != 1 or W.ndim != 2 or gamma.shape[0] != W.shape[1]: continue
        inits[mm.input[1]].CopyFrom(nh.from_array((W * gamma).astype(W.dtype), mm.input[1]))
        inits[b[0]].CopyFrom(nh.from_array((bias * gamma).astype(bias.dtype), b[0]))
        out = mul.output[0]
        for c in idx.consumers.get(out, []):
            node = idx.nodes[c]
            node.input[:] = [src if t == out else t for t in node.input]
        if out in idx.graph_outputs: continue
        drop.append(mul)
    for n in drop: model.graph.node.remove(n)
    return len(drop)

if __name__ == "__main__":
    m = onnx.load(sys.argv[1]); print("folded", fold_layerscale(m)); onnx.save(m, sys.argv[2])
