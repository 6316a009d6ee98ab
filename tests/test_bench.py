"""The benchmark suite and the methods report: files written, numbers consistent with each other, README tables
regenerated from the results file, bad input refused."""

import csv
import json
import statistics

import pytest
import torch

from staticprune.bench.latency import spread, time_interleaved
from staticprune.bench.suite import (
    POREBA_POINTS, Breakdown, SuiteRow, Timing, count_flops_call, mark_baseline_drift, ratio_verdict,
    solve_operating_point, time_static_breakdown, to_csv,
)
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
        assert set(ms) == {(b, v) for b in ("onnxruntime-cpu", "pytorch-cpu") for v in ("unreduced", "static")} | {
            ("pytorch-cpu", "reference")}
        for backend in ("onnxruntime-cpu", "pytorch-cpu"):
            speedup = ms[backend, "unreduced"] / ms[backend, "static"]
            # headline: speedup / the REFERENCE's FLOP reduction; secondary: / the static graph's own
            assert row["ratios"][f"{backend}/static"] == pytest.approx(
                speedup / (row["gflops_unreduced"] / row["gflops_reference"]))
            assert row["graph_ratios"][backend] == pytest.approx(
                speedup / (row["gflops_unreduced"] / row["gflops_static"]))
        assert row["derived"]["slack"] == pytest.approx(row["gflops_static"] / row["gflops_reference"])
        assert row["derived"]["slack"] >= 1.0 - 1e-9  # capacities at the 0.99 quantile hold at least the mean
        for t in row["timings"]:
            assert 0 < t["min_ms"] <= t["median_ms"]
            # two timed rounds, each variant once per round (the unreduced model again for this row)
            assert len(t["samples"]) == 2 and t["median_ms"] == pytest.approx(statistics.median(t["samples"]))
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
    assert row["gflops_reference"] == bench["gflops_reference"]
    assert row["ratio"] == pytest.approx(bench["ratios"]["onnxruntime-cpu/static"])
    assert row["slack"] == pytest.approx(bench["derived"]["slack"])
    # the table is redrawn from the report without measuring anything
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert main(["methods-report", "--methods", "tome", "--from-report", str(report), "--from-bench",
                 str(out / "results" / "results.json"), "--update-readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert "| tome | 2/2 decisions equal" in printed and "table redrawn by" in printed
    assert f"**{row['ratio']:.2f}** ({row['graph_ratio']:.2f})" in readme.read_text()


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


def _planted_row(unreduced_samples: list[float], static_ms: float = 60.0, method: str = "tome") -> SuiteRow:
    """A row with known GFLOPs (unreduced 100, reference 50, static 60) and planted ONNX Runtime timings."""
    row = SuiteRow(method, "segmenter-vit-s-mask", "64x64", 16, gflops_unreduced=100.0, gflops_reference=50.0,
                   gflops_static=60.0)
    row.timings = [Timing("onnxruntime-cpu", "unreduced", min(unreduced_samples), statistics.median(unreduced_samples),
                          unreduced_samples),
                   Timing("onnxruntime-cpu", "static", static_ms, static_ms, [static_ms] * len(unreduced_samples))]
    return row


def test_ratio_divides_the_speedup_by_the_reference_flop_reduction():
    row = _planted_row([100.0, 100.0, 100.0], static_ms=62.5)
    assert row.flop_reduction_reference == 2.0 and row.flop_reduction_static == pytest.approx(100 / 60)
    assert row.slack == pytest.approx(1.2)
    assert row.speedup("onnxruntime-cpu") == pytest.approx(1.6)
    assert row.ratio("onnxruntime-cpu") == pytest.approx(0.8)  # 1.6x faster for a method that saves 2x
    assert row.graph_ratio("onnxruntime-cpu") == pytest.approx(0.96)  # the slack hides in the graph's own ratio
    assert row.ratio("onnxruntime-cpu") == pytest.approx(row.graph_ratio("onnxruntime-cpu") / row.slack)
    assert ratio_verdict(row, "onnxruntime-cpu") == "**no** (0.80)"
    assert ratio_verdict(_planted_row([100.0, 100.0, 100.0], static_ms=52.0), "onnxruntime-cpu") == "yes (0.96)"
    line = next(csv.DictReader(to_csv([row]).splitlines()[0:1] + [to_csv([row]).splitlines()[2]]))
    assert line["variant"] == "static" and line["speedup_over_reference_flop_reduction"] == "0.800"
    assert line["speedup_over_static_flop_reduction"] == "0.960" and line["slack"] == "1.200"
    assert line["samples_ms"] == "62.50;62.50;62.50" and line["noisy"] == "no"


def test_a_baseline_that_varies_25_percent_is_noisy_not_a_verdict():
    noisy = _planted_row([100.0, 125.0, 110.0], static_ms=50.0)
    assert noisy.baseline_spread("onnxruntime-cpu") == pytest.approx(0.25)
    assert noisy.noisy("onnxruntime-cpu")
    assert ratio_verdict(noisy, "onnxruntime-cpu").startswith("noisy (1.10; baseline varied 25%)")
    calm = _planted_row([100.0, 115.0, 110.0], static_ms=50.0)
    assert calm.baseline_spread("onnxruntime-cpu") == pytest.approx(0.15) and not calm.noisy("onnxruntime-cpu")
    assert ratio_verdict(calm, "onnxruntime-cpu") == "yes (1.10)"
    # stable samples, but measured during a slow spell: 30 % off the run's other measurements of that baseline
    rows = [_planted_row([100.0, 101.0]), _planted_row([99.0, 100.0]), _planted_row([130.0, 131.0])]
    mark_baseline_drift(rows)
    assert [r.noisy("onnxruntime-cpu") for r in rows] == [False, False, True]
    assert rows[2].baseline_drift["onnxruntime-cpu"] == pytest.approx(130.5 / 100.5 - 1)
    assert spread([70.0, 1796.0]) > 20


def test_time_interleaved_runs_every_variant_once_per_round_in_rotating_order():
    calls: list[str] = []
    variants = {k: ("cpu", lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    stats = time_interleaved(variants, warmup=1, repeats=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(st.samples) == 3 and st.warmup == 1 and st.min_ms <= st.median_ms for st in stats.values())


def test_poreba_operating_points_and_orin_ratios():
    at_1024, at_768 = POREBA_POINTS[1024], POREBA_POINTS[768]
    assert {m: round(p.flop_reduction, 2) for m, p in at_1024.items()} == {
        "cts": 1.73, "algm": 2.04, "g2tm": 1.83, "dtop": 1.34, "dcts": 2.71, "step": 3.35}
    ratios = [p.orin_ratio for p in list(at_1024.values()) + list(at_768.values())]
    assert min(ratios) == pytest.approx(0.452, abs=1e-3)  # STEP at 768x768
    assert max(ratios) == pytest.approx(1.165, abs=1e-3)  # dCTS at 1024x1024
    assert at_1024["cts"].orin_ratio == pytest.approx((1.9 / 1.2) / (776 / 448))


def test_solver_finds_the_capacity_of_a_flop_reduction():
    model = build_model("segmenter-vit-t-mask", (128, 128), num_classes=3)
    unreduced = count_flops(model, (1, 3, 128, 128)).gflops
    options, achieved = solve_operating_point("g2tm", model, (128, 128), 1.3, unreduced, iterations=8)
    model.method = build_static_method("g2tm", options, model)
    assert unreduced / count_flops(model, (1, 3, 128, 128)).gflops == pytest.approx(achieved)
    assert achieved == pytest.approx(1.3, abs=0.02)  # 64 patches: one capacity slot moves it by about 0.015
    # a target beyond the knob's range gives the strongest setting, and says how far it got
    options, achieved = solve_operating_point("g2tm", model, (128, 128), 50.0, unreduced)
    assert options == {"capacity": 0.02} and 1.3 < achieved < 50.0


def test_bench_suite_paper_operating_points(tmp_path, capsys):
    out = tmp_path / "op"
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- operating-points-table:start -->\nold\n<!-- operating-points-table:end -->\n")
    code = main(["bench-suite", "--operating-points", "paper", "--quick", "--sizes", "96x96", "--methods", "tome,cts",
                 "--repeats", "2", "--warmup", "1", "-o", str(out), "--update-readme", str(readme)])
    capsys.readouterr()
    assert code == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    tome, cts = rows["tome"], rows["cts"]
    assert tome["error"] == cts["error"] == "" and tome["gflops_reference"] == 0.0  # no eager reference here
    assert tome["options"] == {"mode": "r", "r": [0.04]} and tome["operating_point"]["orin_ratio"] is None
    op = cts["operating_point"]
    assert op["flop_reduction"] == pytest.approx(776 / 448) and op["orin_ratio"] == pytest.approx(0.914, abs=1e-3)
    assert op["source"] == "[Poreba et al.] Table 2.2" and set(cts["options"]) == {"reduction"}
    # 36 patches, k shared groups of 4: the reduction moves in steps; the solver lands on the nearest one
    assert cts["derived"]["flop_reduction_static"] == pytest.approx(776 / 448, abs=0.15)
    assert {t["variant"] for t in cts["timings"]} == {"unreduced", "static"}
    text = readme.read_text()
    assert "old" not in text and "**Paper operating points**" in text
    assert "| cts | segmenter-vit-s-mask | 96x96 | 1.73x ([Poreba et al.] Table 2.2) |" in text
    assert "0.91 (1024x1024)" in text and "not in that study" in text
    assert (out / "speedup_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    # the calibrated README table is never the target of a paper run: refused before anything is measured
    assert main(["bench-suite", "--operating-points", "paper", "--quick", "--methods", "tome", "-o",
                 str(tmp_path / "never"), "--update-readme", str(tmp_path / "nothing.md")]) == 2
    assert "operating-points-table:start" in capsys.readouterr().err and not (tmp_path / "never").exists()


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


def _bench_official():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_official.py"
    spec = importlib.util.spec_from_file_location("bench_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A stand-in for a user's checkout of the official G2TM code, with its entry points (segm.model.factory.load_model,
# g2tm.graph_segmenter_patch); its "patch" installs staticprune's G2TM with a slot for every token, so that the
# official-vs-reference parity the tool prints must come out exact.
STUB_FACTORY = '''
from staticprune.models import build_model
from staticprune.models.checkpoints import load_checkpoint

def load_model(path):
    model = build_model("segmenter-vit-t-mask", (64, 64), num_classes=3)
    load_checkpoint(model, path)
    return model, {"dataset_kwargs": {"crop_size": 64, "normalization": "vit"},
                   "net_kwargs": {"backbone": "vit_tiny_patch16_384", "d_model": 192, "n_cls": 3,
                                  "decoder": {"name": "mask_transformer"}}}
'''
STUB_G2TM = '''
from staticprune.methods import build_static_method

def graph_segmenter_patch(model, layer, threshold, prop_attn, iprop_attn):
    model.method = build_static_method("g2tm", {"layer": layer, "threshold": threshold, "capacity": None}, model)
'''


def test_bench_official_times_a_checkout_against_staticprune(tmp_path, monkeypatch, capsys):
    import sys

    tool = _bench_official()
    official = tmp_path / "g2tm-segmenter"
    for folder, text in (("segm", ""), ("segm/model", ""), ("g2tm/g2tm", STUB_G2TM)):
        (official / folder).mkdir(parents=True)
        (official / folder / "__init__.py").write_text(text)
    (official / "segm" / "model" / "factory.py").write_text(STUB_FACTORY)
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    checkpoint.parent.mkdir()
    torch.save(build_model("segmenter-vit-t-mask", (64, 64), num_classes=3).state_dict(), checkpoint)
    (checkpoint.parent / "variant.yml").write_text("net_kwargs: {}\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        args = ["--method", "g2tm", "--official-dir", str(official), "--checkpoint", str(checkpoint),
                "--layers", "2", "--threshold", "0.5", "--repeats", "2", "--warmup", "0", "--images", "1",
                "--json", str(tmp_path / "o.json")]
        assert tool.main(args) == 0
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in ("segm", "g2tm")]:
            del sys.modules[name]
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["model"] == "segmenter-vit-t-mask" and result["size"] == "64x64"
    assert result["options"] == {"layer": 2, "threshold": 0.5} and result["baseline"] == "official unreduced"
    assert result["parity"]["label_agreement"] == 1.0 and result["parity"]["max_abs"] < 1e-4
    variants = {v["variant"]: v for v in result["variants"]}
    assert set(variants) == {"official unreduced", "official g2tm", "staticprune unreduced", "staticprune reference",
                             "staticprune static", "staticprune unreduced graph (ONNX Runtime)",
                             "staticprune static graph (ONNX Runtime)"}
    assert variants["official unreduced"]["speedup"] == 1.0
    assert all(len(v["samples_ms"]) == 2 for v in variants.values())
    assert "| official g2tm |" in capsys.readouterr().out
    # bad input: one line, exit 2
    assert tool.main(["--method", "algm", "--official-dir", str(official), "--checkpoint", str(checkpoint)]) == 2
    assert "no algm/algm/__init__.py" in capsys.readouterr().err
    assert tool.main(["--method", "g2tm", "--official-dir", str(tmp_path), "--checkpoint", str(checkpoint)]) == 2
    assert "has no segm/model/factory.py" in capsys.readouterr().err
