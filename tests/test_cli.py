"""The command line: happy paths end to end, and every bad input -> one line, exit 2, nothing written."""

import json
import os

import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from staticprune.cli import main
from staticprune.models import build_model
from staticprune.models.checkpoints import to_layout
from cli_helpers import one_error_line, run_cli

TINY = ["--model", "segmenter-vit-t-linear", "--size", "32x48", "--classes", "3"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    assert main(["export", *TINY, "--labels", "-o", str(path), "--json", str(path) + ".json"]) == 0
    return path


def test_export_writes_a_verified_linted_graph(exported):
    report = json.loads(open(str(exported) + ".json").read())
    assert report["lint"]["target"] == "orin-jp6" and report["lint"]["violations"] == []
    assert report["verify"]["ok"] and report["verify"]["outputs"][0]["max_abs"] <= 1e-4
    proto = onnx.load(str(exported))
    assert [o.name for o in proto.graph.output] == ["logits", "labels"]
    meta = json.loads(proto.metadata_props[0].value)
    assert meta["model"] == "segmenter-vit-t-linear" and meta["size"] == [32, 48] and meta["opset"] == 17


def test_lint_verify_bench_on_the_exported_file(exported, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "lint", str(exported), "--target", "orin-jp60")
    assert code == 0 and "0 error" in out
    code, out, _ = run_cli(capsys, "verify", str(exported), "--inputs", "2", "--json", str(tmp_path / "v.json"))
    assert code == 0 and "PASS: 2 input(s)" in out
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True
    code, out, _ = run_cli(capsys, "bench", str(exported), "--repeats", "2", "--warmup", "1", "--json", str(tmp_path / "b.json"))
    result = json.loads((tmp_path / "b.json").read_text())
    assert code == 0 and result["gflops"] > 0
    assert {r["backend"] for r in result["latency"]} == {"pytorch-cpu", "onnxruntime-cpu"}
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in result["latency"])


def test_verify_catches_a_tampered_graph(exported, capsys, tmp_path):
    proto = onnx.load(str(exported))
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    code, out, _ = run_cli(capsys, "verify", str(bad), "--inputs", "1")
    assert code == 1 and "FAIL" in out


def test_lint_catches_a_planted_fault(capsys, tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [2, 1])
    graph = helper.make_graph([helper.make_node("NonZero", ["x"], ["y"], name="nz")], "g", [x], [y])
    path = tmp_path / "nz.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, out, _ = run_cli(capsys, "lint", str(path), "--target", "orin-jp6")
    assert code == 1 and "NonZero" in out and "nz" in out


def test_models_lists_every_name(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "segvit-vit-l-atm" in out and "segmenter-vit-t-linear" in out


@pytest.fixture()
def out_path(tmp_path):
    return tmp_path / "never.onnx"


def _assert_bad(capsys, out_path, *argv, contains):
    code, _, err = run_cli(capsys, *argv)
    line = one_error_line(err)
    assert code == 2
    assert contains in line, line
    assert not out_path.exists()
    assert [p for p in os.listdir(out_path.parent) if p.startswith(".")] == []  # no temp files left behind


def test_size_not_multiple_of_16(capsys, out_path):
    _assert_bad(capsys, out_path, "export", "--model", "segmenter-vit-t-linear", "--size", "500x512", "-o", str(out_path),
                contains="multiple of 16")


def test_unknown_model(capsys, out_path):
    _assert_bad(capsys, out_path, "export", "--model", "segmenter-vit-x-mask", "--size", "64x64", "-o", str(out_path),
                contains="unknown model")


@pytest.mark.parametrize("opset", ["16", "21"])
def test_opset_outside_range(capsys, out_path, opset):
    _assert_bad(capsys, out_path, "export", *TINY, "--opset", opset, "-o", str(out_path), contains="17-20")


def test_unreadable_checkpoint(capsys, out_path, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    _assert_bad(capsys, out_path, "export", *TINY, "--weights", str(junk), "-o", str(out_path), contains="junk.pth")


def test_missing_checkpoint(capsys, out_path, tmp_path):
    _assert_bad(capsys, out_path, "export", *TINY, "--weights", str(tmp_path / "nope.pth"), "-o", str(out_path),
                contains="nope.pth")


def test_mismatched_checkpoint(capsys, out_path, tmp_path):
    ckpt = tmp_path / "vit_s.pth"
    torch.save(to_layout(build_model("segmenter-vit-s-linear", (32, 48), num_classes=3), "segmenter"), ckpt)
    _assert_bad(capsys, out_path, "export", *TINY, "--weights", str(ckpt), "-o", str(out_path), contains="shape mismatch")


def test_existing_output_without_force(capsys, tmp_path):
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "export", *TINY, "-o", str(existing))
    assert code == 2 and "--force" in one_error_line(err)
    assert existing.read_bytes() == b"keep me"


def test_unknown_method_and_bad_option(capsys, out_path):
    _assert_bad(capsys, out_path, "export", *TINY, "--method", "magic", "-o", str(out_path), contains="unknown method")


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", "segmenter-vit-t-linear"])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err)


def test_weights_load_into_the_exported_graph(capsys, tmp_path):
    """A real checkpoint (official Segmenter layout) changes the outputs and still verifies."""
    src = build_model("segmenter-vit-t-linear", (32, 48), num_classes=3, seed=7)
    ckpt = tmp_path / "seg.pth"
    torch.save(to_layout(src, "segmenter"), ckpt)
    out = tmp_path / "w.onnx"
    code, _, _ = run_cli(capsys, "export", *TINY, "--weights", str(ckpt), "-o", str(out))
    assert code == 0
    import onnxruntime as ort

    x = torch.randn(1, 3, 32, 48)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = src(x)[0].numpy()
    assert abs(got - want).max() <= 1e-4


def test_demo_prints_the_summary_table(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--model", "segmenter-vit-t-mask", "--size", "64x96", "--classes", "5",
                        "--repeats", "1", "-o", str(tmp_path))
    assert code == 0
    for row in ("lint orin-jp6  clean", "verify logits", "GFLOPs", "PyTorch CPU", "ORT CPU"):
        assert row in out
    assert (tmp_path / "segmenter-vit-t-mask-64x96.onnx").is_file()


def test_build_without_tensorrt_is_one_clear_line(exported, capsys, tmp_path):
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the guard is not exercised")
    except ImportError:
        pass
    engine = tmp_path / "m.engine"
    code, _, err = run_cli(capsys, "build", str(exported), "-o", str(engine))
    assert code == 2 and "TensorRT" in one_error_line(err)
    assert not engine.exists() and not (tmp_path / "m.engine.json").exists()


def test_raw_input_graph_normalises_inside(capsys, tmp_path):
    """--raw-input: the graph takes 0..255 RGB and equals the normalised model on the normalised image."""
    import numpy as np
    import onnxruntime as ort

    out = tmp_path / "raw.onnx"
    assert run_cli(capsys, "export", *TINY, "--raw-input", "-o", str(out))[0] == 0
    rgb = np.random.default_rng(0).uniform(0, 255, (1, 3, 32, 48)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": rgb})[0]
    model = build_model("segmenter-vit-t-linear", (32, 48), num_classes=3)
    with torch.no_grad():
        want = model(torch.from_numpy((rgb / 255.0 - 0.5) / 0.5))[0].numpy()
    assert np.abs(got - want).max() <= 1e-4
