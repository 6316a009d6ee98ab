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
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
import torch


@dataclass
class OutputDiff:
    name: str
    shape: list[int]
    dtype: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    mismatches: int = 0  # integer outputs: differing entries
    breaches: int = 0  # integer label outputs: mismatches where the reference margin exceeded margin_eps
    min_flip_margin: Optional[float] = None
    min_margin: Optional[float] = None  # decision outputs: the closest any decision came to flipping
    agreement: Optional[float] = None
    comparable: bool = True  # False where an upstream decision flipped at a near-tie
    tol: float = 1e-4
    ok: bool = True


@dataclass
class VerifyReport:
    outputs: list[OutputDiff]
    inputs: int
    tol: float
    onnx_seconds: float = 0.0
    torch_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

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
        rows.append(f"{'PASS' if self.ok else 'FAIL'}: {self.inputs} input(s), tolerance {self.tol:g} (fp32 abs)")
        return "\n".join(rows)


def ort_session(model: onnx.ModelProto | str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnxruntime(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], session=None) -> dict[str, np.ndarray]:
    sess = session or ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 over the class axis (axis 1)."""
    part = np.partition(logits, -2, axis=1)
    return part[:, -1] - part[:, -2]


def compare_outputs(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float = 1e-4, margin_eps: Optional[float] = None
) -> list[OutputDiff]:
    """Diff every reference output against the runtime's, decision-aware for label maps."""
    margin_eps = 10 * tol if margin_eps is None else margin_eps
    diffs = []
    for name, r in ref.items():
        g = got[name]
        d = OutputDiff(name=name, shape=list(r.shape), dtype=str(r.dtype), tol=tol)
        if g.shape != r.shape:
            d.ok, d.mismatches = False, -1
        elif np.issubdtype(r.dtype, np.floating):
            err = np.abs(g.astype(np.float64) - r.astype(np.float64))
            d.max_abs = float(err.max()) if err.size else 0.0
            d.mean_abs = float(err.mean()) if err.size else 0.0
            d.max_rel = d.max_abs / max(float(np.abs(r).max()) if r.size else 0.0, 1e-12)
            d.ok = bool(np.isfinite(g).all()) and d.max_abs <= tol
        else:
            wrong = g != r
            d.mismatches = int(wrong.sum())
            d.agreement = 1.0 - d.mismatches / max(r.size, 1)
            margin_name = "margin_" + name[len("decision_"):] if name.startswith("decision_") else None
            if margin_name in ref and ref[margin_name].shape == r.shape:
                all_margins = np.abs(ref[margin_name].astype(np.float64))
                d.min_margin = float(all_margins.min()) if all_margins.size else None
                if d.mismatches:
                    margins = all_margins[wrong]
                    d.min_flip_margin = float(margins.min())
                    d.breaches = int((margins > margin_eps).sum())
            elif name == "labels" and "logits" in ref and d.mismatches:
                margins = _margin(ref["logits"].astype(np.float64))[wrong]
                d.min_flip_margin = float(margins.min())
                d.breaches = int((margins > margin_eps).sum())
            else:
                d.breaches = d.mismatches
            d.ok = d.breaches == 0
        diffs.append(d)
    _mark_downstream_of_near_tie_flips(diffs, got)
    return diffs


def _natural_key(name: str) -> list:
    """'decision_layer10' after 'decision_layer9': reduction points in network order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _mark_downstream_of_near_tie_flips(diffs: list[OutputDiff], got: dict[str, np.ndarray]) -> None:
    """After the first reduction point whose decisions flipped only at near-ties, later decisions and every
    feature output legitimately differ: report them as not comparable (finite values still required)."""
    decisions = sorted((d for d in diffs if d.name.startswith("decision_")), key=lambda d: _natural_key(d.name))
    first_flip = next((i for i, d in enumerate(decisions) if d.mismatches > 0 and d.ok), None)
    if first_flip is None:
        return
    downstream = {d.name for d in decisions[first_flip + 1 :]}
    for d in diffs:
        if d.ok:
            continue
        if d.name in downstream:
            d.comparable, d.ok = False, True
        elif not d.name.startswith("decision_") and (d.dtype.startswith("float") or d.name in ("labels", "overflow")):
            finite = bool(np.isfinite(got[d.name]).all()) if d.dtype.startswith("float") else True
            d.comparable, d.ok = False, finite


def _merge(diffs_per_input: list[list[OutputDiff]]) -> list[OutputDiff]:
    merged = diffs_per_input[0]
    for diffs in diffs_per_input[1:]:
        for m, d in zip(merged, diffs):
            m.max_abs, m.max_rel = max(m.max_abs, d.max_abs), max(m.max_rel, d.max_rel)
            m.mean_abs = max(m.mean_abs, d.mean_abs)
            m.mismatches += d.mismatches
            m.breaches += d.breaches
            if d.min_flip_margin is not None:
                m.min_flip_margin = d.min_flip_margin if m.min_flip_margin is None else min(m.min_flip_margin, d.min_flip_margin)
            if d.agreement is not None:
                m.agreement = min(m.agreement if m.agreement is not None else 1.0, d.agreement)
            m.ok = m.ok and d.ok
            m.comparable = m.comparable and d.comparable
            if d.min_margin is not None:
                m.min_margin = d.min_margin if m.min_margin is None else min(m.min_margin, d.min_margin)
    return merged


def verify_onnx(
    model: onnx.ModelProto | str,
    torch_model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    tol: float = 1e-4,
    output_names: Optional[list[str]] = None,
) -> VerifyReport:
    """Run each input through ONNX Runtime and PyTorch and compare every output."""
    sess = ort_session(model)
    in_name = sess.get_inputs()[0].name
    names = output_names or [o.name for o in sess.get_outputs()]
    per_input, t_onnx, t_torch = [], 0.0, 0.0
    for x in inputs:
        t0 = time.perf_counter()
        got = run_onnxruntime(model, {in_name: x.numpy()}, session=sess)
        t1 = time.perf_counter()
        with torch.no_grad():
            ref_out = torch_model(x)
        t2 = time.perf_counter()
        t_onnx, t_torch = t_onnx + t1 - t0, t_torch + t2 - t1
        ref = {n: t.numpy() for n, t in zip(names, ref_out)}
        per_input.append(compare_outputs(got, ref, tol))
    report = VerifyReport(outputs=_merge(per_input), inputs=len(inputs), tol=tol, onnx_seconds=t_onnx, torch_seconds=t_torch)
    has_decisions = any(n.startswith("decision_") for n in names)
    if not report.ok and "overflow" in names and not has_decisions:
        report.notes.append("this graph exposes no decisions; re-export with --opt expose_decisions=true to see "
                            "whether a near-tie token decision flipped between runtimes (DESIGN §5)")
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
