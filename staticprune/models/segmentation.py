"""The full segmenter: backbone, optional token-reduction method, decoder, output heads."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from staticprune.models.decoders import ATMHead, LinearDecoder, MaskTransformer
from staticprune.models.registry import ModelSpec, get_spec
from staticprune.models.token_state import TokenState
from staticprune.models.vit import PATCH, LayerNorm, VisionTransformer


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' or '512' -> (H, W); both multiples of 16."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"size '{text}' is not HxW (e.g. 512x512)") from None
    if h <= 0 or w <= 0 or h % PATCH or w % PATCH:
        raise ValueError(f"size {h}x{w} is not a multiple of {PATCH} on both sides; use e.g. {max(16, h // 16 * 16)}x{max(16, w // 16 * 16)}")
    return h, w


class SegmentationModel(nn.Module):
    """image (B, 3, H, W), already normalised -> logits (B, K, H, W) [, labels (B, H, W) int32] [, method extras].

    `method` is an nn.Module implementing the TokenHook protocol (and optionally `decode`); None = unreduced.
    """

    def __init__(self, spec: ModelSpec, image_size: tuple[int, int], num_classes: int, method: Optional[nn.Module] = None):
        super().__init__()
        self.spec = spec
        self.image_size = image_size
        self.grid = (image_size[0] // PATCH, image_size[1] // PATCH)
        self.num_classes = num_classes
        self.backbone = VisionTransformer(spec.vit, self.grid)
        if spec.decoder == "linear":
            self.decoder: nn.Module = LinearDecoder(spec.vit.dim, num_classes)
        elif spec.decoder == "mask":
            self.decoder = MaskTransformer(spec.vit.dim, num_classes)
        else:
            self.decoder = ATMHead(spec.vit.dim, num_classes, spec.atm_dim, spec.atm_heads)
        self.method = method
        self.emit_labels = False
        # Optional in-graph normalisation: the graph then takes RGB in 0..255 (what DeepStream and cameras give).
        self.raw_input = False
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def features(self, img: Tensor) -> tuple[list[Tensor], TokenState]:
        """Patch features on the full grid for the decoder (deepest last), and the final token state."""
        state, outs = self.backbone(img, self.method)
        if self.spec.decoder == "atm":
            return [s.patch_tokens() for s in outs], state
        return [state.patch_tokens()], state

    def forward(self, img: Tensor) -> tuple[Tensor, ...]:
        if self.raw_input:
            img = (img - self.pixel_mean) / self.pixel_std
        feats, state = self.features(img)
        if self.method is not None and hasattr(self.method, "decode"):
            logits = self.method.decode(self.decoder, feats, state, self.grid, self.image_size)
        else:
            logits = self.decoder(feats, self.grid, self.image_size)
        logits = logits.float()  # FP32 logits from every graph, mixed-precision ones included (no-op in FP32)
        outputs: tuple[Tensor, ...] = (logits,)
        if self.emit_labels:
            outputs += (logits.argmax(dim=1).to(torch.int32),)
        return outputs + tuple(state.extras[k] for k in sorted(state.extras))

    def output_names(self) -> list[str]:
        names = ["logits"] + (["labels"] if self.emit_labels else [])
        extras = getattr(self.method, "extra_outputs", ()) if self.method is not None else ()
        return names + sorted(extras)

    def set_decomposed_layernorm(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, LayerNorm):
                m.decompose = on


def build_model(
    name: str,
    size: tuple[int, int] | str,
    num_classes: int = 150,
    seed: int = 0,
    method: Optional[nn.Module] = None,
) -> SegmentationModel:
    """Build a model with deterministic random weights (load a checkpoint afterwards for real ones)."""
    spec = get_spec(name)
    hw = parse_size(size) if isinstance(size, str) else tuple(size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
    with torch.random.fork_rng():  # deterministic weights without touching the caller's random state
        torch.manual_seed(seed)
        return SegmentationModel(spec, hw, num_classes, method).eval()
