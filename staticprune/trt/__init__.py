"""TensorRT engine building and checking (optional: needs the TensorRT Python bindings, e.g. on a Jetson)."""

from staticprune.trt.engine import TensorRTUnavailable, build_engine, require_tensorrt, verify_engine

__all__ = ["TensorRTUnavailable", "build_engine", "require_tensorrt", "verify_engine"]
