"""Run a capacity-bucket pipeline (a folder written by `staticprune export --buckets ... -o DIR`; docs/buckets.md).

pipeline.json lists the stages in order. Stage 0 (the prefix) takes the image and hands over the token state
(`<name>_next` outputs) with `count_next`, the valid patch slots of each image. Every later stage is a set of
graphs, one per capacity bucket; the runner picks the smallest bucket that holds the largest count of the batch
and feeds it the state. The last stage returns logits (and labels, overflow, decisions).

A graph entry may name a TensorRT engine ("engine": file, built from its "onnx" by `staticprune build`, with the
sidecar that command writes); the runner then uses TensorRT for it, else ONNX Runtime on the "onnx" file.
Imports neither torch nor onnx.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from staticprune.runtime import read_json, usage_error

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "staticprune-buckets"


def pick_bucket(capacities: Sequence[int], counts: np.ndarray) -> int:
    """The smallest capacity >= the largest count of the batch (the largest capacity if none holds it: that graph
    then reports the excess in `overflow`)."""
    largest = int(np.max(counts)) if np.size(counts) else 0
    for c in capacities:
        if int(c) >= largest:
            return int(c)
    return int(capacities[-1])


class _OrtGraph:
    def __init__(self, path: Path, threads: Optional[int]):
        from staticprune.runtime.ort import ort_session

        try:
            self.session = ort_session(str(path), threads=threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
            raise usage_error(f"stage graph '{path}' cannot be loaded by ONNX Runtime ({detail})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def close(self) -> None:
        self.session = None


class _EngineGraph:
    """A stage as a TensorRT engine (polygraphy's runner, as staticprune.runtime.runner.TrtRunner)."""

    def __init__(self, path: Path, plugins: Sequence[str]):
        from staticprune.trt.engine import TensorRTUnavailable, load_plugins, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailable as exc:
            raise usage_error(str(exc)) from None
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        load_plugins(list(plugins))
        self._runner = TrtRunner(EngineFromBytes(path.read_bytes()))
        self._runner.activate()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._runner.infer(feeds).items()}

    def close(self) -> None:
        if self._runner.is_active:
            self._runner.deactivate()


class BucketedRunner:
    """Runner (staticprune.runtime.runner.Runner) over a capacity-bucket pipeline folder or its pipeline.json.

    Extra outputs beside the final graph's: `count_<point>` (B,) int32, the valid patch tokens after each reduction
    point. `last_capacities` holds the bucket picked at each point by the last run."""

    def __init__(self, path: str, threads: Optional[int] = None, lazy: bool = False):
        folder = Path(path)
        file = folder if folder.name == PIPELINE_FILE else folder / PIPELINE_FILE
        folder = file.parent
        if not file.is_file():
            raise usage_error(f"'{folder}' holds no {PIPELINE_FILE}; export a pipeline with 'staticprune export "
                               "--buckets ... -o DIR'")
        spec = read_json(file, f"'{file}'")
        if not isinstance(spec, dict) or spec.get("format") != PIPELINE_FORMAT or not spec.get("stages"):
            raise usage_error(f"'{file}' is not a staticprune capacity-bucket pipeline (format "
                               f"'{PIPELINE_FORMAT}' with stages)")
        self.spec = spec
        self.folder = folder
        try:
            self.size: tuple[int, int] = (int(spec["size"][0]), int(spec["size"][1]))
            self.mean: tuple[float, float, float] = tuple(float(v) for v in spec["mean"])  # type: ignore[assignment]
            self.std: tuple[float, float, float] = tuple(float(v) for v in spec["std"])  # type: ignore[assignment]
            self.raw_input: bool = bool(spec.get("raw_input", False))
            self.num_classes: int = int(spec["num_classes"])
            self.batch: int = int(spec.get("batch", 1))
            self.state_inputs: list[str] = list(spec["state_inputs"])
            self.suffix: str = str(spec["handoff_suffix"])
            points = [str(p["name"]) for p in spec["points"]]
        except (KeyError, TypeError, ValueError, IndexError):
            raise usage_error(f"'{file}' lacks size, mean, std, num_classes, points or state names; re-export "
                               "it") from None
        self.metadata: dict[str, Any] = dict(spec.get("config") or {})
        self.points = points
        self._threads = threads
        self._graphs: dict[str, Any] = {}
        self.stages: list[list[dict[str, Any]]] = []
        for stage in spec["stages"]:
            graphs = stage.get("graphs") or []
            if not graphs:
                raise usage_error(f"'{file}' has a stage with no graphs; re-export the pipeline")
            for g in graphs:
                source = g.get("engine") or g.get("onnx")
                if not source or not (folder / source).is_file():
                    raise usage_error(f"pipeline '{folder}' lacks stage graph '{source}' named in {PIPELINE_FILE}; "
                                       "re-export the whole folder")
            self.stages.append(graphs)
        final = self.stages[-1][0].get("outputs") or ["logits"]
        earlier = [n for graphs in self.stages[:-1] for n in graphs[0].get("outputs", []) if not n.endswith(self.suffix)]
        self.output_names: list[str] = list(final) + earlier + [f"count_{p}" for p in points]
        self.last_capacities: dict[str, int] = {}
        if not lazy:
            for graphs in self.stages:
                for g in graphs:
                    self._graph(g)

    def _graph(self, entry: dict[str, Any]) -> Any:
        key = entry.get("engine") or entry["onnx"]
        if key not in self._graphs:
            if entry.get("engine"):
                self._graphs[key] = _EngineGraph(self.folder / entry["engine"], entry.get("plugins") or [])
            else:
                self._graphs[key] = _OrtGraph(self.folder / entry["onnx"], self._threads)
        return self._graphs[key]

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if image.ndim != 4 or tuple(image.shape) != (self.batch, 3, *self.size):
            raise ValueError(f"runner input has shape {tuple(image.shape)}; the pipeline takes ({self.batch}, 3, "
                             f"{self.size[0]}, {self.size[1]})")
        feeds = {"image": np.ascontiguousarray(image, dtype=np.float32)}
        results: dict[str, np.ndarray] = {}
        self.last_capacities = {}
        for k, graphs in enumerate(self.stages):
            entry = graphs[0]
            if k > 0:
                capacity = pick_bucket([int(g["capacity"]) for g in graphs], feeds["count"])
                entry = next(g for g in graphs if int(g["capacity"]) == capacity)
                self.last_capacities[self.points[k - 1]] = capacity
            outputs = self._graph(entry).run(feeds)
            if k + 1 < len(self.stages):
                feeds = {name: outputs[name + self.suffix] for name in self.state_inputs}
                results[f"count_{self.points[k]}"] = np.asarray(feeds["count"], dtype=np.int32)
            results.update({n: v for n, v in outputs.items() if not n.endswith(self.suffix)})
        return results

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()


def stage_graphs(path: str) -> list[tuple[int, Optional[int], str]]:
    """(stage, capacity, onnx file) of every graph of a pipeline folder: what `staticprune build` builds one by one."""
    runner = BucketedRunner(path, lazy=True)
    return [(k, g.get("capacity"), str(runner.folder / g["onnx"])) for k, graphs in enumerate(runner.stages)
            for g in graphs]


def attach_engines(path: str, engine_for: Callable[[Path], Optional[Path]] = lambda onnx: onnx.with_suffix(".engine"),
                   plugins: Sequence[str] = ()) -> int:
    """Record in pipeline.json the engine built beside each stage graph (`staticprune build DIR/X.onnx -o
    DIR/X.engine`), so that the runner uses TensorRT for it. Returns how many graphs got one."""
    folder = Path(path)
    file = folder if folder.name == PIPELINE_FILE else folder / PIPELINE_FILE
    spec = json.loads(file.read_text())
    found = 0
    for stage in spec["stages"]:
        for g in stage["graphs"]:
            engine = engine_for(file.parent / g["onnx"])
            if engine is not None and engine.is_file():
                g["engine"] = os.path.relpath(engine, file.parent)
                if plugins:
                    g["plugins"] = list(plugins)
                found += 1
    from staticprune.fileio import write_bytes_atomic

    write_bytes_atomic((json.dumps(spec, indent=2) + "\n").encode(), file)
    return found


ENGINE_MANIFEST_FILE = "pipeline.engines.txt"
ENGINE_MANIFEST_FORMAT = "staticprune-bucket-engines"


def engine_manifest_lines(path: str) -> list[str]:
    """The plain-text engine manifest of a pipeline whose graphs all have an engine (docs/buckets.md, "On TensorRT
    and in C++"): what examples/cpp/segment_buckets.cpp reads, so that C++ needs no JSON parser.

    One record a line, words separated by single spaces:
      staticprune-bucket-engines 1           format and version (first line)
      size H W | batch B | mean R G B | std R G B | raw_input 0|1
      input NAME                              the image input of stage 0
      state NAME...                           state inputs of every later stage; stage k-1 outputs NAME + suffix
      suffix SUFFIX                           the handoff suffix (`_next`)
      count NAME                              the state that holds the valid patch tokens (B,) int32
      output NAME...                          the outputs of the last stage
      point K NAME                            stage K (>= 1) picks its bucket by the count of point NAME
      stage K capacity C engine FILE          one per graph; C = 0 for the prefix; FILE relative to the folder"""
    runner = BucketedRunner(path, lazy=True)
    spec = runner.spec
    outputs = [str(n) for n in runner.stages[-1][0].get("outputs") or ["logits"]]
    names: list[str] = ["image", *runner.state_inputs, runner.suffix, *runner.points, *outputs]
    lines = [f"{ENGINE_MANIFEST_FORMAT} 1", f"size {runner.size[0]} {runner.size[1]}", f"batch {runner.batch}",
             "mean " + " ".join(repr(float(v)) for v in runner.mean),
             "std " + " ".join(repr(float(v)) for v in runner.std),
             f"raw_input {int(runner.raw_input)}", "input image", "state " + " ".join(runner.state_inputs),
             f"suffix {runner.suffix}", "count count", "output " + " ".join(outputs)]
    if "count" not in runner.state_inputs:
        raise usage_error(f"'{runner.folder / PIPELINE_FILE}' hands over no 'count' state; re-export the pipeline")
    lines += [f"point {k + 1} {name}" for k, name in enumerate(runner.points)]
    if len(runner.points) != len(runner.stages) - 1:
        raise usage_error(f"'{runner.folder / PIPELINE_FILE}' has {len(runner.stages)} stages for "
                           f"{len(runner.points)} reduction points; re-export the pipeline")
    for k, graphs in enumerate(spec["stages"]):
        for g in graphs["graphs"]:
            if not g.get("engine"):
                raise usage_error(f"stage graph '{g.get('onnx')}' of '{runner.folder}' has no engine; build them "
                                   "all with 'staticprune build DIR'")
            names.append(Path(g["engine"]).as_posix())
            lines.append(f"stage {k} capacity {int(g['capacity']) if k else 0} engine {Path(g['engine']).as_posix()}")
    bad = next((n for n in names if not n or any(ch.isspace() for ch in n)), None)
    if bad is not None:  # the manifest is split at spaces
        raise usage_error(f"name '{bad}' in '{runner.folder / PIPELINE_FILE}' is empty or holds white space; "
                           "rename it (the C++ manifest separates words by spaces)")
    return lines


def write_engine_manifest(path: str) -> Path:
    """Write DIR/pipeline.engines.txt (engine_manifest_lines) atomically; returns its path."""
    from staticprune.fileio import write_bytes_atomic

    folder = Path(path)
    folder = folder.parent if folder.name == PIPELINE_FILE else folder
    target = folder / ENGINE_MANIFEST_FILE
    write_bytes_atomic(("\n".join(engine_manifest_lines(str(folder))) + "\n").encode(), target)
    return target


__all__ = ["BucketedRunner", "ENGINE_MANIFEST_FILE", "attach_engines", "engine_manifest_lines", "pick_bucket",
           "stage_graphs", "write_engine_manifest"]
