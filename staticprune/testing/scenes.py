"""Labelled colour scenes and an *analytic* Segmenter that segments them without training.

Scenes: each class has one flat colour, a corner of the RGB cube (0 or 255 per channel: 8 classes), drawn as
rectangles and ellipses over a background class, with edges anywhere (not on the 16-pixel patch grid). An optional
rectangle of each label map is marked "ignore" (the image keeps its colour there).

Analytic model (`analytic_segmenter`, segmenter-vit-{t,s,b,l}-linear): weights set by hand so that it classifies
every patch by its mean colour:

* patch embedding: features 0..2 = the patch's mean normalised colour c (in [-1, 1]^3), features 3..5 = -c, all
  others 0; positional table and CLS token 0;
* every block an identity on the residual stream (attention output projection and MLP fc2 zeroed), so the
  tokens reach the final LayerNorm unchanged; that norm (weight 1, bias 0) divides them by
  sigma(c) = sqrt(2 |c|^2 / D + eps) (their mean is 0);
* linear decoder: score_k = GAIN * 2 * (p_k . c) / sigma(c), p_k the class colour in {-1, 1}^3; all corners have
  the same norm, so the highest score is the nearest class colour. Then Segmenter's x16 bilinear upsampling.

A patch inside one region gets its class exactly; a patch across an edge gets the class nearest its mean colour,
and pixels near edges follow the bilinear interpolation of the patch scores: mIoU is high but below 100 %,
deterministic, and computable in closed form (`analytic_logits`). Tokens of one region are identical, so merging
methods (ToMe, ALGM, G2TM, ...) merge them losslessly and reduce a lot; edge patches are where reduction costs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

NUM_CLASSES = 8
GAIN = 0.1  # decoder scale: logits of a few units
IGNORE = 255
# class k -> RGB corner: bit 0 red, bit 1 green, bit 2 blue (class 0 black, class 7 white)
PALETTE = np.array([[255 * ((k >> b) & 1) for b in range(3)] for k in range(NUM_CLASSES)], dtype=np.uint8)
LAYOUTS = ("pairs", "cityscapes", "ade20k")


def class_directions() -> np.ndarray:
    """(K, 3) class colours normalised as the model sees them (ViT mean = std = 0.5): entries -1 or +1."""
    return PALETTE.astype(np.float64) / 127.5 - 1.0


def scene_label(rng: np.random.Generator, height: int, width: int, shapes: int = 4) -> np.ndarray:
    """(H, W) uint8 label map: a background class and `shapes` rectangles / ellipses."""
    label = np.full((height, width), rng.integers(NUM_CLASSES), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    for _ in range(shapes):
        cls = rng.integers(NUM_CLASSES)
        if rng.random() < 0.6:  # rectangle, edges at any pixel
            h, w = rng.uniform(0.2, 0.6) * height, rng.uniform(0.2, 0.6) * width
            y0, x0 = rng.uniform(-0.1, 0.9) * height, rng.uniform(-0.1, 0.9) * width
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        else:  # ellipse
            cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
            ry, rx = rng.uniform(0.1, 0.35) * height, rng.uniform(0.1, 0.35) * width
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        label[mask] = cls
    return label


def ignore_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) bool: one small box of pixels whose ground truth is 'ignore'."""
    mask = np.zeros((height, width), dtype=bool)
    h, w = max(2, height // 8), max(2, width // 8)
    y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    mask[y0 : y0 + h, x0 : x0 + w] = True
    return mask


def render(label: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image: every pixel its class colour."""
    return PALETTE[label]


def make_scenes(count: int, height: int, width: int, seed: int = 0, ignore_box: bool = True,
                shapes: int = 4) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`count` (name, image (H, W, 3) uint8, ground truth (H, W) uint8 with IGNORE) triples."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        label = scene_label(rng, height, width, shapes)
        image = render(label)
        truth = label.copy()
        if ignore_box:
            truth[ignore_mask(rng, height, width)] = IGNORE
        out.append((f"scene{i:04d}", image, truth))
    return out


def write_dataset(root: str | os.PathLike, layout: str, scenes: list[tuple[str, np.ndarray, np.ndarray]],
                  split: Optional[str] = None) -> Path:
    """Write scenes in one of the layouts `staticprune evaluate` reads; returns the root.

    pairs: ROOT/images/NAME.png + ROOT/labels/NAME.png (ignore 255);
    cityscapes: ROOT/leftImg8bit/SPLIT/city/NAME_leftImg8bit.png + ROOT/gtFine/SPLIT/city/NAME_gtFine_labelTrainIds.png
    (ignore 255; default split val); ade20k: ROOT/images/SPLIT/NAME.png + ROOT/annotations/SPLIT/NAME.png with the
    class ids shifted by one and 0 = ignore, as ADEChallengeData2016 stores them (default split validation; PNG
    images, which evaluate reads as it reads the dataset's JPEGs)."""
    from PIL import Image

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    root = Path(root)
    for name, image, truth in scenes:
        if layout == "pairs":
            img_path, lbl_path, stored = root / "images" / f"{name}.png", root / "labels" / f"{name}.png", truth
        elif layout == "cityscapes":
            s = split or "val"
            img_path = root / "leftImg8bit" / s / "city" / f"{name}_leftImg8bit.png"
            lbl_path = root / "gtFine" / s / "city" / f"{name}_gtFine_labelTrainIds.png"
            stored = truth
        else:
            s = split or "validation"
            img_path, lbl_path = root / "images" / s / f"{name}.png", root / "annotations" / s / f"{name}.png"
            stored = np.where(truth == IGNORE, 0, truth.astype(np.int64) + 1).astype(np.uint8)
        img_path.parent.mkdir(parents=True, exist_ok=True)
        lbl_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(img_path, compress_level=1)
        Image.fromarray(stored).save(lbl_path, compress_level=1)
    return root


# --------------------------------------------------------------------------------------------- analytic model


def analytic_segmenter(model: str = "segmenter-vit-t-linear", size: tuple[int, int] = (64, 64)):
    """A segmenter-vit-*-linear model whose hand-set weights classify each patch by its mean colour (see the
    module docstring); NUM_CLASSES classes, ViT normalisation (mean = std = 0.5)."""
    import torch

    from staticprune.models import build_model

    net = build_model(model, size, num_classes=NUM_CLASSES)
    if net.spec.decoder != "linear" or net.spec.family != "segmenter" or net.spec.vit.distilled:
        raise ValueError(f"the analytic weights need a segmenter-vit-*-linear model (got {model})")
    if tuple(net.spec.mean) != (0.5, 0.5, 0.5) or tuple(net.spec.std) != (0.5, 0.5, 0.5):
        raise ValueError(f"the analytic weights assume mean = std = 0.5 normalisation ({model} differs)")
    backbone, dim = net.backbone, net.spec.vit.dim
    directions = torch.tensor(class_directions(), dtype=torch.float32)  # (K, 3)
    with torch.no_grad():
        weight = torch.zeros_like(backbone.patch_embed.proj.weight)  # (D, 3, 16, 16)
        pixels = weight.shape[-1] * weight.shape[-2]
        for ch in range(3):
            weight[ch, ch] = 1.0 / pixels  # + mean colour
            weight[3 + ch, ch] = -1.0 / pixels  # - mean colour: the features' mean over D stays 0
        backbone.patch_embed.proj.weight.copy_(weight)
        backbone.patch_embed.proj.bias.zero_()
        backbone.pos_embed.zero_()
        backbone.cls_token.zero_()
        for block in backbone.blocks:
            for linear in (block.attn.proj, block.mlp.fc2):  # residual identity
                linear.weight.zero_()
                linear.bias.zero_()
        backbone.norm.weight.fill_(1.0)
        backbone.norm.bias.zero_()
        head = torch.zeros(NUM_CLASSES, dim)
        head[:, 0:3] = GAIN * directions
        head[:, 3:6] = -GAIN * directions
        net.decoder.head.weight.copy_(head)
        net.decoder.head.bias.zero_()
    return net.eval()


def save_analytic_checkpoint(path: str | os.PathLike, model: str = "segmenter-vit-t-linear") -> Path:
    """The analytic weights as a staticprune (native) state dict, for `--weights PATH --model MODEL`.

    The positional table is all zeros, so the checkpoint fits any --size (the table is resized on load)."""
    import io

    import torch

    from staticprune.fileio import write_bytes_atomic

    buffer = io.BytesIO()
    torch.save(analytic_segmenter(model, (64, 64)).state_dict(), buffer)
    write_bytes_atomic(buffer.getvalue(), path)
    return Path(path)


def analytic_logits(image: np.ndarray, eps: float = 1e-5, dim: int = 192):
    """Closed-form logits (K, H, W) of the analytic model on one image whose sides are multiples of 16, computed
    without the ViT: patch-mean colour -> scores -> x16 bilinear upsampling (align_corners False)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    mean = F.avg_pool2d(x, 16)  # (1, 3, gh, gw)
    sigma = torch.sqrt(2.0 * (mean * mean).sum(1, keepdim=True) / dim + eps)
    directions = torch.tensor(class_directions(), dtype=torch.float32)
    scores = 2.0 * GAIN * torch.einsum("kc,bchw->bkhw", directions, mean) / sigma
    return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)[0]


def main(argv: Optional[list[str]] = None) -> int:
    """python -m staticprune.testing.scenes --root DIR [--layout L] [--count N] [--size HxW] [--split S]
    [--seed S] [--checkpoint PATH --model NAME]: write a generated dataset (and the analytic checkpoint)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m staticprune.testing.scenes", description=main.__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--layout", choices=LAYOUTS, default="ade20k")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--size", default="512x683", help="HxW of every scene")
    p.add_argument("--split", default=None, help="cityscapes / ade20k split folder (default val / validation)")
    p.add_argument("--shapes", type=int, default=6, help="rectangles and ellipses per scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="also write the analytic weights (native state dict) here")
    p.add_argument("--model", default="segmenter-vit-t-linear", help="model of --checkpoint (segmenter-vit-*-linear)")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    root = write_dataset(args.root, args.layout, make_scenes(args.count, h, w, args.seed, shapes=args.shapes),
                         args.split)
    print(f"wrote {args.count} {h}x{w} scenes ({NUM_CLASSES} classes) to {root} ({args.layout} layout)")
    if args.checkpoint:
        save_analytic_checkpoint(args.checkpoint, args.model)
        print(f"wrote the analytic {args.model} weights to {args.checkpoint} ({NUM_CLASSES} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
