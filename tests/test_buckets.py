"""Capacity buckets (docs/buckets.md): stage graphs = single graph at equal capacity, pipeline = eager reference,
calibrated buckets, the dispatcher, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import one_error_line, run_cli
from staticprune.cli import UsageError
from staticprune.export.buckets import bucket_capacities, export_buckets, geometric_buckets
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method
from staticprune.pipeline import ModelConfig, build
from staticprune.reference import reference_module
from staticprune.runtime.buckets import BucketedRunner, pick_bucket
from staticprune.runtime.ort import ort_session
from staticprune.verify.decisions import compare_outputs
from staticprune.verify.parity import generated_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL, SIZE, CLASSES = "segmenter-vit-t-mask", (64, 96), 5
N = (64 // 16) * (96 // 16)  # 24 patch tokens
# Options and seeds under which the six generated images keep different counts (measured with the reference):
# G2TM threshold 0.7 keeps 7, 13, 10, 11, 9, 8 components; ALGM clap_threshold 0.6 keeps (CLAP, GBM) (12, 10),
# (12, 9), (12, 10), (6, 5), (15, 13), (9, 6).
G2TM_OPTIONS = {"threshold": 0.7, "expose_decisions": True}
ALGM_OPTIONS = {"clap_threshold": 0.6, "expose_decisions": True}
SEEDS = range(6)


def images() -> list[torch.Tensor]:
    return [generated_inputs((1, 3, *SIZE), 1, seed=s)[0] for s in SEEDS]


def as_numpy(outputs: dict) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def g2tm_pipeline(tmp_path_factory, one_thread):
    """Exported through the CLI: buckets 8, 12 (+ 24 added so that nothing overflows)."""
    folder = tmp_path_factory.mktemp("g2tm") / "pipeline"
    code = __import__("staticprune.cli", fromlist=["main"]).main([
        "export", "--model", MODEL, "--size", "64x96", "--classes", str(CLASSES), "--method", "g2tm",
        "--opt", "threshold=0.7", "--opt", "expose_decisions=true", "--labels", "--buckets", "8,12", "-o", str(folder)])
    assert code == 0
    return folder


@pytest.fixture(scope="module")
def algm_pipeline(tmp_path_factory, one_thread):
    cfg = ModelConfig(model=MODEL, size=SIZE, classes=CLASSES, method="algm", labels=True,
                      method_options={**ALGM_OPTIONS, "clap_capacity": None, "gbm_capacity": None})
    model = build(cfg)
    folder = tmp_path_factory.mktemp("algm") / "pipeline"
    result = export_buckets(cfg, model, {"clap": [8, 12], "gbm": [8, 12]}, folder, 17, "orin-jp6", images()[:1], 1e-4)
    assert result.ok, result.format()
    assert [g.capacity for g in result.graphs] == [None, 8, 12, 24, 8, 12, 24]
    return folder


def chain(folder: Path, capacities: list[int], img: torch.Tensor) -> dict[str, np.ndarray]:
    """Prefix, then the bucket graph of the given capacity at each reduction point (no dispatcher)."""
    spec = json.loads((folder / "pipeline.json").read_text())
    feeds = {"image": img.numpy()}
    outputs: dict[str, np.ndarray] = {}
    for k, stage in enumerate(spec["stages"]):
        entry = stage["graphs"][0] if k == 0 else next(g for g in stage["graphs"] if g["capacity"] == capacities[k - 1])
        session = ort_session(folder / entry["onnx"])
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(names, feeds)))
        if k + 1 < len(spec["stages"]):
            feeds = {n: out[n + "_next"] for n in spec["state_inputs"]}
        outputs.update({n: v for n, v in out.items() if not n.endswith("_next")})
    return outputs


def single_graph(method: str, options: dict) -> tuple:
    cfg = ModelConfig(model=MODEL, size=SIZE, classes=CLASSES, method=method, labels=True, method_options=options)
    model = build(cfg)
    proto = export_to_proto(model, images()[0], output_names=model.output_names()).model
    return ort_session(proto), model


def assert_equal_outputs(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    diffs = compare_outputs(got, ref, tol=1e-4)
    assert {d.name for d in diffs} >= {"logits", "labels", "overflow"}
    bad = [(d.name, d.max_abs, d.mismatches) for d in diffs if not d.ok or d.mismatches]
    assert not bad, bad


@pytest.mark.parametrize("capacity", [8, 12, 24])
def test_g2tm_bucket_equals_single_graph_at_equal_capacity(g2tm_pipeline, capacity):
    session, model = single_graph("g2tm", {**G2TM_OPTIONS, "capacity": capacity})
    reference = reference_module("g2tm")
    fitting = 0
    for img in images():
        kept = reference.reference_forward(model, img, G2TM_OPTIONS).kept["g2tm"][0]
        if kept > capacity:
            continue
        fitting += 1
        names = [o.name for o in session.get_outputs()]
        single = dict(zip(names, session.run(names, {"image": img.numpy()})))
        got = chain(g2tm_pipeline, [capacity], img)
        assert int(got["overflow"][0]) == 0
        assert_equal_outputs(got, single)
    assert fitting == {8: 2, 12: 5, 24: 6}[capacity]  # the planted counts: 7, 13, 10, 11, 9, 8


@pytest.mark.parametrize("capacities", [(8, 8), (12, 8), (12, 12)])
def test_algm_buckets_equal_single_graph_at_equal_capacities(algm_pipeline, capacities):
    options = {**ALGM_OPTIONS, "clap_capacity": capacities[0], "gbm_capacity": capacities[1]}
    session, model = single_graph("algm", options)
    reference = reference_module("algm")
    fitting = 0
    for img in images():
        kept = reference.reference_forward(model, img, ALGM_OPTIONS).kept
        if kept["clap"][0] > capacities[0] or kept["gbm"][0] > capacities[1]:
            continue
        fitting += 1
        names = [o.name for o in session.get_outputs()]
        single = dict(zip(names, session.run(names, {"image": img.numpy()})))
        assert_equal_outputs(chain(algm_pipeline, list(capacities), img), single)
    assert fitting == {(8, 8): 1, (12, 8): 2, (12, 12): 5}[capacities]


@pytest.mark.parametrize("method", ["g2tm", "algm"])
def test_pipeline_equals_eager_reference_and_picks_smallest_bucket(g2tm_pipeline, algm_pipeline, method):
    folder = g2tm_pipeline if method == "g2tm" else algm_pipeline
    options = G2TM_OPTIONS if method == "g2tm" else ALGM_OPTIONS
    runner = BucketedRunner(str(folder))
    model = build(ModelConfig(model=MODEL, size=SIZE, classes=CLASSES))
    model.method = build_static_method(method, options, model)  # references read the method's settings only
    reference = reference_module(method)
    picked = []
    for img in images():
        got = runner.run(img.numpy())
        with torch.no_grad():
            ref = reference.reference_forward(model, img, options)
        for point, counts in ref.kept.items():
            assert got[f"count_{point}"].tolist() == counts
            buckets = json.loads((folder / "pipeline.json").read_text())["points"]
            holding = [c for c in next(p["buckets"] for p in buckets if p["name"] == point) if c >= counts[0]]
            assert runner.last_capacities[point] == holding[0]  # the smallest bucket that holds the count
        picked.append(tuple(runner.last_capacities.values()))
        assert int(got["overflow"][0]) == 0
        assert float(np.abs(got["logits"] - ref.logits.numpy()).max()) < 1e-4
    expected = {"g2tm": [(8,), (24,), (12,), (12,), (12,), (8,)],
                "algm": [(12, 12), (12, 12), (12, 12), (8, 8), (24, 24), (12, 8)]}[method]
    assert picked == expected
    assert set(runner.output_names) >= {"logits", "labels", "overflow"}


def test_algm_prefix_puts_valid_slots_first(algm_pipeline):
    """The bucket Slice is only exact if the first `count` patch slots are the valid ones."""
    spec = json.loads((algm_pipeline / "pipeline.json").read_text())
    session = ort_session(algm_pipeline / spec["stages"][0]["graphs"][0]["onnx"])
    p = spec["num_prefix"]
    for img in images():
        sizes, count = session.run(["sizes_next", "count_next"], {"image": img.numpy()})
        c = int(count[0])
        assert (sizes[0, p:p + c] > 0).all() and (sizes[0, p + c:] == 0).all()
        assert sizes[0, p:].sum() == N  # every patch in exactly one valid slot


def test_g2tm_prefix_hands_over_unmerged_tokens_and_the_slot_map(g2tm_pipeline):
    """G2TM defers its merge to the bucket graphs: the prefix's tokens are unmerged (every size 1) and `owner`
    sends the patches to slots 0..count-1, each used, in order of their lowest patch."""
    spec = json.loads((g2tm_pipeline / "pipeline.json").read_text())
    session = ort_session(g2tm_pipeline / spec["stages"][0]["graphs"][0]["onnx"])
    p = spec["num_prefix"]
    counts = []
    for img in images():
        sizes, owner, count = session.run(["sizes_next", "owner_next", "count_next"], {"image": img.numpy()})
        c = int(count[0])
        counts.append(c)
        assert (sizes == 1).all() and sizes.shape == (1, p + N)
        slots = owner[0] - p
        assert sorted(set(slots.tolist())) == list(range(c))
        first_patch = [int(np.flatnonzero(slots == k)[0]) for k in range(c)]
        assert first_patch == sorted(first_patch)
    assert counts == [7, 13, 10, 11, 9, 8]  # the planted component counts


def test_bucket_graph_past_its_capacity_reports_overflow(g2tm_pipeline):
    """Fed a count above its capacity (the dispatcher never does), a bucket graph stays in bounds and says so."""
    img = images()[1]  # 13 components
    got = chain(g2tm_pipeline, [8], img)
    assert got["overflow"].tolist() == [13 - 8]
    assert np.isfinite(got["logits"]).all()


def test_pick_bucket():
    assert pick_bucket([4, 8, 16], np.array([5, 2])) == 8  # the largest count of the batch decides
    assert pick_bucket([4, 8, 16], np.array([4])) == 4
    assert pick_bucket([4, 8, 16], np.array([17])) == 16  # none holds it: the largest (reports overflow)


def test_bucket_capacities_are_rounded_quantiles_up_to_every_patch():
    counts = [200, 10, 130, 70]
    # i/3 quantiles (nearest rank) of 10, 70, 130, 200: 70, 130 -> multiples of 64; the largest count as it is
    # (what a single calibrated graph is built at); then N
    assert bucket_capacities(counts, 4, 64, 2304) == [128, 192, 200, 2304]
    assert bucket_capacities(counts, 1, 64, 2304) == [2304]
    assert bucket_capacities([2300], 3, 64, 2304) == [2300, 2304]  # rounding past the largest count is dropped
    assert bucket_capacities([2304], 3, 64, 2304) == [2304]  # duplicates merged


def test_geometric_buckets_bound_the_slack_of_every_count_in_range():
    counts = [123, 277, 442, 870, 880, 1257]
    buckets = geometric_buckets(counts, 1.25, 64, 2304)
    # down from the largest count itself (the single calibrated graph's capacity), each >= the one above / 1.25,
    # rounded up to 64
    assert buckets == [128, 192, 256, 320, 384, 448, 512, 576, 704, 832, 1024, 1257, 2304]
    # any count from the smallest bucket up to the largest calibrated count runs in a bucket < 1.25 * count + 64
    for count in range(128, 1258):
        bucket = min(b for b in buckets if b >= count)
        assert bucket < 1.25 * count + 64, (count, bucket)
    assert geometric_buckets([10], 2.0, 64, 100) == [10, 100]  # N always last
    assert geometric_buckets([100, 101], 1.01, 64, 512) == [101, 512]  # no multiple of 64 between 101 / 1.01 and 101
    assert geometric_buckets([100, 300], 1.01, 64, 512) == [128, 192, 256, 300, 512]  # one multiple a step
    assert geometric_buckets([2304], 1.25, 64, 2304) == [2304]
    with pytest.raises(ValueError, match="must be > 1"):
        geometric_buckets(counts, 1.0, 64, 2304)


def test_calibrate_bucket_growth(tmp_path, capsys):
    out = tmp_path / "cal.json"
    code, stdout, _ = run_cli(capsys, "calibrate", "--model", MODEL, "--size", "64x96", "--classes", str(CLASSES),
                              "--method", "g2tm", "--opt", "threshold=0.7", "--count", "4", "--bucket-growth", "1.5",
                              "--bucket-multiple", "2", "-o", str(out))
    assert code == 0
    data = json.loads(out.read_text())
    assert data["buckets"]["g2tm"] == geometric_buckets(data["kept_counts"]["g2tm"], 1.5, 2, N)
    assert data["bucket_growth"] == 1.5 and "at most 1.5x the previous" in stdout
    for args, message in ((["--bucket-growth", "1.5", "--buckets", "3"], "not both"),
                          (["--bucket-growth", "1"], "must be > 1"),
                          (["--bucket-multiple", "8"], "no effect without")):
        code, _, err = run_cli(capsys, "calibrate", "--model", MODEL, "--size", "64x96", "--method", "g2tm",
                               "--count", "1", *args, "-o", str(tmp_path / "bad.json"))
        assert code == 2 and message in one_error_line(err)
        assert not (tmp_path / "bad.json").exists()


def test_calibrate_writes_buckets(tmp_path, capsys):
    out = tmp_path / "cal.json"
    code, stdout, _ = run_cli(capsys, "calibrate", "--model", MODEL, "--size", "64x96", "--classes", str(CLASSES),
                              "--method", "g2tm", "--opt", "threshold=0.7", "--count", "6", "--buckets", "3",
                              "--bucket-multiple", "4", "-o", str(out))
    assert code == 0
    data = json.loads(out.read_text())
    counts = data["kept_counts"]["g2tm"]
    assert len(counts) == 6
    # generated inputs of calibrate (seed 0) -> quantiles 1/2 and 1 of the counts, rounded up to 4, then 24
    assert data["buckets"]["g2tm"] == bucket_capacities(counts, 3, 4, N)
    assert data["buckets"]["g2tm"][-1] == N and max(counts) in data["buckets"]["g2tm"]
    assert all(c % 4 == 0 for c in data["buckets"]["g2tm"] if c not in (max(counts), N))
    assert data["bucket_multiple"] == 4
    assert "buckets g2tm:" in stdout


@pytest.mark.parametrize("buckets, message", [
    ("12,8", "strictly increasing"),
    ("8,100", "exceeds the 24 patch tokens"),
    ("gbm=8", "unknown reduction point"),
])
def test_bad_bucket_lists_exit_2(tmp_path, capsys, buckets, message):
    code, _, err = run_cli(capsys, "export", "--model", MODEL, "--size", "64x96", "--classes", str(CLASSES),
                           "--method", "g2tm", "--buckets", buckets, "-o", str(tmp_path / "p"))
    assert code == 2
    assert message in one_error_line(err)
    assert not (tmp_path / "p").exists()


def test_unsupported_method_and_existing_output_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "--model", MODEL, "--size", "64x96", "--classes", str(CLASSES),
                           "--method", "tome", "--buckets", "8", "-o", str(tmp_path / "p"))
    assert code == 2 and "not available for method 'tome'" in one_error_line(err)
    (tmp_path / "q").write_text("x")
    code, _, err = run_cli(capsys, "export", "--model", MODEL, "--size", "64x96", "--method", "g2tm",
                           "--buckets", "8", "-o", str(tmp_path / "q"))
    assert code == 2 and "is a file" in one_error_line(err)


def test_pipeline_missing_a_stage_is_one_clear_error(g2tm_pipeline, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(g2tm_pipeline, broken)
    (broken / "stage1-g2tm-c12.onnx").unlink()
    with pytest.raises(UsageError, match="lacks stage graph 'stage1-g2tm-c12.onnx'"):
        BucketedRunner(str(broken))
    with pytest.raises(UsageError, match="holds no pipeline.json"):
        BucketedRunner(str(tmp_path))


def test_bucket_file_for_another_size_or_point_exit_2(tmp_path, capsys):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"method": "g2tm", "model": MODEL, "size": [64, 64], "buckets": {"g2tm": [8]}}))
    code, _, err = run_cli(capsys, "export", "--model", MODEL, "--size", "64x96", "--classes", str(CLASSES),
                           "--buckets", str(cal), "-o", str(tmp_path / "p"))
    assert code == 2 and "calibrated for size 64x64, not 64x96" in one_error_line(err)
    cal.write_text(json.dumps({"method": "algm", "model": MODEL, "size": [64, 96], "buckets": {"g2tm": [8]}}))
    code, _, err = run_cli(capsys, "export", "--model", MODEL, "--size", "64x96", "--classes", str(CLASSES),
                           "--buckets", str(cal), "-o", str(tmp_path / "p"))
    assert code == 2 and "unknown reduction point(s) g2tm; algm decides at clap, gbm" in one_error_line(err)
    assert not (tmp_path / "p").exists()


def test_runner_imports_neither_torch_nor_onnx(g2tm_pipeline):
    """The Jetson image has numpy, onnxruntime and TensorRT only."""
    import subprocess
    import sys

    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "onnx"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
from staticprune.runtime.runner import open_runner
runner = open_runner({str(g2tm_pipeline)!r}, threads=1)
out = runner.run(np.zeros((1, 3, 64, 96), np.float32))
print(sorted(out), out["logits"].shape, runner.last_capacities)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'count_g2tm', 'decision_g2tm', 'labels', 'logits', 'margin_g2tm', 'overflow'" in done.stdout
    assert "(1, 5, 64, 96)" in done.stdout


def test_readme_and_docs_bucket_tables_are_the_ones_the_benchmark_draws(tmp_path):
    """README's summary and docs/buckets.md's tables are drawn from the saved runs by tools/bench_buckets.py
    --from-json; redrawing them into copies changes nothing (they were not edited by hand)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    runs = [root / "docs/benchmarks/buckets-g2tm-vit-b-768.json", root / "docs/benchmarks/buckets-algm-vit-b-768.json"]
    for name in ("README.md", "docs/buckets.md"):
        original = (root / name).read_text()
        copy = tmp_path / Path(name).name
        copy.write_text(original)
        flag = "--update-readme" if name == "README.md" else "--update-docs"
        proc = subprocess.run([sys.executable, str(root / "tools/bench_buckets.py"), "--from-json", *map(str, runs),
                               flag, str(copy)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert copy.read_text() == original
