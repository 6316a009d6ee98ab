"""staticprune: token-reduction ViT segmenters compiled to static graphs (ONNX, TensorRT)."""

__version__ = "0.1.0"
