"""The plugin contract (plugins/common/staticprunePluginContract.{h,cpp}), checked without TensorRT.

The C functions the IPluginV3 creators and getOutputShapes call are compiled with g++ and asked, for every plugin
node of exported plugin graphs (ToMe fixed-r and threshold mode, with and without a class token, ALGM), whether
TensorRT's creator would accept the node and whether the plugin's output shapes are the graph's. Planted
violations (r with a capacity, an output one token off) must fail both the contract and the lint.
"""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch
from onnx import helper

import staticprune.export.plugin_contract as plugin_contract
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.export.plugin_contract import (
    ContractLibrary,
    ContractUnavailable,
    build_contract_library,
    check_model,
)
from staticprune.methods import build_static_method
from staticprune.methods import tome as tome_module
from staticprune.models import SegmentationModel, build_model, get_spec
from staticprune.ops.plugin_nodes import MERGE_OP, UNMERGE_OP

TARGET = "orin-jp6"


@pytest.fixture(scope="module")
def contract(tmp_path_factory) -> ContractLibrary:
    """Built from the sources into a fresh directory: the test checks the build, not a cached library."""
    return ContractLibrary(build_contract_library(tmp_path_factory.mktemp("contract")))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _merges(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == MERGE_OP]


def _narrow_segvit(size: tuple[int, int]) -> SegmentationModel:
    """segvit-vit-b-atm's structure (no class token, ATM head) at ViT-T width: fast to build and export."""
    spec = get_spec("segvit-vit-b-atm")
    spec = dataclasses.replace(spec, vit=dataclasses.replace(spec.vit, dim=192, heads=3), atm_dim=96, atm_heads=3)
    torch.manual_seed(0)
    return SegmentationModel(spec, size, 3).eval()


def _plugin_graph(model: SegmentationModel, method: str, options: dict) -> onnx.ModelProto:
    model.method = build_static_method(method, options, model)
    example = torch.randn(1, 3, *model.image_size, generator=torch.Generator().manual_seed(1))
    return export_to_proto(model, example, output_names=model.output_names(), plugins=True).model


# ---------------------------------------------------------------------------------------------- the C rules


def test_out_tokens_is_the_python_buffer_size(contract):
    """One formula on both sides: the graph's buffer after a merge (fit_capacity, plan_points) is the plugin's T'."""
    for patches in range(1, 40):
        for prefix in (0, 1):
            tokens = prefix + patches
            for requested in range(0, patches + 3):
                python = prefix + tome_module.fit_capacity(requested, patches)
                assert contract.merge_out_tokens(tokens, prefix, -1, python) == python, (patches, prefix, requested)
            for r in range(0, patches + 2):
                python_r = min(r, patches // 2)  # plan_points' clamp
                assert contract.merge_out_tokens(tokens, prefix, r, 0) == tokens - python_r
    # the reviewed case: 151 patches entering a merge without a class token, capacity at the minimum
    assert contract.merge_out_tokens(151, 0, -1, 10) == 76 == tome_module.fit_capacity(10, 151)


def test_field_rules(contract):
    assert contract.merge_fields({"r": 4, "num_prefix": 1}) is None
    assert contract.merge_fields({"r": 4, "capacity": 0, "threshold": 0.9}) is None
    assert "capacity applies to threshold mode only" in contract.merge_fields({"r": 4, "capacity": 10})
    assert contract.merge_fields({"r": -1, "threshold": 0.5, "capacity": 10}) is None
    assert "no mode" in contract.merge_fields({"r": -1, "capacity": 10})
    assert "no mode" in contract.merge_fields({"threshold": float("nan")})
    assert contract.merge_fields({"r": -1, "threshold_input": 1, "capacity": 10}) is None
    assert "threshold mode only" in contract.merge_fields({"r": 3, "threshold_input": 1})
    assert "0 or 1" in contract.merge_fields({"r": 1, "inclusive": 2})
    assert ">= 0" in contract.merge_fields({"r": 1, "num_prefix": -1})
    assert contract.unmerge_fields({"to_feature_map": 1, "grid_h": 8, "grid_w": 8}) is None
    assert "grid_h >= 1" in contract.unmerge_fields({"to_feature_map": 1, "grid_h": 8})


def test_output_shape_rules(contract):
    fields = {"r": -1, "threshold": 0.9, "capacity": 300, "num_prefix": 1}
    inputs = [(2, 513, 384), (2, 513, 64), (2, 513), (2, 512)]
    assert contract.output_shapes(MERGE_OP, fields, inputs) == [(2, 300, 384), (2, 300), (2, 512), (2,)]
    assert contract.output_shapes(MERGE_OP, {"r": 600, "num_prefix": 1}, inputs)[0] == (2, 257, 384)
    assert "tokens" in contract.output_shapes(MERGE_OP, fields, [(2, 513, 384), (2, 512, 64), (2, 513), (2, 512)])
    with_input = {"r": -1, "threshold_input": 1, "capacity": 300, "num_prefix": 1}
    assert contract.output_shapes(MERGE_OP, with_input, [*inputs, (2,)])[0] == (2, 300, 384)
    assert "expects 5" in contract.output_shapes(MERGE_OP, with_input, inputs)
    unknown_tokens = [(2, -1, 384), (2, -1, 64), (2, -1), (2, 512)]
    assert contract.output_shapes(MERGE_OP, fields, unknown_tokens)[0] == (2, -1, 384)
    grid = {"to_feature_map": 1, "grid_h": 16, "grid_w": 32}
    assert contract.output_shapes(UNMERGE_OP, grid, [(1, 90, 192), (1, 512)]) == [(1, 192, 16, 32)]
    assert "grid_h * grid_w" in contract.output_shapes(UNMERGE_OP, grid, [(1, 90, 192), (1, 500)])
    assert contract.output_shapes(UNMERGE_OP, {}, [(1, 90, 5), (1, 512)]) == [(1, 512, 5)]


# ---------------------------------------------------------------------------------------------- exported graphs


@pytest.fixture(scope="module")
def graphs() -> dict[str, onnx.ModelProto]:
    """Plugin graphs of every method and mode that emits plugin nodes (plugin graph only: a few seconds each)."""
    torch.set_num_threads(1)
    seg = build_model("segmenter-vit-t-mask", (64, 96), num_classes=5, seed=0)
    out = {
        "tome-r": _plugin_graph(seg, "tome", {"layers": "1,2,3"}),
        "tome-threshold-cls": _plugin_graph(seg, "tome", {"mode": "threshold", "threshold": 0.5,
                                                          "layers": "1,2,3", "capacities": "17,9,5"}),
        "algm": _plugin_graph(seg, "algm", {"clap_capacity": 0.8, "gbm_capacity": 0.5}),
    }
    # No class token, 16 patches: 11 enter the second merge, whose capacity 1 is raised to the minimum
    segvit = _narrow_segvit((64, 64))
    out["tome-threshold-segvit-odd"] = _plugin_graph(segvit, "tome", {"mode": "threshold", "layers": "1,2",
                                                                        "capacities": "11,1"})
    return out


@pytest.mark.parametrize("name", ["tome-r", "tome-threshold-cls", "tome-threshold-segvit-odd", "algm"])
def test_every_plugin_node_meets_the_contract(graphs, contract, name):
    proto = graphs[name]
    assert _merges(proto) and any(n.op_type == UNMERGE_OP for n in proto.graph.node)
    assert check_model(proto, contract) == []
    report = lint_model(proto, TARGET)
    assert report.ok, report.format()
    assert not [v for v in report.violations if v.rule == "plugin-contract"]


def test_fixed_r_nodes_carry_no_capacity(graphs):
    for node in _merges(graphs["tome-r"]):
        attrs = _attrs(node)
        assert attrs["r"] >= 0 and "capacity" not in attrs and "threshold" not in attrs


def test_odd_patch_count_without_class_token(graphs, contract):
    first, second = _merges(graphs["tome-threshold-segvit-odd"])
    table = plugin_contract.shape_table(graphs["tome-threshold-segvit-odd"])
    assert table[first.output[0]][1] == 11 and table[second.input[0]][1] == 11
    assert _attrs(second)["num_prefix"] == 0 and _attrs(second)["capacity"] == 6
    assert table[second.output[0]] == (1, 6, 192)  # 11 - floor(11 / 2), on both sides


def test_old_python_formula_is_caught(contract, monkeypatch):
    """The formula the review found ((P + n) // 2 patches) sizes the buffer one token short of the plugin's."""
    monkeypatch.setattr(tome_module, "fit_capacity",
                        lambda requested, n: n if requested is None else max(n // 2, min(requested, n)))
    proto = _plugin_graph(_narrow_segvit((64, 64)), "tome", {"mode": "threshold", "layers": "1,2",
                                                              "capacities": "11,1"})
    problems = check_model(proto, contract)
    assert problems and all(p.op == MERGE_OP for p in problems)
    assert "is (1, 5, 192) in the graph, but the plugin reports (1, 6, 192)" in problems[0].message


def test_algm_hands_its_adaptive_threshold_to_the_plugin(graphs):
    (node,) = _merges(graphs["algm"])
    attrs = _attrs(node)
    assert attrs["threshold_input"] == 1 and "threshold" not in attrs and attrs["r"] == -1
    assert len(node.input) == 5
    table = plugin_contract.shape_table(graphs["algm"])
    assert table[node.input[4]] == (1,)


# ---------------------------------------------------------------------------------------------- planted violations


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _contract_errors(proto: onnx.ModelProto) -> list[str]:
    report = lint_model(proto, TARGET)
    return [v.message for v in report.errors if v.rule == "plugin-contract"]


def test_planted_r_with_capacity(graphs, contract):
    bad = _copy(graphs["tome-r"])
    node = _merges(bad)[0]
    node.attribute.append(helper.make_attribute("capacity", 20))
    problems = check_model(bad, contract)
    assert len(problems) == 1 and "capacity applies to threshold mode only" in problems[0].message
    assert problems[0].node == node.name
    errors = _contract_errors(bad)
    assert len(errors) == 1 and "Could not create the plugin" in errors[0]


def test_planted_off_by_one_output(graphs, contract):
    bad = _copy(graphs["tome-threshold-cls"])
    node = _merges(bad)[1]
    for attr in node.attribute:
        if attr.name == "capacity":
            attr.i += 1  # the plugin would now report one slot more than the graph was built for
    problems = check_model(bad, contract)
    assert [p.node for p in problems] == [node.name] * 2  # x' and size'
    assert problems[0].message.startswith("output 0") and problems[1].message.startswith("output 1")
    assert all("but the plugin reports" in p.message for p in problems)
    errors = _contract_errors(bad)
    assert errors and all("but the plugin reports" in e for e in errors)


def test_planted_float_attribute(graphs, contract):
    bad = _copy(graphs["tome-r"])
    node = _merges(bad)[0]
    for attr in list(node.attribute):
        if attr.name == "r":
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute("r", 2.0))
    problems = check_model(bad, contract)
    assert problems and problems[0].node == node.name
    assert "attribute 'r' is FLOAT; the creator reads an INT" in problems[0].message


def test_lint_without_the_contract_library_warns(graphs, monkeypatch):
    def unavailable():
        raise ContractUnavailable("no C++ compiler (g++, or CXX) to build the plugin contract library")

    monkeypatch.setattr(plugin_contract, "load_contract", unavailable)
    report = lint_model(graphs["tome-r"], TARGET)
    notes = [v for v in report.violations if v.rule == "plugin-contract"]
    assert report.ok and len(notes) == 1 and notes[0].severity == "warning"
    assert "plugin contract not checked: no C++ compiler" in notes[0].message
