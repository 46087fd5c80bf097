import sys; sys.path.insert(0, "/work/main")
import onnx, numpy as np
from onnx import numpy_helper as nh
from vpr_edge.engines import graph as G

def const_value(idx, inits, t):
    if t in inits:
        a = nh.to_array(inits[t]); return float(a.reshape(-1)[0]) if a.size == 1 else None
    return None

def reorder_gelu(model):
    idx = G.GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    n = 0
    for name, div in idx.nodes.items():
        if div.op_type != "Div": continue
        v = const_value(idx, inits, div.input[1])
        if v is None or abs(v - 2 ** 0.5) > 1e-4: continue
        x = div.input[0]
        c = idx.consumers.get(div.output[0], [])
        if len(c) != 1 or idx.nodes[c[0]].op_type != "Erf": continue
        erf = idx.nodes[c[0]]
        c = idx.consumers.get(erf.output[0], [])
        if len(c) != 1 or idx.nodes[c[0]].op_type != "Add": continue
        add = idx.nodes[c[0]]
        c = idx.consumers.get(add.output[0], [])
        if len(c) != 1 or idx.nodes[c[0]].op_type != "Mul": continue
        half = idx.nodes[c[0]]
        other = [t for t in half.input if t != add.output[0]]
        if len(other) != 1 or const_value(idx, inits, other[0]) != 0.5: continue
        c = idx.consumers.get(half.output[0], [])
        if len(c) != 1 or idx.nodes[c[0]].op_type != "Mul": continue
        last = idx.nodes[c[0]]
        if x not in last.input: continue
        # (0.5 * (1 + erf)) * x  ->  (x * 0.5) * (1 + erf)
        half.input[:] = [x, other[0]]
        last.input[:] = [add.output[0], half.output[0]]
        n += 1
    # topological order: 'half' now reads x only, still placed after add: fine (already sorted)
    return n

if __name__ == "__main__":
    m = onnx.load(sys.argv[1])
    print("rewrote", reorder_gelu(m))
    onnx.save(m, sys.argv[2])
