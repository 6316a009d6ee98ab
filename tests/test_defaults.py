"""Default options give a real reduction: every method's defaults cost fewer GFLOPs than the unreduced model, at the
published average cost where the paper reports a whole-model figure (docs/methods/defaults.md), and `export`
prints both GFLOPs and warns when an export is not cheaper."""

import json
import re

import pytest

from staticprune.bench import count_flops
from staticprune.cli import main
from staticprune.methods import available_methods
from staticprune.pipeline import ModelConfig, build

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

SEGVIT_ONLY = ("dtop", "step")  # exits are ATM prune heads: SegViT models only

# Static / unreduced GFLOPs that the papers report for each method's default setting (docs/methods/defaults.md):
# ToMe, ALGM and CTS Segmenter ViT-S ADE20K 512 (ALGM paper, Table 1); G2TM Segmenter ViT-S ADE20K 512 (official
# results); dCTS and STEP SegViT ViT-B Cityscapes 768 ("From Complexity to Efficiency", Table 2.1); DToP SegViT
# ViT-B ADE20K 512 (official results).
PUBLISHED = {"tome": 28.2 / 38.6, "algm": 26.3 / 38.6, "g2tm": 26.1 / 38.6, "cts": 27.2 / 38.6, "dcts": 182 / 301,
             "dtop": 86.8 / 109.9, "step": 149 / 301}


def _gflops(model: str, size: int, method: str = "none", classes: int = 150) -> float:
    cfg = ModelConfig(model=model, size=(size, size), classes=classes, method=method)
    return count_flops(build(cfg), (1, 3, size, size)).gflops


def test_every_method_is_registered_here():
    assert set(available_methods()) == {"tome", "algm", "g2tm", "cts", "dcts", "dtop", "step", "lvtp"}


@pytest.mark.parametrize("model,methods", [
    ("segmenter-vit-t-mask", [m for m in available_methods() if m not in SEGVIT_ONLY]),
    ("segvit-vit-b-atm", ["dcts", *SEGVIT_ONLY]),  # dCTS's and STEP's papers report SegViT
])
def test_default_options_cost_fewer_gflops_than_unreduced_at_64(model, methods):
    """19 classes (Cityscapes): with 150 class queries on 16 patches the mask decoder would be most of the cost."""
    unreduced = _gflops(model, 64, classes=19)
    for method in methods:
        reduced = _gflops(model, 64, method, classes=19)
        assert reduced < 0.95 * unreduced, f"{method} on {model}: {reduced:.4f} vs {unreduced:.4f} GFLOPs"


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_defaults_reproduce_the_published_cost_at_512(method):
    """The operating point of the defaults, counted on the meta device (no compute), 150 classes: within 0.03 of the
    paper's static / unreduced ratio, on the model the paper's figure is for (ViT-B SegViT for dCTS, DToP, STEP)."""
    model = "segvit-vit-b-atm" if method in ("dcts", "dtop", "step") else "segmenter-vit-s-mask"
    ratio = _gflops(model, 512, method) / _gflops(model, 512)
    assert ratio == pytest.approx(PUBLISHED[method], abs=0.03), f"{method}: {ratio:.3f}"


def test_lvtp_default_keeps_54_percent_after_its_pruning_layer():
    """LVTP's paper gives a whole-model cut for SAM ViT-H that one middle-layer prune of a 12-block ViT-S cannot
    reach; the default keeps 54 % of the patch tokens from the pruning point on (the paper's 46 % cut)."""
    model = build(ModelConfig(model="segmenter-vit-s-mask", size=(512, 512), classes=150, method="lvtp"))
    assert model.method.capacities == [553]  # ceil(0.54 * 1024)
    ratio = _gflops("segmenter-vit-s-mask", 512, "lvtp") / _gflops("segmenter-vit-s-mask", 512)
    assert 0.75 < ratio < 0.8


def _export(tmp_path, capsys, name: str, *method_args: str) -> tuple[int, str, str, dict]:
    out = tmp_path / f"{name}.onnx"
    report = tmp_path / f"{name}.json"
    code = main(["export", "--model", "segmenter-vit-t-mask", "--size", "64x64", "--classes", "3", *method_args,
                 "-o", str(out), "--no-slim", "--json", str(report)])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr, json.loads(report.read_text())


GFLOPS_LINE = re.compile(r"^GFLOPs per image \(fvcore, 1 multiply-add = 1 FLOP\): unreduced ([\d.]+), "
                         r"exported ([\d.]+) \((\d+)% of unreduced\)$", re.M)


def test_export_prints_unreduced_and_exported_gflops(tmp_path, capsys):
    code, stdout, stderr, report = _export(tmp_path, capsys, "algm", "--method", "algm")
    assert code == 0
    (line,) = GFLOPS_LINE.findall(stdout)
    unreduced = _gflops("segmenter-vit-t-mask", 64, classes=3)
    exported = _gflops("segmenter-vit-t-mask", 64, "algm", classes=3)
    assert float(line[0]) == pytest.approx(unreduced, rel=1e-3) and float(line[1]) == pytest.approx(exported, rel=1e-3)
    assert int(line[2]) == round(100 * exported / unreduced) < 100
    assert report["gflops"] == {"unreduced": pytest.approx(unreduced), "exported": pytest.approx(exported)}
    assert "warning" not in stderr


def test_export_warns_when_not_cheaper_and_keeps_the_exit_code(tmp_path, capsys):
    """G2TM with a slot for every patch costs its similarity graph on top of the unreduced model."""
    code, stdout, stderr, report = _export(tmp_path, capsys, "g2tm", "--method", "g2tm", "--opt", "capacity=none")
    assert code == 0 and (tmp_path / "g2tm.onnx").is_file()
    (line,) = GFLOPS_LINE.findall(stdout)
    assert float(line[1]) >= float(line[0]) and report["gflops"]["exported"] >= report["gflops"]["unreduced"]
    warnings = [w for w in stderr.splitlines() if "warning" in w]
    assert warnings == [w for w in warnings if w.startswith("staticprune: warning: the g2tm export is not cheaper "
                                                            "than the unreduced model (")]
    assert len(warnings) == 1
