"""Compare an exported graph (ONNX Runtime, CPU) with the PyTorch module it came from.

Float outputs: max abs error, relative error (max abs error / max |reference|), mean abs error.
Integer label maps: agreement, and a decision-aware check: a pixel whose label differs counts as a breach only
if the reference's top-1/top-2 logit margin there exceeds `margin_eps` (a genuine, not a near-tie, flip).
Method decisions (`decision_<point>` outputs, int) are compared exactly; a differing decision is a breach
unless the reference's `margin_<point>` there is <= `margin_eps`. When a decision flipped at a near-tie,
everything downstream legitimately differs: float outputs are then reported but marked not comparable.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
import torch

# The comparison itself is numpy-only and shared with `verify --engine` (which must run without torch).
from staticprune.runtime.ort import ort_session
from staticprune.verify.decisions import OutputDiff, compare_outputs, is_decision
from staticprune.verify.decisions import merge_diffs as _merge

__all__ = ["OutputDiff", "VerifyReport", "compare_outputs", "generated_inputs", "ort_session", "run_onnxruntime",
           "verify_onnx"]


@dataclass
class VerifyReport:
    outputs: list[OutputDiff]
    inputs: int
    tol: float
    onnx_seconds: float = 0.0
    torch_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # the graph's own `overflow` output (ONNX Runtime), per input and batch item; empty if it has none
    graph_overflow: list[list[int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "inputs": self.inputs, "tol": self.tol, "onnx_seconds": self.onnx_seconds,
                "torch_seconds": self.torch_seconds, "outputs": [asdict(o) for o in self.outputs], "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        rows = [f"{'output':<20} {'shape':<20} {'max_abs':>10} {'max_rel':>10} {'agree':>8}  result"]
        for o in self.outputs:
            agree = "" if o.agreement is None else f"{100 * o.agreement:.3f}%"
            if o.dtype.startswith("float"):
                detail = f"{o.max_abs:>10.2e} {o.max_rel:>10.2e} {agree:>8}"
            else:
                detail = f"{o.mismatches:>10d} {'':>10} {agree:>8}"
            verdict = "ok" if o.ok else ("FAIL (> tol)" if o.dtype.startswith("float") else f"FAIL ({o.breaches} flips)")
            if not o.comparable:
                verdict = "not comparable: an upstream decision flipped at a near-tie"
            if o.min_margin is not None:
                verdict += f" (closest decision margin {o.min_margin:.2e})"
            if o.min_flip_margin is not None:
                verdict += f" (flips at margins >= {o.min_flip_margin:.2e})"
            rows.append(f"{o.name:<20} {str(o.shape):<20} {detail}  {verdict}")
        rows += [f"note: {n}" for n in self.notes]
        rows.append(f"{'PASS' if self.ok else 'FAIL'}: {self.inputs} input(s), tolerance {self.tol:g} (abs)")
        return "\n".join(rows)


def run_onnxruntime(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], session=None) -> dict[str, np.ndarray]:
    sess = session or ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def verify_onnx(
    model: onnx.ModelProto | str,
    torch_model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    tol: float = 1e-4,
    output_names: Optional[list[str]] = None,
    margin_eps: Optional[float] = None,
    fp16: bool = False,
) -> VerifyReport:
    """Run each input through ONNX Runtime and PyTorch and compare every output (`margin_eps`: the largest
    decision margin at which a flip is a near-tie, default 10 x tol). fp16: a mixed-precision graph, compared
    as the FP16 level does (labels reported as agreement: both sides round FP16 logits differently)."""
    sess = ort_session(model)
    in_name = sess.get_inputs()[0].name
    names = output_names or [o.name for o in sess.get_outputs()]
    per_input, t_onnx, t_torch = [], 0.0, 0.0
    graph_overflow: list[list[int]] = []
    for x in inputs:
        t0 = time.perf_counter()
        got = run_onnxruntime(model, {in_name: x.numpy()}, session=sess)
        t1 = time.perf_counter()
        if "overflow" in got:
            graph_overflow.append([int(v) for v in np.asarray(got["overflow"]).reshape(-1)])
        with torch.no_grad():
            ref_out = torch_model(x)
        t2 = time.perf_counter()
        t_onnx, t_torch = t_onnx + t1 - t0, t_torch + t2 - t1
        ref = {n: t.float().numpy() if t.is_floating_point() else t.numpy() for n, t in zip(names, ref_out)}
        if fp16:
            from staticprune.verify.fp16 import compare_fp16

            per_input.append(compare_fp16(got, ref, margin_eps, tol))
        else:
            per_input.append(compare_outputs(got, ref, tol, margin_eps))
    report = VerifyReport(outputs=_merge(per_input), inputs=len(inputs), tol=tol, onnx_seconds=t_onnx, torch_seconds=t_torch,
                          graph_overflow=graph_overflow)
    has_decisions = any(is_decision(n) for n in names)
    if not report.ok and "overflow" in names and not has_decisions:
        report.notes.append("this graph exposes no decisions; re-export with --opt expose_decisions=true to see "
                            "whether a near-tie token decision flipped between runtimes")
    return report


def generated_inputs(shape: tuple[int, ...], count: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """Normalised-image-like inputs: smooth random fields plus noise (N(0,1)-scaled), deterministic."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        b, c, h, w = shape
        coarse = torch.randn(b, c, max(h // 32, 1), max(w // 32, 1), generator=g)
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        out.append((smooth + 0.3 * torch.randn(shape, generator=g)).float())
    return out
