"""The TensorRT plugin graph (`export --plugins`): plugin nodes with the parser's attributes, the rest unchanged."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from staticprune.cli import main
from staticprune.export.lint import lint_model
from staticprune.export.plugin_graph import check_plugin_graph, plugin_nodes
from staticprune.ops.plugin_nodes import MERGE_OP, NAMESPACE, UNMERGE_OP

TINY = ["--model", "segmenter-vit-t-mask", "--size", "64x96", "--classes", "5", "--method", "tome"]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def threshold_graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugins") / "tome.onnx"
    code = main(["export", *TINY, "--opt", "mode=threshold", "--opt", "threshold=0.5", "--opt", "layers=1,2,3",
                 "--opt", "capacity=0.7", "--plugins", "-o", str(out)])
    assert code == 0
    return onnx.load(str(out)), onnx.load(str(out).replace(".onnx", ".standard.onnx"))


def test_plugin_nodes_carry_the_parser_attributes(threshold_graphs):
    plugin, _ = threshold_graphs
    merges = [n for n in plugin.graph.node if n.op_type == MERGE_OP]
    unmerges = [n for n in plugin.graph.node if n.op_type == UNMERGE_OP]
    assert len(merges) == 3 and len(unmerges) == 1
    for node in merges:
        a = _attrs(node)
        assert node.domain == NAMESPACE
        assert a["plugin_version"] == b"1" and a["plugin_namespace"] == NAMESPACE.encode()
        assert a["r"] == -1 and a["threshold"] == pytest.approx(0.5) and a["num_prefix"] == 1
        assert a["inclusive"] == 1 and a["absolute_parity"] == 1 and a["kept_by_score"] == 0
        assert [i for i in node.input if i] and len(node.input) == 4 and len(node.output) == 4
    # capacity = CLS + the patch slots after each merge point: at most 0.7 of the 24 patches, never growing
    caps = [_attrs(n)["capacity"] for n in merges]
    assert all(1 < c <= 1 + int(0.7 * 24) + 1 for c in caps) and caps == sorted(caps, reverse=True)


def test_the_rest_of_the_graph_is_unchanged(threshold_graphs):
    plugin, standard = threshold_graphs
    assert check_plugin_graph(plugin, standard, expected_merges=3) == []
    assert lint_model(plugin, "orin-jp6").ok
    assert not {n.op_type for n in plugin_nodes(standard)}  # the standard graph has no plugin nodes
    meta = json.loads(plugin.metadata_props[0].value)
    assert meta["plugins"] is True and meta["standard_graph"].endswith("tome.standard.onnx")


def test_structure_check_catches_a_wrong_namespace_and_a_dropped_layer(threshold_graphs):
    plugin, standard = threshold_graphs
    bad = onnx.ModelProto()
    bad.CopyFrom(plugin)
    node = next(n for n in bad.graph.node if n.op_type == MERGE_OP)
    for a in node.attribute:
        if a.name == "plugin_namespace":
            a.s = b""
    softmax = next(i for i, n in enumerate(bad.graph.node) if n.op_type == "Softmax")
    del bad.graph.node[softmax]
    problems = check_plugin_graph(bad, standard, expected_merges=3)
    assert any("plugin_namespace" in p for p in problems)
    assert any(p.startswith("Softmax") for p in problems)


def test_fixed_r_mode_emits_r(tmp_path, capsys):
    """The default ToMe graph (fixed r) parses: its nodes carry r and no capacity, which the creator rejects."""
    out = tmp_path / "r.onnx"
    assert main(["export", *TINY, "--opt", "mode=r", "--opt", "r=2", "--opt", "layers=1,2", "--plugins",
                 "-o", str(out)]) == 0
    assert "lint (orin-jp6): clean" in capsys.readouterr().out
    merges = [n for n in onnx.load(str(out)).graph.node if n.op_type == MERGE_OP]
    assert [_attrs(n)["r"] for n in merges] == [2, 2]
    assert all("capacity" not in _attrs(n) for n in merges)


def test_weight_check_ignores_reduction_constants_and_catches_changed_weights(threshold_graphs):
    """Layer weights are the initializers equal to a model parameter (as is or transposed), whatever their size:
    a large constant of a reduction step in the standard graph only is no weight; a changed weight is caught."""
    plugin, standard = threshold_graphs
    std = onnx.ModelProto()
    std.CopyFrom(standard)
    # a (1, 513, 1) operand and a (1, 1025) row, as the reduction steps of a 512 x 512 export hold
    column = numpy_helper.from_array(np.arange(513, dtype=np.float32).reshape(1, 513, 1), "reduction_column")
    row = numpy_helper.from_array(np.ones((1, 1025), dtype=np.float32), "reduction_row")
    std.graph.initializer.extend([column, row])
    std.graph.node.append(helper.make_node("MatMul", ["reduction_row", "reduction_column"], ["unused_product"]))
    weights = [w for w in standard.graph.initializer if w.name.startswith("onnx::MatMul")]
    parameters = [numpy_helper.to_array(w).T for w in weights]  # Linear weights: the graph holds their transpose
    assert check_plugin_graph(plugin, std, expected_merges=3, parameters=parameters) == []
    assert check_plugin_graph(plugin, std, expected_merges=3) == []  # without parameters: the layer operands
    bad = onnx.ModelProto()
    bad.CopyFrom(plugin)
    target = next(w for w in bad.graph.initializer if w.name.startswith("onnx::MatMul"))
    changed = numpy_helper.to_array(target).copy()
    changed[0, 0] += 1.0
    target.CopyFrom(numpy_helper.from_array(changed, target.name))
    for params in (parameters, None):
        problems = check_plugin_graph(bad, standard, expected_merges=3, parameters=params)
        assert "1 layer weights of the standard graph are missing or changed" in problems


def test_method_without_plugin_steps_is_refused(tmp_path, capsys):
    out = tmp_path / "none.onnx"
    code = main(["export", "--model", "segmenter-vit-t-linear", "--size", "32x32", "--classes", "3", "--plugins",
                 "-o", str(out)])
    assert code == 2 and "no step the plugins replace" in capsys.readouterr().err
    assert not out.exists()
