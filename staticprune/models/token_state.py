"""The token state that ViT blocks pass along (docs/method-contract.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor

from staticprune.ops.tokens import restore_tokens


@dataclass
class TokenState:
    """Tokens of a (possibly reduced) sequence.

    x:      (B, T, D) features. The first `num_prefix` slots are prefix tokens (CLS), never reduced.
    size:   (B, T) float, how many original patches each slot stands for; 0 marks a padding slot.
            None means "unreduced": every slot is one patch and nothing is padded.
    owner:  (B, N0) int, for each original patch token the slot that represents it.
            None means the identity (slot = num_prefix + patch index).
    extras: method outputs that must reach the graph outputs (e.g. ``overflow``).
    may_pad: False when no slot can be padding by construction (every size > 0, e.g. CTS's N - 3k tokens): the
            attention then adds no key mask. Keep the default unless the method guarantees it.
    """

    x: Tensor
    size: Optional[Tensor] = None
    owner: Optional[Tensor] = None
    num_prefix: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)
    may_pad: bool = True

    @property
    def valid(self) -> Optional[Tensor]:
        """(B, T) bool, False for padding slots. Derived from `size` (one source of truth)."""
        return None if self.size is None else self.size > 0

    def with_x(self, x: Tensor) -> "TokenState":
        return replace(self, x=x)

    def patch_tokens(self) -> Tensor:
        """(B, N0, D) features on the full original patch grid (prefix tokens dropped)."""
        if self.owner is None:
            return self.x[:, self.num_prefix :]
        return restore_tokens(self.x, self.owner)

    def full_size(self) -> Tensor:
        """(B, T) sizes with the unreduced default filled in."""
        if self.size is not None:
            return self.size
        return torch.ones(self.x.shape[:2], dtype=self.x.dtype, device=self.x.device)
