"""Mixed precision for FP16 deployment: the network in FP16, every token-reduction decision in FP32.

`to_mixed_precision(model)` converts a SegmentationModel in place:

* FP16: the transformer blocks (attention, MLP) and the decoder's linear layers and embeddings: all the
  FLOPs that matter;
* FP32: the patch embedding (one convolution, well under 1 % of the FLOPs, and the input of every method's
  patch-level decision), the LayerNorms (they normalise FP16 activations in FP32: the variance of large-norm
  tokens overflows FP16), the token-reduction method as a whole (similarities, thresholds, ranks, counts, slots,
  owners, size-weighted merges, the policy network) and the logits the graph returns.

The boundaries are explicit casts in the module (`call_hook` in the backbone, the LayerNorm, the final cast), so
the exported ONNX graph carries the precision of every tensor itself. TensorRT builds it as a strongly typed
network (`staticprune build` does so for these graphs; trtexec: `--stronglyTyped`), which keeps the FP32 parts
in FP32; a weakly typed FP16 build could run them in FP16, where integers are exact only up to 2048.
"""

from __future__ import annotations

import torch
from torch import nn

from staticprune.models.vit import LayerNorm

PRECISIONS = ("fp32", "fp16")


def to_mixed_precision(model: nn.Module) -> nn.Module:
    """FP16 network, FP32 patch embedding / norms / method / logits (see the module docstring). In place."""
    method = model.method
    model.method = None  # converted apart: it stays FP32
    model.half()
    model.backbone.patch_embed.float()
    model.backbone.pos_embed.data = model.backbone.pos_embed.data.float()
    for name in ("cls_token", "dist_token"):  # prefix tokens join the FP32 embedding
        token = getattr(model.backbone, name, None)
        if token is not None:
            token.data = token.data.float()
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.float()
    for name in ("pixel_mean", "pixel_std"):
        buf = getattr(model, name, None)
        if buf is not None:
            setattr(model, name, buf.float())
    model.method = method.float() if method is not None else None
    model.precision = "fp16"
    return model


def model_precision(model: nn.Module) -> str:
    return getattr(model, "precision", "fp32")

