"""Parity harness: L1 (static vs eager reference) and L2 (ONNX Runtime vs static), decision-aware.

Names are loaded lazily: `staticprune.verify.decisions` (numpy only) must import without PyTorch, which
`staticprune.verify.parity` needs, so importing this package imports neither.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"OutputDiff": "decisions", "compare_outputs": "decisions", "VerifyReport": "parity",
         "run_onnxruntime": "parity", "verify_onnx": "parity"}

__all__ = ["OutputDiff", "VerifyReport", "compare_outputs", "run_onnxruntime", "verify_onnx"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"staticprune.verify.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'staticprune.verify' has no attribute '{name}'")
