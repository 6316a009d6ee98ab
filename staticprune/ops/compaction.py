"""Order-preserving stream compaction with static shapes (the capacity contract, docs/method-contract.md).

A dynamic method keeps a data-dependent subset of N candidates. A static graph cannot shrink a tensor, so it
writes the survivors, in their original order, into the first slots of a buffer of fixed capacity C and marks
the rest as padding. No sort is needed (TensorRT's TopK stops at K = 3840, below the 4096 patches of a
1024x1024 input):

1. an exclusive prefix sum over the keep mask (`staticprune.ops.scan`, INT32, no CumSum) gives every survivor
   its destination slot;
2. a scatter whose indices are all distinct writes each survivor's position there. Entries that do not fit
   (not kept, or kept beyond capacity) go to a private trash slot C + i, so the scatter never sees a duplicate
   index: no ScatterElements reduction (silently wrong on TensorRT 8.x), and no write-order dependence
   (duplicate indices are undefined behaviour in ONNX and TensorRT);
3. payloads of any width are then fetched with one gather per tensor, which every runtime does well.

Everything here knows no method: keep masks in, slot maps and compacted tensors out.
Shapes: the candidate axis is the last axis of `keep`, any leading axes are batch axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from staticprune.ops.scan import count_true, exclusive_scan


@dataclass
class Compaction:
    """Where the survivors went.

    source: (..., C) int64, the candidate index stored in each slot (0 for padding slots, a valid address,
            so that gathers with it never go out of bounds).
    valid:  (..., C) bool, False for padding slots.
    count:  (...,) int64, survivors before capacity (count - C > 0 is the overflow).
    slot:   (..., N) int64, destination slot of each candidate; -1 where it was dropped or did not fit.
    """

    source: Tensor
    valid: Tensor
    count: Tensor
    slot: Tensor

    @property
    def overflow(self) -> Tensor:
        """(...,) int32: survivors the capacity could not hold."""
        return (self.count - self.source.shape[-1]).clamp(min=0).to(torch.int32)


def compaction_index(keep: Tensor, capacity: int) -> Compaction:
    """Order-preserving compaction map of `keep` (..., N) into `capacity` slots (the first `capacity` survivors
    in index order win; later ones are reported through `count`)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 (got {capacity})")
    n = keep.shape[-1]
    position = torch.arange(n, device=keep.device)
    before = exclusive_scan(keep).to(torch.int64)  # a kept entry's slot; int64 because it indexes the scatter
    fits = keep & (before < capacity)
    # Unique destinations: survivors that fit go to their slot, everything else to its own trash slot.
    dest = torch.where(fits, before, position + capacity)
    # int32 payload: TensorRT scatters INT32 natively on every version (INT64 is cast down on 8.x).
    payload = position.to(torch.int32).expand_as(dest)
    buffer = torch.zeros(*keep.shape[:-1], capacity + n, dtype=torch.int32, device=keep.device)
    source = buffer.scatter(-1, dest, payload)[..., :capacity].to(torch.int64)
    count = count_true(keep).to(torch.int64)
    valid = torch.arange(capacity, device=keep.device) < count.unsqueeze(-1)
    slot = torch.where(fits, before, torch.full_like(before, -1))
    return Compaction(source=source, valid=valid, count=count, slot=slot)


def gather_slots(values: Tensor, compaction: Compaction, fill: float = 0.0) -> Tensor:
    """Compacted copy of `values` (B, N, *rest) along axis 1: (B, C, *rest), padding slots set to `fill`."""
    source, valid = compaction.source, compaction.valid
    index = source.reshape(*source.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    picked = torch.gather(values, 1, index)
    mask = valid.reshape(*valid.shape, *([1] * (values.dim() - 2)))
    return torch.where(mask, picked, torch.full_like(picked, fill))


def compact(values: Tensor, keep: Tensor, capacity: int, fill: float = 0.0) -> tuple[Tensor, Compaction]:
    """Keep the entries of `values` (B, N, *rest) where `keep` (B, N) is True, in order, in `capacity` slots."""
    compaction = compaction_index(keep, capacity)
    return gather_slots(values, compaction, fill), compaction
