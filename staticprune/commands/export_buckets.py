"""`staticprune export --buckets ... -o DIR`: a capacity-bucket pipeline instead of one graph (docs/buckets.md).

Not a subcommand of its own: `export` hands over here when --buckets is given, so every export flag keeps its
meaning (model, size, weights, method, --opt/--config, --labels, --raw-input, --target, --opset, --tol, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CAPACITY_NOTE = "capacities come from the buckets"


def parse_bucket_args(values: list[str], args: argparse.Namespace) -> dict[str, list[int]]:
    """--buckets FILE | LIST | POINT=LIST (repeatable) -> {point or "*": capacities}."""
    from staticprune.cli import UsageError
    from staticprune.export.buckets import BucketError, parse_bucket_list

    out: dict[str, list[int]] = {}
    try:
        for value in values:
            if "=" in value:
                point, text = value.split("=", 1)
                out[point.strip()] = parse_bucket_list(text)
            elif Path(value).is_file() or value.endswith(".json"):
                out.update(read_bucket_file(value, args))
            else:
                out["*"] = parse_bucket_list(value)
    except BucketError as exc:
        raise UsageError(str(exc)) from None
    return out


def read_bucket_file(path: str, args: argparse.Namespace) -> dict[str, list[int]]:
    """The "buckets" of a calibration file, refused when it was measured on another model, size or method."""
    from staticprune.cli import UsageError, _size

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--buckets '{path}' is not a readable JSON file ({exc.__class__.__name__})") from None
    buckets = data.get("buckets") if isinstance(data, dict) else None
    if not isinstance(buckets, dict) or not buckets:
        raise UsageError(f"--buckets '{path}' holds no buckets; write them with 'staticprune calibrate --buckets K'")
    recorded: dict[str, Any] = {"model": data.get("model"), "method": data.get("method"),
                                "size": "x".join(str(v) for v in data.get("size") or [])}
    wanted = {"model": args.model, "method": args.method, "size": "x".join(str(v) for v in _size(args.size))}
    for key in ("model", "size", "method"):
        if recorded[key] and wanted[key] not in (None, "none") and recorded[key] != wanted[key]:
            raise UsageError(f"--buckets '{path}' was calibrated for {key} {recorded[key]}, not {wanted[key]}: run "
                             f"'staticprune calibrate --buckets K' for this {key}")
    if args.method in (None, "none") and data.get("method"):
        args.method = data["method"]
    try:
        return {str(k): [int(v) for v in vs] for k, vs in buckets.items()}
    except (TypeError, ValueError):
        raise UsageError(f"--buckets '{path}': buckets must map reduction points to lists of counts") from None


def cmd_export_buckets(args: argparse.Namespace) -> int:
    import dataclasses

    from staticprune import cli
    from staticprune.cli import EXIT_CHECK_FAILED, EXIT_OK, UsageError, log, step
    from staticprune.export.buckets import (BucketError, check_buckets, export_buckets, method_plan,
                                            PIPELINE_FILE)
    from staticprune.pipeline import example_inputs

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output '{out}' is a file; --buckets writes a folder (pipeline.json and stage graphs)")
    if out.exists() and not args.force:
        raise UsageError(f"output '{out}' exists; pass --force to overwrite it")
    for flag, bad in (("--plugins", args.plugins), ("--precision fp16", args.precision == "fp16"),
                      ("--exporter dynamo", args.exporter != "torchscript")):
        if bad:
            raise UsageError(f"{flag} is not available with --buckets yet; export the buckets without it")
    cli._check_writable(str(out / PIPELINE_FILE), "output")
    cli._check_writable(args.json, "--json")
    cli._at_least(args.verify_inputs, 1, "--verify-inputs")
    requested = parse_bucket_args(args.buckets, args)
    cfg = cli._model_config(args)
    if cfg.method == "none":
        raise UsageError("--buckets needs a token-reduction method (--method g2tm|algm, or --config FILE)")
    tol = 1e-4 if args.tol is None else args.tol
    model = cli._build(cfg)
    try:
        plan = method_plan(cfg.method, model.method, model)
        buckets, _ = check_buckets(plan, requested, model.grid[0] * model.grid[1])
    except BucketError as exc:
        raise UsageError(str(exc)) from None
    given = [k for k in plan.capacity_options if cfg.method_options.get(k) is not None]
    if given:
        log(f"[staticprune] note: {', '.join(given)} replaced: {CAPACITY_NOTE} (every point holds all patches "
            "before its bucket)")
    cfg = dataclasses.replace(cfg, method_options={**cfg.method_options, **{k: None for k in plan.capacity_options}})
    from staticprune.methods import build_static_method

    model.method = build_static_method(cfg.method, cfg.method_options, model)  # what pipeline.json records
    with step(f"exporting {cfg.method} capacity buckets to {out}"):
        try:
            result = export_buckets(cfg, model, buckets, out, cli._opset(args.opset), cli._target(args.target),
                                    example_inputs(cfg, args.verify_inputs, cfg.seed + 1), tol,
                                    slim=not args.no_slim, command=cli._command_line, force=args.force, log=log)
        except BucketError as exc:
            raise UsageError(str(exc)) from None
    print(result.format())
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"{'PASS' if result.ok else 'FAIL'}: wrote {out}/{PIPELINE_FILE} and {len(result.graphs)} stage graphs "
          f"({total / 1e6:.1f} MB); buckets " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in buckets.items()))
    cli._write_json(args.json, {"pipeline": str(out / PIPELINE_FILE), "ok": result.ok, "buckets": buckets,
                                "graphs": [dataclasses.asdict(g) for g in result.graphs],
                                "pipeline_checks": result.pipeline_checks, "notes": result.notes})
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED
