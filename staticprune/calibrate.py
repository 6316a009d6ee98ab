"""Calibration: run the eager reference over images, measure kept tokens per reduction point, pick capacities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from staticprune.imageio import load_input
from staticprune.methods import quantile_capacity  # noqa: F401  (re-exported: it lives with the methods)
from staticprune.models import SegmentationModel, get_spec
from staticprune.reference import reference_module
from staticprune.verify.parity import generated_inputs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".npy"}


def list_images(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"--images '{d}' is not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images '{d}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def calibration_inputs(model: SegmentationModel, images: Optional[str], count: int, seed: int) -> Iterable[torch.Tensor]:
    spec = get_spec(model.spec.name)
    if images:
        for path in list_images(images)[:count] if count else list_images(images):
            yield load_input(path, model.image_size, spec.mean, spec.std)[:1]
    else:
        yield from generated_inputs((1, 3, *model.image_size), count, seed=seed)


@dataclass
class Calibration:
    method: str
    kept: dict[str, list[int]] = field(default_factory=dict)
    images: int = 0

    def stats(self) -> dict[str, dict[str, float]]:
        out = {}
        for point, counts in self.kept.items():
            arr = np.asarray(counts, dtype=np.float64)
            out[point] = {"n": int(arr.size), "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
                          "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}
        return out


def calibrate(model: SegmentationModel, method: str, options: dict[str, Any], inputs: Iterable[torch.Tensor]) -> Calibration:
    ref = reference_module(method)
    cal = Calibration(method)
    with torch.no_grad():
        for img in inputs:
            out = ref.reference_forward(model, img, options)
            for point, counts in out.kept.items():
                cal.kept.setdefault(point, []).extend(int(c) for c in counts)
            cal.images += img.shape[0]
    return cal

