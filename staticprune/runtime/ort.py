"""The one place where the project creates ONNX Runtime sessions."""

from __future__ import annotations

import os
from typing import Any, Optional

# ONNX Runtime's CPU kernels can take a slow path on denormal floats, which a Softmax over keys masked with a large
# negative bias may produce (a 3x slower (1, 12, 2304, 2304) Softmax with 60 % of the keys masked was measured on one
# x86 CPU; another showed no difference). Flushing denormals to zero changes no output that matters (they are
# below 1.2e-38), so every session the project creates sets it.
DENORMAL_AS_ZERO = {"session.set_denormal_as_zero": "1"}


def session_options(threads: Optional[int] = None, profile_prefix: Optional[str] = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in DENORMAL_AS_ZERO.items():
        opts.add_session_config_entry(key, value)
    if threads:
        opts.intra_op_num_threads = threads
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def ort_session(model: Any, threads: Optional[int] = None, profile_prefix: Optional[str] = None,
                providers: Optional[list[str]] = None) -> Any:
    """An ONNX Runtime session on a graph path, serialized bytes or an onnx.ModelProto (CPU unless `providers`)."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        src: Any = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        src = bytes(model)
    else:
        src = os.fspath(model)
    opts = session_options(threads, profile_prefix)
    return ort.InferenceSession(src, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
