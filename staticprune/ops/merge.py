"""Which candidates merge, and how: deterministic ranking, selection margins, size-weighted sums, compaction.

Everything works on fixed-length buffers (the capacity contract, docs/method-contract.md): the number of slots is static, a slot is padding where its
size is 0, and valid slots come first. Nothing here knows a method or a model.

Export rules honoured throughout: no sort or TopK (ranks come from pairwise comparisons, so ties resolve to the
lowest index on every backend and TensorRT's K <= 3840 limit never applies), no ScatterElements reduction (sums
are one-hot matmuls; scatters write distinct indices only), counts, ranks and prefix sums in INT32
(`staticprune.ops.scan`: exact whatever precision a TensorRT engine picks for its float layers, and no CumSum,
which TensorRT before 10.8 runs as a sequential Loop). They are widened to int64 only to index a gather/scatter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from staticprune.ops.scan import count_true

NO_MARGIN = 1e4  # margin of an entry that decides nothing (padding, protected tokens): never "close to flipping"


def count(flags: Tensor, dim: int = -1) -> Tensor:
    """Number of set flags along `dim`: summed in INT32, returned as int64 (it meets int64 indices downstream)."""
    return count_true(flags, dim).to(torch.int64)



def descending_rank(score: Tensor, candidate: Tensor) -> Tensor:
    """(B, n) position of each entry in a stable descending order: candidates first, by score, equal scores by
    lowest index; then non-candidates by index. Each row is a permutation of 0..n-1.

    It equals `torch.sort(score, descending=True, stable=True)` on candidates, but is computed as "how many
    entries come before me" from pairwise comparisons: O(n^2) compares (n <= 2048 at 1024x1024), no TopK, and
    the tie rule is explicit instead of a property of one sort implementation. The count is an INT32 sum.
    """
    n = score.shape[1]
    idx = torch.arange(n, device=score.device)
    lower = (idx[:, None] < idx[None, :]).unsqueeze(0)  # [j, i]: j has the lower index
    s_j, s_i = score[:, :, None], score[:, None, :]
    c_j, c_i = candidate[:, :, None], candidate[:, None, :]
    by_score = (s_j > s_i) | ((s_j == s_i) & lower)
    before = (c_j & ~c_i) | (c_j & c_i & by_score) | (~c_j & ~c_i & lower)
    return count(before, dim=1)


def scatter_by_rank(values: Tensor, rank: Tensor) -> Tensor:
    """out[b, rank[b, i]] = values[b, i]: values in rank order (rank must be a permutation: distinct indices)."""
    return torch.zeros_like(values).scatter(1, rank, values)


def selection_margin(
    score: Tensor,
    rank: Tensor,
    candidate: Tensor,
    n_select: Tensor,
    threshold: Optional[Tensor] = None,
    by_threshold: Optional[Tensor] = None,
    ordered: Optional[Tensor] = None,
) -> Tensor:
    """How far each candidate's selection (`rank < n_select`) is from flipping, >= 0; NO_MARGIN for the rest.

    The boundary is the threshold where the threshold decided the count (`by_threshold`, (B,) bool), otherwise
    the neighbouring score across the cut (top-n selection: the worst selected vs the best unselected).
    `ordered` (B, n) bool: entries whose position in the rank order matters too (it sets their output slot), so
    the gaps to their rank neighbours count as well.
    """
    n = score.shape[1]
    ordered_scores = scatter_by_rank(score, rank)
    n_cand = count(candidate)[:, None]
    sel = n_select[:, None]
    first_out = ordered_scores.gather(1, sel.clamp(max=n - 1))
    last_in = ordered_scores.gather(1, (sel - 1).clamp(min=0))
    selected = rank < sel
    margin_in = torch.where(sel < n_cand, score - first_out, torch.full_like(score, NO_MARGIN))
    margin_out = torch.where(sel > 0, last_in - score, torch.full_like(score, NO_MARGIN))
    if threshold is not None and by_threshold is not None:
        thr = threshold.reshape(-1, 1).to(score.dtype)
        use = by_threshold[:, None]
        margin_in = torch.where(use, score - thr, margin_in)
        margin_out = torch.where(use, thr - score, margin_out)
    margin = torch.where(selected, margin_in, margin_out).abs()
    if ordered is not None:
        prev = ordered_scores.gather(1, (rank - 1).clamp(min=0))
        nxt = ordered_scores.gather(1, (rank + 1).clamp(max=n - 1))
        gap_prev = torch.where(rank > 0, prev - score, torch.full_like(score, NO_MARGIN))
        gap_next = torch.where(rank + 1 < n_cand, score - nxt, torch.full_like(score, NO_MARGIN))
        margin = torch.where(ordered, torch.minimum(margin, torch.minimum(gap_prev.abs(), gap_next.abs())), margin)
    return torch.where(candidate, margin, torch.full_like(score, NO_MARGIN))


def weighted_sum_into(
    dst_x: Tensor, dst_size: Tensor, src_x: Tensor, src_size: Tensor, assign: Tensor, active: Tensor
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of sources into destinations: (sum of size * x, sum of size) per destination.

    dst_x (B, nd, D), dst_size (B, nd); src_x (B, ns, D), src_size (B, ns); assign (B, ns) int64 destination of
    each source; active (B, ns) bool, only active sources merge. Many sources may share a destination, so the
    sum is a one-hot matmul (B, nd, ns) @ (B, ns, D): exact in fp32 accumulation, and no ScatterElements
    reduction (ignored by TensorRT 8.x, a plugin on 10.x).
    """
    nd = dst_x.shape[1]
    slots = torch.arange(nd, device=assign.device)
    onehot = ((assign[:, None, :] == slots[None, :, None]) & active[:, None, :]).to(src_x.dtype)
    sum_x = dst_x * dst_size[..., None] + onehot @ (src_x * src_size[..., None])
    sum_size = dst_size + (onehot @ src_size[..., None]).squeeze(-1)
    return sum_x, sum_size


def weighted_mean(sum_x: Tensor, sum_size: Tensor) -> Tensor:
    """sum_x / sum_size, 0 on padding (size 0) instead of NaN."""
    safe = torch.where(sum_size > 0, sum_size, torch.ones_like(sum_size))
    return sum_x / safe[..., None]


def trash_slots(length: int, n: int, like: Tensor) -> Tensor:
    """(1, n) distinct out-of-range destinations length + i for dropped entries, so scatters never collide."""
    return (length + torch.arange(n, device=like.device)).unsqueeze(0)


def compaction_index(slot: Tensor, length: int) -> Tensor:
    """Invert a slot assignment: (B, length) source position landing in each output slot, n where none does.

    slot (B, n) int64: destination of every source; sources that are dropped carry distinct destinations
    >= length (see `trash_slots`), so the scatter writes distinct indices only. Index n points one past the
    sources: callers append a padding row there.
    """
    b, n = slot.shape
    sources = torch.arange(n, device=slot.device).unsqueeze(0).expand(b, n)
    inverse = torch.full((b, length + n), n, dtype=torch.int64, device=slot.device).scatter(1, slot, sources)
    return inverse[:, :length]


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, n, D) or (B, n), index (B, L) -> rows of x at index."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def append_padding(x: Tensor) -> Tensor:
    """One zero row after the last: where `compaction_index` sends empty slots."""
    pad = torch.zeros_like(x[:, :1])
    return torch.cat([x, pad], dim=1)
