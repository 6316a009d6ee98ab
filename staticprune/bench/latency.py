"""Latency measurement: warm-up excluded, min / median / max over repeats."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass
class LatencyStats:
    backend: str
    min_ms: float
    median_ms: float
    max_ms: float
    repeats: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)


def time_callable(fn: Callable[[], object], backend: str, warmup: int = 2, repeats: int = 10) -> LatencyStats:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return LatencyStats(backend, min(times), statistics.median(times), max(times), repeats, warmup)
