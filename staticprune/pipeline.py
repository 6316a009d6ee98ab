"""One description of "which model, at what size, with which weights and method", shared by every command.

The description travels inside the exported ONNX file (metadata key `staticprune`), so `verify` and `bench`
can rebuild the exact PyTorch model a graph came from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import onnx

from staticprune.models import SegmentationModel, build_model, get_spec, parse_size

METADATA_KEY = "staticprune"


@dataclass
class ModelConfig:
    model: str = "segmenter-vit-s-mask"
    size: tuple[int, int] = (512, 512)
    classes: int = 150
    batch: int = 1
    seed: int = 0
    weights: Optional[str] = None
    weights_layout: str = "auto"
    method: str = "none"
    method_options: dict[str, Any] = field(default_factory=dict)
    labels: bool = False  # also emit int32 argmax labels from the graph
    decompose_layernorm: bool = False  # for TensorRT 8.5 (JetPack 5), which has no LayerNormalization
    raw_input: bool = False  # graph input is RGB in 0..255, normalised inside the graph

    def validate(self) -> None:
        get_spec(self.model)
        self.size = parse_size(f"{self.size[0]}x{self.size[1]}")
        if self.classes < 1:
            raise ValueError(f"--classes must be >= 1 (got {self.classes})")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1 (got {self.batch})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        data["size"] = tuple(data["size"])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_method(cfg: ModelConfig, model: SegmentationModel):
    """The static token-reduction module for `cfg.method`, or None for the unreduced model."""
    if cfg.method in ("none", "", None):
        return None
    from staticprune.methods import build_static_method

    return build_static_method(cfg.method, cfg.method_options, model)


def build(cfg: ModelConfig) -> SegmentationModel:
    """Build (and load weights into) the model a config describes. Raises ValueError/CheckpointError."""
    cfg.validate()
    model = build_model(cfg.model, cfg.size, num_classes=cfg.classes, seed=cfg.seed)
    if cfg.weights:
        from staticprune.models.checkpoints import load_checkpoint

        load_checkpoint(model, cfg.weights, layout=cfg.weights_layout)
    model.method = build_method(cfg, model)
    model.emit_labels = cfg.labels
    model.raw_input = cfg.raw_input
    model.set_decomposed_layernorm(cfg.decompose_layernorm)
    return model.eval()


def example_inputs(cfg: ModelConfig, count: int, seed: int):
    """Generated inputs in the scale the graph expects (normalised, or 0..255 RGB with raw_input)."""
    from staticprune.verify.parity import generated_inputs

    inputs = generated_inputs((cfg.batch, 3, *cfg.size), count, seed=seed)
    if cfg.raw_input:
        inputs = [(x * 48.0 + 127.5).clamp(0.0, 255.0) for x in inputs]
    return inputs


def attach_config(proto: onnx.ModelProto, cfg: ModelConfig, extra: Optional[dict[str, Any]] = None) -> None:
    spec = get_spec(cfg.model)
    payload = json.loads(cfg.to_json())
    payload["mean"], payload["std"] = list(spec.mean), list(spec.std)
    payload.update(extra or {})
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(payload, sort_keys=True)


def read_config(proto: onnx.ModelProto) -> Optional[ModelConfig]:
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return ModelConfig.from_json(entry.value)
    return None
