"""Train the class-agnostic CTS / dCTS policy network from image / label-map pairs (no pretrained weights needed).

Targets (CTS's ``policy_gt_gen`` rule, applied to every window size): a window is 1 if all its pixels carry one
label, 0 if it holds two or more labels; a window with one label plus ignore pixels (255) is ignored, an
all-ignore window counts as one class (1). Loss: cross-entropy per head (ignore 255), summed over window sizes.
AdamW with cosine decay, horizontal flips. The policy sees images normalised as the segmenter's input (mean/std,
default mean = std = 0.5, as the official policy).

Evaluation on a held-out split: the dCTS tiling at `eval_thresholds` (top-down nesting, as the default static
module) and its *merge precision* -- the fraction of merged windows that truly hold one class --, the token
reduction it achieves against the reduction an oracle tiling of the labels would give, per-size precision /
recall of ``S >= tau``, and CTS precision (top 10 % of 2x2 groups, the 30 % token budget).

`make_synthetic_dataset` writes scenes of uniformly coloured regions (rectangles, ellipses, half-planes over a
background, class colours from a palette, small per-region tint and pixel noise) with their label maps: a
generated set on which merge precision can be checked in CI.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from staticprune.models.policy import (
    STRIDE, PolicyConfig, PolicyNet, check_window_sizes, load_policy_checkpoint,
)
from staticprune.models.registry import VIT_MEAN, VIT_STD

IGNORE = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
PATCH = 16
# Channels-last convolutions train ~1.6x faster on CPU (oneDNN); weights are saved in the default layout.
CHANNELS_LAST = torch.channels_last
GRAD_CLIP = 5.0  # global gradient-norm clip; only early, large steps reach it
MIN_CROP = 96  # smallest training crop: 3x3 cells, so every crop holds a complete 4x4-patch window


@dataclass
class TrainConfig:
    epochs: int = 30
    size: int = 512  # square training resolution (images resized), a multiple of 32
    seed: int = 0
    width: float = 1.0  # EfficientNet-Lite0 channel multiplier (1.0 = the official layout; < 1 for quick runs)
    batch_size: int = 8
    lr: float = 1e-2
    weight_decay: float = 1e-3
    window_sizes: tuple[int, ...] = (2, 4, 8, 16)
    val_fraction: float = 0.2
    eval_thresholds: tuple[float, ...] = (0.6, 0.8, 0.9, 0.9)  # 2x2, 4x4, 8x8, 16x16 ([Poreba et al.]'s dCTS)
    flip: bool = True
    negative_weight: float = 5.0  # loss weight of "several classes" 2x2 windows, x s / 2 for s x s windows
    crop: int = 0  # train on random cell-aligned crops, side drawn per batch from 96..crop (step 32); 0 = whole images
    full_every: int = 4  # with crops: every n-th batch uses whole images (the only ones that train the largest heads)
    init: str = ""  # optional starting weights: a policy checkpoint or a timm efficientnet_lite0 state dict
    mean: tuple[float, float, float] = VIT_MEAN
    std: tuple[float, float, float] = VIT_STD


# --------------------------------------------------------------------------------------------- data


def find_pairs(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label) paths matched by file stem; the label map is a single-channel PNG of class ids."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not d.is_dir():
            raise ValueError(f"{what} directory '{d}' does not exist")
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png"}
    pairs = [(p, labels[p.stem]) for p in sorted(images_dir.iterdir())
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem in labels]
    if len(pairs) < 2:
        raise ValueError(f"found {len(pairs)} image/label pair(s) in '{images_dir}' / '{labels_dir}' (matched by file "
                         "name stem, labels as .png); need at least 2 (one for training, one held out)")
    return pairs


def load_pair(image: Path, label: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (size, size, 3) image (bilinear) and uint8 (size, size) label map (nearest)."""
    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    with Image.open(label) as lb:
        if lb.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map '{label}' is mode {lb.mode}; expected a single-channel PNG of class ids")
        ids = np.asarray(lb.resize((size, size), Image.NEAREST)).astype(np.int64)
    if ids.max() > IGNORE:
        raise ValueError(f"label map '{label}' has class id {ids.max()} > 255")
    return rgb, ids.astype(np.uint8)


def normalise(rgb: Tensor, mean, std) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised on [0, 1] RGB."""
    x = rgb.permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def window_targets(labels: Tensor, s: int) -> Tensor:
    """(B, H, W) int labels -> (B, H // (16 s), W // (16 s)) int64 targets: 1 one class, 0 several, 255 ignored."""
    px = s * PATCH
    b, h, w = labels.shape
    hs, ws = h // px, w // px
    block = labels[:, : hs * px, : ws * px].reshape(b, hs, px, ws, px).long()
    valid = block != IGNORE
    lo = torch.where(valid, block, torch.full_like(block, IGNORE + 1)).amin(dim=(2, 4))
    hi = torch.where(valid, block, torch.full_like(block, -1)).amax(dim=(2, 4))
    any_valid = valid.any(dim=(2, 4))
    any_ignore = (~valid).any(dim=(2, 4))
    one = (lo == hi) & any_valid
    target = torch.where(one, torch.ones_like(lo), torch.zeros_like(lo))
    target = torch.where(one & any_ignore, torch.full_like(lo, IGNORE), target)
    return torch.where(any_valid, target, torch.ones_like(lo))  # all-ignore window: one class, as CTS


# --------------------------------------------------------------------------------------------- evaluation


def tiling(scores: dict[int, Tensor], taus: dict[int, float], sizes: tuple[int, ...]) -> dict[int, Tensor]:
    """Top-down dCTS tiling (B, h_s, w_s) bool per size: S >= tau and no coarser passing window contains it."""
    out: dict[int, Tensor] = {}
    covered: Optional[Tensor] = None  # (B, h, w) at the previous (coarser) size
    prev = None
    for s in sorted(sizes, reverse=True):
        passed = scores[s] >= taus[s]
        if covered is not None:
            f = prev // s
            up = covered.repeat_interleave(f, 1).repeat_interleave(f, 2)
            full = torch.zeros_like(passed)
            h, w = min(up.shape[1], full.shape[1]), min(up.shape[2], full.shape[2])
            full[:, :h, :w] = up[:, :h, :w]
            out[s] = passed & ~full
            covered = full | passed
        else:
            out[s] = passed
            covered = passed
        prev = s
    return out


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


@torch.no_grad()
def evaluate(policy: PolicyNet, images: Tensor, labels: Tensor, thresholds: tuple[float, ...], batch: int = 8) -> dict:
    """Merge precision and token reduction of the dCTS tiling, per-size precision/recall, CTS top-10 % precision."""
    policy.eval()
    sizes = policy.window_sizes
    taus = dict(zip((2, 4, 8, 16), thresholds))
    per = {s: dict(tp=0, merged=0, positives=0) for s in sizes}
    tile_tp = tile_n = 0
    tokens = oracle_tokens = patches = 0
    cts_tp = cts_n = 0
    for i in range(0, images.shape[0], batch):
        x, y = images[i : i + batch], labels[i : i + batch]
        scores = policy.window_scores(x)
        targets = {s: window_targets(y, s) for s in scores}
        for s, sc in scores.items():
            t = targets[s]
            merged = (sc >= taus[s]) & (t != IGNORE)
            per[s]["tp"] += int((merged & (t == 1)).sum())
            per[s]["merged"] += int(merged.sum())
            per[s]["positives"] += int((t == 1).sum())
        fitting = tuple(scores)
        tiles = tiling(scores, taus, fitting)
        oracle = tiling({s: (targets[s] == 1).float() for s in fitting}, {s: 0.5 for s in fitting}, fitting)
        n = (x.shape[-2] // PATCH) * (x.shape[-1] // PATCH)
        patches += n * x.shape[0]
        tokens += n * x.shape[0] - sum((s * s - 1) * int(tiles[s].sum()) for s in fitting)
        oracle_tokens += n * x.shape[0] - sum((s * s - 1) * int(oracle[s].sum()) for s in fitting)
        for s in fitting:
            t = targets[s]
            tile_tp += int((tiles[s] & (t == 1)).sum())
            tile_n += int((tiles[s] & (t != IGNORE)).sum())
        if 2 in scores:
            g = scores[2].flatten(1)
            k = max(1, round(0.1 * n))  # the 30 % budget: 3k = 0.3 N
            top = torch.zeros_like(g, dtype=torch.bool).scatter(1, torch.sort(g, dim=1, descending=True, stable=True).indices[:, :k], True)
            t2 = targets[2].flatten(1)
            cts_tp += int((top & (t2 == 1)).sum())
            cts_n += int((top & (t2 != IGNORE)).sum())
    return {
        "merge_precision": _ratio(tile_tp, tile_n),
        "merged_windows": tile_n,
        "token_reduction": 1.0 - _ratio(tokens, patches),
        "oracle_token_reduction": 1.0 - _ratio(oracle_tokens, patches),
        "cts_precision_top10pct": _ratio(cts_tp, cts_n),
        "per_size": {str(s): {"precision": _ratio(v["tp"], v["merged"]), "recall": _ratio(v["tp"], v["positives"]),
                              "merged": v["merged"], "positives": v["positives"]} for s, v in per.items()},
    }


# --------------------------------------------------------------------------------------------- training


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _load_all(pairs: list[tuple[Path, Path]], size: int) -> tuple[Tensor, Tensor]:
    imgs, lbls = zip(*(load_pair(i, l, size) for i, l in pairs))
    return torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(lbls))


def lr_factor(step: int, total: int, warmup: float = 0.1) -> float:
    """Linear warm-up over the first 10 % of the steps (a from-scratch BatchNorm net at lr 1e-2 can otherwise
    diverge early on some seeds), then cosine decay to 0."""
    ramp = max(1, round(warmup * total))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * min(step - ramp, total - ramp) / max(1, total - ramp)))


def _random_crop(x: Tensor, y: Tensor, crop: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """One random crop for the batch, its corner on the 32-px cell grid so that windows stay grid-aligned."""
    cells = (x.shape[-1] - crop) // STRIDE + 1, (x.shape[-2] - crop) // STRIDE + 1
    cx = int(torch.randint(cells[0], (1,), generator=gen)) * STRIDE
    cy = int(torch.randint(cells[1], (1,), generator=gen)) * STRIDE
    return x[..., cy : cy + crop, cx : cx + crop], y[..., cy : cy + crop, cx : cx + crop]


def _loss(policy: PolicyNet, x: Tensor, y: Tensor, negative_weight: float = 5.0, cropped: bool = False) -> Tensor:
    """Summed per-head cross-entropy. On a crop, a head learns only if its windows take at least two positions
    along each axis: a crop holding a single window puts it always at the crop's corner, against artificial borders,
    and a head trained that way was seen to merge wrongly at other positions of whole images."""
    total = x.new_zeros(())
    for s, logits in policy.window_logits(x).items():
        if cropped and min(logits.shape[-2:]) < 2:
            continue
        # A wrong large superpatch costs more than a missed one ([STEP] keeps tau = 0.9 for large windows): the
        # "several classes" class weighs more as windows grow.
        weight = torch.tensor([negative_weight * s / 2, 1.0])
        t = window_targets(y, s)
        if bool((t != IGNORE).any()):
            total = total + F.cross_entropy(logits, t, weight=weight, ignore_index=IGNORE)
    return total


@torch.no_grad()
def recalibrate_batchnorm(policy: PolicyNet, images: Tensor, batch: int = 16) -> None:
    """Replace BatchNorm running statistics by exact averages over `images` with the final weights.

    With few, fast-changing steps the exponential running averages lag the weights, and eval-mode scores
    (what the exported graph computes) then disagree with what training optimised; a pass over the training set
    with cumulative averaging removes the lag.
    """
    norms = [m for m in policy.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    policy.train()
    for i in range(0, images.shape[0], batch):
        policy.backbone(images[i : i + batch])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    policy.eval()


def save_policy(policy: PolicyNet, out_path: str | os.PathLike, sidecar: dict) -> Path:
    """Write the bare state dict (the official standalone layout, + head4/8/16) and `<out>.json` beside it."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({k: v.detach().clone() for k, v in policy.state_dict().items()}, tmp)
    os.replace(tmp, out)
    side = out.with_name(out.name + ".json")
    side.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return out


def train_policy(
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    epochs: int = 30,
    size: int = 512,
    seed: int = 0,
    width: float = 1.0,
    batch_size: int = 8,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    window_sizes: tuple[int, ...] = (2, 4, 8, 16),
    val_fraction: float = 0.2,
    eval_thresholds: tuple[float, ...] = (0.6, 0.8, 0.9, 0.9),
    flip: bool = True,
    crop: int = 0,
    full_every: int = 4,
    negative_weight: float = 5.0,
    init: str = "",
    mean: tuple[float, float, float] = VIT_MEAN,
    std: tuple[float, float, float] = VIT_STD,
    threads: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Train a policy on (image, label) pairs, evaluate it on a held-out split, save it to `out_path`.

    Returns the metrics (also written to `<out_path>.json`): held-out merge precision, token reduction vs oracle,
    per-size precision/recall, CTS top-10 % precision, training loss, time and the settings.
    `threads` sets torch's intra-op threads for the run (restored after): on a small, shared CPU one thread is
    often several times faster than two, whose OpenMP workers wait on each other when preempted.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(images_dir, labels_dir, out_path, epochs=epochs, size=size, seed=seed, width=width,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, window_sizes=window_sizes,
                      val_fraction=val_fraction, eval_thresholds=eval_thresholds, flip=flip, crop=crop,
                      full_every=full_every, negative_weight=negative_weight, init=init, mean=mean, std=std, log=log)
    finally:
        torch.set_num_threads(previous_threads)


def _train(images_dir, labels_dir, out_path, *, epochs, size, seed, width, batch_size, lr, weight_decay, window_sizes,
           val_fraction, eval_thresholds, flip, crop, full_every, negative_weight, init, mean, std, log) -> dict:
    cfg = TrainConfig(epochs=epochs, size=size, seed=seed, width=width, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, window_sizes=check_window_sizes(window_sizes),
                      val_fraction=val_fraction, eval_thresholds=tuple(eval_thresholds), flip=flip, crop=crop,
                      full_every=full_every, negative_weight=negative_weight, init=init,
                      mean=tuple(mean), std=tuple(std))
    if size <= 0 or size % STRIDE:
        raise ValueError(f"size must be a positive multiple of {STRIDE} (got {size})")
    if crop and (crop % STRIDE or not MIN_CROP <= crop <= size):
        raise ValueError(f"crop must be 0 or a multiple of {STRIDE} in [{MIN_CROP}, size] (got {crop})")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    if len(cfg.eval_thresholds) != 4:
        raise ValueError("eval_thresholds needs 4 values (2x2, 4x4, 8x8, 16x16)")
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    pairs = find_pairs(images_dir, labels_dir)
    train_idx, val_idx = _split(len(pairs), val_fraction, seed)
    images, labels = _load_all(pairs, size)
    x_all = normalise(images, cfg.mean, cfg.std)
    x_train, y_train = x_all[train_idx], labels[train_idx]
    x_val, y_val = x_all[val_idx], labels[val_idx]

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = PolicyNet(PolicyConfig.from_width(width, cfg.window_sizes, mean=cfg.mean, std=cfg.std))
        if init:
            load_policy_checkpoint(policy, init, backbone_only=True)
        policy = policy.to(memory_format=CHANNELS_LAST)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(train_idx) / batch_size)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total))
        losses: list[float] = []
        for epoch in range(epochs):
            policy.train()
            order = torch.randperm(len(train_idx), generator=gen)
            epoch_loss = 0.0
            for step, i in enumerate(range(0, len(order), batch_size)):
                idx = order[i : i + batch_size]
                if len(idx) < 2 and len(order) >= 2:
                    continue  # BatchNorm needs more than one sample per batch
                x, y = x_train[idx], y_train[idx]
                cropped = bool(crop) and crop < size and not (full_every and step % full_every == full_every - 1)
                if cropped:
                    side = MIN_CROP + STRIDE * int(torch.randint((crop - MIN_CROP) // STRIDE + 1, (1,), generator=gen))
                    x, y = _random_crop(x, y, min(side, crop), gen)
                if flip:
                    mask = torch.rand(len(idx), generator=gen) < 0.5
                    x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
                    y = torch.where(mask.view(-1, 1, 1), y.flip(-1), y)
                loss = _loss(policy, x.contiguous(memory_format=CHANNELS_LAST), y, negative_weight, cropped)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
                opt.step()
                sched.step()
                epoch_loss += float(loss.detach()) * len(idx)
            losses.append(epoch_loss / len(train_idx))
            say(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
        recalibrate_batchnorm(policy, x_train.contiguous(memory_format=CHANNELS_LAST))
        policy = policy.to(memory_format=torch.contiguous_format)
        train_seconds = time.perf_counter() - t0
        metrics = evaluate(policy, x_val, y_val, cfg.eval_thresholds)
    metrics.update({
        "final_loss": losses[-1],
        "train_seconds": train_seconds,
        "images_train": len(train_idx),
        "images_val": len(val_idx),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in policy.parameters()),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    })
    sidecar = {"format": "staticprune-policy", "width": width, "window_sizes": list(cfg.window_sizes),
               "mean": list(cfg.mean), "std": list(cfg.std), "size": size, "metrics": metrics}
    save_policy(policy, out_path, sidecar)
    metrics["out"] = str(out_path)
    return metrics


# --------------------------------------------------------------------------------------------- synthetic data


def _palette(classes: int) -> np.ndarray:
    """Well-separated class colours (a fixed hue wheel at two brightness levels)."""
    cols = []
    for c in range(classes):
        hue = (c * 0.61803398875) % 1.0
        val = 0.9 if c % 2 == 0 else 0.55
        i, f = int(hue * 6), hue * 6 - int(hue * 6)
        p, q, t = val * 0.25, val * (1 - 0.75 * f), val * (0.25 + 0.75 * f)
        rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i % 6]
        cols.append([round(255 * v) for v in rgb])
    return np.array(cols, dtype=np.float64)


def synthetic_scene(rng: np.random.Generator, size: int, classes: int) -> np.ndarray:
    """(size, size) uint8 label map: a background class and up to 5 rectangles / ellipses / half-planes."""
    label = np.full((size, size), rng.integers(classes), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(int(rng.integers(0, 6))):
        cls = rng.integers(classes)
        kind = rng.random()
        if kind < 0.55:  # axis-aligned rectangle, edges anywhere (not on the 16/32-px grid)
            h, w = rng.uniform(0.15, 0.7, 2) * size
            y0, x0 = rng.uniform(-0.2, 1.0, 2) * size
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        elif kind < 0.85:  # ellipse
            cy, cx = rng.uniform(0.0, 1.0, 2) * size
            ry, rx = rng.uniform(0.1, 0.4, 2) * size
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:  # half-plane with a slanted border
            angle = rng.uniform(0, 2 * np.pi)
            offset = rng.uniform(0.3, 0.7) * size
            mask = (xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle) > offset - size / 2
        label[mask] = cls
    return label


def render_scene(label: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB image: each class its palette colour with a small per-image tint, plus pixel noise."""
    tint = rng.normal(0.0, 6.0, size=palette.shape)
    img = (palette + tint)[label]
    img = img + rng.normal(0.0, 3.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_synthetic_dataset(directory: str | os.PathLike, n: int, size: int, seed: int = 0,
                           classes: int = 8) -> tuple[Path, Path]:
    """Write `n` generated scenes as `<dir>/images/NNNN.png` (RGB) and `<dir>/labels/NNNN.png` (class ids)."""
    if n < 1 or size < STRIDE:
        raise ValueError(f"need n >= 1 and size >= {STRIDE} (got n={n}, size={size})")
    root = Path(directory)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = _palette(classes)
    for i in range(n):
        label = synthetic_scene(rng, size, classes)
        Image.fromarray(render_scene(label, palette, rng)).save(images / f"{i:04d}.png", compress_level=1)
        Image.fromarray(label).save(labels / f"{i:04d}.png", compress_level=1)
    return images, labels


__all__ = ["TrainConfig", "train_policy", "make_synthetic_dataset", "evaluate", "window_targets", "find_pairs",
           "save_policy", "synthetic_scene"]
