"""FP16 parity level: the mixed-precision module against the FP32 module, decision-aware.

What an FP16 TensorRT engine runs is the mixed-precision graph (`export --precision fp16`: network in FP16,
token-reduction decisions in FP32). TensorRT is not needed to check it: the same module runs in PyTorch CPU half
precision (the ONNX Runtime CPU provider is no reference here: it silently computes the FP16 nodes it has no FP16
kernel for in FP32). This level compares, per input:

* decisions (`decision_<point>`, int32) at each reduction point: equal, or flipped only where the FP32 module's
  margin is below `margin_eps` (default 2^-10, the FP16 resolution of a score of magnitude 1: cosine
  similarities, probabilities and confidences all lie in [-1, 1]); the first point with such a flip makes
  everything downstream "not comparable";
* `overflow` (the capacity's integer count) exactly, where comparable;
* logits within `tol` where comparable, and label agreement (reported; FP16 logits legitimately flip near-tie
  pixels, so labels never fail this level on their own).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from staticprune.verify.parity import OutputDiff, _merge, compare_outputs

FP16_MARGIN = 2.0**-10  # FP16 spacing at 1.0
FP16_LOGITS_TOL = 5e-2


@dataclass
class FP16Report:
    outputs: list[OutputDiff]
    inputs: int
    margin_eps: float
    tol: float
    reference: str = "PyTorch CPU, mixed-precision module (FP16 network, FP32 decisions) vs the FP32 module"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def decisions(self) -> list[OutputDiff]:
        return [o for o in self.outputs if o.name.startswith("decision_")]

    def summary(self) -> dict:
        """The numbers of the FP16 parity table: decisions compared, flips, flips above the margin, labels."""
        dec = self.decisions()
        labels = next((o for o in self.outputs if o.name == "labels"), None)
        logits = next((o for o in self.outputs if o.name == "logits"), None)
        overflow = next((o for o in self.outputs if o.name == "overflow"), None)
        flip_margins = [o.min_flip_margin for o in dec if o.min_flip_margin is not None]
        return {
            "points": len(dec),
            "decisions": int(sum(int(np.prod(o.shape)) for o in dec) * self.inputs),
            "flips": int(sum(o.mismatches for o in dec)),
            "flips_above_margin": int(sum(o.breaches for o in dec)),
            "min_flip_margin": min(flip_margins) if flip_margins else None,
            "label_agreement": None if labels is None else labels.agreement,
            "logits_max_abs": None if logits is None else logits.max_abs,
            "logits_comparable": None if logits is None else logits.comparable,
            "overflow_equal": None if overflow is None else (overflow.mismatches == 0 or not overflow.comparable),
            "ok": self.ok,
        }

    def to_dict(self) -> dict:
        return {"ok": self.ok, "inputs": self.inputs, "margin_eps": self.margin_eps, "tol": self.tol,
                "reference": self.reference, "summary": self.summary(),
                "outputs": [asdict(o) for o in self.outputs], "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        rows = [f"FP16 level ({self.reference})",
                f"{'output':<20} {'shape':<16} {'differs':>9} {'agree':>9}  result"]
        for o in self.outputs:
            agree = "" if o.agreement is None else f"{100 * o.agreement:.3f}%"
            differs = f"{o.max_abs:.2e}" if o.dtype.startswith("float") else str(o.mismatches)
            if not o.comparable:
                verdict = "not comparable: an upstream decision flipped at an FP16 near-tie"
            elif o.ok:
                verdict = "ok"
            elif o.dtype.startswith("float"):
                verdict = f"FAIL (> {o.tol:g})"
            else:
                verdict = f"FAIL ({o.breaches} flip(s) above the FP16 margin {self.margin_eps:.2e})"
            if o.min_flip_margin is not None and o.name.startswith("decision_"):
                verdict += f" (flips at margins >= {o.min_flip_margin:.2e})"
            rows.append(f"{o.name:<20} {str(o.shape):<16} {differs:>9} {agree:>9}  {verdict}")
        rows += [f"note: {n}" for n in self.notes]
        s = self.summary()
        rows.append(f"{'PASS' if self.ok else 'FAIL'}: FP16 level, {self.inputs} input(s), {s['flips']} flipped "
                    f"decision(s) of {s['decisions']}, {s['flips_above_margin']} above the FP16 margin "
                    f"{self.margin_eps:.2e}"
                    + ("" if s["label_agreement"] is None else f", labels agree {100 * s['label_agreement']:.4f}%"))
        return "\n".join(rows)


def compare_fp16(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], margin_eps: float = FP16_MARGIN,
                 tol: float = FP16_LOGITS_TOL) -> list[OutputDiff]:
    """Decision-aware diff of one input's mixed-precision outputs against the FP32 ones."""
    diffs = compare_outputs(got, ref, tol=tol, margin_eps=margin_eps)
    for d in diffs:
        if d.name == "labels":
            d.ok, d.breaches = True, 0  # reported as agreement: FP16 logits flip near-tie pixels legitimately
        elif d.name.startswith("margin_") and d.comparable:
            d.ok = True  # margins are FP32 scores computed from FP16 features: they differ by design
    return diffs


def verify_fp16(fp32_model: torch.nn.Module, mixed_model: torch.nn.Module, inputs: Sequence[torch.Tensor],
                output_names: list[str], margin_eps: float = FP16_MARGIN, tol: float = FP16_LOGITS_TOL) -> FP16Report:
    """Run both modules on every input and compare (see the module docstring)."""
    per_input = []
    for x in inputs:
        with torch.no_grad():
            ref = {n: t.numpy() for n, t in zip(output_names, fp32_model(x))}
            got = {n: t.float().numpy() if t.is_floating_point() else t.numpy()
                   for n, t in zip(output_names, mixed_model(x))}
        per_input.append(compare_fp16(got, ref, margin_eps, tol))
    report = FP16Report(outputs=_merge(per_input), inputs=len(inputs), margin_eps=margin_eps, tol=tol)
    if not report.decisions() and any(n == "overflow" for n in output_names):
        report.notes.append("this model exposes no decisions: build it with --opt expose_decisions=true to compare "
                            "them (export --precision fp16 does so for its own check)")
    return report


def with_decisions(options: dict, method: str) -> dict:
    """Method options with decision outputs on (the FP16 level compares decisions), unchanged for no method."""
    return options if method in ("none", "", None) else {**options, "expose_decisions": True}


def fp16_level(cfg, inputs: Sequence[torch.Tensor], margin_eps: float = FP16_MARGIN,
               tol: float = FP16_LOGITS_TOL, build=None) -> FP16Report:
    """The FP16 level for a model config: FP32 and mixed-precision modules built with decision outputs."""
    import dataclasses

    from staticprune.models.precision import to_mixed_precision
    from staticprune.pipeline import build as build_model

    build = build or build_model
    probe = dataclasses.replace(cfg, precision="fp32",
                                method_options=with_decisions(dict(cfg.method_options), cfg.method))
    fp32 = build(probe)
    mixed = to_mixed_precision(build(probe))
    return verify_fp16(fp32, mixed, inputs, fp32.output_names(), margin_eps, tol)


def fp16_table(rows: dict[str, dict]) -> str:
    """Markdown table of FP16 level summaries per method."""
    out = ["| method | points | decisions compared | flips | flips above FP16 margin | smallest flip margin "
           "| label agreement | logits max abs | overflow equal | result |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in rows.items():
        flip = "-" if s["min_flip_margin"] is None else f"{s['min_flip_margin']:.2e}"
        agree = "-" if s["label_agreement"] is None else f"{100 * s['label_agreement']:.4f}%"
        logits = "-" if s["logits_max_abs"] is None else (
            f"{s['logits_max_abs']:.2e}" + ("" if s["logits_comparable"] else " (not comparable)"))
        out.append(f"| {name} | {s['points']} | {s['decisions']} | {s['flips']} | {s['flips_above_margin']} | {flip} "
                   f"| {agree} | {logits} | {_yes(s['overflow_equal'])} | {'PASS' if s['ok'] else 'FAIL'} |")
    return "\n".join(out)


def _yes(value: Optional[bool]) -> str:
    return "-" if value is None else ("yes" if value else "no")


def verify_mixed_graph(graph, model: torch.nn.Module, cfg, inputs: Sequence[torch.Tensor], tol: float,
                       output_names: list[str], build=None):
    """L2 of a mixed-precision graph: ONNX Runtime vs the mixed-precision module, decision-aware.

    ONNX Runtime and PyTorch round FP16 differently (ONNX Runtime's CPU provider computes the FP16 nodes it has no
    kernel for in FP32), so a token decision may flip at a near-tie between them, and everything downstream then
    differs legitimately. A graph that hides its decisions cannot tell such a flip from an error: it is then checked
    through its decision-exposing twin (same module, plus `decision_*` / `margin_*` outputs), which must compute
    exactly the graph's outputs in ONNX Runtime and is verified decision-aware against the module.
    """
    import dataclasses

    import onnx

    from staticprune.export.onnx_export import default_opset, export_to_proto
    from staticprune.pipeline import build as build_model
    from staticprune.verify.parity import OutputDiff, ort_session, verify_onnx

    report = verify_onnx(graph, model, inputs, tol=tol, output_names=output_names, margin_eps=FP16_MARGIN, fp16=True)
    if report.ok or cfg.method in ("none", "", None) or any(n.startswith("decision_") for n in output_names):
        return report
    build = build or build_model
    twin_cfg = dataclasses.replace(cfg, method_options=with_decisions(dict(cfg.method_options), cfg.method))
    twin = build(twin_cfg)
    proto = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph))
    twin_graph = export_to_proto(twin, inputs[0], opset=default_opset(proto), output_names=twin.output_names()).model
    twin_report = verify_onnx(twin_graph, twin, inputs, tol=tol, output_names=twin.output_names(),
                              margin_eps=FP16_MARGIN, fp16=True)
    # Same runtime, same operations on the graph's outputs: the twin must reproduce them.
    sess, twin_sess = ort_session(proto), ort_session(twin_graph)
    same = OutputDiff(name="graph = twin", shape=[len(inputs)], dtype="float32", tol=1e-5)
    for x in inputs:
        feed = {sess.get_inputs()[0].name: x.numpy()}
        got = dict(zip(output_names, sess.run(output_names, feed)))
        ref = dict(zip(output_names, twin_sess.run(output_names, {twin_sess.get_inputs()[0].name: x.numpy()})))
        for name in output_names:
            err = float(np.abs(got[name].astype(np.float64) - ref[name].astype(np.float64)).max())
            same.max_abs = max(same.max_abs, err)
    same.ok = same.max_abs <= same.tol
    twin_report.outputs = [o for o in twin_report.outputs if o.name in output_names or o.name.startswith("decision_")]
    twin_report.outputs.append(same)
    twin_report.notes.append("the graph hides its token decisions, and ONNX Runtime and PyTorch round FP16 "
                             "differently: checked through its decision-exposing twin (graph = twin: the twin "
                             "reproduces the graph's outputs in ONNX Runtime)")
    return twin_report
