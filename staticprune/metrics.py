"""Semantic segmentation metrics from a confusion matrix, as mmseg (and so Segmenter's evaluation) computes them.

The confusion matrix counts every pixel whose ground truth is not the ignore index: rows are ground-truth
classes, columns predicted classes. A prediction outside 0..K-1 (a graph's label for a class the metric does not
know) counts as a miss of the ground-truth class and is not in any column.

* IoU of class c = TP / (TP + FP + FN) = conf[c, c] / (row_c + col_c - conf[c, c]);
* mIoU = mean IoU over the classes *present*: classes whose union (row_c + col_c - conf[c, c]) is > 0, i.e. that
  occur in the ground truth or in the predictions. A class absent from both has IoU 0 / 0 and is left out
  (mmseg's `nanmean` over per-class IoU); a class only predicted (FP, no ground truth) counts with IoU 0;
* pixel accuracy (mmseg's aAcc) = trace / total; mean accuracy = mean over classes with ground truth of
  conf[c, c] / row_c (mmseg's mAcc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class SegmentationScores:
    miou: float  # mean IoU over the classes present (union > 0), in [0, 1]
    pixel_accuracy: float
    mean_accuracy: float
    iou: list[Optional[float]]  # per class; None where the class is absent from ground truth and predictions
    classes_present: int
    pixels: int  # pixels counted (ground truth not ignored)

    def to_dict(self) -> dict:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "mean_accuracy": self.mean_accuracy,
                "iou": self.iou, "classes_present": self.classes_present, "pixels": self.pixels}


class ConfusionMatrix:
    """(K, K) int64 counts, accumulated image by image."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        # counted pixels whose prediction is outside 0..K-1, per ground-truth class: misses of that class
        self.missed_per_class = np.zeros(num_classes, dtype=np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image (or a batch): integer arrays of the same shape."""
        prediction, truth = np.asarray(prediction), np.asarray(truth)
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
        k = self.num_classes
        truth = truth.astype(np.int64).ravel()
        prediction = prediction.astype(np.int64).ravel()
        ignored = truth == self.ignore_index if self.ignore_index is not None else np.zeros(truth.shape, bool)
        in_range = (truth >= 0) & (truth < k)
        if (~in_range & ~ignored).any():
            bad = int(truth[~in_range & ~ignored][0])
            raise ValueError(f"ground-truth class {bad} is outside 0..{k - 1} and is not the ignore index "
                             f"{self.ignore_index}")
        counted = in_range & ~ignored
        inside = counted & (prediction >= 0) & (prediction < k)
        self.missed_per_class += np.bincount(truth[counted & ~inside], minlength=k)
        self.matrix += np.bincount(truth[inside] * k + prediction[inside], minlength=k * k).reshape(k, k)

    def row_totals(self) -> np.ndarray:
        """Ground-truth pixels per class (predictions outside 0..K-1 included, as misses)."""
        return self.matrix.sum(1) + self.missed_per_class

    def scores(self) -> SegmentationScores:
        return scores_from_confusion(self.matrix, self.row_totals())


def scores_from_confusion(matrix: np.ndarray, row_totals: Optional[np.ndarray] = None) -> SegmentationScores:
    """mIoU over classes present, per-class IoU, pixel and mean accuracy of a (K, K) confusion matrix.

    `row_totals` (ground-truth pixels per class) defaults to the row sums; it is larger when some predictions
    fell outside the matrix's classes (they are misses)."""
    m = np.asarray(matrix, dtype=np.int64)
    tp = np.diag(m).astype(np.float64)
    rows = (m.sum(1) if row_totals is None else np.asarray(row_totals)).astype(np.float64)
    cols = m.sum(0).astype(np.float64)
    union = rows + cols - tp
    present = union > 0
    iou = np.where(present, tp / np.where(present, union, 1.0), np.nan)
    total = rows.sum()
    with_truth = rows > 0
    return SegmentationScores(
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        mean_accuracy=float((tp[with_truth] / rows[with_truth]).mean()) if with_truth.any() else float("nan"),
        iou=[None if np.isnan(v) else float(v) for v in iou],
        classes_present=int(present.sum()),
        pixels=int(total),
    )
