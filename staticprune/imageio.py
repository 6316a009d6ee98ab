"""Reading images (and .npy tensors) into normalised model inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def load_input(
    path: str | Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], raw: bool = False
) -> torch.Tensor:
    """An image file (resized bilinearly to `size`, normalised; 0..255 if `raw`) or a .npy array (B|-, 3, H, W)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input '{p}' does not exist or is not a file")
    if p.suffix == ".npy":
        try:
            arr = np.load(p)
        except Exception as exc:  # numpy raises several types for corrupt files
            raise ValueError(f"input '{p}' is not a readable .npy array ({exc.__class__.__name__})") from None
        t = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        t = t[None] if t.dim() == 3 else t
        if t.dim() != 4 or t.shape[1] != 3 or tuple(t.shape[2:]) != tuple(size):
            raise ValueError(f"input '{p}' has shape {tuple(arr.shape)}; expected (B, 3, {size[0]}, {size[1]})")
        return t
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(p).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"input '{p}' is not a readable image (png, jpg, ...) or .npy file") from None
    img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    t = torch.from_numpy(arr).permute(2, 0, 1)
    if not raw:
        t = (t / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return t[None].contiguous()
