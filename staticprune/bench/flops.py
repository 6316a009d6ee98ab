"""FLOP counting in the papers' (fvcore) convention: one multiply-add = one FLOP.

We use torch's FlopCounterMode (which counts 2 FLOPs per multiply-add for matmuls and convolutions) and halve
those, and add fvcore's handles for the ops FlopCounterMode ignores: LayerNorm (5 per element with affine) and
bilinear upsampling (4 per output element). Softmax, GELU and element-wise ops count 0, as in fvcore.
The model runs on the meta device, so counting ViT-L at 1024x1024 costs no compute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from math import prod

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
CONVENTION = "fvcore: 1 multiply-add = 1 FLOP; matmul/linear/conv/bmm, LayerNorm 5/elem, bilinear 4/output"


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, bias_shape=None, *args, out_shape=None, **kw) -> int:
    return 5 * prod(input_shape) if weight_shape is not None else 4 * prod(input_shape)


def _bilinear_flops(*args, out_shape=None, **kwargs) -> int:
    return 4 * prod(out_shape)


# FlopCounterMode counts 2 per MAC for these; fvcore counts 1. We halve them after counting.
_MAC_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"}


@dataclass
class FlopReport:
    total: float  # FLOPs (fvcore convention)
    by_op: dict[str, float] = field(default_factory=dict)
    convention: str = CONVENTION

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def count_flops(model: torch.nn.Module, input_shape: tuple[int, ...], on_meta: bool = True) -> FlopReport:
    """FLOPs of one forward pass at `input_shape` (use batch 1 to compare with the papers)."""
    custom = {
        aten.native_layer_norm: _layer_norm_flops,
        aten.upsample_bilinear2d: _bilinear_flops,
    }
    model = copy.deepcopy(model).to("meta") if on_meta else copy.deepcopy(model)
    model.requires_grad_(False)  # FlopCounterMode's module tracker trips on views of grad-requiring params
    x = torch.zeros(input_shape, device="meta" if on_meta else "cpu")
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with torch.no_grad(), counter:
        model(x)
    by_op: dict[str, float] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[-1] if not hasattr(op, "__name__") else op.__name__
        name = name.split(".")[0]
        by_op[name] = by_op.get(name, 0.0) + (n / 2 if name in _MAC_OPS else n)
    return FlopReport(total=sum(by_op.values()), by_op=by_op)
