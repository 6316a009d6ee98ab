"""`staticprune predict` and the runtime runner: labels are the graph's argmax mapped to the original image size,
overlays are at the original size, letterbox geometry, palettes, overflow reporting, input collection, bad input
(exit 2, nothing written) and the torch-free path.

References are computed independently of the command: the graph runs in its own ONNX Runtime session on inputs
read by staticprune.imageio (the path `verify --input` uses), and logits are resampled with torch's
`interpolate(bilinear, align_corners=False)` or label maps with Pillow's nearest filter."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cli_helpers import one_error_line, run_cli
from staticprune.commands.predict import (Placement, argmax_classes, label_png, labels_at_original, nearest_labels,
                                          placement, prepare_input)
from staticprune.imageio import load_input_array
from staticprune.palettes import ADE20K, CITYSCAPES, parse_palette, resolve_palette
from staticprune.runtime.ort import ort_session

SIZE = (64, 64)
CLASSES = 5


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    """ViT-T with ALGM at 64x64, 5 classes, with the int32 labels output; on noise its capacities overflow."""
    from staticprune.cli import main

    path = tmp_path_factory.mktemp("graph") / "algm.onnx"
    assert main(["export", "--model", "segmenter-vit-t-linear", "--size", "64x64", "--classes", str(CLASSES),
                 "--method", "algm", "--labels", "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Non-square images of other sizes than the graph's: noise, and a smooth scene (fewer near-ties)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in {"wide": (48, 80), "tall": (90, 40)}.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    yy, xx = np.mgrid[0:75, 0:110]
    scene = np.stack([(xx * 2.3) % 256, (yy * 3.1) % 256, ((xx + yy) * 1.7) % 256], axis=-1).astype(np.uint8)
    paths["scene"] = folder / "scene.png"
    Image.fromarray(scene).save(paths["scene"])
    return paths


def session_outputs(graph: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort_session(str(graph))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x})))


def graph_facts(graph: Path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
                      ["staticprune"])


def reference_labels(logits: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, top-1 minus top-2 margin) of (1, K, h, w) logits resampled to `size` by torch, bilinear."""
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(logits)), size=size, mode="bilinear",
                       align_corners=False)[0]
    top2 = up.topk(2, dim=0).values
    return up.argmax(0).numpy(), (top2[0] - top2[1]).numpy()


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --------------------------------------------------------------------------------------------- labels, overlays


def test_labels_are_the_graph_argmax_resampled_to_the_original_size(graph, images, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "predict", str(graph), str(images["wide"]), str(images["scene"]), "-o", str(out))
    assert code == 0, stdout
    meta = graph_facts(graph)
    for name in ("wide", "scene"):
        x = load_input_array(images[name], SIZE, meta["mean"], meta["std"])  # verify's loader: stretch, bilinear
        original = Image.open(images[name]).size[::-1]
        expected, margin = reference_labels(session_outputs(graph, x)["logits"], original)
        labels = read_png(out / f"{name}_labels.png")
        assert labels.dtype == np.uint8 and labels.shape == original
        differ = labels != expected
        # float rounding of two resampling implementations may only flip exact near-ties
        assert differ.sum() <= 2 and (margin[differ] < 1e-5).all(), (name, differ.sum(), margin[differ])
        assert len(np.unique(labels)) >= 2  # a real map, not a constant

        overlay = read_png(out / f"{name}_overlay.png")
        assert overlay.shape == (*original, 3)
        rgb = np.asarray(Image.open(images[name]).convert("RGB"), dtype=np.float32)
        blended = np.rint(0.5 * rgb + 0.5 * CITYSCAPES[labels].astype(np.float32))  # auto palette, 5 classes
        np.testing.assert_array_equal(overlay, blended.astype(np.uint8))


def test_at_the_graph_size_the_label_map_is_exactly_the_graph_argmax(graph, tmp_path, capsys):
    rng = np.random.default_rng(3)
    path = tmp_path / "square.png"
    Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(path)
    meta = graph_facts(graph)
    expected = session_outputs(graph, load_input_array(path, SIZE, meta["mean"], meta["std"]))
    for upsample in ("bilinear", "nearest"):
        out = tmp_path / upsample
        assert run_cli(capsys, "predict", str(graph), str(path), "-o", str(out), "--upsample", upsample)[0] == 0
        labels = read_png(out / "square_labels.png")
        np.testing.assert_array_equal(labels, expected["logits"][0].argmax(0))
        np.testing.assert_array_equal(labels, expected["labels"][0])  # the graph's own int32 argmax


def test_nearest_upsampling_maps_the_graphs_label_output(graph, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, "predict", str(graph), str(images["tall"]), "-o", str(out), "--upsample", "nearest")[0] == 0
    meta = graph_facts(graph)
    graph_labels = session_outputs(graph, load_input_array(images["tall"], SIZE, meta["mean"], meta["std"]))["labels"]
    # the label under each original pixel centre: source index floor((2 y + 1) x 64 / (2 x 90)), exact
    rows = [int(np.floor((y + 0.5) * 64 / 90 + 1e-9)) for y in range(90)]
    cols = [int(np.floor((x + 0.5) * 64 / 40 + 1e-9)) for x in range(40)]
    expected = graph_labels[0][np.ix_(rows, cols)]
    np.testing.assert_array_equal(read_png(out / "tall_labels.png"), expected)
    # Pillow's nearest filter agrees except where a pixel centre falls exactly on a source border (it rounds down)
    pillow = np.asarray(Image.fromarray(graph_labels[0].astype(np.uint8)).resize((40, 90), Image.NEAREST))
    ties_r = [y for y in range(90) if (2 * y + 1) * 64 % 180 == 0]
    ties_c = [x for x in range(40) if (2 * x + 1) * 64 % 80 == 0]
    differ = np.argwhere(pillow != expected)
    assert all(r in ties_r or c in ties_c for r, c in differ)


@pytest.mark.parametrize("classes,source,target", [(150, (64, 64), (300, 520)), (19, (32, 48), (97, 33)),
                                                    (7, (40, 40), (40, 40)), (150, (64, 96), (27, 45))])
def test_bilinear_labels_equal_torch_interpolate_then_argmax(classes, source, target):
    rng = np.random.default_rng(classes)
    noisy = rng.standard_normal((classes, *source)).astype(np.float32)  # every 2x2 mixed: the full path
    smooth = np.repeat(np.repeat(rng.standard_normal((classes, source[0] // 8, source[1] // 8)), 8, 1), 8, 2)
    for logits in (noisy, smooth.astype(np.float32) + 0.05 * noisy):  # mostly uniform 2x2: the shortcut
        labels = labels_at_original(logits, Placement(0, 0, *source), target)
        expected, margin = reference_labels(logits[None], target)
        differ = labels != expected
        # torch computes source positions in float32 (resolution ~4e-6 below 64): only near-ties may differ
        assert differ.sum() <= 0.001 * differ.size and (margin[differ] < 1e-4).all(), (differ.sum(), margin[differ])
        np.testing.assert_array_equal(argmax_classes(logits), logits.argmax(0))


def test_letterbox_geometry_by_hand():
    # 32x64 (H x W) into 64x64: full width, 16 rows of padding above and below
    assert placement((32, 64), (64, 64), "letterbox") == Placement(16, 0, 32, 64)
    # 90x40 into 64x64: scale 64/90, width round(28.44) = 28, centred at column (64 - 28) // 2 = 18
    assert placement((90, 40), (64, 64), "letterbox") == Placement(0, 18, 64, 28)
    # odd padding: the spare row goes below (10x20 scales by 3.2 to 32x64 in 33x64)
    assert placement((10, 20), (33, 64), "letterbox") == Placement(0, 0, 32, 64)
    assert placement((20, 64), (33, 64), "letterbox") == Placement(6, 0, 20, 64)  # 13 spare rows: 6 above, 7 below
    assert placement((90, 40), (64, 64), "stretch") == Placement(0, 0, 64, 64)

    # input: the image's pixels normalised in its region, the mean colour (0 after normalisation) around it
    rgb = np.full((32, 64, 3), 200, np.uint8)
    x, place = prepare_input(rgb, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False, "letterbox")
    assert place == Placement(16, 0, 32, 64)
    np.testing.assert_allclose(x[:, 16:48], (200 / 255 - 0.5) / 0.25, rtol=1e-6)
    assert (x[:, :16] == 0).all() and (x[:, 48:] == 0).all()
    raw, _ = prepare_input(rgb, (64, 64), (0.4, 0.5, 0.6), (0.25, 0.25, 0.25), True, "letterbox")
    mean_colour = np.array([0.4, 0.5, 0.6])[:, None, None] * 255
    np.testing.assert_allclose(raw[:, :16], np.broadcast_to(mean_colour, (3, 16, 64)), rtol=1e-6)
    assert (raw[:, 16:48] == 200).all()

    # labels: only the image's region counts; class 1 filling the padding never leaks into the original image
    logits = np.zeros((2, 64, 64), np.float32)
    logits[1] = 5.0
    logits[:, 16:48] = 0.0
    logits[0, 16:48, :32] = 1.0   # left half of the image: class 0
    logits[1, 16:48, 32:] = 1.0   # right half: class 1
    labels = labels_at_original(logits, Placement(16, 0, 32, 64), (32, 64))
    assert (labels[:, :32] == 0).all() and (labels[:, 32:] == 1).all()
    big = labels_at_original(logits, Placement(16, 0, 32, 64), (96, 192))  # 3x: the border stays at column 96
    assert (big[:, :96] == 0).all() and (big[:, 96:] == 1).all()
    graph_labels = logits.argmax(0)
    np.testing.assert_array_equal(nearest_labels(graph_labels, Placement(16, 0, 32, 64), (96, 192)), big)


def test_letterbox_end_to_end_crops_the_padding(graph, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, "predict", str(graph), str(images["tall"]), "-o", str(out), "--resize", "letterbox")[0] == 0
    meta = graph_facts(graph)
    rgb = Image.open(images["tall"]).convert("RGB")
    canvas = np.zeros((3, *SIZE), np.float32)  # 90x40 -> 64x28 at columns 18..45, the rest 0 (the mean colour)
    region = np.asarray(rgb.resize((28, 64), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    mean, std = np.array(meta["mean"], np.float32)[:, None, None], np.array(meta["std"], np.float32)[:, None, None]
    canvas[:, :, 18:46] = (region / 255 - mean) / std
    logits = session_outputs(graph, canvas[None])["logits"]
    expected, margin = reference_labels(logits[:, :, :, 18:46], (90, 40))
    labels = read_png(out / "tall_labels.png")
    differ = labels != expected
    assert differ.sum() <= 2 and (margin[differ] < 1e-5).all()
    assert read_png(out / "tall_overlay.png").shape == (90, 40, 3)
    assert json.loads((out / "summary.json").read_text())["resize"] == "letterbox"


# --------------------------------------------------------------------------------------------- overflow, summary


def test_overflow_is_reported_per_image_never_silently(graph, images, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "predict", str(graph), str(images["wide"]), str(images["tall"]),
                                   "-o", str(out), "--upsample", "nearest")
    assert code == 0
    meta = graph_facts(graph)
    summary = json.loads((out / "summary.json").read_text())
    expected = {}
    for name in ("wide", "tall"):
        x = load_input_array(images[name], SIZE, meta["mean"], meta["std"])
        expected[f"{name}.png"] = int(session_outputs(graph, x)["overflow"][0])
    assert sum(expected.values()) > 0  # ALGM's default capacity does not hold noise: the case under test
    got = {Path(r["input"]).name: r["overflow"] for r in summary["results"]}
    assert got == expected
    for name, count in expected.items():
        assert f"] {name}: " in stderr and f"overflow {count}" in stderr
        assert (f"warning: capacity overflow on {name}: {count} token(s)" in stderr) == (count > 0)
    assert summary["overflowed_images"] == [n for n, c in expected.items() if c]
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].split(",")[:9] == ["input", "labels", "overlay", "height", "width", "run_ms", "preprocess_ms",
                                      "postprocess_ms", "overflow"]
    assert [int(r.split(",")[8]) for r in rows[1:]] == list(expected.values())
    assert all(r["run_ms"] > 0 for r in summary["results"])
    # --fail-on-overflow: the same outputs, exit 1
    assert run_cli(capsys, "predict", str(graph), str(images["wide"]), str(images["tall"]), "-o",
                   str(tmp_path / "strict"), "--fail-on-overflow", "-q")[0] == 1
    assert (tmp_path / "strict" / "tall_labels.png").is_file()


def tiny_graph(path: Path, batch: int, classes: int, points: list[str] | None) -> Path:
    """logits = a fixed 1x1 convolution of the image (K classes); overflow (B, P) = [1, 0, 2] per image (a graph
    that reports each reduction point) or none. Exercises batching and per-point overflow without a ViT."""
    k = np.arange(classes * 3, dtype=np.float32).reshape(classes, 3, 1, 1) % 5 - 2
    nodes = [helper.make_node("Conv", ["image", "k"], ["logits"])]
    inits = [numpy_helper.from_array(k, "k")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes, 8, 12])]
    if points:
        nodes.append(helper.make_node("Expand", ["counts", "shape"], ["overflow"]))
        inits += [numpy_helper.from_array(np.array([[1, 0, 2]], np.int32), "counts"),
                  numpy_helper.from_array(np.array([batch, len(points)], np.int64), "shape")]
        outputs.append(helper.make_tensor_value_info("overflow", TensorProto.INT32, [batch, len(points)]))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 8, 12])],
                          outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"size": [8, 12], "classes": classes, "batch": batch, "mean": [0.5] * 3, "std": [0.5] * 3,
            "raw_input": False}
    if points:
        meta["overflow_points"] = points
    entry = model.metadata_props.add()
    entry.key, entry.value = "staticprune", json.dumps(meta)
    onnx.save(model, str(path))
    return path


def test_batched_graph_and_overflow_per_reduction_point(tmp_path, capsys):
    graph = tiny_graph(tmp_path / "b2.onnx", batch=2, classes=3, points=["layer1", "layer3", "layer6"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):  # 3 images in batches of 2: the last batch is padded
        Image.fromarray(rng.integers(0, 256, (10 + i, 15, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "predict", str(graph), str(folder), "-o", str(out))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch"] == 2 and summary["images"] == 3
    for r in summary["results"]:
        assert r["overflow"] == 3 and r["overflow_per_point"] == {"layer1": 1, "layer3": 0, "layer6": 2}
    assert "warning: capacity overflow on im2.png: 3 token(s) beyond capacity (layer1: 1, layer6: 2);" in stderr
    assert "[3/3] im2.png: " in stderr and "ms, overflow 3 (layer1: 1, layer6: 2)" in stderr
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].endswith("overflow,overflow_layer1,overflow_layer3,overflow_layer6")
    assert rows[3].endswith(",3,1,0,2")
    # each image's labels come from its own slot of the batch
    for i in range(3):
        rgb = np.asarray(Image.open(folder / f"im{i}.png"))
        x, _ = prepare_input(rgb, (8, 12), (0.5,) * 3, (0.5,) * 3, False, "stretch")
        logits = session_outputs(graph, np.stack([x, x]))["logits"][:1]
        expected, margin = reference_labels(logits, rgb.shape[:2])
        got = read_png(out / f"im{i}_labels.png")
        assert ((got == expected) | (margin < 1e-5)).all()


def test_capacity_bucket_pipeline_folder_and_its_json(tmp_path, images, capsys):
    from staticprune.cli import main
    from staticprune.runtime.runner import open_runner

    folder = tmp_path / "pipe"
    assert main(["export", "--model", "segmenter-vit-t-linear", "--size", "64x64", "--classes", str(CLASSES),
                 "--method", "algm", "--buckets", "8,16", "-o", str(folder)]) == 0
    capsys.readouterr()
    runner = open_runner(str(folder))
    assert type(runner).__name__ == "BucketedRunner" and runner.size == SIZE and runner.num_classes == CLASSES
    for target in (folder, folder / "pipeline.json"):
        out = tmp_path / f"out-{target.name}"
        assert run_cli(capsys, "predict", str(target), str(images["scene"]), "-o", str(out))[0] == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runner"] == "BucketedRunner"
        record = summary["results"][0]
        assert set(record["buckets"].values()) <= {8, 16}  # the graph picked at each reduction point
        x, place = prepare_input(np.asarray(Image.open(images["scene"]).convert("RGB")), SIZE, runner.mean,
                                 runner.std, runner.raw_input, "stretch")
        logits = runner.run(x[None])["logits"]
        expected, margin = reference_labels(logits, (75, 110))
        differ = read_png(out / "scene_labels.png") != expected
        assert differ.sum() <= 2 and (margin[differ] < 1e-4).all()


def test_engine_runner_uses_the_sidecar_and_runs_through_polygraphy(graph, images, tmp_path, capsys, monkeypatch):
    """TensorRT is not installed here: stand-ins for `tensorrt` and polygraphy's TrtRunner (which runs the ONNX
    graph in ONNX Runtime, returning FP16 logits as an FP16 engine may) check what TrtRunner does with them."""
    import types

    calls: dict[str, list] = {"feeds": [], "plugins": []}

    class FakeTrtRunner:
        def __init__(self, loader):
            self.loader, self.is_active = loader, False

        def activate(self):
            self.is_active = True

        def deactivate(self):
            self.is_active = False

        def infer(self, feeds):
            assert self.is_active
            calls["feeds"].append({k: (v.shape, v.dtype) for k, v in feeds.items()})
            out = session_outputs(graph, feeds["image"])
            return {"logits": out["logits"].astype(np.float16), "labels": out["labels"].astype(np.int64),
                    "overflow": out["overflow"]}

    backend = types.ModuleType("polygraphy.backend.trt")
    backend.EngineFromBytes = lambda data: ("engine", data)
    backend.TrtRunner = FakeTrtRunner
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", backend)
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    from staticprune.trt import engine as trt_engine

    monkeypatch.setattr(trt_engine, "load_plugins", lambda paths: calls["plugins"].append(list(paths)))
    plugin = tmp_path / "libplugins.so"
    plugin.write_bytes(b"")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    meta = graph_facts(graph)
    input_name = ort_session(str(graph)).get_inputs()[0].name
    (tmp_path / "m.engine.json").write_text(json.dumps({
        "config": meta, "inputs": [{"name": input_name, "shape": [1, 3, 64, 64]}],
        "outputs": [{"name": n, "shape": []} for n in ("logits", "labels", "overflow")], "plugins": [str(plugin)]}))
    out = tmp_path / "out"
    assert run_cli(capsys, "predict", str(engine), str(images["wide"]), "-o", str(out), "--upsample", "nearest")[0] == 0
    assert calls["plugins"] == [[str(plugin)]]
    assert calls["feeds"] == [{input_name: ((1, 3, 64, 64), np.dtype(np.float32))}]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runner"] == "TrtRunner"
    x = load_input_array(images["wide"], SIZE, meta["mean"], meta["std"])
    expected = session_outputs(graph, x)
    assert summary["results"][0]["overflow"] == int(expected["overflow"][0])
    rows = [int(np.floor((y + 0.5) * 64 / 48 + 1e-9)) for y in range(48)]
    cols = [int(np.floor((c + 0.5) * 64 / 80 + 1e-9)) for c in range(80)]
    np.testing.assert_array_equal(read_png(out / "wide_labels.png"), expected["labels"][0][np.ix_(rows, cols)])


def test_label_png_is_16_bit_beyond_256_classes():
    labels = np.array([[0, 255], [256, 299]], np.int32)
    img = Image.open(io.BytesIO(label_png(labels, 300)))
    assert img.mode.startswith("I;16") or img.mode == "I"
    np.testing.assert_array_equal(np.asarray(img), labels)
    small = Image.open(io.BytesIO(label_png(labels[:1], 256)))
    assert small.mode == "L"


# --------------------------------------------------------------------------------------------- palettes


def test_palette_file_parsing(tmp_path):
    text = "# road, sidewalk, ...\n128 64 128\n#f423e8\n\n// a comment\n70,70,70\n  66669c  \n0\t0\t142\n"
    colours = parse_palette(text)
    assert colours.tolist() == [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [0, 0, 142]]
    with pytest.raises(ValueError, match=r"line 3: '256 0 0' is not a colour"):
        parse_palette("1 2 3\n# x\n256 0 0\n")
    with pytest.raises(ValueError, match=r"line 1: '#12345' is not a colour"):
        parse_palette("#12345\n")
    with pytest.raises(ValueError, match="line 1: '1 2' is not a colour"):
        parse_palette("1 2\n")
    with pytest.raises(ValueError, match="has no colours"):
        parse_palette("# only a comment\n")
    path = tmp_path / "p.txt"
    path.write_text("10 20 30\n40 50 60\n")
    assert resolve_palette(str(path), 2).tolist() == [[10, 20, 30], [40, 50, 60]]
    with pytest.raises(ValueError, match="has 2 colours but the graph has 3 classes"):
        resolve_palette(str(path), 3)
    with pytest.raises(ValueError, match="has 19 colours but the graph has 20 classes"):
        resolve_palette("cityscapes", 20)
    assert len(ADE20K) == 150 and len(CITYSCAPES) == 19
    assert CITYSCAPES[0].tolist() == [128, 64, 128] and ADE20K[2].tolist() == [6, 230, 230]  # road; sky
    assert len({tuple(c) for c in resolve_palette("auto", 400).tolist()}) == 400


def test_palette_file_and_alpha_in_the_overlay(graph, images, tmp_path, capsys):
    palette = tmp_path / "five.txt"
    palette.write_text("".join(f"#{v:02x}{255 - v:02x}{v // 2:02x}\n" for v in (0, 60, 120, 180, 240)))
    out = tmp_path / "out"
    assert run_cli(capsys, "predict", str(graph), str(images["scene"]), "-o", str(out), "--palette", str(palette),
                   "--alpha", "1")[0] == 0
    labels = read_png(out / "scene_labels.png")
    colours = np.array([[v, 255 - v, v // 2] for v in (0, 60, 120, 180, 240)], np.uint8)
    np.testing.assert_array_equal(read_png(out / "scene_overlay.png"), colours[labels])


# --------------------------------------------------------------------------------------------- inputs


def test_folders_are_searched_recursively_and_globs_expand(graph, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "city" / "street").mkdir(parents=True)
    (root / ".cache").mkdir()
    rng = np.random.default_rng(2)
    for rel in ("a.png", "city/b.jpg", "city/street/c.PNG", ".cache/hidden.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / rel,
                                                                                 format="PNG" if "png" in rel.lower()
                                                                                 else "JPEG")
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "folder"
    assert run_cli(capsys, "predict", str(graph), str(root), "-o", str(out), "-q")[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(r["input"]).name for r in summary["results"]] == ["a.png", "b.jpg", "c.PNG"]
    assert sorted(p.name for p in out.glob("*_labels.png")) == ["a_labels.png", "b_labels.png", "c_labels.png"]

    out = tmp_path / "glob"
    code, _, stderr = run_cli(capsys, "predict", str(graph), str(root / "**" / "*.png"), str(root / "a.png"),
                              "-o", str(out))
    assert code == 0
    names = [Path(r["input"]).name for r in json.loads((out / "summary.json").read_text())["results"]]
    assert names == ["a.png"]  # '**/*.png' is case-sensitive and skips hidden folders; a.png is not run twice
    assert "[1/1] a.png" in stderr


@pytest.mark.parametrize("case", ["no_match", "empty_folder", "unreadable", "not_staticprune", "out_is_file",
                                  "palette_malformed", "palette_short", "missing_graph", "same_stem", "alpha",
                                  "out_under_file", "engine_without_tensorrt"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, graph, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", str(graph), str(images["wide"]), "-o", str(out)]
    if case == "no_match":
        argv[2] = str(tmp_path / "*.jpg")
        expected = "matched no images"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        argv[2] = str(tmp_path / "empty")
        expected = "holds no images"
    elif case == "unreadable":
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        argv[2:3] = [str(images["wide"]), str(bad)]  # the good image before it is not written either
        expected = "is not a readable image"
    elif case == "not_staticprune":
        plain = tmp_path / "plain.onnx"
        tiny_graph(plain, 1, 3, None)
        model = onnx.load(str(plain))
        del model.metadata_props[:]
        onnx.save(model, str(plain))
        argv[1] = str(plain)
        expected = "is not a staticprune export"
    elif case == "out_is_file":
        out.write_text("x")
        expected = "is a file"
    elif case == "palette_malformed":
        (tmp_path / "p.txt").write_text("1 2 3\nred\n")
        argv += ["--palette", str(tmp_path / "p.txt")]
        expected = "line 2: 'red' is not a colour"
    elif case == "palette_short":
        (tmp_path / "p.txt").write_text("1 2 3\n4 5 6\n")
        argv += ["--palette", str(tmp_path / "p.txt")]
        expected = "has 2 colours but the graph has 5 classes"
    elif case == "missing_graph":
        argv[1] = str(tmp_path / "nope.onnx")
        expected = "does not exist"
    elif case == "same_stem":
        other = tmp_path / "sub" / "wide.png"
        other.parent.mkdir()
        Image.open(images["wide"]).save(other)
        argv[2:3] = [str(images["wide"]), str(other)]
        expected = "would both write wide_labels.png"
    elif case == "alpha":
        argv += ["--alpha", "1.5"]
        expected = "--alpha must be in 0..1"
    elif case == "out_under_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        argv[-1] = str(out)
        expected = "is a file"
    else:  # an engine where TensorRT is missing (as on CI)
        engine = tmp_path / "m.engine"
        engine.write_bytes(b"plan")
        (tmp_path / "m.engine.json").write_text(json.dumps({
            "config": graph_facts(graph), "inputs": [{"name": "image", "shape": [1, 3, 64, 64]}],
            "outputs": [{"name": "logits", "shape": [1, 5, 64, 64]}], "plugins": []}))
        argv[1] = str(engine)
        expected = "TensorRT is not installed here"
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 2, stderr
    assert expected in one_error_line(stderr)
    assert stdout == ""
    assert sorted(tmp_path.rglob("*")) == before  # no output folder, no partial file


# --------------------------------------------------------------------------------------------- torch-free


_NO_TORCH = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "tensorrt", "onnx"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from staticprune.cli import main
code = main(json.loads(sys.argv[1]))
heavy = sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "onnx", "tensorrt"})
print(json.dumps({"code": code, "heavy": heavy}))
"""


def test_predict_runs_without_torch_and_onnx(graph, images, tmp_path):
    out = tmp_path / "out"
    argv = ["predict", str(graph), str(images["tall"]), str(images["scene"]), "-o", str(out), "--resize",
            "letterbox", "--palette", "ade20k"]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(argv)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}
    assert read_png(out / "scene_overlay.png").shape == (75, 110, 3)
    assert read_png(out / "tall_labels.png").shape == (90, 40)


def test_add_form_graph_gets_the_channel_advice_and_a_channel_graph_does_not(graph, images, tmp_path, capsys):
    """ALGM masks its padding slots in every attention after CLAP (block 1 of 12): the default `add` form adds that
    key bias as a pass over the logits, which ONNX Runtime runs separately; predict names the cheaper form."""
    from staticprune.cli import main

    meta = graph_facts(graph)
    assert meta["key_bias"] == "add" and meta["logit_bias_adds"] == 11  # blocks 2..12: one Add before each Softmax
    code, _, stderr = run_cli(capsys, "predict", str(graph), str(images["scene"]), "-o", str(tmp_path / "a"), "-q")
    assert code == 0
    notes = [line for line in stderr.splitlines() if line.startswith("staticprune: note:")]
    assert len(notes) == 1 and "in 11 attention(s)" in notes[0] and "export with --key-bias channel" in notes[0]

    channel = tmp_path / "algm-channel.onnx"
    assert main(["export", "--model", "segmenter-vit-t-linear", "--size", "64x64", "--classes", str(CLASSES),
                 "--method", "algm", "--labels", "--key-bias", "channel", "-o", str(channel)]) == 0
    capsys.readouterr()
    assert graph_facts(channel)["logit_bias_adds"] == 0
    code, _, stderr = run_cli(capsys, "predict", str(channel), str(images["scene"]), "-o", str(tmp_path / "c"), "-q")
    assert code == 0 and "note:" not in stderr
    # the same labels from both forms
    assert (read_png(tmp_path / "a" / "scene_labels.png") == read_png(tmp_path / "c" / "scene_labels.png")).all()


def test_exif_orientation_is_applied_by_predict_and_by_the_inputs_of_verify_and_calibrate(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise) is read as displayed
    by predict (read_rgb) and by load_input / load_input_array (verify, calibrate, export --verify-inputs), so that
    calibration counts and deployment see the same image."""
    from staticprune.commands.predict import read_rgb
    from staticprune.imageio import load_input

    rng = np.random.default_rng(3)
    stored = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)  # 20 x 36 as stored, 36 x 20 as displayed
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = tmp_path / "sideways.png"
    Image.fromarray(stored).save(sideways, exif=exif)
    displayed = np.rot90(stored, k=-1)  # clockwise
    upright = tmp_path / "upright.png"
    Image.fromarray(np.ascontiguousarray(displayed)).save(upright)

    assert read_rgb(sideways).shape == (36, 20, 3) and (read_rgb(sideways) == displayed).all()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = load_input_array(sideways, (32, 16), mean, std)
    assert got.shape == (1, 3, 32, 16)
    assert np.array_equal(got, load_input_array(upright, (32, 16), mean, std))
    assert torch.equal(load_input(sideways, (32, 16), mean, std), load_input(upright, (32, 16), mean, std))
    # and not what the stored pixels give
    plain = tmp_path / "plain.png"
    Image.fromarray(stored).save(plain)
    assert not np.array_equal(got, load_input_array(plain, (32, 16), mean, std))
