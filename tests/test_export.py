"""ONNX export: numerical parity with PyTorch, opset assertion, target lint, atomic writes."""

import os

import onnx
import pytest

from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import ExportError, check_opset, default_opset, export_to_proto, save_atomic
from staticprune.models import build_model
from staticprune.verify.parity import generated_inputs, verify_onnx

DECODERS = ["segmenter-vit-t-linear", "segmenter-vit-t-mask", "segvit-vit-b-atm"]


def _export(model, size, opset=17, batch=1, **kw):
    example = generated_inputs((batch, 3, *size), 1)[0]
    return export_to_proto(model, example, opset=opset, output_names=model.output_names(), **kw)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("size", [(64, 64), (48, 96)])
def test_every_decoder_matches_pytorch_within_1e4(name, size):
    model = build_model(name, size, num_classes=6)
    model.emit_labels = True
    result = _export(model, size)
    assert result.opset == 17 and default_opset(result.model) == 17
    assert result.output_names == ["logits", "labels"]
    report = verify_onnx(result.model, model, generated_inputs((1, 3, *size), 2, seed=5))
    logits, labels = report.outputs
    assert logits.max_abs <= 1e-4, report.format()
    assert labels.dtype == "int32" and labels.breaches == 0
    assert report.ok


@pytest.mark.parametrize("opset", [17, 20])
def test_requested_opset_is_what_the_file_declares(opset):
    model = build_model("segmenter-vit-t-linear", (32, 32), num_classes=3)
    result = _export(model, (32, 32), opset=opset)
    assert default_opset(result.model) == opset


@pytest.mark.parametrize("opset", [16, 21, 9])
def test_opset_outside_range_is_refused(opset):
    with pytest.raises(ValueError, match="17-20"):
        check_opset(opset)


def test_dynamo_exporter_is_never_trusted():
    """The dynamo exporter either gives the opset asked for, or export fails loudly: never a silent drift."""
    model = build_model("segmenter-vit-t-linear", (32, 32), num_classes=3)
    try:
        result = _export(model, (32, 32), opset=17, exporter="dynamo")
    except ExportError as exc:
        assert "opset 17" in str(exc) and "declares opset" in str(exc)
    else:
        assert default_opset(result.model) == 17


def test_static_graph_has_no_dynamic_ops_and_lints_clean_everywhere():
    model = build_model("segmenter-vit-t-mask", (48, 64), num_classes=4)
    proto = _export(model, (48, 64)).model
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Loop", "If", "Scan", "NonZero", "Unique", "Shape"}
    assert "LayerNormalization" in ops
    for target in ("orin-jp6", "orin-jp60", "x86-trt10"):
        report = lint_model(proto, target)
        assert report.ok, report.format()
    # TensorRT 8.5 has no LayerNormalization: the plain graph fails there ...
    assert [v.rule for v in lint_model(proto, "orin-jp5").errors].count("layernorm") >= 1
    # ... and the decomposed export is clean and computes the same thing.
    model.set_decomposed_layernorm(True)
    decomposed = _export(model, (48, 64)).model
    assert "LayerNormalization" not in {n.op_type for n in decomposed.graph.node}
    assert lint_model(decomposed, "orin-jp5").ok
    model.set_decomposed_layernorm(False)
    assert verify_onnx(decomposed, model, generated_inputs((1, 3, 48, 64), 1)).outputs[0].max_abs <= 1e-4


def test_fixed_batch_size_two():
    model = build_model("segmenter-vit-t-linear", (32, 32), num_classes=3)
    proto = _export(model, (32, 32), batch=2).model
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 32, 32]
    assert verify_onnx(proto, model, generated_inputs((2, 3, 32, 32), 1)).ok


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = build_model("segmenter-vit-t-linear", (32, 32), num_classes=3)
    proto = _export(model, (32, 32)).model
    dest = tmp_path / "m.onnx"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OSError):
        save_atomic(proto, dest)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    save_atomic(proto, dest)
    assert os.listdir(tmp_path) == ["m.onnx"] and onnx.load(str(dest)).graph.node
