"""Deployment targets: what the TensorRT ONNX parser of each Jetson Orin / x86 release accepts.

The operator tables are the rows marked supported ("Y") in onnx/onnx-tensorrt ``docs/operators.md``
at the release branches 8.5-GA and 8.6-GA; TensorRT 10.3 uses the 10.1-GA table, because the
onnx-tensorrt CHANGELOG entries for 10.2 and 10.3 add no operator (10.3 only adds tensor ``axes`` for
Slice and moves ScatterElements-with-reduction to an updated plugin). For every one of those branches
the "Y" rows are exactly the default-domain op importers registered in the parser source.
Other facts (opset ranges, TopK, ScatterElements, LayerNormalization) are summarised in
docs/foundation.md (Lint targets) and in the rules of staticprune/export/lint.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Default-domain ops marked "Y" in onnx-tensorrt@8.5-GA docs/operators.md (142 ops).
_OPS_TRT85 = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements",
    "GatherND", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "HardSigmoid", "HardSwish", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN",
    "LRN", "LSTM", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool",
    "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow",
    "QuantizeLinear", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape",
    "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK",
    "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})

# onnx-tensorrt@8.6-GA adds these three "Y" rows to the 8.5 table (145 ops).
_OPS_TRT86 = _OPS_TRT85 | {"GroupNormalization", "IsInf", "LayerNormalization"}

# onnx-tensorrt@10.0-GA adds CastLike, Gelu, Hardmax, Mish; 10.1-GA adds DeformConv (150 ops).
_OPS_TRT10 = _OPS_TRT86 | {"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"}

_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")

# Inputs the parser reads as weights (initializer or Constant), by op: {input index: input name}.
# TopK's K and CumSum's axis have their own lint rules and are not repeated here. Clip is not listed: with tensor
# (non-initializer) min/max the importers of 8.5, 8.6 and 10.x take an elementwise path.
_CONSTANT_INPUTS_COMMON: dict[str, dict[int, str]] = {
    "Squeeze": {1: "axes"},        # "`axes` must be an initializer" (all three tables)
    "Unsqueeze": {1: "axes"},      # "`axes` must be a constant tensor" (all three tables)
    "Dropout": {2: "training_mode"},
    **{op: {1: "axes"} for op in _REDUCE_OPS},  # importer: "Axis input must be an initializer!"
}
_CONSTANT_INPUTS_TRT8: dict[str, dict[int, str]] = {
    **_CONSTANT_INPUTS_COMMON,
    "Slice": {3: "axes"},  # tensor axes for Slice arrive in TensorRT 10.3 (CHANGELOG)
}
_CONSTANT_INPUTS_TRT85: dict[str, dict[int, str]] = {
    **_CONSTANT_INPUTS_TRT8,
    "InstanceNormalization": {1: "scale", 2: "B"},  # 8.5 table only
}
_CONSTANT_INPUTS_TRT10: dict[str, dict[int, str]] = {
    **_CONSTANT_INPUTS_COMMON,
    "Pad": {3: "axes"},  # 10.1 table; tensor axes for Pad arrive in 10.4
}

# TensorProto type names TensorRT cannot hold as tensors. DOUBLE is in every list on purpose:
# the parser casts float64 down silently, so the lint insists the export is float32.
_NO_TRT_TYPES = ("DOUBLE", "STRING", "COMPLEX64", "COMPLEX128", "INT16", "UINT16", "UINT32", "UINT64")
_NEW_TYPES = ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
              "FLOAT4E2M1", "FLOAT6E2M3", "FLOAT6E3M2", "INT4", "UINT4", "INT2", "UINT2")
# Orin is sm_87: no FP8/FP4 hardware, whatever the TensorRT version.
_NOT_ON_ORIN = ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
                "FLOAT4E2M1", "FLOAT6E2M3", "FLOAT6E3M2")


@dataclass(frozen=True)
class Target:
    """One TensorRT deployment target and the ONNX rules its parser imposes."""

    name: str
    trt_version: str
    description: str
    min_opset: int
    max_opset: int
    supports_layernorm: bool
    scatter_reduction: bool
    topk_k_must_be_initializer: bool
    supported_ops: frozenset[str]
    ops_source: str
    topk_max_k: int = 3840
    topk_requires_sorted: bool = False
    einsum_restricted: bool = False
    native_int64: bool = True
    supports_local_functions: bool = True
    unsupported_dtypes: frozenset[str] = frozenset(_NO_TRT_TYPES)
    constant_inputs: Mapping[str, Mapping[int, str]] = field(
        default_factory=lambda: MappingProxyType({}), compare=False)

    @property
    def trt_major(self) -> int:
        """Major TensorRT version as an int (8 or 10)."""
        return int(self.trt_version.split(".")[0])


def _frozen(table: dict[str, dict[int, str]]) -> Mapping[str, Mapping[int, str]]:
    return MappingProxyType({op: MappingProxyType(dict(ix)) for op, ix in table.items()})


def _trt10(name: str, description: str, unsupported_dtypes: frozenset[str]) -> Target:
    return Target(
        name=name,
        trt_version="10.3",
        description=description,
        min_opset=9,
        max_opset=20,
        supports_layernorm=True,
        scatter_reduction=True,
        topk_k_must_be_initializer=False,
        topk_requires_sorted=True,
        supported_ops=_OPS_TRT10,
        ops_source="onnx-tensorrt@10.1-GA docs/operators.md (no new ops in the 10.2/10.3 CHANGELOG)",
        unsupported_dtypes=unsupported_dtypes,
        constant_inputs=_frozen(_CONSTANT_INPUTS_TRT10),
    )


TARGETS: dict[str, Target] = {
    "orin-jp6": _trt10(
        "orin-jp6", "Jetson Orin, JetPack 6.1/6.2 (L4T 36.4), CUDA 12.6, TensorRT 10.3",
        frozenset(_NO_TRT_TYPES + _NOT_ON_ORIN)),
    "orin-jp60": Target(
        name="orin-jp60",
        trt_version="8.6.2",
        description="Jetson Orin, JetPack 6.0 (L4T 36.3), CUDA 12.2, TensorRT 8.6.2",
        min_opset=7,
        max_opset=17,
        supports_layernorm=True,
        scatter_reduction=False,
        topk_k_must_be_initializer=False,
        einsum_restricted=True,
        native_int64=False,
        supports_local_functions=False,
        supported_ops=_OPS_TRT86,
        ops_source="onnx-tensorrt@8.6-GA docs/operators.md",
        unsupported_dtypes=frozenset(_NO_TRT_TYPES + _NEW_TYPES),
        constant_inputs=_frozen(_CONSTANT_INPUTS_TRT8),
    ),
    "orin-jp5": Target(
        name="orin-jp5",
        trt_version="8.5.2",
        description="Jetson Orin, JetPack 5.1.x (L4T 35.x), CUDA 11.4, TensorRT 8.5.2",
        min_opset=7,
        max_opset=17,
        supports_layernorm=False,
        scatter_reduction=False,
        topk_k_must_be_initializer=True,
        einsum_restricted=True,
        native_int64=False,
        supports_local_functions=False,
        supported_ops=_OPS_TRT85,
        ops_source="onnx-tensorrt@8.5-GA docs/operators.md",
        unsupported_dtypes=frozenset(_NO_TRT_TYPES + _NEW_TYPES),
        constant_inputs=_frozen(_CONSTANT_INPUTS_TRT85),
    ),
    "x86-trt10": _trt10(
        "x86-trt10", "x86-64 discrete GPU, TensorRT 10.3 (e.g. NGC tensorrt:24.08), parity build for orin-jp6",
        frozenset(_NO_TRT_TYPES)),
}


def get_target(name: str) -> Target:
    """Return the target called ``name``; raise ValueError naming the valid targets otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        valid = ", ".join(sorted(TARGETS))
        raise ValueError(f"unknown target {name!r}; valid targets: {valid}") from None
