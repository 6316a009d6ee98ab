"""Parity harness: ONNX Runtime vs PyTorch, decision-aware."""

from staticprune.verify.parity import OutputDiff, VerifyReport, compare_outputs, run_onnxruntime, verify_onnx

__all__ = ["OutputDiff", "VerifyReport", "compare_outputs", "run_onnxruntime", "verify_onnx"]
