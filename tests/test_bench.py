"""The benchmark suite and the methods report: files written, numbers consistent with each other, README tables
regenerated from the results file, bad input refused."""

import csv
import json

import pytest
import torch

from staticprune.bench.suite import Breakdown, count_flops_call, time_static_breakdown
from staticprune.bench.flops import count_flops
from staticprune.cli import main
from staticprune.methods import build_static_method
from staticprune.models import build_model

README = """# title
before
<!-- performance-table:start -->
old table
<!-- performance-table:end -->
<!-- methods-table:start -->
old methods
<!-- methods-table:end -->
after
"""


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text(README)
    code = main(["bench-suite", "--quick", "--sizes", "64x64", "--methods", "tome,dtop", "--images", "2",
                 "--repeats", "2", "--warmup", "1", "-o", str(out / "results"), "--update-readme", str(readme)])
    return code, out, json.loads((out / "results" / "results.json").read_text())


def test_bench_suite_writes_every_output(suite):
    code, out, results = suite
    assert code == 0
    for name in ("results.json", "results.csv", "results.md", "latency_vs_tokens.png", "speedup_vs_flops.png",
                 "breakdown_per_layer.png"):
        data = (out / "results" / name).read_bytes()
        assert len(data) > 100, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["method"], r["model"], r["size"]) for r in results["rows"]] == [
        ("tome", "segmenter-vit-s-mask", "64x64"), ("dtop", "segvit-vit-b-atm", "64x64")]
    with open(out / "results" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # one CSV line per timing: ORT unreduced/static, PyTorch unreduced/reference/static (no GPU here)
    assert len(rows) == sum(len(r["timings"]) for r in results["rows"]) == 10


def test_bench_suite_numbers_are_consistent(suite):
    _, _, results = suite
    for row in results["rows"]:
        assert row["error"] == ""
        assert row["tokens"] == 16
        plain = build_model(row["model"], (64, 64), num_classes=19)
        assert row["gflops_unreduced"] == pytest.approx(count_flops(plain, (1, 3, 64, 64)).gflops)
        static = build_model(row["model"], (64, 64), num_classes=19)
        static.method = build_static_method(row["method"], row["options"], static)
        assert row["gflops_static"] == pytest.approx(count_flops(static, (1, 3, 64, 64)).gflops)
        ms = {(t["backend"], t["variant"]): t["median_ms"] for t in row["timings"]}
        for backend in ("onnxruntime-cpu", "pytorch-cpu"):
            expected = (ms[backend, "unreduced"] / ms[backend, "static"]) / (row["gflops_unreduced"] / row["gflops_static"])
            assert row["ratios"][f"{backend}/static"] == pytest.approx(expected)
        for t in row["timings"]:
            assert 0 < t["min_ms"] <= t["median_ms"]
        depth = plain.backbone.depth if hasattr(plain.backbone, "depth") else len(plain.backbone.blocks)
        assert len(row["kept_per_layer_static"]) == len(row["capacity_per_layer_static"]) == depth
        assert all(0 < k <= c <= 16 for k, c in zip(row["kept_per_layer_static"], row["capacity_per_layer_static"]))
        last = list(row["kept_reference"].values())[-1]
        assert 1 <= last <= 16
        b = row["breakdown"]
        assert len(b["per_layer"]) == depth
        assert 0 < b["share"] < 1
        assert sum(b["steps_ms"].values()) < b["total_ms"]
        assert b["share"] == pytest.approx((sum(b["steps_ms"].values()) + b["unmerge_ms"]) / b["total_ms"])
    tome = results["rows"][0]
    assert tome["breakdown"]["step_labels"]["after_attention"] == "merge"
    assert tome["kept_per_layer_static"][-1] < 16  # ToMe's default r merges something at 4x4 patches


def test_bench_suite_regenerates_the_readme_table(suite):
    _, out, results = suite
    text = (out / "README.md").read_text()
    table = (out / "results" / "results.md").read_text().strip()
    assert "old table" not in text and "old methods" in text
    assert text.startswith("# title\nbefore\n") and text.endswith("<!-- methods-table:end -->\nafter\n")
    assert table in text
    assert "| tome | segmenter-vit-s-mask | 64x64 |" in table
    assert "none available in this run" in table


def test_bench_suite_regenerates_tables_and_plots_from_a_results_file(suite, tmp_path, capsys):
    _, out, _ = suite
    again = tmp_path / "again"
    assert main(["bench-suite", "--from-results", str(out / "results" / "results.json"), "-o", str(again)]) == 0
    capsys.readouterr()
    for name in ("results.md", "results.csv"):
        assert (again / name).read_text() == (out / "results" / name).read_text()
    assert (again / "speedup_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": [{"method": "tome"}]}')
    assert main(["bench-suite", "--from-results", str(bad), "-o", str(tmp_path / "x")]) == 2
    assert "cannot read benchmark results" in capsys.readouterr().err


def test_methods_report_takes_large_size_columns_from_the_bench(suite, tmp_path, capsys):
    _, out, results = suite
    report = tmp_path / "report.json"
    code = main(["methods-report", "--quick", "--methods", "tome", "--cases", "2",
                 "--from-bench", str(out / "results" / "results.json"), "--json", str(report)])
    capsys.readouterr()
    assert code == 0
    row = json.loads(report.read_text())["rows"][0]
    bench = results["rows"][0]
    assert row["l1_equal"] == 2 and row["l2_ok"] and row["lint_jp6"] and row["lint_jp60"]
    assert row["mean_kept"] == pytest.approx(list(bench["kept_reference"].values())[-1])
    assert row["gflops"] == bench["gflops_static"] and row["size"] == "64x64"
    ort = {t["variant"]: t["median_ms"] for t in bench["timings"] if t["backend"] == "onnxruntime-cpu"}
    assert (row["ort_ms"], row["ort_ms_unreduced"]) == (ort["static"], ort["unreduced"])


def test_methods_report_refuses_a_bench_without_the_method(suite, tmp_path, capsys):
    _, out, _ = suite
    code = main(["methods-report", "--quick", "--methods", "algm", "--cases", "1",
                 "--from-bench", str(out / "results" / "results.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert "has no 64x64 row for algm" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["methods-report", "--quick", "--methods", "tome", "--from-bench", str(bad)]) == 2
    assert "cannot use benchmark results" in capsys.readouterr().err


def test_bench_suite_refuses_unknown_methods(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["bench-suite", "--quick", "--methods", "tome,nope", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) nope" in err
    assert not out.exists()


def test_breakdown_share_counts_steps_and_the_unmerge_excess_only():
    b = Breakdown(total_ms=100.0, steps_ms={"after_attention": 3.0}, decode_ms=12.0, decoder_unreduced_ms=10.0,
                  per_layer=[])
    assert b.unmerge_ms == 2.0 and b.share == pytest.approx(0.05)
    faster = Breakdown(total_ms=100.0, steps_ms={}, decode_ms=8.0, decoder_unreduced_ms=10.0, per_layer=[])
    assert faster.unmerge_ms == 0.0 and faster.share == 0.0


def test_time_static_breakdown_sees_every_layer_and_restores_the_method():
    model = build_model("segmenter-vit-t-mask", (64, 64), num_classes=3)
    model.method = build_static_method("tome", {"r": 2}, model)
    method = model.method
    x = torch.randn(1, 3, 64, 64)
    breakdown, timing, valid, slots = time_static_breakdown(model, x, 1.0, warmup=1, repeats=2)
    assert model.method is method
    assert [e["layer"] for e in breakdown.per_layer] == list(range(12))
    # r=2 merges two tokens per layer from 16 patches until the schedule's floor
    assert valid[0] == 14 and all(a >= b for a, b in zip(valid, valid[1:]))
    assert slots == [int(v) for v in valid]  # no capacity padding in fixed-r mode
    assert timing.backend == "pytorch-cpu" and timing.min_ms <= timing.median_ms
    assert breakdown.total_ms == timing.median_ms


def test_reference_flops_match_the_plain_model_when_nothing_is_reduced():
    plain = build_model("segmenter-vit-t-mask", (64, 64), num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert count_flops_call(lambda: plain(x)) == pytest.approx(count_flops(plain, (1, 3, 64, 64)).gflops)


@pytest.mark.gpu
def test_bench_suite_times_the_gpu_variants(tmp_path):
    out = tmp_path / "gpu"
    code = main(["bench-suite", "--quick", "--sizes", "64x64", "--methods", "tome", "--images", "1", "--repeats", "3",
                 "-o", str(out)])
    assert code == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    cuda = {t["variant"]: t for t in row["timings"] if t["backend"] == "pytorch-cuda-fp16"}
    assert set(cuda) == {"unreduced", "reference", "static"}
    assert all(0 < t["min_ms"] <= t["median_ms"] for t in cuda.values())
    assert "pytorch-cuda-fp16/static" in row["ratios"]
    assert torch.cuda.get_device_name(0) in (out / "results.md").read_text()
