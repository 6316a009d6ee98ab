"""Time staticprune against YOUR checkout of a method's official code, on the same machine, same weights, same input.

staticprune never vendors the official code; point this script at a checkout you made yourself, and at a trained
checkpoint of that code (its `checkpoint.pth`, with the `variant.yml` the official training writes beside it):

    git clone https://github.com/tue-mps/algm-segmenter ~/algm-segmenter      # ALGM
    git clone https://github.com/vbercy/g2tm-segmenter ~/g2tm-segmenter      # G2TM
    git clone https://github.com/tue-mps/cts-segmenter ~/cts-segmenter       # CTS
    # install each one's requirements in the environment that runs this script (timm, pyyaml, ...)

    .venv/bin/python tools/bench_official.py --method algm --official-dir ~/algm-segmenter \
        --checkpoint ~/seg_base_mask_algm/checkpoint.pth --layers 1 5 --threshold 0.88 --json algm.json
    .venv/bin/python tools/bench_official.py --method g2tm --official-dir ~/g2tm-segmenter \
        --checkpoint ~/seg_small_mask/checkpoint.pth --layers 2 --threshold 0.95
    .venv/bin/python tools/bench_official.py --method cts --official-dir ~/cts-segmenter \
        --checkpoint ~/seg_cts/checkpoint.pth --opt policy_weights=~/seg_cts/checkpoint.pth

What it runs, all in one process, timed interleaved (every variant once per round, the order rotating), batch 1,
on one generated image normalised as the checkpoint's variant says:

* official, unreduced: the official `segm.model.factory.load_model(checkpoint)` model without the method's patch
  (ALGM, G2TM; the CTS repository has no switch-off, so its row is absent and speedups are over staticprune's
  unreduced model);
* official, method: the same model with the official patch (`algm.patch.algm_segmenter_patch(model, layers)` and
  the encoder's `window_size` / `threshold`; `g2tm.graph_segmenter_patch(model, layer, threshold, False, False)`;
  CTS as loaded);
* staticprune, unreduced / eager reference / static module (PyTorch), and the static and unreduced graphs in ONNX
  Runtime (CPU only): the model named by the variant (`segmenter-vit-{t,s,b,l}-{linear,mask}`) with the same
  checkpoint loaded, the method's options from --layers/--threshold and --opt, and the static graph's capacities
  calibrated on --images generated images at the 0.99 quantile, as `staticprune bench-suite` does.

It also prints how far the official method's logits are from staticprune's eager reference on the timed image
(max abs difference and label agreement): the two should compute the same thing from the same weights.

Entry points assumed (they are what the official speed tests call): `segm.model.factory.load_model(path) ->
(model, variant)` with `variant["dataset_kwargs"]["crop_size"|"normalization"]` and `variant["net_kwargs"]`; the
ALGM package under `<official-dir>/algm`, the G2TM package under `<official-dir>/g2tm`. Bad input: one line on
stderr, exit 2. The JSON (--json) has one entry per variant: median and min ms, every sample, speedup.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

METHODS = ("algm", "g2tm", "cts")
NORMALIZATION = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                 "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
BACKBONE_SIZE = {192: "t", 384: "s", 768: "b", 1024: "l"}


class BadInput(Exception):
    """One line for the user; exit code 2."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--official-dir", required=True, help="your checkout of the method's official repository")
    p.add_argument("--checkpoint", required=True, help="official checkpoint.pth (variant.yml beside it)")
    p.add_argument("--size", help="HxW (default: the variant's crop size)")
    p.add_argument("--layers", type=int, nargs="+", help="ALGM: CLAP and GBM blocks (official default 1 5); G2TM: "
                                                        "its block (2)")
    p.add_argument("--threshold", type=float, help="ALGM: CLAP threshold; G2TM: edge threshold")
    p.add_argument("--window", type=int, nargs=2, default=(2, 2), help="ALGM CLAP window (default 2 2)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="staticprune method option")
    p.add_argument("--images", type=int, default=2, help="generated images for staticprune's capacities")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", help="write the timings here")
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    official = Path(os.path.expanduser(args.official_dir))
    if not (official / "segm" / "model" / "factory.py").is_file():
        raise BadInput(f"--official-dir '{official}' has no segm/model/factory.py: give the root of your checkout "
                       f"of the official {args.method.upper()} repository")
    if args.method in ("algm", "g2tm") and not (official / args.method / args.method / "__init__.py").is_file():
        raise BadInput(f"--official-dir '{official}' has no {args.method}/{args.method}/__init__.py (the official "
                       f"{args.method.upper()} package); is it the {args.method.upper()} repository?")
    checkpoint = Path(os.path.expanduser(args.checkpoint))
    if not checkpoint.is_file():
        raise BadInput(f"--checkpoint '{checkpoint}' does not exist")
    if not (checkpoint.parent / "variant.yml").is_file():
        raise BadInput(f"no variant.yml beside '{checkpoint}': the official load_model reads the model's settings "
                       "from it (the official training writes it next to checkpoint.pth)")
    if args.layers is not None and args.method == "cts":
        raise BadInput("--layers has no effect with --method cts (CTS shares tokens before the encoder)")
    if args.method == "g2tm" and args.layers is not None and len(args.layers) != 1:
        raise BadInput(f"G2TM merges in one block: give --layers N, not {len(args.layers)} values")
    if args.method == "algm" and args.layers is not None and len(args.layers) != 2:
        raise BadInput(f"ALGM takes two blocks, CLAP and GBM: give --layers 1 5, not {len(args.layers)} value(s)")
    if args.images < 1 or args.repeats < 1 or args.warmup < 0:
        raise BadInput("--images and --repeats must be >= 1 and --warmup >= 0")
    return official, checkpoint


def project_model_name(variant: dict[str, Any]) -> str:
    """staticprune's model for the official variant: ViT size from d_model, DeiT from the backbone name, decoder."""
    net = variant.get("net_kwargs", {})
    size = BACKBONE_SIZE.get(int(net.get("d_model", 0)))
    decoder = str(net.get("decoder", {}).get("name", ""))
    kind = "mask" if decoder == "mask_transformer" else "linear" if "linear" in decoder else None
    if size is None or kind is None:
        raise BadInput(f"variant.yml describes a model staticprune has no twin for (d_model {net.get('d_model')}, "
                       f"decoder '{decoder}')")
    family = "deit" if "deit" in str(net.get("backbone", "")) else "vit"
    return f"segmenter-{family}-{size}-{kind}"


def project_options(args: argparse.Namespace) -> dict[str, Any]:
    """The staticprune method options that match the official settings given, then --opt on top."""
    options: dict[str, Any] = {}
    if args.method == "algm":
        if args.layers:
            options.update(clap_layer=args.layers[0], gbm_layer=args.layers[1])
        if args.threshold is not None:
            options["clap_threshold"] = args.threshold
        options["window"] = list(args.window)
    elif args.method == "g2tm":
        if args.layers:
            options["layer"] = args.layers[0]
        if args.threshold is not None:
            options["threshold"] = args.threshold
    for item in args.opt:
        if "=" not in item:
            raise BadInput(f"--opt '{item}' is not key=value")
        key, value = item.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = os.path.expanduser(value)
    return options


def load_official(official: Path, method: str, checkpoint: Path, device: str):
    """(load_model function, patch function or None) from the user's checkout."""
    for path in (official / method, official):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    try:
        ptu = importlib.import_module("segm.utils.torch")
        if hasattr(ptu, "set_gpu_mode"):  # the official load_model maps the checkpoint to ptu.device
            ptu.set_gpu_mode(device == "cuda")
    except ImportError:
        pass
    try:
        load_model = importlib.import_module("segm.model.factory").load_model
        package = importlib.import_module(method) if method in ("algm", "g2tm") else None
    except Exception as exc:  # the official code's own dependencies (timm, yaml, ...) are the user's to install
        raise BadInput(f"cannot import the official code from '{official}': {type(exc).__name__}: {exc}; install "
                       "its requirements in this environment") from None
    return load_model, package


def official_patch(method: str, package: Any, args: argparse.Namespace) -> Optional[Callable[[Any], None]]:
    if method == "algm":
        layers = tuple(args.layers or (1, 5))

        def patch(model):
            package.patch.algm_segmenter_patch(model, layers, trace_source=True)
            model.encoder.window_size = tuple(args.window)
            if args.threshold is not None:
                model.encoder.threshold = args.threshold
        return patch
    if method == "g2tm":
        layer = (args.layers or [2])[0]
        threshold = 0.95 if args.threshold is None else args.threshold
        return lambda model: package.graph_segmenter_patch(model, layer, threshold, False, False)
    return None  # CTS: the loaded model is the method


def _first_tensor(out: Any) -> Any:
    """The logits of a forward that returns a tensor, or a tuple / dict led by the logits."""
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return out.get("logits", next(iter(out.values())))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from staticprune.bench.latency import time_interleaved
    from staticprune.export.onnx_export import export_to_proto, save_atomic
    from staticprune.methods import build_static_method, method_module
    from staticprune.models import build_model, parse_size
    from staticprune.models.checkpoints import load_checkpoint
    from staticprune.reference import reference_module
    from staticprune.runtime.ort import ort_session
    from staticprune.verify.parity import generated_inputs

    official_dir, checkpoint = check_inputs(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda but PyTorch sees no GPU")
    device = torch.device(args.device)
    load_model, package = load_official(official_dir, args.method, checkpoint, args.device)

    official_method, variant = load_model(str(checkpoint))
    patch = official_patch(args.method, package, args)
    if patch is not None:
        patch(official_method)
    official_plain = load_model(str(checkpoint))[0] if patch is not None else None
    crop = variant.get("dataset_kwargs", {}).get("crop_size", 512)
    size = parse_size(args.size) if args.size else (int(crop), int(crop))
    mean, std = NORMALIZATION.get(variant.get("dataset_kwargs", {}).get("normalization", "vit"), NORMALIZATION["vit"])

    name = project_model_name(variant)
    classes = int(variant.get("net_kwargs", {}).get("n_cls", 0)) or None
    plain = build_model(name, size, num_classes=classes)
    load_checkpoint(plain, str(checkpoint), pos_grid=None)
    plain.eval()
    options = project_options(args)
    ref = reference_module(args.method)
    images = [((img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
              for img in generated_inputs((1, 3, *size), args.images, seed=50)]
    kept: dict[str, list[int]] = {}
    with torch.no_grad():
        for img in images:
            for point, counts in ref.reference_forward(plain, img, options).kept.items():
                kept.setdefault(point, []).extend(counts)
    static_options = method_module(args.method).calibrated_options(kept, 0.99, options)
    static = build_model(name, size, num_classes=classes)
    static.load_state_dict(plain.state_dict(), strict=False)
    static.method = build_static_method(args.method, static_options, static)
    static.eval()
    x = images[0]

    with torch.no_grad():  # same weights, same image: the official method against staticprune's reference
        official_logits = _first_tensor(official_method.eval()(x)).float()
        reference_logits = ref.reference_forward(plain, x, options).logits.float()
    parity = {"max_abs": float((official_logits - reference_logits).abs().max()),
              "label_agreement": float((official_logits.argmax(1) == reference_logits.argmax(1)).float().mean())}

    variants: dict[str, tuple[str, Callable[[], object]]] = {}
    on_device = x.to(device)

    def timed(model, call=None):
        model.to(device).eval()

        def go():
            (call or model)(on_device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return go

    if official_plain is not None:
        variants["official unreduced"] = ("pytorch", timed(official_plain))
    variants[f"official {args.method}"] = ("pytorch", timed(official_method))
    variants["staticprune unreduced"] = ("pytorch", timed(plain))
    variants["staticprune reference"] = ("pytorch",
                                         timed(plain, lambda img: ref.reference_forward(plain, img, options)))
    variants["staticprune static"] = ("pytorch", timed(static))
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cpu":
            for label, model in (("unreduced", plain), ("static", static)):
                path = os.path.join(tmp, f"{label}.onnx")
                save_atomic(export_to_proto(model, x, output_names=model.output_names()).model, path)
                sess = ort_session(path)
                feeds = {sess.get_inputs()[0].name: x.numpy().astype(np.float32)}
                variants[f"staticprune {label} graph (ONNX Runtime)"] = (
                    "onnxruntime-cpu", lambda sess=sess, feeds=feeds: sess.run(None, feeds))
        with torch.no_grad():
            stats = time_interleaved(variants, args.warmup, args.repeats)
    base_key = "official unreduced" if "official unreduced" in stats else "staticprune unreduced"
    base = stats[base_key].median_ms
    return {"method": args.method, "model": name, "size": f"{size[0]}x{size[1]}", "device": args.device,
            "options": options, "static_options": static_options, "baseline": base_key, "parity": parity,
            "variants": [{"variant": k, "backend": s.backend, "median_ms": s.median_ms, "min_ms": s.min_ms,
                          "samples_ms": s.samples, "speedup": base / s.median_ms} for k, s in stats.items()]}


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{result['method']} on {result['model']} {result['size']}, {result['device']}; speedup over "
             f"{result['baseline']} (same run, interleaved)", "",
             "| variant | median ms | min ms | speedup |", "| --- | --- | --- | --- |"]
    for v in result["variants"]:
        lines.append(f"| {v['variant']} | {v['median_ms']:.1f} | {v['min_ms']:.1f} | {v['speedup']:.2f}x |")
    p = result["parity"]
    lines += ["", f"official {result['method']} vs staticprune reference on the timed image: max abs "
              f"{p['max_abs']:.2e}, labels agree on {100 * p['label_agreement']:.3f}% of pixels"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BadInput as exc:
        print(f"bench_official: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.json:
        from staticprune.fileio import write_bytes_atomic

        write_bytes_atomic(json.dumps(result, indent=2).encode(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
