"""`staticprune evaluate`: mIoU on a labelled dataset of the unreduced model, the eager reference of a method, the
static module, exported graphs and TensorRT engines, on the same images, in one table (docs/evaluate.md).

Inference follows Segmenter's evaluation: `--mode slide` rescales each image so its short side is `--short-side`
(enlarged further if the window would not fit), runs windows of the model's size at `--stride` (the last window
of a row or column flush with the border), averages the logits where windows overlap and resizes them bilinearly
to the ground truth's size; `--mode resize` resizes the whole image to the model's size and the logits back.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from staticprune.cli import UsageError, log

LAYOUTS = ("cityscapes", "ade20k", "pairs")
DEFAULT_SPLIT = {"cityscapes": "val", "ade20k": "validation"}
# Segmenter evaluates Cityscapes at its full resolution (short side 1024) with 768-pixel windows; ADE20K images are
# rescaled to a 512 short side first (the dataset's test pipeline), which is the window's short side.
DEFAULT_SHORT_SIDE = {"cityscapes": 1024}
STRIDE_OVERLAP = 32  # Segmenter's evaluation script (segm/eval/miou.py): stride = window - 32 unless given
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TORCH_KINDS = ("unreduced", "reference", "static")


# --------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    layout: str
    samples: list[Sample]
    ignore_index: int
    shift_labels: bool  # ADE20K: stored ids are class + 1, 0 = ignore (mmseg's reduce_zero_label)
    description: str


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UsageError(f"{what} '{path}' does not exist or is not a directory")
    return path


def find_dataset(layout: str, root: Optional[str], split: Optional[str], images: Optional[str],
                 labels: Optional[str], ignore_index: Optional[int]) -> Dataset:
    """The (image, label) pairs of a dataset layout, sorted by name; UsageError when none match."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)} (got '{layout}')")
    if layout == "pairs":
        if root or split:
            raise UsageError("--root and --split are for --layout cityscapes|ade20k; --layout pairs takes "
                             "--images DIR --labels DIR")
        if not images or not labels:
            raise UsageError("--layout pairs needs --images DIR and --labels DIR (label maps matched by file stem)")
        image_dir, label_dir = _need_dir(Path(images), "--images"), _need_dir(Path(labels), "--labels")
        label_by_stem = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
        samples = [Sample(p.stem, p, label_by_stem[p.stem]) for p in sorted(image_dir.iterdir())
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in label_by_stem]
        if not samples:
            raise UsageError(f"no image in '{images}' has a label map of the same stem (.png) in '{labels}'")
        ignore = 255 if ignore_index is None else ignore_index
        return Dataset(layout, samples, ignore, False, f"pairs {images} + {labels}")
    if images or labels:
        raise UsageError(f"--images/--labels are for --layout pairs; --layout {layout} takes --root DIR [--split S]")
    if ignore_index is not None:
        raise UsageError(f"--ignore-index is for --layout pairs; {layout} ignores 255 "
                         f"{'(stored 0)' if layout == 'ade20k' else ''}".rstrip())
    if not root:
        raise UsageError(f"--layout {layout} needs --root DIR (the dataset's top folder)")
    split = split or DEFAULT_SPLIT[layout]
    base = _need_dir(Path(root), "--root")
    if layout == "cityscapes":
        image_dir = _need_dir(base / "leftImg8bit" / split, f"cityscapes images (ROOT/leftImg8bit/{split})")
        label_dir = _need_dir(base / "gtFine" / split, f"cityscapes labels (ROOT/gtFine/{split})")
        samples = []
        for img in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            lbl = label_dir / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
            if lbl.is_file():
                samples.append(Sample(f"{img.parent.name}/{stem}", img, lbl))
        if not samples:
            raise UsageError(f"no ROOT/leftImg8bit/{split}/CITY/*_leftImg8bit.png in '{root}' has its "
                             f"ROOT/gtFine/{split}/CITY/*_gtFine_labelTrainIds.png (create the trainId maps with "
                             "cityscapesscripts' createTrainIdLabelImgs)")
        return Dataset(layout, samples, 255, False, f"cityscapes {root} split {split}")
    image_dir = _need_dir(base / "images" / split, f"ade20k images (ROOT/images/{split})")
    label_dir = _need_dir(base / "annotations" / split, f"ade20k annotations (ROOT/annotations/{split})")
    samples = [Sample(p.stem, p, label_dir / f"{p.stem}.png") for p in sorted(image_dir.iterdir())
               if p.suffix.lower() in IMAGE_SUFFIXES and (label_dir / f"{p.stem}.png").is_file()]
    if not samples:
        raise UsageError(f"no image in ROOT/images/{split} of '{root}' has its ROOT/annotations/{split}/NAME.png")
    return Dataset(layout, samples, 255, True, f"ade20k {root} split {split}")


def check_sizes(dataset: Dataset) -> None:
    """Every image readable and the same size as its label map (headers only: cheap, before any model runs)."""
    from PIL import Image, UnidentifiedImageError

    for s in dataset.samples:
        try:
            with Image.open(s.image) as im:
                image_size = im.size
            with Image.open(s.label) as lb:
                label_size, mode = lb.size, lb.mode
        except (UnidentifiedImageError, OSError) as exc:
            raise UsageError(f"sample '{s.name}': cannot read '{exc.filename or s.image}' as an image") from None
        if image_size != label_size:
            raise UsageError(f"sample '{s.name}': image {image_size[1]}x{image_size[0]} and label map "
                             f"{label_size[1]}x{label_size[0]} differ in size ('{s.label}')")
        if mode not in ("L", "P", "I", "I;16"):
            raise UsageError(f"label map '{s.label}' is mode {mode}; expected a single-channel PNG of class ids")


def read_sample(dataset: Dataset, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB image and (H, W) int64 ground truth, ignored pixels = dataset.ignore_index."""
    from PIL import Image

    from staticprune.imageio import to_rgb8

    with Image.open(sample.image) as im:
        rgb = np.asarray(to_rgb8(im))
    with Image.open(sample.label) as lb:
        truth = np.asarray(lb).astype(np.int64)
    if dataset.shift_labels:  # ADE20K: 0 is "other" (ignored), class c is stored as c + 1
        truth = np.where(truth == 0, dataset.ignore_index, truth - 1)
    return rgb, truth


# --------------------------------------------------------------------------------------------- inference


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side, as Segmenter: every `stride` while a whole window fits before the end, then
    one window flush with the end (length >= window)."""
    return [s for s in range(0, length, stride) if s < length - window] + [length - window]


def slide_size(height: int, width: int, window: tuple[int, int], short_side: int) -> tuple[int, int]:
    """The size an image is rescaled to before sliding: short side = `short_side` (0 = unchanged), then enlarged
    (aspect kept) until the window fits."""
    scale = short_side / min(height, width) if short_side else 1.0
    scale = max(scale, window[0] / height, window[1] / width)
    return max(window[0], int(round(height * scale))), max(window[1], int(round(width * scale)))


@dataclass
class ForwardResult:
    logits: Any  # torch (1, K, h, w) float32
    overflow: Optional[dict[str, int]] = None  # reduction point (or "total") -> tokens over capacity
    gflops: Optional[float] = None  # counted on this very call (eager reference)
    kept: Optional[dict[str, int]] = None  # reference: tokens kept after each point


@dataclass
class Variant:
    label: str  # column name: unreduced | reference | static | onnx:PATH | engine:PATH
    kind: str
    window: tuple[int, int]
    num_classes: int
    forward: Callable[[Any], ForwardResult]  # raw RGB 0..255 float (1, 3, h, w) torch -> ForwardResult
    gflops: Optional[float] = None  # per forward (one window), fvcore convention; reference: measured per call
    gflops_note: str = ""


def predict(variant: Variant, image: Any, mode: str, stride: tuple[int, int], short_side: int,
            on_forward: Callable[[ForwardResult], None]) -> np.ndarray:
    """(H, W) int64 labels of one raw image (1, 3, H, W) by sliding windows or a whole-image resize."""
    import torch
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    wh, ww = variant.window
    if mode == "resize":
        x = F.interpolate(image, size=(wh, ww), mode="bilinear", align_corners=False) if (height, width) != (wh, ww) \
            else image
        out = variant.forward(x)
        on_forward(out)
        logits = out.logits.float()
    else:
        sh, sw = slide_size(height, width, variant.window, short_side)
        x = F.interpolate(image, size=(sh, sw), mode="bilinear", align_corners=False) if (sh, sw) != (height, width) \
            else image
        total = torch.zeros((1, variant.num_classes, sh, sw))
        count = torch.zeros((1, 1, sh, sw))
        for top in window_starts(sh, wh, stride[0]):
            for left in window_starts(sw, ww, stride[1]):
                out = variant.forward(x[:, :, top : top + wh, left : left + ww].contiguous())
                on_forward(out)
                total[:, :, top : top + wh, left : left + ww] += out.logits.float()
                count[:, :, top : top + wh, left : left + ww] += 1.0
        logits = total / count
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).numpy().astype(np.int64)


def _normalise(raw: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (raw / 255.0 - m) / s


HOOK_ORDER = {"embed": 0, "after_attention": 1, "after_block": 2}


def point_order(label: str) -> tuple[int, int]:
    """Sort key of a probed point label ("embed", "after_attention L5"): layer, then hook order."""
    hook, _, layer = label.partition(" L")
    return (int(layer) if layer.isdigit() else 0, HOOK_ORDER.get(hook, 3))


class OverflowProbe:
    """Wraps a static method module's hooks to split its `overflow` output by reduction point.

    A hook call is a reduction point when it replaces the `overflow` tensor of the token state's extras and either
    the state already had one, or the call replaced the state's `owner` or `size`, or the count changed (a call
    that only starts the count at 0 is not a point). Its share is the overflow it adds. `summarise` gives the points
    the eager reference's names when both count the same points; otherwise they are "<hook> L<layer>"."""

    def __init__(self, method: Any):
        import torch

        self.method = method
        self.increments: dict[str, int] = {}
        probe = self

        class _Probe(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module):
                super().__init__()
                self.inner = inner
                self.extra_outputs = getattr(inner, "extra_outputs", ())
                for name in ("embed", "decode"):
                    if hasattr(inner, name):
                        setattr(self, name, probe._wrap(name, getattr(inner, name)))
                for name in ("after_attention", "after_block"):
                    setattr(self, name, probe._wrap(name, getattr(inner, name)))

            def __getattr__(self, name: str) -> Any:  # anything else the model reads from its method
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self._modules["inner"], name)

        self.module = _Probe(method)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            before_state = args[1] if name in ("after_attention", "after_block") else None
            out = fn(*args, **kwargs)
            if name == "decode" or not hasattr(out, "extras"):
                return out
            before_extras = before_state.extras if before_state is not None else {}
            if out.extras.get("overflow") is None or out.extras.get("overflow") is before_extras.get("overflow"):
                return out
            before, after = _overflow_value(before_extras), _overflow_value(out.extras)
            reduced = (before_state is None or out.owner is not before_state.owner
                       or out.size is not before_state.size)
            if "overflow" in before_extras or reduced or after != before:
                label = f"{name} L{args[0] + 1}" if before_state is not None else name
                self.increments[label] = self.increments.get(label, 0) + max(0, after - before)
            return out

        return call


def _overflow_value(extras: dict) -> int:
    value = extras.get("overflow")
    return 0 if value is None else int(value.reshape(-1)[0])


def torch_variants(kinds: list[str], cfg: Any, window: tuple[int, int]) -> list[Variant]:
    """unreduced / reference / static on one PyTorch model (the method swapped in and out)."""
    import torch

    from staticprune.bench import count_flops
    from staticprune.cli import _build
    from staticprune.methods import method_module
    from staticprune.models import get_spec

    spec = get_spec(cfg.model)
    method = cfg.method if cfg.method not in ("", None) else "none"
    only_calibrate = getattr(method_module(method), "CALIBRATE_ONLY_OPTIONS", ()) if method != "none" else ()
    module_cfg = dataclasses.replace(cfg, method_options={k: v for k, v in cfg.method_options.items()
                                                          if k not in only_calibrate})
    model = _build(module_cfg)  # with classes None, reads the class count from the checkpoint
    cfg = dataclasses.replace(cfg, classes=model.num_classes)
    module_cfg = dataclasses.replace(module_cfg, classes=model.num_classes)
    static_method = model.method
    shape = (1, 3, *window)
    variants: list[Variant] = []
    for kind in kinds:
        if kind == "unreduced":
            plain = dataclasses.replace(cfg, weights=None, method="none", method_options={})
            gflops = count_flops(_build(plain), shape).gflops

            def unreduced(raw: Any) -> ForwardResult:
                model.method = None
                try:
                    with torch.no_grad():
                        return ForwardResult(model(_normalise(raw, spec.mean, spec.std))[0])
                finally:
                    model.method = static_method

            variants.append(Variant("unreduced", kind, window, cfg.classes, unreduced, gflops))
        elif kind == "reference":
            from staticprune.bench.suite import count_flops_call
            from staticprune.reference import reference_module

            try:
                ref = reference_module(method)
            except ValueError as exc:
                raise UsageError(f"variant 'reference': {exc}") from None

            def reference(raw: Any, ref: Any = ref) -> ForwardResult:
                holder: dict[str, Any] = {}

                def run() -> None:
                    holder["out"] = ref.reference_forward(model, _normalise(raw, spec.mean, spec.std),
                                                          cfg.method_options)

                gflops = count_flops_call(run)  # counted on this run: the reference's cost depends on the image
                out = holder["out"]
                return ForwardResult(out.logits, gflops=gflops,
                                     kept={p: int(c[0]) for p, c in out.kept.items()})

            variants.append(Variant("reference", kind, window, cfg.classes, reference, None,
                                    "mean over its runs (data-dependent)"))
        else:
            gflops = count_flops(_build(dataclasses.replace(module_cfg, weights=None)), shape).gflops
            probe = OverflowProbe(static_method)

            def static(raw: Any, probe: OverflowProbe = probe) -> ForwardResult:
                probe.increments = {}
                model.method = probe.module
                try:
                    with torch.no_grad():
                        outputs = model(_normalise(raw, spec.mean, spec.std))
                finally:
                    model.method = static_method
                names = model.output_names()
                total = int(outputs[names.index("overflow")].reshape(-1)[0]) if "overflow" in names else 0
                return ForwardResult(outputs[0], overflow={"total": total, **probe.increments})

            variants.append(Variant("static", kind, window, cfg.classes, static, gflops))
    return variants


# --------------------------------------------------------------------------------------------- graphs, engines


def check_graph_path(kind: str, path: str) -> None:
    """Before any model is built: the file exists, and an engine has TensorRT to run it."""
    label = f"{kind}:{path}"
    if not Path(path).exists():
        raise UsageError(f"variant '{label}': '{path}' does not exist")
    if kind == "engine" and importlib.util.find_spec("tensorrt") is None:
        raise UsageError(f"variant '{label}' needs TensorRT (the Python package 'tensorrt' is not installed here); "
                         "run evaluate on the device, or evaluate the ONNX graph with onnx:PATH")


def graph_variant(kind: str, path: str, threads: Optional[int], expected_classes: Optional[int]) -> Variant:
    import torch

    from staticprune.runtime.runner import open_runner

    label = f"{kind}:{path}"
    check_graph_path(kind, path)
    runner = open_runner(path, threads=threads)
    if expected_classes is not None and runner.num_classes != expected_classes:
        raise UsageError(f"variant '{label}' predicts {runner.num_classes} classes, the other variants "
                         f"{expected_classes}: evaluate graphs of one model together")
    batch = int(getattr(runner, "batch", 1) or 1)
    mean, std, raw_input = runner.mean, runner.std, runner.raw_input

    def forward(raw: Any) -> ForwardResult:
        x = raw if raw_input else _normalise(raw, mean, std)
        feed = x.numpy().astype(np.float32)
        if batch > 1:  # a fixed-batch graph: the window in every slot, the first result kept
            feed = np.repeat(feed, batch, axis=0)
        got = runner.run(np.ascontiguousarray(feed))
        overflow = None
        if "overflow" in got:
            row = np.asarray(got["overflow"])[0].reshape(-1)
            overflow = {"total": int(row.sum())}
            if row.size > 1:
                names = getattr(runner, "overflow_points", None) or [f"point {i + 1}" for i in range(row.size)]
                overflow.update({str(n): int(v) for n, v in zip(names, row)})
        return ForwardResult(torch.from_numpy(np.asarray(got["logits"])[:1].astype(np.float32)), overflow=overflow)

    gflops, note = _graph_gflops(kind, path)
    return Variant(label, kind, tuple(runner.size), runner.num_classes, forward, gflops, note)


def _graph_gflops(kind: str, path: str) -> tuple[Optional[float], str]:
    """GFLOPs of the module a graph or engine was exported from, rebuilt from its recorded configuration."""
    config = _recorded_config(kind, path)
    if config is None:
        return None, "n/a (no staticprune configuration recorded)"
    try:
        from staticprune.bench import count_flops
        from staticprune.cli import _build

        cfg = dataclasses.replace(config, weights=None, precision="fp32", batch=1, labels=False, raw_input=False)
        return count_flops(_build(cfg), (1, 3, *cfg.size)).gflops, "of the module it was exported from"
    except Exception as exc:  # a report column, never a reason to stop an evaluation
        return None, f"n/a ({type(exc).__name__})"


def _recorded_config(kind: str, path: str) -> Any:
    from staticprune.pipeline import ModelConfig

    try:
        if kind == "onnx":
            import onnx

            from staticprune.pipeline import read_config

            return read_config(onnx.load(path, load_external_data=False))
        sidecar = Path(path + ".json")
        if sidecar.is_file():
            data = json.loads(sidecar.read_text()).get("config") or {}
            return ModelConfig.from_json(json.dumps(data)) if data.get("model") else None
    except Exception:
        return None
    return None


# --------------------------------------------------------------------------------------------- results


@dataclass
class Tally:
    """What one variant accumulates over the dataset."""

    confusion: Any
    agree: int = 0
    agree_pixels: int = 0
    forwards: int = 0
    seconds: float = 0.0
    gflops_runs: list[float] = field(default_factory=list)
    kept: dict[str, list[int]] = field(default_factory=dict)
    overflow_images: dict[str, int] = field(default_factory=dict)  # point -> images with overflow > 0
    overflow_sum: dict[str, int] = field(default_factory=dict)  # point -> tokens over capacity, all forwards
    has_overflow_output: bool = False


def parse_variants(text: Optional[str], method: Optional[str]) -> list[tuple[str, Optional[str]]]:
    """[(kind, path)]: unreduced, reference, static, onnx:PATH, engine:PATH (comma separated)."""
    if not text:
        kinds = ["unreduced"] + (["reference", "static"] if method not in (None, "", "none") else [])
        return [(k, None) for k in kinds]
    out: list[tuple[str, Optional[str]]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        kind, _, path = item.partition(":")
        if kind in TORCH_KINDS and not path:
            entry: tuple[str, Optional[str]] = (kind, None)
        elif kind in ("onnx", "engine") and path:
            entry = (kind, path)
        else:
            raise UsageError(f"variant '{item}' is not one of unreduced, reference, static, onnx:PATH, engine:PATH")
        if entry in out:
            raise UsageError(f"variant '{item}' is given twice")
        out.append(entry)
    if not out:
        raise UsageError("--variants is empty; give e.g. unreduced,reference,static,onnx:seg.onnx")
    return out


def _stride(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    from staticprune.cli import parse_pair

    return parse_pair(text, "--stride", "pixels")


def _sizes(windows: set) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sorted(windows))


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def name_points(variants: list[Variant], tallies: dict[str, Tally]) -> None:
    """Give the static module's reduction points the eager reference's names (clap, gbm, layer3, ...) when both
    list the same number of points, in order."""
    ref = next((tallies[v.label] for v in variants if v.kind == "reference"), None)
    if ref is None or not ref.kept:
        return
    names = list(ref.kept)
    for v in variants:
        t = tallies[v.label]
        if v.kind != "static":
            continue
        probed = sorted((p for p in t.overflow_sum if p != "total"), key=point_order)
        if len(probed) != len(names):
            continue
        rename = dict(zip(probed, names))
        t.overflow_sum = {rename.get(p, p): c for p, c in t.overflow_sum.items()}
        t.overflow_images = {rename.get(p, p): c for p, c in t.overflow_images.items()}


def summarise(variants: list[Variant], tallies: dict[str, Tally], images: int) -> list[dict]:
    name_points(variants, tallies)
    rows = []
    for v in variants:
        t = tallies[v.label]
        scores = t.confusion.scores()
        gflops = (sum(t.gflops_runs) / len(t.gflops_runs)) if t.gflops_runs else v.gflops
        overflow = None
        if t.has_overflow_output:
            points = list(t.overflow_sum)
            overflow = {p: {"image_rate": t.overflow_images.get(p, 0) / images if images else 0.0,
                            "mean_tokens": t.overflow_sum[p] / t.forwards if t.forwards else 0.0} for p in points}
        rows.append({
            "variant": v.label, "kind": v.kind, "window": list(v.window), **scores.to_dict(),
            "gflops_per_forward": gflops, "gflops_note": v.gflops_note,
            "agreement_with_reference": (t.agree / t.agree_pixels) if t.agree_pixels else None,
            "overflow": overflow, "forwards": t.forwards, "seconds_per_image": t.seconds / images if images else None,
            "reference_kept_mean": {p: sum(c) / len(c) for p, c in t.kept.items()} or None,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| variant | mIoU % | pixel acc % | mean acc % | GFLOPs / forward | agreement with reference % | "
            "images with overflow % | mean overflow tokens | s / image |")
    lines = [head, "| " + " | ".join(["---"] * 9) + " |"]
    for r in rows:
        total = (r["overflow"] or {}).get("total")
        gflops = r["gflops_per_forward"]
        cells = [r["variant"], _pct(r["miou"]), _pct(r["pixel_accuracy"]), _pct(r["mean_accuracy"]),
                 "n/a" if gflops is None else f"{gflops:.2f}",
                 "-" if r["kind"] == "reference" else _pct(r["agreement_with_reference"]),
                 "-" if total is None else _pct(total["image_rate"]),
                 "-" if total is None else f"{total['mean_tokens']:.2f}",
                 f"{r['seconds_per_image']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    points = [(r["variant"], p, o) for r in rows for p, o in (r["overflow"] or {}).items() if p != "total"]
    if points:
        lines += ["", "| variant | reduction point | images with overflow % | mean overflow tokens |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {v} | {p} | {_pct(o['image_rate'])} | {o['mean_tokens']:.2f} |" for v, p, o in points]
    return "\n".join(lines)


def plot(rows: list[dict], title: str) -> Optional[bytes]:
    """PNG of mIoU against GFLOPs per forward, one point per variant with a GFLOPs count; None if there is none."""
    drawn = [r for r in rows if r["gflops_per_forward"] is not None and not math.isnan(r["miou"])]
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points: dict[tuple[float, float], list[str]] = {}  # variants on the same point share one label
    for r in drawn:
        points.setdefault((round(r["gflops_per_forward"], 6), round(100 * r["miou"], 6)), []).append(r["variant"])
    for (gflops, miou), names in points.items():
        ax.scatter(gflops, miou, s=40)
        ax.annotate(" = ".join(names), (gflops, miou), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlim(left=0)
    ax.set_xlabel("GFLOPs per forward (fvcore convention; reference: mean over its runs)")
    ax.set_ylabel("mIoU %")
    missing = [r["variant"] for r in rows if r not in drawn]
    ax.set_title(title + (f"\nnot drawn (no GFLOPs): {', '.join(missing)}" if missing else ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- command


def _model_config_for(args: argparse.Namespace, graphs: list[tuple[str, str]]) -> Any:
    """The configuration of the PyTorch variants: from the model flags, else from the first graph that records
    one (as verify does)."""
    from staticprune.cli import _config_from_onnx, _model_config, _refuse_flags_the_graph_decides

    if args.model or args.size:
        if not (args.model and args.size):
            raise UsageError("give both --model and --size (or neither, to read them from an onnx: variant)")
        args.labels = False
        return _model_config(args)
    for kind, path in graphs:
        if kind != "onnx" or not path.endswith(".onnx"):
            continue
        from staticprune.cli import _load_onnx

        proto = _load_onnx(path)
        graph_args = argparse.Namespace(**{**vars(args), "onnx": path})
        _refuse_flags_the_graph_decides(proto, graph_args)
        return _config_from_onnx(proto, graph_args)
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from staticprune.cli import _at_least
    from staticprune.metrics import ConfusionMatrix

    if args.limit is not None:
        _at_least(args.limit, 1, "--limit")
    if args.short_side is not None:
        _at_least(args.short_side, 0, "--short-side")
    if args.threads is not None:
        _at_least(args.threads, 1, "--threads")
    if args.mode == "resize" and (args.stride or args.short_side is not None):
        raise UsageError("--stride and --short-side are for --mode slide; --mode resize resizes the whole image "
                         "to the model's size")
    if args.batch != 1:
        raise UsageError("--batch has no effect: evaluate runs one window at a time (a graph's fixed batch is read "
                         "from the graph)")
    stride_arg = _stride(args.stride)
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        from staticprune.cli import _check_writable

        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"-o '{out_dir}' is a file; give a directory")
        _check_writable(str(out_dir / "results.json"), "-o")
    dataset = find_dataset(args.layout, args.root, args.split, args.images, args.labels, args.ignore_index)
    samples = dataset.samples[: args.limit] if args.limit else dataset.samples
    check_sizes(Dataset(dataset.layout, samples, dataset.ignore_index, dataset.shift_labels, dataset.description))
    requested = parse_variants(args.variants, args.method)
    graphs = [(k, p) for k, p in requested if p is not None]
    for kind, path in graphs:
        check_graph_path(kind, path)
    torch_kinds = [k for k, p in requested if p is None]
    if args.threads:
        torch.set_num_threads(args.threads)

    if not torch_kinds:
        given = [flag for flag, value in (("--model", args.model), ("--size", args.size), ("--method", args.method),
                                          ("--weights", args.weights), ("--config", args.config), ("--opt", args.opt))
                 if value]
        if given:
            raise UsageError(f"{given[0]} has no effect: it describes the PyTorch variants (unreduced, reference, "
                             "static), and --variants lists only graphs, which record their own model")
    cfg = _model_config_for(args, graphs) if torch_kinds else None
    if torch_kinds and cfg is None:
        raise UsageError(f"variant(s) {', '.join(torch_kinds)} need the model: give --model and --size (with "
                         "--weights, --method, --opt/--config), or an onnx: variant whose graph records them")
    if cfg is not None:
        cfg = dataclasses.replace(cfg, batch=1, labels=False, raw_input=False, precision="fp32",
                                  decompose_layernorm=False)
        no_method = cfg.method in ("none", "", None)
        for kind in ("reference", "static"):
            if kind in torch_kinds and no_method:
                raise UsageError(f"variant '{kind}' needs a method: add --method NAME (and its --opt/--config), or "
                                 "drop it from --variants")
    variants: list[Variant] = []
    classes = cfg.classes if cfg is not None else None
    if torch_kinds:
        from staticprune.cli import step

        with step(f"building {cfg.model} {cfg.size[0]}x{cfg.size[1]} method={cfg.method} "
                  f"({', '.join(torch_kinds)})"):
            variants += torch_variants(torch_kinds, cfg, tuple(cfg.size))
            classes = cfg.classes = variants[-1].num_classes
    for kind, path in graphs:
        variants.append(graph_variant(kind, path, args.threads, classes))
        classes = variants[-1].num_classes
    order = {label: i for i, label in enumerate(k if p is None else f"{k}:{p}" for k, p in requested)}
    variants.sort(key=lambda v: order[v.label])
    num_classes = variants[0].num_classes
    mode = args.mode
    short_side = args.short_side

    tallies = {v.label: Tally(ConfusionMatrix(num_classes, dataset.ignore_index)) for v in variants}
    reference = next((v for v in variants if v.kind == "reference"), None)
    started = time.perf_counter()
    per_image: list[dict] = []
    for i, sample in enumerate(samples):
        rgb, truth = read_sample(dataset, sample)
        raw = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()
        predictions: dict[str, np.ndarray] = {}
        notes = []
        record: dict[str, Any] = {"name": sample.name, "size": list(truth.shape)}
        for v in variants:
            t = tallies[v.label]
            overflow_here: dict[str, int] = {}

            def on_forward(out: ForwardResult, t: Tally = t, overflow_here: dict = overflow_here) -> None:
                t.forwards += 1
                if out.gflops is not None:
                    t.gflops_runs.append(out.gflops)
                for p, c in (out.kept or {}).items():
                    t.kept.setdefault(p, []).append(c)
                if out.overflow is not None:
                    t.has_overflow_output = True
                    for p, c in out.overflow.items():
                        t.overflow_sum[p] = t.overflow_sum.get(p, 0) + c
                        overflow_here[p] = max(overflow_here.get(p, 0), c)

            window = v.window
            stride = stride_arg or (max(1, window[0] - STRIDE_OVERLAP), max(1, window[1] - STRIDE_OVERLAP))
            side = short_side if short_side is not None else DEFAULT_SHORT_SIDE.get(dataset.layout, min(window))
            t0 = time.perf_counter()
            labels = predict(v, raw, mode, stride, side, on_forward)
            t.seconds += time.perf_counter() - t0
            for p, c in overflow_here.items():
                t.overflow_images[p] = t.overflow_images.get(p, 0) + (1 if c > 0 else 0)
            try:
                t.confusion.update(labels, truth)
            except ValueError as exc:
                raise UsageError(f"label map '{sample.label}': {exc} (give the model's --classes, or the layout's "
                                 "label encoding)") from None
            predictions[v.label] = labels
            notes.append(f"{v.label} {time.perf_counter() - t0:.1f} s"
                         + (f" overflow {overflow_here.get('total', 0)}" if overflow_here else ""))
            counted = truth != dataset.ignore_index
            record[v.label] = {"pixel_accuracy": float((labels[counted] == truth[counted]).mean())
                               if counted.any() else None,
                               "overflow": overflow_here.get("total") if overflow_here else None}
        if reference is not None:
            for v in variants:
                if v is not reference:
                    tallies[v.label].agree += int((predictions[v.label] == predictions[reference.label]).sum())
                    tallies[v.label].agree_pixels += truth.size
        per_image.append(record)
        log(f"[evaluate] {i + 1}/{len(samples)} {sample.name} ({truth.shape[0]}x{truth.shape[1]}): "
            + ", ".join(notes) + f" ({time.perf_counter() - started:.1f} s)")

    rows = summarise(variants, tallies, len(samples))
    table = format_table(rows)
    stride_text = ("window - 32" if stride_arg is None else f"{stride_arg[0]}x{stride_arg[1]}")
    windows = {v.window for v in variants}
    default_side = DEFAULT_SHORT_SIDE.get(dataset.layout) or (
        min(next(iter(windows))) if len(windows) == 1 else "each window's short side")
    side_text = str(short_side if short_side is not None else default_side) + (" (keep)" if short_side == 0 else "")
    setup = (f"{len(samples)} image(s) of {dataset.description}, {num_classes} classes, ignore {dataset.ignore_index}; "
             + (f"mode slide (window {_sizes(windows)}, short side {side_text}, stride {stride_text})" if mode == "slide"
                else f"mode resize (to {_sizes(windows)})"))
    print(setup)
    if cfg is not None:
        print(f"model {cfg.model} {cfg.size[0]}x{cfg.size[1]}, method {cfg.method}"
              + (f" {json.dumps(cfg.method_options, sort_keys=True)}" if cfg.method_options else "")
              + (f", weights {cfg.weights}" if cfg.weights else ", random weights"))
    print(table)
    if out_dir is not None:
        from staticprune.fileio import write_bytes_atomic

        payload = {"setup": setup, "dataset": {"layout": dataset.layout, "description": dataset.description,
                                               "images": len(samples), "ignore_index": dataset.ignore_index},
                   "mode": mode, "stride": list(stride_arg) if stride_arg else f"window - {STRIDE_OVERLAP}",
                   "short_side": short_side if short_side is not None else side_text,
                   "config": json.loads(cfg.to_json()) if cfg is not None else None,
                   "num_classes": num_classes, "variants": rows, "per_image": per_image}
        write_bytes_atomic((json.dumps(payload, indent=2) + "\n").encode(), out_dir / "results.json")
        markdown = f"# staticprune evaluate\n\n{setup}\n\n{table}\n"
        write_bytes_atomic(markdown.encode(), out_dir / "results.md")
        picture = plot(rows, setup.split(";")[0])
        if picture is not None:
            write_bytes_atomic(picture, out_dir / "miou_vs_gflops.png")
        log(f"[staticprune] wrote {out_dir}/results.json, results.md"
            + (", miou_vs_gflops.png" if picture is not None else ""))
    return 0


def add_parser(sub: Any) -> None:
    from staticprune.cli import _add_model_args

    p = sub.add_parser("evaluate", help="mIoU of unreduced / reference / static / ONNX / engine on a labelled dataset")
    p.add_argument("--layout", required=True, choices=LAYOUTS,
                   help="cityscapes: ROOT/leftImg8bit/SPLIT/*/*_leftImg8bit.png + gtFine/SPLIT/*/*_labelTrainIds.png; "
                        "ade20k: ROOT/images/SPLIT/*.jpg + annotations/SPLIT/*.png (0 = ignore, ids shifted by one); "
                        "pairs: --images DIR --labels DIR matched by file stem")
    p.add_argument("--root", help="dataset folder (cityscapes, ade20k)")
    p.add_argument("--split", help="cityscapes: val (default), train, test; ade20k: validation (default), training")
    p.add_argument("--images", help="pairs: directory of images")
    p.add_argument("--labels", help="pairs: directory of single-channel PNG label maps (class ids)")
    p.add_argument("--ignore-index", type=int, default=None, help="pairs: label id not scored (default 255)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images (sorted by name)")
    p.add_argument("--variants", help="comma list of unreduced, reference, static, onnx:PATH, engine:PATH "
                                      "(default: unreduced, plus reference and static when a method is given)")
    p.add_argument("--mode", choices=("slide", "resize"), default="slide",
                   help="slide (default, Segmenter's evaluation): windows of the model's size; resize: whole image "
                        "resized to the model's size")
    p.add_argument("--stride", help="slide: window stride in pixels, N or HxW (default: window - 32, Segmenter's "
                                    "evaluation script)")
    p.add_argument("--short-side", type=int, default=None,
                   help="slide: rescale images to this short side first (default: the window's short side; 1024 "
                        "for cityscapes; 0 = keep); images are enlarged further when the window would not fit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("-o", "--output-dir", help="write results.json, results.md and miou_vs_gflops.png here")
    _add_model_args(p, required=False)
    p.set_defaults(func=cmd_evaluate)
