"""The benchmark suite: does latency follow the token count?

For each method, at each size, on the model the papers pair it with, it measures the unreduced model, the eager
reference and the static graph: kept tokens per layer, GFLOPs (fvcore convention), latency at batch 1 (min and
median after warm-up) on every backend available, and the ratio "measured speedup / FLOP reduction" (ideal 1.0).
It also times the reduction steps themselves (the method's hook calls) as a share of the static module's latency.

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
from staticprune.bench.latency import time_callable
from staticprune.export.onnx_export import export_to_proto, save_atomic
from staticprune.methods import build_static_method, method_module
from staticprune.models import build_model
from staticprune.reference import reference_module
from staticprune.verify.parity import generated_inputs, ort_session

# The model each method is paired with in the papers (Segmenter mask decoder / SegViT ATM decoder).
PAIRING = {
    "tome": "segmenter-vit-b-mask", "algm": "segmenter-vit-b-mask", "g2tm": "segmenter-vit-b-mask",
    "cts": "segmenter-vit-b-mask", "lvtp": "segmenter-vit-b-mask",
    "dcts": "segvit-vit-b-atm", "dtop": "segvit-vit-b-atm", "step": "segvit-vit-b-atm",
}
QUICK_MODELS = {"segmenter-vit-b-mask": "segmenter-vit-s-mask"}


@dataclass
class Timing:
    backend: str
    variant: str  # unreduced | reference | static
    min_ms: float
    median_ms: float


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

    def latency(self, backend: str, variant: str) -> Optional[float]:
        return next((t.median_ms for t in self.timings if t.backend == backend and t.variant == variant), None)

    def ratio(self, backend: str, variant: str = "static") -> Optional[float]:
        """Measured speedup over the unreduced model divided by the FLOP reduction (1.0 = latency follows FLOPs)."""
        base, mine = self.latency(backend, "unreduced"), self.latency(backend, variant)
        flops = self.gflops_static if variant == "static" else self.gflops_reference
        if not base or not mine or not flops:
            return None
        return (base / mine) / (self.gflops_unreduced / flops)


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


def time_static_breakdown(static, x: torch.Tensor, decoder_ms: Optional[float], warmup: int, repeats: int
                          ) -> tuple[Breakdown, Timing, list[float], list[int]]:
    """Runs the static module with its hooks timed; returns the breakdown, its PyTorch CPU timing, the valid
    tokens entering each MLP and the slots (capacity) there."""
    timed = _TimedHook(static.method)
    inner, static.method = static.method, timed
    totals, steps, decodes, layers = [], {}, [], {}
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                timed.reset()
                t0 = time.perf_counter()
                static(x)
                t1 = time.perf_counter()
                if i < warmup:
                    continue
                totals.append((t1 - t0) * 1e3)
                run_steps: dict[str, float] = {}
                previous_end = t0
                for name, layer, start, end in timed.events:
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
    finally:
        static.method = inner
    per_layer = []
    for layer in sorted(layers):
        runs = max(1, repeats)
        per_layer.append({"layer": layer, "block_ms": sum(layers[layer]["block_ms"]) / runs,
                          "steps_ms": sum(layers[layer]["steps_ms"]) / runs})
    breakdown = Breakdown(_median(totals), {k: _median(v) for k, v in steps.items()},
                          _median(decodes) if decodes else None, decoder_ms if decodes else None, per_layer,
                          dict(getattr(inner, "step_names", {})))
    timing = Timing("pytorch-cpu", "static", min(totals), _median(totals))
    return breakdown, timing, timed.valid, timed.slots


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
    """Measurements of the unreduced model at one size, shared by every method paired with it."""

    gflops: float
    onnx_path: str
    timings: list[Timing]
    decoder_ms: float
    ort_ops_ms: dict[str, float]


def measure_unreduced(model_name: str, size: tuple[int, int], classes: int, x: torch.Tensor, warmup: int,
                      repeats: int, tmp: str, log: Callable[[str], None]) -> Unreduced:
    plain = build_model(model_name, size, num_classes=classes).eval()
    log(f"unreduced {model_name} {size[0]}x{size[1]}: export and timing")
    path = os.path.join(tmp, f"unreduced-{model_name}-{size[0]}x{size[1]}.onnx")
    save_atomic(export_to_proto(plain, x, output_names=plain.output_names()).model, path)
    timings = [_time_ort(path, x, "unreduced", warmup, repeats)]
    ops = ort_op_profile(path, x, tmp)
    decoder_ms = time_decoder(plain, x, 0, 1)  # this first PyTorch run is also the warm-up
    with torch.no_grad():
        st = time_callable(lambda: plain(x), "pytorch-cpu", max(0, warmup - 1), repeats)
    timings.append(Timing("pytorch-cpu", "unreduced", st.min_ms, st.median_ms))
    return Unreduced(count_flops(plain, (1, 3, *size)).gflops, path, timings, decoder_ms, ops)


def _time_ort(path: str, x: torch.Tensor, variant: str, warmup: int, repeats: int) -> Timing:
    sess = ort_session(path)
    feeds = {sess.get_inputs()[0].name: x.numpy()}
    st = time_callable(lambda: sess.run(None, feeds), "onnxruntime-cpu", warmup, repeats)
    return Timing("onnxruntime-cpu", variant, st.min_ms, st.median_ms)


def ort_op_profile(path: str, x: torch.Tensor, tmp: str) -> dict[str, float]:
    """ms per ONNX op type in one ONNX Runtime CPU run (its built-in profiler; the run after one warm-up)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tmp, "ort-profile")
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
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
    """PyTorch CUDA fp16: the static module replayed as a CUDA graph, the eager reference, the unreduced model.

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
            st = time_callable(cuda_timer(graph.replay), "pytorch-cuda-fp16", max(warmup, 3), max(repeats, 20))
            row.timings.append(Timing("pytorch-cuda-fp16", variant, st.min_ms, st.median_ms))
        st = time_callable(cuda_timer(lambda: ref_module.reference_forward(plain_gpu, xg, {})),
                           "pytorch-cuda-fp16", max(warmup, 3), max(repeats, 20))
        row.timings.append(Timing("pytorch-cuda-fp16", "reference", st.min_ms, st.median_ms))


def measure(method: str, model_name: str, size: tuple[int, int], images: int, quantile: float, classes: int,
            warmup: int, repeats: int, unreduced_cache: dict, tmp: str, log: Callable[[str], None]) -> SuiteRow:
    plain = build_model(model_name, size, num_classes=classes).eval()
    row = SuiteRow(method, model_name, f"{size[0]}x{size[1]}", plain.grid[0] * plain.grid[1])
    ref = reference_module(method)
    inputs = generated_inputs((1, 3, *size), max(1, images), seed=50)
    x = inputs[0]  # every latency below is measured on the first calibration image
    key = (model_name, size)
    if key not in unreduced_cache:
        unreduced_cache[key] = measure_unreduced(model_name, size, classes, x, warmup, repeats, tmp, log)
    base = unreduced_cache[key]
    row.gflops_unreduced = base.gflops
    row.timings.extend(base.timings)

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

    log(f"{method} {model_name} {row.size}: PyTorch CPU timing (static with its steps timed, eager reference)")
    breakdown, timing, row.kept_per_layer_static, row.capacity_per_layer_static = time_static_breakdown(
        static, x, base.decoder_ms, warmup, repeats)
    row.timings.append(timing)
    row.breakdown = breakdown
    row.reduction_share = breakdown.share
    with torch.no_grad():
        st = time_callable(lambda: ref.reference_forward(plain, x, {}), "pytorch-cpu", 0, repeats)  # warmed above
    row.timings.append(Timing("pytorch-cpu", "reference", st.min_ms, st.median_ms))

    log(f"{method} {model_name} {row.size}: exporting and timing the static graph in ONNX Runtime")
    static_path = os.path.join(tmp, f"{method}-{size[0]}x{size[1]}.onnx")
    save_atomic(export_to_proto(static, x, output_names=static.output_names()).model, static_path)
    row.timings.append(_time_ort(static_path, x, "static", warmup, repeats))
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
              classes: int, warmup: int, repeats: int, log: Callable[[str], None]) -> list[SuiteRow]:
    rows: list[SuiteRow] = []
    unreduced_cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for method in methods:
                model_name = PAIRING.get(method, "segmenter-vit-b-mask")
                if quick:
                    model_name = QUICK_MODELS.get(model_name, model_name)
                try:
                    rows.append(measure(method, model_name, size, images, quantile, classes, warmup, repeats,
                                        unreduced_cache, tmp, log))
                except Exception as exc:  # one broken method must not hide the others; the row says what failed
                    rows.append(SuiteRow(method, model_name, f"{size[0]}x{size[1]}", 0, error=f"{type(exc).__name__}: {exc}"))
    return rows


BACKENDS = ("onnxruntime-cpu", "pytorch-cpu", "pytorch-cuda-fp16")
TARGET_RATIO = 0.9  # measured speedup / FLOP reduction
TARGET_STATIC_OVER_EAGER_GPU = 2.0
TARGET_STEP_SHARE = 0.05


def _last_kept(r: SuiteRow) -> Optional[float]:
    return list(r.kept_reference.values())[-1] if r.kept_reference else None


def to_csv(rows: list[SuiteRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "model", "size", "tokens", "mean_kept_reference", "gflops_unreduced", "gflops_reference",
                     "gflops_static", "backend", "variant", "min_ms", "median_ms", "speedup_over_flop_reduction",
                     "reduction_share", "error"])
    for r in rows:
        kept = _last_kept(r)
        if r.error:
            writer.writerow([r.method, r.model, r.size, r.tokens] + [""] * 10 + [r.error])
            continue
        for t in r.timings:
            ratio = r.ratio(t.backend, t.variant) if t.variant != "unreduced" else 1.0
            writer.writerow([r.method, r.model, r.size, r.tokens, "" if kept is None else f"{kept:.1f}",
                             f"{r.gflops_unreduced:.3f}", f"{r.gflops_reference:.3f}", f"{r.gflops_static:.3f}",
                             t.backend, t.variant, f"{t.min_ms:.2f}", f"{t.median_ms:.2f}",
                             "" if ratio is None else f"{ratio:.3f}",
                             "" if r.reduction_share is None else f"{r.reduction_share:.4f}", ""])
    return buf.getvalue()


def _ms(r: SuiteRow, backend: str, variant: str) -> str:
    v = r.latency(backend, variant)
    return "n/a" if v is None else f"{v:.0f}"


def _ratio(r: SuiteRow, backend: str, variant: str = "static") -> str:
    v = r.ratio(backend, variant)
    return "n/a" if v is None else f"{v:.2f}"


def _verdict(value: Optional[float], target: float, below: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    ok = value < target if below else value >= target
    return ("yes" if ok else "**no**") + (f" ({100 * value:.1f}%)" if below else f" ({value:.2f})")


def static_over_eager(r: SuiteRow, backend: str) -> Optional[float]:
    ref, static = r.latency(backend, "reference"), r.latency(backend, "static")
    return ref / static if ref and static else None


def to_markdown(rows: list[SuiteRow], meta: dict) -> str:
    gpu_rows = any(r.latency("pytorch-cuda-fp16", "static") for r in rows)
    head = ("| method | model | size | kept tokens (reference, last point) | GFLOPs unreduced / reference / static | "
            "ORT CPU ms unreduced / static | speedup ÷ FLOP reduction, ORT static | PyTorch CPU ms unreduced / "
            "reference / static | speedup ÷ FLOP reduction, PyTorch reference / static |")
    ncol = 9
    if gpu_rows:
        head += " CUDA fp16 ms unreduced / reference / static | speedup ÷ FLOP reduction, CUDA static |"
        ncol += 2
    lines = ["**Latency and FLOPs**", "", head, "|" + " --- |" * ncol]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.model} | {r.size} | error: {r.error} |" + " |" * (ncol - 4))
            continue
        kept = _last_kept(r)
        line = (f"| {r.method} | {r.model} | {r.size} | {'n/a' if kept is None else f'{kept:.0f}'} / {r.tokens} | "
                f"{r.gflops_unreduced:.1f} / {r.gflops_reference:.1f} / {r.gflops_static:.1f} | "
                f"{_ms(r, 'onnxruntime-cpu', 'unreduced')} / {_ms(r, 'onnxruntime-cpu', 'static')} | "
                f"{_ratio(r, 'onnxruntime-cpu')} | {_ms(r, 'pytorch-cpu', 'unreduced')} / "
                f"{_ms(r, 'pytorch-cpu', 'reference')} / {_ms(r, 'pytorch-cpu', 'static')} | "
                f"{_ratio(r, 'pytorch-cpu', 'reference')} / {_ratio(r, 'pytorch-cpu')} |")
        if gpu_rows:
            line += (f" {_ms(r, 'pytorch-cuda-fp16', 'unreduced')} / {_ms(r, 'pytorch-cuda-fp16', 'reference')} / "
                     f"{_ms(r, 'pytorch-cuda-fp16', 'static')} | {_ratio(r, 'pytorch-cuda-fp16')} |")
        lines.append(line)

    lines += ["", "**Targets** (speedup ÷ FLOP reduction >= 0.9 per backend; static >= 2x eager reference at batch 1 "
              "on GPU; reduction steps < 5% of latency)", "",
              "| method | size | ratio >= 0.9, ORT CPU | ratio >= 0.9, PyTorch CPU | ratio >= 0.9, CUDA | "
              "static >= 2x eager, CUDA (CPU for information) | reduction steps < 5% |", "|" + " --- |" * 7]
    for r in rows:
        if r.error:
            continue
        cpu = static_over_eager(r, "pytorch-cpu")
        gpu = _verdict(static_over_eager(r, "pytorch-cuda-fp16"), TARGET_STATIC_OVER_EAGER_GPU)
        lines.append(f"| {r.method} | {r.size} | {_verdict(r.ratio('onnxruntime-cpu'), TARGET_RATIO)} | "
                     f"{_verdict(r.ratio('pytorch-cpu'), TARGET_RATIO)} | "
                     f"{_verdict(r.ratio('pytorch-cuda-fp16'), TARGET_RATIO)} | {gpu} (CPU: "
                     f"{'n/a' if cpu is None else f'{cpu:.2f}x'}) | "
                     f"{_verdict(r.reduction_share, TARGET_STEP_SHARE, below=True)} |")

    lines += ["", "**Reduction steps** (static module, PyTorch CPU, median ms per forward; `decode` is unmerge plus "
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

    gpu = "GPU: " + (meta["gpu"] if meta.get("gpu") else "none available in this run (no CUDA columns)")
    lines += ["", f"Generated by `{meta['command']}` in {meta['seconds']:.0f} s on {meta['cpu']} ({meta['threads']} "
              f"threads); {gpu}. Batch 1, median of {meta['repeats']} runs after {meta['warmup']} warm-up, all on "
              f"the first calibration image. Capacities calibrated at the {meta['quantile']} quantile of the eager "
              f"reference's kept tokens over {meta['images']} generated image(s); reference GFLOPs are its mean over "
              "those images. Random weights: kept-token counts describe random features, not real images."]
    failed = [f"{r.method} {r.size}: {r.gpu_error}" for r in rows if r.gpu_error]
    if failed:
        lines += ["", "GPU timing failed for " + "; ".join(failed)]
    return "\n".join(lines)


def plots(rows: list[SuiteRow], out_dir: str) -> list[str]:
    """latency vs kept tokens; speedup vs FLOP reduction with the ideal line. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from staticprune.fileio import write_bytes_atomic

    good = [r for r in rows if not r.error and r.kept_reference]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in good:
        kept = list(r.kept_reference.values())[-1]
        for variant, marker in (("static", "o"), ("unreduced", "s")):
            v = r.latency("onnxruntime-cpu", variant)
            if v is not None:
                x = kept if variant == "static" else r.tokens
                ax.scatter([x], [v], marker=marker)
                ax.annotate(f"{r.method} {r.size}" if variant == "static" else f"unreduced {r.size}", (x, v), fontsize=7)
    ax.set_xlabel("tokens (static: eager reference's kept tokens at the last reduction point)")
    ax.set_ylabel("ONNX Runtime CPU latency, median ms")
    ax.set_title("Latency vs kept tokens")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    written.append(str(write_bytes_atomic(buf.getvalue(), os.path.join(out_dir, "latency_vs_tokens.png"))))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 1.0
    style = {"onnxruntime-cpu": ("o", "tab:blue"), "pytorch-cpu": ("^", "tab:orange"),
             "pytorch-cuda-fp16": ("s", "tab:green")}
    for backend, (marker, color) in style.items():
        labelled = False
        for r in good:
            base, mine = r.latency(backend, "unreduced"), r.latency(backend, "static")
            if base and mine and r.gflops_static:
                fr, sp = r.gflops_unreduced / r.gflops_static, base / mine
                top = max(top, fr, sp)
                ax.scatter([fr], [sp], marker=marker, color=color, label=None if labelled else backend)
                labelled = True
                if backend == "onnxruntime-cpu":
                    ax.annotate(f"{r.method} {r.size.split('x')[0]}", (fr, sp), fontsize=6, xytext=(3, -3),
                                textcoords="offset points")
    ax.plot([0.8, top * 1.2], [0.8, top * 1.2], "k--", linewidth=1, label="ideal (speedup = FLOP reduction)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, top * 1.2)
    ax.set_ylim(0.5, top * 1.2)
    ax.set_xlabel("FLOP reduction (unreduced GFLOPs / static GFLOPs), log scale")
    ax.set_ylabel("measured speedup (unreduced ms / static ms), log scale")
    ax.set_title("Speedup vs FLOP reduction, static graphs")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    written.append(str(write_bytes_atomic(buf.getvalue(), os.path.join(out_dir, "speedup_vs_flops.png"))))

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
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        written.append(str(write_bytes_atomic(buf.getvalue(), os.path.join(out_dir, "breakdown_per_layer.png"))))
    return written


def rows_from_json(text: str) -> tuple[list[SuiteRow], dict]:
    """The rows and meta of a results.json written by `rows_json` (to regenerate tables and plots)."""
    data = json.loads(text)
    rows = []
    for d in data["rows"]:
        d = dict(d)
        d.pop("ratios", None)
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
        if r.breakdown is not None:
            d["breakdown"]["unmerge_ms"] = r.breakdown.unmerge_ms
            d["breakdown"]["share"] = r.breakdown.share
        return d

    return json.dumps({"meta": meta, "rows": [encode(r) for r in rows]}, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
