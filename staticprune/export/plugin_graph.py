"""Structural check of a plugin graph against the standard graph of the same model.

The plugin graph cannot run in ONNX Runtime (its custom nodes exist in TensorRT only), so on a machine without
TensorRT we check what can be checked: the plugin nodes are there with the attributes the TensorRT ONNX parser
and our plugin creators expect, every model weight is carried over unchanged, and the network around the
reduction steps (convolutions, attention softmaxes, normalisations, activations) is node for node the same.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import onnx
from onnx import numpy_helper

from staticprune.ops.plugin_nodes import MERGE_OP, NAMESPACE, UNMERGE_OP

REQUIRED_ATTRS = {
    MERGE_OP: {"r", "threshold", "capacity", "num_prefix", "inclusive", "absolute_parity", "kept_by_score",
               "plugin_version", "plugin_namespace"},
    UNMERGE_OP: {"to_feature_map", "grid_h", "grid_w", "plugin_version", "plugin_namespace"},
}
# Ops that belong to the network itself, not to a reduction step: their counts must not change.
NETWORK_OPS = ("Conv", "Softmax", "LayerNormalization", "Erf", "Relu", "Sigmoid", "Resize")


def _digest(init: onnx.TensorProto) -> tuple:
    arr = numpy_helper.to_array(init)
    return arr.shape, hashlib.sha1(arr.tobytes()).hexdigest()


MIN_WEIGHT = 256  # elements; smaller initializers are index/shape constants of the reduction steps


def _large(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [i for i in proto.graph.initializer if numpy_helper.to_array(i).size >= MIN_WEIGHT]


def _parameters(proto: onnx.ModelProto) -> Counter:
    """Multiset of (shape, content hash) of the weights that feed the network's layers (Conv, MatMul, Gemm)."""
    inits = {i.name: i for i in _large(proto)}
    found: Counter = Counter()
    for node in proto.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            for name in node.input[1:2]:
                if name in inits:
                    found[_digest(inits[name])] += 1
    return found


def plugin_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type in REQUIRED_ATTRS]


def check_plugin_graph(plugin: onnx.ModelProto, standard: onnx.ModelProto, expected_merges: int,
                       expect_unmerge: bool = True) -> list[str]:
    """Problems found (empty = the plugin graph is the standard graph with its reduction steps replaced)."""
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
    missing = _parameters(standard) - _parameters(plugin)
    if missing:
        problems.append(f"{sum(missing.values())} layer weights of the standard graph are missing or changed")
    extra = set(_digest(i) for i in _large(plugin)) - set(_digest(i) for i in standard.graph.initializer)
    if extra:
        problems.append(f"{len(extra)} initializers of the plugin graph are not in the standard graph")
    for op in NETWORK_OPS:
        a = sum(n.op_type == op for n in plugin.graph.node)
        b = sum(n.op_type == op for n in standard.graph.node)
        if a != b:
            problems.append(f"{op}: {a} nodes in the plugin graph, {b} in the standard graph")
    if [o.name for o in plugin.graph.output] != [o.name for o in standard.graph.output]:
        problems.append("graph outputs differ")
    return problems
