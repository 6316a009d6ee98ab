"""TensorRT plugin nodes for the plugin graph (`staticprune export --plugins`).

In plugin mode, the two steps standard ONNX expresses badly are exported as single custom nodes that the TensorRT
ONNX parser maps onto the CUDA plugins of `plugins/` (op type = plugin name; `plugin_version` and
`plugin_namespace` attributes select the creator). Eagerly, and while tracing, each node computes the same result
with the standard torch ops it replaces, so the traced shapes and the PyTorch outputs are those of the plugin.
The plugin graph runs in TensorRT only (ONNX Runtime has no such ops): it is checked structurally
(`staticprune/export/plugin_graph.py`), against the plugins' own creator and shape rules
(`staticprune/export/plugin_contract.py`), and against the standard graph numerically on a TensorRT machine
(`staticprune verify --engine`).
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


def merge_attributes(r: int, threshold: float, capacity: int, num_prefix: int, inclusive: int, absolute_parity: int,
                     kept_by_score: int, threshold_input: bool) -> dict:
    """The node's attributes, exactly those of its mode (plugins/bipartiteMergePlugin/README.md): fixed-r mode
    carries no capacity and no threshold (the creator rejects r with a capacity); threshold mode carries its
    capacity and either the threshold or threshold_input = 1 (the threshold is then input 4)."""
    attrs = {"r": int(r), "num_prefix": int(num_prefix), "inclusive": int(inclusive),
             "absolute_parity": int(absolute_parity), "kept_by_score": int(kept_by_score)}
    if r >= 0:
        return attrs
    attrs["capacity"] = int(capacity)
    if threshold_input:
        attrs["threshold_input"] = 1
    else:
        attrs["threshold"] = float(threshold)
    return attrs


class _Merge(torch.autograd.Function):
    # The torch result is computed outside and passed in: the tracer cannot carry a Python callable. The node's
    # ONNX form ignores those inputs, so the standard-op subgraph that produced them is dead and is removed.
    @staticmethod
    def forward(ctx, x, metric, size, owner, threshold, x_out, size_out, owner_out, overflow, attrs: dict):
        return x_out.clone(), size_out.clone(), owner_out.to(torch.int32), overflow.to(torch.int32)

    @staticmethod
    def symbolic(g, x, metric, size, owner, threshold, x_out, size_out, owner_out, overflow, attrs):
        inputs = [x, metric, size, owner] + ([threshold] if attrs.get("threshold_input") else [])
        typed = {f"{k}_f" if isinstance(v, float) else f"{k}_i": v for k, v in attrs.items()}
        outs = g.op(f"{NAMESPACE}::{MERGE_OP}", *inputs, **typed, plugin_version_s="1", plugin_namespace_s=NAMESPACE,
                    outputs=4)
        # Static output shapes for ONNX shape inference (TensorRT asks the plugin's getOutputShapes instead).
        for out, ref, dtype in zip(outs, (x_out, size_out, owner_out, overflow),
                                   (None, None, torch.int32, torch.int32)):
            out.setType(ref.type() if dtype is None else ref.type().with_dtype(dtype))
        return outs


def merge_node(x: Tensor, metric: Tensor, size: Tensor, owner: Tensor, compute: Callable[[], tuple],
               r: int, threshold: float | Tensor, capacity: int, num_prefix: int, inclusive: bool,
               absolute_parity: bool, kept_by_score: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One bipartite match-and-merge node. `compute()` returns (x', size', owner', overflow) in torch; `metric`
    must already be L2-normalised; r = -1 selects threshold mode with `capacity` output slots (prefix included).
    A (B,) tensor `threshold` becomes the node's fifth input (threshold_input = 1, one threshold per image)."""
    x_out, size_out, owner_out, overflow = compute()
    per_image = isinstance(threshold, Tensor)
    if per_image and r >= 0:
        raise ValueError("a threshold tensor applies to threshold mode (r = -1) only")
    attrs = merge_attributes(r, 0.0 if per_image else threshold, capacity, num_prefix, inclusive, absolute_parity,
                             kept_by_score, per_image)
    threshold_input = threshold.float().reshape(-1) if per_image else None
    x2, size2, owner2, overflow2 = _Merge.apply(
        x, metric, size.float(), owner.to(torch.int32), threshold_input, x_out, size_out.float(), owner_out,
        overflow, attrs)
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
