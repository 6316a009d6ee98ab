"""Token bookkeeping primitives shared by every method."""

from __future__ import annotations

import torch
from torch import Tensor


def restore_tokens(x: Tensor, owner: Tensor) -> Tensor:
    """Unmerge: give every original token the features of the slot that now represents it.

    x: (B, T, D) slot features; owner: (B, N0) integer slot index per original token.
    Returns (B, N0, D). One gather, whatever merging, sharing or pruning happened before.
    """
    from staticprune.ops.plugin_nodes import plugins_enabled, unmerge_node

    if plugins_enabled():
        return unmerge_node(x, owner)
    index = owner.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, index)
