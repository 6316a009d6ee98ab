"""`staticprune triton-repo`: a Triton Inference Server model repository for an engine or an ONNX graph.

Writes REPO/NAME/config.pbtxt (ModelConfig text format), REPO/NAME/<version>/model.plan|model.onnx, labels.txt,
staticprune.json (normalisation and I/O for clients) and REPO/README.md (server, perf_analyzer and client commands
for every model of the repository). Input/output names, dims and types come from the engine's JSON sidecar (written by
`staticprune build`), else from the ONNX graph beside the engine, or from the ONNX graph itself.

Imports neither torch nor tritonclient: it runs wherever onnx is installed (the Jetson image included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
DEFAULT_DYNAMIC_MAX_BATCH = 8
MANIFEST = "staticprune.json"
LABELS_FILE = "labels.txt"
# Triton container release whose TensorRT matches an engine's (an engine loads only in the TensorRT that built it).
TRITON_RELEASE_FOR_TENSORRT = {"10.3": "24.08"}
DEFAULT_TRITON_RELEASE = "24.08"  # CUDA 12.6, TensorRT 10.3: the version JetPack 6.1/6.2 ships

# ONNX TensorProto element types -> Triton data types (model_config.proto DataType).
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                  11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
# TensorRT DataType names, as `staticprune build` records them (str(trt.DataType.X) = "DataType.X").
TENSORRT_TO_TRITON = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT8": "TYPE_INT8",
                      "UINT8": "TYPE_UINT8", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL"}
# Triton data type -> the wire name clients use (tritonclient's np_to_triton_dtype), for the README and manifest.
TRITON_WIRE_NAME = {t: t[len("TYPE_"):] for t in set(ONNX_TO_TRITON.values())} | {"TYPE_STRING": "BYTES"}

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _usage_error(message: str) -> Exception:
    from staticprune.cli import UsageError

    return UsageError(message)


# --------------------------------------------------------------------------------------------- reading the model


@dataclass
class TensorSpec:
    name: str
    data_type: str  # Triton DataType name, e.g. TYPE_FP32
    shape: list[int]  # full shape, batch included; -1 for a dynamic dimension


@dataclass
class ModelSource:
    kind: str  # "onnx" | "engine"
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, Any]  # the graph's `staticprune` metadata (mean, std, classes, size, ...); {} if none
    extra_files: list[Path] = field(default_factory=list)  # external-data files of an ONNX graph
    plugin_nodes: bool = False  # an ONNX graph with TensorRT plugin nodes (ONNX Runtime cannot run it)
    plugins: list[str] = field(default_factory=list)  # plugin libraries recorded in an engine's sidecar
    tensorrt: Optional[str] = None  # TensorRT version that built the engine


def _load_onnx_header(path: Path):
    """The graph without its external weights (names, types, shapes and metadata are all that is needed)."""
    import onnx

    if not path.is_file():
        raise _usage_error(f"ONNX file '{path}' does not exist")
    if path.stat().st_size == 0:
        raise _usage_error(f"'{path}' is empty, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise _usage_error(f"'{path}' is not a readable ONNX model ({exc.__class__.__name__})") from None
    if not proto.opset_import or not proto.graph.node:
        raise _usage_error(f"'{path}' is not an ONNX model (no opset or no graph nodes)")
    return proto


def _onnx_tensor(value_info, path: Path) -> TensorSpec:
    tensor = value_info.type.tensor_type
    if tensor.elem_type not in ONNX_TO_TRITON:
        raise _usage_error(f"tensor '{value_info.name}' of '{path}' has ONNX element type {tensor.elem_type}, which "
                           "Triton has no data type for")
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
    return TensorSpec(value_info.name, ONNX_TO_TRITON[tensor.elem_type], shape)


def read_onnx(path: Path) -> ModelSource:
    import onnx

    proto = _load_onnx_header(path)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [_onnx_tensor(v, path) for v in proto.graph.input if v.name not in initializers]
    outputs = [_onnx_tensor(v, path) for v in proto.graph.output]
    metadata: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key == "staticprune":
            try:
                metadata = json.loads(entry.value)
            except json.JSONDecodeError:
                metadata = {}
    external = sorted({e.value for t in proto.graph.initializer
                       if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"})
    extra = [path.parent / name for name in external]
    for f in extra:
        if not f.is_file():
            raise _usage_error(f"'{path}' keeps its weights in '{f}', which does not exist: copy it beside the graph")
    plugin_nodes = any(n.domain not in ("", "ai.onnx") for n in proto.graph.node)
    return ModelSource("onnx", path, inputs, outputs, metadata, extra, plugin_nodes)


def _sidecar_tensor(entry: Any, sidecar: Path) -> TensorSpec:
    if not isinstance(entry, dict) or not {"name", "shape", "dtype"} <= set(entry):
        raise _usage_error(f"sidecar '{sidecar}' lists a tensor without name, shape and dtype; rebuild the engine "
                           "with 'staticprune build'")
    dtype = str(entry["dtype"]).split(".")[-1].upper()
    if dtype not in TENSORRT_TO_TRITON:
        raise _usage_error(f"tensor '{entry['name']}' of the engine has TensorRT type {entry['dtype']}, which Triton "
                           "has no data type for")
    return TensorSpec(str(entry["name"]), TENSORRT_TO_TRITON[dtype], [int(d) for d in entry["shape"]])


def _graph_beside_engine(engine: Path, sidecar: dict[str, Any]) -> Optional[Path]:
    """The ONNX graph the engine was built from: the sidecar's `onnx` (relative to the engine, then by file name
    beside it), else <stem>.onnx or <stem>.standard.onnx beside the engine."""
    candidates: list[Path] = []
    if sidecar.get("onnx"):
        recorded = Path(str(sidecar["onnx"]))
        candidates += [recorded if recorded.is_absolute() else engine.parent / recorded, engine.parent / recorded.name]
    stem = engine.name[: -len(engine.suffix)] if engine.suffix else engine.name
    candidates += [engine.parent / f"{stem}.onnx", engine.parent / f"{stem}.standard.onnx"]
    return next((c for c in candidates if c.is_file()), None)


def read_engine(path: Path) -> ModelSource:
    if not path.is_file():
        raise _usage_error(f"engine '{path}' does not exist")
    sidecar_path = Path(str(path) + ".json")
    sidecar: dict[str, Any] = {}
    if sidecar_path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _usage_error(f"sidecar '{sidecar_path}' is not a readable JSON file ({exc.__class__.__name__})") \
                from None
        if not isinstance(sidecar, dict):
            raise _usage_error(f"sidecar '{sidecar_path}' is not a 'staticprune build' sidecar (not a JSON object)")
    graph = _graph_beside_engine(path, sidecar)
    if isinstance(sidecar.get("inputs"), list) and isinstance(sidecar.get("outputs"), list) and sidecar["inputs"]:
        inputs = [_sidecar_tensor(e, sidecar_path) for e in sidecar["inputs"]]
        outputs = [_sidecar_tensor(e, sidecar_path) for e in sidecar["outputs"]]
        metadata = dict(sidecar.get("config") or {})
        if not metadata and graph is not None:
            metadata = read_onnx(graph).metadata
    elif graph is not None:  # no sidecar: the engine's I/O is the graph's (the parser keeps names, types, shapes)
        source = read_onnx(graph)
        inputs, outputs, metadata = source.inputs, source.outputs, source.metadata
    else:
        raise _usage_error(f"engine '{path}' has no sidecar '{sidecar_path.name}' and no ONNX graph beside it to read "
                           "its inputs and outputs from; build it with 'staticprune build' or copy the graph beside it")
    plugins = [str(p) for p in sidecar.get("plugins") or []]
    return ModelSource("engine", path, inputs, outputs, metadata, plugins=plugins,
                       tensorrt=str(sidecar["tensorrt"]) if sidecar.get("tensorrt") else None)


# --------------------------------------------------------------------------------------------- the configuration


@dataclass
class TritonModel:
    name: str
    backend: str  # "tensorrt" | "onnxruntime"
    device: str  # "gpu" | "cpu"
    instances: int
    max_batch_size: int  # 0: fixed batch, dims are full shapes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    label_output: Optional[str]  # the output that carries label_filename

    def dims(self, spec: TensorSpec) -> list[int]:
        """Triton dims: the full shape with max_batch_size 0, the shape without the batch dimension otherwise."""
        return list(spec.shape[1:]) if self.max_batch_size > 0 else list(spec.shape)


def dynamic_batch(source: ModelSource) -> bool:
    """True when every input and output has a dynamic first (batch) dimension: only then can Triton batch."""
    tensors = source.inputs + source.outputs
    return bool(tensors) and all(len(t.shape) >= 1 and t.shape[0] == -1 for t in tensors)


def _tensor_block(model: TritonModel, spec: TensorSpec, label_file: bool) -> list[str]:
    dims = model.dims(spec)
    lines = ["  {", f"    name: {json.dumps(spec.name)}", f"    data_type: {spec.data_type}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    else:  # a scalar, or a batch-only tensor under batching: Triton needs one dim at least, reshaped away
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    if label_file:
        lines.append(f"    label_filename: {json.dumps(LABELS_FILE)}")
    return lines + ["  }"]


def render_config(model: TritonModel) -> str:
    """config.pbtxt in protobuf text format (parsed by Triton as inference.ModelConfig)."""
    lines = [f"name: {json.dumps(model.name)}"]
    lines.append('platform: "tensorrt_plan"' if model.backend == "tensorrt" else 'backend: "onnxruntime"')
    lines.append(f"max_batch_size: {model.max_batch_size}")
    for key, tensors in (("input", model.inputs), ("output", model.outputs)):
        lines.append(f"{key} [")
        for i, spec in enumerate(tensors):
            lines += _tensor_block(model, spec, label_file=key == "output" and spec.name == model.label_output)
            if i < len(tensors) - 1:
                lines[-1] += ","
        lines.append("]")
    if model.max_batch_size > 0:
        lines.append("dynamic_batching { }")
    lines += ["instance_group [", "  {", f"    count: {model.instances}",
              f"    kind: {'KIND_GPU' if model.device == 'gpu' else 'KIND_CPU'}", "  }", "]"]
    return "\n".join(lines) + "\n"


def class_names(num_classes: int, given: Optional[list[str]] = None) -> tuple[list[str], str]:
    """(names, where they come from): the given list, Cityscapes (19) or ADE20K (150) names, else class_i."""
    if given is not None:
        return given, "--class-names"
    if num_classes == len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES), "Cityscapes (19 classes)"
    if num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES), "ADE20K (150 classes)"
    return [f"class_{i}" for i in range(num_classes)], "generic (class_i)"


def _num_classes(source: ModelSource) -> Optional[int]:
    """K from the logits output (B, K, H, W) when static, else the graph's metadata."""
    logits = next((t for t in source.outputs if t.name == "logits"), None)
    if logits is not None and len(logits.shape) == 4 and logits.shape[1] > 0:
        return logits.shape[1]
    classes = source.metadata.get("classes")
    return int(classes) if isinstance(classes, int) and classes > 0 else None


def _image_input(source: ModelSource) -> TensorSpec:
    return next((t for t in source.inputs if len(t.shape) == 4), source.inputs[0])


def _perf_shape(spec: TensorSpec, batched: bool, size: Optional[tuple[int, int]]) -> str:
    shape = list(spec.shape[1:]) if batched else list(spec.shape)
    if size and len(shape) >= 2:  # dynamic spatial dims: the size the graph was exported at
        shape[-2] = shape[-2] if shape[-2] > 0 else size[0]
        shape[-1] = shape[-1] if shape[-1] > 0 else size[1]
    shape = [d if d > 0 else 1 for d in shape]
    return f"{spec.name}:{','.join(str(d) for d in shape)}"


def build_manifest(model: TritonModel, source: ModelSource, version: int, names_source: str,
                   plugin_files: list[str], release: Optional[str]) -> dict[str, Any]:
    """What clients and the README need: I/O, normalisation, class names' source, plugins, Triton release."""
    meta = source.metadata
    size = meta.get("size")
    image = _image_input(source)
    return {
        "name": model.name, "version": version, "backend": model.backend, "device": model.device,
        "source": source.path.name, "max_batch_size": model.max_batch_size,
        "inputs": [{"name": t.name, "datatype": TRITON_WIRE_NAME[t.data_type], "shape": t.shape} for t in model.inputs],
        "outputs": [{"name": t.name, "datatype": TRITON_WIRE_NAME[t.data_type], "shape": t.shape}
                    for t in model.outputs],
        "image_input": image.name, "size": list(size) if size else list(image.shape[-2:]),
        "mean": meta.get("mean"), "std": meta.get("std"), "raw_input": bool(meta.get("raw_input", False)),
        "num_classes": _num_classes(source), "class_names": names_source, "model": meta.get("model"),
        "method": meta.get("method"), "plugins": plugin_files, "tensorrt": source.tensorrt, "triton_release": release,
        "perf_analyzer_shape": _perf_shape(image, model.max_batch_size > 0,
                                           tuple(size) if isinstance(size, (list, tuple)) and len(size) == 2 else None),
    }


# --------------------------------------------------------------------------------------------- the README


def _model_section(m: dict[str, Any]) -> list[str]:
    name = m["name"]
    batched = m["max_batch_size"] > 0
    lines = [f"## {name}", "",
             f"`{m['source']}` served by the {'TensorRT' if m['backend'] == 'tensorrt' else 'ONNX Runtime'} backend "
             f"on {m['device'].upper()} (version {m['version']}); "
             + (f"dynamic batching up to {m['max_batch_size']}." if batched
                else "fixed batch (max_batch_size 0: dims include the batch)."), "",
             "| tensor | kind | type | shape |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['name']} | input | {t['datatype']} | {t['shape']} |" for t in m["inputs"]]
    lines += [f"| {t['name']} | output | {t['datatype']} | {t['shape']} |" for t in m["outputs"]]
    norm = ("RGB 0..255 (the graph normalises)" if m["raw_input"]
            else f"RGB / 255, then (x - mean) / std with mean {m['mean']} and std {m['std']}" if m["mean"]
            else "as the model was trained (no mean/std recorded in the graph)")
    lines += ["", f"Input: `{m['image_input']}`, {norm}. `labels.txt` line i names class i "
              f"({m['class_names']}).", ""]
    if m["plugins"]:
        lib = ";".join(m["plugins"])
        where = ("it was copied into the model folder" if not m.get("plugins_missing") else
                 f"copy {', '.join(m['plugins_missing'])}, built for the server's TensorRT, into the model folder "
                 "first")
        lines += ["The engine has TensorRT plugin layers: the server must load the plugin library before the model "
                  f"({where}). Either of:", "", "```bash",
                  "tritonserver --model-repository=/models "
                  f"--backend-config=tensorrt,plugins=\"{_in_container(m, lib)}\"",
                  f"LD_PRELOAD={_in_container(m, lib).replace(';', ':')} tritonserver --model-repository=/models",
                  "```", ""]
    batch = " -b 4" if batched else ""
    lines += ["```bash",
              f"perf_analyzer -m {name}{batch} --shape {m['perf_analyzer_shape']} --concurrency-range 1:4",
              f"python triton_client.py street.png --meta {name}/{MANIFEST} -o labels.png   "
              "# examples/triton_client.py of staticprune",
              "```", ""]
    return lines


def _in_container(m: dict[str, Any], libs: str) -> str:
    return ";".join(f"/models/{m['name']}/{lib}" for lib in libs.split(";"))


def render_readme(manifests: list[dict[str, Any]]) -> str:
    releases = {m.get("triton_release") for m in manifests}
    # one release for every engine of the repository, or a placeholder when their TensorRT versions call for another
    release = DEFAULT_TRITON_RELEASE if releases <= {DEFAULT_TRITON_RELEASE} else "<yy.mm>"
    engines = [m for m in manifests if m["backend"] == "tensorrt"]
    with_plugins = [m for m in engines if m["plugins"]]
    preload = ""
    if with_plugins:
        preload = (" \\\n    --backend-config=tensorrt,plugins=\""
                   + ";".join(_in_container(m, ";".join(m["plugins"])) for m in with_plugins) + "\"")
    lines = ["# Triton model repository (written by `staticprune triton-repo`)", "",
             "Start the server from this folder (x86 with an NVIDIA GPU; HTTP on 8000, gRPC on 8001, metrics on 8002):",
             "", "```bash",
             "docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 -v \"$PWD\":/models \\",
             f"    nvcr.io/nvidia/tritonserver:{release}-py3 tritonserver --model-repository=/models{preload}",
             "```", ""]
    if engines:
        trt = sorted({m["tensorrt"] for m in engines if m["tensorrt"]})
        lines += ["A TensorRT engine loads only in the TensorRT version that built it"
                  + (f" (here {', '.join(trt)})" if trt else "")
                  + f": Triton {DEFAULT_TRITON_RELEASE} carries TensorRT 10.3 (CUDA 12.6), the version of JetPack "
                  "6.1/6.2 and of `nvcr.io/nvidia/tensorrt:24.08-py3`. For another TensorRT, use the Triton release "
                  "that carries it "
                  "(NVIDIA's Frameworks Support Matrix lists them; `dpkg -l | grep nvinfer` inside the container "
                  "shows it). On a Jetson, use the `-py3-igpu` image of the matching release, or the Triton tarball "
                  "for JetPack from the Triton release page, with `--runtime nvidia` instead of `--gpus all`; build "
                  "the engine on the Jetson itself.", ""]
    lines += ["Check that every model is READY: `curl -s localhost:8000/v2/models/<name>/ready -o /dev/null -w "
              "'%{http_code}\\n'` prints 200. `perf_analyzer` comes with the SDK image: `docker run --rm --net host "
              f"nvcr.io/nvidia/tritonserver:{release}-py3-sdk perf_analyzer ...`. The example client needs "
              "`pip install \"tritonclient[http]\" pillow numpy`.", ""]
    for m in sorted(manifests, key=lambda m: m["name"]):
        lines += _model_section(m)
    return "\n".join(lines).rstrip() + "\n"


def _repo_manifests(repo: Path) -> list[dict[str, Any]]:
    found = []
    for child in sorted(repo.iterdir()):
        path = child / MANIFEST
        if child.is_dir() and not child.name.startswith(".") and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # not ours or damaged: leave it out of the README
            if isinstance(data, dict) and {"name", "backend", "inputs", "outputs"} <= set(data):
                found.append(data)
    return found


# --------------------------------------------------------------------------------------------- writing


def _place(src: Path, dest: Path, link: bool) -> None:
    """Copy (or hard-link with --link, falling back to a copy across filesystems) `src` to `dest`."""
    if link:
        try:
            os.link(src, dest)
            return
        except OSError:
            pass
    shutil.copyfile(src, dest)


def _write_text(path: Path, text: str) -> None:
    from staticprune.fileio import write_bytes_atomic

    write_bytes_atomic(text.encode(), path)


def _install_model_dir(staging: Path, final: Path) -> None:
    """Swap the staged folder in: an empty or absent target is replaced by one rename; an existing one (--force)
    is moved aside first and removed after, so the repository never holds half a model."""
    if final.exists() and any(final.iterdir()):
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, aside / final.name)
        try:
            os.replace(staging, final)
        except BaseException:
            os.replace(aside / final.name, final)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, final)


def write_repository(source: ModelSource, repo: Path, model: TritonModel, version: int, link: bool, names: list[str],
                     names_source: str, plugin_libs: list[Path], release: Optional[str],
                     plugins_missing: tuple[str, ...] = ()) -> dict[str, Any]:
    """plugins_missing: file names of plugin libraries the engine needs that were not found to copy."""
    from staticprune.fileio import current_umask

    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.partial-", dir=repo))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp gives 0700; a folder's usual mode instead
        version_dir = staging / str(version)
        version_dir.mkdir()
        target = "model.plan" if model.backend == "tensorrt" else "model.onnx"
        _place(source.path, version_dir / target, link)
        for extra in source.extra_files:  # external weights keep the file name the graph refers to
            _place(extra, version_dir / extra.name, link)
        for lib in plugin_libs:
            shutil.copyfile(lib, staging / lib.name)
        (staging / "config.pbtxt").write_text(render_config(model))
        (staging / LABELS_FILE).write_text("\n".join(names) + "\n")
        manifest = build_manifest(model, source, version, names_source,
                                  [p.name for p in plugin_libs] + list(plugins_missing), release)
        manifest["plugins_missing"] = list(plugins_missing)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _install_model_dir(staging, repo / model.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_text(repo / "README.md", render_readme(_repo_manifests(repo)))
    return manifest


# --------------------------------------------------------------------------------------------- command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository for an engine or graph")
    p.add_argument("model_path", metavar="MODEL_PATH",
                   help="TensorRT engine (*.engine / *.plan, with the .json sidecar 'staticprune build' writes) or "
                        "ONNX graph (*.onnx)")
    p.add_argument("-o", "--output", required=True, metavar="REPO", help="model repository folder")
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--version", type=int, default=1, help="model version folder (default 1)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime"], default="auto",
                   help="auto: tensorrt for an engine, onnxruntime for an ONNX graph")
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu",
                   help="instance kind (default gpu; the TensorRT backend runs on GPU only)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help=f"for graphs with a dynamic batch dimension (default {DEFAULT_DYNAMIC_MAX_BATCH}); "
                        "fixed-batch graphs get max_batch_size 0")
    p.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    p.add_argument("--plugin-lib", action="append", default=[], metavar="PATH",
                   help="TensorRT plugin library to copy into the model folder (default: the ones the sidecar "
                        "records, when they exist here)")
    p.add_argument("--class-names", metavar="FILE", help="class names, one a line (default: Cityscapes or ADE20K "
                   "names when the class count is 19 or 150, else class_i)")
    p.add_argument("--link", action="store_true", help="hard-link the model file instead of copying it (same "
                   "filesystem; copies otherwise)")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty model folder")
    p.set_defaults(func=cmd_triton_repo)


def _source_kind(path: Path, backend: str) -> str:
    if path.suffix == ".onnx":
        kind = "onnx"
    elif path.suffix in ENGINE_SUFFIXES or Path(str(path) + ".json").is_file():
        kind = "engine"
    else:
        raise _usage_error(f"'{path}' is neither an ONNX graph (*.onnx) nor a TensorRT engine (*.engine, *.plan "
                           "with its .json sidecar)")
    if backend == "tensorrt" and kind == "onnx":
        raise _usage_error(f"Triton's TensorRT backend serves engines, and '{path}' is an ONNX graph: build one with "
                           "'staticprune build' (or use --backend onnxruntime)")
    if backend == "onnxruntime" and kind == "engine":
        raise _usage_error(f"the ONNX Runtime backend serves ONNX graphs, and '{path}' is a TensorRT engine: pass the "
                           "graph it was built from, or use --backend tensorrt")
    return kind


def _read_class_names(path: Optional[str], num_classes: Optional[int]) -> Optional[list[str]]:
    if not path:
        return None
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise _usage_error(f"--class-names '{path}' is not a readable text file ({exc.__class__.__name__})") from None
    if num_classes is not None and len(names) != num_classes:
        raise _usage_error(f"--class-names '{path}' has {len(names)} names; the model has {num_classes} classes")
    return names


def _plugin_libraries(given: list[str], source: ModelSource) -> tuple[list[Path], tuple[str, ...]]:
    """(libraries to copy, file names of recorded libraries not found here)."""
    from staticprune.cli import log

    for lib in given:
        if not Path(lib).is_file():
            raise _usage_error(f"plugin library '{lib}' does not exist; build it with 'make plugins'")
    if given:
        return [Path(p) for p in given], ()
    present = [Path(p) for p in source.plugins if Path(p).is_file()]
    missing = [p for p in source.plugins if not Path(p).is_file()]
    if missing:
        log(f"[staticprune] note: the engine was built with plugin library {', '.join(missing)}, not found here: "
            "pass --plugin-lib PATH (the library built for the server's TensorRT), or load it at server start")
    return present, tuple(Path(p).name for p in missing)


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from staticprune.cli import EXIT_OK, log

    path = Path(args.model_path)
    kind = _source_kind(path, args.backend)
    repo = Path(args.output)
    if repo.exists() and not repo.is_dir():
        raise _usage_error(f"repository '{repo}' exists and is not a folder")
    name = args.name or (path.name[: -len(path.suffix)] if path.suffix else path.name)
    if not _MODEL_NAME.match(name):
        raise _usage_error(f"model name '{name}' must be letters, digits, '_', '-' or '.', not starting with '.' or "
                           "'-'; pass --name NAME")
    if args.version < 1:
        raise _usage_error(f"--version must be >= 1 (got {args.version})")
    if args.instances < 1:
        raise _usage_error(f"--instances must be >= 1 (got {args.instances})")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise _usage_error(f"--max-batch-size must be >= 1 (got {args.max_batch_size})")
    if kind == "engine" and args.device == "cpu":
        raise _usage_error("the TensorRT backend runs on GPU only: drop --device cpu, or serve the ONNX graph with "
                           "--backend onnxruntime --device cpu")
    if kind == "onnx" and args.plugin_lib:
        raise _usage_error("--plugin-lib is for TensorRT engines; the ONNX Runtime backend cannot run plugin layers")
    model_dir = repo / name
    if model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir())) and not args.force:
        raise _usage_error(f"model folder '{model_dir}' exists and is not empty; pass --force to replace it")

    source = read_onnx(path) if kind == "onnx" else read_engine(path)
    if not source.inputs or not source.outputs:
        raise _usage_error(f"'{path}' has no inputs or no outputs to serve")
    if source.plugin_nodes:
        raise _usage_error(f"'{path}' has TensorRT plugin nodes, which ONNX Runtime cannot run: serve the standard-op "
                           "graph exported beside it (*.standard.onnx), or an engine built from this graph")
    batched = dynamic_batch(source)
    if args.max_batch_size is not None and not batched:
        batch = source.inputs[0].shape[0] if source.inputs[0].shape else 1
        raise _usage_error(f"'{path}' has a fixed batch ({batch}), so Triton cannot batch requests: drop "
                           "--max-batch-size (the repository uses max_batch_size 0), or export with a dynamic batch")
    if not batched and any(-1 in t.shape for t in source.inputs):
        log(f"[staticprune] note: inputs of '{path}' have dynamic dimensions (-1 in the config); clients send the "
            "shapes the graph accepts")
    num_classes = _num_classes(source)
    given_names = _read_class_names(args.class_names, num_classes)
    names, names_source = class_names(num_classes or len(given_names or []), given_names)
    output_names = [t.name for t in source.outputs]
    label_output = "logits" if "logits" in output_names else "labels" if "labels" in output_names else None
    backend = "tensorrt" if kind == "engine" else "onnxruntime"
    model = TritonModel(name, backend, args.device, args.instances,
                        (args.max_batch_size or DEFAULT_DYNAMIC_MAX_BATCH) if batched else 0,
                        source.inputs, source.outputs, label_output if names else None)
    plugin_libs, plugins_missing = _plugin_libraries(args.plugin_lib, source) if kind == "engine" else ([], ())
    trt_minor = ".".join((source.tensorrt or "").split(".")[:2])
    release: Optional[str] = DEFAULT_TRITON_RELEASE
    if kind == "engine" and source.tensorrt and trt_minor not in TRITON_RELEASE_FOR_TENSORRT:
        release = None  # the README shows <yy.mm>: the release that carries this TensorRT
        log(f"[staticprune] note: the engine was built with TensorRT {source.tensorrt}; serve it with the Triton "
            "release that carries that version (24.08 carries 10.3)")
    write_repository(source, repo, model, args.version, args.link, names, names_source, plugin_libs, release,
                     plugins_missing)
    print(f"wrote {model_dir} ({'TensorRT' if kind == 'engine' else 'ONNX Runtime'}, "
          f"{'dynamic batching up to ' + str(model.max_batch_size) if batched else 'fixed batch'}, "
          f"{len(source.inputs)} input(s), outputs {', '.join(output_names)}; {len(names)} class names from "
          f"{names_source}) and {repo / 'README.md'}")
    return EXIT_OK
