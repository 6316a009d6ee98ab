"""GFLOPs (fvcore convention) and latency on the CPU backends."""

from staticprune.bench.flops import FlopReport, count_flops
from staticprune.bench.latency import LatencyStats, time_callable

__all__ = ["FlopReport", "count_flops", "LatencyStats", "time_callable"]
