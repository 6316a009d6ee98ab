"""Build a TensorRT engine from an exported graph, with a JSON sidecar; compare an engine with ONNX Runtime.

The TensorRT import is guarded: where TensorRT is absent (CI, a laptop) every entry point raises
TensorRTUnavailable with a message saying where to run it instead.
"""

from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


class TensorRTUnavailable(RuntimeError):
    pass


def require_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT's Python bindings are not installed here; run this on a Jetson with JetPack 6.1/6.2 "
            "(python3-libnvinfer) or inside docker/Dockerfile.x86 / docker/Dockerfile.jetson"
        ) from None
    return trt


def load_plugins(paths: Sequence[str]) -> None:
    """dlopen each plugin library: its static REGISTER_TENSORRT_PLUGIN creators register themselves."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"plugin library '{path}' does not exist")
        ctypes.CDLL(str(Path(path).resolve()), mode=ctypes.RTLD_GLOBAL)


def _io(engine, trt) -> tuple[list[dict], list[dict]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {"name": name, "shape": list(engine.get_tensor_shape(name)), "dtype": str(engine.get_tensor_dtype(name))}
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    return inputs, outputs


def build_engine(
    onnx_path: str,
    engine_path: str,
    fp16: bool = False,
    plugins: Sequence[str] = (),
    timing_cache: Optional[str] = None,
    workspace_mb: int = 4096,
    metadata: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Parse, build and serialise; write the engine and `<engine>.json` atomically. Returns the sidecar."""
    from staticprune.fileio import write_bytes_atomic

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    load_plugins(plugins)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
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
    sidecar = {"engine": str(engine_path), "onnx": str(onnx_path), "tensorrt": trt.__version__, "fp16": fp16,
               "plugins": [str(Path(p).resolve()) for p in plugins], "build_seconds": seconds,
               "inputs": inputs, "outputs": outputs, "config": metadata or {},
               "capacities": {k: v for k, v in (metadata or {}).get("method_options", {}).items() if "capacity" in k}}
    write_bytes_atomic((json.dumps(sidecar, indent=2) + "\n").encode(), str(engine_path) + ".json")
    return sidecar


def verify_engine(engine_path: str, onnx_path: str, feeds: list[dict[str, np.ndarray]], plugins: Sequence[str] = (),
                  atol: float = 1e-3, rtol: float = 1e-3) -> dict[str, Any]:
    """Engine vs ONNX Runtime (standard-op graph) through polygraphy's runners; max abs error per output."""
    require_tensorrt()
    load_plugins(plugins)
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    results: dict[str, dict[str, float]] = {}
    with TrtRunner(EngineFromBytes(Path(engine_path).read_bytes())) as trt_runner, \
            OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"])) as ort_runner:
        for feed in feeds:
            got, ref = trt_runner.infer(feed), ort_runner.infer(feed)
            for name, r in ref.items():
                r64 = np.asarray(r, dtype=np.float64)
                err = np.abs(np.asarray(got[name], dtype=np.float64) - r64)
                entry = results.setdefault(name, {"max_abs": 0.0, "failing": 0})
                entry["max_abs"] = max(entry["max_abs"], float(err.max()))
                entry["failing"] += int((err > atol + rtol * np.abs(r64)).sum())  # polygraphy's elementwise rule
    ok = all(e["failing"] == 0 for e in results.values())
    return {"ok": ok, "outputs": results, "atol": atol, "rtol": rtol, "inputs": len(feeds)}
