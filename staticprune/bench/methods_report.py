"""The README's methods table, measured: L1, L2, lint, kept tokens, GFLOPs and ONNX Runtime latency per method.

For each method:
* L1: the static module against the eager reference on `cases` generated inputs (small model, batch 1 and 2,
  square and non-square), with capacities that hold every token (the method's EXACT_OPTIONS; its defaults are
  cost operating points that may overflow): decisions equal and max abs logit error.
* L2: the static graph exported at the L2 size with default options, ONNX Runtime vs the static module
  (decision-aware verify).
* lint: that graph for orin-jp6 and orin-jp60.
* kept tokens, GFLOPs, latency: at the large size, the eager reference's mean kept tokens at the last reduction
  point and its GFLOPs (mean over the images: the paper's dynamic method); capacities calibrated from those runs
  (the chosen quantile); GFLOPs of the static graph at those capacities; ONNX Runtime CPU median latency of the
  static graph and of the unreduced graph, timed interleaved in one loop. The headline ratio is the measured
  speedup divided by the REFERENCE's FLOP reduction; the slack (static / reference GFLOPs) says what the
  capacities cost, and the graph's own ratio (speedup / static FLOP reduction) is shown beside it.

Random weights (no pretrained weights can be downloaded here): kept-token counts reflect random features, not
real images; the table says so.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from staticprune.bench.flops import count_flops
from staticprune.bench.latency import spread, time_interleaved
from staticprune.bench.suite import NOISY_SPREAD, count_flops_call
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto, save_atomic
from staticprune.methods import build_static_method, exact_options, method_module
from staticprune.models import build_model
from staticprune.reference import reference_module
from staticprune.verify.levels import condition_mask_decoder, l1_compare, run_static
from staticprune.runtime.ort import ort_session
from staticprune.verify.parity import generated_inputs, verify_onnx

# Which model family each method runs on (DToP and STEP need the SegViT ATM head).
SEGVIT_METHODS = {"dtop", "step"}


@dataclass
class MethodRow:
    method: str
    l1_cases: int = 0
    l1_equal: int = 0
    l1_max_abs: float = 0.0
    l1_overflow_cases: int = 0
    l2_ok: Optional[bool] = None
    l2_max_abs: Optional[float] = None
    l2_decisions: str = ""
    lint_jp6: Optional[bool] = None
    lint_jp60: Optional[bool] = None
    model: str = ""
    size: str = ""
    tokens: int = 0
    mean_kept: Optional[float] = None
    options: dict[str, Any] = field(default_factory=dict)
    gflops: Optional[float] = None
    gflops_unreduced: Optional[float] = None
    gflops_reference: Optional[float] = None  # the eager reference's mean GFLOPs over the images
    ort_ms: Optional[float] = None
    ort_ms_unreduced: Optional[float] = None
    ort_ms_unreduced_samples: list[float] = field(default_factory=list)  # interleaved with the static graph's
    baseline_drift: Optional[float] = None  # from the benchmark row, when taken from one
    error: str = ""

    @property
    def flop_reduction_reference(self) -> Optional[float]:
        if not self.gflops_unreduced or not self.gflops_reference:
            return None
        return self.gflops_unreduced / self.gflops_reference

    @property
    def flop_reduction_static(self) -> Optional[float]:
        return self.gflops_unreduced / self.gflops if self.gflops_unreduced and self.gflops else None

    @property
    def slack(self) -> Optional[float]:
        return self.gflops / self.gflops_reference if self.gflops and self.gflops_reference else None

    @property
    def speedup(self) -> Optional[float]:
        return self.ort_ms_unreduced / self.ort_ms if self.ort_ms and self.ort_ms_unreduced else None

    @property
    def ratio(self) -> Optional[float]:
        """ONNX Runtime speedup / the reference's FLOP reduction (1.0 = as fast as the paper's method's FLOPs)."""
        return self.speedup / self.flop_reduction_reference if self.speedup and self.flop_reduction_reference else None

    @property
    def graph_ratio(self) -> Optional[float]:
        return self.speedup / self.flop_reduction_static if self.speedup and self.flop_reduction_static else None

    @property
    def noisy(self) -> bool:
        """The unreduced baseline varied by more than NOISY_SPREAD (its samples, or its drift within the bench run)."""
        values = [self.baseline_drift or 0.0]
        if len(self.ort_ms_unreduced_samples) > 1:
            values.append(spread(self.ort_ms_unreduced_samples))
        return max(values) > NOISY_SPREAD


def _with_method(name: str, hw: tuple[int, int], classes: int, method: str, options: dict) -> torch.nn.Module:
    model = build_model(name, hw, num_classes=classes)
    model.method = build_static_method(method, options, model)
    return model.eval()


def run_l1(method: str, cases: int, classes: int = 5) -> tuple[int, int, float, int]:
    """(cases, cases with equal decisions, max abs logit error over those, cases that overflowed)."""
    name = "segvit-vit-b-atm" if method in SEGVIT_METHODS else "segmenter-vit-t-mask"
    sizes = [(64, 64), (64, 96), (96, 64)]  # even patch grids: dCTS and STEP share 2x2 windows
    equal, worst, overflowed = 0, 0.0, 0
    ref = reference_module(method)
    for i in range(cases):
        hw = sizes[i % len(sizes)]
        batch = 1 + (i % 2)
        # L1 is a parity check: capacities that hold every token (the defaults are cost operating points)
        options = exact_options(method)
        model = condition_mask_decoder(_with_method(name, hw, classes, method, {**options, "expose_decisions": True}))
        img = generated_inputs((batch, 3, *hw), 1, seed=1000 + i)[0]
        static = run_static(model, img)
        with torch.no_grad():
            plain = condition_mask_decoder(build_model(name, hw, num_classes=classes))
            result = l1_compare(static, ref.reference_forward(plain, img, options))
        if result.overflow:
            overflowed += 1
            continue
        if result.decisions_equal:
            equal += 1
            worst = max(worst, result.max_abs)
    return cases, equal, worst, overflowed


def measure_method(method: str, cases: int, l2_size: tuple[int, int], big: tuple[int, int], big_model: str,
                   images: int, quantile: float, classes: int, repeats: int,
                   log: Callable[[str], None] = lambda s: None, bench_row: Optional[dict] = None) -> MethodRow:
    """One row. With `bench_row` (a row of a bench-suite results.json) the kept tokens, GFLOPs and latency come
    from that benchmark instead of being measured again."""
    row = MethodRow(method)
    log(f"{method}: L1 over {cases} cases")
    row.l1_cases, row.l1_equal, row.l1_max_abs, row.l1_overflow_cases = run_l1(method, cases)

    l2_model = "segvit-vit-b-atm" if method in SEGVIT_METHODS else "segmenter-vit-s-mask"
    log(f"{method}: L2 {l2_model} {l2_size[0]}x{l2_size[1]}")
    model = _with_method(l2_model, l2_size, classes, method, {"expose_decisions": True})
    x = generated_inputs((1, 3, *l2_size), 1, seed=1)[0]
    proto = export_to_proto(model, x, opset=17, output_names=model.output_names()).model
    report = verify_onnx(proto, model, generated_inputs((1, 3, *l2_size), 1, seed=2))
    feats = [o for o in report.outputs if o.dtype.startswith("float") and not o.name.startswith("margin_")]
    decisions = [o for o in report.outputs if o.name.startswith("decision_")]
    row.l2_ok, row.l2_max_abs = report.ok, max(o.max_abs for o in feats)
    row.l2_decisions = f"{sum(o.mismatches == 0 for o in decisions)}/{len(decisions)} points equal"
    row.lint_jp6, row.lint_jp60 = lint_model(proto, "orin-jp6").ok, lint_model(proto, "orin-jp60").ok

    if bench_row is not None:
        fill_from_bench(row, bench_row)
        return row
    name = "segvit-vit-b-atm" if method in SEGVIT_METHODS else big_model
    row.model, row.size = name, f"{big[0]}x{big[1]}"
    log(f"{method}: reference over {images} image(s) at {name} {row.size}")
    plain = build_model(name, big, num_classes=classes)
    row.tokens = plain.grid[0] * plain.grid[1]
    kept: dict[str, list[int]] = {}
    ref = reference_module(method)
    ref_gflops = []
    for img in generated_inputs((1, 3, *big), images, seed=50):
        holder: dict[str, Any] = {}

        def run(img=img, holder=holder):
            holder["out"] = ref.reference_forward(plain, img, {})

        ref_gflops.append(count_flops_call(run))  # the kept tokens come from the same runs
        for point, counts in holder["out"].kept.items():
            kept.setdefault(point, []).extend(counts)
    row.gflops_reference = sum(ref_gflops) / len(ref_gflops)
    if kept:
        last = list(kept)[-1]
        row.mean_kept = sum(kept[last]) / len(kept[last])
    row.options = method_module(method).calibrated_options(kept, quantile, {})
    static = _with_method(name, big, classes, method, row.options)
    row.gflops = count_flops(static, (1, 3, *big)).gflops
    row.gflops_unreduced = count_flops(plain, (1, 3, *big)).gflops
    log(f"{method}: ONNX Runtime latency, static and unreduced interleaved")
    with tempfile.TemporaryDirectory() as tmp:
        x = generated_inputs((1, 3, *big), 1, seed=3)[0]
        variants = {}
        for label, m in (("static", static), ("unreduced", plain)):
            path = os.path.join(tmp, f"{label}.onnx")
            save_atomic(export_to_proto(m, x, opset=17, output_names=m.output_names()).model, path)
            sess = ort_session(path)
            feeds = {sess.get_inputs()[0].name: x.numpy()}
            variants[label] = ("onnxruntime-cpu", lambda sess=sess, feeds=feeds: sess.run(None, feeds))
        timings = time_interleaved(variants, warmup=1, repeats=repeats)
        row.ort_ms, row.ort_ms_unreduced = timings["static"].median_ms, timings["unreduced"].median_ms
        row.ort_ms_unreduced_samples = timings["unreduced"].samples
    return row


def bench_rows(results: dict, size: Optional[str] = None) -> tuple[dict[str, dict], str]:
    """The rows of a bench-suite results.json at `size` (default: its largest size), by method; and that size."""
    good = [r for r in results.get("rows", []) if not r.get("error")]
    if not good:
        raise ValueError("the benchmark results hold no successful rows")
    sizes = {r["size"] for r in good}
    if size is None:
        size = max(sizes, key=lambda s: int(s.split("x")[0]) * int(s.split("x")[1]))
    elif size not in sizes:
        raise ValueError(f"the benchmark results have no rows at {size}; sizes there: {', '.join(sorted(sizes))}")
    return {r["method"]: r for r in good if r["size"] == size}, size


def _median_of(row: dict, backend: str, variant: str) -> Optional[float]:
    return next((t["median_ms"] for t in row.get("timings", []) if t["backend"] == backend and t["variant"] == variant),
                None)


def fill_from_bench(row: MethodRow, bench: dict) -> None:
    row.model, row.size, row.tokens, row.options = bench["model"], bench["size"], bench["tokens"], bench["options"]
    kept = list(bench["kept_reference"].values())
    row.mean_kept = kept[-1] if kept else None
    row.gflops, row.gflops_unreduced = bench["gflops_static"], bench["gflops_unreduced"]
    row.gflops_reference = bench.get("gflops_reference") or None
    row.ort_ms = _median_of(bench, "onnxruntime-cpu", "static")
    row.ort_ms_unreduced = _median_of(bench, "onnxruntime-cpu", "unreduced")
    row.ort_ms_unreduced_samples = next(
        (list(t.get("samples", [])) for t in bench.get("timings", [])
         if t["backend"] == "onnxruntime-cpu" and t["variant"] == "unreduced"), [])
    row.baseline_drift = bench.get("baseline_drift", {}).get("onnxruntime-cpu")


def _x(value: Optional[float], suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def format_table(rows: list[MethodRow], meta: dict) -> str:
    head = ("| method | L1 (static = reference) | L2 (ORT = static) | lint orin-jp6 | lint orin-jp60 | "
            "mean kept tokens | GFLOPs unreduced / reference / static | FLOP reduction reference / static (slack) | "
            "ORT CPU ms unreduced / static (speedup) | speedup ÷ reference FLOP reduction (graph only) |")
    lines = [head, "|" + " --- |" * 10]

    def yes(v: Optional[bool]) -> str:
        return "n/a" if v is None else ("clean" if v else "**violations**")

    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | error: {r.error} | | | | | | | | |")
            continue
        l1 = f"{r.l1_equal}/{r.l1_cases - r.l1_overflow_cases} decisions equal, max abs {r.l1_max_abs:.1e}"
        if r.l1_overflow_cases:
            l1 += f" ({r.l1_overflow_cases} overflow cases excluded)"
        l2 = "n/a" if r.l2_ok is None else f"{'ok' if r.l2_ok else 'FAIL'}, {r.l2_decisions}, max abs {r.l2_max_abs:.1e}"
        kept = "n/a" if r.mean_kept is None else f"{r.mean_kept:.0f} / {r.tokens}"
        flops = ("n/a" if r.gflops is None else
                 f"{r.gflops_unreduced:.1f} / {'n/a' if r.gflops_reference is None else f'{r.gflops_reference:.1f}'}"
                 f" / {r.gflops:.1f}")
        reduction = (f"{_x(r.flop_reduction_reference, 'x')} / {_x(r.flop_reduction_static, 'x')} "
                     f"({_x(r.slack)})")
        lat = "n/a" if r.ort_ms is None else f"{r.ort_ms_unreduced:.0f} / {r.ort_ms:.0f} ({_x(r.speedup, 'x')})"
        ratio = f"**{_x(r.ratio)}** ({_x(r.graph_ratio)})" + (" noisy" if r.noisy else "")
        lines.append(f"| {r.method} | {l1} | {l2} | {yes(r.lint_jp6)} | {yes(r.lint_jp60)} | {kept} | {flops} | "
                     f"{reduction} | {lat} | {ratio} |")
    lines.append("")
    redrawn = f"; table redrawn by `{meta['redrawn_by']}`" if meta.get("redrawn_by") else ""
    lines.append(f"Generated by `{meta['command']}` ({meta['seconds']:.0f} s, {meta['threads']} CPU threads{redrawn}). "
                 f"L1: {meta['cases']} generated cases per method on ViT-T (SegViT-B for DToP/STEP) at 64x64/64x96/96x64, "
                 f"batch 1 and 2, capacities that hold every token, mask-decoder class embeddings redrawn at std 1 "
                 f"(`condition_mask_decoder`); L2 at {meta['l2_size']} with default options; kept tokens, GFLOPs and latency on "
                 + (f"{meta['big_model']} (SegViT-B for DToP/STEP) at {meta['big_size']} with capacities calibrated "
                    f"at the {meta['quantile']} quantile of {meta['images']} generated image(s)"
                    if not meta.get("bench") else
                    f"the model each method is paired with (column model of the performance table) at "
                    f"{meta['big_size']}, taken from `{meta['bench']['file']}`, written by `{meta['bench']['command']}`")
                 + ". Speedup: unreduced / static ONNX Runtime CPU ms of one run; reference FLOP reduction: "
                 "unreduced GFLOPs / the eager reference's mean GFLOPs over the images (the paper's dynamic method); "
                 f"slack: static / reference GFLOPs; noisy: the unreduced baseline varied by more than "
                 f"{100 * NOISY_SPREAD:.0f} % during the run. Random weights: kept-token counts describe random "
                 "features, not real images.")
    return "\n".join(lines)


def replace_between_markers(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"markers {start} / {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


_DERIVED = ("flop_reduction_reference", "flop_reduction_static", "slack", "speedup", "ratio", "graph_ratio", "noisy")


def rows_from_report_json(text: str) -> tuple[list[MethodRow], dict]:
    """The rows and meta of a report written by `rows_to_json` (derived values are recomputed, not read)."""
    data = json.loads(text)
    rows = [MethodRow(**{k: v for k, v in d.items() if k not in _DERIVED}) for d in data["rows"]]
    return rows, dict(data["meta"])


def rows_to_json(rows: list[MethodRow], meta: dict) -> str:
    def encode(r: MethodRow) -> dict:
        d = asdict(r)
        d.update({name: getattr(r, name) for name in _DERIVED})
        return d

    return json.dumps({"meta": meta, "rows": [encode(r) for r in rows]}, indent=2)
