"""Pictures of token partitions: merged regions outlined, optional per-patch colouring (e.g. exit stage)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

PATCH = 16
STAGE_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def denormalise(img: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    x = img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def partition_picture(
    rgb: np.ndarray, owner: np.ndarray, grid: tuple[int, int], caption: str, labels: Optional[np.ndarray] = None
) -> Image.Image:
    """Outline every group of patches that share an owner; tint patches by `labels` when given."""
    gh, gw = grid
    owner = owner.reshape(gh, gw)
    img = Image.fromarray(rgb).convert("RGB")
    if labels is not None:
        tint = Image.new("RGB", img.size)
        draw_tint = ImageDraw.Draw(tint)
        for idx, lab in enumerate(labels.reshape(-1)):
            r, c = divmod(idx, gw)
            draw_tint.rectangle([c * PATCH, r * PATCH, (c + 1) * PATCH - 1, (r + 1) * PATCH - 1],
                                fill=STAGE_COLOURS[int(lab) % len(STAGE_COLOURS)])
        img = Image.blend(img, tint, 0.35)
    draw = ImageDraw.Draw(img)
    line = (255, 255, 0)
    for r in range(gh):
        for c in range(gw):
            x0, y0 = c * PATCH, r * PATCH
            if c + 1 < gw and owner[r, c] != owner[r, c + 1]:
                draw.line([(x0 + PATCH, y0), (x0 + PATCH, y0 + PATCH)], fill=line)
            if r + 1 < gh and owner[r, c] != owner[r + 1, c]:
                draw.line([(x0, y0 + PATCH), (x0 + PATCH, y0 + PATCH)], fill=line)
    banner = Image.new("RGB", (img.width, 18), (0, 0, 0))
    ImageDraw.Draw(banner).text((4, 3), caption, fill=(255, 255, 255))
    out = Image.new("RGB", (img.width, img.height + banner.height))
    out.paste(banner, (0, 0))
    out.paste(img, (0, banner.height))
    return out
