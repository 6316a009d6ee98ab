"""Decision-aware comparison of a runtime's outputs with a reference's (numpy only: no PyTorch, no ONNX Runtime).

Shared by `verify` (ONNX Runtime vs PyTorch, staticprune.verify.parity) and `verify --engine` (TensorRT vs ONNX
Runtime, staticprune.trt.engine), so it must import nothing heavier than numpy: it runs on a Jetson image that has
TensorRT, onnx and numpy but no torch.

Order of the comparison:
1. Method decisions (`decision_<point>` outputs, int) are compared exactly; a differing decision is a breach unless
   the reference's `margin_<point>` there is <= `margin_eps` (a near-tie, which another precision may resolve the
   other way). Flips are reported with the reference margins at the flipped entries.
2. Integer label maps (`labels`): agreement, and a pixel that differs is a breach only if the reference's
   top-1/top-2 logit margin there exceeds `margin_eps`.
3. Float outputs (features, logits): max abs error against `tol` (or, with `rtol`, the elementwise rule
   |got - ref| <= tol + rtol * |ref| of numpy.isclose).
After the first reduction point whose decisions flipped only at near-ties, later decisions, label maps and features
legitimately differ: they are reported but marked "not comparable" (floats must still be finite). So features are
judged only on inputs where every decision agreed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

DECISION_PREFIX, MARGIN_PREFIX = "decision_", "margin_"
# Every method's decision scores (cosine similarities, probabilities, confidences) lie in [-1, 1]; FP16 (and TF32,
# which TensorRT uses for FP32 matmuls on Ampere) resolves a score of magnitude 1 to 2^-10: a decision whose
# reference margin is below that may legitimately flip in an engine.
FP16_SCORE_RESOLUTION = 2.0**-10


@dataclass
class OutputDiff:
    name: str
    shape: list[int]
    dtype: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    # integer outputs: differing entries; float outputs compared with an rtol: entries outside tol + rtol * |ref|
    mismatches: int = 0
    breaches: int = 0  # integer label outputs: mismatches where the reference margin exceeded margin_eps
    min_flip_margin: Optional[float] = None
    min_margin: Optional[float] = None  # decision outputs: the closest any decision came to flipping
    agreement: Optional[float] = None
    comparable: bool = True  # False where an upstream decision flipped at a near-tie
    tol: float = 1e-4
    ok: bool = True


def label_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 over the class axis (axis 1)."""
    part = np.partition(logits, -2, axis=1)
    return part[:, -1] - part[:, -2]


def natural_key(name: str) -> list:
    """'decision_layer10' after 'decision_layer9': reduction points in network order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_decision(name: str) -> bool:
    return name.startswith(DECISION_PREFIX)


def reference_margins(name: str, ref: Mapping[str, np.ndarray]) -> Optional[np.ndarray]:
    """How far the reference was from flipping each entry of integer output `name` (None: no margin known)."""
    r = ref[name]
    margin_name = MARGIN_PREFIX + name[len(DECISION_PREFIX):] if is_decision(name) else None
    if margin_name in ref and ref[margin_name].shape == r.shape:
        return np.abs(ref[margin_name].astype(np.float64))
    if name == "labels" and "logits" in ref:
        return label_margin(ref["logits"].astype(np.float64))
    return None


def compare_outputs(
    got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: float = 1e-4,
    margin_eps: Optional[float] = None, rtol: Optional[float] = None, label_margin_eps: Optional[float] = None,
) -> list[OutputDiff]:
    """Diff every reference output against the runtime's, decision-aware for decisions and label maps.

    Without `rtol` a float output passes when its max abs error <= tol; with `rtol` (engine checks) when no entry
    lies outside tol + rtol * |ref|. `margin_eps` defaults to 10 * tol; `label_margin_eps` (label flips, in logit
    units) to margin_eps. An output the runtime lacks fails."""
    margin_eps = 10 * tol if margin_eps is None else margin_eps
    label_margin_eps = margin_eps if label_margin_eps is None else label_margin_eps
    diffs = []
    for name, r in ref.items():
        g = got.get(name)
        d = OutputDiff(name=name, shape=list(r.shape), dtype=str(r.dtype), tol=tol)
        if g is None or g.shape != r.shape:
            d.ok, d.mismatches = False, -1
        elif np.issubdtype(r.dtype, np.floating):
            r64 = r.astype(np.float64)
            err = np.abs(g.astype(np.float64) - r64)
            d.max_abs = float(err.max()) if err.size else 0.0
            d.mean_abs = float(err.mean()) if err.size else 0.0
            d.max_rel = d.max_abs / max(float(np.abs(r).max()) if r.size else 0.0, 1e-12)
            if rtol is None:
                d.ok = bool(np.isfinite(g).all()) and d.max_abs <= tol
            else:
                d.mismatches = int((~(err <= tol + rtol * np.abs(r64))).sum())  # NaN counts as outside
                d.ok = bool(np.isfinite(g).all()) and d.mismatches == 0
        else:
            wrong = g != r
            d.mismatches = int(wrong.sum())
            d.agreement = 1.0 - d.mismatches / max(r.size, 1)
            # label margins need a partition over the logits: only computed where a label differs
            margins = reference_margins(name, ref) if is_decision(name) or d.mismatches else None
            if margins is not None and is_decision(name):
                d.min_margin = float(margins.min()) if margins.size else None
            if margins is None:
                d.breaches = d.mismatches
            elif d.mismatches:
                flipped = margins[wrong]
                d.min_flip_margin = float(flipped.min())
                d.breaches = int((flipped > (margin_eps if is_decision(name) else label_margin_eps)).sum())
            d.ok = d.breaches == 0
        diffs.append(d)
    mark_downstream_of_near_tie_flips(diffs, got)
    return diffs


def mark_downstream_of_near_tie_flips(diffs: list[OutputDiff], got: Mapping[str, np.ndarray]) -> None:
    """After the first reduction point whose decisions flipped only at near-ties, later decisions and every
    feature output legitimately differ: report them as not comparable (finite values still required)."""
    decisions = sorted((d for d in diffs if is_decision(d.name)), key=lambda d: natural_key(d.name))
    first_flip = next((i for i, d in enumerate(decisions) if d.mismatches > 0 and d.ok), None)
    if first_flip is None:
        return
    downstream = {d.name for d in decisions[first_flip + 1 :]}
    for d in diffs:
        if d.ok:
            continue
        if d.name in downstream:
            d.comparable, d.ok = False, True
        elif not is_decision(d.name) and (d.dtype.startswith("float") or d.name in ("labels", "overflow")):
            g = got.get(d.name)
            finite = (g is not None and bool(np.isfinite(g).all())) if d.dtype.startswith("float") else True
            d.comparable, d.ok = False, finite


def merge_diffs(diffs_per_input: list[list[OutputDiff]]) -> list[OutputDiff]:
    """One row per output over several inputs: worst errors, summed counts, lowest agreement."""
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


# --------------------------------------------------------------------------------------------- engine vs reference


@dataclass
class RuntimeComparison:
    """A runtime (TensorRT engine) against a reference (ONNX Runtime on the standard-op graph) over several inputs.

    `outputs` is ordered for reading: decisions in network order, then label maps, then the other outputs.
    `flip_margins[name]`: reference margins at every flipped entry of that decision/label output (all inputs).
    `compared_inputs[name]`: on how many inputs the output was judged (not excused by an upstream near-tie flip);
    errors, counts and agreements are over those inputs only."""

    outputs: list[OutputDiff]
    inputs: int
    atol: float
    rtol: float
    margin_eps: float
    label_margin_eps: Optional[float] = None  # the largest logit margin at which a label flip was allowed
    flip_margins: dict[str, list[float]] = field(default_factory=dict)
    compared_inputs: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "inputs": self.inputs, "atol": self.atol, "rtol": self.rtol,
                "margin_eps": self.margin_eps, "label_margin_eps": self.label_margin_eps, "outputs": [asdict(o) for o in self.outputs],
                "flip_margins": self.flip_margins, "compared_inputs": self.compared_inputs, "notes": self.notes}

    def format(self) -> str:
        rows = []
        for o in self.outputs:
            judged = self.compared_inputs.get(o.name, self.inputs)
            if o.mismatches < 0:
                rows.append(f"{o.name:<20} FAIL: missing from the engine or shaped differently (reference {o.shape})")
                continue
            if judged == 0:
                verdict = "ok" if o.ok else "FAIL (not finite)"
                rows.append(f"{o.name:<20} not comparable on any input: an upstream decision flipped at a near-tie"
                            f"  {verdict}")
                continue
            if is_decision(o.name) or o.agreement is not None:
                line = f"{o.name:<20} agreement {100 * (o.agreement or 0.0):8.4f}%  {o.mismatches} differ"
                margins = self.flip_margins.get(o.name, [])
                if margins:
                    shown = ", ".join(f"{m:.2e}" for m in margins[:5]) + (", ..." if len(margins) > 5 else "")
                    line += f" at reference margins [{shown}] (max {margins[-1]:.2e})"
                if o.min_margin is not None:
                    line += f"; closest margin {o.min_margin:.2e}"
            else:
                line = (f"{o.name:<20} max abs {o.max_abs:.3e}  max rel {o.max_rel:.3e}  "
                        f"entries outside atol+rtol*|ref|: {o.mismatches}")
            if judged < self.inputs:
                line += (f"  [judged on {judged}/{self.inputs} input(s); on the others an upstream decision flipped "
                         "at a near-tie]")
            if not o.ok:
                eps = self.margin_eps if is_decision(o.name) else self.label_margin_eps
                verdict = f"FAIL ({o.breaches} flips above margin {eps:.3g})" if o.breaches else "FAIL"
            else:
                verdict = "ok"
            rows.append(f"{line}  {verdict}")
        rows += [f"note: {n}" for n in self.notes]
        labels = "" if self.label_margin_eps is None else f", label flips at logit margins <= {self.label_margin_eps:.3g}"
        rows.append(f"{'PASS' if self.ok else 'FAIL'}: engine vs ONNX Runtime, {self.inputs} input(s), atol {self.atol:g},"
                    f" rtol {self.rtol:g}; decision flips allowed at reference margins <= {self.margin_eps:.3g}{labels}")
        return "\n".join(rows)


def _reading_order(name: str) -> tuple:
    if is_decision(name):
        return (0, natural_key(name))
    if name == "labels":
        return (1, [])
    return (2, [])


def compare_runs(
    got_per_input: Sequence[Mapping[str, np.ndarray]], ref_per_input: Sequence[Mapping[str, np.ndarray]],
    atol: float, rtol: float, margin_eps: Optional[float] = None, label_margin_eps: Optional[float] = None,
) -> RuntimeComparison:
    """Decision-aware comparison of one runtime's outputs with a reference's, input by input, then merged.

    margin_eps: decision flips at reference margins up to this are near-ties (default FP16_SCORE_RESOLUTION).
    label_margin_eps: label flips at logit margins up to this are near-ties; default, per input, the most two
    logits within tolerance can move towards each other, 2 * (atol + rtol * max |reference logit|)."""
    if not ref_per_input or len(got_per_input) != len(ref_per_input):
        raise ValueError(f"need one runtime result per reference result (got {len(got_per_input)} and "
                         f"{len(ref_per_input)})")
    margin_eps = FP16_SCORE_RESOLUTION if margin_eps is None else margin_eps
    label_eps_used: Optional[float] = label_margin_eps
    per_input, flip_margins, compared = [], {}, {}
    for got, ref in zip(got_per_input, ref_per_input):
        label_eps = label_margin_eps
        if label_eps is None and "logits" in ref and "labels" in ref:
            label_eps = 2 * (atol + rtol * float(np.abs(ref["logits"]).max(initial=0.0)))
            label_eps_used = max(label_eps_used or 0.0, label_eps)
        diffs = compare_outputs(got, ref, tol=atol, margin_eps=margin_eps, rtol=rtol, label_margin_eps=label_eps)
        for i, d in enumerate(diffs):
            compared[d.name] = compared.get(d.name, 0) + int(d.comparable)
            if not d.comparable:  # excused by an upstream near-tie flip: its numbers would only blur the others
                diffs[i] = OutputDiff(name=d.name, shape=d.shape, dtype=d.dtype, tol=d.tol, comparable=False, ok=d.ok)
                continue
            g, r = got.get(d.name), ref[d.name]
            if d.agreement is not None and d.mismatches > 0 and g is not None:
                margins = reference_margins(d.name, ref)
                if margins is not None:
                    flip_margins.setdefault(d.name, []).extend(float(m) for m in margins[g != r])
        per_input.append(diffs)
    merged = sorted(merge_diffs(per_input), key=lambda d: _reading_order(d.name))
    for d in merged:  # agreement over the judged inputs together (merge_diffs keeps the worst input's)
        judged = compared.get(d.name, 0)
        if d.agreement is not None and d.mismatches >= 0 and judged:
            d.agreement = 1.0 - d.mismatches / max(int(np.prod(d.shape)) * judged, 1)
    report = RuntimeComparison(outputs=merged, inputs=len(ref_per_input), atol=atol, rtol=rtol, margin_eps=margin_eps,
                               label_margin_eps=label_eps_used,
                               flip_margins={k: sorted(v) for k, v in flip_margins.items()},
                               compared_inputs=compared)
    missing = sorted(set().union(*(got.keys() for got in got_per_input)) - set(ref_per_input[0]))
    if missing:
        report.notes.append("engine outputs without a reference (not compared): " + ", ".join(missing))
    if not report.ok and "overflow" in ref_per_input[0] and not any(is_decision(n) for n in ref_per_input[0]):
        report.notes.append("this graph exposes no decisions: re-export with --opt expose_decisions=true to see "
                            "whether a near-tie token decision flipped between the engine and ONNX Runtime")
    return report
