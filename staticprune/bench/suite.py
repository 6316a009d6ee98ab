"""The benchmark suite: does latency follow the token count?

For each method, at each size, on the model the papers pair it with, it measures the unreduced model, the eager
reference and the static graph: kept tokens per layer, GFLOPs (fvcore convention), latency at batch 1 (min and
median after warm-up) on every backend available, and the ratio "measured speedup / FLOP reduction" (ideal 1.0).
It also times the reduction steps themselves (the method's hook calls) as a share of the static module's latency.

The headline ratio divides the static graph's speedup by the eager reference's FLOP reduction (the paper's dynamic
method, at the tokens it keeps on each image): a static graph pays for its capacities, which hold more tokens than
the average image keeps, and dividing by the graph's own FLOP reduction would hide that. The slack (static GFLOPs /
reference GFLOPs) says how much; the graph's own ratio is kept as a secondary column.

Every variant of a row (unreduced, eager reference, static) is timed round by round in one loop, and the unreduced
model is timed again with every method, so a load spike on a shared machine hits all variants alike; a row whose
unreduced samples vary by more than NOISY_SPREAD is reported as noisy instead of with a verdict.

`operating_points="paper"` skips the reference and calibration: each method's capacities are solved so that the
static graph's FLOP reduction equals its paper's (PAPER_OPERATING_POINTS), since a static graph's latency depends
on its capacities, not on its weights.

Backends: ONNX Runtime CPU (unreduced and static graphs), PyTorch CPU (unreduced, eager reference, static module),
and, when an NVIDIA GPU is present, PyTorch CUDA fp16 (static module under a CUDA graph, eager reference, unreduced).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from staticprune.bench.flops import count_flops, _bilinear_flops, _layer_norm_flops, _MAC_OPS
from staticprune.bench.latency import spread, time_interleaved
from staticprune.export.onnx_export import export_to_proto, save_atomic
from staticprune.methods import build_static_method, method_module
from staticprune.models import build_model
from staticprune.reference import reference_module
from staticprune.runtime.ort import ort_session
from staticprune.verify.parity import generated_inputs

# The model each method is paired with in the papers (Segmenter mask decoder / SegViT ATM decoder).
PAIRING = {
    "tome": "segmenter-vit-b-mask", "algm": "segmenter-vit-b-mask", "g2tm": "segmenter-vit-b-mask",
    "cts": "segmenter-vit-b-mask", "lvtp": "segmenter-vit-b-mask",
    "dcts": "segvit-vit-b-atm", "dtop": "segvit-vit-b-atm", "step": "segvit-vit-b-atm",
}
QUICK_MODELS = {"segmenter-vit-b-mask": "segmenter-vit-s-mask"}


NOISY_SPREAD = 0.2  # a row's unreduced baseline varying more than this (max/min - 1, or drift) is "noisy"


@dataclass
class Timing:
    backend: str
    variant: str  # unreduced | reference | static
    min_ms: float
    median_ms: float
    samples: list[float] = field(default_factory=list)  # every timed run (ms), interleaved with the row's others


@dataclass
class SuiteRow:
    method: str
    model: str
    size: str
    tokens: int
    options: dict[str, Any] = field(default_factory=dict)
    kept_reference: dict[str, float] = field(default_factory=dict)  # point -> mean kept over images
    kept_per_layer_static: list[float] = field(default_factory=list)  # valid slots entering each block's MLP
    capacity_per_layer_static: list[int] = field(default_factory=list)
    gflops_unreduced: float = 0.0
    gflops_reference: float = 0.0
    gflops_static: float = 0.0
    timings: list[Timing] = field(default_factory=list)
    reduction_share: Optional[float] = None  # share of static PyTorch CPU latency spent in the method's steps
    breakdown: Optional["Breakdown"] = None
    ort_ops_ms_static: dict[str, float] = field(default_factory=dict)  # ONNX Runtime profile, ms per op type
    ort_ops_ms_unreduced: dict[str, float] = field(default_factory=dict)
    gpu_error: str = ""  # why the CUDA timings are missing although a GPU is present
    error: str = ""
    # backend -> |this row's unreduced median / the run's median of that baseline - 1| (set by mark_baseline_drift)
    baseline_drift: dict[str, float] = field(default_factory=dict)
    # paper mode: {"flop_reduction": target or None, "source", "orin_ratio", "orin_size", "solved": option name}
    operating_point: dict[str, Any] = field(default_factory=dict)

    def latency(self, backend: str, variant: str) -> Optional[float]:
        return next((t.median_ms for t in self.timings if t.backend == backend and t.variant == variant), None)

    @property
    def flop_reduction_reference(self) -> Optional[float]:
        """Unreduced GFLOPs / the eager reference's GFLOPs (its mean over the inputs: the paper's dynamic method)."""
        return self.gflops_unreduced / self.gflops_reference if self.gflops_reference else None

    @property
    def flop_reduction_static(self) -> Optional[float]:
        return self.gflops_unreduced / self.gflops_static if self.gflops_static else None

    @property
    def slack(self) -> Optional[float]:
        """Static GFLOPs / reference GFLOPs: what the capacities cost beyond the tokens the images actually keep."""
        return self.gflops_static / self.gflops_reference if self.gflops_static and self.gflops_reference else None

    def speedup(self, backend: str, variant: str = "static") -> Optional[float]:
        """Unreduced ms / `variant` ms, both measured on `backend` in the same interleaved loop."""
        base, mine = self.latency(backend, "unreduced"), self.latency(backend, variant)
        return base / mine if base and mine else None

    def ratio(self, backend: str, variant: str = "static") -> Optional[float]:
        """Measured speedup divided by the eager REFERENCE's FLOP reduction (1.0 = the static graph is as fast as
        the paper's method would be if latency followed its FLOPs). Below the graph's own ratio by the slack."""
        sp, fr = self.speedup(backend, variant), self.flop_reduction_reference
        return sp / fr if sp and fr else None

    def graph_ratio(self, backend: str) -> Optional[float]:
        """Speedup of the static graph divided by its OWN FLOP reduction: how well latency follows the graph's
        FLOPs, blind to its capacity slack (the suite's headline before it was replaced by `ratio`)."""
        sp, fr = self.speedup(backend, "static"), self.flop_reduction_static
        return sp / fr if sp and fr else None

    def baseline_spread(self, backend: str) -> Optional[float]:
        """How much this row's unreduced baseline varied: the larger of its own samples' (max - min) / min and its
        drift from the run's other measurements of that baseline. None when no samples were recorded."""
        timing = next((t for t in self.timings if t.backend == backend and t.variant == "unreduced"), None)
        if timing is None or len(timing.samples) < 2:
            return self.baseline_drift.get(backend)
        return max(spread(timing.samples), self.baseline_drift.get(backend, 0.0))

    def noisy(self, backend: str) -> bool:
        value = self.baseline_spread(backend)
        return value is not None and value > NOISY_SPREAD


def mark_baseline_drift(rows: list["SuiteRow"]) -> None:
    """Sets each row's `baseline_drift`: its unreduced median against the median over every row of the run that
    measured the same baseline (model, size, backend). A row measured during a slow spell drifts even when its own
    samples agree with each other."""
    medians: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        for t in r.timings:
            if t.variant == "unreduced" and not r.error:
                medians.setdefault((r.model, r.size, t.backend), []).append(t.median_ms)
    for r in rows:
        r.baseline_drift = {}
        for t in r.timings:
            values = medians.get((r.model, r.size, t.backend), [])
            if t.variant == "unreduced" and len(values) > 1 and not r.error:
                r.baseline_drift[t.backend] = abs(t.median_ms / statistics.median(values) - 1.0)


class _GlobalOnlyTracker:
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops_call(fn: Callable[[], Any]) -> float:
    """GFLOPs (fvcore convention) of an arbitrary eager call on real tensors (data-dependent methods)."""
    custom = {torch.ops.aten.native_layer_norm: _layer_norm_flops, torch.ops.aten.upsample_bilinear2d: _bilinear_flops}
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    # Only the global count is needed; the per-module tracker registers autograd hooks that assert on some
    # references' parameter views (DToP's heads), so it is replaced by one that stays at the top level.
    counter.mod_tracker = _GlobalOnlyTracker()
    with torch.no_grad(), counter:
        fn()
    total = 0.0
    for op, n in counter.get_flop_counts()["Global"].items():
        name = (op.__name__ if hasattr(op, "__name__") else str(op).split(".")[-1]).split(".")[0]
        total += n / 2 if name in _MAC_OPS else n
    return total / 1e9


class _TimedHook(torch.nn.Module):
    """Wraps a method module: times each hook call per layer and records the valid tokens entering each MLP.

    Hook calls are the method's reduction steps (merge, prune, halting, policy network, grouping). `decode`, when
    the method owns it, runs the whole decoder as well as the unmerge, so it is timed separately and compared with
    the unreduced model's decoder (see `measure`)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.extra_outputs = getattr(inner, "extra_outputs", ())
        self.reset()
        for name in ("embed", "decode"):
            if hasattr(inner, name):
                setattr(self, name, self._timed(name, getattr(inner, name)))
        for name in ("after_attention", "after_block"):
            setattr(self, name, self._timed(name, getattr(inner, name)))

    def reset(self) -> None:
        self.events: list[tuple[str, int, float, float]] = []  # (hook, layer, start, end) in perf_counter seconds
        self.valid: list[float] = []
        self.slots: list[int] = []

    def _timed(self, name: str, fn):
        def call(*args, **kwargs):
            layer = args[0] if name in ("after_attention", "after_block") else -1
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.events.append((name, layer, t0, time.perf_counter()))
            if name == "after_attention":
                n = out.x.shape[1] - out.num_prefix
                self.slots.append(n)
                valid = (out.size[:, out.num_prefix:] > 0).sum(1).float().mean() if out.size is not None else n
                self.valid.append(float(valid))
            return out

        return call


@dataclass
class Breakdown:
    """Where one static PyTorch CPU forward spends its time (medians over the timed runs, ms)."""

    total_ms: float
    steps_ms: dict[str, float]  # hook name -> time in the method's reduction steps (decode excluded)
    decode_ms: Optional[float]  # the method's decode (unmerge + decoder), when it owns one
    decoder_unreduced_ms: Optional[float]  # the plain decoder on the unreduced model, for comparison
    per_layer: list[dict[str, float]]  # {"layer", "block_ms", "steps_ms"}, block = compute between hook calls
    step_labels: dict[str, str] = field(default_factory=dict)  # hook name -> what the method does there

    @property
    def unmerge_ms(self) -> float:
        """Estimated cost of unmerging: the method's decode minus the plain decoder (never negative)."""
        if self.decode_ms is None or self.decoder_unreduced_ms is None:
            return 0.0
        return max(0.0, self.decode_ms - self.decoder_unreduced_ms)

    @property
    def share(self) -> float:
        return (sum(self.steps_ms.values()) + self.unmerge_ms) / self.total_ms if self.total_ms > 0 else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


class BreakdownRecorder:
    """Runs the static module with its hooks timed, one forward per `run()` call (so that it can be interleaved
    with other variants), and turns the recorded runs into a Breakdown."""

    def __init__(self, static: torch.nn.Module, x: torch.Tensor):
        self.static, self.x = static, x
        self.timed = _TimedHook(static.method)
        self.runs: list[tuple[float, float, list[tuple[str, int, float, float]]]] = []  # (start, end, events)

    def run(self) -> None:
        inner, self.static.method = self.static.method, self.timed
        try:
            self.timed.reset()
            with torch.no_grad():
                t0 = time.perf_counter()
                self.static(self.x)
                t1 = time.perf_counter()
            self.runs.append((t0, t1, list(self.timed.events)))
        finally:
            self.static.method = inner

    def result(self, decoder_ms: Optional[float], warmup: int) -> tuple[Breakdown, Timing, list[float], list[int]]:
        """The breakdown over the runs after the first `warmup`, the PyTorch CPU timing, and the valid tokens
        entering each MLP and the slots there (last run)."""
        totals, steps, decodes, layers = [], {}, [], {}
        timed_runs = self.runs[warmup:]
        for t0, t1, events in timed_runs:
            totals.append((t1 - t0) * 1e3)
            run_steps: dict[str, float] = {}
            previous_end = t0
            for name, layer, start, end in events:
                ms = (end - start) * 1e3
                if name == "decode":
                    decodes.append(ms)
                    continue
                run_steps[name] = run_steps.get(name, 0.0) + ms
                # Compute between hook calls belongs to the layer whose hook ends it; `embed` (patch embedding
                # plus the method's own input work) is counted as a step of layer 0.
                entry = layers.setdefault(max(layer, 0), {"block_ms": [], "steps_ms": []})
                if layer >= 0:
                    entry["block_ms"].append((start - previous_end) * 1e3)
                entry["steps_ms"].append(ms)
                previous_end = end
            for name, ms in run_steps.items():
                steps.setdefault(name, []).append(ms)
        per_layer = []
        runs = max(1, len(timed_runs))
        for layer in sorted(layers):
            per_layer.append({"layer": layer, "block_ms": sum(layers[layer]["block_ms"]) / runs,
                              "steps_ms": sum(layers[layer]["steps_ms"]) / runs})
        breakdown = Breakdown(_median(totals), {k: _median(v) for k, v in steps.items()},
                              _median(decodes) if decodes else None, decoder_ms if decodes else None, per_layer,
                              dict(getattr(self.timed.inner, "step_names", {})))
        timing = Timing("pytorch-cpu", "static", min(totals), _median(totals), list(totals))
        return breakdown, timing, list(self.timed.valid), list(self.timed.slots)


def time_static_breakdown(static, x: torch.Tensor, decoder_ms: Optional[float], warmup: int, repeats: int
                          ) -> tuple[Breakdown, Timing, list[float], list[int]]:
    """Runs the static module with its hooks timed; returns the breakdown, its PyTorch CPU timing, the valid
    tokens entering each MLP and the slots (capacity) there."""
    recorder = BreakdownRecorder(static, x)
    for _ in range(warmup + repeats):
        recorder.run()
    return recorder.result(decoder_ms, warmup)


def time_decoder(model, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median ms of the plain model's decoder call inside a full forward (wraps decoder.forward)."""
    decoder = model.decoder
    original = decoder.forward
    seconds: list[float] = []

    def forward(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    decoder.forward = forward
    try:
        with torch.no_grad():
            for _ in range(warmup + repeats):
                model(x)
    finally:
        del decoder.forward
    timed = seconds[warmup:]
    return _median([s * 1e3 for s in timed])


@dataclass
class Unreduced:
    """What is measured once for the unreduced model at one size and shared by every method paired with it. Its
    latency is not: it is timed again, interleaved, with every method (see `measure`)."""

    gflops: float
    onnx_path: str
    decoder_ms: float
    ort_ops_ms: dict[str, float]


def measure_unreduced(model_name: str, size: tuple[int, int], classes: int, x: torch.Tensor, tmp: str,
                      log: Callable[[str], None]) -> Unreduced:
    plain = build_model(model_name, size, num_classes=classes).eval()
    log(f"unreduced {model_name} {size[0]}x{size[1]}: export, profile, decoder time")
    path = os.path.join(tmp, f"unreduced-{model_name}-{size[0]}x{size[1]}.onnx")
    save_atomic(export_to_proto(plain, x, output_names=plain.output_names()).model, path)
    ops = ort_op_profile(path, x, tmp)
    time_decoder(plain, x, 0, 1)  # warm-up
    decoder_ms = time_decoder(plain, x, 0, 1)
    return Unreduced(count_flops(plain, (1, 3, *size)).gflops, path, decoder_ms, ops)


def ort_op_profile(path: str, x: torch.Tensor, tmp: str) -> dict[str, float]:
    """ms per ONNX op type in one ONNX Runtime CPU run (its built-in profiler; the run after one warm-up)."""
    sess = ort_session(path, profile_prefix=os.path.join(tmp, "ort-profile"))
    feeds = {sess.get_inputs()[0].name: x.numpy()}
    sess.run(None, feeds)
    sess.run(None, feeds)
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.unlink(trace)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0  # only the second run's nodes
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e.get("ts", 0) >= start:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e.get("dur", 0) / 1e3
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def op_deltas(static: dict[str, float], unreduced: dict[str, float], top: int = 5) -> list[tuple[str, float, float]]:
    """(op type, unreduced ms, static ms) for the op types whose time grew most, then those that shrank most."""
    ops = set(static) | set(unreduced)
    rows = [(op, unreduced.get(op, 0.0), static.get(op, 0.0)) for op in ops]
    rows.sort(key=lambda r: r[2] - r[1], reverse=True)
    return rows[:top]


def _timings_gpu(row: SuiteRow, plain, static, ref_module, x, warmup: int, repeats: int) -> None:
    """PyTorch CUDA fp16: the static module replayed as a CUDA graph, the eager reference, the unreduced model,
    timed interleaved.

    The unreduced model is captured as a CUDA graph too, so the comparison is static graph vs static graph; the
    eager reference cannot be captured (it synchronises on data-dependent shapes)."""
    dev = torch.device("cuda")
    plain_gpu = copy.deepcopy(plain).to(dev).half()
    static_gpu = copy.deepcopy(static).to(dev).half()
    xg = x.to(dev).half()

    def cuda_timer(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run

    variants: dict[str, tuple[str, Callable[[], object]]] = {}
    with torch.no_grad():
        for variant, model in (("unreduced", plain_gpu), ("static", static_gpu)):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream before capture, as CUDA graphs require
                for _ in range(3):
                    model(xg)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(xg)
            variants[variant] = ("pytorch-cuda-fp16", cuda_timer(graph.replay))
        if ref_module is not None:
            variants["reference"] = ("pytorch-cuda-fp16",
                                     cuda_timer(lambda: ref_module.reference_forward(plain_gpu, xg, {})))
        for variant, st in time_interleaved(variants, max(warmup, 3), max(repeats, 20)).items():
            row.timings.append(Timing("pytorch-cuda-fp16", variant, st.min_ms, st.median_ms, st.samples))


@dataclass(frozen=True)
class PaperPoint:
    """One row of [Poreba et al.]'s Jetson AGX Orin tables (PyTorch, batch 1): GFLOPs and FPS of the unreduced
    model and of the method, Cityscapes, ViT-B."""

    base_gflops: float
    method_gflops: float
    base_fps: float
    method_fps: float
    table: str

    @property
    def flop_reduction(self) -> float:
        return self.base_gflops / self.method_gflops

    @property
    def orin_ratio(self) -> float:
        """Speedup on the Orin divided by the FLOP reduction, as the suite's ratio (1.0 = latency follows FLOPs)."""
        return (self.method_fps / self.base_fps) / self.flop_reduction


# [Poreba et al.] Table 2.2 (1024x1024) and Table 2.1 (768x768): Segmenter ViT-B (mask transformer) for CTS, ALGM,
# G2TM; SegViT ViT-B (ATM) for DToP, dCTS, STEP. Other sizes use the 1024x1024 operating points.
POREBA_POINTS: dict[int, dict[str, PaperPoint]] = {
    1024: {"cts": PaperPoint(776, 448, 1.2, 1.9, "Table 2.2"), "algm": PaperPoint(776, 381, 1.2, 2.2, "Table 2.2"),
           "g2tm": PaperPoint(776, 424, 1.2, 2.0, "Table 2.2"), "dtop": PaperPoint(670, 500, 3.1, 3.4, "Table 2.2"),
           "dcts": PaperPoint(670, 247, 3.1, 9.8, "Table 2.2"), "step": PaperPoint(670, 200, 3.1, 6.8, "Table 2.2")},
    768: {"cts": PaperPoint(348, 172, 2.9, 5.3, "Table 2.1"), "algm": PaperPoint(348, 199, 2.9, 4.7, "Table 2.1"),
          "g2tm": PaperPoint(348, 230, 2.9, 4.0, "Table 2.1"), "dtop": PaperPoint(301, 233, 8.0, 6.6, "Table 2.1"),
          "dcts": PaperPoint(301, 182, 8.0, 15.0, "Table 2.1"), "step": PaperPoint(301, 149, 8.0, 7.3, "Table 2.1")},
}
# ToMe and LVTP are not in the Orin study: their operating points are their own papers' settings (the defaults).
FIXED_POINTS: dict[str, tuple[dict[str, Any], str]] = {
    "tome": ({"mode": "r", "r": [0.04]}, "[ToMe]: r = 8 of 196 tokens merged per block, scaled to the grid"),
    "lvtp": ({"capacity_ratio": [0.54]},
             "[LVTP] Table 2: -46.2 % GFLOPs (SAM ViT-H), applied to the tokens after the pruning point"),
}
# The option solved for each method, its range, and whether the FLOP reduction grows with it. ALGM keeps the
# defaults' proportion between its two capacities (CLAP 0.85 : GBM 0.65); STEP takes dCTS's solved token capacity
# for its dCTS stage and solves the capacity after its exit.
SOLVED_KNOBS: dict[str, tuple[str, float, float, bool]] = {
    "cts": ("reduction", 0.0, 0.75, True), "algm": ("gbm_capacity", 0.02, 0.76, False),
    "g2tm": ("capacity", 0.02, 0.99, False), "dcts": ("capacity_ratio", 0.25, 1.0, False),
    "dtop": ("capacity_ratio", 0.02, 1.0, False), "step": ("capacity_ratio", 0.02, 1.0, False),
}


def _knob_options(method: str, value: float, dcts_ratio: Optional[float]) -> dict[str, Any]:
    name = SOLVED_KNOBS[method][0]
    if method == "algm":
        return {"gbm_capacity": value, "clap_capacity": round(value * 0.85 / 0.65, 4)}
    if method in ("dtop", "step"):
        out: dict[str, Any] = {name: [value]}
        if method == "step":
            out["token_capacity_ratio"] = dcts_ratio
        return out
    return {name: value}


def solve_operating_point(method: str, model: torch.nn.Module, size: tuple[int, int], target: float,
                          gflops_unreduced: float, dcts_ratio: Optional[float] = None, iterations: int = 12
                          ) -> tuple[dict[str, Any], float]:
    """The options whose static graph comes closest to `target` = unreduced GFLOPs / static GFLOPs, found by
    bisection on the method's knob with the project's FLOP counter (meta device); and the reduction they give.
    When the target lies beyond the knob's range, the end of the range that reduces most is returned."""
    name, low, high, increasing = SOLVED_KNOBS[method]

    def reduction(value: float) -> float:
        model.method = build_static_method(method, _knob_options(method, value, dcts_ratio), model)
        try:
            return gflops_unreduced / count_flops(model, (1, 3, *size)).gflops
        finally:
            model.method = None

    strongest = high if increasing else low
    best_value, best = strongest, reduction(strongest)
    if best >= target:
        for _ in range(iterations):
            mid = round((low + high) / 2, 4)
            got = reduction(mid)
            if abs(got - target) < abs(best - target):
                best_value, best = mid, got
            if (got < target) == increasing:
                low = mid
            else:
                high = mid
    return _knob_options(method, best_value, dcts_ratio), best


def paper_operating_point(method: str, model_name: str, size: tuple[int, int], classes: int, solved: dict,
                          gflops_unreduced: float, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options, operating-point record) of `method` at its paper's operating point on this model and size.
    `solved` caches dCTS's solution per (model, size), which STEP's dCTS stage reuses."""
    if method in FIXED_POINTS:
        options, source = FIXED_POINTS[method]
        return dict(options), {"flop_reduction": None, "source": source, "orin_ratio": None, "orin_size": None,
                               "solved": ""}
    if method not in SOLVED_KNOBS:
        raise ValueError(f"no paper operating point is known for '{method}'")
    orin_size = 768 if size == (768, 768) else 1024
    point = POREBA_POINTS[orin_size][method]
    dcts_ratio = None
    if method == "step":
        if (model_name, size, "dcts") not in solved:
            paper_operating_point("dcts", model_name, size, classes, solved, gflops_unreduced, log)
        dcts_ratio = solved[model_name, size, "dcts"]["capacity_ratio"]
    log(f"{method} {model_name} {size[0]}x{size[1]}: solving capacities for {point.flop_reduction:.2f}x fewer GFLOPs")
    model = build_model(model_name, size, num_classes=classes)
    options, _ = solve_operating_point(method, model, size, point.flop_reduction, gflops_unreduced, dcts_ratio)
    solved[model_name, size, method] = options
    return options, {"flop_reduction": point.flop_reduction, "source": f"[Poreba et al.] {point.table}",
                     "orin_ratio": point.orin_ratio, "orin_size": f"{orin_size}x{orin_size}",
                     "solved": SOLVED_KNOBS[method][0]}


def measure(method: str, model_name: str, size: tuple[int, int], images: int, quantile: float, classes: int,
            warmup: int, repeats: int, unreduced_cache: dict, tmp: str, log: Callable[[str], None],
            operating_points: Optional[str] = None, solved: Optional[dict] = None) -> SuiteRow:
    """One row. Calibrated (default): the eager reference's kept tokens and GFLOPs over `images` generated inputs,
    capacities at `quantile`. operating_points="paper": capacities solved to the paper's FLOP reduction, no
    reference. Then every variant is timed interleaved (ORT unreduced/static, PyTorch unreduced/reference/static)."""
    plain = build_model(model_name, size, num_classes=classes).eval()
    row = SuiteRow(method, model_name, f"{size[0]}x{size[1]}", plain.grid[0] * plain.grid[1])
    inputs = generated_inputs((1, 3, *size), max(1, images), seed=50)
    x = inputs[0]  # every latency below is measured on the first calibration image
    key = (model_name, size)
    if key not in unreduced_cache:
        unreduced_cache[key] = measure_unreduced(model_name, size, classes, x, tmp, log)
    base = unreduced_cache[key]
    row.gflops_unreduced = base.gflops

    ref = None
    if operating_points == "paper":
        row.options, row.operating_point = paper_operating_point(method, model_name, size, classes,
                                                                 {} if solved is None else solved, base.gflops, log)
    else:
        ref = reference_module(method)
        log(f"{method} {model_name} {row.size}: eager reference over {len(inputs)} image(s)")
        kept: dict[str, list[int]] = {}
        ref_gflops = []
        for img in inputs:  # GFLOPs counted on the same runs that give the kept tokens
            holder: dict[str, Any] = {}

            def run(img=img, holder=holder):
                holder["out"] = ref.reference_forward(plain, img, {})

            ref_gflops.append(count_flops_call(run))
            for point, counts in holder["out"].kept.items():
                kept.setdefault(point, []).extend(counts)
        row.kept_reference = {p: sum(c) / len(c) for p, c in kept.items()}
        row.gflops_reference = sum(ref_gflops) / len(ref_gflops)
        row.options = method_module(method).calibrated_options(kept, quantile, {})
    static = build_model(model_name, size, num_classes=classes)
    static.method = build_static_method(method, row.options, static)
    static.eval()
    row.gflops_static = count_flops(static, (1, 3, *size)).gflops

    log(f"{method} {model_name} {row.size}: exporting the static graph")
    static_path = os.path.join(tmp, f"{method}-{size[0]}x{size[1]}.onnx")
    save_atomic(export_to_proto(static, x, output_names=static.output_names()).model, static_path)
    sessions = {"unreduced": ort_session(base.onnx_path), "static": ort_session(static_path)}
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    recorder = BreakdownRecorder(static, x)
    variants: dict[tuple[str, str], tuple[str, Callable[[], object]]] = {
        ("onnxruntime-cpu", "unreduced"): ("onnxruntime-cpu",
                                           lambda: sessions["unreduced"].run(None, feeds["unreduced"])),
        ("onnxruntime-cpu", "static"): ("onnxruntime-cpu", lambda: sessions["static"].run(None, feeds["static"])),
        ("pytorch-cpu", "unreduced"): ("pytorch-cpu", lambda: plain(x)),
    }
    if ref is not None:
        variants["pytorch-cpu", "reference"] = ("pytorch-cpu", lambda: ref.reference_forward(plain, x, {}))
    variants["pytorch-cpu", "static"] = ("pytorch-cpu", recorder.run)  # its hooks timed: the steps' share
    log(f"{method} {model_name} {row.size}: timing {len(variants)} variants interleaved, "
        f"{warmup} warm-up + {repeats} rounds")
    with torch.no_grad():
        stats = time_interleaved(variants, warmup, repeats)
    for (backend, variant), st in stats.items():
        if (backend, variant) != ("pytorch-cpu", "static"):
            row.timings.append(Timing(backend, variant, st.min_ms, st.median_ms, st.samples))
    breakdown, timing, row.kept_per_layer_static, row.capacity_per_layer_static = recorder.result(
        base.decoder_ms, warmup)
    row.timings.append(timing)
    row.breakdown = breakdown
    row.reduction_share = breakdown.share
    sessions.clear()  # free both graphs before profiling
    row.ort_ops_ms_static = ort_op_profile(static_path, x, tmp)
    row.ort_ops_ms_unreduced = base.ort_ops_ms
    os.unlink(static_path)
    if torch.cuda.is_available():
        try:
            _timings_gpu(row, plain, static, ref, x, warmup, repeats)
        except Exception as exc:  # keep the CPU numbers; the row says why the GPU ones are missing
            row.gpu_error = f"{type(exc).__name__}: {exc}"
            log(f"{method} {model_name} {row.size}: GPU timing failed: {row.gpu_error}")
    return row


def run_suite(methods: list[str], sizes: list[tuple[int, int]], quick: bool, images: int, quantile: float,
              classes: int, warmup: int, repeats: int, log: Callable[[str], None],
              operating_points: Optional[str] = None) -> list[SuiteRow]:
    rows: list[SuiteRow] = []
    unreduced_cache: dict = {}
    solved: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for method in methods:
                model_name = PAIRING.get(method, "segmenter-vit-b-mask")
                if quick:
                    model_name = QUICK_MODELS.get(model_name, model_name)
                try:
                    rows.append(measure(method, model_name, size, images, quantile, classes, warmup, repeats,
                                        unreduced_cache, tmp, log, operating_points, solved))
                except Exception as exc:  # one broken method must not hide the others; the row says what failed
                    rows.append(SuiteRow(method, model_name, f"{size[0]}x{size[1]}", 0, error=f"{type(exc).__name__}: {exc}"))
    mark_baseline_drift(rows)
    return rows


BACKENDS = ("onnxruntime-cpu", "pytorch-cpu", "pytorch-cuda-fp16")
TARGET_RATIO = 0.9  # measured speedup / FLOP reduction
TARGET_STATIC_OVER_EAGER_GPU = 2.0
TARGET_STEP_SHARE = 0.05


def _last_kept(r: SuiteRow) -> Optional[float]:
    return list(r.kept_reference.values())[-1] if r.kept_reference else None


def _f(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


CSV_COLUMNS = ["method", "model", "size", "tokens", "mean_kept_reference", "gflops_unreduced", "gflops_reference",
               "gflops_static", "flop_reduction_reference", "flop_reduction_static", "slack", "backend", "variant",
               "min_ms", "median_ms", "samples_ms", "speedup", "speedup_over_reference_flop_reduction",
               "speedup_over_static_flop_reduction", "baseline_spread", "noisy", "paper_flop_reduction",
               "orin_ratio", "reduction_share", "error"]


def to_csv(rows: list[SuiteRow]) -> str:
    """One line per (row, backend, variant) timing. Ratios: the variant's speedup over the unreduced model of the
    same backend, divided by the reference's FLOP reduction (headline) and by the static graph's (graph only)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        if r.error:
            writer.writerow([r.method, r.model, r.size, r.tokens] + [""] * (len(CSV_COLUMNS) - 5) + [r.error])
            continue
        kept = _last_kept(r)
        op = r.operating_point
        for t in r.timings:
            measured = t.variant != "unreduced"
            writer.writerow([
                r.method, r.model, r.size, r.tokens, _f(kept, 1), _f(r.gflops_unreduced), _f(r.gflops_reference),
                _f(r.gflops_static), _f(r.flop_reduction_reference), _f(r.flop_reduction_static), _f(r.slack),
                t.backend, t.variant, f"{t.min_ms:.2f}", f"{t.median_ms:.2f}", ";".join(f"{v:.2f}" for v in t.samples),
                _f(r.speedup(t.backend, t.variant)) if measured else "",
                _f(r.ratio(t.backend, t.variant)) if measured else "",
                _f(r.graph_ratio(t.backend)) if t.variant == "static" else "",
                _f(r.baseline_spread(t.backend)), "yes" if r.noisy(t.backend) else "no",
                _f(op.get("flop_reduction")), _f(op.get("orin_ratio")), _f(r.reduction_share, 4), ""])
    return buf.getvalue()


def _ms(r: SuiteRow, backend: str, variant: str) -> str:
    v = r.latency(backend, variant)
    return "n/a" if v is None else f"{v:.0f}"


def _x(value: Optional[float], suffix: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}{suffix}"


def _ratio(r: SuiteRow, backend: str, variant: str = "static") -> str:
    return _x(r.ratio(backend, variant))


def _verdict(value: Optional[float], target: float, below: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    ok = value < target if below else value >= target
    return ("yes" if ok else "**no**") + (f" ({100 * value:.1f}%)" if below else f" ({value:.2f})")


def ratio_verdict(r: SuiteRow, backend: str) -> str:
    """yes / **no** for speedup ÷ reference FLOP reduction >= TARGET_RATIO, or "noisy" when the row's unreduced
    baseline varied by more than NOISY_SPREAD during the run (then the ratio says nothing either way)."""
    value = r.ratio(backend)
    if value is not None and r.noisy(backend):
        return f"noisy ({value:.2f}; baseline varied {100 * r.baseline_spread(backend):.0f}%)"
    return _verdict(value, TARGET_RATIO)


def _spread(r: SuiteRow, backend: str) -> str:
    v = r.baseline_spread(backend)
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.0f}%"


def static_over_eager(r: SuiteRow, backend: str) -> Optional[float]:
    ref, static = r.latency(backend, "reference"), r.latency(backend, "static")
    return ref / static if ref and static else None


def _steps_and_profile_tables(rows: list[SuiteRow]) -> list[str]:
    lines = ["", "**Reduction steps** (static module, PyTorch CPU, median ms per forward; `decode` is unmerge plus "
             "the decoder, so only its excess over the unreduced model's decoder counts as a step)", "",
             "| method | size | static forward ms | steps ms | decode ms / unreduced decoder ms | steps share |",
             "|" + " --- |" * 6]
    for r in rows:
        b = r.breakdown
        if r.error or b is None:
            continue
        labels = getattr(b, "step_labels", {}) or {}
        steps = ", ".join(f"{labels.get(k, k)} {v:.1f}" for k, v in b.steps_ms.items()) or "none"
        dec = "n/a" if b.decode_ms is None else f"{b.decode_ms:.1f} / {b.decoder_unreduced_ms:.1f}"
        lines.append(f"| {r.method} | {r.size} | {b.total_ms:.0f} | {steps} | {dec} | "
                     f"{100 * b.share:.1f}% |")

    lines += ["", "**Where the ONNX Runtime time goes** (profiler, ms per op type in one run; the op types whose time "
              "grew most from the unreduced graph to the static one, and the total of all others)", "",
              "| method | size | profiled ms unreduced / static | largest increases (op: unreduced → static ms) | "
              "MatMul + Softmax ms unreduced → static |", "|" + " --- |" * 5]
    for r in rows:
        if r.error or not r.ort_ops_ms_static:
            continue
        grew = ", ".join(f"{op} {a:.0f} → {b:.0f}" for op, a, b in op_deltas(r.ort_ops_ms_static, r.ort_ops_ms_unreduced, 3))
        core = [sum(d.get(op, 0.0) for op in ("MatMul", "FusedMatMul", "Gemm", "Softmax"))
                for d in (r.ort_ops_ms_unreduced, r.ort_ops_ms_static)]
        lines.append(f"| {r.method} | {r.size} | {sum(r.ort_ops_ms_unreduced.values()):.0f} / "
                     f"{sum(r.ort_ops_ms_static.values()):.0f} | {grew} | {core[0]:.0f} → {core[1]:.0f} |")
    return lines


def _footer(rows: list[SuiteRow], meta: dict, what: str) -> list[str]:
    gpu = "GPU: " + (meta["gpu"] if meta.get("gpu") else "none available in this run (no CUDA columns)")
    timing = (f"Batch 1, median of {meta['repeats']} rounds after {meta['warmup']} warm-up round(s), all on the first "
              "generated image; " + ("in each round every variant of the row runs once (the unreduced model "
                                     "again for every method)" if meta.get("interleaved") else
                                     "variants timed one after the other (results written before interleaving)"))
    lines = ["", f"Generated by `{meta['command']}` in {meta['seconds']:.0f} s on {meta['cpu']} ({meta['threads']} "
             f"threads); {gpu}. {timing}. {what} Random weights."]
    failed = [f"{r.method} {r.size}: {r.gpu_error}" for r in rows if r.gpu_error]
    if failed:
        lines += ["", "GPU timing failed for " + "; ".join(failed)]
    return lines


def to_markdown(rows: list[SuiteRow], meta: dict) -> str:
    if meta.get("operating_points"):
        return operating_points_markdown(rows, meta)
    gpu_rows = any(r.latency("pytorch-cuda-fp16", "static") for r in rows)
    head = ("| method | model | size | kept tokens (reference, last point) | GFLOPs unreduced / reference / static | "
            "FLOP reduction reference / static (slack) | ORT CPU ms unreduced / static (speedup) | "
            "**speedup ÷ reference FLOP reduction, ORT** | PyTorch CPU ms unreduced / reference / static | "
            "**speedup ÷ reference FLOP reduction, PyTorch** reference / static | "
            "speedup ÷ static FLOP reduction (graph only), ORT / PyTorch |")
    ncol = 11
    if gpu_rows:
        head += " CUDA fp16 ms unreduced / reference / static | speedup ÷ reference FLOP reduction, CUDA static |"
        ncol += 2
    lines = ["**Latency and FLOPs** (speedup: unreduced ms / static ms on the same backend; reference FLOP reduction: "
             "unreduced GFLOPs / the eager reference's GFLOPs at the tokens it keeps, mean over the images; slack: "
             "static GFLOPs / reference GFLOPs)", "", head, "|" + " --- |" * ncol]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.model} | {r.size} | error: {r.error} |" + " |" * (ncol - 4))
            continue
        kept = _last_kept(r)
        line = (f"| {r.method} | {r.model} | {r.size} | {'n/a' if kept is None else f'{kept:.0f}'} / {r.tokens} | "
                f"{r.gflops_unreduced:.1f} / {r.gflops_reference:.1f} / {r.gflops_static:.1f} | "
                f"{_x(r.flop_reduction_reference, 'x')} / {_x(r.flop_reduction_static, 'x')} ({_x(r.slack)}) | "
                f"{_ms(r, 'onnxruntime-cpu', 'unreduced')} / {_ms(r, 'onnxruntime-cpu', 'static')} "
                f"({_x(r.speedup('onnxruntime-cpu'), 'x')}) | **{_ratio(r, 'onnxruntime-cpu')}** | "
                f"{_ms(r, 'pytorch-cpu', 'unreduced')} / {_ms(r, 'pytorch-cpu', 'reference')} / "
                f"{_ms(r, 'pytorch-cpu', 'static')} | {_ratio(r, 'pytorch-cpu', 'reference')} / "
                f"**{_ratio(r, 'pytorch-cpu')}** | {_x(r.graph_ratio('onnxruntime-cpu'))} / "
                f"{_x(r.graph_ratio('pytorch-cpu'))} |")
        if gpu_rows:
            line += (f" {_ms(r, 'pytorch-cuda-fp16', 'unreduced')} / {_ms(r, 'pytorch-cuda-fp16', 'reference')} / "
                     f"{_ms(r, 'pytorch-cuda-fp16', 'static')} | {_ratio(r, 'pytorch-cuda-fp16')} |")
        lines.append(line)

    lines += ["", "**Targets** (speedup ÷ reference FLOP reduction >= 0.9 per backend, \"noisy\" instead of a verdict "
              f"when the row's unreduced baseline varied by more than {100 * NOISY_SPREAD:.0f}% during the run; static "
              ">= 2x eager reference at batch 1 on GPU; reduction steps < 5% of latency)", "",
              "| method | size | ratio >= 0.9, ORT CPU | ratio >= 0.9, PyTorch CPU | ratio >= 0.9, CUDA | "
              "static >= 2x eager, CUDA (CPU for information) | reduction steps < 5% | "
              "unreduced baseline varied, ORT / PyTorch |", "|" + " --- |" * 8]
    for r in rows:
        if r.error:
            continue
        cpu = static_over_eager(r, "pytorch-cpu")
        gpu = _verdict(static_over_eager(r, "pytorch-cuda-fp16"), TARGET_STATIC_OVER_EAGER_GPU)
        lines.append(f"| {r.method} | {r.size} | {ratio_verdict(r, 'onnxruntime-cpu')} | "
                     f"{ratio_verdict(r, 'pytorch-cpu')} | {ratio_verdict(r, 'pytorch-cuda-fp16')} | {gpu} (CPU: "
                     f"{'n/a' if cpu is None else f'{cpu:.2f}x'}) | "
                     f"{_verdict(r.reduction_share, TARGET_STEP_SHARE, below=True)} | "
                     f"{_spread(r, 'onnxruntime-cpu')} / {_spread(r, 'pytorch-cpu')} |")
    lines += _steps_and_profile_tables(rows)
    lines += _footer(rows, meta, f"Capacities calibrated at the {meta['quantile']} quantile of the eager reference's "
                     f"kept tokens over {meta['images']} generated image(s); reference GFLOPs are its mean over those "
                     "images. Kept-token counts describe random features, not real images.")
    return "\n".join(lines)


def _options_text(options: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return ",".join(value(e) for e in v)
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " ".join(f"`{k}={value(v)}`" for k, v in options.items())


def operating_points_markdown(rows: list[SuiteRow], meta: dict) -> str:
    """The paper-operating-points table: capacities solved to each paper's FLOP reduction, measured speedup ÷ that
    reduction beside [Poreba et al.]'s PyTorch-on-Jetson-AGX-Orin ratio for the same method."""
    lines = ["**Paper operating points** (capacities solved so that the static graph's FLOP reduction equals the "
             "paper's; ratio = measured speedup ÷ that FLOP reduction, 1.0 = latency follows FLOPs)", "",
             "| method | model | size | paper's FLOP reduction (source) | options | GFLOPs unreduced / static "
             "(reduction) | ORT CPU ms unreduced / static (speedup) | ratio, ORT CPU | PyTorch CPU ms unreduced / "
             "static (speedup) | ratio, PyTorch CPU | ratio, PyTorch on Jetson AGX Orin ([Poreba et al.]) | "
             "unreduced baseline varied, ORT / PyTorch |", "|" + " --- |" * 12]
    gpu_rows = any(r.latency("pytorch-cuda-fp16", "static") for r in rows)
    if gpu_rows:  # CUDA graphs of both, when a GPU was present
        lines[2] += " CUDA fp16 ms unreduced / static (speedup) | ratio, CUDA fp16 |"
        lines[3] += " --- | --- |"
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.model} | {r.size} | error: {r.error} |" + " |" * 8)
            continue
        op = r.operating_point
        target = "none: the paper's options" if op.get("flop_reduction") is None else f"{op['flop_reduction']:.2f}x"
        orin = ("not in that study" if op.get("orin_ratio") is None else
                f"{op['orin_ratio']:.2f} ({op.get('orin_size')})")

        def ratio(backend: str) -> str:
            value = _x(r.graph_ratio(backend))
            return f"{value} (noisy)" if r.noisy(backend) else value

        lines.append(f"| {r.method} | {r.model} | {r.size} | {target} ({op.get('source', '?')}) | "
                     f"{_options_text(r.options)} | {r.gflops_unreduced:.1f} / {r.gflops_static:.1f} "
                     f"({_x(r.flop_reduction_static, 'x')}) | {_ms(r, 'onnxruntime-cpu', 'unreduced')} / "
                     f"{_ms(r, 'onnxruntime-cpu', 'static')} ({_x(r.speedup('onnxruntime-cpu'), 'x')}) | "
                     f"{ratio('onnxruntime-cpu')} | {_ms(r, 'pytorch-cpu', 'unreduced')} / "
                     f"{_ms(r, 'pytorch-cpu', 'static')} ({_x(r.speedup('pytorch-cpu'), 'x')}) | "
                     f"{ratio('pytorch-cpu')} | {orin} | {_spread(r, 'onnxruntime-cpu')} / "
                     f"{_spread(r, 'pytorch-cpu')} |" + (
                         f" {_ms(r, 'pytorch-cuda-fp16', 'unreduced')} / {_ms(r, 'pytorch-cuda-fp16', 'static')} "
                         f"({_x(r.speedup('pytorch-cuda-fp16'), 'x')}) | {ratio('pytorch-cuda-fp16')} |"
                         if gpu_rows else ""))
    lines += _steps_and_profile_tables(rows)
    lines += _footer(rows, meta, "Capacities solved by bisection with the project's FLOP counter (fvcore "
                     "convention); ToMe and LVTP use their papers' options. \"noisy\": the row's unreduced baseline "
                     f"varied by more than {100 * NOISY_SPREAD:.0f}% during the run.")
    return "\n".join(lines)


def plots(rows: list[SuiteRow], out_dir: str) -> list[str]:
    """latency vs kept tokens; speedup vs FLOP reduction with the ideal line. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from staticprune.fileio import write_bytes_atomic

    good = [r for r in rows if not r.error]
    written = []

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        written.append(str(write_bytes_atomic(buf.getvalue(), os.path.join(out_dir, name))))

    with_kept = [r for r in good if r.kept_reference]
    if with_kept:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in with_kept:
            kept = list(r.kept_reference.values())[-1]
            for variant, marker in (("static", "o"), ("unreduced", "s")):
                v = r.latency("onnxruntime-cpu", variant)
                if v is not None:
                    x = kept if variant == "static" else r.tokens
                    ax.scatter([x], [v], marker=marker)
                    ax.annotate(f"{r.method} {r.size}" if variant == "static" else f"unreduced {r.size}", (x, v),
                                fontsize=7)
        ax.set_xlabel("tokens (static: eager reference's kept tokens at the last reduction point)")
        ax.set_ylabel("ONNX Runtime CPU latency, median ms")
        ax.set_title("Latency vs kept tokens")
        save(fig, "latency_vs_tokens.png")

    # Speedup against the FLOP reduction it should buy: the reference's (calibrated rows; the static graph's own
    # reduction drawn hollow on the same speedup, so the horizontal gap is the slack) or the paper's (paper mode,
    # with [Poreba et al.]'s Orin measurements of the same methods).
    paper_mode = any(r.operating_point for r in good)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 1.0
    style = {"onnxruntime-cpu": ("o", "tab:blue"), "pytorch-cpu": ("^", "tab:orange"),
             "pytorch-cuda-fp16": ("s", "tab:green")}
    for backend, (marker, color) in style.items():
        labelled = False
        for r in good:
            sp = r.speedup(backend)
            fr = r.flop_reduction_static if paper_mode else r.flop_reduction_reference
            if not sp or not fr:
                continue
            top = max(top, fr, sp, r.flop_reduction_static or 1.0)
            ax.scatter([fr], [sp], marker=marker, color=color, label=None if labelled else backend)
            labelled = True
            if not paper_mode and r.flop_reduction_static:
                ax.scatter([r.flop_reduction_static], [sp], marker=marker, facecolors="none", edgecolors=color)
                ax.plot([fr, r.flop_reduction_static], [sp, sp], color=color, linewidth=0.6)
            if backend == "onnxruntime-cpu":
                ax.annotate(f"{r.method} {r.size.split('x')[0]}", (fr, sp), fontsize=6, xytext=(3, -3),
                            textcoords="offset points")
    if paper_mode:
        labelled = False
        for r in good:
            op = r.operating_point
            if op.get("orin_ratio") and op.get("flop_reduction"):
                fr = op["flop_reduction"]
                ax.scatter([fr], [fr * op["orin_ratio"]], marker="x", color="black",
                           label=None if labelled else "PyTorch on Jetson AGX Orin [Poreba et al.]")
                labelled = True
    ax.plot([0.8, top * 1.2], [0.8, top * 1.2], "k--", linewidth=1, label="ideal (speedup = FLOP reduction)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, top * 1.2)
    ax.set_ylim(0.3, top * 1.2)
    ax.set_xlabel("FLOP reduction, unreduced / " + ("static GFLOPs = the paper's" if paper_mode else
                  "eager reference GFLOPs (hollow: / static GFLOPs)") + ", log scale")
    ax.set_ylabel("measured speedup (unreduced ms / static ms), log scale")
    ax.set_title("Speedup vs the paper's FLOP reduction" if paper_mode else "Speedup vs the reference's FLOP reduction")
    ax.legend(fontsize=7)
    save(fig, "speedup_vs_flops.png")

    # Per-layer time of the static module (largest size per method): transformer compute vs reduction steps.
    largest: dict[str, SuiteRow] = {}
    for r in good:
        if r.breakdown is not None and r.breakdown.per_layer:
            if r.method not in largest or r.tokens > largest[r.method].tokens:
                largest[r.method] = r
    if largest:
        cols = min(4, len(largest))
        nrows = math.ceil(len(largest) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
        for ax, r in zip(axes.flat, largest.values()):
            layers = [e["layer"] for e in r.breakdown.per_layer]
            block = [e["block_ms"] for e in r.breakdown.per_layer]
            steps = [e["steps_ms"] for e in r.breakdown.per_layer]
            ax.bar(layers, block, label="blocks")
            ax.bar(layers, steps, bottom=block, label="reduction steps")
            ax.set_title(f"{r.method} {r.size} ({100 * r.breakdown.share:.1f}% steps)", fontsize=8)
            ax.set_xlabel("layer", fontsize=7)
            ax.set_ylabel("ms", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(largest):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle("Static module per layer, PyTorch CPU (the embed hook counts as a step of layer 0)", fontsize=9)
        save(fig, "breakdown_per_layer.png")
    return written


def rows_from_json(text: str) -> tuple[list[SuiteRow], dict]:
    """The rows and meta of a results.json written by `rows_json` (to regenerate tables and plots)."""
    data = json.loads(text)
    rows = []
    for d in data["rows"]:
        d = dict(d)
        for derived in ("ratios", "graph_ratios", "derived"):
            d.pop(derived, None)
        d["timings"] = [Timing(**t) for t in d.get("timings", [])]
        if d.get("breakdown"):
            b = {k: v for k, v in d["breakdown"].items() if k not in ("unmerge_ms", "share")}
            d["breakdown"] = Breakdown(**b)
        rows.append(SuiteRow(**d))
    return rows, data["meta"]


def rows_json(rows: list[SuiteRow], meta: dict) -> str:
    def encode(r: SuiteRow) -> dict:
        d = asdict(r)
        d["ratios"] = {f"{b}/{v}": r.ratio(b, v) for b in BACKENDS for v in ("static", "reference") if r.ratio(b, v)}
        d["graph_ratios"] = {b: r.graph_ratio(b) for b in BACKENDS if r.graph_ratio(b)}
        d["derived"] = {"flop_reduction_reference": r.flop_reduction_reference,
                        "flop_reduction_static": r.flop_reduction_static, "slack": r.slack,
                        "speedup": {f"{t.backend}/{t.variant}": r.speedup(t.backend, t.variant)
                                    for t in r.timings if t.variant != "unreduced"},
                        "baseline_spread": {b: r.baseline_spread(b) for b in BACKENDS if r.latency(b, "unreduced")},
                        "noisy": {b: r.noisy(b) for b in BACKENDS if r.latency(b, "unreduced")}}
        if r.breakdown is not None:
            d["breakdown"]["unmerge_ms"] = r.breakdown.unmerge_ms
            d["breakdown"]["share"] = r.breakdown.share
        return d

    return json.dumps({"meta": meta, "rows": [encode(r) for r in rows]}, indent=2,
                      default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
