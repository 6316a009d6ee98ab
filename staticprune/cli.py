"""The `staticprune` command.

Exit codes: 0 ok, 1 a check failed (lint violation, parity breach), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_TARGET = "orin-jp6"
COMMAND_MODULES: tuple[str, ...] = ("triton_repo", "predict", "evaluate")  # staticprune/commands/<name>.py; see build_parser
_command_line: Optional[str] = None  # the command being run, set by main()


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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"config '{args.config}' is not a readable JSON file ({exc.__class__.__name__})") from None
        if not isinstance(data, dict) or not isinstance(data.get("method_options", data.get("options", {})), dict):
            raise UsageError(f"config '{args.config}' is not a method config: expected a JSON object like "
                             '{"method": "tome", "method_options": {...}} (as calibrate writes)')
        _check_calibrated_for(args, data)
        if data.get("method") and args.method in (None, "none"):
            args.method = data["method"]
        options.update(data.get("method_options", data.get("options", {})))
        if options and args.method in (None, "none"):
            raise UsageError(f"config '{args.config}' holds method options but names no method: add --method NAME "
                             "(or a \"method\" key to the file)")
    given = []
    for item in getattr(args, "opt", None) or []:
        if "=" not in item:
            raise UsageError(f"--opt '{item}' is not key=value")
        key, value = item.split("=", 1)
        given.append(item)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if given and args.method in (None, "none"):  # an option without a method would be silently ignored
        from staticprune.methods import available_methods

        raise UsageError(f"--opt {given[0]} has no effect without a method: add --method "
                         f"{'|'.join(available_methods())}, or drop the option")
    return options


def _check_calibrated_for(args: argparse.Namespace, data: dict) -> None:
    """A calibration file (it records model, size and method) fits only what it was measured on: capacities
    for another model, size or method would be clamped or misread silently."""
    if data.get("method") and args.method not in (None, "none") and data["method"] != args.method:
        raise UsageError(f"config '{args.config}' is for method {data['method']}, not {args.method}: drop --method, "
                         f"or calibrate {args.method} ('staticprune calibrate --method {args.method} ...')")
    mine, theirs = [], []
    if data.get("model") and getattr(args, "model", None) and data["model"] != args.model:
        mine.append(args.model)
        theirs.append(data["model"])
    if data.get("size") and getattr(args, "size", None):
        size = data["size"]
        recorded = "x".join(str(v) for v in size) if isinstance(size, (list, tuple)) else str(size)
        wanted = "x".join(str(v) for v in _size(args.size))
        if recorded != wanted:
            mine.append(wanted)
            theirs.append(recorded)
    if mine:
        raise UsageError(f"config '{args.config}' was calibrated for {' '.join(theirs)}, not {' '.join(mine)}: run "
                         f"'staticprune calibrate --model {args.model} --size {args.size} ...' for this model")


def _model_config(args: argparse.Namespace):
    from staticprune.models import MODELS
    from staticprune.pipeline import ModelConfig

    if args.model not in MODELS:
        raise UsageError(f"unknown model '{args.model}'; run 'staticprune models' to list the {len(MODELS)} names")
    options = _method_options(args)
    method = args.method or "none"
    _check_method(method)
    weights = _existing_weights(args.weights)
    classes = args.classes if args.classes is not None or weights else 150  # None: read from the checkpoint
    if classes is not None and classes < 1:
        raise UsageError(f"--classes must be >= 1 (got {classes})")
    if getattr(args, "backbone_only", False) and not weights:
        raise UsageError("--backbone-only needs --weights (the checkpoint whose backbone to load)")
    grid = _grid(args.weights_grid) if getattr(args, "weights_grid", None) else None
    if grid is not None and not weights:
        raise UsageError("--weights-grid needs --weights (the checkpoint whose positional table it describes)")
    if classes is None and getattr(args, "backbone_only", False):
        raise UsageError("--backbone-only keeps the decoder's initialisation: give its class count with --classes K")
    return ModelConfig(
        model=args.model, size=_size(args.size), classes=classes, batch=args.batch, seed=args.seed,
        weights=weights, weights_layout=args.weights_layout, method=method, method_options=_absolute_paths(options),
        backbone_only=getattr(args, "backbone_only", False), weights_grid=grid,
        labels=getattr(args, "labels", False), raw_input=getattr(args, "raw_input", False),
        precision=getattr(args, "precision", None) or "fp32", key_bias=getattr(args, "key_bias", None) or "add",
    )


def _existing_weights(path: Optional[str]) -> Optional[str]:
    """The checkpoint path, absolute: recorded in the ONNX metadata, it must resolve from any directory."""
    if not path:
        return None
    if not Path(path).is_file():
        raise UsageError(f"weights '{path}' do not exist or are not a file")
    return str(Path(path).resolve())


def _absolute_paths(options: dict) -> dict:
    """Method options that name files (policy_weights=FILE) made absolute, for the same reason as --weights."""
    out = dict(options)
    for key, value in options.items():
        if key.endswith("_weights") and isinstance(value, str) and value and Path(value).is_file():
            out[key] = str(Path(value).resolve())
    return out


def parse_pair(text: str, flag: str, unit: str) -> tuple[int, int]:
    """'N' or 'HxW' (positive integers) -> (H, W); bad input is a UsageError naming the flag."""
    parts = text.lower().split("x")
    try:
        h, w = (int(p) for p in (parts * 2 if len(parts) == 1 else parts))
    except ValueError:
        raise UsageError(f"{flag} '{text}' is not N or HxW in {unit}") from None
    if h < 1 or w < 1:
        raise UsageError(f"{flag} '{text}' must be positive")
    return h, w


def _grid(text: str) -> tuple[int, int]:
    return parse_pair(text, "--weights-grid", "tokens (e.g. 32x32)")


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


def _check_writable(path: Optional[str], what: str) -> None:
    """Fail before any work if `path` cannot be written: a probe file in its folder (or the nearest existing
    ancestor, which the atomic writer would create the rest under), removed at once."""
    if not path:
        return
    dest = Path(path)
    if dest.is_dir():
        raise UsageError(f"{what} '{path}' is a directory; give a file name")
    folder = dest.parent if str(dest.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {what} '{path}': '{folder}' is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".staticprune-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write {what} '{path}': creating a file in '{folder}' failed "
                         f"({exc.strerror or exc.__class__.__name__})") from None


def _at_least(value: int, low: int, flag: str) -> int:
    if value < low:
        raise UsageError(f"{flag} must be >= {low} (got {value})")
    return value


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
    if p.stat().st_size == 0:
        raise UsageError(f"'{path}' is empty, not an ONNX model")
    try:
        proto = onnx.load(str(p))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UsageError(f"'{path}' is not a readable ONNX model ({exc.__class__.__name__})") from None
    # protobuf parses many byte strings as a message with nothing in it: no opset and no node is no model
    if not proto.opset_import or not proto.graph.node:
        raise UsageError(f"'{path}' is not an ONNX model (no opset or no graph nodes)")
    return proto


# --------------------------------------------------------------------------------------------- commands


@dataclass
class ExportOutcome:
    path: Path
    lint_ok: bool
    verify_ok: bool
    lint: object
    verify: object
    seconds: dict
    fp16: object = None  # FP16 parity report of a --precision fp16 export


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
    fp16 = cfg.precision == "fp16"
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
    attach_config(result.model, cfg, {"opset": opset, "target": target, "outputs": result.output_names},
                  command=_command_line)
    t0 = time.perf_counter()
    lint = lint_model(result.model, target)
    times["lint"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with step(f"verifying ONNX Runtime vs PyTorch on {verify_inputs} input(s)"):
        verify_in = example_inputs(cfg, verify_inputs, cfg.seed + 1)
        if fp16:
            from staticprune.verify.fp16 import verify_mixed_graph

            report = verify_mixed_graph(result.model, model, cfg, verify_in, tol, result.output_names, build=_build)
        else:
            report = verify_onnx(result.model, model, verify_in, tol=tol, output_names=result.output_names)
    times["verify"] = time.perf_counter() - t0
    fp16_report = None
    if fp16:
        from staticprune.verify.fp16 import fp16_level

        t0 = time.perf_counter()
        with step(f"FP16 level: mixed-precision module vs FP32 module on {verify_inputs} input(s)"):
            fp16_report = fp16_level(cfg, example_inputs(cfg, verify_inputs, cfg.seed + 1), build=_build)
        times["verify_fp16"] = time.perf_counter() - t0
    if plugins:
        outcome = _export_plugin_graph(cfg, model, result, out, opset, target, lint, report, times)
    else:
        outcome = ExportOutcome(save_atomic(result.model, out), lint.ok, report.ok, lint, report, times)
    if fp16_report is not None:
        outcome.fp16 = fp16_report
        outcome.verify_ok = outcome.verify_ok and fp16_report.ok
    return outcome


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
    parameters = [t.detach().cpu().numpy() for t in model.state_dict().values()]
    problems = check_plugin_graph(plugin, standard.model, merges, parameters=parameters)
    standard_path = Path(out).with_suffix("").as_posix() + ".standard.onnx"
    attach_config(plugin, cfg, {"opset": opset, "target": target, "outputs": standard.output_names,
                                "plugins": True, "standard_graph": Path(standard_path).name},  # beside `out`
                  command=_command_line)
    lint = lint_model(plugin, target)
    lint.violations += [Violation(rule="plugin-graph", node="", op="", message=p, severity="error") for p in problems]
    save_atomic(standard.model, standard_path)
    path = save_atomic(plugin, out)
    counts = {n.op_type: sum(m.op_type == n.op_type for m in plugin_nodes(plugin)) for n in plugin_nodes(plugin)}
    report.notes.append("plugin graph: " + ", ".join(f"{v} x {k}" for k, v in counts.items())
                        + f"; verified above is the standard graph, written to {standard_path}")
    return ExportOutcome(path, lint.ok and std_lint.ok, report.ok, lint, report, times)


def cmd_export(args: argparse.Namespace) -> int:
    if getattr(args, "buckets", None):
        from staticprune.commands.export_buckets import cmd_export_buckets

        return cmd_export_buckets(args)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise UsageError(f"output '{out}' is a directory; give a file name like model.onnx")
    _check_writable(args.output, "output")  # before the build, which can take minutes
    _check_writable(args.json, "--json")
    _at_least(args.verify_inputs, 1, "--verify-inputs")
    cfg = _model_config(args)
    if args.plugins and args.exporter != "torchscript":
        raise UsageError("--plugins needs the torchscript exporter (the default)")
    if args.tol is None:
        from staticprune.verify.fp16 import FP16_LOGITS_TOL

        args.tol = FP16_LOGITS_TOL if cfg.precision == "fp16" else 1e-4
    outcome = run_export(cfg, str(out), _opset(args.opset), _target(args.target), args.exporter, not args.no_slim,
                         args.verify_inputs, args.tol, plugins=args.plugins)
    print(f"lint ({args.target}): {'clean' if outcome.lint_ok else 'VIOLATIONS'}")
    print(outcome.lint.format())
    print(outcome.verify.format())
    if outcome.fp16 is not None:
        print(outcome.fp16.format())
    print(f"wrote {outcome.path} ({outcome.path.stat().st_size / 1e6:.1f} MB); "
          + ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items()))
    gflops = _export_gflops(cfg)
    _write_json(args.json, {"onnx": str(outcome.path), "lint": outcome.lint.to_dict(), "verify": outcome.verify.to_dict(),
                            "fp16": None if outcome.fp16 is None else outcome.fp16.to_dict(),
                            "seconds": outcome.seconds, "config": json.loads(cfg.to_json()), "gflops": gflops})
    return EXIT_OK if outcome.lint_ok and outcome.verify_ok else EXIT_CHECK_FAILED


def _export_gflops(cfg) -> Optional[dict]:
    """Print the GFLOPs of one image through the unreduced and the exported model (fvcore convention, counted on
    the meta device), and warn on stderr when a method's export is not cheaper. None if they cannot be counted."""
    import dataclasses

    from staticprune.bench import count_flops

    shape = (1, 3, *cfg.size)
    # FLOPs depend on shapes only: no checkpoint to read again, FP32 modules
    plain = dataclasses.replace(cfg, weights=None, precision="fp32", method="none", method_options={})
    try:
        unreduced = count_flops(_build(plain), shape).gflops
        exported = (unreduced if cfg.method in ("none", "", None) else
                    count_flops(_build(dataclasses.replace(cfg, weights=None, precision="fp32")), shape).gflops)
    except Exception as exc:  # counting is a report, never a reason to fail an export that was written
        print(f"GFLOPs: not counted ({type(exc).__name__}: {exc})")
        return None
    print(f"GFLOPs per image (fvcore, 1 multiply-add = 1 FLOP): unreduced {unreduced:.4g}, exported {exported:.4g} "
          f"({exported / unreduced:.0%} of unreduced)")
    if cfg.method not in ("none", "", None) and exported >= unreduced:
        log(f"staticprune: warning: the {cfg.method} export is not cheaper than the unreduced model ({exported:.4g} "
            f">= {unreduced:.4g} GFLOPs); give it smaller capacities (docs/methods/defaults.md lists the options "
            "that set each method's cost)")
    return {"unreduced": unreduced, "exported": exported}


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
        cfg.weights = _existing_weights(args.weights)
    base = Path(args.onnx).resolve().parent  # graphs from before paths were recorded absolute: relative to the graph
    if cfg.weights and not Path(cfg.weights).is_file() and (base / cfg.weights).is_file():
        cfg.weights = str(base / cfg.weights)
    if cfg.weights and not Path(cfg.weights).is_file():
        raise UsageError(f"weights '{cfg.weights}' recorded in the model are missing; pass --weights PATH")
    for key, value in cfg.method_options.items():
        if key.endswith("_weights") and isinstance(value, str) and value and not Path(value).is_file():
            if (base / value).is_file():
                cfg.method_options[key] = str(base / value)
            else:
                raise UsageError(f"{key} '{value}' recorded in the model is missing; export again with --opt "
                                 f"{key}=PATH")
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


def _static_dims(value_info) -> list[Optional[int]]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _fmt_dims(dims: Sequence[Optional[int]]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _check_graph_fits(path: str, proto, cfg, model) -> None:
    """The graph must be the rebuilt model's: same input shape, logits shape and outputs. A foreign graph (another
    class count, size or method) is bad input, not a parity failure."""
    label = f"{cfg.model} {cfg.size[0]}x{cfg.size[1]}, {cfg.classes} classes, batch {cfg.batch}, method {cfg.method}"
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    expected_in = [cfg.batch, 3, *cfg.size]
    if len(inputs) != 1:
        raise UsageError(f"'{path}' has {len(inputs)} inputs; the rebuilt model ({label}) takes one image tensor")
    got_in = _static_dims(inputs[0])
    if len(got_in) != 4 or any(g is not None and g != e for g, e in zip(got_in, expected_in)):
        raise UsageError(f"'{path}' takes input {_fmt_dims(got_in)}, the rebuilt model ({label}) "
                         f"{_fmt_dims(expected_in)}: pass the --model/--size/--batch it was exported with")
    outputs = list(proto.graph.output)
    expected_logits = [cfg.batch, cfg.classes, *cfg.size]
    got_logits = _static_dims(outputs[0]) if outputs else []
    if len(got_logits) != 4 or any(g is not None and g != e for g, e in zip(got_logits, expected_logits)):
        hint = (f": pass --classes {got_logits[1]}" if len(got_logits) == 4 and got_logits[1] not in (None, cfg.classes)
                else "")
        raise UsageError(f"'{path}' outputs '{outputs[0].name if outputs else '-'}' {_fmt_dims(got_logits)}, the "
                         f"rebuilt model ({label}) logits {_fmt_dims(expected_logits)}{hint}")
    names, expected = [o.name for o in outputs], model.output_names()
    if names != expected:
        raise UsageError(f"'{path}' has outputs {', '.join(names)}, the rebuilt model ({label}) "
                         f"{', '.join(expected)}: not the graph of this model and method")


def cmd_verify(args: argparse.Namespace) -> int:
    if args.engine and args.allow_overflow:
        raise UsageError("--allow-overflow is for the ONNX check (verify GRAPH); the engine check compares the "
                         "engine's overflow output with ONNX Runtime's")
    if args.engine:  # before any torch-heavy import: the engine check runs where there is no PyTorch
        return cmd_verify_engine(args)
    from staticprune.verify.parity import verify_onnx

    for flag, value in (("--standard", args.standard), ("--margin-eps", args.margin_eps)):
        if value is not None:
            raise UsageError(f"{flag} is for the engine check (verify --engine ENGINE)")
    if not args.onnx:
        raise UsageError("verify needs an ONNX file (or --engine ENGINE)")
    if not args.input:
        _at_least(args.inputs, 1, "--inputs")
    _check_writable(args.json, "--json")
    proto = _load_onnx(args.onnx)
    _refuse_flags_the_graph_decides(proto, args)
    cfg = _config_from_onnx(proto, args)
    cfg_notes = _drop_inert_recorded_options(cfg)
    with step(f"rebuilding {cfg.model} {cfg.size[0]}x{cfg.size[1]} method={cfg.method} in PyTorch"):
        model = _build(cfg)
    _check_graph_fits(args.onnx, proto, cfg, model)
    inputs = _inputs_for(cfg, args)
    fp16 = cfg.precision == "fp16"
    tol = args.tol if args.tol is not None else (5e-2 if fp16 else 1e-4)
    with step(f"running ONNX Runtime and PyTorch on {len(inputs)} input(s)"):
        if fp16:
            from staticprune.verify.fp16 import verify_mixed_graph

            report = verify_mixed_graph(args.onnx, model, cfg, inputs, tol, [o.name for o in proto.graph.output],
                                        build=_build)
        else:
            report = verify_onnx(args.onnx, model, inputs, tol=tol, output_names=[o.name for o in proto.graph.output])
    parity = _parity_report(cfg, report, inputs, args, tol)
    parity.notes += cfg_notes
    print(parity.format())
    payload, ok = parity.to_dict(), parity.ok
    if fp16:  # what the FP16 engine will compute, against the FP32 model: decision-aware
        from staticprune.verify.fp16 import fp16_level

        with step(f"FP16 level: mixed-precision module vs FP32 module on {len(inputs)} input(s)"):
            level = fp16_level(cfg, inputs, build=_build)
        print(level.format())
        payload["fp16"], ok = level.to_dict(), ok and level.ok
    _write_json(args.json, payload)
    return EXIT_OK if ok else EXIT_CHECK_FAILED


# Flags that describe the model: a graph with staticprune metadata records all of them, so they would be ignored.
_MODEL_FLAGS = (("--model", "model", None), ("--size", "size", None), ("--classes", "classes", None),
                ("--batch", "batch", 1), ("--method", "method", None), ("--opt", "opt", None),
                ("--config", "config", None), ("--weights-layout", "weights_layout", "auto"),
                ("--backbone-only", "backbone_only", False), ("--weights-grid", "weights_grid", None))


def _refuse_flags_the_graph_decides(proto, args: argparse.Namespace) -> None:
    from staticprune.pipeline import read_config

    if read_config(proto) is None:
        return
    for flag, name, default in _MODEL_FLAGS:
        if getattr(args, name, default) not in (default, [], ()):
            raise UsageError(f"{flag} has no effect: '{args.onnx}' records its model, size, method and options; "
                             f"drop {flag} (export again to change them)")


def _drop_inert_recorded_options(cfg) -> list[str]:
    """Graphs exported before options without effect were refused may record some: they changed nothing, so
    the module is rebuilt without them (and the report says so)."""
    if cfg.method in ("none", "", None):
        return []
    from staticprune.methods import drop_inert_options

    cfg.method_options, dropped = drop_inert_options(cfg.method, dict(cfg.method_options))
    return [f"recorded option {k} had no effect in this graph (ignored when it was exported); left out"
            for k in dropped]


def _parity_report(cfg, l2, inputs: list, args: argparse.Namespace, tol: float):
    """L1 (static module vs eager reference) and the overflow counts next to L2 (staticprune.verify.report)."""
    import dataclasses

    from staticprune.verify.report import ParityReport, l1_and_overflow

    names = ([Path(p).name for p in args.input] if args.input
             else [f"generated #{i + 1}" for i in range(len(inputs))])
    if cfg.method in ("none", "", None):
        return ParityReport(l2, None, [], names, args.allow_overflow)
    from staticprune.reference import reference_module

    # FP32, decision outputs on, normalisation outside: the eager reference reads the layers directly.
    probe = dataclasses.replace(cfg, precision="fp32", raw_input=False, labels=False,
                                method_options={**cfg.method_options, "expose_decisions": True})
    model = _build(probe)
    if cfg.raw_input:
        inputs = [(x - model.pixel_mean) / model.pixel_std for x in inputs]
    try:
        reference = reference_module(cfg.method)
    except ValueError:
        reference = None
    with step(f"L1: static {cfg.method} module vs its eager reference on {len(inputs)} input(s)"):
        l1_tol = 1e-4 if cfg.precision == "fp16" else tol  # L1 runs the FP32 module: FP32 tolerance
        l1, overflow = l1_and_overflow(model, reference, cfg.method_options, inputs, names, l2.graph_overflow,
                                       l1_tol, 10 * l1_tol, cfg.method)
    report = ParityReport(l2, l1, overflow, names, args.allow_overflow)
    if reference is None:
        report.notes.append(f"method {cfg.method} has no eager reference: L1 not run")
    return report


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
    _at_least(args.repeats, 1, "--repeats")
    _at_least(args.warmup, 0, "--warmup")
    _check_writable(args.json, "--json")
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
    import dataclasses

    from staticprune.methods import available_methods, method_module

    args.labels = False
    cfg = _model_config(args)
    if cfg.method == "none":
        raise UsageError("--method is required (one of: " + ", ".join(available_methods()) + ")")
    # The method module stays attached: references never run it, but some read its parameters (DToP's heads).
    # Options only calibration reads (CTS's calibrate_k) are not the module's.
    only_calibrate = getattr(method_module(cfg.method), "CALIBRATE_ONLY_OPTIONS", ())
    module_cfg = dataclasses.replace(cfg, method_options={k: v for k, v in cfg.method_options.items()
                                                          if k not in only_calibrate})
    return _build(module_cfg), cfg.method, cfg.method_options, cfg


def cmd_calibrate(args: argparse.Namespace) -> int:
    from staticprune.calibrate import calibrate, calibration_items, calibration_names, capacity_rule
    from staticprune.methods import effective_options, drop_inert_options, method_module

    _at_least(args.count, 0, "--count")
    if args.count == 0 and not args.images:
        raise UsageError("--count 0 (every image) needs --images DIR; without it give a number of generated inputs")
    if not (Path(args.output).exists() and not args.force):
        _check_writable(args.output, "output")
    if not 0.0 < args.quantile <= 1.0:
        raise UsageError(f"--quantile must be in (0, 1] (got {args.quantile})")
    if args.buckets is not None:
        _at_least(args.buckets, 1, "--buckets")
    if args.bucket_growth is not None:
        if args.buckets is not None:
            raise UsageError("give either --buckets K (count quantiles) or --bucket-growth R (geometric), not both")
        if not args.bucket_growth > 1.0:
            raise UsageError(f"--bucket-growth must be > 1, e.g. 1.25 (got {args.bucket_growth})")
    elif args.bucket_multiple != 64 and args.buckets is None:
        raise UsageError("--bucket-multiple has no effect without --buckets K or --bucket-growth R")
    _at_least(args.bucket_multiple, 1, "--bucket-multiple")
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    try:
        names = calibration_names(args.images, args.count)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model, method, options, cfg = _reference_model(args)
    n_tokens = model.grid[0] * model.grid[1]
    if args.images and args.count and len(names) < args.count:
        log(f"[staticprune] {args.images} holds {len(names)} image(s); --count {args.count} asked for more: "
            f"calibrating on {len(names)}")
    source = args.images or f"{len(names)} generated inputs"
    started = time.perf_counter()

    def progress(i: int, kept: dict[str, list[int]]) -> None:  # one stderr line per image: runs take minutes
        last = list(kept)[-1] if kept else None
        at = f"kept {kept[last][0]} of {n_tokens} tokens after {last}" if last else "no reduction point"
        log(f"[staticprune] image {i + 1}/{len(names)} {names[i]}: {at} ({time.perf_counter() - started:.1f} s)")

    with step(f"running the eager {method} reference over {source}"):
        try:
            cal = calibrate(model, method, options, (img for _, img in calibration_items(
                model, args.images, args.count, args.seed)), progress=progress)
            rule = capacity_rule(args.quantile, cal.images)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    calibrated = method_module(method).calibrated_options(cal.kept, rule.quantile, dict(options))
    # Every option with its value, so the file stands on its own (a static mode records its settings too);
    # calibrated capacities supersede ratios the user gave, which would otherwise be refused as having no effect.
    recommended = effective_options(method, drop_inert_options(method, calibrated)[0])
    stats = cal.stats()
    print(f"{method} on {cfg.model} {cfg.size[0]}x{cfg.size[1]} ({n_tokens} patch tokens), {cal.images} image(s)")
    print(f"{'point':<16} {'mean':>8} {'p50':>8} {'p99':>8} {'max':>8}")
    for point, st in stats.items():
        print(f"{point:<16} {st['mean']:>8.1f} {st['p50']:>8.0f} {st['p99']:>8.1f} {st['max']:>8.0f}")
    if calibrated == dict(options):
        print(f"note: {method} with these options has no capacity to calibrate (its token counts are fixed); the "
              "file records its options as they are")
    else:
        print(rule.describe())
    print("recommended options: %s" % json.dumps(recommended, sort_keys=True))
    buckets = {}
    if args.buckets is not None or args.bucket_growth is not None:  # for 'export --buckets FILE' (docs/buckets.md)
        from staticprune.export.buckets import bucket_capacities, geometric_buckets

        if args.bucket_growth is not None:
            buckets = {point: geometric_buckets(counts, args.bucket_growth, args.bucket_multiple, n_tokens)
                       for point, counts in cal.kept.items()}
        else:
            buckets = {point: bucket_capacities(counts, args.buckets, args.bucket_multiple, n_tokens)
                       for point, counts in cal.kept.items()}
        rule_text = (f"each at most {args.bucket_growth:g}x the previous" if args.bucket_growth is not None
                     else f"{args.buckets} count quantiles")
        for point, values in buckets.items():
            print(f"buckets {point}: {', '.join(str(v) for v in values)} ({rule_text}, multiple of "
                  f"{args.bucket_multiple} below the largest count {max(cal.kept[point])}, then all {n_tokens} "
                  "patches)")
    _write_json(str(out), {"method": method, "method_options": recommended, "model": cfg.model, "size": list(cfg.size),
                           "classes": cfg.classes, "weights": cfg.weights, "quantile": args.quantile,
                           "capacity_rule": rule.to_dict(), "images": cal.images, "source": source, "kept": stats,
                           **({"buckets": buckets, "bucket_multiple": args.bucket_multiple, "bucket_growth": args.bucket_growth,
                               "kept_counts": cal.kept} if buckets else {})})
    return EXIT_OK


def cmd_show_tokens(args: argparse.Namespace) -> int:
    import torch

    from staticprune.fileio import write_bytes_atomic
    from staticprune.imageio import load_input
    from staticprune.models import get_spec
    from staticprune.reference import reference_module
    from staticprune.visualize import denormalise, partition_picture

    _check_writable(args.output, "output")
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
        MethodRow, bench_rows, fill_from_bench, format_table, measure_method, replace_between_markers, rows_to_json,
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
    if args.from_report:  # L1, L2 and lint from an earlier report; the benchmark columns again from --from-bench
        from staticprune.bench.methods_report import rows_from_report_json

        try:
            rows, meta = rows_from_report_json(Path(args.from_report).read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read methods report '{args.from_report}': {exc}; pass the file that "
                             "`staticprune methods-report --json` wrote") from None
        rows = [r for r in rows if r.method in chosen]
        for r in rows:
            if r.method in bench and not r.error:
                fill_from_bench(r, bench[r.method])
        if bench_meta:
            meta["bench"], meta["big_size"] = bench_meta, "{}x{}".format(*big)
        meta["redrawn_by"] = "staticprune " + " ".join(sys.argv[1:])
    for method in [] if args.from_report else chosen:
        with step(f"measuring {method}"):
            try:
                rows.append(measure_method(method, args.cases, l2, big, big_model, images, args.quantile,
                                           args.classes, args.repeats, log, bench_row=bench.get(method)))
            except Exception as exc:  # a broken method must not hide the others' rows; the row says what failed
                rows.append(MethodRow(method, error=f"{exc.__class__.__name__}: {exc}"))
    import torch

    if not args.from_report:
        meta = {"command": "staticprune " + " ".join(sys.argv[1:]), "seconds": time.perf_counter() - t0,
                "threads": torch.get_num_threads(), "cases": args.cases, "l2_size": f"{l2[0]}x{l2[1]}",
                "big_model": big_model, "big_size": f"{big[0]}x{big[1]}", "quantile": args.quantile,
                "images": images, "bench": bench_meta}
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


# `build` and `verify --engine` run on the Jetson image, which has TensorRT, onnx, numpy, onnxruntime and polygraphy
# but no PyTorch: everything they import (staticprune.trt, staticprune.verify.decisions, staticprune.imageio,
# staticprune.fileio) is torch-free, and they check their arguments before asking for TensorRT, so that a bad
# argument is reported as such even where TensorRT is missing (tests/test_engine_tools.py runs both with torch blocked).


def _plugin_libraries(paths: Sequence[str]) -> list[str]:
    for lib in paths:
        if not Path(lib).is_file():
            raise UsageError(f"plugin library '{lib}' does not exist; build it with 'make plugins'")
    return list(paths)


@dataclass
class _GraphBuild:
    """One graph to build, checked (no TensorRT needed for the checks)."""
    onnx: str
    output: Path
    metadata: dict
    strongly_typed: bool
    standard_graph: Optional[str]


def _check_graph_build(onnx_path: str, out: Path, args: argparse.Namespace, plugins: list[str]) -> _GraphBuild:
    from staticprune.trt.engine import (StandardGraphNotFound, find_standard_graph, graph_metadata, graph_precision,
                                        has_plugin_nodes)

    proto = _load_onnx(onnx_path)
    if out.exists() and out.is_dir():
        raise UsageError(f"output '{out}' is a directory; give a file name like model.engine")
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    if has_plugin_nodes(proto) and not plugins:
        raise UsageError(f"'{onnx_path}' has TensorRT plugin nodes; pass --plugins PATH (libstaticprune_plugins.so, "
                         "built with 'make plugins')")
    # A mixed-precision export carries its precisions in its tensor types: only a strongly typed build keeps them.
    strongly_typed = args.strongly_typed or graph_precision(proto) == "fp16"
    standard_graph: Optional[str] = onnx_path
    if has_plugin_nodes(proto):  # record the standard-op graph beside it, for `verify --engine`
        try:
            standard_graph = str(find_standard_graph(str(out), onnx_path).path)
        except StandardGraphNotFound:
            standard_graph = None
            log(f"[staticprune] note: no standard-op graph found beside {onnx_path}; 'verify --engine' will need "
                "--standard PATH")
    return _GraphBuild(onnx_path, out, graph_metadata(proto), strongly_typed, standard_graph)


def _build_graph(job: _GraphBuild, args: argparse.Namespace, plugins: list[str]) -> Optional[dict]:
    """Build one engine (+ sidecar) with build_engine; None (after one line on stderr) if TensorRT failed."""
    from staticprune.trt.engine import TimingCacheError, build_engine

    if job.strongly_typed and args.fp16:
        log("[staticprune] note: strongly typed build: --fp16 is not used, the graph's tensor types decide")
    mode = " (strongly typed)" if job.strongly_typed else " (fp16)" if args.fp16 else ""
    try:
        with step(f"building a TensorRT engine from {job.onnx}{mode}"):
            return build_engine(job.onnx, str(job.output), fp16=args.fp16, strongly_typed=job.strongly_typed,
                                plugins=plugins, timing_cache=args.timing_cache, workspace_mb=args.workspace,
                                metadata=job.metadata, standard_graph=job.standard_graph)
    except TimingCacheError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:  # TensorRT could not parse or build the graph: a check that failed
        log(f"staticprune: {exc}")
        return None


def _build_pipeline(args: argparse.Namespace, plugins: list[str]) -> int:
    """Every stage graph of a capacity-bucket pipeline folder, one engine beside each graph; then pipeline.json
    names them (rewritten atomically, only after every engine was built) and pipeline.engines.txt lists them."""
    from staticprune.runtime.buckets import ENGINE_MANIFEST_FILE, attach_engines, stage_graphs, write_engine_manifest

    if args.output:
        raise UsageError(f"'{args.onnx}' is a pipeline: its engines are written beside its stage graphs; drop -o")
    graphs = stage_graphs(args.onnx)
    for _, _, onnx_path in graphs:
        if not Path(onnx_path).is_file():
            raise UsageError(f"pipeline '{args.onnx}' lacks stage graph '{onnx_path}' named in pipeline.json; "
                             "re-export the whole folder")
    # every graph checked before any engine is built: a bad graph stops the command with nothing written
    jobs = [_check_graph_build(onnx_path, Path(onnx_path).with_suffix(".engine"), args, plugins)
            for _, _, onnx_path in graphs]
    from staticprune.trt.engine import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        raise UsageError(str(exc)) from None
    seconds = 0.0
    for n, job in enumerate(jobs, 1):
        log(f"[staticprune] stage graph {n}/{len(jobs)}: {Path(job.onnx).name}")
        sidecar = _build_graph(job, args, plugins)
        if sidecar is None:  # pipeline.json still names the engines it named before
            log(f"staticprune: stopped at {job.onnx}; pipeline.json was not changed")
            return EXIT_CHECK_FAILED
        seconds += float(sidecar.get("build_seconds", 0.0))
    built = {job.output.resolve() for job in jobs}
    attach_engines(args.onnx, engine_for=lambda onnx: onnx.with_suffix(".engine")
                   if onnx.with_suffix(".engine").resolve() in built else None, plugins=plugins)
    folder = write_engine_manifest(args.onnx).parent
    print(f"wrote {len(jobs)} engines (+ .json sidecars) beside the stage graphs, built in {seconds:.1f} s; "
          f"recorded them in {folder / 'pipeline.json'} and {folder / ENGINE_MANIFEST_FILE}")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    from staticprune.trt.engine import TensorRTUnavailable, require_tensorrt

    if args.timing_cache and Path(args.timing_cache).is_dir():
        raise UsageError(f"timing cache '{args.timing_cache}' is a directory; give a file name like orin.cache")
    if args.workspace < 1:
        raise UsageError(f"--workspace must be >= 1 MiB (got {args.workspace})")
    source = Path(args.onnx)
    if source.is_dir() or source.name == "pipeline.json":  # a capacity-bucket pipeline (export --buckets)
        return _build_pipeline(args, _plugin_libraries(args.plugins or []))
    if not args.output:
        raise UsageError("the following arguments are required: -o/--output (the engine file to write)")
    out = Path(args.output)
    plugins = _plugin_libraries(args.plugins or [])
    job = _check_graph_build(args.onnx, out, args, plugins)
    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        raise UsageError(str(exc)) from None
    sidecar = _build_graph(job, args, plugins)
    if sidecar is None:
        return EXIT_CHECK_FAILED
    print(f"wrote {out} and {out}.json (TensorRT {sidecar['tensorrt']}, built in {sidecar['build_seconds']:.1f} s)")
    return EXIT_OK


def cmd_verify_engine(args: argparse.Namespace) -> int:
    from staticprune.trt.engine import (StandardGraphNotFound, TensorRTUnavailable, file_feeds, find_standard_graph,
                                        generated_feeds, graph_input, graph_metadata, require_tensorrt,
                                        verify_engine)

    engine = Path(args.engine)
    if not engine.is_file():
        raise UsageError(f"engine '{args.engine}' does not exist")
    sidecar: dict = {}
    sidecar_path = Path(args.engine + ".json")
    if sidecar_path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"sidecar '{sidecar_path}' is not a readable JSON file ({exc.__class__.__name__})") from None
    if args.onnx and not Path(args.onnx).is_file():
        raise UsageError(f"ONNX file '{args.onnx}' does not exist")
    for name in ("atol", "rtol", "margin_eps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if args.inputs < 1 and not args.input:
        raise UsageError(f"--inputs must be >= 1 (got {args.inputs})")
    if args.plugins:
        plugins = _plugin_libraries(args.plugins)
    else:  # the libraries the engine was built with, where they are on this machine
        recorded = sidecar.get("plugins") or []
        missing = [p for p in recorded if not Path(p).is_file()]
        if missing:
            raise UsageError(f"plugin library '{missing[0]}' recorded in {sidecar_path} does not exist here; pass "
                             "--plugins PATH")
        plugins = list(recorded)
    try:
        standard = find_standard_graph(args.engine, args.onnx, args.standard, sidecar)
        name, shape, _ = graph_input(standard.proto)
    except (StandardGraphNotFound, ValueError) as exc:
        raise UsageError(str(exc)) from None
    meta = graph_metadata(standard.proto)
    standard.proto = None  # ONNX Runtime loads the file itself: do not hold a second copy of the weights
    try:
        arrays = (file_feeds(args.input, shape, meta) if args.input
                  else generated_feeds(shape, args.inputs, args.seed + 1, raw_input=bool(meta.get("raw_input"))))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        raise UsageError(str(exc)) from None
    with step(f"running the engine and ONNX Runtime ({standard.path}) on {len(arrays)} input(s)"):
        report = verify_engine(args.engine, str(standard.path), [{name: x} for x in arrays], plugins=plugins,
                               atol=args.atol, rtol=args.rtol, margin_eps=args.margin_eps)
    print(report.format())
    _write_json(args.json, {"engine": args.engine, "standard_graph": str(standard.path), **report.to_dict()})
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


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
    paper = args.operating_points == "paper"
    default_sizes = ("256x256" if args.quick else "1024x1024") if paper else (
        "256x256,384x384" if args.quick else "768x768,1024x1024")
    sizes = [_size(s) for s in (args.sizes or default_sizes).split(",")]
    out_dir = Path(args.output_dir)
    # paper operating points get their own README table, so that they never overwrite the calibrated one
    marker = "operating-points-table" if paper else "performance-table"
    if args.update_readme and not args.from_results:  # refuse before a long measurement, not after it
        try:
            replace_between_markers(Path(args.update_readme).read_text(), marker, "")
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot update '{args.update_readme}': {exc}; add the lines <!-- {marker}:start --> "
                             f"and <!-- {marker}:end --> where the table belongs") from None
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
                         args.repeats, log, args.operating_points)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        meta = {"command": "staticprune " + " ".join(sys.argv[1:]), "seconds": time.perf_counter() - t0,
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "gpu": gpu,
                "repeats": args.repeats, "warmup": args.warmup, "quantile": args.quantile, "images": args.images,
                "sizes": [f"{h}x{w}" for h, w in sizes], "interleaved": True,
                "operating_points": args.operating_points}
        write_bytes_atomic(rows_json(rows, meta).encode(), out_dir / "results.json")
    write_bytes_atomic(to_csv(rows).encode(), out_dir / "results.csv")
    table = to_markdown(rows, meta)
    write_bytes_atomic((table + "\n").encode(), out_dir / "results.md")
    pngs = plots(rows, str(out_dir))
    print(table)
    written = ["results.csv", "results.md"] if args.from_results else ["results.json", "results.csv", "results.md"]
    print(f"wrote {out_dir}: " + ", ".join(written + [Path(p).name for p in pngs]))
    if args.from_results:
        marker = "operating-points-table" if meta.get("operating_points") else "performance-table"
    if args.update_readme:
        readme = Path(args.update_readme)
        try:
            text = replace_between_markers(readme.read_text(), marker, table)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot update '{readme}': {exc}; add the lines <!-- {marker}:start --> and "
                             f"<!-- {marker}:end --> where the table belongs") from None
        write_bytes_atomic(text.encode(), readme)
        log(f"[staticprune] updated the {marker.replace('-', ' ')} in {readme}")
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
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes (150 ADE20K, 19 Cityscapes); default: the checkpoint's (--weights), else 150")
    p.add_argument("--batch", type=int, default=1, help="fixed batch size of the graph (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and generated inputs")
    p.add_argument("--weights", help="checkpoint: timm, official Segmenter, mmseg SegViT or DToP, or staticprune layout")
    p.add_argument("--weights-layout", default="auto", choices=["auto", "native", "timm", "segmenter", "mmseg"])
    p.add_argument("--backbone-only", action="store_true",
                   help="load only the backbone of --weights (e.g. a timm ImageNet checkpoint); the decoder keeps its "
                        "initialisation")
    p.add_argument("--weights-grid", metavar="HxW",
                   help="token grid of the checkpoint's positional table (its training crop / 16), when not square")
    p.add_argument("--method", default=None, help="token-reduction method (default none)")
    p.add_argument("--config", help="JSON method config (as written by 'staticprune calibrate')")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option, repeatable")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from staticprune import __version__

    parser = _Parser(prog="staticprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"staticprune {__version__}")
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
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: FP16 network with every token decision in FP32 (explicit casts; build it strongly "
                        "typed), checked by the FP16 parity level")
    p.add_argument("--key-bias", choices=["add", "channel"], default="add",
                   help="how padding masks and log(size) reach the attention logits: add (an Add over the N x N "
                        "logits, which TensorRT fuses into its MHA kernel; default) or channel (one extra query/key "
                        "channel, no N x N pass: faster in ONNX Runtime CPU, not fused by TensorRT; "
                        "docs/deployment.md)")
    p.add_argument("--verify-inputs", type=int, default=1, help="generated inputs for verification (default 1)")
    p.add_argument("--tol", type=float, default=None,
                   help="max abs error allowed (default 1e-4; 5e-2 with --precision fp16)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--json", help="write the lint and verify results as JSON")
    p.add_argument("--buckets", action="append", metavar="FILE|LIST|POINT=LIST",
                   help="export capacity buckets instead of one graph: -o names a folder that gets pipeline.json and "
                        "one graph per stage and bucket; a calibration file (calibrate --buckets K), a list of "
                        "patch-token capacities (512,1024,2304) for every reduction point, or POINT=LIST, "
                        "repeatable (docs/buckets.md)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lint", help="check an ONNX graph against a TensorRT target")
    p.add_argument("onnx")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--json")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("verify", help="compare ONNX Runtime with PyTorch (or a TensorRT engine with ONNX Runtime)")
    p.add_argument("onnx", nargs="?", help="exported graph; with --engine, the graph the engine was built from")
    p.add_argument("--engine", help="TensorRT engine to compare with ONNX Runtime on the standard-op graph")
    p.add_argument("--standard", metavar="PATH",
                   help="engine check: the standard-op graph ONNX Runtime runs (default: found beside the engine or "
                        "the given graph: <stem>.standard.onnx, the sidecar's recorded path)")
    p.add_argument("--plugins", action="append",
                   help="plugin library to load (repeatable; engine check default: the sidecar's)")
    p.add_argument("--atol", type=float, default=1e-2, help="engine check: absolute tolerance (default 1e-2, fp16)")
    p.add_argument("--rtol", type=float, default=1e-2, help="engine check: relative tolerance (default 1e-2)")
    p.add_argument("--margin-eps", type=float, default=None,
                   help="engine check: a decision that flips where the reference margin is <= this is a near-tie, "
                        "not a failure (default 2^-10 = 9.77e-4, FP16's resolution of a score of magnitude 1; label "
                        "flips are near-ties up to 2 x (atol + rtol x max |logit|))")
    _add_model_args(p, required=False)
    p.add_argument("--input", action="append", help="image or .npy input (repeatable); default: generated")
    p.add_argument("--inputs", type=int, default=2, help="number of generated inputs (default 2)")
    p.add_argument("--tol", type=float, default=None,
                   help="max abs error of L2 (ONNX Runtime vs PyTorch) and L1 (static vs eager reference) logits "
                        "(default 1e-4; 5e-2 for fp16 graphs); decisions flipping at margins <= 10 x tol are near-ties")
    p.add_argument("--allow-overflow", action="store_true",
                   help="report capacity overflow (tokens a capacity could not hold) without failing (exit 0)")
    p.add_argument("--json", help="write L2, L1 and the overflow counts as JSON")
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
    p.add_argument("--buckets", type=int, default=None, metavar="K",
                   help="also choose K capacity buckets per reduction point for 'export --buckets FILE': count "
                        "quantiles rounded up to --bucket-multiple, then the largest count as it is, then every patch "
                        "(docs/buckets.md)")
    p.add_argument("--bucket-growth", type=float, default=None, metavar="R",
                   help="instead of --buckets K: geometric buckets from the smallest to the largest count, each at "
                        "most R times the previous (e.g. 1.25), so no image inside the calibrated range runs at more "
                        "than R times its own count; the largest count as it is, then every patch (docs/buckets.md)")
    p.add_argument("--bucket-multiple", type=int, default=64, metavar="M",
                   help="round buckets below the largest count up to a multiple of M patch tokens (default 64)")
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
    p.add_argument("--from-report", metavar="REPORT_JSON",
                   help="measure nothing: redraw the table from an earlier --json report (L1, L2, lint), taking the "
                        "benchmark columns again from --from-bench when given")
    p.add_argument("--update-readme", metavar="README", help="replace the table between the methods-table markers")
    p.set_defaults(func=cmd_methods_report)

    p = sub.add_parser("build", help="build a TensorRT engine (needs TensorRT) with a JSON sidecar")
    p.add_argument("onnx", help="an exported graph, or a capacity-bucket pipeline folder (export --buckets): one "
                                "engine per stage graph, written beside it and recorded in pipeline.json")
    p.add_argument("-o", "--output", help="output .engine path (not for a pipeline folder)")
    p.add_argument("--fp16", action="store_true", help="weakly typed FP16 build (TensorRT picks layer precisions)")
    p.add_argument("--strongly-typed", action="store_true",
                   help="strongly typed network: the ONNX tensor types decide every layer's precision (automatic "
                        "for graphs exported with mixed precision)")
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
    p.add_argument("--operating-points", choices=["paper"],
                   help="paper: no eager reference; every method's capacities solved so that the static graph's FLOP "
                        "reduction equals its paper's, timed beside the paper's Jetson AGX Orin ratio (default size "
                        "1024x1024; README markers operating-points-table)")
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

    # Commands in their own modules: each defines add_parser(sub), imports nothing heavy at module level, and
    # raises staticprune.cli.UsageError for bad input.
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"staticprune.commands.{name}").add_parser(sub)

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
    global _command_line
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _command_line = "staticprune " + shlex.join(argv)  # recorded in exported graphs
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
