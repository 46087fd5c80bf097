"""Outlier-aware INT8: what a few huge activation channels would cost a per-tensor scale, moved out of its way.

Per-tensor activation scales (what TensorRT's INT8 MatMul takes) are set by the largest value of the
tensor. Trained ViTs carry a few channels whose values are 10-1000x the rest (massive activations; see
`models.outliers`, the stress model), so one channel sets the step for all. Two exact rewrites of the FP32
graph, applied before Q/DQ insertion, per quantised MatMul `Y = X @ W` (W constant [K, N]):

- **split** (LLM.int8()'s mixed decomposition, Dettmers et al. 2022): channels whose calibrated max |X_j|
  exceeds `split_ratio` x the median channel's are taken out of the quantised product:
  `Y = (X * mask) @ W_masked + X[..., C] @ W[C, :]`, the second term a thin float MatMul (|C| of K rows:
  its FLOPs are recorded as kept in higher precision), the mask a constant Mul before the Q node.
- **smooth** (SmoothQuant, Xiao et al. 2023): per-channel scales `s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha)`
  migrate the remaining spread from activations into weights (X / s, s * W), where the channel spread
  (max / median of max |X_j|) exceeds `smooth_ratio`. 1/s is folded into the LayerNorm producing X when X
  feeds nothing else (free at run time), otherwise it is a constant Mul (with the split mask, one node).
  The MLP's second MatMul (GELU output, where massive activations arise) gets the Mul: GELU is not
  homogeneous, so nothing upstream can absorb it.

Both keep standard ONNX (Mul, Gather, MatMul, Add) and the Q/DQ placement TensorRT expects (Q/DQ on the
MatMul's inputs; the float Mul fuses into the quantize step). Below the ratios nothing is touched, so
well-behaved graphs (random weights) come out unchanged. Channel statistics come from the same calibration
pass as the ranges (`minmax.minmax_ranges(channels=...)`); the ranges of the rewritten inputs are derived
from them exactly (symmetric max calibration: max_j |X_j| / s_j).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from vpr_edge.engines.graph import GraphIndex, insert_after, tensor_array
from vpr_edge.errors import ConfigError
from vpr_edge.lazy import lazy_import


@dataclass(frozen=True)
class OutlierOptions:
    """How INT8 treats outlier channels (recorded in the manifest). split_ratio / smooth_ratio 0: off."""

    split_ratio: float = 64.0  # channel max / median channel max above which a channel leaves the INT8 product
    max_split_fraction: float = 0.01  # at most this share of a MatMul's input channels (>= 1 channel)
    smooth_ratio: float = 8.0  # channel spread above which SmoothQuant scales are applied
    alpha: float = 0.5  # SmoothQuant migration strength (0: none, 1: all into the weights)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--smooth-alpha must be in [0, 1], got {self.alpha}")
        if self.split_ratio < 0 or self.smooth_ratio < 0 or not 0 < self.max_split_fraction <= 0.5:
            raise ConfigError("outlier ratios must be >= 0 (0: off) and the split fraction in (0, 0.5]")

    @property
    def active(self) -> bool:
        return bool(self.split_ratio or self.smooth_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OFF = OutlierOptions(split_ratio=0.0, smooth_ratio=0.0)


@dataclass
class Group:
    """The quantised MatMuls reading one activation tensor."""

    tensor: str
    matmuls: list[str]
    channels: int  # K


@dataclass
class SmoothReport:
    options: dict[str, Any]
    smoothed: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, int] = field(default_factory=dict)  # original MatMul -> channels taken out
    split_nodes: dict[str, str] = field(default_factory=dict)  # float MatMul added -> the MatMul it serves
    split_share: dict[str, float] = field(default_factory=dict)  # original MatMul -> |C| / K (its FLOPs share kept float)
    ranges: dict[str, float] = field(default_factory=dict)  # tensor -> max |value| after the rewrite

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "tensors_smoothed": len(self.smoothed),
            "folded_into_layernorm": sum(1 for s in self.smoothed if s["how"] == "layernorm"),
            "scaled_by_mul": sum(1 for s in self.smoothed if s["how"] == "mul"),
            "matmuls_split": len(self.split),
            "channels_split": int(sum(self.split.values())),
            "detail": self.smoothed,
        }


def groups(model, quantized: Iterable[str]) -> list[Group]:
    """Activation tensors of quantised MatMuls with a constant float32 [K, N] weight, grouped by tensor;
    a tensor also read by anything else is left alone (its other readers would see the rewrite)."""
    idx = GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(quantized)
    by_tensor: dict[str, list[str]] = {}
    for name, node in idx.nodes.items():
        if name not in wanted or node.op_type != "MatMul" or len(node.input) != 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type != 1 or node.input[0] in idx.initializers:
            continue
        by_tensor.setdefault(node.input[0], []).append(name)
    out = []
    for t, mms in by_tensor.items():
        if set(idx.consumers.get(t, [])) != set(mms) or t in idx.graph_outputs:
            continue
        out.append(Group(t, mms, int(inits[idx.nodes[mms[0]].input[1]].dims[0])))
    return out


def _layernorm_params(idx: GraphIndex, tensor: str, inits: dict[str, Any]) -> tuple[str, str] | None:
    """(scale, bias) initializers of the LayerNormalization producing `tensor`, if they are its alone."""
    prod = idx.nodes.get(idx.producer.get(tensor, ""))
    if prod is None or prod.op_type != "LayerNormalization" or len(prod.input) < 3 or prod.output[0] != tensor:
        return None
    if len(prod.output) > 1 and any(prod.output[1:]):
        return None
    scale, bias = prod.input[1], prod.input[2]
    if scale not in inits or bias not in inits:
        return None
    if any(len(idx.consumers.get(t, [])) != 1 for t in (scale, bias)):
        return None
    return scale, bias


def smooth_(model, absmax: dict[str, np.ndarray], grps: list[Group], opts: OutlierOptions,
            weights_dir=None) -> SmoothReport:
    """Apply split + smoothing to `model` in place, from per-channel max |X| of each group's tensor."""
    onnx = lazy_import("onnx")
    nh, helper = onnx.numpy_helper, onnx.helper
    rep = SmoothReport(options=opts.to_dict())
    if not opts.active:
        return rep
    idx = GraphIndex.of(model)
    inits = {i.name: i for i in model.graph.initializer}
    after: dict[str, list] = {}  # tensor -> nodes to insert right after its producer
    after_node: dict[str, list] = {}  # node name -> nodes to insert right after it
    new_inits = []

    def add_init(arr: np.ndarray, name: str) -> str:
        new_inits.append(nh.from_array(arr, name))
        return name

    for grp in grps:
        a = np.asarray(absmax.get(grp.tensor, []), dtype=np.float64)
        if a.shape != (grp.channels,) or not np.isfinite(a).all():
            continue
        med = float(np.median(a)) or 1e-12
        split = np.zeros(grp.channels, dtype=bool)
        if opts.split_ratio:
            cap = max(1, int(opts.max_split_fraction * grp.channels))
            over = np.flatnonzero(a > opts.split_ratio * med)
            split[over[np.argsort(-a[over])][:cap]] = True
        smooth = bool(opts.smooth_ratio) and _spread(a, ~split) > opts.smooth_ratio and opts.alpha > 0
        if not split.any() and not smooth:
            continue
        weights = {mm: tensor_array(inits[idx.nodes[mm].input[1]], weights_dir).astype(np.float32) for mm in grp.matmuls}
        s = np.ones(grp.channels)
        if smooth:
            wmax = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0).astype(np.float64)
            ok = (a > 0) & (wmax > 0) & ~split
            s[ok] = a[ok] ** opts.alpha / wmax[ok] ** (1 - opts.alpha)
            s = np.clip(s, 1e-4, 1e4)
        inv = np.where(split, 0.0, 1.0 / s)
        ln = _layernorm_params(idx, grp.tensor, inits) if not split.any() else None
        read = grp.tensor
        if ln is not None:  # fold 1/s into the LayerNorm: no node added
            for p in ln:
                arr = tensor_array(inits[p], weights_dir)
                inits[p].CopyFrom(nh.from_array((arr * inv).astype(arr.dtype), p))
        else:
            read = f"{grp.tensor}__int8_scaled"
            mul = helper.make_node("Mul", [grp.tensor, add_init(inv.astype(np.float32), f"{read}__inv_scale")], [read],
                                   name=f"{read}__mul")
            after.setdefault(grp.tensor, []).append(mul)
        cols = np.flatnonzero(split)
        for mm in grp.matmuls:
            node = idx.nodes[mm]
            w = weights[mm]
            w_scaled = (w * s[:, None]).astype(np.float32)
            w_scaled[split] = 0.0
            inits[node.input[1]].CopyFrom(nh.from_array(w_scaled, node.input[1]))
            node.input[0] = read
            if cols.size:
                base = f"{mm}__outlier_channels"
                gathered = f"{base}__x"
                idx_name = add_init(cols.astype(np.int64), f"{base}__index")
                w_out = add_init(w[cols].astype(np.float32), f"{base}__weight")
                main_out = f"{node.output[0]}__int8_part"
                out_name = node.output[0]
                node.output[0] = main_out
                after.setdefault(grp.tensor, []).extend([
                    helper.make_node("Gather", [grp.tensor, idx_name], [gathered], axis=-1, name=f"{base}__gather"),
                    helper.make_node("MatMul", [gathered, w_out], [f"{base}__y"], name=base),
                ])
                after_node.setdefault(mm, []).append(
                    helper.make_node("Add", [main_out, f"{base}__y"], [out_name], name=f"{base}__add"))
                rep.split[mm] = int(cols.size)
                rep.split_nodes[base] = mm
                rep.split_share[mm] = cols.size / grp.channels
        rep.ranges[read] = float(np.max(a * np.abs(inv)))
        rep.smoothed.append({
            "tensor": grp.tensor, "matmuls": grp.matmuls, "how": "layernorm" if ln is not None else "mul",
            "channels_split": int(cols.size), "smoothed": smooth,
            "spread_before": round(_spread(a, np.ones_like(split)), 2),
            "spread_after": round(_spread(a * np.abs(inv), ~split), 2),
        })
    model.graph.initializer.extend(new_inits)
    insert_after(model, after, after_node)
    return rep


def _spread(x: np.ndarray, keep: np.ndarray) -> float:
    """max / median of the kept channels' max |x| (1 when none is kept)."""
    x = x[keep]
    return float(x.max() / (np.median(x) or 1e-12)) if x.size else 1.0
