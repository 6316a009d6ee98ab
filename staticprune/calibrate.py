"""Calibration: run the eager reference over images, measure kept tokens per reduction point, pick capacities.

Capacity rule (nearest rank): with n images and quantile q, each capacity is the smallest measured count that
holds ceil(q * n) of the n images at that point. Fewer than 1 / (1 - q) images cannot tell the q quantile from the
largest count, so the capacity is then the largest count seen (`capacity_rule` says so): never an interpolated
value below what the requested share of these images needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

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
    for _, img in calibration_items(model, images, count, seed):
        yield img


def calibration_names(images: Optional[str], count: int) -> list[str]:
    """What calibration_items will yield, by name: file names, or "generated #i"."""
    if images:
        files = list_images(images)
        return [p.name for p in (files[:count] if count else files)]
    return [f"generated #{i + 1}" for i in range(count)]


def calibration_items(model: SegmentationModel, images: Optional[str], count: int,
                      seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, image) pairs, loaded one at a time: the first `count` files of `images` (0 = all), or `count`
    generated inputs."""
    spec = get_spec(model.spec.name)
    if images:
        files = list_images(images)
        for path in files[:count] if count else files:
            yield path.name, load_input(path, model.image_size, spec.mean, spec.std)[:1]
    else:
        for i, img in enumerate(generated_inputs((1, 3, *model.image_size), count, seed=seed)):
            yield f"generated #{i + 1}", img


@dataclass
class CapacityRule:
    """How a requested quantile maps onto n measured images (see the module docstring)."""

    requested: float
    images: int
    held: int  # images each capacity holds: ceil(requested * images)
    quantile: float  # what to pass to calibrated_options: numpy's linear quantile then lands on that order statistic

    @property
    def is_max(self) -> bool:
        return self.held == self.images and self.requested < 1.0

    def describe(self) -> str:
        text = (f"capacities hold {self.held} of {self.images} image(s) at every point (quantile {self.requested:g}, "
                "nearest rank)")
        if self.is_max:
            text += (f": the largest count seen, as {self.images} image(s) cannot resolve quantile {self.requested:g} "
                     f"(that needs >= {math.ceil(1 / (1 - self.requested) - 1e-9)})")
        return text

    def to_dict(self) -> dict:
        return {"quantile": self.requested, "images": self.images, "images_held": self.held,
                "largest_count": self.is_max}


def capacity_rule(quantile: float, images: int) -> CapacityRule:
    """The nearest-rank rule for `images` measured images (ValueError for a quantile outside (0, 1])."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"--quantile must be in (0, 1] (got {quantile})")
    if images < 1:
        raise ValueError("no images to calibrate on")
    held = min(images, max(1, math.ceil(quantile * images - 1e-9)))
    linear = 1.0 if images == 1 else (held - 1) / (images - 1)
    return CapacityRule(quantile, images, held, linear)


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


def calibrate(model: SegmentationModel, method: str, options: dict[str, Any], inputs: Iterable[torch.Tensor],
              progress: Optional[Callable[[int, dict[str, list[int]]], None]] = None) -> Calibration:
    """Kept tokens per reduction point over `inputs`; `progress(i, kept_of_this_input)` after each input."""
    ref = reference_module(method)
    cal = Calibration(method)
    with torch.no_grad():
        for i, img in enumerate(inputs):
            out = ref.reference_forward(model, img, options)
            for point, counts in out.kept.items():
                cal.kept.setdefault(point, []).extend(int(c) for c in counts)
            cal.images += img.shape[0]
            if progress is not None:
                progress(i, {p: [int(c) for c in counts] for p, counts in out.kept.items()})
    return cal

