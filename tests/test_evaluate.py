"""`staticprune evaluate` and staticprune.metrics.

The end-to-end cases run an analytic segmenter (staticprune.testing.scenes: hand-set ViT-T weights that classify
each patch by its mean colour) on generated flat-colour scenes, so every mIoU has an expected value computed in
closed form, without the ViT, from the images and their ground truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import one_error_line, run_cli
from staticprune.commands.evaluate import slide_size, window_starts
from staticprune.metrics import ConfusionMatrix, scores_from_confusion
from staticprune.testing import scenes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds synchronisation

MODEL = "segmenter-vit-t-linear"
WINDOW = 64
EXACT = ("--opt", "clap_capacity=null", "--opt", "gbm_capacity=null")  # ALGM capacities that hold every token
TIGHT = ("--opt", "clap_capacity=4", "--opt", "gbm_capacity=3")  # 4 / 3 of 16 patch tokens: overflows


# --------------------------------------------------------------------------------------------- metrics


def test_miou_hand_made_case_with_ignore_and_absent_classes():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])  # class 3 predicted only on an ignored pixel
    cm = ConfusionMatrix(5, ignore_index=255)
    cm.update(pred, truth)
    s = cm.scores()
    # class 0: TP 1, union 3 (2 truth + 2 predicted - 1); class 1: TP 2, union 3; class 2: TP 1, union 2;
    # classes 3 and 4: union 0 (absent from truth and from counted predictions) -> left out of the mean
    assert s.iou == pytest.approx([1 / 3, 2 / 3, 1 / 2, None, None])
    assert s.iou[3] is None and s.iou[4] is None
    assert s.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s.pixel_accuracy == pytest.approx(4 / 6)
    assert s.mean_accuracy == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert s.classes_present == 3 and s.pixels == 6


def test_miou_counts_a_class_only_predicted_as_zero_and_accumulates():
    cm = ConfusionMatrix(5, ignore_index=255)
    cm.update(np.array([0, 4]), np.array([0, 0]))  # class 4 predicted, never true: IoU 0, counted
    assert cm.scores().iou == pytest.approx([1 / 2, None, None, None, 0.0])
    assert cm.scores().miou == pytest.approx(0.25)
    cm.update(np.array([4, 4]), np.array([4, 255]))  # a second image: counts add up
    # class 0: TP 1, union 2; class 4: TP 1, truth 1, predicted 2 -> union 2
    assert cm.scores().miou == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert cm.scores().pixel_accuracy == pytest.approx(2 / 3)


def test_prediction_outside_the_classes_is_a_miss_and_bad_truth_is_refused():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(np.array([0, 9]), np.array([0, 0]))
    assert cm.scores().miou == pytest.approx(1 / 2)  # class 0: TP 1 of 2 truth pixels; class 1 absent
    assert cm.scores().pixel_accuracy == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="ground-truth class 7"):
        cm.update(np.array([0]), np.array([7]))
    # the whole matrix at once gives the same numbers
    assert scores_from_confusion(np.array([[3, 1], [0, 0]])).miou == pytest.approx(3 / 4 / 2)


def test_window_starts_and_slide_size_follow_segmenter():
    assert window_starts(128, 64, 64) == [0, 64]
    assert window_starts(160, 64, 64) == [0, 64, 96]  # the last window flush with the border
    assert window_starts(128, 64, 32) == [0, 32, 64]
    assert window_starts(64, 64, 48) == [0]
    assert slide_size(64, 128, (64, 64), 0) == (64, 128)  # 0 = keep
    assert slide_size(300, 400, (512, 512), 512) == (512, 683)  # short side to 512
    assert slide_size(100, 400, (64, 256), 64) == (64, 256)  # short side 64 -> 64x256: the window fits


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five 64x128 scenes in the three layouts, the analytic checkpoint, and the closed-form expectation."""
    root = tmp_path_factory.mktemp("evaluate")
    samples = scenes.make_scenes(5, 64, 128, seed=3)
    for layout in scenes.LAYOUTS:
        scenes.write_dataset(root / layout, layout, samples)
    weights = scenes.save_analytic_checkpoint(root / "analytic.pth", MODEL)
    # 64x64 windows at stride 64 tile a 64x128 image exactly: each window is segmented on its own
    cm = ConfusionMatrix(scenes.NUM_CLASSES, 255)
    for _, image, truth in samples:
        logits = torch.cat([scenes.analytic_logits(image[:, i : i + WINDOW]) for i in (0, WINDOW)], dim=-1)
        cm.update(logits.argmax(0).numpy(), truth)
    return root, weights, samples, cm.scores()


def _evaluate(capsys, root: Path, *argv: str) -> dict:
    out = root / "out"
    code, stdout, err = run_cli(capsys, "evaluate", *argv, "--short-side", "0", "--stride", str(WINDOW),
                                "-o", str(out))
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table and all(line in (out / "results.md").read_text() for line in table)
    return {r["variant"]: r for r in result["variants"]} | {"_result": result, "_stdout": stdout, "_err": err}


def test_unreduced_reproduces_the_closed_form_miou_in_every_layout(capsys, data):
    root, weights, samples, expected = data
    assert 0.6 < expected.miou < 0.95  # patch-resolution edges: high, not perfect
    model = ("--model", MODEL, "--size", f"{WINDOW}x{WINDOW}", "--weights", str(weights), "--variants", "unreduced")
    got = {}
    for layout, where in (("pairs", ("--images", str(root / "pairs/images"), "--labels", str(root / "pairs/labels"))),
                          ("cityscapes", ("--root", str(root / "cityscapes"))),
                          ("ade20k", ("--root", str(root / "ade20k")))):
        rows = _evaluate(capsys, root, "--layout", layout, *where, *model)
        got[layout] = rows["unreduced"]
        assert rows["_result"]["dataset"]["images"] == len(samples)
        assert rows["_err"].count("[evaluate] ") == len(samples)  # one progress line per image
    for layout, row in got.items():
        assert row["miou"] == pytest.approx(expected.miou, abs=2e-3), layout
        assert row["pixel_accuracy"] == pytest.approx(expected.pixel_accuracy, abs=1e-3), layout
        assert row["pixels"] == expected.pixels  # the ignore box (ade20k: stored 0) is left out everywhere
        assert row["forwards"] == 2 * len(samples)
        assert row["gflops_per_forward"] == pytest.approx(0.0945, abs=1e-3)
    assert got["ade20k"]["iou"] == got["cityscapes"]["iou"] == got["pairs"]["iou"]


def _static_overflow(weights: Path, samples, options: dict) -> tuple[float, float]:
    """(share of images with overflow, mean overflow per window) of the static module run directly."""
    from staticprune.pipeline import ModelConfig, build

    model = build(ModelConfig(model=MODEL, size=(WINDOW, WINDOW), classes=None, weights=str(weights),
                              method="algm", method_options=options))
    counts = []
    with torch.no_grad():
        for _, image, _ in samples:
            x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
            counts.append([int(model(x[..., i : i + WINDOW])[-1][0]) for i in (0, WINDOW)])
    return sum(max(c) > 0 for c in counts) / len(counts), sum(map(sum, counts)) / (2 * len(counts))


def test_reference_static_and_onnx_variants(capsys, data, tmp_path):
    root, weights, samples, expected = data
    model = ("--model", MODEL, "--size", f"{WINDOW}x{WINDOW}", "--weights", str(weights), "--method", "algm")
    ade = ("--layout", "ade20k", "--root", str(root / "ade20k"))
    exact = _evaluate(capsys, tmp_path, *ade, *model, *EXACT)
    # capacities that hold every token: the static module is the reference, decision for decision
    assert exact["static"]["agreement_with_reference"] == 1.0
    assert exact["static"]["miou"] == exact["reference"]["miou"]
    assert exact["static"]["overflow"]["total"] == {"image_rate": 0.0, "mean_tokens": 0.0}
    assert set(exact["static"]["overflow"]) == {"total", "clap", "gbm"}  # named as the reference's points
    assert exact["unreduced"]["miou"] == pytest.approx(expected.miou, abs=2e-3)
    # merging averages edge patches into their neighbours: the reference loses a little, never gains much
    assert exact["reference"]["miou"] <= exact["unreduced"]["miou"] + 1e-3
    assert exact["reference"]["miou"] > exact["unreduced"]["miou"] - 0.1
    assert exact["unreduced"]["agreement_with_reference"] < 1.0
    ref_gflops = exact["reference"]["gflops_per_forward"]
    assert ref_gflops < exact["static"]["gflops_per_forward"] <= exact["unreduced"]["gflops_per_forward"] + 1e-3
    assert exact["reference"]["reference_kept_mean"]["gbm"] < 16  # flat regions merge: fewer than 16 patches

    # tight capacities: the static module and its ONNX graph overflow, and agree with each other exactly
    graph = tmp_path / "tight.onnx"
    code, _, err = run_cli(capsys, "export", *model, *TIGHT, "-o", str(graph))
    assert code == 0, err
    tight = _evaluate(capsys, tmp_path, *ade, *model, *TIGHT, "--variants", f"reference,static,onnx:{graph}")
    rate, mean = _static_overflow(weights, samples, {"clap_capacity": 4, "gbm_capacity": 3})
    assert rate > 0 and mean > 0
    for label in ("static", f"onnx:{graph}"):
        assert tight[label]["overflow"]["total"]["image_rate"] == pytest.approx(rate)
        assert tight[label]["overflow"]["total"]["mean_tokens"] == pytest.approx(mean)
        assert tight[label]["agreement_with_reference"] < 1.0
        assert tight[label]["miou"] < tight["reference"]["miou"]
    assert tight["static"]["miou"] == tight[f"onnx:{graph}"]["miou"]
    point_sum = sum(tight["static"]["overflow"][p]["mean_tokens"] for p in ("clap", "gbm"))
    assert point_sum == pytest.approx(mean)  # the per-point split adds up to the graph's overflow output
    assert tight[f"onnx:{graph}"]["gflops_per_forward"] == pytest.approx(tight["static"]["gflops_per_forward"])
    assert tight["reference"]["miou"] == exact["reference"]["miou"]  # capacities never touch the reference
    assert (tmp_path / "out" / "miou_vs_gflops.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_exit_2(capsys, data, tmp_path):
    root, weights, _, _ = data
    model = ("--model", MODEL, "--size", "64x64", "--weights", str(weights))

    def refused(*argv: str) -> str:
        code, out, err = run_cli(capsys, "evaluate", *argv)
        assert code == 2, err
        assert out == ""
        return one_error_line(err)

    assert "ROOT/leftImg8bit/val" in refused("--layout", "cityscapes", "--root", str(root / "ade20k"), *model)
    assert "ROOT/images/validation" in refused("--layout", "ade20k", "--root", str(root / "pairs"), *model)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image" in refused("--layout", "pairs", "--images", str(root / "pairs/images"), "--labels",
                                 str(empty), *model)
    assert "--images DIR and --labels DIR" in refused("--layout", "pairs", *model)
    # a label map of another size than its image
    images, labels = tmp_path / "img", tmp_path / "lbl"
    images.mkdir()
    labels.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(labels / "a.png")
    line = refused("--layout", "pairs", "--images", str(images), "--labels", str(labels), *model)
    assert "a.png" in line and "64x64" in line and "64x48" in line
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(labels / "a.png")  # class 9 of an 8-class model
    line = refused("--layout", "pairs", "--images", str(images), "--labels", str(labels), *model, "--variants",
                   "unreduced")
    assert "ground-truth class 9 is outside 0..7" in line and "a.png" in line
    pairs = ("--layout", "pairs", "--images", str(root / "pairs/images"), "--labels", str(root / "pairs/labels"))
    assert "needs a method" in refused(*pairs, *model, "--variants", "unreduced,static")
    assert "not one of" in refused(*pairs, *model, "--variants", "unreduced,onnx")
    assert "does not exist" in refused(*pairs, *model, "--variants", "onnx:missing.onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        fake = tmp_path / "x.engine"
        fake.write_bytes(b"0")
        assert "TensorRT" in refused(*pairs, *model, "--variants", f"engine:{fake}")
    assert "--stride" in refused(*pairs, *model, "--mode", "resize", "--stride", "32")
    assert "need the model" in refused(*pairs, "--variants", "unreduced")
    assert "--method has no effect" in refused(*pairs, "--method", "algm", "--variants", f"onnx:{weights}")


def test_resize_mode_matches_the_closed_form(capsys, data):
    """--mode resize: the 64x128 image squeezed to the 64x64 model, the logits stretched back bilinearly."""
    import torch.nn.functional as F

    root, weights, samples, _ = data
    cm = ConfusionMatrix(scenes.NUM_CLASSES, 255)
    for _, image, truth in samples:
        x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
        small = F.interpolate(x, size=(WINDOW, WINDOW), mode="bilinear", align_corners=False)
        logits = scenes.analytic_logits(small[0].permute(1, 2, 0).numpy())
        logits = F.interpolate(logits[None], size=truth.shape, mode="bilinear", align_corners=False)[0]
        cm.update(logits.argmax(0).numpy(), truth)
    expected = cm.scores()
    code, out, err = run_cli(capsys, "evaluate", "--layout", "pairs", "--images", str(root / "pairs/images"),
                             "--labels", str(root / "pairs/labels"), "--model", MODEL, "--size", f"{WINDOW}x{WINDOW}",
                             "--weights", str(weights), "--mode", "resize", "-o", str(root / "resize"))
    assert code == 0, err
    row = json.loads((root / "resize" / "results.json").read_text())["variants"][0]
    assert row["forwards"] == len(samples)  # one forward per image
    assert row["miou"] == pytest.approx(expected.miou, abs=2e-3)
    assert row["miou"] < data[3].miou  # half the horizontal resolution costs accuracy
