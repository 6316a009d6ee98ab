"""What `staticprune verify` checks on a graph and prints as one table.

* L2: ONNX Runtime vs the static PyTorch module the graph came from (every output, decision-aware:
  staticprune.verify.parity).
* L1: the static PyTorch module vs the method's eager reference (decisions per reduction point with their
  margins, then logits: staticprune.verify.levels.l1_images). Shown for every method; "n/a" without one.
* Capacity overflow: per reduction point and image, as counts (tokens the capacity could not hold). The total
  per image is the graph's own `overflow` output; its split over the points comes from the static PyTorch
  module (the graph has one total output), and is only shown when the two agree. Overflow fails the check
  unless it is allowed (--allow-overflow): the graph then computed something other than the method.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from staticprune.ops.merge import NO_MARGIN
from staticprune.verify.decisions import OutputDiff, is_decision, natural_key
from staticprune.verify.levels import ImageL1, PointL1, l1_images, run_with_point_overflow
from staticprune.verify.parity import VerifyReport


@dataclass
class PointSummary:
    """L1 of one reduction point over every image."""

    point: str
    images: int = 0  # images compared at this point
    equal: int = 0  # ... with every decision equal
    near_tie: int = 0  # ... whose decisions flipped only at margins <= margin_eps
    breach: int = 0  # ... with a flip above the margin (a failure)
    skipped_overflow: int = 0  # images not compared: the capacity overflowed here or earlier
    skipped_downstream: int = 0  # images not compared: an earlier point flipped
    flips: int = 0
    min_flip_margin: Optional[float] = None
    min_margin: Optional[float] = None
    breach_images: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.breach == 0


@dataclass
class L1Report:
    method: str
    points: list[PointSummary] = field(default_factory=list)
    images: int = 0
    logits_images: int = 0  # images whose logits were compared (every decision equal, no overflow)
    logits_max_abs: Optional[float] = None
    logits_failed: list[str] = field(default_factory=list)
    tol: float = 1e-4
    margin_eps: float = 1e-3
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.points) and not self.logits_failed

    def to_dict(self) -> dict:
        return {"ok": self.ok, "method": self.method, "images": self.images, "tol": self.tol,
                "margin_eps": self.margin_eps, "points": [asdict(p) for p in self.points],
                "logits": {"images_compared": self.logits_images, "max_abs": self.logits_max_abs,
                           "failed_images": self.logits_failed},
                "seconds": self.seconds}


@dataclass
class ImageOverflow:
    """The capacity overflow of one image: the graph's total and its split per reduction point."""

    image: str
    total: int  # the graph's `overflow` output (ONNX Runtime)
    points: dict[str, int]  # from the static PyTorch module, every reduction point (0 included)
    split_agrees: bool = True  # the PyTorch points add up to the graph's total


@dataclass
class ParityReport:
    l2: VerifyReport
    l1: Optional[L1Report]  # None: no token-reduction method
    overflow: list[ImageOverflow]
    image_names: list[str]
    allow_overflow: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def overflowed(self) -> list[tuple[str, str, int]]:
        """(point, image, count) of every nonzero overflow; point "total" where the split is unknown."""
        out = []
        for im in self.overflow:
            if not im.total:
                continue
            if im.split_agrees:
                out += [(p, im.image, c) for p, c in im.points.items() if c]
            else:
                out.append(("total", im.image, im.total))
        return out

    @property
    def ok(self) -> bool:
        return self.l2.ok and (self.l1 is None or self.l1.ok) and (self.allow_overflow or not self.overflowed)

    def to_dict(self) -> dict:
        # L2's keys stay at the top level (the layout of earlier versions); L1 and overflow beside them.
        payload = self.l2.to_dict()
        payload.update({
            "ok": self.ok,
            "images": self.image_names,
            "l2": {"ok": self.l2.ok, "outputs": payload["outputs"], "tol": self.l2.tol},
            "l1": self.l1.to_dict() if self.l1 is not None else {"ok": True, "method": "none",
                                                                 "note": "no token reduction: nothing to compare"},
            "overflow": {"ok": not self.overflowed, "allowed": self.allow_overflow,
                         "per_image": [asdict(o) for o in self.overflow],
                         "overflowed": [{"point": p, "image": i, "count": c} for p, i, c in self.overflowed]},
            "notes": self.l2.notes + self.notes,
        })
        return payload

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        rows: list[tuple[str, str, str, str, str]] = []
        n = self.l2.inputs
        for o in self.l2.outputs:
            rows.append(("L2", _l2_name(o), f"{n} input(s)", _l2_value(o), _l2_verdict(o)))
        if self.l1 is None:
            rows.append(("L1", "-", "-", "no token reduction: the static model is the reference", "n/a"))
        else:
            rows += _l1_rows(self.l1)
        rows += self._overflow_rows()
        head = ("level", "check", "compared on", "value", "result")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in [head, *rows]]
        lines += [f"note: {t}" for t in self.l2.notes + self.notes]
        lines.append(self.summary())
        return "\n".join(lines)

    def _overflow_rows(self) -> list[tuple[str, str, str, str, str]]:
        if not self.overflow:
            return [("overflow", "-", "-", "this graph has no overflow output (no capacity)", "n/a")]
        verdict = "allowed (--allow-overflow)" if self.allow_overflow else "FAIL"
        rows = [("overflow", point if point != "total" else "total (split unknown)", image, f"{count} token(s)",
                 verdict) for point, image, count in self.overflowed]
        if not rows:
            points = sorted({p for im in self.overflow for p in im.points}, key=natural_key)
            where = f"{len(self.overflow)} image(s)"
            if points:
                where = f"{len(points)} point(s) x {where}"
            rows.append(("overflow", "every point", where, "0 tokens beyond capacity", "ok"))
        return rows

    def summary(self) -> str:
        failed = []
        if not self.l2.ok:
            failed.append("L2 (ONNX Runtime vs PyTorch)")
        if self.l1 is not None and not self.l1.ok:
            failed.append("L1 (static vs eager reference)")
        over = "; ".join(f"{p} of {i}: {c}" for p, i, c in self.overflowed)
        if self.overflowed and not self.allow_overflow:
            failed.append(f"capacity overflow ({over})")
        head = f"{'PASS' if self.ok else 'FAIL'}: {self.l2.inputs} input(s), tolerance {self.l2.tol:g} (abs)"
        if failed:
            text = f"{head}; failed: {', '.join(failed)}"
            if self.overflowed and not self.allow_overflow:
                text += (". Overflow means the capacity could not hold what the method keeps: calibrate on such "
                         "images (staticprune calibrate) or raise the capacity; --allow-overflow accepts it")
            return text
        text = f"{head}; L2 ok, L1 {'ok' if self.l1 is not None else 'n/a'}"
        if self.overflowed:
            text += f", capacity overflow allowed ({over})"
        elif self.overflow:
            text += ", no capacity overflow"
        return text


# --------------------------------------------------------------------------------------------- formatting helpers


def _l2_name(o: OutputDiff) -> str:
    return "overflow (graph vs PyTorch)" if o.name == "overflow" else o.name


def _l2_value(o: OutputDiff) -> str:
    if o.mismatches < 0:
        return "missing or shaped differently"
    if o.dtype.startswith("float"):
        return f"max abs {o.max_abs:.2e} (tol {o.tol:g})"
    text = f"{o.mismatches} differ"
    if o.agreement is not None and o.name == "labels":
        text += f", agreement {100 * o.agreement:.3f}%"
    if o.min_margin is not None and is_decision(o.name):
        text += f", closest margin {o.min_margin:.2e}"
    if o.min_flip_margin is not None:
        text += f", flips at margins >= {o.min_flip_margin:.2e}"
    return text


def _l2_verdict(o: OutputDiff) -> str:
    if not o.comparable:
        return "not comparable: an upstream decision flipped at a near-tie"
    if o.ok:
        return "ok"
    return "FAIL" if o.dtype.startswith("float") or o.breaches <= 0 else f"FAIL ({o.breaches} flips above margin)"


def _l1_rows(l1: L1Report) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for p in l1.points:
        compared = f"{p.images}/{l1.images} image(s)"
        value = f"{p.equal}/{p.images} equal" if p.images else "not compared"
        if p.near_tie:
            value += f", {p.near_tie} near-tie flip(s) (margins >= {p.min_flip_margin:.2e})"
        if p.min_margin is not None and p.min_margin < NO_MARGIN / 2:  # NO_MARGIN: nothing was decided there
            value += f", closest margin {p.min_margin:.2e}"
        skipped = []
        if p.skipped_overflow:
            skipped.append(f"{p.skipped_overflow} skipped: capacity overflow")
        if p.skipped_downstream:
            skipped.append(f"{p.skipped_downstream} skipped: after a flip")
        if skipped:
            value += " (" + ", ".join(skipped) + ")"
        verdict = "ok" if p.images else "n/a"
        if not p.ok:
            verdict = f"FAIL ({p.breach} image(s) flip above margin {l1.margin_eps:g}: {', '.join(p.breach_images)})"
        rows.append(("L1", f"decision_{p.point}", compared, value, verdict))
    if l1.logits_images:
        value = f"max abs {l1.logits_max_abs:.2e} (tol {l1.tol:g})"
    else:
        value = "not compared (every image flipped or overflowed)"
    verdict = ("ok" if l1.logits_images else "n/a") if not l1.logits_failed else f"FAIL ({', '.join(l1.logits_failed)})"
    rows.append(("L1", "logits", f"{l1.logits_images}/{l1.images} image(s)", value, verdict))
    return rows


# --------------------------------------------------------------------------------------------- running L1 + overflow


def image_labels(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> list[list[tuple[int, str]]]:
    """Per input, the (batch item, label) pairs to report: one per distinct image (an input file expanded to the
    batch is one image)."""
    out = []
    for name, x in zip(names, inputs):
        if x.shape[0] == 1 or all(torch.equal(x[0], x[b]) for b in range(1, x.shape[0])):
            out.append([(0, name)])
        else:
            out.append([(b, f"{name} [batch item {b}]") for b in range(x.shape[0])])
    return out


def l1_and_overflow(model, reference, options: dict, inputs: Sequence[torch.Tensor], names: Sequence[str],
                    graph_overflow: list[list[int]], tol: float, margin_eps: float,
                    method: str) -> tuple[Optional[L1Report], list[ImageOverflow]]:
    """Run the static module (built with expose_decisions=True, normalised inputs) and the eager reference on
    every input. `graph_overflow`: the graph's overflow output per input (VerifyReport.graph_overflow)."""
    import time

    t0 = time.perf_counter()
    labels = image_labels(names, inputs)
    l1 = L1Report(method, tol=tol, margin_eps=margin_eps) if reference is not None else None
    summaries: dict[str, PointSummary] = {}
    worst: Optional[float] = None
    overflow: list[ImageOverflow] = []
    for i, x in enumerate(inputs):
        static, per_point, order = run_with_point_overflow(model, x)
        if graph_overflow:
            for b, label in labels[i]:
                points = {p: int(v[b]) for p, v in per_point.items()}
                total = graph_overflow[i][b]
                overflow.append(ImageOverflow(label, total, points, sum(points.values()) == total))
        if reference is None:
            continue
        with torch.no_grad():
            ref = reference.reference_forward(model, x, options)
        per_image: list[ImageL1] = l1_images(static, ref, per_point, order, tol, margin_eps)
        for b, label in labels[i]:
            result = per_image[b]
            l1.images += 1
            for row in result.points:
                _add(summaries.setdefault(row.point, PointSummary(row.point)), row, label)
            if result.logits_max_abs is not None:
                l1.logits_images += 1
                worst = result.logits_max_abs if worst is None else max(worst, result.logits_max_abs)
            if not result.logits_ok:
                l1.logits_failed.append(label)
    if l1 is not None:
        l1.points = list(summaries.values())
        l1.logits_max_abs = worst
        l1.seconds = time.perf_counter() - t0
    return l1, overflow


def _add(summary: PointSummary, row: PointL1, label: str) -> None:
    if row.status == "overflow":
        summary.skipped_overflow += 1
        return
    if row.status == "downstream":
        summary.skipped_downstream += 1
        return
    summary.images += 1
    summary.flips += max(row.flips, 0)
    if row.min_margin is not None:
        summary.min_margin = row.min_margin if summary.min_margin is None else min(summary.min_margin, row.min_margin)
    if row.status == "equal":
        summary.equal += 1
    elif row.status == "near-tie":
        summary.near_tie += 1
    else:
        summary.breach += 1
        summary.breach_images.append(label)
    if row.min_flip_margin is not None:
        summary.min_flip_margin = (row.min_flip_margin if summary.min_flip_margin is None
                                   else min(summary.min_flip_margin, row.min_flip_margin))
