"""Conditional window pooling on an unreduced patch grid: window similarity, and average pooling of chosen windows.

Windows are complete, grid-aligned, non-overlapping kh x kw tiles in raster order, members in raster order
within a window. Patches in a remainder strip (grid not divisible by the window) belong to no window and are
never pooled. All index maps are build-time constants, so the graph only gathers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from staticprune.ops.merge import (
    append_padding,
    compaction_index,
    count,
    gather_rows,
    scatter_by_rank,
    trash_slots,
    weighted_mean,
)
from staticprune.ops.scan import exclusive_scan


def window_members(grid: tuple[int, int], window: tuple[int, int]) -> Tensor:
    """(S, M) int64: row-major patch index of every member of every complete window."""
    (gh, gw), (kh, kw) = grid, window
    nh, nw = gh // kh, gw // kw
    patches = torch.arange(gh * gw).reshape(gh, gw)[: nh * kh, : nw * kw]
    return patches.reshape(nh, kh, nw, kw).permute(0, 2, 1, 3).reshape(nh * nw, kh * kw)


def window_of_patch(grid: tuple[int, int], window: tuple[int, int]) -> Tensor:
    """(N,) int64: window holding each patch, S (one past the last window) for patches in no window."""
    members = window_members(grid, window)
    owner = torch.full((grid[0] * grid[1],), members.shape[0], dtype=torch.int64)
    owner[members.reshape(-1)] = torch.arange(members.shape[0]).repeat_interleave(members.shape[1])
    return owner


def window_similarity(tokens: Tensor, members: Tensor) -> Tensor:
    """(B, S) mean cosine similarity over the M(M-1) ordered pairs of distinct members of each window.

    tokens (B, N, D). Self-pairs are excluded, as ALGM's code (its paper says "all pairs").
    """
    m = members.shape[1]
    t = tokens / tokens.norm(dim=-1, keepdim=True)
    w = t[:, members.reshape(-1).to(tokens.device)].reshape(t.shape[0], members.shape[0], m, t.shape[-1])
    sims = w @ w.transpose(-1, -2)  # (B, S, M, M)
    off_diagonal = 1.0 - torch.eye(m, dtype=tokens.dtype, device=tokens.device)
    return (sims * off_diagonal).sum((-1, -2)) / (m * (m - 1))


def pool_windows(
    x: Tensor, num_prefix: int, grid: tuple[int, int], window: tuple[int, int], pool: Tensor, order: Tensor,
    out_len: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Average the chosen windows of an unreduced sequence into one token each and compact.

    x (B, P + N, D), every slot one patch; pool (B, S) bool; order (B, S) a rank permutation of the windows.
    Output order: prefix tokens, pooled windows in ascending `order`, the other patches in ascending patch index,
    padding. A pooled token is the plain mean of its M members with size M. The caller guarantees the valid
    output fits in `out_len` slots. Returns x (B, out_len, D), size (B, out_len), owner (B, N) slot per patch.
    """
    b, _, d = x.shape
    members = window_members(grid, window).to(x.device)
    s, m = members.shape
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    n = patches.shape[1]
    pooled = weighted_mean(patches[:, members.reshape(-1)].reshape(b, s, m, d).sum(2), x.new_full((b, s), float(m)))

    in_window = window_of_patch(grid, window).to(x.device)
    pooled_patch = torch.cat([pool, torch.zeros_like(pool[:, :1])], 1)[:, in_window]  # (B, N)
    pooled_in_order = scatter_by_rank(pool.to(torch.int64), order) > 0
    pos_window = num_prefix + exclusive_scan(pooled_in_order).to(torch.int64).gather(1, order)
    pos_patch = num_prefix + count(pool)[:, None] + exclusive_scan(~pooled_patch).to(torch.int64)

    # Sources [prefix; windows; patches]; dropped ones get distinct trash slots past the end.
    total = num_prefix + s + n
    trash = trash_slots(out_len, total, x).expand(b, total)
    slot = torch.cat([
        torch.arange(num_prefix, device=x.device).unsqueeze(0).expand(b, num_prefix),
        torch.where(pool, pos_window, trash[:, num_prefix : num_prefix + s]),
        torch.where(pooled_patch, trash[:, num_prefix + s :], pos_patch),
    ], 1)
    index = compaction_index(slot, out_len)
    sizes = torch.cat([x.new_ones(b, num_prefix), x.new_full((b, s), float(m)), x.new_ones(b, n)], 1)
    x_out = gather_rows(append_padding(torch.cat([prefix, pooled, patches], 1)), index)
    size_out = gather_rows(append_padding(sizes), index)
    window_slot = torch.cat([pos_window, torch.zeros_like(pos_window[:, :1])], 1)[:, in_window]
    owner = torch.where(pooled_patch, window_slot, pos_patch)
    return x_out, size_out, owner
