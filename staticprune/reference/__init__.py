"""Eager, dynamic, paper-faithful method implementations: the oracle for parity. Never exported.

Each module `reference/<method>.py` provides

    def reference_forward(model: SegmentationModel, img: Tensor, options: dict) -> ReferenceOutput

running the method the way its paper and official code do (per image, Python control flow, data-dependent
token counts), on the weights of `model`. It shares no code with `staticprune.ops` or `staticprune.methods`
(plain torch only), so a bug in a shared primitive cannot hide in both the oracle and the thing it checks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ReferenceOutput:
    logits: Tensor  # (B, K, H, W)
    kept: dict[str, list[int]]  # reduction point -> tokens kept after it, one count per image
    decisions: dict[str, Tensor] = field(default_factory=dict)  # point -> decisions, same encoding as the static
    owner: Tensor | None = None  # (B, N0) final group id of every patch (for show-tokens); None = no reduction
    token_labels: Tensor | None = None  # (B, N0) optional per-patch label to colour, e.g. the stage a token exited at


def reference_module(method: str):
    """The reference module of a method, or ValueError."""
    try:
        return importlib.import_module(f"staticprune.reference.{method}")
    except ModuleNotFoundError:
        raise ValueError(f"method '{method}' has no eager reference implementation") from None
