"""Pruning primitives: tokens leave the sequence, their patches remember them, one gather restores the grid.

A static graph cannot shrink the sequence by a data-dependent amount, so pruning is a keep mask followed by an
order-preserving compaction into a fixed capacity (`staticprune.ops.compaction`: prefix sum + unique-index
scatter, never a TopK over thousands of tokens). What leaves the sequence is not lost: every original patch has a
row in a per-patch `frozen` buffer (B, N0, D) that receives the features its token had when it left.

The owner map then addresses the concatenation [sequence slots ; frozen rows]:

* owner[p] < T       patch p is represented by slot owner[p] of the current sequence (T slots);
* owner[p] = T + p   patch p left the sequence; its features are frozen[p].

So `restore_with_frozen` is one gather, whatever was pruned, halted or merged before (a halted supertoken
restores to all of its patches). Everything here knows no method: masks, scores and index maps in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from staticprune.ops.compaction import Compaction, compaction_index, gather_slots
from staticprune.ops.scan import count_true

NO_MARGIN = 1.0e4  # margin of a decision that nothing nearby can flip (finite: margins are graph outputs)


def dims(t: Tensor) -> tuple[int, ...]:
    """The tensor's sizes as Python ints. Traced for export, they become constants: the graph's shapes are static
    by design, and a size read as a tensor would leave shape arithmetic (and symbolic output dims) wherever the
    exporter could not infer an upstream shape."""
    return tuple(int(s) for s in t.shape)


def in_sequence(owner: Tensor, length: int) -> Tensor:
    """(B, N0) bool: patches still represented by a slot of a sequence of `length` slots."""
    return owner < length


def safe_slot(owner: Tensor, length: int) -> Tensor:
    """(B, N0) int64 slot of each patch, 0 for patches that left (a valid address; mask the result)."""
    return torch.where(owner < length, owner, torch.zeros_like(owner))


def gather_to_patches(values: Tensor, owner: Tensor, length: int) -> Tensor:
    """Per-slot values (B, T, *rest) -> per-patch (B, N0, *rest); rows of patches that left are slot 0's (mask them)."""
    slot = safe_slot(owner, length)
    index = slot.reshape(*dims(slot), *([1] * (values.dim() - 2))).expand(-1, -1, *dims(values)[2:])
    return torch.gather(values, 1, index)


def restore_with_frozen(x: Tensor, frozen: Tensor, owner: Tensor) -> Tensor:
    """(B, N0, D) features of every original patch: its slot's features, or its frozen row if it left."""
    table = torch.cat([x, frozen], dim=1)
    return torch.gather(table, 1, owner.unsqueeze(-1).expand(-1, -1, dims(x)[-1]))


def freeze_leaving(frozen: Tensor, x: Tensor, owner: Tensor, leaving: Tensor) -> Tensor:
    """Copy into `frozen` (B, N0, D) the features of every patch whose slot is in `leaving` (B, T) bool."""
    length = dims(x)[1]
    # Gathers read int32, not bool: TensorRT's gather importers are not guaranteed for BOOL on every version.
    leaves = in_sequence(owner, length) & (torch.gather(leaving.to(torch.int32), 1, safe_slot(owner, length)) > 0)
    return torch.where(leaves.unsqueeze(-1), gather_to_patches(x, owner, length), frozen)


def remap_owner(owner: Tensor, compaction: Compaction, old_length: int, new_length: int) -> Tensor:
    """Owner after a compaction of the sequence: kept slots move to their new slot, the others point at frozen rows."""
    n0 = dims(owner)[1]
    moved = torch.gather(compaction.slot, 1, safe_slot(owner, old_length))
    stays = in_sequence(owner, old_length) & (moved >= 0)
    frozen_row = new_length + torch.arange(n0, device=owner.device).expand_as(owner)
    return torch.where(stays, moved, frozen_row)


@dataclass
class Pruned:
    """The sequence after a keep mask was applied in a fixed capacity."""

    x: Tensor  # (B, C, D), padding slots hold 0
    size: Tensor  # (B, C) float, 0 on padding slots
    owner: Tensor  # (B, N0) int64 into [slots ; frozen rows]
    frozen: Tensor  # (B, N0, D)
    compaction: Compaction  # the slot map, to carry other per-slot tensors along (`gather_slots`)

    @property
    def overflow(self) -> Tensor:
        """(B,) int32: tokens the method kept that the capacity could not hold (they left like pruned ones)."""
        return self.compaction.overflow


def prune_sequence(
    x: Tensor, size: Tensor, owner: Tensor, frozen: Tensor, keep: Tensor, capacity: int, freeze: bool = True
) -> Pruned:
    """Keep the slots where `keep` (B, T) is True, in order, in `capacity` slots; the others leave the sequence.

    Beyond capacity the first `capacity` kept slots in sequence order stay and the later ones leave too
    (deterministic fallback, counted in `overflow`). Leaving slots write their features into the frozen rows of
    their patches when `freeze` is set (otherwise those rows keep what they held, zeros if never written).
    """
    compaction = compaction_index(keep, capacity)
    leaving = compaction.slot < 0
    if freeze:
        frozen = freeze_leaving(frozen, x, owner, leaving)
    new_x = gather_slots(x, compaction)
    new_size = gather_slots(size, compaction)
    new_owner = remap_owner(owner, compaction, dims(x)[1], capacity)
    return Pruned(new_x, new_size, new_owner, frozen, compaction)


@dataclass
class GroupTopK:
    """Per-group top-k selection over the members of each group."""

    selected: Tensor  # (B, T) bool: member among the k best of its group (lowest index wins ties)
    kth_value: Tensor  # (B, G) score of the k-th best member (the worst selected), fill if fewer than k members
    next_value: Tensor  # (B, G) score of the best unselected member, fill if none
    count: Tensor  # (B, G) int32 number of members


def group_topk(score: Tensor, group: Tensor, member: Tensor, num_groups: int, k: int) -> GroupTopK:
    """For every group, select its k highest-scoring members; equal scores go to the lower index.

    score (B, T) float, group (B, T) int64 in [0, num_groups), member (B, T) bool. Static: k+1 rounds of a
    first-index argmax over a (B, G, T) masked copy (no TopK whose tie order differs between runtimes, no sort).
    The last round only measures the best unselected member (for decision margins).
    """
    b, t = dims(score)
    ids = torch.arange(num_groups, device=score.device)
    onehot = (group.unsqueeze(1) == ids.view(1, -1, 1)) & member.unsqueeze(1)  # (B, G, T)
    fill = score.min().detach() - 1.0  # below every score: a masked entry never wins the argmax
    positions = torch.arange(t, device=score.device)
    selected = torch.zeros_like(member)
    none = torch.zeros(b, num_groups, dtype=score.dtype, device=score.device) + fill
    kth, next_value = none, none
    for round_ in range(k + 1):
        available = onehot & ~selected.unsqueeze(1)
        masked = torch.where(available, score.unsqueeze(1), fill)
        best = masked.argmax(dim=-1)  # (B, G), first maximum on ties
        exists = count_true(available) > 0
        value = torch.where(exists, torch.gather(masked, 2, best.unsqueeze(-1)).squeeze(-1), fill)
        if round_ == k:
            next_value = value
            break
        if round_ == k - 1:
            kth = value
        found = torch.gather(exists.to(torch.int32), 1, group) > 0
        hit = (torch.gather(best, 1, group) == positions) & found & member
        selected = selected | hit
    count = count_true(onehot)
    return GroupTopK(selected=selected, kth_value=kth, next_value=next_value, count=count)


def top2_gap(values: Tensor, dim: int = -1) -> Tensor:
    """Best minus second best along `dim` (a large constant with fewer than two entries): how far an argmax is
    from flipping. TopK over a short axis (classes, clusters), whose values do not depend on tie order."""
    if values.shape[dim] < 2:
        return torch.full_like(values.select(dim, 0), NO_MARGIN)
    top = values.topk(2, dim=dim).values
    return top.select(dim, 0) - top.select(dim, 1)
