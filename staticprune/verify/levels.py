"""L1 parity: the static module against the eager reference.

Within capacity the static graph must take exactly the reference's decisions at every reduction point and give
the same outputs up to float rounding. Decisions are compared in the method's capacity-independent encoding
(`decision_<point>` of the static module vs `ReferenceOutput.decisions[point]`).

`l1_images` is the decision-aware form `staticprune verify` runs, image by image: a decision that differs where
the static module's `margin_<point>` is <= margin_eps is a near-tie (float rounding may resolve it either way)
and makes everything after it not comparable; one above the margin is a failure. An image whose capacity
overflowed at a point is not compared from that point on (the capacity fallback changed its decisions by
design); the overflow itself is reported by `run_with_point_overflow`, per reduction point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from staticprune.models import SegmentationModel
from staticprune.reference import ReferenceOutput


def condition_mask_decoder(model: SegmentationModel, seed: int = 7) -> SegmentationModel:
    """Redraw a Segmenter mask transformer's class embeddings at std 1 (in place; other decoders untouched).

    At their init std (0.02) the class vectors stay nearly identical through a random decoder, so its mask_norm
    (LayerNorm over classes) divides by a tiny spread and turns float rounding into ~1e-5 logit noise: even the
    unreduced model run on one image vs in a batch differs by ~9e-6. Trained class embeddings are distinct; L1
    measures the method, not that artifact of random weights."""
    if getattr(model.spec, "decoder", None) == "mask":
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            model.decoder.cls_emb.copy_(torch.randn(model.decoder.cls_emb.shape, generator=g))
    return model


def run_static(model: SegmentationModel, img: Tensor) -> dict[str, Tensor]:
    """All outputs of the static model, by graph output name."""
    with torch.no_grad():
        return dict(zip(model.output_names(), model(img)))


@dataclass
class L1Result:
    decisions_equal: bool
    mismatched_points: list[str] = field(default_factory=list)
    max_abs: float = 0.0
    overflow: int = 0
    tol: float = 1e-5

    @property
    def ok(self) -> bool:
        return self.decisions_equal and self.max_abs <= self.tol


def l1_compare(static: dict[str, Tensor], ref: ReferenceOutput, tol: float = 1e-5) -> L1Result:
    mismatched = []
    for point, decision in ref.decisions.items():
        mine = static.get(f"decision_{point}")
        if mine is None or mine.shape != decision.shape or not torch.equal(mine.to(decision.dtype), decision):
            mismatched.append(point)
    max_abs = float((static["logits"] - ref.logits).abs().max())
    overflow = int(static["overflow"].sum()) if "overflow" in static else 0
    return L1Result(not mismatched, mismatched, max_abs, overflow, tol)


# --------------------------------------------------------------------------------------------- per-point overflow

HOOKS = ("embed", "after_attention", "after_block")


def run_with_point_overflow(model: SegmentationModel, img: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                                                              list[str]]:
    """Run the static model once and split its `overflow` output by reduction point.

    Methods add each point's excess to one (B,) `overflow` total in the token state's extras (the graph output
    stays that one total). This wraps the method's hooks for one forward and attributes every increase of the
    total to the point whose `decision_<point>` the same hook call produced (build the module with
    expose_decisions=True); an increase without a decision output is named after the hook and block.
    Returns (outputs by name, point -> (B,) int overflow, points in network order)."""
    method = model.method
    per_point: dict[str, Tensor] = {}
    order: list[str] = []
    if method is None:
        return run_static(model, img), per_point, order
    originals = {name: getattr(method, name) for name in HOOKS if hasattr(method, name)}

    def wrap(name: str, hook):
        def wrapped(*args):
            before = {} if name == "embed" else dict(args[1].extras)  # (layer, state, ...) or (backbone, img)
            out = hook(*args)
            after = out.extras
            new_points = [k[len("decision_"):] for k, v in after.items()
                          if k.startswith("decision_") and before.get(k) is not v]
            if "overflow" in after:
                delta = after["overflow"] - before["overflow"] if "overflow" in before else after["overflow"]
                delta = delta.reshape(-1).to(torch.int64)
                if new_points or bool((delta != 0).any()):
                    point = new_points[0] if new_points else f"{name} of block {args[0] + 1 if name != 'embed' else 0}"
                    per_point[point] = per_point.get(point, torch.zeros_like(delta)) + delta
            for point in new_points:
                if point not in order:
                    order.append(point)
            return out

        return wrapped

    try:
        for name, hook in originals.items():
            setattr(method, name, wrap(name, hook))  # instance attribute: shadows the bound method for one run
        outputs = run_static(model, img)
    finally:
        for name in originals:
            delattr(method, name)
    order += [p for p in per_point if p not in order]
    return outputs, per_point, order


# --------------------------------------------------------------------------------------------- decision-aware L1


@dataclass
class PointL1:
    """One reduction point of one image: static decisions vs the reference's."""

    point: str
    status: str  # "equal" | "near-tie" (flips, all at margins <= eps) | "breach" | "overflow" | "downstream"
    flips: int = 0
    breaches: int = 0  # flips where the static margin exceeds margin_eps
    min_flip_margin: Optional[float] = None
    min_margin: Optional[float] = None  # closest any decision came to flipping


@dataclass
class ImageL1:
    points: list[PointL1]
    logits_max_abs: Optional[float]  # None: not comparable (a decision flipped at a near-tie, or overflow)
    logits_ok: bool = True


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def l1_images(static: dict[str, Tensor], ref: ReferenceOutput, overflow: dict[str, Tensor], order: list[str],
              tol: float, margin_eps: float) -> list[ImageL1]:
    """Decision-aware L1 of one batch, image by image (see the module docstring). `overflow`/`order`: from
    run_with_point_overflow on the same input."""
    known = [p for p in order if p in ref.decisions]
    points = known + sorted((p for p in ref.decisions if p not in known), key=_natural)
    batch = static["logits"].shape[0]
    images = []
    for b in range(batch):
        rows, stop = [], None  # stop: why later points (and the logits) are not compared
        for point in points:
            if stop is None and point in overflow and int(overflow[point][b]) > 0:
                stop = "overflow"
            if stop is not None:
                rows.append(PointL1(point, stop))
                continue
            mine, theirs = static.get(f"decision_{point}"), ref.decisions[point]
            if mine is None or mine.shape != theirs.shape:
                rows.append(PointL1(point, "breach", flips=-1, breaches=-1))
                stop = "downstream"
                continue
            margin = static.get(f"margin_{point}")
            margin_b = margin[b].abs().double() if margin is not None and margin.shape == mine.shape else None
            wrong = mine[b].to(torch.int64) != theirs[b].to(torch.int64)
            row = PointL1(point, "equal", flips=int(wrong.sum()))
            if margin_b is not None and margin_b.numel():
                row.min_margin = float(margin_b.min())
            if row.flips:
                flipped = margin_b[wrong] if margin_b is not None else None
                row.breaches = row.flips if flipped is None else int((flipped > margin_eps).sum())
                row.min_flip_margin = None if flipped is None else float(flipped.min())
                row.status = "breach" if row.breaches else "near-tie"
                stop = "downstream"  # later points see other tokens: a breach is reported where it happens
            rows.append(row)
        if stop is None:
            err = float((static["logits"][b].double() - ref.logits[b].double()).abs().max())
            images.append(ImageL1(rows, err, err <= tol))
        else:
            images.append(ImageL1(rows, None, bool(torch.isfinite(static["logits"][b]).all())))
    return images
