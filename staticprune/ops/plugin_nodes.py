"""TensorRT plugin nodes for the plugin graph (`staticprune export --plugins`).

In plugin mode, the two steps standard ONNX expresses badly are exported as single custom nodes that the TensorRT
ONNX parser maps onto the CUDA plugins of `plugins/` (op type = plugin name; `plugin_version` and
`plugin_namespace` attributes select the creator). Eagerly, and while tracing, each node computes the same result
with the standard torch ops it replaces, so the traced shapes and the PyTorch outputs are those of the plugin.
The plugin graph runs in TensorRT only (ONNX Runtime has no such ops): it is checked structurally here, against
the standard graph numerically on a TensorRT machine (`staticprune verify --engine`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

NAMESPACE = "staticprune"
MERGE_OP = "StaticPruneBipartiteMerge"
UNMERGE_OP = "StaticPruneTokenUnmerge"
_ENABLED = False


def plugins_enabled() -> bool:
    return _ENABLED and torch.onnx.is_in_onnx_export()


@contextmanager
def plugin_export() -> Iterator[None]:
    """Within this context, an ONNX export emits plugin nodes instead of the standard-op subgraphs."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, True
    try:
        yield
    finally:
        _ENABLED = previous


class _Merge(torch.autograd.Function):
    # The torch result is computed outside and passed in: the tracer cannot carry a Python callable. The node's
    # ONNX form ignores those inputs, so the standard-op subgraph that produced them is dead and is removed.
    @staticmethod
    def forward(ctx, x, metric, size, owner, x_out, size_out, owner_out, overflow, r: int, threshold: float,
                capacity: int, num_prefix: int, inclusive: int, absolute_parity: int, kept_by_score: int):
        return x_out.clone(), size_out.clone(), owner_out.to(torch.int32), overflow.to(torch.int32)

    @staticmethod
    def symbolic(g, x, metric, size, owner, x_out, size_out, owner_out, overflow, r, threshold, capacity,
                 num_prefix, inclusive, absolute_parity, kept_by_score):
        outs = g.op(f"{NAMESPACE}::{MERGE_OP}", x, metric, size, owner, r_i=r, threshold_f=threshold,
                    capacity_i=capacity, num_prefix_i=num_prefix, inclusive_i=inclusive,
                    absolute_parity_i=absolute_parity, kept_by_score_i=kept_by_score,
                    plugin_version_s="1", plugin_namespace_s=NAMESPACE, outputs=4)
        # Static output shapes for ONNX shape inference (TensorRT asks the plugin's getOutputShapes instead).
        for out, ref, dtype in zip(outs, (x_out, size_out, owner_out, overflow),
                                   (None, None, torch.int32, torch.int32)):
            out.setType(ref.type() if dtype is None else ref.type().with_dtype(dtype))
        return outs


def merge_node(x: Tensor, metric: Tensor, size: Tensor, owner: Tensor, compute: Callable[[], tuple],
               r: int, threshold: float, capacity: int, num_prefix: int, inclusive: bool, absolute_parity: bool,
               kept_by_score: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One bipartite match-and-merge node. `compute()` returns (x', size', owner', overflow) in torch; `metric`
    must already be L2-normalised; r = -1 selects threshold mode with `capacity` output slots (prefix included)."""
    x_out, size_out, owner_out, overflow = compute()
    x2, size2, owner2, overflow2 = _Merge.apply(
        x, metric, size.float(), owner.to(torch.int32), x_out, size_out.float(), owner_out, overflow, int(r),
        float(threshold), int(capacity), int(num_prefix), int(inclusive), int(absolute_parity), int(kept_by_score))
    return x2, size2, owner2.long(), overflow2


class _Unmerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        index = owner.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.gather(x, 1, index)

    @staticmethod
    def symbolic(g, x, owner):
        out = g.op(f"{NAMESPACE}::{UNMERGE_OP}", x, owner, to_feature_map_i=0, grid_h_i=0, grid_w_i=0,
                   plugin_version_s="1", plugin_namespace_s=NAMESPACE)
        shape = [*owner.type().sizes(), x.type().sizes()[-1]]
        out.setType(x.type().with_sizes(shape))
        return out


def unmerge_node(x: Tensor, owner: Tensor) -> Tensor:
    return _Unmerge.apply(x, owner.to(torch.int32))
