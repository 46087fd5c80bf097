"""An artifact that takes camera pixels: uint8 [B, H, W, 3] RGB in, normalisation inside the graph.

The fast preprocessing (`imaging.fast`) ends in uint8 [H, W, 3]; with this input the host does no float
work at all and a GPU engine does the cast, the layout change and the normalisation, on 1 byte per value
over the bus instead of 4. The graph gets a new input named like the old one, followed by
Cast(float) -> Transpose (NHWC -> NCHW) -> Sub(255 mean) -> Mul(1 / (255 std)) [-> Cast(float16)
for float16-input graphs] feeding everything the old input fed. The constants are the float32 values
`imaging.fast.normalize` uses, in the same order of operations, so the result equals the float-input
artifact fed numpy's normalisation of the same pixels (checked at export). Standard ops only: TensorRT
parses it (uint8 network inputs go through a Cast).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpr_edge.engines.graph import FLOAT, FLOAT16, load, onnx_module
from vpr_edge.errors import ArtifactError
from vpr_edge.presets import Preprocess

UINT8 = 2


def add_uint8_input(path: str | Path, pre: Preprocess) -> None:
    """Rewrite the ONNX graph at `path` in place (its external-data files are left as they are)."""
    onnx = onnx_module()
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    path = Path(path)
    model = load(path, load_weights=False)
    g = model.graph
    if len(g.input) != 1:
        raise ArtifactError(f"{path}: expected one graph input, got {[i.name for i in g.input]}")
    old = g.input[0]
    elem = old.type.tensor_type.elem_type
    if elem == UINT8:
        raise ArtifactError(f"{path}: the graph already takes uint8 input")
    if elem not in (FLOAT, FLOAT16):
        raise ArtifactError(f"{path}: input {old.name} has ONNX type {elem}, expected float or float16")
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3:
        raise ArtifactError(f"{path}: input {old.name} must be [B, 3, H, W], got {dims}")
    name = old.name
    inner = f"{name}_normalized"
    for node in g.node:  # everything that read the input now reads the normalised tensor
        for i, x in enumerate(node.input):
            if x == name:
                node.input[i] = inner
    for out in g.output:
        if out.name == name:
            raise ArtifactError(f"{path}: the graph returns its input; nothing to normalise into")
    mean = np.asarray(pre.mean, np.float32) * np.float32(255.0)
    inv = np.float32(1.0) / (np.asarray(pre.std, np.float32) * np.float32(255.0))
    g.initializer.extend([
        numpy_helper.from_array(mean.reshape(1, 3, 1, 1), f"{name}_mean255"),
        numpy_helper.from_array(inv.reshape(1, 3, 1, 1), f"{name}_inv_std255"),
    ])
    last = f"{name}_scaled" if elem == FLOAT16 else inner
    head = [
        # the Cast comes first: TensorRT takes UINT8 only as a network input cast to another type
        helper.make_node("Cast", [name], [f"{name}_float"], to=FLOAT, name=f"{name}_to_float"),
        helper.make_node("Transpose", [f"{name}_float"], [f"{name}_nchw"], perm=[0, 3, 1, 2], name=f"{name}_to_nchw"),
        helper.make_node("Sub", [f"{name}_nchw", f"{name}_mean255"], [f"{name}_centred"], name=f"{name}_sub_mean"),
        helper.make_node("Mul", [f"{name}_centred", f"{name}_inv_std255"], [last], name=f"{name}_mul_inv_std"),
    ]
    if elem == FLOAT16:
        head.append(helper.make_node("Cast", [last], [inner], to=FLOAT16, name=f"{name}_to_float16"))
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(head + nodes)
    new = helper.make_tensor_value_info(name, UINT8, [dims[0], dims[2], dims[3], 3])
    g.input.pop()
    g.input.append(new)
    onnx.checker.check_model(model)  # structure only: weights stay in their external files
    onnx.save(model, str(path))
