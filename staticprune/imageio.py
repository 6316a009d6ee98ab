"""Reading images (and .npy tensors) into normalised model inputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import PIL.Image
    import torch


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(img: "PIL.Image.Image") -> "PIL.Image.Image":
    """An 8-bit RGB image. 16-bit images (PNG grayscale opens as mode I;16, some as 32-bit I) are scaled to
    8 bits (x / 257): Pillow's convert("RGB") clips them instead, which turns almost every pixel white."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and values.size and values.max() <= 255 and values.min() >= 0:
            scaled = values  # a 32-bit image holding 8-bit values
        else:
            scaled = np.clip(values, 0, 65535) / 257.0
        img = Image.fromarray(np.round(scaled).astype(np.uint8))  # 2-D uint8: mode L
    return img.convert("RGB")


def as_displayed(img: "PIL.Image.Image") -> "PIL.Image.Image":
    """8-bit RGB as the image is displayed: EXIF orientation applied (a phone photo stored sideways), then
    `to_rgb8`. Every reader of photos (predict, verify, calibrate) goes through it, so they all see one image."""
    from PIL import ImageOps

    return to_rgb8(ImageOps.exif_transpose(img))


def _read(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """(array, is_image): a .npy array as (B, 3, H, W) float32, or an image resized to `size` as (H, W, 3) float32."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input '{p}' does not exist or is not a file")
    if p.suffix == ".npy":
        try:
            arr = np.load(p)
        except Exception as exc:  # numpy raises several types for corrupt files
            raise ValueError(f"input '{p}' is not a readable .npy array ({exc.__class__.__name__})") from None
        a = np.asarray(arr, dtype=np.float32)
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[1] != 3 or tuple(a.shape[2:]) != tuple(size):
            raise ValueError(f"input '{p}' has shape {tuple(arr.shape)}; expected (B, 3, {size[0]}, {size[1]})")
        return a, False
    from PIL import Image, UnidentifiedImageError

    try:
        img = as_displayed(Image.open(p))
    except Image.DecompressionBombError as exc:  # a small file may claim billions of pixels
        numbers = re.findall(r"\d+", str(exc))
        detail = (f"{numbers[0]} pixels, over Pillow's decompression-bomb limit of {numbers[1]}" if len(numbers) >= 2
                  else str(exc).rstrip("."))
        raise ValueError(f"input '{p}' is too large to decode safely ({detail}); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # SyntaxError: Pillow's broken-file error
        raise ValueError(f"input '{p}' is not a readable image (png, jpg, ...) or .npy file") from None
    img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32), True


def load_input(
    path: str | Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], raw: bool = False
) -> "torch.Tensor":
    """An image file (resized bilinearly to `size`, normalised; 0..255 if `raw`) or a .npy array (B|-, 3, H, W)."""
    import torch

    arr, is_image = _read(path, size)
    if not is_image:
        return torch.from_numpy(arr)
    t = torch.from_numpy(arr).permute(2, 0, 1)
    if not raw:
        t = (t / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return t[None].contiguous()


def load_input_array(
    path: str | Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], raw: bool = False
) -> np.ndarray:
    """load_input without PyTorch (for the Jetson image): a (B, 3, H, W) float32 array."""
    arr, is_image = _read(path, size)
    if not is_image:
        return arr
    a = arr.transpose(2, 0, 1)
    if not raw:
        mean32, std32 = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
        a = (a / np.float32(255.0) - mean32) / std32
    return np.ascontiguousarray(a[None], dtype=np.float32)
