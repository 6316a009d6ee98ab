"""TensorRT engine building and checking (optional: needs the TensorRT Python bindings, e.g. on a Jetson).

Torch-free: this package runs on the Jetson image, which has no PyTorch.
"""

from staticprune.trt.engine import (StandardGraphNotFound, TensorRTUnavailable, TimingCacheError, build_engine,
                                    find_standard_graph, require_tensorrt, verify_engine)

__all__ = ["StandardGraphNotFound", "TensorRTUnavailable", "TimingCacheError", "build_engine", "find_standard_graph",
           "require_tensorrt", "verify_engine"]
