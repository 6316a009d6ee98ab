"""`staticprune predict GRAPH INPUT... -o OUT`: label maps, colour overlays and a summary for a folder of images.

Torch-free (numpy, Pillow, onnxruntime or TensorRT), so it runs on the Jetson image. The geometry helpers
(`placement`, `prepare_input`, `labels_at_original`) are importable for other commands.

Resize policy. The graph has one fixed input size. `stretch` (default) resizes the image to it bilinearly, as
`verify --input` and `calibrate` do, so the overflow counts printed here are the ones those commands measure;
`letterbox` keeps the aspect ratio: the image is scaled to fit, centred, and the rest is filled with the mean
colour (0 after normalisation); the padding's labels are cropped away. Labels at the original size: the logits of
the image's region are resampled bilinearly (half-pixel centres, like torch's `interpolate(..., "bilinear",
align_corners=False)`) to the original size and then arg-maxed, which is how Segmenter and mmsegmentation
evaluate; `--upsample nearest` maps the graph's own label map (its `labels` output, else the argmax of its logits)
with nearest neighbour instead, cheaper for many classes at large sizes.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from staticprune.runtime import usage_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
GLOB_CHARS = ("*", "?", "[")
SUMMARY_JSON, SUMMARY_CSV = "summary.json", "summary.csv"
RESAMPLE_BUDGET = 1 << 23  # float32 elements per chunk of resampled logits (32 MiB): bounds memory at any size




# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Placement:
    """Where the image lies in the graph input: rows top..top+height, columns left..left+width."""
    top: int
    left: int
    height: int
    width: int


def placement(original: tuple[int, int], graph: tuple[int, int], resize: str) -> Placement:
    """stretch: the whole input. letterbox: the largest aspect-preserving fit, centred (odd padding: the extra
    row/column goes below/right)."""
    if resize == "stretch":
        return Placement(0, 0, graph[0], graph[1])
    scale = min(graph[0] / original[0], graph[1] / original[1])
    height = min(graph[0], max(1, round(original[0] * scale)))
    width = min(graph[1], max(1, round(original[1] * scale)))
    return Placement((graph[0] - height) // 2, (graph[1] - width) // 2, height, width)


def prepare_input(rgb: np.ndarray, graph: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                  raw_input: bool, resize: str) -> tuple[np.ndarray, Placement]:
    """(H0, W0, 3) uint8 RGB -> the (3, H, W) float32 graph input and where the image lies in it.

    Resizing is Pillow's bilinear filter, as staticprune.imageio does for verify and calibrate. Letterbox padding is
    the mean colour: exactly 0 after normalisation (mean x 255 for raw-input graphs)."""
    from PIL import Image

    place = placement(rgb.shape[:2], graph, resize)
    resized = Image.fromarray(rgb).resize((place.width, place.height), Image.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)
    mean32 = np.asarray(mean, np.float32)[:, None, None]
    std32 = np.asarray(std, np.float32)[:, None, None]
    if raw_input:
        canvas = np.broadcast_to(mean32 * np.float32(255.0), (3, *graph)).copy()
    else:
        canvas = np.zeros((3, *graph), dtype=np.float32)
        pixels = (pixels / np.float32(255.0) - mean32) / std32
    canvas[:, place.top:place.top + place.height, place.left:place.left + place.width] = pixels
    return canvas, place


def _source_positions(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps with half-pixel centres, clamped at the edges (align_corners=False): (low, high, weight)."""
    pos = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (pos - low).astype(np.float32)


def labels_at_original(logits: np.ndarray, place: Placement, original: tuple[int, int]) -> np.ndarray:
    """(K, H, W) logits -> (H0, W0) int32 labels: the image's region resampled bilinearly to the original size,
    then argmax over classes (first class on ties).

    Exact without resampling every class at every pixel: an output pixel is a convex combination of its 2x2
    source pixels, so where those four share one argmax, the combination's argmax is that class. Only the other
    pixels (near label borders) are interpolated in full, in chunks that bound memory."""
    region = np.ascontiguousarray(logits[:, place.top:place.top + place.height, place.left:place.left + place.width],
                                  dtype=np.float32)
    k, h, w = region.shape
    rows_low, rows_high, rows_t = _source_positions(h, original[0])
    cols_low, cols_high, cols_t = _source_positions(w, original[1])
    source = argmax_classes(region)
    labels = source[rows_low][:, cols_low]
    mixed = ((labels != source[rows_low][:, cols_high]) | (labels != source[rows_high][:, cols_low])
             | (labels != source[rows_high][:, cols_high]))
    ys, xs = np.nonzero(mixed)
    flat = region.reshape(k, h * w)
    chunk = max(1, RESAMPLE_BUDGET // (8 * k))
    for start in range(0, len(ys), chunk):
        y, x = ys[start:start + chunk], xs[start:start + chunk]
        corners = [rows_low[y] * w + cols_low[x], rows_low[y] * w + cols_high[x],
                   rows_high[y] * w + cols_low[x], rows_high[y] * w + cols_high[x]]
        needed = np.unique(np.concatenate(corners))
        pixels = np.ascontiguousarray(flat[:, needed].T)  # (n, K): the source pixels these outputs mix
        v00, v01, v10, v11 = (pixels[np.searchsorted(needed, c)] for c in corners)
        ty, tx = rows_t[y][:, None], cols_t[x][:, None]
        # the order of torch's bilinear kernel: along each row of the 2x2 first, then between the rows
        top = v00 * (1 - tx) + v01 * tx
        bottom = v10 * (1 - tx) + v11 * tx
        labels[y, x] = (top * (1 - ty) + bottom * ty).argmax(axis=1)
    return labels


def argmax_classes(logits: np.ndarray) -> np.ndarray:
    """(K, H, W) -> (H, W) int32 argmax over classes, first class on ties (numpy's argmax along a leading axis is
    several times slower than this running maximum)."""
    best = logits[0].astype(np.float32, copy=True)
    labels = np.zeros(best.shape, dtype=np.int32)
    for k in range(1, logits.shape[0]):
        np.putmask(labels, logits[k] > best, k)
        np.maximum(best, logits[k], out=best)
    return labels


def nearest_labels(graph_labels: np.ndarray, place: Placement, original: tuple[int, int]) -> np.ndarray:
    """(H, W) label map of the graph -> (H0, W0): each original pixel takes the label under its centre, in exact
    integer arithmetic (source = floor((2 y + 1) h / (2 H0))): a centre on a border takes the pixel after it."""
    rows = (2 * np.arange(original[0], dtype=np.int64) + 1) * place.height // (2 * original[0]) + place.top
    cols = (2 * np.arange(original[1], dtype=np.int64) + 1) * place.width // (2 * original[1]) + place.left
    return np.ascontiguousarray(graph_labels[rows[:, None], cols[None, :]], dtype=np.int32)


# --------------------------------------------------------------------------------------------- inputs


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def collect_inputs(items: Sequence[str]) -> list[Path]:
    """Image files from files, folders (searched recursively for image suffixes, hidden entries skipped) and glob
    patterns (`**` recurses), in the order given, each folder's and pattern's matches sorted, duplicates dropped."""
    found: list[Path] = []

    def from_folder(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and _is_image_name(p)
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))

    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = from_folder(path)
            if not matches:
                raise usage_error(f"folder '{item}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += matches
        elif path.is_file():
            found.append(path)
        elif any(c in item for c in GLOB_CHARS):
            matches = []
            for hit in sorted(glob.glob(item, recursive=True)):
                hit_path = Path(hit)
                if hit_path.is_dir():
                    matches += from_folder(hit_path)
                elif hit_path.is_file():
                    matches.append(hit_path)
            if not matches:
                raise usage_error(f"pattern '{item}' matched no images")
            found += matches
        else:
            raise usage_error(f"input '{item}' does not exist (give image files, folders or quoted glob patterns)")
    unique: list[Path] = []
    seen: set[Path] = set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    if not unique:
        raise usage_error("no images matched the inputs")
    return unique


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB as displayed (EXIF orientation applied; 16-bit images scaled to 8 bits). ValueError
    with one line when the file is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    from staticprune.imageio import as_displayed

    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(as_displayed(img), dtype=np.uint8)
    except Image.DecompressionBombError:
        raise ValueError(f"image '{path}' is too large to decode safely (over Pillow's decompression-bomb limit); "
                         "resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ValueError(f"'{path}' is not a readable image (png, jpg, ...)") from None


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Output names (file stems); two inputs with the same stem would overwrite each other's outputs."""
    owner: dict[str, Path] = {}
    for p in paths:
        if p.stem in owner:
            raise usage_error(f"'{owner[p.stem]}' and '{p}' would both write {p.stem}_labels.png; rename one or predict "
                         "them into separate folders")
        owner[p.stem] = p
    return [p.stem for p in paths]


# --------------------------------------------------------------------------------------------- outputs


def png_bytes(array: np.ndarray) -> bytes:
    """PNG at zlib level 3: on photo-like overlays 3x faster to write than Pillow's default 6, about 10 % larger."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def label_png(labels: np.ndarray, num_classes: int) -> bytes:
    """Class ids as a grayscale PNG: 8-bit for up to 256 classes, 16-bit beyond."""
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    return png_bytes(labels.astype(dtype))


def overflow_counts(outputs: dict[str, np.ndarray], index: int, points: Optional[list[str]]) -> tuple[int, dict]:
    """(total, {point: count}) of image `index` of the batch; the dict is empty when the graph gives one total."""
    if "overflow" not in outputs:
        return 0, {}
    row = np.asarray(outputs["overflow"])[index]
    if row.ndim == 0:
        return int(row), {}
    names = points if points and len(points) == row.shape[0] else [f"point{i}" for i in range(row.shape[0])]
    per_point = {name: int(v) for name, v in zip(names, row.reshape(-1))}
    return sum(per_point.values()), per_point


def _overflow_split(per_point: dict) -> str:
    split = [f"{name}: {count}" for name, count in per_point.items() if count]
    return f" ({', '.join(split)})" if split else ""


# --------------------------------------------------------------------------------------------- command


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="label maps and colour overlays for images (ONNX graph, engine or pipeline)",
                       description="Run an exported graph (ONNX Runtime), a TensorRT engine or a capacity-bucket "
                                   "pipeline on images; write OUT/<stem>_labels.png, OUT/<stem>_overlay.png and "
                                   "OUT/summary.json + summary.csv. Needs no PyTorch.")
    p.add_argument("graph", help="exported .onnx graph, .engine/.plan (TensorRT, with its .json sidecar) or a "
                                 "pipeline folder / pipeline.json")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, folder (searched recursively) or quoted glob pattern ('**' recurses)")
    p.add_argument("-o", "--output", required=True, help="output folder (created; existing outputs are replaced)")
    p.add_argument("--resize", choices=("stretch", "letterbox"), default="stretch",
                   help="fit the image to the graph's size: stretch (default, as verify/calibrate) or letterbox "
                        "(keep aspect ratio, pad with the mean colour)")
    p.add_argument("--upsample", choices=("bilinear", "nearest"), default="bilinear",
                   help="labels at the original size: bilinear = resample logits then argmax (default, as "
                        "Segmenter evaluates); nearest = nearest neighbour on the graph's label map")
    p.add_argument("--palette", default="auto",
                   help="auto (default: cityscapes up to 19 classes, ade20k up to 150, generated beyond), "
                        "cityscapes, ade20k, or a file with one 'r g b' or #rrggbb colour per class")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours, 0..1 "
                                                            "(default 0.5)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--fail-on-overflow", action="store_true",
                   help="exit 1 when a capacity overflowed on any image (outputs are still written)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-image progress lines (warnings still print)")
    p.set_defaults(func=cmd_predict)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_predict(args: argparse.Namespace) -> int:
    from staticprune.palettes import resolve_palette
    from staticprune.runtime.runner import open_runner

    if not 0.0 <= args.alpha <= 1.0:
        raise usage_error(f"--alpha must be in 0..1 (got {args.alpha})")
    if args.threads is not None and args.threads < 1:
        raise usage_error(f"--threads must be >= 1 (got {args.threads})")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise usage_error(f"output '{out}' is a file; give a folder for the label maps and overlays")
    blocker = next((parent for parent in out.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise usage_error(f"output '{out}' cannot be created: '{blocker}' is a file")
    if args.palette not in ("auto", "cityscapes", "ade20k"):
        try:
            resolve_palette(args.palette, 1)  # syntax now, the class count once the graph is open
        except ValueError as exc:
            raise usage_error(str(exc)) from None

    paths = collect_inputs(args.inputs)
    stems = output_stems(paths)
    sizes: list[tuple[int, int]] = []
    for path in paths:  # every image is decoded once before anything is written: a bad one stops the run clean
        try:
            sizes.append(read_rgb(path).shape[:2])
        except ValueError as exc:
            raise usage_error(str(exc)) from None

    runner = open_runner(args.graph, threads=args.threads)
    try:
        palette = resolve_palette(args.palette, runner.num_classes)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise usage_error(f"output folder '{out}' cannot be created ({exc.strerror or exc.__class__.__name__})") from None
    for note in getattr(runner, "notes", ()):  # after every check: bad input stays one line
        _log(f"staticprune: note: {note}")

    try:
        return _predict_all(args, runner, paths, stems, sizes, palette, out)
    finally:
        close = getattr(runner, "close", None)  # TensorRT and pipeline runners hold device memory
        if close is not None:
            close()


def _predict_all(args: argparse.Namespace, runner: Any, paths: list[Path], stems: list[str],
                 sizes: list[tuple[int, int]], palette: np.ndarray, out: Path) -> int:
    from staticprune.fileio import write_bytes_atomic
    from staticprune.palettes import overlay

    batch = int(getattr(runner, "batch", 1))
    points = getattr(runner, "overflow_points", None)
    records: list[dict[str, Any]] = []
    overflowed: list[str] = []
    total = len(paths)
    started = time.perf_counter()
    for first in range(0, total, batch):
        group = list(range(first, min(total, first + batch)))
        t0 = time.perf_counter()
        try:
            images = [read_rgb(paths[i]) for i in group]
        except ValueError as exc:  # decoded fine a moment ago: the file changed during the run
            raise usage_error(f"{exc} (it changed during the run; outputs of earlier images are complete)") from None
        prepared = [prepare_input(rgb, runner.size, runner.mean, runner.std, runner.raw_input, args.resize)
                    for rgb in images]
        arrays = [a for a, _ in prepared]
        arrays += [arrays[-1]] * (batch - len(arrays))  # a short last batch repeats its last image
        t1 = time.perf_counter()
        outputs = runner.run(np.stack(arrays))
        t2 = time.perf_counter()
        run_ms = (t2 - t1) * 1000.0 / len(group)
        buckets = dict(getattr(runner, "last_capacities", None) or {})  # capacity-bucket pipelines: the picked graphs
        for slot, i in enumerate(group):
            place = prepared[slot][1]
            t3 = time.perf_counter()
            if args.upsample == "nearest":
                graph_labels = (outputs["labels"][slot] if "labels" in outputs
                                else argmax_classes(outputs["logits"][slot]))
                labels = nearest_labels(graph_labels, place, sizes[i])
            else:
                labels = labels_at_original(outputs["logits"][slot], place, sizes[i])
            labels_path, overlay_path = out / f"{stems[i]}_labels.png", out / f"{stems[i]}_overlay.png"
            write_bytes_atomic(label_png(labels, runner.num_classes), labels_path)
            write_bytes_atomic(png_bytes(overlay(images[slot], labels, palette, args.alpha)), overlay_path)
            post_ms = (time.perf_counter() - t3) * 1000.0
            overflow_total, per_point = overflow_counts(outputs, slot, points)
            records.append({
                "input": str(paths[i]), "labels": labels_path.name, "overlay": overlay_path.name,
                "height": sizes[i][0], "width": sizes[i][1], "run_ms": round(run_ms, 3),
                "preprocess_ms": round((t1 - t0) * 1000.0 / len(group), 3), "postprocess_ms": round(post_ms, 3),
                "overflow": overflow_total, "overflow_per_point": per_point,
                "classes_present": np.flatnonzero(np.bincount(labels.ravel())).tolist(),
            })
            if buckets:
                records[-1]["buckets"] = buckets
            name = paths[i].name
            if not args.quiet:
                _log(f"[{i + 1}/{total}] {name}: {run_ms:.1f} ms, overflow {overflow_total}"
                     f"{_overflow_split(per_point)}")
            if overflow_total:
                overflowed.append(name)
                _log(f"staticprune: warning: capacity overflow on {name}: {overflow_total} token(s) beyond "
                     f"capacity{_overflow_split(per_point)}; the graph ran its capacity fallback there (raise the "
                     "capacity or recalibrate with 'staticprune calibrate')")
    wall_s = time.perf_counter() - started

    run_times = [r["run_ms"] for r in records]
    summary = {
        "graph": str(args.graph), "runner": type(runner).__name__, "size": list(runner.size),
        "batch": batch, "classes": runner.num_classes, "resize": args.resize, "upsample": args.upsample,
        "palette": args.palette, "alpha": args.alpha, "images": len(records), "wall_s": round(wall_s, 3),
        "run_ms_median": round(statistics.median(run_times), 3), "run_ms_min": round(min(run_times), 3),
        "overflowed_images": overflowed, "results": records,
    }
    write_bytes_atomic((json.dumps(summary, indent=2) + "\n").encode(), out / SUMMARY_JSON)
    write_bytes_atomic(_summary_csv(records, points), out / SUMMARY_CSV)
    print(f"wrote {len(records)} label map(s) and overlay(s), {SUMMARY_JSON} and {SUMMARY_CSV} to {out} "
          f"({args.resize}, {args.upsample}; run median {summary['run_ms_median']:.1f} ms, min "
          f"{summary['run_ms_min']:.1f} ms per image; {wall_s:.1f} s in all)")
    if overflowed:
        _log(f"staticprune: warning: {len(overflowed)} of {len(records)} image(s) overflowed a capacity: "
             + ", ".join(overflowed[:10]) + (", ..." if len(overflowed) > 10 else ""))
        if args.fail_on_overflow:
            return 1
    return 0


def _summary_csv(records: list[dict[str, Any]], points: Optional[list[str]]) -> bytes:
    point_names: list[str] = []
    for record in records:
        for name in record["overflow_per_point"]:
            if name not in point_names:
                point_names.append(name)
    columns = ["input", "labels", "overlay", "height", "width", "run_ms", "preprocess_ms", "postprocess_ms",
               "overflow"] + [f"overflow_{name}" for name in point_names]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in records:
        writer.writerow([r[c] for c in columns[:9]] + [r["overflow_per_point"].get(n, 0) for n in point_names])
    return buffer.getvalue().encode()
