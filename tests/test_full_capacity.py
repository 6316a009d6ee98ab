"""No overhead at full capacity: a graph whose capacities hold every token adds no N x N work to the attention.

The timing is `tools/bench_full_capacity.py` (docs/benchmarks/README.md, "Cost at full capacity"); these tests
pin the structure that makes it cheap, so that it cannot regress silently:

* with the "channel" key-bias form (`staticprune export --key-bias channel`, the ONNX Runtime form) the padding
  mask and log(size) reach the logits through one extra query/key channel: no elementwise op over the
  (B, heads, T, T) logits beyond what the unreduced graph has;
* a sequence that cannot hold padding and has no proportional attention (CTS) gets no key mask at all;
* the two forms compute the same logits and the same decisions (FP32 and the FP16 mixed-precision model).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import shape_inference

from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method
from staticprune.models.precision import to_mixed_precision
from staticprune.models.segmentation import build_model
from staticprune.models.vit import attention_bias, set_key_bias_form
from staticprune.verify.parity import generated_inputs, run_onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL, SIZE = "segmenter-vit-t-mask", (128, 128)
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Max", "Min"}


def build(method: str | None, options: dict, form: str = "add", size=SIZE, name=MODEL):
    model = build_model(name, size)
    if method is not None:
        model.method = build_static_method(method, options, model)
    set_key_bias_form(model, form)
    return model.eval()


def attention_elementwise_ops(proto: onnx.ModelProto) -> tuple[int, int]:
    """(Softmax nodes, elementwise nodes whose output has the shape of a Softmax input, i.e. the logits)."""
    inferred = shape_inference.infer_shapes(proto)
    shapes = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
              for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    softmax = [n for n in inferred.graph.node if n.op_type == "Softmax"]
    logit_shapes = {shapes[n.input[0]] for n in softmax}
    assert logit_shapes and all(len(s) == 4 and all(s) for s in logit_shapes), logit_shapes
    elementwise = [n for n in inferred.graph.node
                   if n.op_type in ELEMENTWISE and shapes.get(n.output[0]) in logit_shapes]
    return len(softmax), len(elementwise)


@pytest.fixture(scope="module")
def unreduced_graph() -> onnx.ModelProto:
    x = generated_inputs((1, 3, *SIZE), 1, seed=50)[0]
    model = build(None, {})
    return export_to_proto(model, x, output_names=model.output_names()).model


@pytest.mark.parametrize("method, options, form", [
    ("g2tm", {"capacity": None, "threshold": 0.2}, "channel"),  # padding slots, masked
    ("tome", {"mode": "threshold", "threshold": 0.3}, "channel"),  # padding + log(size), proportional attention
    ("cts", {"k": 0}, "add"),  # no slot can be padding: no mask in any form
    ("cts", {"reduction": 0.3}, "add"),
])
def test_full_capacity_attention_adds_no_elementwise_pass_over_the_logits(unreduced_graph, method, options, form):
    x = generated_inputs((1, 3, *SIZE), 1, seed=50)[0]
    model = build(method, options, form)
    proto = export_to_proto(model, x, output_names=model.output_names()).model
    softmax, elementwise = attention_elementwise_ops(proto)
    base_softmax, base_elementwise = attention_elementwise_ops(unreduced_graph)
    assert base_elementwise == base_softmax  # the unreduced graph: one scale Mul per attention, nothing else
    assert softmax >= base_softmax
    assert elementwise <= base_elementwise, f"{method} ({form}): {elementwise} elementwise ops on the logits"
    assert lint_model(proto, "orin-jp6").ok
    # the graph computes what the "add" module computes (ONNX Runtime vs PyTorch)
    with torch.no_grad():
        want = build(method, options, "add")(x)[0].numpy()
    got = run_onnxruntime(proto, {"image": x.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), want, atol=1e-4, rtol=0)


def test_the_add_form_keeps_one_add_per_masked_attention(unreduced_graph):
    """The TensorRT form: MatMul -> scale -> Add(key bias) -> Softmax -> MatMul, the pattern its MHA kernel fuses."""
    x = generated_inputs((1, 3, *SIZE), 1, seed=50)[0]
    model = build("g2tm", {"capacity": None, "layer": 2}, "add")
    proto = export_to_proto(model, x, output_names=model.output_names()).model
    softmax, elementwise = attention_elementwise_ops(proto)
    masked = 10 + 2  # the 10 blocks after the merge at block 2, and the 2 mask-decoder blocks on the merged tokens
    assert elementwise == softmax + masked


@pytest.mark.parametrize("name, method, options", [
    (MODEL, "g2tm", {"capacity": None, "threshold": 0.2}),
    (MODEL, "g2tm", {"capacity": None, "threshold": 0.2, "prop_attn": True}),
    (MODEL, "tome", {"mode": "threshold", "threshold": 0.3}),
    ("segvit-vit-b-atm", "dtop", {"capacity_ratio": [1.0], "threshold": [0.2]}),
])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_channel_and_add_forms_decide_the_same(name, method, options, precision):
    size = (64, 64)
    x = generated_inputs((2, 3, *size), 1, seed=7)[0]
    outs = {}
    for form in ("add", "channel"):
        model = build(method, {**options, "expose_decisions": True}, form, size, name)
        if precision == "fp16":
            to_mixed_precision(model)
        with torch.no_grad():
            outs[form] = dict(zip(model.output_names(), model(x)))
    add, channel = outs["add"], outs["channel"]
    decisions = [k for k in add if k.startswith("decision_")]
    assert decisions
    for key in decisions + ["overflow"]:
        assert torch.equal(add[key], channel[key]), key
    assert int((add["overflow"]).sum()) == 0
    assert reduced_something(method, add, decisions)  # the case exercises padding slots
    tol = 0.0 if precision == "fp32" else 5e-2  # FP32: the same float bits here; FP16: the FP16 parity level
    assert float((add["logits"].float() - channel["logits"].float()).abs().max()) <= tol


def reduced_something(method: str, outputs: dict, decisions: list[str]) -> bool:
    """Whether some token merged (g2tm: a label that is not its own index; tome: a partner index) or halted (dtop)."""
    if method == "g2tm":
        labels = outputs["decision_g2tm"]
        return bool((labels != torch.arange(labels.shape[1])).any())
    if method == "tome":
        return any(bool((outputs[k] >= 0).any()) for k in decisions)
    return any(bool((outputs[k] == 1).any()) for k in decisions)


def test_attention_bias_is_none_without_padding_and_proportion():
    size = torch.tensor([[1.0, 4.0, 1.0]])
    assert attention_bias(size, proportional=False, may_pad=False) is None
    assert attention_bias(None, proportional=True) is None
    torch.testing.assert_close(attention_bias(size, proportional=True, may_pad=False)[0, 0, 0],
                               torch.log(torch.tensor([1.0, 4.0, 1.0])))
    padded = torch.tensor([[1.0, 0.0, 2.0]])
    torch.testing.assert_close(attention_bias(padded, proportional=False)[0, 0, 0], torch.tensor([0.0, -1e4, 0.0]))


def test_unknown_key_bias_form_is_refused():
    with pytest.raises(ValueError, match="key bias form 'fold' is not one of add, channel"):
        set_key_bias_form(build_model(MODEL, (64, 64)), "fold")
