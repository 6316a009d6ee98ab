#!/usr/bin/env python3
"""Segment one image with a staticprune model served by Triton Inference Server (HTTP).

    pip install "tritonclient[http]" pillow numpy
    python triton_client.py street.png --model seg --meta model_repository/seg/staticprune.json -o labels.png

`staticprune.json` is written into the model folder by `staticprune triton-repo`: it records the input name, size,
data type, batch and normalisation (mean/std, or raw 0..255 input) of the graph, so the request matches it exactly.
The client writes the class map as a PNG (palette image, pixel value = class index; 16-bit grayscale above 256
classes) and prints the `overflow` output: the tokens a capacity could not hold, per reduction point (0 everywhere
means the static graph computed exactly what the method would have on this image).

Only numpy and Pillow are needed to prepare the request (`prepare_image`, `request_tensors`), so those parts run and
are tested without a server or tritonclient.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

NUMPY_TYPE = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8, "INT8": np.int8,
              "INT32": np.int32, "INT64": np.int64}


class RequestTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    datatype: str  # Triton wire type: FP32, FP16, ...
    data: np.ndarray


def load_manifest(path: str | Path) -> dict[str, Any]:
    manifest = json.loads(Path(path).read_text())
    for key in ("name", "inputs", "outputs", "image_input", "size", "max_batch_size"):
        if key not in manifest:
            raise ValueError(f"'{path}' has no '{key}': not a staticprune.json written by 'staticprune triton-repo'")
    return manifest


def prepare_image(path: str | Path, manifest: dict[str, Any]) -> np.ndarray:
    """The image as the graph takes it: RGB resized (bilinear) to the graph's size, (1, 3, H, W) float32, scaled to
    [0, 1] and normalised with the recorded mean/std, or left in 0..255 for a raw-input graph."""
    from PIL import Image

    h, w = (int(v) for v in manifest["size"])
    rgb = Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR)
    x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    if not manifest.get("raw_input", False):
        if manifest.get("mean") is None or manifest.get("std") is None:
            raise ValueError("the graph records no mean/std; normalise the image yourself and send it as a .npy")
        mean = np.asarray(manifest["mean"], np.float32)[:, None, None]
        std = np.asarray(manifest["std"], np.float32)[:, None, None]
        x = (x / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x[None], dtype=np.float32)


def request_tensors(image: np.ndarray, manifest: dict[str, Any]) -> list[RequestTensor]:
    """The request's input tensors: the image in the input's data type, repeated to a fixed batch (graphs with
    max_batch_size 0 take their full shape, batch included), or sent as a batch of 1 under dynamic batching."""
    spec = next(t for t in manifest["inputs"] if t["name"] == manifest["image_input"])
    if len(manifest["inputs"]) != 1:
        raise ValueError(f"model '{manifest['name']}' has {len(manifest['inputs'])} inputs; this client sends one "
                         "image")
    shape = [int(d) for d in spec["shape"]]
    batch = shape[0] if manifest["max_batch_size"] == 0 and shape[0] > 0 else 1
    data = np.repeat(image, batch, axis=0) if image.shape[0] != batch else image
    if any(d > 0 and d != g for d, g in zip(shape[1:], data.shape[1:])):
        raise ValueError(f"image tensor {tuple(data.shape)} does not fit input '{spec['name']}' {tuple(shape)}")
    data = np.ascontiguousarray(data, dtype=NUMPY_TYPE[spec["datatype"]])
    return [RequestTensor(spec["name"], tuple(data.shape), spec["datatype"], data)]


def class_map(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """(B, H, W) class indices: the graph's `labels` output, else the argmax of `logits` over classes."""
    if "labels" in outputs:
        return outputs["labels"].astype(np.int64)
    return outputs["logits"].argmax(axis=1)


def save_class_map(labels: np.ndarray, path: str | Path, num_classes: int) -> None:
    """First image of the batch as a PNG: 8-bit palette (value = class) up to 256 classes, 16-bit gray above."""
    from PIL import Image

    first = labels[0]
    if num_classes <= 256:
        img = Image.fromarray(first.astype(np.uint8), mode="P")
        rng = np.random.default_rng(0)  # a fixed, distinct colour per class for viewing
        img.putpalette(rng.integers(0, 256, (256, 3), dtype=np.uint8).flatten().tolist())
    else:
        img = Image.fromarray(first.astype(np.uint16))
    img.save(path)


def overflow_summary(outputs: dict[str, np.ndarray]) -> Optional[str]:
    if "overflow" not in outputs:
        return None
    counts = outputs["overflow"].reshape(outputs["overflow"].shape[0], -1)
    if not counts.any():
        return "overflow: 0 (every capacity held the tokens the method kept)"
    per_image = "; ".join(f"image {i}: {row.tolist()} token(s) per reduction point" for i, row in enumerate(counts))
    return f"overflow: {per_image} (a capacity was too small on this image: calibrate it on your images)"


def infer(url: str, manifest: dict[str, Any], tensors: Sequence[RequestTensor]) -> dict[str, np.ndarray]:
    import tritonclient.http as httpclient  # pip install "tritonclient[http]"

    client = httpclient.InferenceServerClient(url=url)
    inputs = []
    for t in tensors:
        item = httpclient.InferInput(t.name, list(t.shape), t.datatype)
        item.set_data_from_numpy(t.data)
        inputs.append(item)
    wanted = [o["name"] for o in manifest["outputs"] if o["name"] in ("logits", "labels", "overflow")]
    if "labels" in wanted:  # the class map is computed by the graph: do not ship K x H x W floats back
        wanted = [n for n in wanted if n != "logits"]
    result = client.infer(manifest["name"], inputs, outputs=[httpclient.InferRequestedOutput(n) for n in wanted])
    return {n: result.as_numpy(n) for n in wanted}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--meta", required=True, help="REPO/NAME/staticprune.json written by staticprune triton-repo")
    parser.add_argument("--model", help="model name on the server (default: the manifest's)")
    parser.add_argument("--url", default="localhost:8000", help="Triton HTTP endpoint (default localhost:8000)")
    parser.add_argument("-o", "--output", default="labels.png", help="class map PNG (default labels.png)")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.meta)
        if args.model:
            manifest["name"] = args.model
        tensors = request_tensors(prepare_image(args.image, manifest), manifest)
    except (OSError, ValueError) as exc:
        print(f"triton_client: error: {exc}", file=sys.stderr)
        return 2
    outputs = infer(args.url, manifest, tensors)
    labels = class_map(outputs)
    save_class_map(labels, args.output, int(manifest.get("num_classes") or labels.max() + 1))
    print(f"wrote {args.output}")
    summary = overflow_summary(outputs)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
