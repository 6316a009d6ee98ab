"""The benchmark suite: does latency follow the token count?

For each method, at each size, on the model the seeds pair it with, it measures the unreduced model, the eager
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

# The model each method is paired with in the seeds (Segmenter mask decoder / SegViT ATM decoder).
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
    reduction_breakdown_ms: dict[str, float] = field(default_factory=dict)
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


def count_flops_call(fn: Callable[[], Any]) -> float:
    """GFLOPs (fvcore convention) of an arbitrary eager call on real tensors (data-dependent methods)."""
    custom = {torch.ops.aten.native_layer_norm: _layer_norm_flops, torch.ops.aten.upsample_bilinear2d: _bilinear_flops}
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with torch.no_grad(), counter:
        fn()
    total = 0.0
    for op, n in counter.get_flop_counts()["Global"].items():
        name = (op.__name__ if hasattr(op, "__name__") else str(op).split(".")[-1]).split(".")[0]
        total += n / 2 if name in _MAC_OPS else n
    return total / 1e9


class _TimedHook(torch.nn.Module):
    """Wraps a method module: times its hook calls and records the valid tokens per layer."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.extra_outputs = getattr(inner, "extra_outputs", ())
        self.seconds: dict[str, float] = {}
        self.valid: list[float] = []
        self.slots: list[int] = []
        for name in ("embed", "decode"):
            if hasattr(inner, name):
                setattr(self, name, self._timed(name))

    def _timed(self, name: str):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out

        return call

    def after_attention(self, layer, state, keys):
        t0 = time.perf_counter()
        state = self.inner.after_attention(layer, state, keys)
        self.seconds["after_attention"] = self.seconds.get("after_attention", 0.0) + time.perf_counter() - t0
        n = state.x.shape[1] - state.num_prefix
        self.slots.append(n)
        self.valid.append(float((state.size[:, state.num_prefix:] > 0).sum(1).float().mean()) if state.size is not None else float(n))
        return state

    def after_block(self, layer, state):
        t0 = time.perf_counter()
        state = self.inner.after_block(layer, state)
        self.seconds["after_block"] = self.seconds.get("after_block", 0.0) + time.perf_counter() - t0
        return state


def _timings_cpu(row: SuiteRow, plain, static, ref_fn, x, onnx_paths: dict[str, str], warmup: int, repeats: int) -> None:
    for variant, path in onnx_paths.items():
        sess = ort_session(path)
        feeds = {sess.get_inputs()[0].name: x.numpy()}
        st = time_callable(lambda: sess.run(None, feeds), "onnxruntime-cpu", warmup, repeats)
        row.timings.append(Timing("onnxruntime-cpu", variant, st.min_ms, st.median_ms))
    with torch.no_grad():
        for variant, fn in (("unreduced", lambda: plain(x)), ("reference", ref_fn), ("static", lambda: static(x))):
            st = time_callable(fn, "pytorch-cpu", warmup, repeats)
            row.timings.append(Timing("pytorch-cpu", variant, st.min_ms, st.median_ms))


def _timings_gpu(row: SuiteRow, plain, static, ref_module, options, x, warmup: int, repeats: int) -> None:
    """PyTorch CUDA fp16: the static module replayed as a CUDA graph, the eager reference, the unreduced model."""
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
            for _ in range(3):  # warm-up on a side stream before capture, as CUDA graphs require
                model(xg)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(xg)
            st = time_callable(cuda_timer(graph.replay), "pytorch-cuda-fp16-graph", warmup, repeats)
            row.timings.append(Timing("pytorch-cuda-fp16", variant, st.min_ms, st.median_ms))
        st = time_callable(cuda_timer(lambda: ref_module.reference_forward(plain_gpu, xg, options)),
                           "pytorch-cuda-fp16", warmup, repeats)
        row.timings.append(Timing("pytorch-cuda-fp16", "reference", st.min_ms, st.median_ms))


def measure(method: str, model_name: str, size: tuple[int, int], images: int, quantile: float, classes: int,
            warmup: int, repeats: int, onnx_cache: dict, tmp: str, log: Callable[[str], None]) -> SuiteRow:
    plain = build_model(model_name, size, num_classes=classes)
    row = SuiteRow(method, model_name, f"{size[0]}x{size[1]}", plain.grid[0] * plain.grid[1])
    ref = reference_module(method)
    log(f"{method} {model_name} {row.size}: eager reference over {images} image(s)")
    kept: dict[str, list[int]] = {}
    with torch.no_grad():
        for img in generated_inputs((1, 3, *size), images, seed=50):
            for point, counts in ref.reference_forward(plain, img, {}).kept.items():
                kept.setdefault(point, []).extend(counts)
    row.kept_reference = {p: sum(c) / len(c) for p, c in kept.items()}
    row.options = method_module(method).calibrated_options(kept, quantile, {})
    static = build_model(model_name, size, num_classes=classes)
    static.method = build_static_method(method, row.options, static)
    static.eval()
    x = generated_inputs((1, 3, *size), 1, seed=3)[0]
    row.gflops_unreduced = count_flops(plain, (1, 3, *size)).gflops
    row.gflops_static = count_flops(static, (1, 3, *size)).gflops
    row.gflops_reference = count_flops_call(lambda: ref.reference_forward(plain, x, {}))

    # Kept tokens per layer and the cost of the reduction steps, from one instrumented static run.
    timed = _TimedHook(static.method)
    inner, static.method = static.method, timed
    with torch.no_grad():
        static(x)  # warm-up
        timed.seconds, timed.valid, timed.slots = {}, [], []
        t0 = time.perf_counter()
        static(x)
        total = time.perf_counter() - t0
    static.method = inner
    row.kept_per_layer_static, row.capacity_per_layer_static = timed.valid, timed.slots
    row.reduction_breakdown_ms = {k: v * 1e3 for k, v in timed.seconds.items()}
    row.reduction_share = sum(timed.seconds.values()) / total if total > 0 else None

    log(f"{method} {model_name} {row.size}: exporting the static graph")
    key = (model_name, size)
    if key not in onnx_cache:
        onnx_cache[key] = os.path.join(tmp, f"unreduced-{model_name}-{size[0]}x{size[1]}.onnx")
        save_atomic(export_to_proto(plain, x, output_names=plain.output_names()).model, onnx_cache[key])
    static_path = os.path.join(tmp, f"{method}-{size[0]}x{size[1]}.onnx")
    save_atomic(export_to_proto(static, x, output_names=static.output_names()).model, static_path)
    log(f"{method} {model_name} {row.size}: timing")
    _timings_cpu(row, plain, static, lambda: ref.reference_forward(plain, x, {}), x,
                 {"unreduced": onnx_cache[key], "static": static_path}, warmup, repeats)
    if torch.cuda.is_available():
        _timings_gpu(row, plain, static, ref, {}, x, warmup, repeats)
    os.unlink(static_path)
    return row


def run_suite(methods: list[str], sizes: list[tuple[int, int]], quick: bool, images: int, quantile: float,
              classes: int, warmup: int, repeats: int, log: Callable[[str], None]) -> list[SuiteRow]:
    rows: list[SuiteRow] = []
    onnx_cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for method in methods:
                model_name = PAIRING.get(method, "segmenter-vit-b-mask")
                if quick:
                    model_name = QUICK_MODELS.get(model_name, model_name)
                try:
                    rows.append(measure(method, model_name, size, images, quantile, classes, warmup, repeats,
                                        onnx_cache, tmp, log))
                except Exception as exc:  # one broken method must not hide the others; the row says what failed
                    rows.append(SuiteRow(method, model_name, f"{size[0]}x{size[1]}", 0, error=f"{type(exc).__name__}: {exc}"))
    return rows


BACKENDS = ("onnxruntime-cpu", "pytorch-cpu", "pytorch-cuda-fp16")


def to_csv(rows: list[SuiteRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "model", "size", "tokens", "mean_kept_reference", "gflops_unreduced", "gflops_reference",
                     "gflops_static", "backend", "variant", "min_ms", "median_ms", "speedup_over_flop_reduction",
                     "reduction_share"])
    for r in rows:
        last_kept = list(r.kept_reference.values())[-1] if r.kept_reference else ""
        for t in r.timings:
            ratio = r.ratio(t.backend, t.variant) if t.variant != "unreduced" else 1.0
            writer.writerow([r.method, r.model, r.size, r.tokens, last_kept, f"{r.gflops_unreduced:.3f}",
                             f"{r.gflops_reference:.3f}", f"{r.gflops_static:.3f}", t.backend, t.variant,
                             f"{t.min_ms:.2f}", f"{t.median_ms:.2f}", "" if ratio is None else f"{ratio:.3f}",
                             "" if r.reduction_share is None else f"{r.reduction_share:.4f}"])
    return buf.getvalue()


def to_markdown(rows: list[SuiteRow], meta: dict) -> str:
    lines = ["| method | model | size | kept (ref, last point) | GFLOPs unreduced / ref / static | "
             "ORT CPU ms unreduced / static | speedup ÷ FLOP reduction (ORT static) | PyTorch CPU ms unreduced / ref / static | "
             "ratio (PyTorch ref / static) | reduction steps share |", "|" + " --- |" * 10]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.model} | {r.size} | error: {r.error} | | | | | | |")
            continue

        def ms(backend, variant):
            v = r.latency(backend, variant)
            return "n/a" if v is None else f"{v:.0f}"

        def rt(backend, variant="static"):
            v = r.ratio(backend, variant)
            return "n/a" if v is None else f"{v:.2f}"

        kept = list(r.kept_reference.values())[-1] if r.kept_reference else float("nan")
        share = "n/a" if r.reduction_share is None else f"{100 * r.reduction_share:.1f}%"
        lines.append(
            f"| {r.method} | {r.model} | {r.size} | {kept:.0f} / {r.tokens} | {r.gflops_unreduced:.1f} / "
            f"{r.gflops_reference:.1f} / {r.gflops_static:.1f} | {ms('onnxruntime-cpu', 'unreduced')} / "
            f"{ms('onnxruntime-cpu', 'static')} | {rt('onnxruntime-cpu')} | {ms('pytorch-cpu', 'unreduced')} / "
            f"{ms('pytorch-cpu', 'reference')} / {ms('pytorch-cpu', 'static')} | {rt('pytorch-cpu', 'reference')} / "
            f"{rt('pytorch-cpu')} | {share} |")
    gpu = "GPU: " + (meta["gpu"] if meta.get("gpu") else "none available in this run (PyTorch CUDA columns absent)")
    lines += ["", f"Generated by `{meta['command']}` in {meta['seconds']:.0f} s on {meta['cpu']} ({meta['threads']} "
              f"threads); {gpu}. Batch 1, median of {meta['repeats']} runs after {meta['warmup']} warm-up. Capacities "
              f"calibrated at the {meta['quantile']} quantile of the eager reference's kept tokens over "
              f"{meta['images']} generated image(s); random weights."]
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
    for backend, marker in (("onnxruntime-cpu", "o"), ("pytorch-cpu", "^"), ("pytorch-cuda-fp16", "s")):
        for r in good:
            base, mine = r.latency(backend, "unreduced"), r.latency(backend, "static")
            if base and mine and r.gflops_static:
                fr, sp = r.gflops_unreduced / r.gflops_static, base / mine
                top = max(top, fr, sp)
                ax.scatter([fr], [sp], marker=marker, label=f"{backend}" if r is good[0] else None)
                ax.annotate(f"{r.method} {r.size}", (fr, sp), fontsize=7)
    ax.plot([0, top * 1.1], [0, top * 1.1], "k--", linewidth=1, label="ideal (speedup = FLOP reduction)")
    ax.set_xlim(0.8, top * 1.1)
    ax.set_ylim(0, top * 1.1)
    ax.set_xlabel("FLOP reduction (unreduced GFLOPs / static GFLOPs)")
    ax.set_ylabel("measured speedup (unreduced ms / static ms)")
    ax.set_title("Speedup vs FLOP reduction, static graphs")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    written.append(str(write_bytes_atomic(buf.getvalue(), os.path.join(out_dir, "speedup_vs_flops.png"))))
    return written


def rows_json(rows: list[SuiteRow], meta: dict) -> str:
    def encode(r: SuiteRow) -> dict:
        d = asdict(r)
        d["ratios"] = {f"{b}/{v}": r.ratio(b, v) for b in BACKENDS for v in ("static", "reference") if r.ratio(b, v)}
        return d

    return json.dumps({"meta": meta, "rows": [encode(r) for r in rows]}, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
