"""Tests for staticprune.export.lint: small hand-built ONNX graphs with planted faults."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from staticprune.export.lint import LintReport, lint_model
from staticprune.export.targets import TARGETS, get_target

ALL_TARGETS = ["orin-jp6", "orin-jp60", "orin-jp5", "x86-trt10"]
F = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset=17, functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    model.ir_version = 8
    return model


def vinfo(name: str, shape, elem_type: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def const(name: str, value, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def rules(report: LintReport, severity: str = "error") -> list[tuple[str, str]]:
    return [(v.rule, v.node) for v in report.violations if v.severity == severity]


def relu_model(opset: int = 17) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                      [vinfo("x", [1, 8])], [vinfo("y", [1, 8])], opset=opset)


def clean_model() -> onnx.ModelProto:
    """MatMul + Add + Softmax + LayerNormalization at opset 17."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b"),
        numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b"], ["add"], name="add"),
        helper.make_node("Softmax", ["add"], ["sm"], name="softmax", axis=-1),
        helper.make_node("LayerNormalization", ["sm", "gamma", "beta"], ["y"], name="ln", axis=-1, epsilon=1e-5),
    ]
    return make_model(nodes, [vinfo("x", [1, 64, 16])], [vinfo("y", [1, 64, 16])], inits)


def decomposed_ln_model() -> onnx.ModelProto:
    """MatMul + Add + Softmax + LayerNorm spelled as ReduceMean/Sub/Pow/Sqrt/Div (what orin-jp5 needs)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b"], ["add"], name="add"),
        helper.make_node("Softmax", ["add"], ["sm"], name="softmax", axis=-1),
        helper.make_node("ReduceMean", ["sm"], ["mu"], name="ln_mean", axes=[-1]),
        helper.make_node("Sub", ["sm", "mu"], ["xc"], name="ln_sub"),
        helper.make_node("Pow", ["xc", "two"], ["sq"], name="ln_pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="ln_var", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        helper.make_node("Div", ["xc", "std"], ["y"], name="ln_div"),
    ]
    return make_model(nodes, [vinfo("x", [1, 64, 16])], [vinfo("y", [1, 64, 16])], inits)


def topk_model(k: int, sorted_flag: int = 1) -> onnx.ModelProto:
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", axis=-1, sorted=sorted_flag)
    return make_model([node], [vinfo("x", [1, 4096])],
                      [vinfo("values", [1, k]), vinfo("indices", [1, k], TensorProto.INT64)], [const("k", [k])])


def scatter_add_model(indices_type=np.int64) -> onnx.ModelProto:
    node = helper.make_node("ScatterElements", ["data", "idx", "upd"], ["y"], name="merge_scatter",
                            axis=1, reduction="add")
    return make_model([node], [vinfo("data", [1, 8]), vinfo("upd", [1, 4])], [vinfo("y", [1, 8])],
                      [const("idx", [[0, 1, 1, 2]], indices_type)])


# ----------------------------------------------------------------------------------------------
# targets


def test_targets_table():
    assert list(TARGETS) == ALL_TARGETS
    jp6, jp60, jp5, x86 = (TARGETS[n] for n in ALL_TARGETS)
    assert (jp6.trt_version, jp6.min_opset, jp6.max_opset) == ("10.3", 9, 20)
    assert (jp60.trt_version, jp60.max_opset, jp5.trt_version, jp5.max_opset) == ("8.6.2", 17, "8.5.2", 17)
    assert jp6.supported_ops == x86.supported_ops
    assert "LayerNormalization" not in jp5.supported_ops and "LayerNormalization" in jp60.supported_ops
    assert (jp5.supports_layernorm, jp60.supports_layernorm, jp6.supports_layernorm) == (False, True, True)
    assert [t.scatter_reduction for t in (jp6, jp60, jp5, x86)] == [True, False, False, True]
    assert [t.topk_k_must_be_initializer for t in (jp6, jp60, jp5, x86)] == [False, False, True, False]
    assert all(t.topk_max_k == 3840 for t in TARGETS.values())
    assert "Unique" not in jp6.supported_ops and "Gelu" in jp6.supported_ops and "Gelu" not in jp60.supported_ops


def test_unknown_target_raises_value_error_listing_names():
    with pytest.raises(ValueError) as exc:
        get_target("orin-jp7")
    for name in ALL_TARGETS:
        assert name in str(exc.value)
    with pytest.raises(ValueError):
        lint_model(relu_model(), "jetson-nano")


# ----------------------------------------------------------------------------------------------
# clean model


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_clean_model(target):
    """Zero findings everywhere except orin-jp5, whose TensorRT 8.5 has no LayerNormalization op."""
    report = lint_model(clean_model(), target)
    assert rules(report) == ([("layernorm", "ln")] if target == "orin-jp5" else [])
    assert report.warnings == []
    assert report.ok == (target != "orin-jp5")
    assert report.opset == 17 and report.target == target


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_decomposed_layernorm_model_is_clean_on_all_targets(target):
    assert lint_model(decomposed_ln_model(), target).violations == []


def test_clean_model_on_jp5_only_flags_layernorm():
    report = lint_model(clean_model(), "orin-jp5")
    assert rules(report) == [("layernorm", "ln")]
    assert report.errors[0].op == "LayerNormalization"
    assert "decomposed" in report.errors[0].message


def test_layernorm_ok_on_jp60():
    report = lint_model(clean_model(), "orin-jp60")
    assert [v for v in report.violations if v.rule == "layernorm"] == []


def test_layernorm_extra_outputs_are_errors():
    model = clean_model()
    model.graph.node[3].output.extend(["mean", "inv_std"])
    report = lint_model(model, "orin-jp6")
    assert rules(report) == [("layernorm", "ln")]


# ----------------------------------------------------------------------------------------------
# forbidden ops


def test_loop_is_forbidden_including_its_body():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("NonZero", ["v_in"], ["nz"], name="body_nonzero"),
         helper.make_node("Identity", ["v_in"], ["v_out"], name="body_v")],
        "body",
        [vinfo("iter", [], TensorProto.INT64), vinfo("cond_in", [], TensorProto.BOOL), vinfo("v_in", [1, 4])],
        [vinfo("cond_out", [], TensorProto.BOOL), vinfo("v_out", [1, 4])],
    )
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="my_loop", body=body)
    model = make_model([loop], [vinfo("x", [1, 4])], [vinfo("y", [1, 4])],
                       [const("trip", 3), const("cond", True, np.bool_)])
    report = lint_model(model, "orin-jp6")
    forbidden = [(v.node, v.op) for v in report.errors if v.rule == "forbidden-op"]
    assert forbidden == [("my_loop", "Loop"), ("my_loop/body/body_nonzero", "NonZero")]


def test_nonzero_is_forbidden_and_its_shape_is_dynamic():
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="find_nonzero"),
             helper.make_node("Cast", ["nz"], ["y"], name="cast", to=TensorProto.INT32)]
    model = make_model(nodes, [vinfo("x", [1, 8])], [vinfo("y", [2, 8], TensorProto.INT32)])
    report = lint_model(model, "orin-jp60")
    assert ("forbidden-op", "find_nonzero") in rules(report)
    assert ("dynamic-shape", "find_nonzero") in rules(report)
    assert report.errors[0].op == "NonZero"


def test_sequence_and_unique_ops_are_forbidden():
    nodes = [helper.make_node("SplitToSequence", ["x"], ["seq"], name="split_seq", axis=1),
             helper.make_node("SequenceAt", ["seq", "zero"], ["y"], name="seq_at")]
    model = make_model(nodes, [vinfo("x", [1, 8])], [vinfo("y", [1, 8])], [const("zero", 0)])
    report = lint_model(model, "orin-jp6")
    assert [(v.rule, v.node) for v in report.errors if v.rule == "forbidden-op"] == [
        ("forbidden-op", "split_seq"), ("forbidden-op", "seq_at")]


# ----------------------------------------------------------------------------------------------
# TopK


def test_topk_k_4096_is_an_error():
    report = lint_model(topk_model(4096), "orin-jp6")
    assert rules(report) == [("topk-k", "topk")]
    assert "3840" in report.errors[0].message


def test_topk_k_2048_is_clean_on_all_targets():
    for target in ALL_TARGETS:
        report = lint_model(topk_model(2048), target)
        assert [v.rule for v in report.errors if v.rule.startswith("topk")] == [], target


def test_topk_sorted_zero_is_an_error_on_trt10_only():
    assert rules(lint_model(topk_model(2048, sorted_flag=0), "orin-jp6")) == [("topk-sorted", "topk")]
    assert [v for v in lint_model(topk_model(2048, sorted_flag=0), "orin-jp60").errors
            if v.rule.startswith("topk")] == []


def test_topk_k_computed_from_shape():
    """K = shape[1] / 2: jp5 needs an initializer; later parsers get K=2048 at build time."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["n"], name="gather_n", axis=0),
             helper.make_node("Div", ["n", "two"], ["k"], name="half"),
             helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk_dyn", axis=-1)]
    model = make_model(nodes, [vinfo("x", [1, 4096])],
                       [vinfo("values", [1, 2048]), vinfo("indices", [1, 2048], TensorProto.INT64)],
                       [const("one", [1]), const("two", [2])])
    assert rules(lint_model(model, "orin-jp5")) == [("topk-k", "topk_dyn")]
    assert [v.rule for v in lint_model(model, "orin-jp60").violations] == ["int64-io"]
    assert lint_model(model, "orin-jp6").violations == []


def test_topk_k_unknown_is_a_warning_on_jp60():
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk_in", axis=-1)
    model = make_model([node], [vinfo("x", [1, 4096]), vinfo("k", [1], TensorProto.INT64)],
                       [vinfo("values", None), vinfo("indices", None, TensorProto.INT64)])
    report = lint_model(model, "orin-jp60")
    assert [(v.rule, v.node, v.severity) for v in report.violations if v.rule == "topk-k"] == [
        ("topk-k", "topk_in", "warning")]


def test_topk_k_from_constant_node_is_resolved():
    k_node = helper.make_node("Constant", [], ["k"], name="k_const",
                              value=numpy_helper.from_array(np.array([4000], np.int64)))
    topk = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk_c", axis=-1)
    model = make_model([k_node, topk], [vinfo("x", [1, 4096])],
                       [vinfo("values", [1, 4000]), vinfo("indices", [1, 4000], TensorProto.INT64)])
    report = lint_model(model, "orin-jp5")
    assert rules(report) == [("topk-k", "topk_c")]
    assert "K=4000" in report.errors[0].message


# ----------------------------------------------------------------------------------------------
# Scatter


def test_scatter_elements_add_is_an_error_on_jp60():
    report = lint_model(scatter_add_model(), "orin-jp60")
    assert rules(report) == [("scatter-reduction", "merge_scatter")]
    assert "silently ignored" in report.errors[0].message


def test_scatter_elements_add_is_a_warning_on_jp6():
    report = lint_model(scatter_add_model(), "orin-jp6")
    assert report.ok
    assert rules(report, "warning") == [("scatter-reduction", "merge_scatter")]
    assert "INT64" in report.warnings[0].message


def test_scatter_elements_add_with_int32_indices_is_an_error_on_jp6():
    report = lint_model(scatter_add_model(np.int32), "orin-jp6")
    assert rules(report) == [("scatter-reduction", "merge_scatter")]


def test_scatter_nd_with_reduction_is_an_error_everywhere():
    node = helper.make_node("ScatterND", ["data", "idx", "upd"], ["y"], name="snd", reduction="none")
    model = make_model([node], [vinfo("data", [4, 2]), vinfo("upd", [1, 2])], [vinfo("y", [4, 2])],
                       [const("idx", [[1]])])
    for target in ALL_TARGETS:
        assert rules(lint_model(model, target)) == [("scatter-reduction", "snd")], target


# ----------------------------------------------------------------------------------------------
# opset


def test_opset_18_is_above_jp60_ceiling():
    report = lint_model(relu_model(opset=18), "orin-jp60")
    assert rules(report) == [("opset", "")]
    assert report.opset == 18 and "17" in report.errors[0].message


def test_opset_20_is_clean_on_jp6():
    report = lint_model(relu_model(opset=20), "orin-jp6")
    assert report.violations == []


def test_opset_21_is_above_jp6_ceiling():
    report = lint_model(relu_model(opset=21), "orin-jp6")
    assert rules(report) == [("opset", "")]


# ----------------------------------------------------------------------------------------------
# shapes and dtypes


def test_dynamic_input_dim_is_an_error():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                       [vinfo("x", ["batch", 8])], [vinfo("y", [1, 8])])
    report = lint_model(model, "orin-jp6")
    assert ("dynamic-shape", "x") in rules(report)
    assert "batch" in next(v.message for v in report.errors if v.node == "x")


def test_dynamic_intermediate_shape_names_the_producer():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape_dyn"),
             helper.make_node("ReduceSum", ["r"], ["y"], name="sum", keepdims=0)]
    model = make_model(nodes, [vinfo("x", [1, 8]), vinfo("shape", [2], TensorProto.INT64)], [vinfo("y", [])])
    report = lint_model(model, "orin-jp6")
    assert ("dynamic-shape", "reshape_dyn") in rules(report)


def test_float64_initializer_is_an_error():
    node = helper.make_node("Add", ["x", "bias"], ["y"], name="add64")
    model = make_model([node], [vinfo("x", [1, 4], TensorProto.DOUBLE)], [vinfo("y", [1, 4], TensorProto.DOUBLE)],
                       [numpy_helper.from_array(np.zeros(4, np.float64), "bias")])
    report = lint_model(model, "orin-jp6")
    assert {(v.rule, v.node) for v in report.errors} == {("dtype", "bias"), ("dtype", "x"), ("dtype", "y")}
    assert "float64" in next(v.message for v in report.errors if v.node == "bias")


def test_int64_io_is_a_warning_on_trt8():
    node = helper.make_node("ArgMax", ["x"], ["y"], name="argmax", axis=1, keepdims=0)
    model = make_model([node], [vinfo("x", [1, 4, 8])], [vinfo("y", [1, 8], TensorProto.INT64)])
    assert rules(lint_model(model, "orin-jp60"), "warning") == [("int64-io", "y")]
    assert lint_model(model, "orin-jp6").violations == []


# ----------------------------------------------------------------------------------------------
# other op rules


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_arg_reduce_select_last_index_is_accepted(target):
    # The 8.5, 8.6 and 10.x importers honour select_last_index=1: no rule fires (only TensorRT 8's INT64-output
    # warning, which is about the graph output's type, not the attribute).
    nodes = [helper.make_node("ArgMax", ["x"], ["y"], name="argmax_last", axis=1, select_last_index=1),
             helper.make_node("ArgMin", ["x"], ["z"], name="argmin_last", axis=1, select_last_index=1)]
    model = make_model(nodes, [vinfo("x", [1, 4, 8])],
                       [vinfo("y", [1, 1, 8], TensorProto.INT64), vinfo("z", [1, 1, 8], TensorProto.INT64)])
    report = lint_model(model, target)
    assert report.ok and report.errors == []
    expected_warnings = [("int64-io", "y"), ("int64-io", "z")] if get_target(target).trt_major == 8 else []
    assert sorted(rules(report, "warning")) == expected_warnings


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_clip_with_tensor_bounds_is_accepted(target):
    # Bounds computed in the graph (here: graph inputs) take the importer's elementwise path; not an error.
    clip = helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip_tensor_bounds")
    model = make_model([clip], [vinfo("x", [1, 8]), vinfo("lo", []), vinfo("hi", [])], [vinfo("y", [1, 8])])
    assert lint_model(model, target).violations == []
    # The neighbouring constant-input rule still holds: a tensor Unsqueeze axes is an error on every target.
    unsqueeze = helper.make_node("Unsqueeze", ["y", "axes"], ["u"], name="unsqueeze_tensor_axes")
    model = make_model([clip, unsqueeze], [vinfo("x", [1, 8]), vinfo("lo", []), vinfo("hi", []),
                                           vinfo("axes", [1], TensorProto.INT64)], [vinfo("u", [1, 1, 8])])
    assert rules(lint_model(model, target)) == [("constant-input", "unsqueeze_tensor_axes")]


def test_cumsum_runtime_axis_is_an_error():
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="cumsum")
    model = make_model([node], [vinfo("x", [1, 8]), vinfo("axis", [], TensorProto.INT32)], [vinfo("y", [1, 8])])
    report = lint_model(model, "orin-jp6")
    assert rules(report) == [("cumsum-axis", "cumsum"), ("cumsum-loop", "cumsum")]
    assert "unknown axis" in report.errors[1].message and "one iteration per element" in report.errors[1].message
    model.graph.initializer.append(const("axis", 1, np.int32))
    del model.graph.input[1]
    assert rules(lint_model(model, "orin-jp6")) == [("cumsum-loop", "cumsum")]


@pytest.mark.parametrize("target, version", [("orin-jp6", "10.3"), ("orin-jp60", "8.6.2"), ("orin-jp5", "8.5.2"),
                                             ("x86-trt10", "10.3")])
@pytest.mark.parametrize("axis, trips", [(1, 4096), (-1, 4096), (0, 2)])
def test_cumsum_is_a_sequential_loop_before_trt_10_8_and_names_its_trip_count(target, version, axis, trips):
    """Every target is below 10.8, whose parser lowers CumSum to a Loop of one iteration per element of the axis."""
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="prefix_sum")
    model = make_model([node], [vinfo("x", [2, 4096], TensorProto.INT32)], [vinfo("y", [2, 4096], TensorProto.INT32)],
                       [const("axis", axis)])
    report = lint_model(model, target)
    assert rules(report) == [("cumsum-loop", "prefix_sum")]
    message = report.errors[0].message
    assert f"axis {axis} " in message and f"sequential Loop (trip count {trips})" in message
    assert f"TensorRT {version} ONNX parser" in message and "10.8" in message


def test_scan_is_forbidden_as_a_sequential_loop():
    body = helper.make_graph([helper.make_node("Add", ["s_in", "x_in"], ["s_out"], name="body_add"),
                              helper.make_node("Identity", ["s_out"], ["y_out"], name="body_y")], "body",
                             [vinfo("s_in", [4]), vinfo("x_in", [4])], [vinfo("s_out", [4]), vinfo("y_out", [4])])
    scan = helper.make_node("Scan", ["s0", "x"], ["s", "y"], name="running_sum", body=body, num_scan_inputs=1)
    model = make_model([scan], [vinfo("s0", [4]), vinfo("x", [7, 4])], [vinfo("s", [4]), vinfo("y", [7, 4])])
    for target in ("orin-jp6", "orin-jp60"):
        errors = lint_model(model, target).errors
        assert [(v.rule, v.node, v.op) for v in errors] == [("forbidden-op", "running_sum", "Scan")]
        assert "loop layer, one iteration after another" in errors[0].message


def test_einsum_rules_on_trt8():
    def einsum(eq, a_shape, b_shape, y_shape):
        node = helper.make_node("Einsum", ["a", "b"], ["y"], name="einsum", equation=eq)
        return make_model([node], [vinfo("a", a_shape), vinfo("b", b_shape)], [vinfo("y", y_shape)])

    plain = einsum("bij,bjk->bik", [2, 3, 4], [2, 4, 5], [2, 3, 5])
    ellipsis = einsum("...ij,...jk->...ik", [2, 3, 4], [2, 4, 5], [2, 3, 5])
    assert rules(lint_model(plain, "orin-jp60"), "warning") == [("einsum", "einsum")]
    assert rules(lint_model(ellipsis, "orin-jp60")) == [("einsum", "einsum")]
    assert lint_model(ellipsis, "orin-jp6").violations == []


def test_unsupported_op_on_older_parser():
    node = helper.make_node("Gelu", ["x"], ["y"], name="gelu")
    model = make_model([node], [vinfo("x", [1, 8])], [vinfo("y", [1, 8])], opset=20)
    assert lint_model(model, "orin-jp6").violations == []
    model17 = make_model([helper.make_node("CastLike", ["x", "x"], ["y"], name="castlike")],
                         [vinfo("x", [1, 8])], [vinfo("y", [1, 8])])
    assert rules(lint_model(model17, "orin-jp60")) == [("unsupported-op", "castlike")]


def test_resize_modes():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")
    model = make_model([node], [vinfo("x", [1, 1, 4, 4])], [vinfo("y", [1, 1, 8, 8])],
                       [const("scales", [1, 1, 2, 2], np.float32)])
    report = lint_model(model, "orin-jp5")
    assert report.ok and rules(report, "warning") == [("resize", "up")]
    model.graph.node[0].attribute.append(helper.make_attribute("coordinate_transformation_mode", "tf_crop_and_resize"))
    assert ("resize", "up") in rules(lint_model(model, "orin-jp6"))


def test_reduce_axes_must_be_constant():
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")
    model = make_model([node], [vinfo("x", [1, 8]), vinfo("axes", [1], TensorProto.INT64)], [vinfo("y", [1, 1])],
                       opset=18)
    assert ("constant-input", "mean") in rules(lint_model(model, "orin-jp6"))


# ----------------------------------------------------------------------------------------------
# plugins and local functions


def test_custom_plugin_ops_are_warnings():
    good = helper.make_node("ToMeMerge", ["x"], ["m"], name="merge", domain="tome",
                            plugin_version="1", plugin_namespace="")
    bare = helper.make_node("ToMeUnmerge", ["m"], ["y"], name="unmerge", domain="tome")
    model = make_model([good, bare], [vinfo("x", [1, 8])], [vinfo("y", [1, 8])])
    model.opset_import.append(helper.make_opsetid("tome", 1))
    report = lint_model(model, "orin-jp6")
    assert report.ok
    assert [(v.rule, v.node) for v in report.warnings] == [("plugin", "merge"), ("plugin", "unmerge")]
    assert "plugin_version" in report.warnings[1].message


def test_custom_op_named_like_builtin_is_a_clash():
    node = helper.make_node("TopK", ["x"], ["y"], name="my_topk", domain="tome",
                            plugin_version="1", plugin_namespace="")
    model = make_model([node], [vinfo("x", [1, 8])], [vinfo("y", [1, 8])])
    model.opset_import.append(helper.make_opsetid("tome", 1))
    assert rules(lint_model(model, "orin-jp6")) == [("plugin-name-clash", "my_topk")]


def test_local_function_error_on_trt8_ok_on_trt10():
    func = helper.make_function("local", "MyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                opset_imports=[helper.make_opsetid("", 17)])
    call = helper.make_node("MyRelu", ["x"], ["y"], name="call", domain="local")
    model = make_model([call], [vinfo("x", [1, 8])], [vinfo("y", [1, 8])], functions=[func])
    model.opset_import.append(helper.make_opsetid("local", 1))
    assert rules(lint_model(model, "orin-jp60")) == [("local-function", "call")]
    assert lint_model(model, "orin-jp6").violations == []


# ----------------------------------------------------------------------------------------------
# report and loading


def test_report_format_and_dict(tmp_path):
    report = lint_model(topk_model(4096), "orin-jp60")
    text = report.format()
    lines = text.splitlines()
    assert "1 error(s)" in lines[0]
    assert any("topk-k" in ln and "topk" in ln and "TopK" in ln for ln in lines[2:])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["num_errors"] == 1
    assert data["violations"][0]["rule"] == "topk-k" and data["violations"][0]["node"] == "topk"
    assert "OK" in lint_model(clean_model(), "orin-jp6").format()


def test_lint_from_path_with_external_data(tmp_path):
    model = clean_model()
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert lint_model(path, "orin-jp6").violations == []
    k_model = topk_model(4096)
    onnx.save_model(k_model, str(path), save_as_external_data=True, location="k.bin", size_threshold=0)
    assert rules(lint_model(str(path), "orin-jp6")) == [("topk-k", "topk")]


def test_exporter_shape_arithmetic_is_folded_not_flagged():
    """Shape -> Mod -> Concat -> Reshape (TorchScript-exporter style) is static once folded."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Mod", ["s", "mods"], ["m"], name="mod"),
             helper.make_node("Concat", ["m", "minus_one"], ["target_shape"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target_shape"], ["r"], name="reshape"),
             helper.make_node("Relu", ["r"], ["y"], name="relu")]
    model = make_model(nodes, [vinfo("x", [2, 12])], [vinfo("y", [2, 2, 6])],
                       [const("mods", [3, 5]), const("minus_one", [-1])])
    assert lint_model(model, "orin-jp6").violations == []


def test_if_with_foldable_condition_is_still_forbidden_with_a_hint():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [], [vinfo("out", [1, 8])])
    nodes = [helper.make_node("Size", ["x"], ["n"], name="size"),
             helper.make_node("Equal", ["n", "eight"], ["cond"], name="eq"),
             helper.make_node("If", ["cond"], ["y"], name="branchy", then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [vinfo("x", [1, 8])], [vinfo("y", [1, 8])], [const("eight", 8)])
    report = lint_model(model, "orin-jp6")
    assert rules(report) == [("forbidden-op", "branchy")]
    assert "constant folding" in report.errors[0].message
