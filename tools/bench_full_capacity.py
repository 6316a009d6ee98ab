"""Cost at full capacity: each method's graph with every token kept (capacity = N) against the unreduced graph.

A static graph whose capacities hold the whole sequence does the unreduced model's work plus the method's own
decision computation; anything else (masks, gathers, casts the method adds around the backbone) is overhead that
a capacity below N pays too. This prints, per method, ONNX Runtime CPU milliseconds of the capacity = N graph and
of the unreduced graph of the same model, timed interleaved in one process (unreduced, method, unreduced, ...),
and their ratio (target <= 1.05).

    .venv/bin/python tools/bench_full_capacity.py --size 768x768                      # every method, ViT-B
    .venv/bin/python tools/bench_full_capacity.py --size 768x768 --key-bias add,channel --profile
    .venv/bin/python tools/bench_full_capacity.py --size 128x128 --segmenter segmenter-vit-t-mask --methods g2tm

Segmenter methods (tome, algm, g2tm, cts, lvtp) run on --segmenter, SegViT methods (dcts, dtop, step) on --segvit.
--key-bias picks the attention's key-bias form of the method graphs (`staticprune export --key-bias`): "channel"
(default here, the ONNX Runtime form) or "add" (the TensorRT form); a list times each (interleaved too).
Capacity = N options per method: FULL_CAPACITY_OPTIONS below. Graphs are exported into --work (reused with
--reuse when the file exists; delete them after a code change). Random weights, generated input (seed 50, the
benchmark suite's first image).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

SEGMENTER_METHODS = ("tome", "algm", "g2tm", "cts", "lvtp")
SEGVIT_METHODS = ("dcts", "dtop", "step")

# Options under which every capacity of a method holds the whole sequence (N slots at every point), so that the
# graph keeps every token it could keep. Where a method's EXACT_OPTIONS reduce the token count by construction
# (ToMe mode r, CTS's fixed k), the full-capacity form is ToMe's threshold mode without compaction (capacity None:
# merged tokens become padding slots) and CTS with no shared group.
FULL_CAPACITY_OPTIONS: dict[str, dict[str, Any]] = {
    "tome": {"mode": "threshold"},
    "algm": {"clap_capacity": None, "gbm_capacity": None},
    "g2tm": {"capacity": None},
    "cts": {"k": 0},
    "lvtp": {"capacity_ratio": [1.0]},
    "dcts": {"capacity_ratio": 1.0},
    "dtop": {"capacity_ratio": [1.0]},
    "step": {"token_capacity_ratio": 1.0, "capacity_ratio": [1.0]},
}


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bench_full_capacity: --size {text!r} is not HxW (e.g. 768x768)") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise SystemExit(f"bench_full_capacity: --size {text} must be positive multiples of 32 (the policy's stride)")
    return h, w


def export_graph(model_name: str, size: tuple[int, int], method: str | None, key_bias: str, path: str, x) -> None:
    from staticprune.export.onnx_export import export_to_proto, save_atomic
    from staticprune.methods import build_static_method
    from staticprune.models.segmentation import build_model
    from staticprune.models.vit import set_key_bias_form

    model = build_model(model_name, size)
    if method is not None:
        model.method = build_static_method(method, FULL_CAPACITY_OPTIONS[method], model)
    set_key_bias_form(model, key_bias)
    model.eval()
    save_atomic(export_to_proto(model, x, output_names=model.output_names()).model, path)


def timed(fn: Callable[[], Any], clock: str) -> float:
    """Milliseconds of one call: wall time, or the CPU time of this process ("cpu": with --threads 1 the work of
    the session, unaffected by other jobs taking the cores, which on a shared machine inflate wall times 3-5x)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    fn()
    return (now() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="768x768", help="input size HxW (default 768x768)")
    parser.add_argument("--methods", default=",".join(SEGMENTER_METHODS + SEGVIT_METHODS),
                        help="comma-separated methods (default: all eight)")
    parser.add_argument("--segmenter", default="segmenter-vit-b-mask", help="model of tome, algm, g2tm, cts, lvtp")
    parser.add_argument("--segvit", default="segvit-vit-b-atm", help="model of dcts, dtop, step")
    parser.add_argument("--key-bias", default="channel",
                        help="key-bias form(s) of the method graphs, comma-separated: channel, add (default channel)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or process CPU time (use with --threads 1 on a shared machine)")
    parser.add_argument("--work", default="", help="directory for the exported graphs (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="reuse graphs already in --work")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each pair once and print the op types whose time grew most")
    args = parser.parse_args(argv)

    size = parse_size(args.size)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in FULL_CAPACITY_OPTIONS]
    if unknown:
        raise SystemExit(f"bench_full_capacity: unknown method(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(FULL_CAPACITY_OPTIONS)}")
    if args.repeats < 1:
        raise SystemExit("bench_full_capacity: --repeats must be >= 1")
    forms = [f.strip() for f in args.key_bias.split(",") if f.strip()]
    if not forms or any(f not in ("add", "channel") for f in forms):
        raise SystemExit(f"bench_full_capacity: --key-bias {args.key_bias!r}: give add, channel or add,channel")

    from staticprune.runtime.ort import ort_session
    from staticprune.verify.parity import generated_inputs

    work = args.work or tempfile.mkdtemp(prefix="full-capacity-")
    os.makedirs(work, exist_ok=True)
    tag = f"{size[0]}x{size[1]}"
    x = generated_inputs((1, 3, *size), 1, seed=50)[0]
    feed = x.numpy()

    def graph(model_name: str, method: str | None, form: str = "add") -> str:
        name = f"{method}-{form}" if method else "unreduced"  # the unreduced graph has no key bias
        path = os.path.join(work, f"{model_name}-{tag}-{name}.onnx")
        if not (args.reuse and os.path.exists(path)):
            print(f"export {model_name} {tag} {name}", file=sys.stderr, flush=True)
            export_graph(model_name, size, method, form, path, x)
        return path

    rows = []
    profiles: dict[str, list[tuple[str, float, float]]] = {}
    by_model = [(args.segmenter, [m for m in methods if m in SEGMENTER_METHODS]),
                (args.segvit, [m for m in methods if m in SEGVIT_METHODS])]
    for model_name, model_methods in by_model:
        if not model_methods:
            continue
        base_path = graph(model_name, None)
        base = ort_session(base_path, threads=args.threads or None)
        base_feed = {base.get_inputs()[0].name: feed}
        base_run = lambda: base.run(None, base_feed)  # noqa: E731
        for method in model_methods:
            paths = {form: graph(model_name, method, form) for form in forms}
            sessions = {form: ort_session(path, threads=args.threads or None) for form, path in paths.items()}
            base_ms: list[float] = []
            full_ms: dict[str, list[float]] = {form: [] for form in forms}
            for round_ in range(1 + args.repeats):  # round 0 warms every session up
                b = timed(base_run, args.clock)
                times = {form: timed(lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}), args.clock)
                         for form, s in sessions.items()}
                if round_:
                    base_ms.append(b)
                    for form, t in times.items():
                        full_ms[form].append(t)
            for form in forms:
                rows.append((method, form, model_name, statistics.median(full_ms[form]), min(full_ms[form]),
                             statistics.median(base_ms), min(base_ms)))
                print(f"{method} ({form}): {rows[-1][3]:.0f} / {rows[-1][5]:.0f} ms", file=sys.stderr, flush=True)
            if args.profile:
                from staticprune.bench.suite import op_deltas, ort_op_profile

                base_ops = ort_op_profile(base_path, x, work)
                for form, path in paths.items():
                    profiles[f"{method} ({form})"] = op_deltas(ort_op_profile(path, x, work), base_ops, 6)
            del sessions
            gc.collect()

    print("| method | key bias | model | capacity = N options | ORT CPU ms capacity = N (median / min) | "
          "unreduced (median / min) | ratio (medians) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, form, model_name, fmed, fmin, bmed, bmin in rows:
        opts = " ".join(f"{k}={v}" for k, v in FULL_CAPACITY_OPTIONS[method].items())
        print(f"| {method} | {form} | {model_name} | {opts} | {fmed:.0f} / {fmin:.0f} | {bmed:.0f} / {bmin:.0f} | "
              f"{fmed / bmed:.3f} |")
    for method, deltas in profiles.items():
        grew = ", ".join(f"{op} {u:.0f} -> {s:.0f}" for op, u, s in deltas)
        print(f"profile {method} (op: unreduced -> capacity = N ms): {grew}")
    print(f"{tag}, batch 1, ONNX Runtime CPU, {args.threads or 'default'} intra-op threads, {args.clock} time, median "
          f"and min of {args.repeats} interleaved rounds after one warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
