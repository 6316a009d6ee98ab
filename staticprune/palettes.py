"""Class colour palettes and overlays for label maps (numpy only: runs where there is no PyTorch).

Named palettes: `cityscapes` (the 19 train-id colours of the Cityscapes benchmark), `ade20k` (the 150 colours
used by the ADE20K scene-parsing tools), `auto` (cityscapes for up to 19 classes, ade20k up to 150, a generated
palette beyond). A palette file has one colour per line, class 0 first: `r g b` (0..255, separated by spaces,
tabs or commas) or a hex colour `#rrggbb` / `rrggbb`; blank lines, and lines starting with `# ` (hash + space) or
`//`, are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

PALETTE_NAMES = ("auto", "cityscapes", "ade20k")

# Train ids 0..18: road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain,
# sky, person, rider, car, truck, bus, train, motorcycle, bicycle.
_CITYSCAPES_HEX = (
    "804080 f423e8 464646 66669c be9999 999999 faaa1e dcdc00 6b8e23 98fb98 "
    "4682b4 dc143c ff0000 00008e 000046 003c64 005064 0000e6 770b20"
)

_ADE20K_HEX = (
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 "
    "e005ff ebff07 96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 "
    "0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff "
    "08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 "
    "ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f "
    "14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff "
    "0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 "
    "008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff "
    "ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 "
    "00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 "
    "8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff "
    "00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 "
    "ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 "
    "00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff "
    "4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff"
)


def _from_hex(text: str) -> np.ndarray:
    return np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in text.split()], dtype=np.uint8)


CITYSCAPES = _from_hex(_CITYSCAPES_HEX)  # (19, 3) uint8
ADE20K = _from_hex(_ADE20K_HEX)  # (150, 3) uint8


def generated_palette(count: int) -> np.ndarray:
    """(count, 3) uint8 distinct colours: the bits of the class id spread over R, G and B from the most significant
    bit down (the Pascal VOC scheme), so neighbouring ids differ strongly; unique for ids below 2**24."""
    ids = np.arange(count, dtype=np.int64)
    out = np.zeros((count, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            out[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return out.astype(np.uint8)


_HEX = re.compile(r"#?([0-9a-fA-F]{6})")
_RGB = re.compile(r"(\d{1,3})[\s,]+(\d{1,3})[\s,]+(\d{1,3})")


def parse_palette(text: str, name: str = "palette") -> np.ndarray:
    """Colours of a palette file's text, (N, 3) uint8. Raises ValueError naming the first bad line."""
    colours: list[tuple[int, int, int]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line == "#" or line.startswith("# ") or line.startswith("#\t") or line.startswith("//"):
            continue
        hex_match, rgb_match = _HEX.fullmatch(line), _RGB.fullmatch(line)
        if hex_match:
            h = hex_match.group(1)
            colours.append((int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)))
        elif rgb_match and all(int(v) <= 255 for v in rgb_match.groups()):
            r, g, b = (int(v) for v in rgb_match.groups())
            colours.append((r, g, b))
        else:
            shown = line if len(line) <= 40 else line[:37] + "..."
            raise ValueError(f"{name} line {number}: '{shown}' is not a colour; write 'r g b' (0..255) or a hex "
                             "colour like #ff8800, one per line")
    if not colours:
        raise ValueError(f"{name} has no colours; write one 'r g b' or #rrggbb line per class")
    return np.array(colours, dtype=np.uint8)


def resolve_palette(spec: str, num_classes: int) -> np.ndarray:
    """The palette for `num_classes` classes: a name of PALETTE_NAMES or a palette file. Raises ValueError (one
    line) for an unreadable or malformed file, or a palette with fewer colours than classes."""
    if spec == "auto":
        if num_classes <= len(CITYSCAPES):
            return CITYSCAPES[:num_classes].copy()
        if num_classes <= len(ADE20K):
            return ADE20K[:num_classes].copy()
        return generated_palette(num_classes)
    if spec in ("cityscapes", "ade20k"):
        colours, label = (CITYSCAPES if spec == "cityscapes" else ADE20K), f"palette '{spec}'"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"palette '{spec}' is neither {', '.join(PALETTE_NAMES)} nor an existing file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"palette file '{spec}' is not a readable text file ({exc.__class__.__name__})") from None
        colours, label = parse_palette(text, f"palette file '{spec}'"), f"palette file '{spec}'"
    if len(colours) < num_classes:
        raise ValueError(f"{label} has {len(colours)} colours but the graph has {num_classes} classes; give one "
                         "colour per class (or --palette auto)")
    return colours[:num_classes].copy()


def colourise(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours. Ids beyond the palette raise IndexError (a bug upstream)."""
    return palette[labels]


def overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8 image blended with the class colours: (1 - alpha) x image + alpha x colour, rounded."""
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image {rgb.shape[:2]} and labels {labels.shape} differ in size")
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colourise(labels, palette).astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
