"""The `staticprune` command.

Exit codes: 0 ok, 1 a check failed (lint violation, parity breach), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_TARGET = "orin-jp6"


class UsageError(Exception):
    """Bad usage or input: reported as one line, exit code 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def step(label: str) -> Iterator[None]:
    """Progress line for steps that may take more than a few seconds."""
    log(f"[staticprune] {label} ...")
    t0 = time.perf_counter()
    yield
    log(f"[staticprune] {label}: done in {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------------------------- arguments


def _size(text: str) -> tuple[int, int]:
    from staticprune.models import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _opset(value: int) -> int:
    from staticprune.export.onnx_export import check_opset

    try:
        check_opset(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return value


def _target(name: str) -> str:
    from staticprune.export.targets import TARGETS

    if name not in TARGETS:
        raise UsageError(f"unknown target '{name}'; choose one of: {', '.join(TARGETS)}")
    return name


def _method_options(args: argparse.Namespace) -> dict:
    """--config FILE (JSON, as calibrate writes) then --opt key=value pairs on top."""
    options: dict = {}
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"config '{args.config}' is not a readable JSON file ({exc.__class__.__name__})") from None
        if data.get("method") and args.method in (None, "none"):
            args.method = data["method"]
        options.update(data.get("method_options", data.get("options", {})))
    for item in getattr(args, "opt", None) or []:
        if "=" not in item:
            raise UsageError(f"--opt '{item}' is not key=value")
        key, value = item.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _model_config(args: argparse.Namespace):
    from staticprune.models import MODELS
    from staticprune.pipeline import ModelConfig

    if args.model not in MODELS:
        raise UsageError(f"unknown model '{args.model}'; run 'staticprune models' to list the {len(MODELS)} names")
    options = _method_options(args)
    method = args.method or "none"
    _check_method(method)
    if args.weights and not Path(args.weights).is_file():
        raise UsageError(f"weights '{args.weights}' do not exist or are not a file")
    return ModelConfig(
        model=args.model, size=_size(args.size), classes=args.classes, batch=args.batch, seed=args.seed,
        weights=args.weights, weights_layout=args.weights_layout, method=method, method_options=options,
        labels=getattr(args, "labels", False), raw_input=getattr(args, "raw_input", False),
    )


def _check_method(method: str) -> None:
    from staticprune.methods import available_methods

    names = ["none", *available_methods()]
    if method not in names:
        raise UsageError(f"unknown method '{method}'; choose one of: {', '.join(names)}")


def _build(cfg):
    from staticprune.pipeline import build

    try:
        return build(cfg)
    except ValueError as exc:  # CheckpointError is a ValueError too
        raise UsageError(str(exc)) from None


def _write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    from staticprune.fileio import write_bytes_atomic

    write_bytes_atomic((json.dumps(payload, indent=2) + "\n").encode(), path)
    log(f"[staticprune] wrote {path}")


def _load_onnx(path: str):
    import onnx

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ONNX file '{path}' does not exist")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UsageError(f"'{path}' is not a readable ONNX model ({exc.__class__.__name__})") from None


# --------------------------------------------------------------------------------------------- commands


@dataclass
class ExportOutcome:
    path: Path
    lint_ok: bool
    verify_ok: bool
    lint: object
    verify: object
    seconds: dict


def run_export(cfg, out: str, opset: int, target: str, exporter: str, slim: bool, verify_inputs: int, tol: float,
               plugins: bool = False) -> ExportOutcome:
    """build -> export -> lint -> verify -> atomic write. The file is written even if a check fails."""
    from staticprune.export.lint import lint_model
    from staticprune.export.onnx_export import ExportError, export_to_proto, save_atomic
    from staticprune.export.targets import get_target
    from staticprune.pipeline import attach_config, example_inputs
    from staticprune.verify.parity import verify_onnx

    times = {}
    cfg.decompose_layernorm = not get_target(target).supports_layernorm
    t0 = time.perf_counter()
    with step(f"building {cfg.model} {cfg.size[0]}x{cfg.size[1]} method={cfg.method}"):
        model = _build(cfg)
    times["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with step(f"exporting to ONNX (opset {opset}, {exporter})"):
        try:
            result = export_to_proto(model, example_inputs(cfg, 1, cfg.seed)[0], opset=opset,
                                     output_names=model.output_names(), exporter=exporter, slim=slim)
        except ExportError as exc:
            log(f"staticprune: export check failed: {exc}")
            raise SystemExit(EXIT_CHECK_FAILED) from None
    times["export"] = time.perf_counter() - t0
    attach_config(result.model, cfg, {"opset": opset, "target": target, "outputs": result.output_names})
    t0 = time.perf_counter()
    lint = lint_model(result.model, target)
    times["lint"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with step(f"verifying ONNX Runtime vs PyTorch on {verify_inputs} input(s)"):
        report = verify_onnx(result.model, model, example_inputs(cfg, verify_inputs, cfg.seed + 1), tol=tol,
                             output_names=result.output_names)
    times["verify"] = time.perf_counter() - t0
    if plugins:
        return _export_plugin_graph(cfg, model, result, out, opset, target, lint, report, times)
    path = save_atomic(result.model, out)
    return ExportOutcome(path, lint.ok, report.ok, lint, report, times)


def _export_plugin_graph(cfg, model, standard, out, opset, target, std_lint, report, times) -> ExportOutcome:
    """--plugins: the plugin graph at `out`, the verified standard graph beside it (for `verify --engine`)."""
    from staticprune.export.lint import Violation, lint_model
    from staticprune.export.onnx_export import export_to_proto, save_atomic
    from staticprune.export.plugin_graph import check_plugin_graph, plugin_nodes
    from staticprune.pipeline import attach_config, example_inputs

    merges = getattr(model.method, "plugin_merge_points", 0)
    t0 = time.perf_counter()
    with step("exporting the TensorRT plugin graph"):
        plugin = export_to_proto(model, example_inputs(cfg, 1, cfg.seed)[0], opset=opset,
                                 output_names=model.output_names(), plugins=True).model
    times["export_plugins"] = time.perf_counter() - t0
    if not plugin_nodes(plugin):
        raise UsageError(f"method '{cfg.method}' has no step the plugins replace; export without --plugins")
    problems = check_plugin_graph(plugin, standard.model, merges)
    standard_path = Path(out).with_suffix("").as_posix() + ".standard.onnx"
    attach_config(plugin, cfg, {"opset": opset, "target": target, "outputs": standard.output_names,
                                "plugins": True, "standard_graph": standard_path})
    lint = lint_model(plugin, target)
    lint.violations += [Violation(rule="plugin-graph", node="", op="", message=p, severity="error") for p in problems]
    save_atomic(standard.model, standard_path)
    path = save_atomic(plugin, out)
    counts = {n.op_type: sum(m.op_type == n.op_type for m in plugin_nodes(plugin)) for n in plugin_nodes(plugin)}
    report.notes.append("plugin graph: " + ", ".join(f"{v} x {k}" for k, v in counts.items())
                        + f"; verified above is the standard graph, written to {standard_path}")
    return ExportOutcome(path, lint.ok and std_lint.ok, report.ok, lint, report, times)


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise UsageError(f"output '{out}' is a directory; give a file name like model.onnx")
    cfg = _model_config(args)
    if args.plugins and args.exporter != "torchscript":
        raise UsageError("--plugins needs the torchscript exporter (the default)")
    outcome = run_export(cfg, str(out), _opset(args.opset), _target(args.target), args.exporter, not args.no_slim,
                         args.verify_inputs, args.tol, plugins=args.plugins)
    print(f"lint ({args.target}): {'clean' if outcome.lint_ok else 'VIOLATIONS'}")
    print(outcome.lint.format())
    print(outcome.verify.format())
    print(f"wrote {outcome.path} ({outcome.path.stat().st_size / 1e6:.1f} MB); "
          + ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items()))
    _write_json(args.json, {"onnx": str(outcome.path), "lint": outcome.lint.to_dict(), "verify": outcome.verify.to_dict(),
                            "seconds": outcome.seconds, "config": json.loads(cfg.to_json())})
    return EXIT_OK if outcome.lint_ok and outcome.verify_ok else EXIT_CHECK_FAILED


def cmd_lint(args: argparse.Namespace) -> int:
    from staticprune.export.lint import lint_model

    proto = _load_onnx(args.onnx)
    report = lint_model(proto, _target(args.target))
    print(report.format())
    _write_json(args.json, report.to_dict())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _config_from_onnx(proto, args: argparse.Namespace):
    from staticprune.pipeline import read_config

    cfg = read_config(proto)
    if cfg is None:
        if not args.model or not args.size:
            raise UsageError(f"'{args.onnx}' carries no staticprune metadata; pass --model and --size (and --weights)")
        args.method = args.method or "none"
        args.labels = False
        return _model_config(args)
    if args.weights:
        cfg.weights = args.weights
    if cfg.weights and not Path(cfg.weights).is_file():
        raise UsageError(f"weights '{cfg.weights}' recorded in the model are missing; pass --weights PATH")
    return cfg


def _inputs_for(cfg, args: argparse.Namespace) -> list:
    from staticprune.imageio import load_input
    from staticprune.models import get_spec
    from staticprune.pipeline import example_inputs

    if args.input:
        spec = get_spec(cfg.model)
        tensors = []
        for path in args.input:
            try:
                t = load_input(path, cfg.size, spec.mean, spec.std, raw=cfg.raw_input)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            tensors.append(t.expand(cfg.batch, -1, -1, -1).contiguous() if t.shape[0] == 1 else t)
        return tensors
    return example_inputs(cfg, args.inputs, args.seed + 1)


def cmd_verify(args: argparse.Namespace) -> int:
    from staticprune.verify.parity import verify_onnx

    if args.engine:
        return cmd_verify_engine(args)
    if not args.onnx:
        raise UsageError("verify needs an ONNX file (or --engine ENGINE)")
    proto = _load_onnx(args.onnx)
    cfg = _config_from_onnx(proto, args)
    with step(f"rebuilding {cfg.model} {cfg.size[0]}x{cfg.size[1]} method={cfg.method} in PyTorch"):
        model = _build(cfg)
    inputs = _inputs_for(cfg, args)
    with step(f"running ONNX Runtime and PyTorch on {len(inputs)} input(s)"):
        report = verify_onnx(args.onnx, model, inputs, tol=args.tol, output_names=[o.name for o in proto.graph.output])
    print(report.format())
    _write_json(args.json, report.to_dict())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def bench_model(cfg, onnx_path: Optional[str], warmup: int, repeats: int, backends: Sequence[str]) -> dict:
    """GFLOPs and latency for one model config; exports to a temporary file when no ONNX is given."""
    import torch

    from staticprune.bench import count_flops, time_callable
    from staticprune.pipeline import example_inputs
    from staticprune.verify.parity import ort_session

    model = _build(cfg)
    flops = count_flops(model, (1, 3, *cfg.size))
    result = {"model": cfg.model, "size": list(cfg.size), "classes": cfg.classes, "method": cfg.method,
              "batch": cfg.batch, "gflops": flops.gflops, "gflops_by_op": {k: v / 1e9 for k, v in flops.by_op.items()},
              "flop_convention": flops.convention, "threads": torch.get_num_threads(), "latency": []}
    x = example_inputs(cfg, 1, cfg.seed)[0]
    if "torch" in backends:
        with step("timing PyTorch CPU"), torch.no_grad():
            result["latency"].append(time_callable(lambda: model(x), "pytorch-cpu", warmup, repeats).to_dict())
    if "ort" in backends:
        with tempfile.TemporaryDirectory() as tmp:
            path = onnx_path
            if path is None:
                path = os.path.join(tmp, "model.onnx")
                run_export(cfg, path, 17, DEFAULT_TARGET, "torchscript", True, 1, 1e-4)
            sess = ort_session(path)
            feeds = {sess.get_inputs()[0].name: x.numpy()}
            with step("timing ONNX Runtime CPU"):
                result["latency"].append(time_callable(lambda: sess.run(None, feeds), "onnxruntime-cpu", warmup, repeats).to_dict())
    return result


def format_bench(result: dict) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["gflops_by_op"].items(), key=lambda kv: -kv[1]))
    lines = [f"{result['model']} {result['size'][0]}x{result['size'][1]} classes={result['classes']} "
             f"method={result['method']} batch={result['batch']}",
             f"GFLOPs (batch 1, fvcore convention: 1 multiply-add = 1 FLOP): {result['gflops']:.2f}  [{parts}]"]
    if result["latency"]:
        lines.append(f"{'backend':<18} {'min ms':>10} {'median ms':>10} {'max ms':>10}  "
                     f"(warm-up {result['latency'][0]['warmup']}, repeats {result['latency'][0]['repeats']}, "
                     f"threads {result['threads']})")
    for lat in result["latency"]:
        lines.append(f"{lat['backend']:<18} {lat['min_ms']:>10.1f} {lat['median_ms']:>10.1f} {lat['max_ms']:>10.1f}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backends.split(",") if b.strip() and b.strip() != "none"]
    unknown = set(backends) - {"torch", "ort"}
    if unknown:
        raise UsageError(f"--backends takes a comma list of torch, ort, or none (got '{args.backends}')")
    if args.onnx:
        proto = _load_onnx(args.onnx)
        cfg = _config_from_onnx(proto, args)
    elif args.model and args.size:
        args.labels = False
        cfg = _model_config(args)
    else:
        raise UsageError("bench needs an ONNX file or --model NAME --size HxW")
    result = bench_model(cfg, args.onnx, args.warmup, args.repeats, backends)
    print(format_bench(result))
    _write_json(args.json, result)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from staticprune.models import MODELS

    print(f"{'name':<24} {'width':>5} {'depth':>5} {'heads':>5}  {'decoder':<8} {'LN eps':>7}  normalisation (mean/std on [0,1] RGB)")
    for spec in MODELS.values():
        print(f"{spec.name:<24} {spec.vit.dim:>5} {spec.vit.depth:>5} {spec.vit.heads:>5}  {spec.decoder:<8} "
              f"{spec.vit.ln_eps:>7g}  {spec.mean}/{spec.std}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Main job: export the default model, lint, verify, bench, print a summary table."""
    from staticprune.export.lint import lint_model
    from staticprune.pipeline import ModelConfig

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{args.model}-{args.size}.onnx"
    if args.weights and not Path(args.weights).is_file():
        raise UsageError(f"weights '{args.weights}' do not exist or are not a file")
    if args.model not in __import__("staticprune.models", fromlist=["MODELS"]).MODELS:
        raise UsageError(f"unknown model '{args.model}'; run 'staticprune models' to list the names")
    cfg = ModelConfig(model=args.model, size=_size(args.size), classes=args.classes, weights=args.weights, labels=True)
    t0 = time.perf_counter()
    outcome = run_export(cfg, str(onnx_path), 17, DEFAULT_TARGET, "torchscript", True, 2, 1e-4)
    other = {t: lint_model(str(onnx_path), t) for t in ("orin-jp60", "orin-jp5", "x86-trt10")}
    with step("benchmarking"):
        bench = bench_model(cfg, str(onnx_path), 2, args.repeats, ("torch", "ort"))
    logits = next(o for o in outcome.verify.outputs if o.name == "logits")
    labels = next((o for o in outcome.verify.outputs if o.name == "labels"), None)
    lat = {r["backend"]: r for r in bench["latency"]}
    rows = [
        ("model", f"{cfg.model} {cfg.size[0]}x{cfg.size[1]}, {cfg.classes} classes, "
                  + (f"weights {cfg.weights}" if cfg.weights else "random weights (seed 0)")),
        ("ONNX", f"{onnx_path} (opset 17, {outcome.path.stat().st_size / 1e6:.1f} MB, outputs logits + int32 labels)"),
        ("lint orin-jp6", "clean" if outcome.lint_ok else f"{len(outcome.lint.errors)} violation(s)"),
        ("lint others", ", ".join(
            f"{t} " + ("clean" if r.ok else "violations: " + ",".join(sorted({v.rule for v in r.errors}))
                       + (" (export with --target orin-jp5 to decompose it)" if t == "orin-jp5" else ""))
            for t, r in other.items())),
        ("verify logits", f"max abs {logits.max_abs:.2e} (tol 1e-4) {'ok' if logits.ok else 'FAIL'}"),
        ("verify labels", "n/a" if labels is None else f"agreement {100 * labels.agreement:.4f}%, {labels.breaches} flip(s) above margin"),
        ("GFLOPs", f"{bench['gflops']:.2f} (fvcore convention)"),
        ("PyTorch CPU", f"median {lat['pytorch-cpu']['median_ms']:.1f} ms (min {lat['pytorch-cpu']['min_ms']:.1f})"),
        ("ORT CPU", f"median {lat['onnxruntime-cpu']['median_ms']:.1f} ms (min {lat['onnxruntime-cpu']['min_ms']:.1f})"),
        ("wall time", f"{time.perf_counter() - t0:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nstaticprune demo summary")
    print("-" * (width + 60))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ok = outcome.lint_ok and outcome.verify_ok
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _reference_model(args: argparse.Namespace):
    """The unreduced model (with weights) that the eager reference runs on, and the method options."""
    args.labels = False
    cfg = _model_config(args)
    if cfg.method == "none":
        raise UsageError("--method is required (one of: " + ", ".join(__import__("staticprune.methods", fromlist=["x"]).available_methods()) + ")")
    # The method module stays attached: references never run it, but some read its parameters (DToP's heads).
    return _build(cfg), cfg.method, cfg.method_options, cfg


def cmd_calibrate(args: argparse.Namespace) -> int:
    from staticprune.calibrate import calibrate, calibration_inputs
    from staticprune.methods import method_module

    model, method, options, cfg = _reference_model(args)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    if not 0.0 < args.quantile <= 1.0:
        raise UsageError(f"--quantile must be in (0, 1] (got {args.quantile})")
    try:
        inputs = list(calibration_inputs(model, args.images, args.count, args.seed))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    source = args.images or f"{len(inputs)} generated inputs"
    with step(f"running the eager {method} reference over {source}"):
        try:
            cal = calibrate(model, method, options, inputs)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    recommended = method_module(method).calibrated_options(cal.kept, args.quantile, dict(options))
    stats = cal.stats()
    n_tokens = model.grid[0] * model.grid[1]
    print(f"{method} on {cfg.model} {cfg.size[0]}x{cfg.size[1]} ({n_tokens} patch tokens), {cal.images} image(s)")
    print(f"{'point':<16} {'mean':>8} {'p50':>8} {'p99':>8} {'max':>8}")
    for point, st in stats.items():
        print(f"{point:<16} {st['mean']:>8.1f} {st['p50']:>8.0f} {st['p99']:>8.1f} {st['max']:>8.0f}")
    print("recommended options (quantile %.3g): %s" % (args.quantile, json.dumps(recommended, sort_keys=True)))
    _write_json(str(out), {"method": method, "method_options": recommended, "model": cfg.model, "size": list(cfg.size),
                           "quantile": args.quantile, "images": cal.images, "source": source, "kept": stats})
    return EXIT_OK


def cmd_show_tokens(args: argparse.Namespace) -> int:
    import torch

    from staticprune.fileio import write_bytes_atomic
    from staticprune.imageio import load_input
    from staticprune.models import get_spec
    from staticprune.reference import reference_module
    from staticprune.visualize import denormalise, partition_picture

    model, method, options, cfg = _reference_model(args)
    spec = get_spec(cfg.model)
    try:
        img = load_input(args.image, cfg.size, spec.mean, spec.std)[:1]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with torch.no_grad():
        try:
            ref = reference_module(method).reference_forward(model, img, options)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    n_tokens = model.grid[0] * model.grid[1]
    owner = ref.owner[0].numpy() if ref.owner is not None else __import__("numpy").arange(n_tokens)
    kept = {p: c[0] for p, c in ref.kept.items()}
    final = list(kept.values())[-1] if kept else n_tokens
    caption = f"{method}: {final} of {n_tokens} tokens kept" + (
        " (" + ", ".join(f"{p} {c}" for p, c in kept.items()) + ")" if len(kept) > 1 else "")
    labels = ref.token_labels[0].numpy() if ref.token_labels is not None else None
    picture = partition_picture(denormalise(img[0], spec.mean, spec.std), owner, model.grid, caption, labels)
    import io

    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    write_bytes_atomic(buf.getvalue(), args.output)
    print(f"{caption}; wrote {args.output}")
    return EXIT_OK


def cmd_methods_report(args: argparse.Namespace) -> int:
    from staticprune.bench.methods_report import (
        MethodRow, bench_rows, format_table, measure_method, replace_between_markers, rows_to_json,
    )
    from staticprune.fileio import write_bytes_atomic
    from staticprune.methods import available_methods

    names = available_methods()
    chosen = [m.strip() for m in args.methods.split(",")] if args.methods else names
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(names)}")
    if args.quick:
        big, big_model, l2, images = (256, 256), "segmenter-vit-s-mask", (128, 128), 2
    else:
        big, big_model, l2, images = (1024, 1024), "segmenter-vit-b-mask", (512, 512), args.images
    bench, bench_meta = {}, None
    if args.from_bench:
        try:
            results = json.loads(Path(args.from_bench).read_text())
            bench, size = bench_rows(results, "{}x{}".format(*_size(args.bench_size)) if args.bench_size else None)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UsageError(f"cannot use benchmark results '{args.from_bench}': {exc}; "
                             "write them with `staticprune bench-suite -o DIR` and pass DIR/results.json") from None
        missing = [m for m in chosen if m not in bench]
        if missing:
            raise UsageError(f"'{args.from_bench}' has no {size} row for {', '.join(missing)}; "
                             "run bench-suite for those methods or drop them from --methods")
        big = _size(size)
        bench_meta = {"file": args.from_bench, "command": results.get("meta", {}).get("command", "?")}
    t0 = time.perf_counter()
    rows = []
    for method in chosen:
        with step(f"measuring {method}"):
            try:
                rows.append(measure_method(method, args.cases, l2, big, big_model, images, args.quantile,
                                           args.classes, args.repeats, log, bench_row=bench.get(method)))
            except Exception as exc:  # a broken method must not hide the others' rows; the row says what failed
                rows.append(MethodRow(method, error=f"{exc.__class__.__name__}: {exc}"))
    import torch

    meta = {"command": "staticprune " + " ".join(sys.argv[1:]), "seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads(), "cases": args.cases, "l2_size": f"{l2[0]}x{l2[1]}",
            "big_model": big_model, "big_size": f"{big[0]}x{big[1]}", "quantile": args.quantile, "images": images,
            "bench": bench_meta}
    table = format_table(rows, meta)
    print(table)
    _write_json(args.json, json.loads(rows_to_json(rows, meta)))
    if args.update_readme:
        readme = Path(args.update_readme)
        write_bytes_atomic(replace_between_markers(readme.read_text(), "methods-table", table).encode(), readme)
        log(f"[staticprune] updated the methods table in {readme}")
    failed = any(r.error or r.l2_ok is False or r.lint_jp6 is False or r.lint_jp60 is False
                 or r.l1_equal < r.l1_cases - r.l1_overflow_cases for r in rows)
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    # No torch on this path: engines are often built on a Jetson that only has TensorRT, onnx and numpy.
    from staticprune.trt import TensorRTUnavailable, build_engine, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        raise UsageError(str(exc)) from None
    proto = _load_onnx(args.onnx)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    for lib in args.plugins or []:
        if not Path(lib).is_file():
            raise UsageError(f"plugin library '{lib}' does not exist; build it with 'make plugins'")
    meta = next((json.loads(e.value) for e in proto.metadata_props if e.key == "staticprune"), {})
    try:
        with step(f"building a TensorRT engine from {args.onnx}{' (fp16)' if args.fp16 else ''}"):
            sidecar = build_engine(args.onnx, str(out), fp16=args.fp16, plugins=args.plugins or [],
                                   timing_cache=args.timing_cache, workspace_mb=args.workspace, metadata=meta)
    except TensorRTUnavailable as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} and {out}.json (TensorRT {sidecar['tensorrt']}, built in {sidecar['build_seconds']:.1f} s)")
    return EXIT_OK


def cmd_verify_engine(args: argparse.Namespace) -> int:
    from staticprune.trt import TensorRTUnavailable, verify_engine

    sidecar_path = Path(args.engine + ".json")
    if not Path(args.engine).is_file():
        raise UsageError(f"engine '{args.engine}' does not exist")
    onnx_path = args.onnx or (json.loads(sidecar_path.read_text())["onnx"] if sidecar_path.is_file() else None)
    if not onnx_path or not Path(onnx_path).is_file():
        raise UsageError("give the standard-op ONNX graph to compare with (positional argument), or keep the sidecar")
    proto = _load_onnx(onnx_path)
    meta = next((json.loads(e.value) for e in proto.metadata_props if e.key == "staticprune"), {})
    if meta.get("standard_graph"):  # a plugin graph: ONNX Runtime runs the standard graph exported beside it
        onnx_path = meta["standard_graph"]
        proto = _load_onnx(onnx_path)
    cfg = _config_from_onnx(proto, args)
    inputs = _inputs_for(cfg, args)
    name = proto.graph.input[0].name
    try:
        result = verify_engine(args.engine, onnx_path, [{name: x.numpy()} for x in inputs], plugins=args.plugins or [],
                               atol=args.atol, rtol=args.rtol)
    except TensorRTUnavailable as exc:
        raise UsageError(str(exc)) from None
    for out_name, entry in result["outputs"].items():
        print(f"{out_name:<20} max abs {entry['max_abs']:.3e}  elements outside atol+rtol*|ref|: {entry['failing']}")
    print(("PASS" if result["ok"] else "FAIL") + f": engine vs ONNX Runtime, {result['inputs']} input(s)")
    _write_json(args.json, result)
    return EXIT_OK if result["ok"] else EXIT_CHECK_FAILED


def cmd_bench_suite(args: argparse.Namespace) -> int:
    import platform

    import torch

    from staticprune.bench.methods_report import replace_between_markers
    from staticprune.bench.suite import plots, rows_from_json, rows_json, run_suite, to_csv, to_markdown
    from staticprune.methods import available_methods

    names = available_methods()
    chosen = [m.strip() for m in args.methods.split(",")] if args.methods else names
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(names)}")
    sizes = [_size(s) for s in (args.sizes or ("256x256,384x384" if args.quick else "768x768,1024x1024")).split(",")]
    out_dir = Path(args.output_dir)
    from staticprune.fileio import write_bytes_atomic

    if args.from_results:  # regenerate tables and plots from an earlier run, measuring nothing
        try:
            rows, meta = rows_from_json(Path(args.from_results).read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read benchmark results '{args.from_results}': {exc}; pass the results.json "
                             "that bench-suite wrote") from None
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rows = run_suite(chosen, sizes, args.quick, args.images, args.quantile, args.classes, args.warmup,
                         args.repeats, log)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        meta = {"command": "staticprune " + " ".join(sys.argv[1:]), "seconds": time.perf_counter() - t0,
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "gpu": gpu,
                "repeats": args.repeats, "warmup": args.warmup, "quantile": args.quantile, "images": args.images,
                "sizes": [f"{h}x{w}" for h, w in sizes]}
        write_bytes_atomic(rows_json(rows, meta).encode(), out_dir / "results.json")
    write_bytes_atomic(to_csv(rows).encode(), out_dir / "results.csv")
    table = to_markdown(rows, meta)
    write_bytes_atomic((table + "\n").encode(), out_dir / "results.md")
    pngs = plots(rows, str(out_dir))
    print(table)
    written = ["results.csv", "results.md"] if args.from_results else ["results.json", "results.csv", "results.md"]
    print(f"wrote {out_dir}: " + ", ".join(written + [Path(p).name for p in pngs]))
    if args.update_readme:
        readme = Path(args.update_readme)
        write_bytes_atomic(replace_between_markers(readme.read_text(), "performance-table", table).encode(), readme)
        log(f"[staticprune] updated the performance table in {readme}")
    return EXIT_CHECK_FAILED if any(r.error for r in rows) else EXIT_OK


def cmd_train_policy(args: argparse.Namespace) -> int:
    from staticprune.policy_train import make_synthetic_dataset, train_policy

    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    images, labels = args.images, args.labels
    if args.synthetic:
        images, labels = (str(p) for p in make_synthetic_dataset(args.synthetic, args.synthetic_count, args.size,
                                                                 seed=args.seed))
    if not images or not labels:
        raise UsageError("train-policy needs --images DIR and --labels DIR (or --synthetic DIR to generate a set)")
    for d in (images, labels):
        if not Path(d).is_dir():
            raise UsageError(f"'{d}' is not a directory")
    try:
        with step(f"training the policy network on {images} ({args.epochs} epochs, {args.size}px)"):
            metrics = train_policy(images, labels, out, epochs=args.epochs, size=args.size, seed=args.seed,
                                   width=args.width, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                                   crop=args.crop, full_every=args.full_every, negative_weight=args.negative_weight,
                                   log=log)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    for key, value in shown.items():
        print(f"{key:<32} {value}")
    print(f"wrote {out} and {out}.json")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="model name (see 'staticprune models')")
    p.add_argument("--size", required=required, help="input size HxW, multiples of 16 (e.g. 512x512, 512x1024)")
    p.add_argument("--classes", type=int, default=150, help="number of classes (150 ADE20K, 19 Cityscapes; default 150)")
    p.add_argument("--batch", type=int, default=1, help="fixed batch size of the graph (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and generated inputs")
    p.add_argument("--weights", help="checkpoint: timm, official Segmenter, mmseg SegViT or staticprune layout")
    p.add_argument("--weights-layout", default="auto", choices=["auto", "native", "timm", "segmenter", "mmseg"])
    p.add_argument("--method", default=None, help="token-reduction method (default none)")
    p.add_argument("--config", help="JSON method config (as written by 'staticprune calibrate')")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option, repeatable")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="staticprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to ONNX, then lint and verify it")
    _add_model_args(p, required=True)
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17-20 (default 17)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="lint target: orin-jp6, orin-jp60, orin-jp5, x86-trt10")
    p.add_argument("--labels", action="store_true", help="also output int32 argmax labels (B, H, W)")
    p.add_argument("--raw-input", action="store_true",
                   help="graph input is RGB in 0..255; the model's mean/std normalisation runs inside the graph")
    p.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    p.add_argument("--no-slim", action="store_true", help="skip the onnxslim pass")
    p.add_argument("--plugins", action="store_true",
                   help="emit the TensorRT plugin graph (StaticPrune* nodes); the standard graph goes beside it")
    p.add_argument("--verify-inputs", type=int, default=1, help="generated inputs for verification (default 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs error allowed (default 1e-4)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--json", help="write the lint and verify results as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lint", help="check an ONNX graph against a TensorRT target")
    p.add_argument("onnx")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--json")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("verify", help="compare ONNX Runtime with PyTorch (or a TensorRT engine with ONNX Runtime)")
    p.add_argument("onnx", nargs="?")
    p.add_argument("--engine", help="TensorRT engine to compare with ONNX Runtime on the standard-op graph")
    p.add_argument("--plugins", action="append", help="plugin library to load (repeatable)")
    p.add_argument("--atol", type=float, default=1e-2, help="engine check: absolute tolerance (default 1e-2, fp16)")
    p.add_argument("--rtol", type=float, default=1e-2, help="engine check: relative tolerance (default 1e-2)")
    _add_model_args(p, required=False)
    p.add_argument("--input", action="append", help="image or .npy input (repeatable); default: generated")
    p.add_argument("--inputs", type=int, default=2, help="number of generated inputs (default 2)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--json")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="GFLOPs and CPU latency (PyTorch, ONNX Runtime)")
    p.add_argument("onnx", nargs="?")
    _add_model_args(p, required=False)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", default="torch,ort", help="comma list of torch, ort; 'none' = GFLOPs only")
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("calibrate", help="measure kept tokens with the eager reference; write capacities to a config")
    _add_model_args(p, required=True)
    p.add_argument("--images", help="directory of images (default: generated inputs)")
    p.add_argument("--count", type=int, default=16, help="images to use (default 16; 0 = all in --images)")
    p.add_argument("--quantile", type=float, default=0.99, help="capacity quantile (default 0.99)")
    p.add_argument("-o", "--output", default="calibration.json", help="config file for 'export --config'")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("show-tokens", help="picture of the token partition of one image")
    p.add_argument("image", help="image file (png, jpg) or .npy")
    _add_model_args(p, required=False)
    p.add_argument("-o", "--output", required=True, help="output .png")
    p.set_defaults(func=cmd_show_tokens, model="segmenter-vit-s-mask", size="512x512")

    p = sub.add_parser("methods-report", help="measure every method (L1, L2, lint, kept tokens, GFLOPs, latency)")
    p.add_argument("--methods", help="comma list (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes (ViT-S 256x256) instead of ViT-B 1024x1024")
    p.add_argument("--cases", type=int, default=50, help="L1 cases per method (default 50)")
    p.add_argument("--images", type=int, default=4, help="generated images for kept tokens (default 4)")
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the rows as JSON")
    p.add_argument("--from-bench", metavar="RESULTS_JSON",
                   help="take kept tokens, GFLOPs and ORT latency from a bench-suite results.json instead of "
                        "measuring them again")
    p.add_argument("--bench-size", metavar="HxW", help="which size of --from-bench (default: its largest)")
    p.add_argument("--update-readme", metavar="README", help="replace the table between the methods-table markers")
    p.set_defaults(func=cmd_methods_report)

    p = sub.add_parser("build", help="build a TensorRT engine (needs TensorRT) with a JSON sidecar")
    p.add_argument("onnx")
    p.add_argument("-o", "--output", required=True, help="output .engine path")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--plugins", action="append", help="plugin library to load (repeatable)")
    p.add_argument("--timing-cache", help="timing cache file (read if present, then updated)")
    p.add_argument("--workspace", type=int, default=4096, help="workspace MiB (default 4096)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("bench-suite", help="every method: kept tokens, GFLOPs, latency and speedup vs FLOP reduction")
    p.add_argument("--methods", help="comma list (default: all)")
    p.add_argument("--quick", action="store_true", help="ViT-S (SegViT-B) at 256x256 and 384x384")
    p.add_argument("--sizes", help="comma list of HxW (default 768x768,1024x1024; --quick 256x256,384x384)")
    p.add_argument("--images", type=int, default=2, help="generated images for the reference's kept tokens")
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("-o", "--output-dir", default="bench-results")
    p.add_argument("--update-readme", metavar="README", help="replace the table between the performance-table markers")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="measure nothing: regenerate the tables, CSV, plots (and README table) from a results.json")
    p.set_defaults(func=cmd_bench_suite)

    p = sub.add_parser("train-policy", help="train the CTS/dCTS policy network on image/label pairs")
    p.add_argument("--images", help="directory of images")
    p.add_argument("--labels", help="directory of label maps (same file stems, class ids)")
    p.add_argument("--synthetic", metavar="DIR", help="generate a dataset of uniform coloured regions into DIR first")
    p.add_argument("--synthetic-count", type=int, default=200)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--size", type=int, default=512, help="training resolution (multiple of 32)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = EfficientNet-Lite0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--crop", type=int, default=0, help="train on random crops up to this side (0 = whole images)")
    p.add_argument("--full-every", type=int, default=4, help="with --crop: every n-th batch uses whole images")
    p.add_argument("--negative-weight", type=float, default=5.0, help="loss weight of mixed-class windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="policy.pth")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_train_policy)

    p = sub.add_parser("models", help="list model names")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="main job: export, lint, verify and bench the default model")
    p.add_argument("--model", default="segmenter-vit-s-mask")
    p.add_argument("--size", default="512x512")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--weights")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-o", "--output-dir", default="out")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"staticprune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
