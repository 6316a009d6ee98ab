"""Where a graph lets FP16 decide something: the check behind `export --precision fp16` and the lint.

A strongly typed TensorRT network computes every tensor in the type the ONNX graph gives it. FP16 holds integers
exactly only up to 2048 and resolves scores to about 1e-3, so in a graph meant for FP16 engines nothing discrete
may be computed from an FP16 tensor: no comparison, ArgMax/ArgMin/TopK, rounding or cast to an integer or
boolean type may read one, and no integer or boolean tensor may be cast to FP16 (a count or an index held in
FP16). Token-reduction decisions read FP32 copies of the features instead (explicit Casts in the graph).
"""

from __future__ import annotations

from typing import Optional

import onnx
from onnx import TensorProto

DECIDING_OPS = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "ArgMax", "ArgMin", "TopK", "Floor",
                "Ceil", "Round", "Sign", "Mod"}
DISCRETE_TYPES = {TensorProto.BOOL, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                  TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}


def _elem_types(model: onnx.ModelProto, inferred: Optional[onnx.GraphProto] = None) -> dict[str, int]:
    """Element type of every tensor: from `inferred` (a shape-inferred graph the caller already has) or from
    inference on a weightless copy."""
    if inferred is None:
        from staticprune.export.onnx_export import weightless_copy

        try:
            inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False).graph
        except Exception:  # noqa: BLE001 - a graph shape inference cannot handle still has declared types
            inferred = model.graph
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*inferred.value_info, *inferred.input, *inferred.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def fp16_decision_problems(model: onnx.ModelProto,
                           inferred: Optional[onnx.GraphProto] = None) -> list[tuple[str, str, str]]:
    """(node name, op type, message) for every place where FP16 decides something; empty for FP32 graphs."""
    types = _elem_types(model, inferred)
    if TensorProto.FLOAT16 not in types.values():
        return []
    problems = []
    for node in model.graph.node:
        name = node.name or f"{node.op_type}({', '.join(node.output)})"
        fp16_inputs = [i for i in node.input if i and types.get(i) == TensorProto.FLOAT16]
        if node.op_type in DECIDING_OPS and fp16_inputs:
            problems.append((name, node.op_type, f"{node.op_type} decides on FP16 input '{fp16_inputs[0]}': "
                             "compute it from an FP32 copy (the FP16 resolution flips decisions)"))
        elif node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            src = types.get(node.input[0])
            if to in DISCRETE_TYPES and src == TensorProto.FLOAT16:
                problems.append((name, "Cast", f"cast of FP16 '{node.input[0]}' to an integer type: an index or "
                                 "count computed in FP16 (exact only up to 2048)"))
            elif to == TensorProto.FLOAT16 and src in DISCRETE_TYPES:
                problems.append((name, "Cast", f"integer/boolean '{node.input[0]}' cast to FP16: counts, ranks and "
                                 "slots must stay INT32 or FP32 (FP16 is exact only up to 2048)"))
    return problems
