"""Mixed precision (export --precision fp16): FP16 network, FP32 decisions, checked by the FP16 parity level."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from staticprune.cli import main
from staticprune.export.lint import lint_model
from staticprune.export.precision_check import _elem_types, fp16_decision_problems
from staticprune.models.vit import LayerNorm
from staticprune.pipeline import ModelConfig, build
from staticprune.verify.fp16 import FP16_MARGIN, compare_fp16, fp16_level
from staticprune.verify.parity import generated_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTER_METHODS = ["none", "tome", "algm", "g2tm", "cts", "lvtp"]
SEGVIT_METHODS = ["dcts", "dtop", "step"]


def _cfg(method: str, size=(64, 64), **kw) -> ModelConfig:
    model = "segvit-vit-b-atm" if method in SEGVIT_METHODS else "segmenter-vit-t-mask"
    return ModelConfig(model=model, size=size, classes=7, method=method, labels=True, **kw)


def test_mixed_precision_puts_the_network_in_fp16_and_everything_that_decides_in_fp32():
    model = build(_cfg("tome", precision="fp16"))
    assert model.backbone.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert model.backbone.blocks[0].mlp.fc2.weight.dtype == torch.float16
    assert model.decoder.proj_dec.weight.dtype == torch.float16
    assert model.backbone.patch_embed.proj.weight.dtype == torch.float32
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, LayerNorm))
    assert all(p.dtype == torch.float32 for p in model.method.parameters())
    assert all(b.dtype == torch.float32 for b in model.method.buffers() if b.is_floating_point())
    out = model(generated_inputs((1, 3, 64, 64), 1)[0])
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.int32


@pytest.mark.parametrize("method", SEGMENTER_METHODS + SEGVIT_METHODS)
def test_fp16_level_every_method_decides_exactly_as_fp32(method):
    """At 64x64 every decision, and the capacity's overflow count, is bit-identical to FP32; logits within 5e-2."""
    cfg = _cfg(method)
    report = fp16_level(cfg, generated_inputs((1, 3, 64, 64), 2, seed=3))
    summary = report.summary()
    assert report.ok, report.format()
    if method != "none":
        assert summary["points"] >= 1 and summary["decisions"] > 0
    assert summary["flips_above_margin"] == 0
    assert summary["flips"] == 0, report.format()  # no near-tie at this size: equal decisions, equal counts
    assert summary["overflow_equal"] in (True, None)
    assert 0 < summary["logits_max_abs"] < 5e-2
    assert summary["label_agreement"] > 0.97


def test_compare_fp16_accepts_flips_below_the_fp16_margin_only():
    ref = {"logits": np.zeros((1, 2, 2, 2), np.float32), "labels": np.zeros((1, 2, 2), np.int32),
           "decision_layer1": np.array([[0, 1, 2, 3]], np.int32),
           "margin_layer1": np.array([[0.5, FP16_MARGIN / 4, 0.5, 0.5]], np.float32),
           "decision_layer2": np.array([[0, 1]], np.int32), "margin_layer2": np.array([[0.5, 0.5]], np.float32),
           "overflow": np.array([0], np.int32)}
    near_tie = {**ref, "decision_layer1": np.array([[0, 2, 2, 3]], np.int32),
                "decision_layer2": np.array([[1, 1]], np.int32), "logits": np.ones((1, 2, 2, 2), np.float32)}
    diffs = {d.name: d for d in compare_fp16(near_tie, ref)}
    assert diffs["decision_layer1"].ok and diffs["decision_layer1"].mismatches == 1
    assert diffs["decision_layer1"].min_flip_margin == pytest.approx(FP16_MARGIN / 4)
    assert not diffs["decision_layer2"].comparable and not diffs["logits"].comparable  # downstream of the flip
    genuine = {**ref, "decision_layer1": np.array([[1, 1, 2, 3]], np.int32)}  # margin 0.5: a real error
    diffs = {d.name: d for d in compare_fp16(genuine, ref)}
    assert not diffs["decision_layer1"].ok and diffs["decision_layer1"].breaches == 1
    drift = {**ref, "logits": np.full((1, 2, 2, 2), 0.2, np.float32)}
    assert not {d.name: d for d in compare_fp16(drift, ref)}["logits"].ok


def test_export_precision_fp16_end_to_end(tmp_path, capsys):
    out = tmp_path / "seg16.onnx"
    code = main(["export", "--model", "segmenter-vit-t-mask", "--size", "64x64", "--classes", "5", "--method",
                 "algm", "--precision", "fp16", "--labels", "-o", str(out), "--json", str(tmp_path / "e.json")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "FP16 level" in text and "PASS: FP16 level" in text
    proto = onnx.load(str(out))
    meta = {e.key: e.value for e in proto.metadata_props}
    assert meta["staticprune.precision"] == "fp16" and json.loads(meta["staticprune"])["precision"] == "fp16"
    inits = {i.data_type for i in proto.graph.initializer}
    assert TensorProto.FLOAT16 in inits and TensorProto.FLOAT in inits  # FP16 network, FP32 norms and method
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert fp16_decision_problems(proto) == []
    assert not any(n.op_type in ("CumSum", "Loop") for n in proto.graph.node)
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["fp16"]["ok"] and report["fp16"]["summary"]["flips_above_margin"] == 0
    assert report["fp16"]["summary"]["points"] == 2  # ALGM: CLAP and GBM
    # verify rebuilds the mixed-precision module from the metadata and runs both levels again
    # ALGM's default capacities (0.85 / 0.65 of N) overflow on this random-weight input: verify would fail on that
    code = main(["verify", str(out), "--inputs", "1", "--allow-overflow"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "PASS: FP16 level" in text


def test_lint_flags_a_decision_computed_in_fp16(tmp_path):
    cfg = _cfg("tome", size=(32, 32), precision="fp16")
    model = build(cfg)
    from staticprune.export.onnx_export import export_to_proto

    proto = export_to_proto(model, generated_inputs((1, 3, 32, 32), 1)[0], output_names=model.output_names()).model
    assert lint_model(proto, "orin-jp6").ok
    types = _elem_types(proto)
    fp16_tensor = next(name for name, t in types.items() if t == TensorProto.FLOAT16)
    proto.graph.node.append(helper.make_node("Greater", [fp16_tensor, fp16_tensor], ["planted"], name="planted_gt"))
    proto.graph.node.append(helper.make_node("Cast", ["planted"], ["planted16"], name="planted_cast",
                                             to=TensorProto.FLOAT16))
    report = lint_model(proto, "orin-jp6")
    found = {(v.rule, v.node) for v in report.violations}
    assert ("fp16-decision", "planted_gt") in found and ("fp16-decision", "planted_cast") in found
    assert not report.ok


def test_a_graph_that_hides_its_decisions_is_checked_through_its_twin():
    """With decisions hidden, a failing L2 of a mixed-precision graph is re-checked on the decision-exposing twin,
    which must reproduce the graph's outputs exactly in ONNX Runtime (forced here with a zero tolerance)."""
    from staticprune.export.onnx_export import export_to_proto
    from staticprune.verify.fp16 import verify_mixed_graph

    cfg = _cfg("tome", size=(32, 32), precision="fp16")
    model = build(cfg)
    inputs = generated_inputs((1, 3, 32, 32), 1, seed=4)
    proto = export_to_proto(model, inputs[0], output_names=model.output_names()).model
    assert not any(o.name.startswith("decision_") for o in proto.graph.output)
    report = verify_mixed_graph(proto, model, cfg, inputs, 0.0, model.output_names())
    rows = {o.name: o for o in report.outputs}
    assert rows["graph = twin"].ok and rows["graph = twin"].max_abs == 0.0
    assert any(name.startswith("decision_") for name in rows) and "margin_layer1" not in rows
    assert any("decision-exposing twin" in note for note in report.notes)
    relaxed = verify_mixed_graph(proto, model, cfg, inputs, 5e-2, model.output_names())
    assert relaxed.ok and "graph = twin" not in {o.name for o in relaxed.outputs}  # passes directly: no twin
