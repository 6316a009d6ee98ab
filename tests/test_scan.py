"""The INT32 log-step prefix sum (staticprune.ops.scan), and the graphs of every method: no CumSum, Loop or Scan."""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method
from staticprune.models import SegmentationModel, ViTConfig, build_model, get_spec
from staticprune.ops.scan import count_true, exclusive_scan, inclusive_scan
from staticprune.verify.parity import generated_inputs, run_onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

LENGTHS = [1, 2, 3, 7, 64, 1000, 4097]
SEQUENTIAL_OPS = {"CumSum", "Loop", "Scan"}


def random_values(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "bool":
        return torch.rand(shape, generator=gen) < 0.37
    if kind == "int32":
        return torch.randint(0, 6, shape, generator=gen, dtype=torch.int32)
    return torch.randint(-3, 9, shape, generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", ["bool", "int32", "int64"])
def test_scan_equals_torch_cumsum_exactly(n, kind):
    gen = torch.Generator().manual_seed(n)
    for shape in [(n,), (3, n), (2, 3, n)]:
        values = random_values(shape, kind, gen)
        reference = torch.cumsum(values.to(torch.int64), dim=-1)
        inclusive, exclusive = inclusive_scan(values), exclusive_scan(values)
        assert inclusive.dtype == exclusive.dtype == torch.int32 and inclusive.shape == values.shape
        assert torch.equal(inclusive.to(torch.int64), reference)
        assert torch.equal(exclusive.to(torch.int64), reference - values.to(torch.int64))
        assert torch.equal(count_true(values).to(torch.int64), reference[..., -1])


def test_exclusive_scan_is_the_slot_of_every_kept_entry():
    keep = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    assert exclusive_scan(keep).tolist() == [[0, 1, 1, 2, 3, 3], [0] * 6]
    assert count_true(keep).tolist() == [4, 0] and count_true(keep, dim=0, keepdim=True).tolist() == [[1, 0, 1, 1, 0, 1]]


def test_scan_counts_past_fp16_exactness():
    """4097 ones: FP16 holds 2049 as 2048; the INT32 scan counts every one."""
    total = inclusive_scan(torch.ones(1, 4097, dtype=torch.bool))
    assert total[0, 2048].item() == 2049 and total[0, -1].item() == 4097


class _ScanModule(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = x > 0
        return exclusive_scan(keep), count_true(keep)


@pytest.mark.parametrize("n", [7, 4097])
def test_exported_scan_is_int32_slice_concat_add_in_log2_steps(n):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(3))
    proto = export_to_proto(_ScanModule(), x, output_names=["exclusive", "count"]).model
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    steps = math.ceil(math.log2(n))
    assert not SEQUENTIAL_OPS & set(ops)
    assert ops["Add"] == ops["Slice"] == ops["Concat"] == steps and ops["Sub"] == ops["ReduceSum"] == 1
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [onnx.TensorProto.INT32] * 2
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    arithmetic = [node for node in inferred.graph.node if node.op_type in ("Add", "Sub", "Concat", "ReduceSum")]
    assert all(types[node.output[0]] == onnx.TensorProto.INT32 for node in arithmetic)
    outputs = run_onnxruntime(proto, {"image": x.numpy()})
    reference = torch.cumsum((x > 0).to(torch.int64), dim=-1).numpy()
    np.testing.assert_array_equal(outputs["exclusive"], reference - (x > 0).numpy())
    np.testing.assert_array_equal(outputs["count"], reference[:, -1])
    assert lint_model(proto, "orin-jp6").ok and lint_model(proto, "orin-jp60").ok


def test_no_cumsum_in_the_exported_code():
    """Only the eager references may call torch.cumsum: everything that is exported uses staticprune.ops.scan."""
    root = pathlib.Path(__file__).resolve().parents[1] / "staticprune"
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if "reference" not in path.parts and ".cumsum(" in path.read_text()]
    assert offenders == []


# --------------------------------------------------------------------------------------------- every method

SEGMENTER_METHODS = {"tome": {}, "algm": {}, "g2tm": {}, "cts": {}, "lvtp": {}}
SEGVIT_METHODS = {"dcts": {"policy_width": 0.25}, "dtop": {"exit_layers": [1, 3], "head_layers": 2},
                  "step": {"exit_layers": [1, 3], "head_layers": 2, "policy_width": 0.25}}
SIZE = (64, 64)


def tiny_segvit() -> SegmentationModel:
    """SegViT layout (no CLS token, ATM head) at ViT-T width and 6 blocks: the registry has ViT-B/L SegViTs only."""
    vit = ViTConfig(dim=192, depth=6, heads=3, ln_eps=1e-6, use_cls_token=False, final_norm=False, out_indices=(1, 3, 5))
    spec = dataclasses.replace(get_spec("segvit-vit-b-atm"), vit=vit, atm_dim=96, atm_heads=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SegmentationModel(spec, SIZE, 6).eval()


@pytest.mark.parametrize("method", [*SEGMENTER_METHODS, *SEGVIT_METHODS])
def test_every_method_graph_has_no_sequential_op_and_lints_clean_on_jetpack6(method):
    if method in SEGVIT_METHODS:
        model, options = tiny_segvit(), SEGVIT_METHODS[method]
    else:
        model, options = build_model("segmenter-vit-t-mask", SIZE, num_classes=6), SEGMENTER_METHODS[method]
    model.method = build_static_method(method, options, model)
    proto = export_to_proto(model.eval(), generated_inputs((1, 3, *SIZE), 1)[0], output_names=model.output_names()).model
    found = {node.op_type for node in proto.graph.node} & SEQUENTIAL_OPS
    assert found == set(), f"{method}: {sorted(found)}"
    report = lint_model(proto, "orin-jp6")
    assert report.ok, report.format()
