"""One interface to run an exported segmenter, whatever it was deployed as.

`open_runner(path)` returns a Runner for an ONNX graph (ONNX Runtime), a TensorRT engine with the JSON sidecar
`staticprune build` writes beside it, or a folder of capacity-bucket graphs (its pipeline.json). Every runner
takes a (B, 3, H, W) float32 batch, already resized and normalised as its `mean`/`std`/`raw_input` say, and
returns the graph's outputs by name: "logits" (B, K, H, W) float32, and where the graph has them "labels"
(B, H, W) int32 and "overflow" ((B,) or (B, P) int32).

Imports neither torch nor onnx (the Jetson image has neither): graph facts come from the `staticprune`
metadata entry, which ONNX Runtime exposes as the session's custom metadata, or from the engine's sidecar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from staticprune.runtime import read_json, usage_error
from staticprune.runtime.buckets import PIPELINE_FILE

METADATA_KEY = "staticprune"
ENGINE_SUFFIXES = (".engine", ".plan")


@runtime_checkable
class Runner(Protocol):
    size: tuple[int, int]  # (H, W) fixed input size of the graph
    mean: tuple[float, float, float]  # normalisation on [0, 1] RGB, from the graph's metadata
    std: tuple[float, float, float]
    raw_input: bool  # True when the graph normalises itself (input in 0..255)
    num_classes: int
    output_names: list[str]

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        ...


class GraphFacts:
    """What a runner needs to know about an exported graph, read from its `staticprune` metadata JSON.

    Also carried by every runner here: `batch` (the graph's fixed batch), `metadata` (the whole JSON) and
    `overflow_points` (names of the columns of a (B, P) overflow output, when the graph records them)."""

    def __init__(self, metadata: Mapping[str, Any], source: str, input_shape: Optional[Sequence[int]] = None):
        def field(key: str) -> Any:
            if key not in metadata:
                raise usage_error(f"'{source}' records no '{key}' in its staticprune metadata; re-export it with "
                                   "a current 'staticprune export'")
            return metadata[key]

        try:
            size = tuple(int(v) for v in field("size"))
            raw_input = bool(metadata.get("raw_input", False))
            mean = tuple(float(v) for v in metadata.get("mean", (0.0, 0.0, 0.0)))
            std = tuple(float(v) for v in metadata.get("std", (1.0, 1.0, 1.0)))
            classes = int(field("classes"))
            batch = int(metadata.get("batch", 1))
        except (TypeError, ValueError):
            raise usage_error(f"'{source}' has malformed staticprune metadata (size, classes, mean or std); "
                               "re-export it") from None
        if len(size) != 2 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise usage_error(f"'{source}' has malformed staticprune metadata (size {size}, mean {mean}, std {std})")
        if not raw_input and not ("mean" in metadata and "std" in metadata):
            raise usage_error(f"'{source}' records no mean/std to normalise images with; re-export it")
        if input_shape is not None:
            shape = tuple(input_shape)
            if len(shape) != 4 or shape[1] != 3 or tuple(shape[2:]) != size:
                raise usage_error(f"'{source}' takes input {shape}; its metadata says (B, 3, {size[0]}, {size[1]})")
            batch = int(shape[0])
        self.size: tuple[int, int] = (size[0], size[1])
        self.mean: tuple[float, float, float] = (mean[0], mean[1], mean[2])
        self.std: tuple[float, float, float] = (std[0], std[1], std[2])
        self.raw_input = raw_input
        self.num_classes = classes
        self.batch = batch
        self.metadata = dict(metadata)
        points = metadata.get("overflow_points")
        self.overflow_points: Optional[list[str]] = [str(p) for p in points] if isinstance(points, list) else None


def _check_batch(image: np.ndarray, batch: int, size: tuple[int, int]) -> None:
    if image.ndim != 4 or tuple(image.shape) != (batch, 3, *size):
        raise ValueError(f"runner input has shape {tuple(image.shape)}; the graph takes ({batch}, 3, {size[0]}, "
                         f"{size[1]})")


def _float_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FP16 graphs may return FP16 logits; the Runner contract is float32 logits and int32 ids."""
    out = {}
    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iu" and arr.dtype != np.int32 and name in ("labels", "overflow"):
            arr = arr.astype(np.int32)
        out[name] = arr
    return out


class OrtRunner(GraphFacts):
    """An exported ONNX graph in ONNX Runtime (CPU unless `providers`)."""

    def __init__(self, path: str, threads: Optional[int] = None, providers: Optional[list[str]] = None):
        from staticprune.runtime.ort import ort_session

        try:
            session = ort_session(path, threads=threads, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
            raise usage_error(f"'{path}' is not an ONNX graph ONNX Runtime can load ({detail})") from None
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise usage_error(f"'{path}' is not a staticprune export (no '{METADATA_KEY}' metadata); export it with "
                               "'staticprune export'")
        try:
            metadata = json.loads(text)
        except json.JSONDecodeError:
            raise usage_error(f"'{path}' has unreadable staticprune metadata (not JSON)") from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise usage_error(f"'{path}' has {len(inputs)} inputs; a staticprune graph has one image input")
        shape = inputs[0].shape
        if any(not isinstance(d, int) or d <= 0 for d in shape):
            raise usage_error(f"'{path}' input has no static shape ({shape}); staticprune graphs are static")
        logits = [o for o in session.get_outputs() if o.name == "logits"]
        if metadata.get("classes") is None and logits and isinstance(logits[0].shape[1], int):
            metadata["classes"] = logits[0].shape[1]  # class count read from a checkpoint at export time
        super().__init__(metadata, path, shape)
        self.path = path
        self.output_names: list[str] = [o.name for o in session.get_outputs()]
        if "logits" not in self.output_names:
            raise usage_error(f"'{path}' has no 'logits' output (outputs: {', '.join(self.output_names)})")
        self._session = session
        self._input_name = inputs[0].name
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.notes: list[str] = []  # advice for the user, printed by the commands that run graphs
        adds = int(metadata.get("logit_bias_adds") or 0)
        if adds and metadata.get("key_bias", "add") == "add" and metadata.get("precision", "fp32") == "fp32":
            self.notes.append(
                f"'{path}' adds a key bias to the attention logits in {adds} attention(s) as a separate pass "
                "(export --key-bias add, the form TensorRT fuses); for ONNX Runtime, export with --key-bias channel "
                "(same outputs, no pass over the (heads, tokens, tokens) logits)")

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        _check_batch(image, self.batch, self.size)
        feed = {self._input_name: np.ascontiguousarray(image, dtype=self._input_dtype)}
        return _float_outputs(dict(zip(self.output_names, self._session.run(self.output_names, feed))))


class TrtRunner(GraphFacts):
    """A TensorRT engine built by `staticprune build`; graph facts from its sidecar `<engine>.json`.

    The plugin libraries recorded in the sidecar are loaded first (they must exist on this machine)."""

    def __init__(self, path: str):
        from staticprune.trt.engine import TensorRTUnavailable, load_plugins, require_tensorrt

        sidecar_path = Path(path + ".json")
        if not sidecar_path.is_file():
            raise usage_error(f"engine '{path}' has no sidecar '{sidecar_path}' (written by 'staticprune build'); "
                               "rebuild it with staticprune build")
        sidecar = read_json(sidecar_path, f"sidecar '{sidecar_path}'")
        metadata = sidecar.get("config") or {}
        if not metadata:
            raise usage_error(f"sidecar '{sidecar_path}' records no staticprune configuration; the engine was not "
                               "built from a staticprune export")
        inputs = sidecar.get("inputs") or []
        logits = [o for o in sidecar.get("outputs") or [] if o.get("name") == "logits"]
        if metadata.get("classes") is None and logits and len(logits[0].get("shape", [])) == 4:
            metadata = {**metadata, "classes": logits[0]["shape"][1]}
        super().__init__(metadata, path, inputs[0]["shape"] if len(inputs) == 1 else None)
        missing = [p for p in sidecar.get("plugins") or [] if not Path(p).is_file()]
        if missing:
            raise usage_error(f"plugin library '{missing[0]}' recorded in {sidecar_path} does not exist here")
        try:
            require_tensorrt()
        except TensorRTUnavailable as exc:
            raise usage_error(str(exc)) from None
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        load_plugins(sidecar.get("plugins") or [])
        self.path = path
        self.output_names = [o["name"] for o in sidecar.get("outputs") or []] or ["logits"]
        self._input_name = inputs[0]["name"] if inputs else "image"
        self._runner = PolygraphyTrtRunner(EngineFromBytes(Path(path).read_bytes()))
        self._runner.activate()  # keeps the engine and its execution context for every run

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        _check_batch(image, self.batch, self.size)
        outputs = self._runner.infer({self._input_name: np.ascontiguousarray(image, dtype=np.float32)})
        return _float_outputs({k: np.array(v) for k, v in outputs.items()})

    def close(self) -> None:
        if getattr(self, "_runner", None) is not None and self._runner.is_active:
            self._runner.deactivate()


def open_runner(path: str, threads: Optional[int] = None) -> Runner:
    """A Runner for an ONNX graph (*.onnx), a TensorRT engine (*.engine, *.plan; needs TensorRT and the sidecar
    `staticprune build` writes), or a capacity-bucket pipeline (a folder, or its pipeline.json).

    Bad input (missing file, not a staticprune export, TensorRT missing) raises staticprune.cli.UsageError with
    one line."""
    p = Path(path)
    if p.is_dir() or p.name == PIPELINE_FILE:
        if not p.exists():
            raise usage_error(f"pipeline '{path}' does not exist")
        try:
            from staticprune.runtime.buckets import BucketedRunner
        except ModuleNotFoundError as exc:
            if exc.name != "staticprune.runtime.buckets":
                raise
            raise usage_error("capacity-bucket pipelines need staticprune.runtime.buckets, which this installation "
                               f"lacks; pass one of the graphs in '{path}' instead") from None
        return BucketedRunner(os.fspath(p), threads=threads)
    if not p.is_file():
        raise usage_error(f"'{path}' does not exist (give an exported .onnx graph, a .engine or a pipeline folder)")
    if p.suffix.lower() in ENGINE_SUFFIXES:
        return TrtRunner(os.fspath(p))
    if p.suffix.lower() == ".onnx":
        return OrtRunner(os.fspath(p), threads=threads)
    raise usage_error(f"'{path}' is neither an ONNX graph (.onnx), a TensorRT engine (.engine, .plan) nor a "
                       f"pipeline folder ({PIPELINE_FILE})")


__all__ = ["Runner", "GraphFacts", "OrtRunner", "TrtRunner", "open_runner"]
