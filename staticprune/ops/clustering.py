"""Static clustering and low-level image primitives: fixed-iteration k-means, ranks, Sobel edge energy.

Iterative algorithms run a fixed number of unrolled iterations (no convergence loop), every selection is a
first-index argmax/argmin (lowest index wins ties, identically in PyTorch, ONNX Runtime and TensorRT), and
cluster means are one-hot matmuls (no scatter with a reduction). Candidates are marked by a `valid` mask so that
padding slots of a fixed-capacity sequence never join a cluster. Nothing here knows a method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from staticprune.ops.scan import count_true, exclusive_scan

NORM_EPS = 1e-12  # F.normalize's default: a zero vector stays zero and is equally similar to every centre
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for the grayscale intensity
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
SOBEL_Y = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))


def strided_seeds(valid: Tensor, k: int) -> Tensor:
    """(B, k, T) float one-hot: seed j is the valid entry of rank floor(j * n / k) (n valid entries, in order).

    A deterministic, data-independent initialisation that spreads the seeds over the sequence (raster order for
    patch tokens); with n < k some seeds repeat, and ties then go to the lower cluster.
    """
    rank = exclusive_scan(valid)  # (B, T) int32
    n = count_true(valid, keepdim=True)  # (B, 1) int32
    j = torch.arange(k, dtype=torch.int32, device=valid.device).view(1, k)
    target = torch.div(j * n, k, rounding_mode="floor")  # (B, k) int32: j * n < k * T, far below 2**31
    hit = (rank.unsqueeze(1) == target.unsqueeze(-1)) & valid.unsqueeze(1)
    return hit.to(torch.float32)


def masked_mean_update(member: Tensor, values: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster means from a (B, T, k) bool membership: (B, k, D); empty clusters keep `previous`. Also the
    (B, k) int32 member counts (an INT32 sum: a float one is inexact above 2048 members in FP16)."""
    count = count_true(member, dim=1)  # (B, k)
    sums = member.to(values.dtype).transpose(1, 2) @ values  # (B, k, D)
    mean = sums / count.clamp(min=1).to(sums.dtype).unsqueeze(-1)
    return torch.where((count > 0).unsqueeze(-1), mean, previous), count


def membership_mask(assign: Tensor, valid: Tensor, k: int) -> Tensor:
    """(B, T) cluster index + (B, T) valid -> (B, T, k) bool one-hot (all False for invalid entries)."""
    ids = torch.arange(k, device=assign.device)
    return (assign.unsqueeze(-1) == ids) & valid.unsqueeze(-1)


def membership(assign: Tensor, valid: Tensor, k: int) -> Tensor:
    """`membership_mask` as float32, for the matmuls that average over the members."""
    return membership_mask(assign, valid, k).to(torch.float32)


def cluster_sizes(assign: Tensor, valid: Tensor, k: int) -> Tensor:
    """(B, k) int32 number of valid entries assigned to each cluster."""
    return count_true(membership_mask(assign, valid, k), dim=1)


@dataclass
class KMeans:
    assign: Tensor  # (B, T) int64 cluster of each entry (meaningless where not valid)
    centres: Tensor  # (B, k, D) or (B, k)
    score: Tensor  # (B, T, k) what the final assignment maximised (cosine similarity or -distance)
    count: Tensor  # (B, k) int32 members per cluster under the final assignment


def cosine_kmeans(x: Tensor, valid: Tensor, k: int, iterations: int) -> KMeans:
    """k-means with cosine similarity (x: (B, T, D)), strided seeds, `iterations` assign/update rounds, then a
    final assignment. Centres are plain means of the members' vectors (not renormalised)."""
    centres = strided_seeds(valid, k) @ x  # (B, k, D)
    unit = F.normalize(x, dim=-1, eps=NORM_EPS)
    for _ in range(iterations):
        sim = unit @ F.normalize(centres, dim=-1, eps=NORM_EPS).transpose(1, 2)
        centres, _ = masked_mean_update(membership_mask(sim.argmax(-1), valid, k), x, centres)
    sim = unit @ F.normalize(centres, dim=-1, eps=NORM_EPS).transpose(1, 2)
    assign = sim.argmax(-1)
    return KMeans(assign, centres, sim, cluster_sizes(assign, valid, k))


def masked_range(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) min and max of `values` (B, T) over valid entries (max < min when nothing is valid)."""
    top, bottom = values.max().detach(), values.min().detach()
    low = torch.where(valid, values, top).min(-1).values
    high = torch.where(valid, values, bottom).max(-1).values
    return low, high


def kmeans_1d(values: Tensor, valid: Tensor, k: int, iterations: int) -> KMeans:
    """k-means of scalars (B, T): centres start evenly inside [min, max] of the valid values (centre j at
    min + (j + 0.5) / k * (max - min)), `iterations` nearest-centre/mean rounds, then a final assignment."""
    low, high = masked_range(values, valid)
    steps = torch.tensor([(j + 0.5) / k for j in range(k)], dtype=values.dtype, device=values.device)
    centres = low.unsqueeze(-1) + steps * (high - low).unsqueeze(-1)  # (B, k)
    for _ in range(iterations):
        neg_dist = -(values.unsqueeze(-1) - centres.unsqueeze(1)).abs()
        member = membership_mask(neg_dist.argmax(-1), valid, k)
        centres = masked_mean_update(member, values.unsqueeze(-1), centres.unsqueeze(-1))[0].squeeze(-1)
    neg_dist = -(values.unsqueeze(-1) - centres.unsqueeze(1)).abs()
    assign = neg_dist.argmax(-1)
    return KMeans(assign, centres, neg_dist, cluster_sizes(assign, valid, k))


def rank_descending(values: Tensor) -> Tensor:
    """(B, k) -> (B, k) int32 rank of each entry, 0 = largest; equal values rank the lower index first."""
    k = int(values.shape[-1])
    ids = torch.arange(k, device=values.device)
    a, b = values.unsqueeze(-1), values.unsqueeze(-2)  # a: entry j (rows), b: entry i (columns)
    before = (b > a) | ((b == a) & (ids.view(1, 1, k) < ids.view(1, k, 1)))
    return count_true(before)


def replicate_pad(img: Tensor) -> Tensor:
    """Pad (B, C, H, W) by one pixel copying the border, with Slice/Concat only (no Pad 'edge' mode needed)."""
    img = torch.cat([img[:, :, :1], img, img[:, :, -1:]], dim=2)
    return torch.cat([img[:, :, :, :1], img, img[:, :, :, -1:]], dim=3)


def sobel_energy(img: Tensor, sqrt: bool = False) -> Tensor:
    """(B, 3, H, W) image -> (B, 1, H, W) Gx^2 + Gy^2 of its grayscale (BT.601), borders replicated.

    The square root is optional: LVTP's eq. (10) prints the sum of squares without it.
    """
    luma = torch.tensor(LUMA, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    gray = (img * luma).sum(1, keepdim=True)
    kernels = torch.tensor([SOBEL_X, SOBEL_Y], dtype=img.dtype, device=img.device).unsqueeze(1)  # (2, 1, 3, 3)
    grad = F.conv2d(replicate_pad(gray), kernels)
    energy = (grad * grad).sum(1, keepdim=True)
    return energy.sqrt() if sqrt else energy


def patch_mean(maps: Tensor, patch: int) -> Tensor:
    """(B, 1, H, W) -> (B, gh * gw) mean over each patch, row-major like the patch tokens."""
    return F.avg_pool2d(maps, kernel_size=patch, stride=patch).flatten(1)
