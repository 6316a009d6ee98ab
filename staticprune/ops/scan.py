"""Prefix sums and counts in INT32, without CumSum, Loop or Scan: the one scan every op and method uses.

Why not ONNX CumSum: before TensorRT 10.8 (so on JetPack 6's 10.3 and on 8.x) the ONNX parser lowers CumSum to a
Loop with one iteration per element of the scanned axis, i.e. thousands of sequential steps at 1024x1024
(the cumulative layer only exists from 10.8).
Why not float: an FP16 engine of a weakly typed network may run any float layer in FP16, which holds integers
exactly only up to 2048, while a 1024x1024 input has 4096 patch tokens. Slots, ranks and counts computed in
float would then be off by one and scatter two tokens into one slot. TensorRT never lowers INT32 layers to a
float type, so an INT32 computation is exact on every backend and precision (up to 2**31 - 1).

The scan is log-step (Hillis-Steele): after step k every entry holds the sum of the 2**k entries ending at it,
so ceil(log2 N) steps of "shift right by 2**k, fill with zeros, add" give the inclusive prefix sum. Each step is
one Slice, one Concat with a constant zero block and one Add, all on INT32 (TensorRT's elementwise, slice and
concatenation layers take INT32 on 8.5, 8.6 and 10.x): 12 steps, 36 nodes and about 12 N additions for N = 4096.
The steps are independent of the data and every shape is static.

The alternative, a matmul with a lower-triangular ones matrix, is one node but an N x N float constant (64 MB at
N = 4096 in float32), N**2 multiply-adds, and float-typed, so FP16 engines would round it like any float sum.

Counts are ReduceSum over INT32 (TensorRT's reduce layer takes INT32 on every supported version; INT64 inputs
are cast down by the 8.x parsers anyway). Results are widened to int64 only where torch needs an index dtype
(gather, scatter): the arithmetic that produces them stays INT32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inclusive_scan(values: Tensor) -> Tensor:
    """(..., N) bool or integer -> (..., N) int32: out[..., i] = values[..., 0] + ... + values[..., i].

    Leading axes are batch axes. Values must be small enough for the sums to fit int32.
    """
    total = values.to(torch.int32)
    shape = [int(d) for d in total.shape]  # static sizes: traced, they are constants in the graph
    n = shape[-1]
    shift = 1
    while shift < n:
        # Entry i adds entry i - shift; the first `shift` entries add zero (a constant block, not a Pad).
        zeros = torch.zeros(*shape[:-1], shift, dtype=torch.int32, device=total.device)
        total = total + torch.cat([zeros, total[..., : n - shift]], dim=-1)
        shift *= 2
    return total


def exclusive_scan(values: Tensor) -> Tensor:
    """(..., N) bool or integer -> (..., N) int32: out[..., i] = values[..., 0] + ... + values[..., i - 1].

    For a keep mask this is every kept entry's slot in the compacted order.
    """
    flags = values.to(torch.int32)
    return inclusive_scan(flags) - flags


class _Int32Sum(torch.autograd.Function):
    """Sum of an int32 tensor along one axis, int32. Exported as one ReduceSum over INT32: torch's exporter
    would widen every integer sum to INT64 first (a Cast before and after the ReduceSum)."""

    @staticmethod
    def forward(ctx, values: Tensor, dim: int, keepdim: bool) -> Tensor:  # type: ignore[override]
        return values.sum(dim, keepdim=keepdim, dtype=torch.int32)

    @staticmethod
    def symbolic(g, values, dim: int, keepdim: bool):  # type: ignore[no-untyped-def]
        axes = g.op("Constant", value_t=torch.tensor([dim], dtype=torch.int64))
        return g.op("ReduceSum", values, axes, keepdims_i=int(keepdim))


def count_true(flags: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Number of set flags (or sum of small integers) along `dim`, int32 (one ReduceSum over INT32)."""
    return _Int32Sum.apply(flags.to(torch.int32), dim, keepdim)


__all__ = ["inclusive_scan", "exclusive_scan", "count_true"]
