"""Model names and their configurations, as data."""

from __future__ import annotations

from dataclasses import dataclass

from staticprune.models.vit import VIT_SIZES, ViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "segmenter" or "segvit"
    size: str  # t, s, b, l
    decoder: str  # "linear", "mask", "atm"
    vit: ViTConfig
    atm_dim: int = 0
    atm_heads: int = 0
    mean: tuple[float, float, float] = VIT_MEAN  # on [0, 1] RGB; the graph input is already normalised
    std: tuple[float, float, float] = VIT_STD


def _segmenter(size: str, decoder: str) -> ModelSpec:
    # Segmenter's encoder uses plain nn.LayerNorm (eps 1e-5), with CLS token and final norm.
    vit = ViTConfig(**VIT_SIZES[size], ln_eps=1e-5, use_cls_token=True, final_norm=True)
    return ModelSpec(f"segmenter-vit-{size}-{decoder}", "segmenter", size, decoder, vit)


def _segmenter_deit(size: str, decoder: str) -> ModelSpec:
    # Segmenter's DeiT-distilled variants (its zoo's seg_base_deit_*): the same encoder with a distillation token
    # after the CLS token (two prefix tokens, both dropped before the decoder) and ImageNet normalisation.
    vit = ViTConfig(**VIT_SIZES[size], ln_eps=1e-5, use_cls_token=True, final_norm=True, distilled=True)
    return ModelSpec(f"segmenter-deit-{size}-{decoder}", "segmenter", size, decoder, vit, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD)


def _segvit(size: str) -> ModelSpec:
    # mmseg ViT: LN eps 1e-6, CLS dropped before block 0, no final norm, raw features of three blocks.
    out = (5, 7, 11) if size == "b" else (7, 15, 23)
    vit = ViTConfig(**VIT_SIZES[size], ln_eps=1e-6, use_cls_token=False, final_norm=False, out_indices=out)
    dim = vit.dim // 2
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if size == "b" else (VIT_MEAN, VIT_STD)
    return ModelSpec(f"segvit-vit-{size}-atm", "segvit", size, "atm", vit, dim, 12 if size == "b" else 16, mean, std)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [_segmenter(s, d) for s in "tsbl" for d in ("linear", "mask")] + [_segvit("b"), _segvit("l")]
    + [_segmenter_deit(s, d) for s in "tsb" for d in ("linear", "mask")]  # DeiT has no distilled ViT-L
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; run 'staticprune models' to list the {len(MODELS)} names")
    return MODELS[name]
