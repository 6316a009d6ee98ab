"""Structural check of a plugin graph against the standard graph of the same model.

The plugin graph cannot run in ONNX Runtime (its custom nodes exist in TensorRT only), so on a machine without
TensorRT we check what can be checked: the plugin nodes are there with the attributes the TensorRT ONNX parser
and our plugin creators expect, every model weight is carried over unchanged, and the network around the
reduction steps (convolutions, attention softmaxes, normalisations, activations) is node for node the same.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from staticprune.ops.plugin_nodes import MERGE_OP, NAMESPACE, UNMERGE_OP

# Attributes every node carries; which further ones a mode needs (and which it must not have) is the plugin
# contract's business (staticprune/export/plugin_contract.py, the C rules the creators apply).
REQUIRED_ATTRS = {
    MERGE_OP: {"r", "num_prefix", "inclusive", "absolute_parity", "kept_by_score", "plugin_version",
               "plugin_namespace"},
    UNMERGE_OP: {"to_feature_map", "grid_h", "grid_w", "plugin_version", "plugin_namespace"},
}
# Ops that belong to the network itself, not to a reduction step: their counts must not change.
NETWORK_OPS = ("Conv", "Softmax", "LayerNormalization", "Erf", "Relu", "Sigmoid", "Resize")


def _digest(arr: np.ndarray) -> tuple:
    arr = np.ascontiguousarray(arr)
    return arr.shape, str(arr.dtype), hashlib.sha1(arr.tobytes()).hexdigest()


def parameter_digests(parameters: Iterable[np.ndarray]) -> dict[tuple, tuple]:
    """Digest of each form a model parameter can take as an initializer -> the parameter's own digest: as is, or
    with the last two axes swapped (a Linear weight is the transposed right operand of a MatMul, or the operand of
    a Gemm with transB after a graph clean-up fuses MatMul + Add: both count as the same weight)."""
    found = {}
    for p in parameters:
        p = np.asarray(p)
        key = _digest(p)
        found[key] = key
        if p.ndim >= 2:
            found.setdefault(_digest(np.swapaxes(p, -1, -2)), key)
    return found


def _is_layer_operand(init: onnx.TensorProto, consumers: list[tuple[str, int]]) -> bool:
    """Without the model's parameters: a Conv kernel, or the 2-D right operand of a MatMul / Gemm whose both
    extents exceed 1. Reduction-step constants are (1, n) rows, (1, n, 1) columns or index tensors."""
    dims = list(init.dims)
    for op, index in consumers:
        if op == "Conv" and index == 1 and len(dims) == 4:
            return True
        if op in ("MatMul", "Gemm") and index == 1 and len(dims) == 2 and min(dims) > 1:
            return True
    return False


def _weights(proto: onnx.ModelProto, params: Optional[dict[tuple, tuple]]) -> Counter:
    """Multiset of digests of the initializers that are layer weights: those equal to a model parameter when
    the parameters are known, else the layer operands of Conv / MatMul / Gemm."""
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in proto.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, index))
    found: Counter = Counter()
    for init in proto.graph.initializer:
        if params is None and not _is_layer_operand(init, consumers.get(init.name, [])):
            continue
        arr = numpy_helper.to_array(init)
        digest = _digest(arr)
        if params is None:  # a weight and its transpose are the same layer weight (MatMul vs Gemm transB)
            found[min(digest, _digest(arr.T)) if arr.ndim == 2 else digest] += 1
        elif digest in params:
            found[params[digest]] += 1
    return found


def plugin_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type in REQUIRED_ATTRS]


def plugin_output_shapes(proto: onnx.ModelProto) -> dict[tuple[str, int], onnx.TypeProto]:
    """The declared type of every plugin node output, keyed by (node name, output index)."""
    types = {vi.name: vi.type for vi in [*proto.graph.value_info, *proto.graph.output]}
    found = {}
    for node in plugin_nodes(proto):
        for index, name in enumerate(node.output):
            if name in types:
                found[(node.name, index)] = types[name]
    return found


def declare_plugin_output_shapes(proto: onnx.ModelProto, shapes: dict[tuple[str, int], onnx.TypeProto]) -> int:
    """Give plugin outputs back the types the tracer declared (graph clean-ups such as onnxslim drop some when they
    rename an output). These are the shapes the rest of the graph was traced with, which the plugin contract
    checks the plugins' own output shapes against. Returns how many were restored."""
    declared = {vi.name for vi in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    restored = 0
    for node in plugin_nodes(proto):
        for index, name in enumerate(node.output):
            tp = shapes.get((node.name, index))
            if name and name not in declared and tp is not None:
                vi = proto.graph.value_info.add()
                vi.name = name
                vi.type.CopyFrom(tp)
                restored += 1
    return restored


def check_plugin_graph(plugin: onnx.ModelProto, standard: onnx.ModelProto, expected_merges: int,
                       expect_unmerge: bool = True, parameters: Optional[Iterable[np.ndarray]] = None) -> list[str]:
    """Problems found (empty = the plugin graph is the standard graph with its reduction steps replaced).

    parameters: the model's parameter values (state_dict); the layer weights are then exactly the initializers
    equal to one of them, whatever their size. Without them, the Conv / MatMul / Gemm layer operands.
    """
    problems = []
    nodes = plugin_nodes(plugin)
    merges = [n for n in nodes if n.op_type == MERGE_OP]
    if len(merges) != expected_merges:
        problems.append(f"{len(merges)} {MERGE_OP} nodes, expected {expected_merges}")
    if expect_unmerge and not any(n.op_type == UNMERGE_OP for n in nodes):
        problems.append(f"no {UNMERGE_OP} node")
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        missing = REQUIRED_ATTRS[node.op_type] - set(attrs)
        if missing:
            problems.append(f"{node.name or node.op_type}: missing attributes {sorted(missing)}")
            continue
        if attrs["plugin_version"].s != b"1" or attrs["plugin_namespace"].s != NAMESPACE.encode():
            problems.append(f"{node.name}: plugin_version/plugin_namespace are not '1'/'{NAMESPACE}'")
        if node.domain != NAMESPACE:
            problems.append(f"{node.name}: domain '{node.domain}', expected '{NAMESPACE}'")
    params = parameter_digests(parameters) if parameters is not None else None
    plugin_weights, standard_weights = _weights(plugin, params), _weights(standard, params)
    missing = standard_weights - plugin_weights
    if missing:
        problems.append(f"{sum(missing.values())} layer weights of the standard graph are missing or changed")
    extra = plugin_weights - standard_weights
    if extra:
        problems.append(f"{sum(extra.values())} layer weights of the plugin graph are not in the standard graph")
    for op in NETWORK_OPS:
        a = sum(n.op_type == op for n in plugin.graph.node)
        b = sum(n.op_type == op for n in standard.graph.node)
        if a != b:
            problems.append(f"{op}: {a} nodes in the plugin graph, {b} in the standard graph")
    if [o.name for o in plugin.graph.output] != [o.name for o in standard.graph.output]:
        problems.append("graph outputs differ")
    return problems
