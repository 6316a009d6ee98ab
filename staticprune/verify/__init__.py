"""Parity harness: L1 (static vs eager reference) and L2 (ONNX Runtime vs static), decision-aware."""

from staticprune.verify.parity import OutputDiff, VerifyReport, compare_outputs, run_onnxruntime, verify_onnx

__all__ = ["OutputDiff", "VerifyReport", "compare_outputs", "run_onnxruntime", "verify_onnx"]
