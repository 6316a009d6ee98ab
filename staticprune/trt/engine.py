"""Build a TensorRT engine from an exported graph, with a JSON sidecar; compare an engine with ONNX Runtime.

Runs on the Jetson image, which has TensorRT, onnx, numpy (1.x), onnxruntime and polygraphy but no PyTorch: this
module and everything it imports must stay torch-free (tests/test_engine_tools.py runs it with torch blocked).
The TensorRT import is guarded: where TensorRT is absent (CI, a laptop) every entry point that needs it raises
TensorRTUnavailable with a one-line message saying where to run it instead.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from staticprune.verify.decisions import RuntimeComparison, compare_runs

METADATA_KEY = "staticprune"
PRECISION_METADATA_KEY = "staticprune.precision"  # "fp16": exported with mixed precision (FP16 net, FP32 decisions)
STANDARD_SUFFIX = ".standard.onnx"
_DEFAULT_DOMAINS = ("", "ai.onnx")


class TensorRTUnavailable(RuntimeError):
    pass


class TimingCacheError(ValueError):
    """The timing cache file was rejected (another TensorRT version or GPU, or not a cache)."""


class StandardGraphNotFound(FileNotFoundError):
    """No standard-op graph (one ONNX Runtime can run) was found for `verify --engine`."""


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed here (no Python module 'tensorrt'): run this on the Jetson (JetPack 6.1/6.2, "
            "python3-libnvinfer) or inside the docker/Dockerfile.jetson or docker/Dockerfile.x86 image"
        ) from None
    return trt


def load_plugins(paths: Sequence[str]) -> None:
    """dlopen each plugin library: its static REGISTER_TENSORRT_PLUGIN creators register themselves."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"plugin library '{path}' does not exist")
        ctypes.CDLL(str(Path(path).resolve()), mode=ctypes.RTLD_GLOBAL)


# --------------------------------------------------------------------------------------------- graph facts


def graph_metadata(proto) -> dict[str, Any]:
    """The `staticprune` metadata JSON of an exported graph ({} if none)."""
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            try:
                return json.loads(entry.value)
            except json.JSONDecodeError:
                return {}
    return {}


def graph_precision(proto) -> str:
    """'fp16' for a graph exported with mixed precision (its tensor types fix each layer's precision), else 'fp32'.

    Read from the metadata entry `staticprune.precision`, or a `precision` field of the `staticprune` JSON."""
    for entry in proto.metadata_props:
        if entry.key == PRECISION_METADATA_KEY:
            return entry.value.strip().lower()
    return str(graph_metadata(proto).get("precision", "fp32")).lower()


def has_plugin_nodes(proto) -> bool:
    """True for a graph with TensorRT plugin nodes (custom domains), which ONNX Runtime cannot run."""
    return any(node.domain not in _DEFAULT_DOMAINS for node in proto.graph.node)


def relative_to(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """`path` relative to `folder` (POSIX separators), so a sidecar stays valid when both move together."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()
    except ValueError:  # another drive (Windows): nothing relative exists
        return Path(path).resolve().as_posix()


# --------------------------------------------------------------------------------------------- build


def _io(engine, trt) -> tuple[list[dict], list[dict]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {"name": name, "shape": list(engine.get_tensor_shape(name)), "dtype": str(engine.get_tensor_dtype(name))}
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    return inputs, outputs


def network_flags(trt, strongly_typed: bool) -> int:
    """Explicit batch is the only mode in TensorRT 10 (flag 0); strongly typed: the ONNX types fix precisions."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0


def build_engine(
    onnx_path: str,
    engine_path: str,
    fp16: bool = False,
    strongly_typed: bool = False,
    plugins: Sequence[str] = (),
    timing_cache: Optional[str] = None,
    workspace_mb: int = 4096,
    metadata: Optional[dict[str, Any]] = None,
    standard_graph: Optional[str] = None,
) -> dict[str, Any]:
    """Parse, build and serialise; write the engine and `<engine>.json` atomically. Returns the sidecar.

    strongly_typed: build a strongly typed network; the FP16 builder flag is then not set (the ONNX tensor types
    decide every layer's precision), whatever `fp16` says. Paths in the sidecar are relative to the engine's folder
    (plugin libraries, which live with the system, stay absolute)."""
    from staticprune.fileio import write_bytes_atomic

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    load_plugins(plugins)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # set_timing_cache returns False when the cache does not match this TensorRT version / GPU (ignore_mismatch=False)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TimingCacheError(f"TensorRT rejected the timing cache '{timing_cache}' (written by another TensorRT "
                               "version or GPU, or not a timing cache): delete it or pass another --timing-cache")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    seconds = time.perf_counter() - t0
    write_bytes_atomic(bytes(plan), engine_path)
    if timing_cache:
        write_bytes_atomic(bytes(config.get_timing_cache().serialize()), timing_cache)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inputs, outputs = _io(engine, trt)
    folder = Path(engine_path).parent
    sidecar = {"engine": Path(engine_path).name, "onnx": relative_to(onnx_path, folder),
               "standard_graph": relative_to(standard_graph, folder) if standard_graph else None,
               "tensorrt": trt.__version__, "fp16": bool(fp16 and not strongly_typed),
               "strongly_typed": strongly_typed, "plugins": [str(Path(p).resolve()) for p in plugins],
               "build_seconds": seconds, "inputs": inputs, "outputs": outputs, "config": metadata or {},
               "capacities": {k: v for k, v in (metadata or {}).get("method_options", {}).items() if "capacity" in k}}
    write_bytes_atomic((json.dumps(sidecar, indent=2) + "\n").encode(), str(engine_path) + ".json")
    return sidecar


# --------------------------------------------------------------------------------------------- the standard graph


@dataclass
class StandardGraph:
    path: Path
    proto: Any  # onnx.ModelProto


def _load_graph(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception:  # protobuf raises DecodeError and friends: not a graph, keep looking
        return None


def _standard_beside(graph: Path) -> Path:
    stem = graph.name[: -len(".onnx")] if graph.name.endswith(".onnx") else graph.name
    return graph.with_name(stem + STANDARD_SUFFIX)


def standard_graph_candidates(engine_path: str, onnx_path: Optional[str], sidecar: Mapping[str, Any],
                              load: Callable[[Path], Any] = _load_graph) -> list[Path]:
    """Where the standard-op graph of an engine may be, in the order they are tried.

    1. the graph the engine was built from (the given ONNX, else the sidecar's `onnx`, relative to the engine, then
       by basename beside the engine), if it has no plugin nodes, and `<its stem>.standard.onnx` beside it;
    2. the recorded standard graph (sidecar `standard_graph`, relative to the engine; a plugin graph's
       `standard_graph` metadata, relative to that graph), then its basename beside that graph and the engine;
    3. `<engine stem>.standard.onnx` and `<engine stem>.onnx` beside the engine;
    4. last, recorded absolute paths as they were on the machine that exported or built them."""
    engine = Path(engine_path)
    engine_dir = engine.parent
    built_from: list[Path] = [Path(onnx_path)] if onnx_path else []
    absolute: list[Path] = []  # tried last, in this order
    if sidecar.get("onnx"):
        recorded = Path(sidecar["onnx"])
        if recorded.is_absolute():
            absolute += [recorded, _standard_beside(recorded)]
        else:
            built_from.append(engine_dir / recorded)
        built_from.append(engine_dir / recorded.name)
    recorded_standard: list[tuple[str, Path]] = []  # (recorded text, the folder it is relative to)
    if sidecar.get("standard_graph"):
        recorded_standard.append((str(sidecar["standard_graph"]), engine_dir))
    candidates: list[Path] = []
    for graph in built_from:
        candidates += [graph, _standard_beside(graph)]
    for graph in built_from + absolute[:1]:
        proto = load(graph) if graph.is_file() else None
        text = graph_metadata(proto).get("standard_graph") if proto is not None else None
        if text:
            recorded_standard.append((str(text), graph.parent))
    for text, folder in recorded_standard:
        recorded = Path(text)
        if recorded.is_absolute():
            absolute.append(recorded)
        else:
            candidates.append(folder / recorded)
        candidates += [folder / recorded.name, engine_dir / recorded.name]
    engine_stem = engine.name[: -len(engine.suffix)] if engine.suffix else engine.name
    candidates += [engine_dir / (engine_stem + STANDARD_SUFFIX), engine_dir / (engine_stem + ".onnx")]
    candidates += absolute
    unique: list[Path] = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return unique


def find_standard_graph(engine_path: str, onnx_path: Optional[str] = None, standard_path: Optional[str] = None,
                        sidecar: Optional[Mapping[str, Any]] = None) -> StandardGraph:
    """The standard-op graph ONNX Runtime runs as the reference of `engine_path` (see standard_graph_candidates).

    `standard_path` (from --standard) is used as is and must have no plugin nodes. Raises StandardGraphNotFound
    listing every place it looked."""
    if standard_path:
        proto = _load_graph(Path(standard_path)) if Path(standard_path).is_file() else None
        if proto is None:
            raise StandardGraphNotFound(f"standard graph '{standard_path}' does not exist or is not a readable ONNX "
                                        "model")
        if has_plugin_nodes(proto):
            raise StandardGraphNotFound(f"'{standard_path}' has TensorRT plugin nodes, which ONNX Runtime cannot "
                                        "run: pass the standard-op graph exported beside it (*.standard.onnx)")
        return StandardGraph(Path(standard_path), proto)
    loaded: dict[Path, Any] = {}

    def load(path: Path):  # each graph is parsed once (they can be hundreds of MB)
        if path.resolve() not in loaded:
            loaded[path.resolve()] = _load_graph(path)
        return loaded[path.resolve()]

    looked: list[str] = []
    for candidate in standard_graph_candidates(engine_path, onnx_path, sidecar or {}, load):
        if not candidate.is_file():
            looked.append(f"{candidate} (missing)")
            continue
        proto = load(candidate)
        if proto is None:
            looked.append(f"{candidate} (not ONNX)")
        elif has_plugin_nodes(proto):
            looked.append(f"{candidate} (plugin graph)")
        else:
            return StandardGraph(candidate, proto)
    raise StandardGraphNotFound("no standard-op ONNX graph found for the engine; looked at: " + "; ".join(looked)
                                + "; pass it with --standard PATH")


# --------------------------------------------------------------------------------------------- inputs


def graph_input(proto) -> tuple[str, tuple[int, ...], np.dtype]:
    """Name, static shape and numpy dtype of the graph's (single) image input."""
    from onnx import helper

    first = proto.graph.input[0]
    tensor = first.type.tensor_type
    shape = tuple(d.dim_value for d in tensor.shape.dim)
    if any(d <= 0 for d in shape):
        raise ValueError(f"graph input '{first.name}' has no static shape ({shape}); staticprune graphs are static")
    return first.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))


def generated_feeds(shape: Sequence[int], count: int, seed: int, raw_input: bool = False) -> list[np.ndarray]:
    """Deterministic image-like inputs without PyTorch: a smooth random field (coarse grid, bilinear upsampling)
    plus noise, N(0, 1)-scaled; mapped to 0..255 for raw-input graphs. Both runtimes get the same arrays."""
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.standard_normal((b, c, max(h // 32, 1), max(w // 32, 1)))
        smooth = _upsample_bilinear(coarse, h, w)
        x = smooth + 0.3 * rng.standard_normal((b, c, h, w))
        if raw_input:
            x = np.clip(x * 48.0 + 127.5, 0.0, 255.0)
        out.append(x.astype(np.float32))
    return out


def _upsample_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of the last two axes (half-pixel centres, edges clamped)."""
    def axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    lo, hi, t = axis_weights(x.shape[-2], h)
    x = x[..., lo, :] * (1 - t)[:, None] + x[..., hi, :] * t[:, None]
    lo, hi, t = axis_weights(x.shape[-1], w)
    return x[..., lo] * (1 - t) + x[..., hi] * t


def file_feeds(paths: Sequence[str], shape: Sequence[int], metadata: Mapping[str, Any]) -> list[np.ndarray]:
    """Images (resized, normalised with the mean/std recorded in the graph) or .npy arrays, batch-expanded."""
    from staticprune.imageio import load_input_array

    b, _, h, w = shape
    raw = bool(metadata.get("raw_input", False))
    feeds = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"input '{path}' does not exist or is not a file")
        if not path.endswith(".npy") and not raw and not ("mean" in metadata and "std" in metadata):
            raise ValueError(f"the standard graph records no mean/std to normalise '{path}' with; pass .npy inputs")
        arr = load_input_array(path, (h, w), metadata.get("mean", (0.0, 0.0, 0.0)), metadata.get("std", (1.0, 1.0, 1.0)),
                               raw=raw)
        if arr.shape[0] == 1 and b > 1:
            arr = np.repeat(arr, b, axis=0)
        if arr.shape[0] != b:
            raise ValueError(f"input '{path}' has batch {arr.shape[0]}; the graph takes batch {b}")
        feeds.append(np.ascontiguousarray(arr, dtype=np.float32))
    return feeds


# --------------------------------------------------------------------------------------------- verify


def run_reference(standard_graph: str, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """ONNX Runtime (CPU) on the standard-op graph."""
    from staticprune.runtime.ort import ort_session

    session = ort_session(standard_graph)
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, dict(feed)))) for feed in feeds]


def run_engine(engine_path: str, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The engine through polygraphy's TensorRT runner (plugins must be loaded already)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(Path(engine_path).read_bytes())) as runner:
        return [{k: np.array(v) for k, v in runner.infer(dict(feed)).items()} for feed in feeds]


def verify_engine(engine_path: str, standard_graph: str, feeds: list[dict[str, np.ndarray]],
                  plugins: Sequence[str] = (), atol: float = 1e-2, rtol: float = 1e-2,
                  margin_eps: Optional[float] = None) -> RuntimeComparison:
    """Engine vs ONNX Runtime on the standard-op graph, decision-aware (staticprune.verify.decisions): decisions
    first (flips reported with their margins), then labels (agreement) and features where the decisions agreed."""
    require_tensorrt()
    load_plugins(plugins)
    got = run_engine(engine_path, feeds)
    ref = run_reference(standard_graph, feeds)
    return compare_runs(got, ref, atol=atol, rtol=rtol, margin_eps=margin_eps)
