"""Bipartite soft matching on fixed-length buffers: alternate A/B split, best edge per A token, merge into B.

The semantics are ToMe's (`bipartite_soft_matching` + `merge_wavg`): A = even sequence positions, B = odd;
each A token has one edge, to its most similar B token (cosine); selected A tokens are averaged into their
B partner, weighted by size; the output is [kept A tokens, all B tokens]. Buffers may carry padding (size 0)
after the valid tokens, so the parity of a slot equals the parity of the token's position in the unpadded
sequence, and valid A / B tokens are prefixes of the A / B halves.

Which A tokens merge is the caller's business (a count, a threshold, a capacity): this module finds the edges
and rebuilds the buffer. No method or model knowledge here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    weighted_sum_into,
)
from staticprune.ops.scan import exclusive_scan

NO_EDGE = -1e4  # score of a missing edge: below every cosine similarity, finite so FP16 graphs never see -inf


@dataclass
class Edges:
    """The best edge of every A token. nA = ceil(T / 2) for a buffer of T slots."""

    score: Tensor  # (B, nA) cosine similarity to the partner; NO_EDGE where not a candidate
    partner: Tensor  # (B, nA) int64 index of the partner among the B tokens (first maximum: lowest index wins)
    runner_up: Tensor  # (B, nA) second-best similarity, NO_EDGE if none (margin of the partner choice)
    candidate: Tensor  # (B, nA) bool: valid, unprotected, and at least one valid B token exists


def best_edges(metric: Tensor, valid: Tensor, num_protected: int) -> Edges:
    """Cosine-similarity edges from the A half to the B half of a buffer.

    metric (B, T, Dm); valid (B, T) bool. The first `num_protected` positions (0 or 1: a CLS token, which is
    A token 0) never merge, as ToMe's `scores[..., 0, :] = -inf`.
    """
    if num_protected not in (0, 1):
        raise ValueError(f"bipartite matching protects 0 or 1 leading token, not {num_protected}")
    # Padding rows get a harmless unit metric: a zero row would normalise to NaN.
    metric = torch.where(valid[..., None], metric, torch.ones_like(metric))
    metric = metric / metric.norm(dim=-1, keepdim=True)  # no epsilon, as ToMe
    ma, mb = metric[:, 0::2], metric[:, 1::2]
    va, vb = valid[:, 0::2], valid[:, 1::2]
    scores = ma @ mb.transpose(-1, -2)
    no_edge = torch.full_like(scores, NO_EDGE)
    scores = torch.where(vb[:, None, :], scores, no_edge)
    partner = scores.argmax(dim=-1)  # ArgMax returns the first maximum in torch, ONNX and TensorRT alike
    best = scores.gather(-1, partner[..., None]).squeeze(-1)
    is_partner = partner[..., None] == torch.arange(scores.shape[-1], device=scores.device)
    runner_up = torch.where(is_partner, no_edge, scores).amax(dim=-1)
    candidate = va & vb.any(dim=1, keepdim=True)
    if num_protected:
        candidate = candidate & (torch.arange(va.shape[1], device=va.device) >= num_protected)
    best = torch.where(candidate, best, torch.full_like(best, NO_EDGE))
    return Edges(best, partner, runner_up, candidate)


def bipartite_merge(
    x: Tensor,
    size: Tensor,
    owner: Tensor,
    edges: Edges,
    merge: Tensor,
    out_len: int,
    order: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the selected A tokens into their partners and compact to `out_len` slots.

    x (B, T, D); size (B, T) float, 0 = padding (valid slots first); owner (B, N0) int64 slot of every original
    patch; merge (B, nA) bool, only candidates. Output order: kept A tokens (by index, or by ascending `order`
    (B, nA) when given, ToMe's order without a class token), then all valid B tokens, then padding. The caller
    guarantees the valid output fits in `out_len`.
    Every token is rebuilt as (sum of size * x) / (sum of size), as ToMe's `merge_wavg` (kept tokens too).
    Returns x (B, out_len, D), size (B, out_len), owner (B, N0).
    """
    t = x.shape[1]
    n_a = (t + 1) // 2
    xa, xb = x[:, 0::2], x[:, 1::2]
    sa, sb = size[:, 0::2], size[:, 1::2]
    keep_a = (sa > 0) & ~merge
    valid_b = sb > 0

    sum_xb, sum_sb = weighted_sum_into(xb, sb, xa, sa, edges.partner, merge)
    xa_out = weighted_mean(xa * sa[..., None], sa)
    xb_out = weighted_mean(sum_xb, sum_sb)

    if order is None:
        pos_a = exclusive_scan(keep_a).to(torch.int64)
    else:  # position among the kept A tokens in `order`: prefix sum over the flags laid out in that order
        kept_in_order = scatter_by_rank(keep_a.to(torch.int64), order) > 0
        pos_a = exclusive_scan(kept_in_order).to(torch.int64).gather(1, order)
    n_keep_a = count(keep_a)[:, None]
    pos_b = n_keep_a + torch.arange(xb.shape[1], device=x.device)
    # Slots of the [A; B] concatenation; dropped entries go to distinct trash slots past the end.
    trash = trash_slots(out_len, t, x)
    slot = torch.cat([torch.where(keep_a, pos_a, trash[:, :n_a]), torch.where(valid_b, pos_b, trash[:, n_a:])], 1)
    index = compaction_index(slot, out_len)
    x_out = gather_rows(append_padding(torch.cat([xa_out, xb_out], 1)), index)
    size_out = gather_rows(append_padding(torch.cat([sa, sum_sb], 1)), index)

    # Owner update: a merged A token's patches follow its partner's new slot.
    slot_a = torch.where(merge, pos_b.gather(1, edges.partner), slot[:, :n_a])
    new_slot = torch.cat([slot_a, slot[:, n_a:]], 1)
    owner_cat = torch.where(owner % 2 == 0, owner // 2, n_a + owner // 2)  # buffer slot -> [A; B] position
    return x_out, size_out, new_slot.gather(1, owner_cat)
