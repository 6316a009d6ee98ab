"""L1 parity: the static module against the eager reference (DESIGN §5).

Within capacity the static graph must take exactly the reference's decisions at every reduction point and give
the same outputs up to float rounding. Decisions are compared in the method's capacity-independent encoding
(`decision_<point>` of the static module vs `ReferenceOutput.decisions[point]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
