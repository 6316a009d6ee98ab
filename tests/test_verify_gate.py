"""`staticprune verify` as a gate: L2 (ONNX Runtime vs PyTorch), L1 (static vs eager reference) and the capacity
overflow as counts per reduction point and image; overflow fails unless --allow-overflow."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from staticprune.cli import main
from staticprune.imageio import load_input
from staticprune.methods import available_methods, build_static_method, exact_options
from staticprune.models import build_model, get_spec
from staticprune.reference import ReferenceOutput, reference_module
from staticprune.verify.levels import l1_images
from staticprune.verify.parity import VerifyReport, generated_inputs
from staticprune.verify.report import ParityReport, l1_and_overflow
from cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

MODEL = "segmenter-vit-t-linear"
# Threshold 0.99 merges (almost) nothing on random weights, so capacities 12 of 16 then 6 overflow at both points.
OVERFLOWING = ["--method", "tome", "--opt", "mode=threshold", "--opt", "threshold=0.99", "--opt", "layers=1,3",
               "--opt", "capacities=12,6"]


def _export(path, size, *method_args):
    assert main(["export", "--model", MODEL, "--size", size, "--classes", "3", *method_args, "-o", str(path),
                 "--no-slim"]) == 0


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "tome_cap.onnx"
    _export(path, "64x64", *OVERFLOWING)
    return path


@pytest.fixture(scope="module")
def within_capacity(tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "tome_r.onnx"
    _export(path, "32x48", "--method", "tome", "--opt", "mode=r", "--opt", "r=1", "--opt", "layers=1,2")
    return path


def _overflow_rows(out: str) -> list[tuple[str, str, int, str]]:
    """(point, image, count, result) of every overflow row of the table."""
    rows = []
    for line in out.splitlines():
        m = re.match(r"overflow\s+(\S+)\s+(.+?)\s+(\d+) token\(s\)\s+(.+)$", line)
        if m:
            rows.append((m.group(1), m.group(2), int(m.group(3)), m.group(4)))
    return rows


def _graph_overflow(path, tensor: torch.Tensor) -> int:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return int(sess.run(["overflow"], {sess.get_inputs()[0].name: tensor.numpy()})[0][0])


def test_overflow_fails_naming_point_image_and_the_graphs_own_count(overflowing, capsys, tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
        images.append(tmp_path / name)
    code, out, err = run_cli(capsys, "verify", str(overflowing), "--input", str(images[0]), "--input", str(images[1]),
                          "--json", str(tmp_path / "v.json"))
    assert code == 1, out + err
    rows = _overflow_rows(out)
    assert rows and all(result == "FAIL" for *_, result in rows), out
    spec = get_spec(MODEL)
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["ok"] is False and report["overflow"]["allowed"] is False
    for path in images:
        graph = _graph_overflow(overflowing, load_input(path, (64, 64), spec.mean, spec.std))
        named = sum(count for _, image, count, _ in rows if image == path.name)
        assert graph > 0 and named == graph, (path.name, graph, out)
        entry = next(e for e in report["overflow"]["per_image"] if e["image"] == path.name)
        assert entry["total"] == graph and sum(entry["points"].values()) == graph
        assert set(entry["points"]) == {"layer1", "layer3"}
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("FAIL: 2 input(s)") and "capacity overflow" in summary
    point, image, count, _ = rows[0]
    assert f"{point} of {image}: {count}" in summary and "--allow-overflow" in summary
    # L2 still compares the runtimes (its overflow row is a difference, so 0 differ), L1 skips what overflowed
    assert re.search(r"^L2\s+overflow \(graph vs PyTorch\)\s+2 input\(s\)\s+0 differ\s+ok$", out, re.M), out
    assert re.search(r"^L1\s+decision_layer1\s+0/2 image\(s\).*capacity overflow", out, re.M), out
    assert report["l2"]["ok"] is True and report["l1"]["ok"] is True


def test_allow_overflow_exits_0_and_still_reports_the_counts(overflowing, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "verify", str(overflowing), "--inputs", "1", "--allow-overflow",
                        "--json", str(tmp_path / "v.json"))
    assert code == 0, out
    x = generated_inputs((1, 3, 64, 64), 1, seed=1)[0]  # verify's generated input #1 (seed 0 + 1)
    rows = _overflow_rows(out)
    assert sum(c for *_, c, _ in rows) == _graph_overflow(overflowing, x) > 0
    assert all(image == "generated #1" and result == "allowed (--allow-overflow)" for _, image, _, result in rows)
    assert out.strip().splitlines()[-1].startswith("PASS: 1 input(s)") and "overflow allowed" in out
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["ok"] is True and report["overflow"]["allowed"] is True and report["overflow"]["ok"] is False
    assert report["overflow"]["overflowed"] and report["overflow"]["per_image"][0]["image"] == "generated #1"


def test_within_capacity_passes_with_l1_and_l2_rows(within_capacity, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "verify", str(within_capacity), "--inputs", "2", "--json", str(tmp_path / "v.json"))
    assert code == 0, out
    for point in ("layer1", "layer2"):
        assert re.search(rf"^L1\s+decision_{point}\s+2/2 image\(s\)\s+2/2 equal.*\s+ok$", out, re.M), out
    l1_logits = re.search(r"^L1\s+logits\s+2/2 image\(s\)\s+max abs (\S+) \(tol 0.0001\)\s+ok$", out, re.M)
    assert l1_logits and float(l1_logits.group(1)) <= 1e-4, out
    assert re.search(r"^L2\s+logits\s+2 input\(s\)\s+max abs \S+ \(tol 0.0001\)\s+ok$", out, re.M), out
    assert re.search(r"^overflow\s+every point\s+2 point\(s\) x 2 image\(s\)\s+0 tokens beyond capacity\s+ok$", out,
                     re.M), out
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["ok"] and report["l1"]["logits"]["images_compared"] == 2
    assert [p["point"] for p in report["l1"]["points"]] == ["layer1", "layer2"]
    assert all(p["equal"] == 2 for p in report["l1"]["points"])
    assert [e["total"] for e in report["overflow"]["per_image"]] == [0, 0]


@pytest.mark.parametrize("flag", [["--opt", "r=2"], ["--method", "algm"], ["--size", "64x64"]])
def test_flags_a_graph_records_are_refused(within_capacity, capsys, tmp_path, flag):
    code, out, err = run_cli(capsys, "verify", str(within_capacity), *flag, "--json", str(tmp_path / "v.json"))
    lines = [line for line in err.splitlines() if not line.startswith("[staticprune]")]
    assert code == 2 and len(lines) == 1 and f"{flag[0]} has no effect" in lines[0], err
    assert not (tmp_path / "v.json").exists() and out == ""


def test_l1_is_decision_aware_image_by_image():
    """A flip above the margin is a breach; one at a near-tie makes later points and the logits not comparable;
    overflow at a point skips it and everything after it."""
    dec = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.int32)
    margin = torch.tensor([[0.5, 0.5, 1e-6, 0.5], [0.5, 0.5, 0.5, 0.5]])
    logits = torch.zeros(2, 3, 4, 4)
    static = {"logits": logits, "decision_p1": dec, "margin_p1": margin, "decision_p2": dec, "margin_p2": margin}
    flipped = dec.clone()
    flipped[0, 2] = 9  # image 0: at the near-tie entry
    flipped[1, 0] = 9  # image 1: at a clear margin
    ref = ReferenceOutput(logits=logits + 2e-5, kept={}, decisions={"p1": flipped, "p2": dec.clone()})
    none = {"p1": torch.zeros(2, dtype=torch.int64), "p2": torch.zeros(2, dtype=torch.int64)}
    images = l1_images(static, ref, none, ["p1", "p2"], tol=1e-4, margin_eps=1e-3)
    assert [(r.status, r.flips, r.breaches) for r in images[0].points] == [("near-tie", 1, 0), ("downstream", 0, 0)]
    assert images[0].logits_max_abs is None and images[0].logits_ok
    assert [(r.status, r.flips, r.breaches) for r in images[1].points] == [("breach", 1, 1), ("downstream", 0, 0)]
    assert images[1].points[0].min_flip_margin == pytest.approx(0.5)
    ref_equal = ReferenceOutput(logits=logits + 2e-5, kept={}, decisions={"p1": dec.clone(), "p2": dec.clone()})
    overflow = {"p1": torch.tensor([0, 0]), "p2": torch.tensor([0, 3])}
    images = l1_images(static, ref_equal, overflow, ["p1", "p2"], tol=1e-4, margin_eps=1e-3)
    assert [r.status for r in images[0].points] == ["equal", "equal"]
    assert images[0].logits_max_abs == pytest.approx(2e-5, rel=1e-3) and images[0].logits_ok
    assert [r.status for r in images[1].points] == ["equal", "overflow"] and images[1].logits_max_abs is None
    images = l1_images(static, ref_equal, none, ["p1", "p2"], tol=1e-5, margin_eps=1e-3)
    assert not images[0].logits_ok  # 2e-5 above a 1e-5 tolerance


# Capacities too small for a 2x2 patch grid: every method with a capacity overflows (CTS has none). The exact
# side uses each method's EXACT_OPTIONS (the defaults of some methods trade exactness for speed).
TIGHT = {"tome": {"mode": "threshold", "threshold": 0.99, "capacity": 0.5},
         "algm": {"clap_capacity": 0.25, "gbm_capacity": 0.25}, "g2tm": {"threshold": 1.5, "capacity": 1},
         "dcts": {"capacity": 1}, "lvtp": {"capacity": [1]}, "dtop": {"capacity": [1, 1], "threshold": [0.0]},
         "step": {"token_capacity": 1, "capacity": [1]}}


def _report(model, method: str, options: dict, x: torch.Tensor) -> ParityReport:
    model.method = build_static_method(method, {**options, "expose_decisions": True}, model)
    with torch.no_grad():
        graph_overflow = [[int(v) for v in dict(zip(model.output_names(), model(x)))["overflow"]]]
    l1, overflow = l1_and_overflow(model, reference_module(method), options, [x], ["img"], graph_overflow, 1e-4,
                                   1e-3, method)
    return ParityReport(VerifyReport(outputs=[], inputs=1, tol=1e-4, graph_overflow=graph_overflow), l1, overflow,
                        ["img"])


@pytest.mark.parametrize("method", available_methods())
def test_every_method_gets_l1_rows_and_per_point_overflow(method):
    """The verify report's L1 and overflow parts on each method's tiny model: L1 passes within capacity, and
    with capacities too small the per-point split adds up to the module's own overflow output and fails."""
    name = "segvit-vit-b-atm" if method in ("dtop", "step") else "segmenter-vit-t-mask"
    model = build_model(name, (32, 32), num_classes=3).eval()
    x = generated_inputs((1, 3, 32, 32), 1, seed=5)[0]
    report = _report(model, method, exact_options(method), x)
    text = report.format()
    points = list(reference_module(method).reference_forward(model, x, exact_options(method)).decisions)
    assert points
    for point in points:
        assert re.search(rf"^L1\s+decision_{point}\s+1/1 image\(s\)\s+1/1 equal.*\s+ok$", text, re.M), text
    assert re.search(r"^L1\s+logits\s+1/1 image\(s\)\s+max abs", text, re.M), text
    overflow = report.overflow[0]
    assert report.l1.ok and report.ok and overflow.total == 0 and overflow.split_agrees
    assert set(overflow.points) == set(points)
    if method not in TIGHT:
        return
    report = _report(model, method, TIGHT[method], x)
    overflow = report.overflow[0]
    assert overflow.total > 0 and overflow.split_agrees and sum(overflow.points.values()) == overflow.total
    assert set(overflow.points) == set(points)
    assert not report.ok and report.overflowed and all(image == "img" for _, image, _ in report.overflowed)
    report.allow_overflow = True
    assert report.ok and "capacity overflow allowed" in report.summary()
