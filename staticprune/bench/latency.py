"""Latency measurement: warm-up excluded, min / median / max over repeats.

`time_interleaved` times several variants (the unreduced model, the static graph, ...) round by round, so that all
of them see the same machine load: on a shared machine, timing one variant after the other can put a load spike
entirely into one of them. `spread` says how much one variant's samples varied during such a run."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Hashable, Mapping, Sequence


@dataclass
class LatencyStats:
    backend: str
    min_ms: float
    median_ms: float
    max_ms: float
    repeats: int
    warmup: int
    samples: list[float] = field(default_factory=list)  # every timed run, ms, in the order taken

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples")  # the `bench` JSON keeps its summary fields only
        return d


def _stats(backend: str, times: list[float], warmup: int) -> LatencyStats:
    return LatencyStats(backend, min(times), statistics.median(times), max(times), len(times), warmup, list(times))


def time_callable(fn: Callable[[], object], backend: str, warmup: int = 2, repeats: int = 10) -> LatencyStats:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(backend, times, warmup)


def time_interleaved(variants: Mapping[Hashable, tuple[str, Callable[[], object]]], warmup: int, repeats: int
                     ) -> dict[Hashable, LatencyStats]:
    """Times every variant once per round, `warmup` untimed rounds then `repeats` timed ones.

    `variants` maps a key to (backend name, callable). The order within a round rotates by one each round, so no
    variant always runs first (after an idle gap) or right after the most expensive one."""
    keys = list(variants)
    times: dict[Hashable, list[float]] = {k: [] for k in keys}
    for round_index in range(warmup + repeats):
        shift = round_index % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            fn = variants[key][1]
            t0 = time.perf_counter()
            fn()
            if round_index >= warmup:
                times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: _stats(variants[k][0], times[k], warmup) for k in keys if times[k]}


def spread(samples: Sequence[float]) -> float:
    """(max - min) / min of the samples: 0.25 means the slowest run took 25 % longer than the fastest."""
    if not samples or min(samples) <= 0:
        return float("nan")
    return (max(samples) - min(samples)) / min(samples)
