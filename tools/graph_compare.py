"""Compare the exported graphs of two versions of staticprune: node counts, and ONNX Runtime CPU latency timed
interleaved (so that load on a shared machine hits both versions alike).

    # each version exports from the tree on PYTHONPATH (check the printed path), with the benchmark's options
    PYTHONPATH=/tmp/base .venv/bin/python tools/graph_compare.py export -o /tmp/graphs/before
    PYTHONPATH=$PWD      .venv/bin/python tools/graph_compare.py export -o /tmp/graphs/after
    .venv/bin/python tools/graph_compare.py time /tmp/graphs/before /tmp/graphs/after --methods algm,tome

`export` writes <method>.onnx and <method>.json (node counts per op type) per method; `time` prints one Markdown row
per method (total nodes, CumSum and Loop/Scan nodes, median and min ms of each version).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

ALL_METHODS = ("tome", "algm", "g2tm", "cts", "lvtp", "dcts", "dtop", "step")
SEGVIT_METHODS = ("dcts", "dtop", "step")
SEQUENTIAL_OPS = ("Loop", "Scan")


def export(out: Path, methods: list[str], size: tuple[int, int], segmenter: str, results: Path) -> None:
    import torch

    import staticprune
    from staticprune.export.onnx_export import export_to_proto, save_atomic
    from staticprune.methods import build_static_method
    from staticprune.models import build_model
    from staticprune.verify.parity import generated_inputs

    print(f"staticprune imported from {Path(staticprune.__file__).parent}", flush=True)
    torch.set_num_threads(1)
    label = f"{size[0]}x{size[1]}"
    rows = {r["method"]: r for r in json.loads(results.read_text())["rows"] if r["size"] == label}
    missing = [m for m in methods if m not in rows]
    if missing:
        raise SystemExit(f"graph_compare: {results} has no {label} row for {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    for method in methods:
        started = time.time()
        name = "segvit-vit-b-atm" if method in SEGVIT_METHODS else segmenter
        model = build_model(name, size, num_classes=150, seed=0)
        model.method = build_static_method(method, rows[method]["options"], model)
        example = generated_inputs((1, 3, *size), 1)[0]
        proto = export_to_proto(model.eval(), example, output_names=model.output_names()).model
        save_atomic(proto, out / f"{method}.onnx")
        ops = collections.Counter(node.op_type for node in proto.graph.node)
        info = {"method": method, "model": name, "options": rows[method]["options"], "nodes": sum(ops.values()),
                "ops": dict(ops)}
        (out / f"{method}.json").write_text(json.dumps(info, indent=1))
        print(f"{method} {name}: {info['nodes']} nodes, {ops['CumSum']} CumSum ({time.time() - started:.0f} s)",
              flush=True)


def time_graphs(before: Path, after: Path, methods: list[str], threads: int, repeats: int) -> None:
    import numpy as np
    import onnxruntime as ort

    print("| method | model | nodes before → after | CumSum before → after | Loop/Scan after "
          "| ORT ms before, median (min) | ORT ms after, median (min) |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        info = {tag: json.loads((d / f"{method}.json").read_text()) for tag, d in (("before", before), ("after", after))}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sessions = {tag: ort.InferenceSession(str(d / f"{method}.onnx"), opts, providers=["CPUExecutionProvider"])
                    for tag, d in (("before", before), ("after", after))}
        shape = sessions["before"].get_inputs()[0].shape
        feed = {"image": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        ms: dict[str, list[float]] = {tag: [] for tag in sessions}
        for session in sessions.values():  # one warm-up run each
            session.run(None, feed)
        for _ in range(repeats):  # interleaved: before, after, before, after, ...
            for tag, session in sessions.items():
                started = time.perf_counter()
                session.run(None, feed)
                ms[tag].append((time.perf_counter() - started) * 1e3)
        b, a = info["before"], info["after"]
        sequential = sum(a["ops"].get(op, 0) for op in SEQUENTIAL_OPS)
        print(f"| {method} | {b['model']} | {b['nodes']} → {a['nodes']} | {b['ops'].get('CumSum', 0)} → "
              f"{a['ops'].get('CumSum', 0)} | {sequential} | {statistics.median(ms['before']):.0f} "
              f"({min(ms['before']):.0f}) | {statistics.median(ms['after']):.0f} ({min(ms['after']):.0f}) |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export every method's graph with the benchmark's options")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--segmenter", default="segmenter-vit-b-mask", help="model of the Segmenter methods")
    p.add_argument("--results", type=Path, default=Path("docs/benchmarks/results.json"),
                   help="benchmark results whose options (calibrated capacities) are used")
    p = sub.add_parser("time", help="node counts and interleaved ONNX Runtime CPU latency of two exports")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        print(f"graph_compare: unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}",
              file=sys.stderr)
        raise SystemExit(2)
    if args.command == "export":
        try:
            height, width = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            print(f"graph_compare: --size must be HxW (got {args.size!r})", file=sys.stderr)
            raise SystemExit(2) from None
        export(args.output, methods, (height, width), args.segmenter, args.results)
    else:
        time_graphs(args.before, args.after, methods, args.threads, args.repeats)


if __name__ == "__main__":
    main()
