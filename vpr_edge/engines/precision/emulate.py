"""A CPU-faithful stand-in for an FP16 graph: FP32 arithmetic, FP16 rounding of every FP16 tensor.

Why: ONNX Runtime's CPU provider has no FP16 kernels for most ops. Its InsertCastTransformer runs
such nodes in FP32 and then removes the casts between two of them as "precision free", so a chain
of FP16 nodes is computed entirely in FP32 on CPU: an activation of 4e5 that is Inf in FP16 (and on
the GPU) passes through unharmed. Running the FP16 artifact in ORT checks that it loads and is
typed consistently, but not its numerics.

The emulation graph is derived from the FP16 artifact itself (so it checks exactly the types the
artifact assigns): FP16 initializers/constants become FP32 with FP16 values, and every node output
typed FP16 goes through an explicit Cast(FP16) -> Cast(FP32) pair. ORT keeps explicit narrowing
casts, so values are rounded (and overflow to Inf) where the engine would store them in FP16.
What it does not model: FP16 accumulation inside a kernel (TensorRT accumulates GEMMs in FP32, and
elementwise ops have no accumulation), so it is close to what TensorRT computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpr_edge.engines import graph as G
from vpr_edge.lazy import lazy_import


def fp16_emulation_graph(fp16_onnx: str | Path, load_weights: bool = True):
    """FP32 model that rounds where `fp16_onnx` stores FP16 (see module docstring). load_weights=False
    leaves external FP16 initializers as they are (`save_fp16_emulation` casts them while saving)."""
    onnx = lazy_import("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    model = G.load(fp16_onnx, load_weights=load_weights)
    types = G.tensor_types(G.with_shapes(model))
    g = model.graph

    for init in g.initializer:
        if init.data_type == G.FLOAT16 and not G.is_external(init):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == G.FLOAT16:
            vi.type.tensor_type.elem_type = G.FLOAT
    del g.value_info[:]

    taken = {t for n in g.node for t in [*n.input, *n.output] if t} | {i.name for i in g.initializer}

    def fresh(base: str) -> str:
        """A tensor name not in the graph (an FP16-I/O graph already holds `descriptor__fp32`)."""
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    new_nodes = []
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == G.FLOAT16:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
            new_nodes.append(node)
            continue
        for a in node.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == G.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        to16 = node.op_type == "Cast" and any(a.name == "to" and a.i == G.FLOAT16 for a in node.attribute)
        rounded = [i for i, t in enumerate(node.output) if t and types.get(t) == G.FLOAT16]
        if to16:
            for a in node.attribute:
                if a.name == "to":
                    a.i = G.FLOAT
        new_nodes.append(node)
        for i in rounded:
            t = node.output[i]
            pre, half = fresh(f"{t}__emulated_fp32"), fresh(f"{t}__emulated_fp16")
            node.output[i] = pre
            new_nodes.append(helper.make_node("Cast", [pre], [half], to=G.FLOAT16, name=f"emulate16_{t}"))
            new_nodes.append(helper.make_node("Cast", [half], [t], to=G.FLOAT, name=f"emulate32_{t}"))
    del g.node[:]
    g.node.extend(new_nodes)
    return model


def save_fp16_emulation(fp16_onnx: str | Path, dst: str | Path) -> Path:
    """Write the emulation graph; a big graph (external data) is cast to FP32 one tensor at a time while
    saving (ViT-G: 9.1 GiB peak loading the FP16 proto and upcasting it in memory)."""
    if not G.external_data_files(fp16_onnx):
        return G.save(fp16_emulation_graph(fp16_onnx), dst)
    model = fp16_emulation_graph(fp16_onnx, load_weights=False)

    def upcast(init, arr: np.ndarray) -> np.ndarray:
        return arr.astype(np.float32) if arr.dtype == np.float16 else arr

    return G.save_streamed(model, dst, Path(fp16_onnx).parent, upcast)
