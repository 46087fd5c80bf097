"""What TensorRT's ONNX parser (onnx-tensorrt) accepts, per TensorRT version: the data `compat` checks against.

Where each table comes from (read with the search tool in stored copies; not fetched live):

- **10.15** (`T10_15_ROWS` below): onnx/onnx-tensorrt `docs/operators.md` as of TensorRT 10.15 ("TensorRT
  10.15 supports operators in the inclusive range of opset 9 to opset 24"), the newest table stored; Changelog
  entry "TensorRT 10.15 GA Release - 2026-2-2". https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
- **10.6**: the same file at commit 0137504e2b25fe5253bd85d26b073378fb67805b ("TensorRT 10.6 ... opset 9 to
  opset 22"); it differs from 10.15 in the rows listed in `_DIFF_10_6`.
- **10.3** (Jetson Orin, JetPack 6): no copy of the 10.3 table could be read (the release/10.3 branch is not
  in the store). It is the 10.6 table with what `docs/Changelog.md` lists as added in 10.4-10.6 taken back
  out (`_DIFF_10_3`: BlackmanWindow/HammingWindow/HannWindow and tensor `axes` for Pad in 10.4, real STFT in
  10.5, ONNX 1.17 / opset 22 in 10.6), and opset 9-20 as the 10.0 table states (the Changelog records no ONNX
  update between 10.0 and 10.6). Rows the changelog does not mention are assumed unchanged from 10.3 to 10.6.
- **11** (TensorRT 11.x): no 11.x operators.md is stored. It is the 10.15 table plus the parser changes in
  NVIDIA/TensorRT's GitHub release notes v11.0 ("Added support for Swish operator"), v11.2 ("Added support
  for the DFT operator and 5D GridSample") and v11.5 (opset 25 / ONNX 1.22, "Squeeze when axis input is
  omitted"). Opset 24 is kept as the maximum, what every 11.x parses; 11.5 adds 25 (NVIDIA "ONNX Opset
  Guide", docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html). TensorRT 11 has no
  weak typing: strongly typed is the only mode (TensorRT 11.0.0 release notes).

The "Supported Types" column lists the types of an op's data inputs (`DATA_INPUTS` names which inputs
those are); a row without types is checked for support only. Restrictions are the table's text, paraphrased;
the ones that can be read off a graph are enforced in `compat`.

Types (operators.md header, 10.x): DOUBLE is cast down to FLOAT with clamping (weights); INT8, INT4, FP8 and
FP4 are "quantized types", supported only through quantization from a higher-precision float (Q/DQ); UINT8 is
only supported as a network input or output. INT64 is native since TensorRT 9.0 ("The ONNX parser no longer
automatically casts INT64 to INT32", Changelog 9.0 EA): an op takes INT64 only where its row lists INT64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# ONNX TensorProto.DataType values (kept here so this module imports without onnx)
ONNX_TYPE_NAMES = {
    1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
    9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
    16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ",
    21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1", 24: "FLOAT8E8M0",
}
# ONNX type -> the name operators.md uses; types without one are no TensorRT type at all
TRT_TYPE = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
            11: "DOUBLE", 17: "FP8", 22: "INT4", 23: "FP4"}
QUANTIZED_TYPES = frozenset({"INT8", "FP8", "INT4", "FP4"})
FLOAT_TRT = frozenset({"FP32", "FP16", "BF16"})


def type_name(elem_type: int | None) -> str:
    """Readable name of an ONNX elem type: the TensorRT name when there is one."""
    if elem_type is None:
        return "unknown"
    return TRT_TYPE.get(elem_type) or ONNX_TYPE_NAMES.get(elem_type, f"type {elem_type}")


@dataclass(frozen=True)
class OpSupport:
    supported: bool
    types: frozenset[str] | None = None  # operators.md "Supported Types"; None: the row lists none
    restriction: str = ""  # operators.md "Restrictions", paraphrased

    def to_dict(self) -> dict:
        return {"supported": self.supported, "types": sorted(self.types) if self.types else None,
                "restriction": self.restriction}


@dataclass(frozen=True)
class OperatorTable:
    target: str  # what callers pass: "10.3", "11"
    trt_version: str  # what the table describes
    opsets: tuple[int, int]  # inclusive range the parser supports
    source: str
    derived: tuple[str, ...]  # deltas applied to the source table, each with where it comes from
    ops: Mapping[str, OpSupport]
    features: frozenset[str] = field(default_factory=frozenset)  # version-dependent parser behaviour (below)

    def get(self, op_type: str) -> OpSupport | None:
        return self.ops.get(op_type)

    def __post_init__(self) -> None:
        unknown = self.features - FEATURES.keys()
        if unknown:
            raise ValueError(f"table {self.target}: unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")

    def has(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise KeyError(f"unknown parser feature {feature!r}; known: {sorted(FEATURES)}")
        return feature in self.features

    def to_dict(self) -> dict:
        return {"target": self.target, "tensorrt": self.trt_version, "opsets": list(self.opsets),
                "source": self.source, "derived": list(self.derived), "operators": len(self.ops),
                "features": sorted(self.features)}


# Parser behaviour that changed between versions, named once; `compat` asks `table.has(...)`.
FEATURES = {
    "pad_tensor_axes": "Pad takes a tensor `axes` input (Changelog 10.4)",
    "squeeze_dynamic_axes": "Squeeze/Unsqueeze `axes` may be computed, not only an initializer (Changelog 10.7; "
                            "operators.md 10.15: 'resolvable to a constant')",
    "bn_mixed_precision": "mixed-precision BatchNormalization parses in strongly typed mode (Changelog 10.7)",
    "squeeze_omitted_axes": "Squeeze without an `axes` input (TensorRT 11.5 release notes)",
    "gridsample_5d": "5-D GridSample (TensorRT 11.2 release notes)",
    "strongly_typed_only": "weak typing removed; every network is strongly typed (TensorRT 11.0 release notes)",
}

# --- the 10.15 table -------------------------------------------------------------------------------------
# One row per line: `Op: TYPES | restriction` (an indented line continues the restriction); TYPES is N
# (unsupported), Y (supported, no types listed) or a comma list where F = FP32, FP16, BF16; I = INT32, INT64;
# B = BOOL.
T10_15_ROWS = """
Abs: F,I
Acos: F
Acosh: F
Add: F,I
AffineGrid: N
And: BOOL
ArgMax: F,I
ArgMin: F,I
Asin: F
Asinh: F
Atan: F
Atanh: F
Attention: F,INT8,FP8 | Q, K, V and attn_mask must be 4-D; past_key, past_value, nonpad_kv_seqlen inputs,
  present_key, present_value, qk_matmul_output outputs, qk_matmul_output_mode and softcap unsupported
AveragePool: F | 2-D or 3-D pooling only; dilations empty or all ones
BatchNormalization: F
Bernoulli: N
BitShift: N
BitwiseAnd: N
BitwiseNot: N
BitwiseOr: N
BitwiseXor: N
BlackmanWindow: FP32,FP16
Cast: F,I,UINT8,B
CastLike: F,I,UINT8,B
Ceil: F
Col2Im: N
Celu: F
CenterCropPad: N
Clip: F
Compress: N
Concat: F,I,B
ConcatFromSequence: N
Constant: F,FP8,FP4,INT4,I,B | sparse_value, value_string and value_strings attributes unsupported
ConstantOfShape: F,FP8,FP4,INT4,I,B
Conv: F
ConvInteger: N
ConvTranspose: F
Cos: F
Cosh: F
CumSum: F | axis must be a build-time constant
DFT: N
DeformConv: FP32,FP16 | input with 1-D or 2-D spatial dims; begin and end pads equal per axis
DepthToSpace: F,I
DequantizeLinear: INT8,FP8,FP4,INT4 | x_zero_point must be zero
Det: N
Div: F,I
Dropout: F | is_training must be an initializer that is False
DynamicQuantizeLinear: N
Einsum: F
Elu: F
Equal: F,I
Erf: F
Exp: F
Expand: F,I,B
EyeLike: F,I,B | input must have static dimensions
Flatten: F,I,B
Floor: F
Gather: F,I,B
GatherElements: F,I,B
GatherND: F,I,B
Gelu: F,INT8,I
Gemm: F
GlobalAveragePool: F
GlobalLpPool: F
GlobalMaxPool: F
Greater: F,I
GreaterOrEqual: F,I
GridSample: FP32,FP16 | input must be 4-D
GroupNormalization: F
GRU: F | bidirectional: same activations forward and reverse
HammingWindow: FP32,FP16
HannWindow: FP32,FP16
HardSigmoid: F
HardSwish: F
Hardmax: F | the axis dimension must be a build-time constant
Identity: F,I,B
If: F,I,B | branch outputs must have the same rank and different names
ImageScaler: F
ImageDecoder: N
InstanceNormalization: F
IsInf: F
IsNaN: F,I
LayerNormalization: F | only the first output Y is supported
LeakyRelu: F
Less: F,I
LessOrEqual: F,I
Log: F
LogSoftmax: F
Loop: F,I,B | scan output length cannot be dynamic; loop-carried shapes constant across iterations
LRN: F
LSTM: F | bidirectional: same activations; input_forget and layout must be 0
LpNormalization: F
LpPool: F | dilations empty or all ones
MatMul: F
MatMulInteger: N
Max: F,I
MaxPool: F | 2-D or 3-D pooling only; Indices output unsupported; dilations empty or all ones
MaxRoiPool: N
MaxUnpool: N
Mean: F,FP8,I
MeanVarianceNormalization: F
MelWeightMatrix: N
Min: F,I
Mish: FP32,FP16
Mod: F,I
Mul: F,I
Multinomial: N
Neg: F,I
NegativeLogLikelihoodLoss: N
NonMaxSuppression: FP32,FP16
NonZero: FP32,FP16
Not: BOOL
OneHot: F,I,B | depth must be a build-time constant
Optional: N
OptionalGetElement: N
OptionalHasElement: N
Or: BOOL
Pad: F,I
ParametricSoftplus: F
Pow: F,I
PRelu: F
QLinearConv: N
QLinearMatMul: N
QuantizeLinear: F | y_zero_point must be 0
RandomNormal: F | seed ignored
RandomNormalLike: F | seed ignored
RandomUniform: F | seed ignored
RandomUniformLike: F | seed ignored
Range: F,I
Reciprocal: F
ReduceL1: F,I | axes must be an initializer
ReduceL2: F,I | axes must be an initializer
ReduceLogSum: F,I | axes must be an initializer
ReduceLogSumExp: F,I | axes must be an initializer
ReduceMax: F,I | axes must be an initializer
ReduceMean: F,I | axes must be an initializer
ReduceMin: F,I | axes must be an initializer
ReduceProd: F,I | axes must be an initializer
ReduceSum: F,I | axes must be an initializer
ReduceSumSquare: F,I | axes must be an initializer
RegexFullMatch: N
Relu: F,I
Reshape: F,I,B
Resize: F | coordinate_transformation_mode half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric or
  align_corners; mode nearest or linear; nearest_mode floor, ceil, round_prefer_floor or round_prefer_ceil;
  keep_aspect_ratio_policy stretch; tensor scales need axes = 0..rank-1; no antialiasing
ReverseSequence: F,I,B
RMSNormalization: F
RNN: F | bidirectional: same activations
RoiAlign: FP32,FP16
RotaryEmbedding: F | position_ids must be INT64
Round: F
STFT: FP32 | frame_step and window must be initializers; real-valued input
ScaledTanh: F
Scan: F
Scatter: F,I
ScatterElements: F,I
ScatterND: F,I | reduction other than none unsupported
Selu: F
SequenceAt: N
SequenceConstruct: N
SequenceEmpty: N
SequenceErase: N
SequenceInsert: N
SequenceLength: N
SequenceMap: N
Shape: F,I,B
Shrink: F,I
Sigmoid: F
Sign: F,I
Sin: F
Sinh: F
Size: F,I,B
Slice: F,I,B
Softmax: F
SoftmaxCrossEntropyLoss: N
Softplus: F
Softsign: F
SpaceToDepth: F,I
Split: F,I,B
SplitToSequence: N
Sqrt: F
Squeeze: F,I,B | axes must be resolvable to a constant
StringConcat: N
StringNormalizer: N
StringSplit: N
Sub: F,I
Sum: F,I
Tan: F
Tanh: F
TensorScatter: F,INT32 | past_cache and update must be 4-D; axis must be -2
TfIdfVectorizer: N
ThresholdedRelu: F
Tile: F,I,B
TopK: F,I | sorted must be 1; K must be less than 3840
Transpose: F,I,B
Trilu: F,I,B
Unique: N
Unsqueeze: F,I,B | axes must be resolvable to a constant
Upsample: F
Where: F,I,B
Xor: BOOL
"""

_ABBREV = {"F": ("FP32", "FP16", "BF16"), "I": ("INT32", "INT64"), "B": ("BOOL",)}


def _parse_row(text: str) -> OpSupport:
    spec, _, restriction = text.partition("|")
    spec = spec.strip()
    if spec == "N":
        return OpSupport(False, None, restriction.strip())
    if spec == "Y":
        return OpSupport(True, None, restriction.strip())
    types: list[str] = []
    for part in spec.split(","):
        types.extend(_ABBREV.get(part.strip(), (part.strip(),)))
    return OpSupport(True, frozenset(types), restriction.strip())


def _parse(rows: str) -> dict[str, OpSupport]:
    joined: list[str] = []
    for line in rows.strip().splitlines():
        if line.startswith(" ") and joined:
            joined[-1] += " " + line.strip()
        else:
            joined.append(line)
    out: dict[str, OpSupport] = {}
    for line in joined:
        op, _, rest = line.partition(":")
        out[op.strip()] = _parse_row(rest)
    return out


def _apply(base: Mapping[str, OpSupport], diff: Mapping[str, str | None]) -> dict[str, OpSupport]:
    out = dict(base)
    for op, row in diff.items():
        if row is None:
            out.pop(op, None)  # not in that version's table at all
        else:
            out[op] = _parse_row(row)
    return out


# 10.6 (commit 0137504e) where it differs from 10.15; None: the row is absent in 10.6
_DIFF_10_6: dict[str, str | None] = {
    "Attention": None,
    "RMSNormalization": None,
    "RotaryEmbedding": None,
    "TensorScatter": None,
    "BlackmanWindow": "Y",
    "HammingWindow": "Y",
    "HannWindow": "Y",
    "Constant": "F,I,B | sparse_value, value_string and value_strings attributes unsupported",
    "ConstantOfShape": "F,I,B",  # the 10.6 row reads "INT32, INF64": a typo for INT64
    "CumSum": "F | axis must be an initializer",
    "DequantizeLinear": "INT8,FP8,INT4 | x_zero_point must be zero",
    "Pow": "F",
    "ScatterND": "F,I | reduction unsupported",
    "Squeeze": "F,I,B | axes must be an initializer",
    "Unsqueeze": "F,I,B | axes must be a constant tensor",
}
# 10.3 from 10.6: what docs/Changelog.md lists as added in 10.4 and 10.5
_DIFF_10_3: dict[str, str | None] = {
    "BlackmanWindow": "N",
    "HammingWindow": "N",
    "HannWindow": "N",
    "STFT": "N",
    "Pad": "F,I | axes input must be an initializer (tensor axes from 10.4)",
}
# 11.x from 10.15: TensorRT 11.0 / 11.2 GitHub release notes (types not documented there: float assumed)
_DIFF_11: dict[str, str | None] = {
    "Swish": "F | added in TensorRT 11.0; types not documented (float assumed)",
    "DFT": "Y | added in TensorRT 11.2 (FFT plugin)",
    "GridSample": "FP32,FP16 | input must be 4-D or 5-D (5-D from 11.2)",
}

_T10_15 = _parse(T10_15_ROWS)
_T10_6 = _apply(_T10_15, _DIFF_10_6)

TABLES: dict[str, OperatorTable] = {
    "10.3": OperatorTable(
        target="10.3",
        trt_version="TensorRT 10.3 (JetPack 6)",
        opsets=(9, 20),
        source="onnx/onnx-tensorrt docs/operators.md @ 0137504e2b25fe5253bd85d26b073378fb67805b (TensorRT 10.6)",
        derived=(
            "10.4 Changelog: BlackmanWindow, HammingWindow, HannWindow and Pad tensor axes added -> not in 10.3",
            "10.5 Changelog: real-valued STFT added -> not in 10.3",
            "10.6 Changelog: ONNX 1.17 (opset 22) -> opset 9-20 as the 10.0 table states",
            "10.7 Changelog: dynamic Squeeze/Unsqueeze axes, mixed-precision BatchNormalization -> not in 10.3",
        ),
        ops=MappingProxyType(_apply(_T10_6, _DIFF_10_3)),
        features=frozenset(),
    ),
    "10.15": OperatorTable(
        target="10.15",
        trt_version="TensorRT 10.15",
        opsets=(9, 24),
        source="onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15, newest stored)",
        derived=(),
        ops=MappingProxyType(dict(_T10_15)),
        features=frozenset({"pad_tensor_axes", "squeeze_dynamic_axes", "bn_mixed_precision"}),
    ),
    "11": OperatorTable(
        target="11",
        trt_version="TensorRT 11.x",
        opsets=(9, 24),
        source="onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15) + NVIDIA/TensorRT release notes v11.0-v11.5",
        derived=(
            "11.0 release notes: Swish supported",
            "11.2 release notes: DFT and 5-D GridSample supported",
            "11.5 release notes: opset 25 and Squeeze without axes (kept out: max opset 24 parses on every 11.x)",
        ),
        ops=MappingProxyType(_apply(_T10_15, _DIFF_11)),
        features=frozenset({"pad_tensor_axes", "squeeze_dynamic_axes", "bn_mixed_precision", "gridsample_5d",
                            "strongly_typed_only"}),
    ),
}
DEFAULT_TARGETS = ("10.3", "11")

# Which inputs carry the op's data type (the "Supported Types" column); all: every input; default (0,).
ALL = "all"
DATA_INPUTS: dict[str, tuple[int, ...] | str] = {
    **{op: ALL for op in ("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Greater",
                          "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Concat", "Range")},
    "Where": (1, 2),
    "MatMul": (0, 1),
    "Gemm": (0, 1, 2),
    "Conv": (0, 1, 2),
    "ConvTranspose": (0, 1, 2),
    "Clip": (0, 1, 2),
    "PRelu": (0, 1),
    "Pad": (0, 2),
    "Einsum": ALL,
    # the row's types are the output's: the inputs are sizes/shapes
    **{op: () for op in ("ConstantOfShape", "HannWindow", "HammingWindow", "BlackmanWindow", "RandomNormal",
                         "RandomUniform", "Constant")},
}
# ops whose table types describe the output (they have no data input, or convert it)
TYPED_OUTPUTS = frozenset({"Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal",
                           "RandomUniform", "RandomNormalLike", "RandomUniformLike", "HannWindow", "HammingWindow",
                           "BlackmanWindow"})
