"""Export-safe window primitives: window index maps, nearest expansion of window grids, deterministic ranking,
order-preserving compaction. Plain torch; knows no method and no model.

Conventions: a window grid of size `s` over a patch grid (gh, gw) has (gh // s, gw // s) complete, grid-aligned,
non-overlapping windows in raster order; patches in a remainder strip (grid not divisible by s) belong to no
window of that size. Everything here has static shapes; no op depends on tensor values for its shape.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from staticprune.ops.pruning import dims
from staticprune.ops.scan import count_true, inclusive_scan


def window_grid(grid: tuple[int, int], s: int) -> tuple[int, int]:
    """Number of complete s x s windows along each axis of a patch grid."""
    return grid[0] // s, grid[1] // s


def patch_window_index(grid: tuple[int, int], s: int) -> Tensor:
    """(gh*gw,) int64: raster index of the s x s window holding each patch, -1 outside every complete window."""
    gh, gw = grid
    hs, ws = window_grid(grid, s)
    rows = torch.arange(gh).unsqueeze(1).expand(gh, gw)
    cols = torch.arange(gw).unsqueeze(0).expand(gh, gw)
    inside = (rows < hs * s) & (cols < ws * s)
    index = (rows // s) * ws + cols // s
    return torch.where(inside, index, torch.full_like(index, -1)).reshape(-1)


def window_top_left(grid: tuple[int, int], s: int) -> Tensor:
    """(hs*ws,) int64: patch index of the top-left patch of every s x s window."""
    hs, ws = window_grid(grid, s)
    rows = torch.arange(hs).unsqueeze(1) * s
    cols = torch.arange(ws).unsqueeze(0) * s
    return (rows * grid[1] + cols).reshape(-1)


def parent_index(fine_grid: tuple[int, int], coarse_grid: tuple[int, int], factor: int) -> tuple[Tensor, Tensor]:
    """Raster index (hf*wf,) int64 of the coarse window holding each fine window, and (hf*wf,) bool whether there is
    one (False in the coarse grid's remainder strip; the index is then 0, a valid address)."""
    hf, wf = fine_grid
    hc, wc = coarse_grid
    rows = torch.arange(hf).unsqueeze(1).expand(hf, wf) // factor
    cols = torch.arange(wf).unsqueeze(0).expand(hf, wf) // factor
    inside = (rows < hc) & (cols < wc)
    index = torch.where(inside, rows * wc + cols, torch.zeros_like(rows))
    return index.reshape(-1), inside.reshape(-1)


def children_index(coarse_grid: tuple[int, int], factor: int, fine_grid: tuple[int, int]) -> Tensor:
    """(hc*wc, factor*factor) int64: raster indices of the fine windows inside each coarse window."""
    hc, wc = coarse_grid
    wf = fine_grid[1]
    r = torch.arange(hc).view(hc, 1, 1, 1) * factor + torch.arange(factor).view(1, 1, factor, 1)
    c = torch.arange(wc).view(1, wc, 1, 1) * factor + torch.arange(factor).view(1, 1, 1, factor)
    return (r * wf + c).reshape(hc * wc, factor * factor)


def expand_to_children(values: Tensor, parents: Tensor, has_parent: Tensor, fill: float) -> Tensor:
    """(B, n_coarse) -> (B, n_fine): each fine window takes its coarse window's value, `fill` where it has none.

    One Gather with build-time indices and one Where with a build-time mask: no shape is computed in the graph
    (a Pad would carry its pads as a computed tensor that shape inference cannot always see through).
    """
    return torch.where(has_parent, values[:, parents], torch.full_like(values[:, parents], fill))


def reduce_over_children(values: Tensor, children: Tensor, mode: str) -> Tensor:
    """(B, n_fine) -> (B, n_coarse): min or max over the fine windows inside each coarse window."""
    grouped = values[:, children]  # (B, n_coarse, f*f)
    if mode == "min":
        return grouped.amin(dim=-1)
    if mode == "max":
        return grouped.amax(dim=-1)
    raise ValueError(f"mode must be 'min' or 'max' (got {mode!r})")


def tie_order(g: int) -> Tensor:
    """(G, G) bool, [i, j] = j < i: the lower-index-first tie rule of `descending_rank`, built once per module
    so that the graph holds it as a constant instead of computing it from traced sizes."""
    idx = torch.arange(g)
    return idx.unsqueeze(0) < idx.unsqueeze(1)


def descending_rank(scores: Tensor, eligible: Optional[Tensor] = None, lower: Optional[Tensor] = None) -> Tensor:
    """(B, G) int32 rank of every score in descending order among the eligible entries; ties -> lowest index first.

    rank_i = #{j eligible: s_j > s_i or (s_j == s_i and j < i)}. The pairwise comparison is the tie rule written
    out, so torch and every ONNX runtime agree on it (no sort, no TopK whose tie order is unspecified). The count
    is an INT32 sum: exact in every engine precision (a float one is inexact above 2048 in FP16).
    """
    s_i = scores.unsqueeze(-1)  # (B, G, 1): the entry being ranked
    s_j = scores.unsqueeze(-2)  # (B, 1, G): the entries it is compared with
    if lower is None:
        lower = tie_order(scores.shape[-1]).to(scores.device)
    before = (s_j > s_i) | ((s_j == s_i) & lower.unsqueeze(0))
    if eligible is not None:
        before = before & eligible.unsqueeze(-2)
    return count_true(before)


def stable_partition(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Destination of every entry when the kept ones move to the front, both groups in their original order.

    keep: (B, M) bool. Returns dest (B, M) int64, a permutation of 0..M-1 per row (so a scatter with it has unique
    indices), and the kept count (B,) int64. One INT32 scan (`staticprune.ops.scan`): the dropped entries before
    position i are i + 1 minus the kept ones.
    """
    kept_through = inclusive_scan(keep)  # (B, M) int32, kept entries at or before each position
    position = torch.arange(dims(keep)[1], dtype=torch.int32, device=keep.device)
    total = kept_through[:, -1:]
    dest = torch.where(keep, kept_through - 1, total + position - kept_through)
    return dest.to(torch.int64), total.squeeze(1).to(torch.int64)


def inverse_permutation(dest: Tensor) -> Tensor:
    """src (B, M) int64 with src[b, dest[b, i]] = i: one ScatterElements with unique indices, no reduction.

    The scattered values are int32, which every TensorRT ScatterElements takes (and exact, unlike FP16).
    """
    b, m = dims(dest)
    values = torch.arange(m, dtype=torch.int32, device=dest.device).expand(b, m)  # build-time sizes: a constant
    src = torch.zeros_like(values).scatter(1, dest, values)
    return src.to(torch.int64)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, M, D), index (B, T) -> (B, T, D), as one flat Gather (no (B, T, D) index tensor is materialised)."""
    b, m, d = x.shape
    offsets = (torch.arange(b, device=x.device) * m).unsqueeze(1)
    flat = (index + offsets).reshape(-1)
    return x.reshape(b * m, d).index_select(0, flat).reshape(b, index.shape[1], d)


def masked_max(x: Tensor, mask: Tensor, fill: float) -> Tensor:
    """(B, G) -> (B, 1): max over the masked entries, `fill` where none is masked."""
    return torch.where(mask, x, torch.full_like(x, fill)).amax(dim=-1, keepdim=True)


def masked_min(x: Tensor, mask: Tensor, fill: float) -> Tensor:
    """(B, G) -> (B, 1): min over the masked entries, `fill` where none is masked."""
    return torch.where(mask, x, torch.full_like(x, fill)).amin(dim=-1, keepdim=True)


__all__ = [
    "window_grid", "patch_window_index", "window_top_left", "parent_index", "children_index", "expand_to_children",
    "reduce_over_children", "tie_order", "descending_rank", "stable_partition", "inverse_permutation", "gather_rows",
    "masked_max", "masked_min",
]
