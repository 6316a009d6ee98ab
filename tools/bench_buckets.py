"""Capacity buckets against one static graph, per photograph (docs/buckets.md, "Measured").

    .venv/bin/pip install -e '.[photos]'          # scikit-image: its sample photographs
    .venv/bin/python tools/bench_buckets.py --model segmenter-vit-b-mask --size 768x768 --methods g2tm \
        --bucket-growth 1.25 --repeats 3 --json out/bench-buckets.json --markdown out/bench-buckets.md

For each method: the eager reference runs over the photographs (kept tokens per reduction point, as `staticprune
calibrate` measures them); buckets come from those counts (`calibrate --bucket-growth R`, or `--buckets K`); the
calibrated capacity is their quantile 1.0 (the largest count). Every method graph uses --key-bias (default
channel, the ONNX Runtime form). Then, with ONNX Runtime on the CPU, per photograph and interleaved in
one process (each repeat runs every variant once, in rotating order), the median and min latency of:
  bucketed    the bucket pipeline (prefix graph + the smallest holding bucket graph per reduction point);
  calibrated  one static graph at the calibrated capacities;
  fit         the prefix graph + bucket graphs at exactly this photograph's counts (the best a static graph can do);
  unreduced   the graph without the method.
The bucket pipeline is exported with `export_buckets` (every stage linted and verified, end-to-end check against
the single graph and the eager reference); the table also says whether its counts equal the reference's, and the
largest logit difference from the reference, of the pipeline and of the calibrated graph, on each photograph.

PyTorch work (reference, exports) runs in a child process per method, so that its memory is back with the system
before the ONNX Runtime sessions open; graphs and reference logits stay in --work-dir, and --reuse keeps the graphs
found there (written atomically) instead of exporting them again.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from staticprune.calibrate import list_images
from staticprune.imageio import load_input, load_input_array
from staticprune.models import get_spec
from staticprune.export.buckets import (NEXT, STATE_NAMES, StageSpec, bucket_capacities, build_stage, check_buckets,
                                        export_buckets, geometric_buckets, method_plan, stage_specs)
from staticprune.export.onnx_export import export_to_proto
from staticprune.fileio import write_bytes_atomic
from staticprune.methods import build_static_method
from staticprune.pipeline import ModelConfig, build
from staticprune.reference import reference_module
from staticprune.runtime.buckets import BucketedRunner
from staticprune.runtime.ort import ort_session

# photographs bundled with scikit-image (no download)
SAMPLE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_sample_photos(folder: Path) -> Path:
    """scikit-image's sample photographs as RGB PNGs (grayscale ones replicated to three channels)."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("scikit-image is missing: .venv/bin/pip install -e '.[photos]' (or pass --images DIR)")
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    source = Path(skimage.data.__file__).parent
    for name in SAMPLE_PHOTOS:
        Image.open(source / name).convert("RGB").save(folder / (Path(name).stem + ".png"))
    return folder


def export_graph(module: torch.nn.Module, example: tuple, input_names: list[str], output_names: list[str],
                 path: Path) -> Path:
    proto = export_to_proto(module, example, input_names=tuple(input_names), output_names=output_names).model
    write_bytes_atomic(proto.SerializeToString(), path)  # atomic: --reuse trusts every file it finds
    return path


class Timer:
    """Median and min over repeats of one variant's latency on one photograph."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def time(self, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.samples.append((time.perf_counter() - t0) * 1e3)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)


def run_sessions(sessions: list, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A chain of stage sessions (prefix, then fixed buckets): the fit variant, no dispatch."""
    out: dict[str, np.ndarray] = {}
    for k, session in enumerate(sessions):
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(names, feeds)))
        if k + 1 < len(sessions):
            feeds = {n: out[n + NEXT] for n in STATE_NAMES}
    return out


def export_phase(args: argparse.Namespace, method: str, images: list[tuple[str, torch.Tensor]], work: Path) -> None:
    """PyTorch side, run in a child process (its memory is returned to the system before any timing): the eager
    reference over the photographs, the buckets, and every graph the timing needs. Writes work/METHOD/manifest.json."""
    cfg = ModelConfig(model=args.model, size=args.size, classes=args.classes, method=method, labels=True,
                      weights=args.weights, key_bias=args.key_bias)
    model = build(cfg)
    plan = method_plan(method, model.method, model)
    n = model.grid[0] * model.grid[1]
    folder = work / method
    folder.mkdir(parents=True, exist_ok=True)
    reference = reference_module(method)
    log(f"[bench-buckets] {method}: eager reference over {len(images)} photograph(s)")
    refs = []
    for name, img in images:
        with torch.no_grad():
            out = reference.reference_forward(model, img, {})
        logits = folder / f"reference-{Path(name).stem}.npy"  # 150 x 768 x 768 floats: on disk, not in memory
        np.save(logits, out.logits.float().numpy())
        refs.append({"image": name, "logits": logits.name,
                     "kept": {p.name: int(out.kept[p.name][0]) for p in plan.points}})
        log(f"[bench-buckets]   {name}: " + ", ".join(f"{k} {v}" for k, v in refs[-1]["kept"].items()))
        del out
    counts = {p.name: [r["kept"][p.name] for r in refs] for p in plan.points}
    if args.bucket_growth:
        buckets = {p: geometric_buckets(c, args.bucket_growth, args.bucket_multiple, n) for p, c in counts.items()}
    else:
        buckets = {p: bucket_capacities(c, args.buckets, args.bucket_multiple, n) for p, c in counts.items()}
    buckets, _ = check_buckets(plan, buckets, n)
    calibrated = {p: max(c) for p, c in counts.items()}  # quantile 1.0 over the same photographs
    options = {k: None for k in plan.capacity_options}
    cfg = dataclasses.replace(cfg, method_options=options)
    model.method = build_static_method(method, options, model)

    report_file = folder / "export_report.txt"
    pipeline = folder / "pipeline"
    t0 = time.perf_counter()
    reusable = args.reuse and report_file.is_file() and (pipeline / "pipeline.json").is_file() and \
        {p["name"]: p["buckets"] for p in json.loads((pipeline / "pipeline.json").read_text())["points"]} == buckets
    if not reusable:
        log(f"[bench-buckets] {method}: exporting buckets {buckets}")
        result = export_buckets(cfg, model, buckets, pipeline, 17, "orin-jp6", [images[0][1]], args.tol,
                                force=True, log=log)
        report_file.write_text(json.dumps({"ok": result.ok, "report": result.format(),
                                           "prefix": result.graphs[0].file}))
        del result
        gc.collect()
    export_seconds = time.perf_counter() - t0
    single_opts = {key: calibrated[p.name] for p, key in zip(plan.points, plan.capacity_options)}

    def export_once(path: Path, module: torch.nn.Module, example: tuple, inputs: list[str], outputs: list[str]) -> Path:
        if not (args.reuse and path.is_file()):
            log(f"[bench-buckets] {method}: exporting {path.name}")
            export_graph(module, example, inputs, outputs, path)
            gc.collect()
        return path

    model.method = build_static_method(method, single_opts, model)
    single_path = export_once(folder / f"calibrated-{'-'.join(map(str, single_opts.values()))}.onnx", model,
                              (images[0][1],), ["image"], model.output_names())
    saved_method, model.method = model.method, None
    unreduced_path = export_once(folder / "unreduced.onnx", model, (images[0][1],), ["image"], model.output_names())
    model.method = saved_method
    specs = stage_specs(plan, buckets)
    fit: dict[str, str] = {}  # "stage:capacity" -> graph
    for ref in refs:
        for spec, c in zip(specs[1:], [ref["kept"][p.name] for p in plan.points]):
            path = folder / f"fit-stage{spec.index}-c{c}.onnx"
            if f"{spec.index}:{c}" not in fit and not (args.reuse and path.is_file()):
                stage = build_stage(model, method, plan, options, spec, c)
                state = fit_state_example(model, method, plan, options, specs, spec, images[0][1])
                export_once(path, stage, state, stage.input_names(), stage.output_names())
            fit[f"{spec.index}:{c}"] = path.name
    (folder / "manifest.json").write_text(json.dumps({
        "points": [p.name for p in plan.points], "num_patches": n, "buckets": buckets, "calibrated": calibrated,
        "refs": refs, "single": single_path.name, "unreduced": unreduced_path.name, "fit": fit,
        "export_seconds": export_seconds}, indent=2))


def time_phase(args: argparse.Namespace, method: str, images: list[tuple[str, np.ndarray]], work: Path) -> dict:
    """ONNX Runtime side: every variant per photograph, interleaved (no PyTorch work in this process)."""
    folder = work / method
    manifest = json.loads((folder / "manifest.json").read_text())
    report = json.loads((folder / "export_report.txt").read_text())
    log(report["report"])
    points, calibrated = manifest["points"], manifest["calibrated"]
    rows = []
    for (name, x), ref in zip(images, manifest["refs"]):
        # Sessions live for one photograph: ONNX Runtime keeps each session's activation arena (about 1 GB for a
        # ViT-B graph at 768x768), and a dozen of them do not fit a shared 24 GB machine. The runner opens the
        # graphs it uses only.
        runner = BucketedRunner(str(folder / "pipeline"), threads=args.threads, lazy=True)
        single = ort_session(folder / manifest["single"], threads=args.threads)
        unreduced = ort_session(folder / manifest["unreduced"], threads=args.threads)
        fit_caps = [ref["kept"][p] for p in points]
        fit_sessions = [ort_session(folder / "pipeline" / report["prefix"], threads=args.threads)] + [
            ort_session(folder / manifest["fit"][f"{k + 1}:{c}"], threads=args.threads) for k, c in enumerate(fit_caps)]
        variants = {
            "bucketed": lambda: runner.run(x),
            "calibrated": lambda: single.run(None, {"image": x}),
            "fit": lambda: run_sessions(fit_sessions, {"image": x}),
            "unreduced": lambda: unreduced.run(None, {"image": x}),
        }
        timers = {k: Timer() for k in variants}
        for fn in variants.values():  # warm-up
            fn()
        order = list(variants)
        for r in range(args.repeats):
            for k in order[r % len(order):] + order[: r % len(order)]:
                timers[k].time(variants[k])
        got = runner.run(x)
        kept_equal = all(int(got[f"count_{p}"][0]) == ref["kept"][p] for p in points)
        reference_logits = np.load(folder / ref["logits"], mmap_mode="r")
        l1 = float(np.abs(got["logits"].astype(np.float64) - reference_logits).max())
        # the single graph in the same runtime: a token decision at a near-tie can flip between ONNX Runtime and
        # PyTorch in either graph (random weights give many exact ties in flat image regions)
        single_logits = single.run(["logits"], {"image": x})[0]
        l1_single = float(np.abs(single_logits.astype(np.float64) - reference_logits).max())
        row = {"image": name, "kept": ref["kept"], "buckets": dict(runner.last_capacities),
               "calibrated": calibrated, "kept_equal_reference": kept_equal, "logits_max_abs_vs_reference": l1,
               "calibrated_logits_max_abs_vs_reference": l1_single,
               "overflow": int(np.max(got["overflow"])),
               **{f"{k}_ms": {"median": t.median, "min": t.min} for k, t in timers.items()}}
        rows.append(row)
        log(f"[bench-buckets]   {name} ({fit_caps}): " + ", ".join(f"{k} {t.median:.0f} ms" for k, t in timers.items()))
        runner.close()
        single = unreduced = got = reference_logits = single_logits = None  # released before the next photograph's sessions open
        fit_sessions, variants = [], {}
        gc.collect()
    return {"method": method, "buckets": manifest["buckets"], "calibrated": calibrated,
            "num_patches": manifest["num_patches"], "export_seconds": manifest["export_seconds"],
            "export_ok": report["ok"], "export_report": report["report"], "rows": rows}


def fit_state_example(model, method, plan, options, specs, spec: StageSpec, img: torch.Tensor) -> tuple:
    """An input state for a stage graph (any state of the right shapes: tracing needs an example)."""
    feeds: tuple = (img,)
    with torch.no_grad():
        for s in specs[: spec.index]:
            stage = build_stage(model, method, plan, options, s, s.capacities[-1])
            out = dict(zip(stage.output_names(), stage(*feeds)))
            feeds = tuple(out[n + NEXT] for n in STATE_NAMES)
    return feeds


def method_table(res: dict) -> str:
    """One method's per-photograph table (what docs/buckets.md shows between its bench-buckets-table markers)."""
    points = list(res["buckets"])
    lines = [f"**{res['method']}** (buckets " + "; ".join(f"{p}: {', '.join(map(str, v))}"
                                                         for p, v in res["buckets"].items())
             + "; calibrated capacity " + ", ".join(f"{p} {c}" for p, c in res["calibrated"].items())
             + f" of {res['num_patches']})", "",
             "| photograph | kept (reference) | bucket | bucketed | calibrated | fit | unreduced | bucketed / fit "
             "| bucketed = reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        kept = " / ".join(str(r["kept"][p]) for p in points)
        bucket = " / ".join(str(r["buckets"][p]) for p in points)
        cells = [f"{r[k + '_ms']['median']:.0f} ({r[k + '_ms']['min']:.0f})"
                 for k in ("bucketed", "calibrated", "fit", "unreduced")]
        ratio = r["bucketed_ms"]["median"] / r["fit_ms"]["median"]
        same = ("kept equal, logits " + f"{r['logits_max_abs_vs_reference']:.1e}") if r["kept_equal_reference"] \
            else "kept DIFFER"
        if "calibrated_logits_max_abs_vs_reference" in r:
            same += f" (calibrated graph {r['calibrated_logits_max_abs_vs_reference']:.1e})"
        lines.append(f"| {r['image']} | {kept} | {bucket} | " + " | ".join(cells) + f" | {ratio:.2f} | {same} |")
    return "\n".join(lines)


def markdown(run: dict) -> str:
    """A whole run (the JSON this script writes): its settings, then one table per method."""
    size = run["size"]
    lines = [f"ONNX Runtime CPU ({run['threads']} threads), {run['model']} {size[0]}x{size[1]}, random weights "
             f"(seed 0), batch 1, key bias {run.get('key_bias', 'add')}; median (min) ms of {run['repeats']} "
             f"interleaved runs per photograph after one warm-up; {run['seconds'] / 60:.0f} min in all.", ""]
    for res in run["results"]:
        lines += [method_table(res), ""]
    return "\n".join(lines)


def _range(values: list[float], digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}-{hi:.{digits}f}"


def summary_row(res: dict, fit_goal: float = 1.15) -> str:
    """The README's line for one method: counts, and bucketed against unreduced, calibrated and fit (medians)."""
    rows, points, n = res["rows"], list(res["buckets"]), res["num_patches"]
    med = {k: [r[f"{k}_ms"]["median"] for r in rows] for k in ("bucketed", "calibrated", "fit", "unreduced")}
    buckets = ", ".join(f"{p} {len([b for b in v if b < n])} + N" for p, v in res["buckets"].items())
    kept = ", ".join(f"{p} {min(r['kept'][p] for r in rows)}-{max(r['kept'][p] for r in rows)}" for p in points)
    vs_unreduced = [u / b for u, b in zip(med["unreduced"], med["bucketed"])]
    faster = [c / b for c, b in zip(med["calibrated"], med["bucketed"]) if b < c]
    not_faster = [f"{r['image']} {b:.0f} vs {c:.0f} ms ({(b / c - 1) * 100:+.1f} %, its bucket = the calibrated "
                  f"capacity)" if all(r["buckets"][p] == res["calibrated"][p] for p in points) else
                  f"{r['image']} {b:.0f} vs {c:.0f} ms ({(b / c - 1) * 100:+.1f} %)"
                  for r, b, c in zip(rows, med["bucketed"], med["calibrated"]) if b >= c]
    vs_fit = [b / f for b, f in zip(med["bucketed"], med["fit"])]
    calibrated = f"{_range(faster)}x faster on {len(faster)}/{len(rows)}" if faster else "never faster"
    if not_faster:
        calibrated += "; not on " + "; ".join(not_faster)
    return (f"| {res['method']} ({buckets}) | {kept} of {n} | {_range(vs_unreduced, 1)}x faster on "
            f"{sum(v > 1 for v in vs_unreduced)}/{len(rows)} | {calibrated} | {_range(vs_fit)}, "
            f"{sum(v <= fit_goal for v in vs_fit)}/{len(rows)} within {fit_goal:g} |")


def summary_table(runs: list[dict]) -> str:
    lines = ["| method (buckets below N per point) | tokens kept | vs unreduced | vs calibrated graph | "
             "vs fit graph (goal <= 1.15) |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(lines + [summary_row(res) for run in runs for res in run["results"]])


def update_docs(runs: list[dict], docs: Optional[str], readme: Optional[str]) -> None:
    """Redraw the tables of docs/buckets.md (markers bench-buckets-table:METHOD) and the README summary (markers
    buckets-summary) from saved runs."""
    from staticprune.bench.methods_report import replace_between_markers

    if docs:
        text = Path(docs).read_text()
        for run in runs:
            for res in run["results"]:
                text = replace_between_markers(text, f"bench-buckets-table:{res['method']}", method_table(res))
        Path(docs).write_text(text)
    if readme:
        Path(readme).write_text(replace_between_markers(Path(readme).read_text(), "buckets-summary",
                                                        summary_table(runs)))


def write_results(args: argparse.Namespace, results: list[dict], seconds: float) -> None:
    run = {"model": args.model, "size": list(args.size), "threads": args.threads, "key_bias": args.key_bias,
           "repeats": args.repeats, "bucket_growth": args.bucket_growth,
           "buckets_per_point": None if args.bucket_growth else args.buckets, "seconds": seconds, "results": results}
    text = markdown(run)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segmenter-vit-b-mask")
    parser.add_argument("--size", default="768x768")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--weights", help="checkpoint (default: random weights, seed 0)")
    parser.add_argument("--methods", default="g2tm,algm")
    parser.add_argument("--images", help="directory of photographs (default: scikit-image's sample photographs)")
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--bucket-growth", type=float, default=None,
                        help="geometric buckets (calibrate --bucket-growth R) instead of --buckets K quantiles")
    parser.add_argument("--bucket-multiple", type=int, default=64)
    parser.add_argument("--key-bias", choices=["add", "channel"], default="channel",
                        help="key-bias form of every method graph (export --key-bias): channel, the ONNX Runtime "
                             "form (default), or add, the TensorRT form")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-3, help="logit tolerance of the export checks")
    parser.add_argument("--work-dir", help="where graphs go (default: a temporary folder, removed)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep what --work-dir holds: a method with a manifest.json skips its PyTorch phase, "
                             "graphs found there (same buckets and capacities) are not exported again")
    parser.add_argument("--phase", choices=["all", "export"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="measure nothing: redraw from runs this script saved with --json")
    parser.add_argument("--update-docs", metavar="MD", help="replace the per-method tables between "
                        "<!-- bench-buckets-table:METHOD:start/end --> markers (docs/buckets.md)")
    parser.add_argument("--update-readme", metavar="MD", help="replace the summary table between "
                        "<!-- buckets-summary:start/end --> markers (README.md)")
    args = parser.parse_args()
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
        for run in runs:
            print(markdown(run))
        print(summary_table(runs))
        update_docs(runs, args.update_docs, args.update_readme)
        return 0
    from staticprune.models import parse_size

    args.size = parse_size(args.size)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-buckets.") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        photos = Path(args.images) if args.images else write_sample_photos(work / "photos")
        spec = get_spec(args.model)
        files = list_images(photos)
        if args.phase == "export":
            torch.set_num_threads(args.threads)
            images = [(p.name, load_input(p, args.size, spec.mean, spec.std)) for p in files]
            for method in args.methods.split(","):
                export_phase(args, method, images, work)
            return 0
        arrays = [(p.name, load_input_array(p, args.size, spec.mean, spec.std)) for p in files]
        results = []
        for method in args.methods.split(","):
            # the PyTorch side in a child process: its memory goes back to the system before the timing starts
            child = [sys.executable, __file__, *sys.argv[1:], "--phase", "export", "--methods", method,
                     "--work-dir", str(work), "--images", str(photos)]
            if not (args.reuse and (work / method / "manifest.json").is_file()):
                if subprocess.run(child).returncode != 0:
                    raise SystemExit(f"export phase of {method} failed")
            results.append(time_phase(args, method, arrays, work))
            write_results(args, results, time.perf_counter() - started)  # after each method: a long run may stop
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
