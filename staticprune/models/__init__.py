"""ViT backbone, decoders, token state and model registry."""

from staticprune.models.registry import MODELS, ModelSpec, get_spec
from staticprune.models.segmentation import SegmentationModel, build_model, parse_size
from staticprune.models.token_state import TokenState
from staticprune.models.vit import TokenHook, ViTConfig, VisionTransformer

__all__ = [
    "MODELS", "ModelSpec", "get_spec", "SegmentationModel", "build_model", "parse_size",
    "TokenState", "TokenHook", "ViTConfig", "VisionTransformer",
]
