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
PRECISION_KEY = "staticprune.precision"
VERSION_KEY = "staticprune.version"  # the tool version that exported the graph
COMMAND_KEY = "staticprune.command"  # the full export command line, when it came from the CLI


@dataclass
class ModelConfig:
    model: str = "segmenter-vit-s-mask"
    size: tuple[int, int] = (512, 512)
    classes: Optional[int] = 150  # None: read from the checkpoint (`weights`) when the model is built
    batch: int = 1
    seed: int = 0
    weights: Optional[str] = None
    weights_layout: str = "auto"
    backbone_only: bool = False  # load only the backbone of `weights`; the decoder keeps its initialisation
    weights_grid: Optional[tuple[int, int]] = None  # token grid of the checkpoint's positional table, if not square
    method: str = "none"
    method_options: dict[str, Any] = field(default_factory=dict)
    labels: bool = False  # also emit int32 argmax labels from the graph
    decompose_layernorm: bool = False  # for TensorRT 8.5 (JetPack 5), which has no LayerNormalization
    raw_input: bool = False  # graph input is RGB in 0..255, normalised inside the graph
    precision: str = "fp32"  # fp16: FP16 network, FP32 decisions (models/precision.py)
    # how padding masks and log(size) reach the attention logits: "add" (TensorRT fuses it) or "channel" (one extra
    # query/key channel, no N x N elementwise pass: for ONNX Runtime CPU); staticprune/models/vit.py KEY_BIAS_FORMS
    key_bias: str = "add"

    def validate(self) -> None:
        get_spec(self.model)
        self.size = parse_size(f"{self.size[0]}x{self.size[1]}")
        if self.classes is None:
            raise ValueError("give --classes K (no checkpoint to read the class count from)")
        if self.classes < 1:
            raise ValueError(f"--classes must be >= 1 (got {self.classes})")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1 (got {self.batch})")
        from staticprune.models.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        from staticprune.models.vit import KEY_BIAS_FORMS

        if self.key_bias not in KEY_BIAS_FORMS:
            raise ValueError(f"--key-bias must be one of {', '.join(KEY_BIAS_FORMS)} (got {self.key_bias!r})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        data["size"] = tuple(data["size"])
        if data.get("weights_grid") is not None:
            data["weights_grid"] = tuple(data["weights_grid"])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_method(cfg: ModelConfig, model: SegmentationModel):
    """The static token-reduction module for `cfg.method`, or None for the unreduced model."""
    if cfg.method in ("none", "", None):
        return None
    from staticprune.methods import build_static_method

    return build_static_method(cfg.method, cfg.method_options, model)


def build(cfg: ModelConfig) -> SegmentationModel:
    """Build (and load weights into) the model a config describes. Raises ValueError/CheckpointError.

    The method is built before the weights load, so that a checkpoint's method parameters (DToP's prune heads)
    load too. With `classes` None the class count comes from the checkpoint (read once)."""
    state_dict = None
    if cfg.weights:
        from staticprune.models.checkpoints import checkpoint_num_classes, read_state_dict

        state_dict = read_state_dict(cfg.weights)
        if cfg.classes is None:
            cfg.classes = checkpoint_num_classes(state_dict, cfg.weights_layout, name=cfg.weights)
    cfg.validate()
    model = build_model(cfg.model, cfg.size, num_classes=cfg.classes, seed=cfg.seed)
    model.method = build_method(cfg, model)
    if state_dict is not None:
        from staticprune.models.checkpoints import load_checkpoint

        load_checkpoint(model, state_dict, layout=cfg.weights_layout, backbone_only=cfg.backbone_only,
                        pos_grid=cfg.weights_grid, name=cfg.weights)
        del state_dict
    model.emit_labels = cfg.labels
    model.raw_input = cfg.raw_input
    model.set_decomposed_layernorm(cfg.decompose_layernorm)
    if cfg.key_bias != "add":
        from staticprune.models.vit import set_key_bias_form

        set_key_bias_form(model, cfg.key_bias)
    if cfg.precision == "fp16":
        from staticprune.models.precision import to_mixed_precision

        to_mixed_precision(model)
    return model.eval()


def example_inputs(cfg: ModelConfig, count: int, seed: int):
    """Generated inputs in the scale the graph expects (normalised, or 0..255 RGB with raw_input)."""
    from staticprune.verify.parity import generated_inputs

    inputs = generated_inputs((cfg.batch, 3, *cfg.size), count, seed=seed)
    if cfg.raw_input:
        inputs = [(x * 48.0 + 127.5).clamp(0.0, 255.0) for x in inputs]
    return inputs


def attach_config(proto: onnx.ModelProto, cfg: ModelConfig, extra: Optional[dict[str, Any]] = None,
                  command: Optional[str] = None) -> None:
    spec = get_spec(cfg.model)
    payload = json.loads(cfg.to_json())
    payload["mean"], payload["std"] = list(spec.mean), list(spec.std)
    payload["logit_bias_adds"] = logit_bias_adds(proto)
    payload.update(extra or {})
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(payload, sort_keys=True)
    # Read by `staticprune build` (and by hand) without parsing the JSON: an fp16 graph is built strongly typed.
    entry = proto.metadata_props.add()
    entry.key, entry.value = PRECISION_KEY, cfg.precision
    from staticprune import __version__

    entry = proto.metadata_props.add()
    entry.key, entry.value = VERSION_KEY, __version__
    if command:
        entry = proto.metadata_props.add()
        entry.key, entry.value = COMMAND_KEY, command


def logit_bias_adds(proto: onnx.ModelProto) -> int:
    """Softmax nodes fed by an Add: attention logits that get a key bias added as a separate elementwise pass
    (`--key-bias add`). ONNX Runtime runners read it to suggest the `channel` form (recorded at export, because a
    runtime without the onnx package cannot inspect the graph)."""
    producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    return sum(1 for node in proto.graph.node if node.op_type == "Softmax" and node.input
               and producers.get(node.input[0]) == "Add")


def read_config(proto: onnx.ModelProto) -> Optional[ModelConfig]:
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return ModelConfig.from_json(entry.value)
    return None
