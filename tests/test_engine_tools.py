"""`staticprune build` and `verify --engine` without PyTorch and without TensorRT (as on the Jetson image, and CI).

* The CLI paths run in a subprocess where `import torch` and `import tensorrt` raise ImportError: bad arguments give
  one line and exit 2, valid arguments stop at the one-line "TensorRT is not installed here" (exit 2), and nothing
  on the way even tries to import torch.
* The decision-aware engine comparison runs on numpy arrays standing in for the engine's outputs, with planted
  near-tie and clear flips, and on ONNX Runtime outputs of a small graph that exposes a decision and its margin.
* The standard graph is found after the files were copied to another machine (absolute paths recorded elsewhere).
* build_engine's use of the TensorRT API (strongly typed flag, FP16 flag, timing cache result, relative sidecar
  paths) is checked against a minimal stand-in of the `tensorrt` module that records the calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from staticprune.cli import main
from staticprune.trt import engine as trt_engine
from staticprune.verify.decisions import compare_runs

SHAPE = (1, 3, 8, 8)


def tiny_graph(path: Path, metadata: dict | None = None, plugin: bool = False,
               precision_entry: str | None = None) -> Path:
    """logits = 2 x image; labels = argmax over classes; decision_layer1 = the channel with the largest mean and
    margin_layer1 = its lead over the second (top-1 minus top-2), like a method's exposed decision."""
    nodes = [
        helper.make_node("Mul", ["image", "two"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["labels64"], axis=1, keepdims=0),
        helper.make_node("Cast", ["labels64"], ["labels"], to=TensorProto.INT32),
        helper.make_node("ReduceMean", ["image"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("TopK", ["means", "k2"], ["top_values", "top_indices"], axis=1),
        helper.make_node("Slice", ["top_indices", "zero", "one", "one"], ["first_index"]),
        helper.make_node("Cast", ["first_index"], ["decision_layer1"], to=TensorProto.INT32),
        helper.make_node("Slice", ["top_values", "zero", "one", "one"], ["top1"]),
        helper.make_node("Slice", ["top_values", "one", "two_i", "one"], ["top2"]),
        helper.make_node("Sub", ["top1", "top2"], ["margin_layer1"]),
    ]
    if plugin:  # a TensorRT plugin node (custom domain): ONNX Runtime cannot run this graph
        nodes.insert(0, helper.make_node("StaticPruneMerge", ["image"], ["merged"], domain="staticprune"))
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([2], np.int64), "k2"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([2], np.int64), "two_i")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(SHAPE)),
               helper.make_tensor_value_info("labels", TensorProto.INT32, [1, 8, 8]),
               helper.make_tensor_value_info("decision_layer1", TensorProto.INT32, [1, 1]),
               helper.make_tensor_value_info("margin_layer1", TensorProto.FLOAT, [1, 1])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(SHAPE))],
                              outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("staticprune", 1)] if plugin else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    if metadata is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "staticprune", json.dumps(metadata)
    if precision_entry is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "staticprune.precision", precision_entry
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------- CLI, torch blocked

_RUNNER = r"""
import contextlib, importlib.abc, io, json, sys

class Block(importlib.abc.MetaPathFinder):
    attempts = []
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "tensorrt"):
            Block.attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from staticprune.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = exc.code
    results.append({"argv": argv, "code": code, "stderr": err.getvalue()})
loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
print(json.dumps({"results": results, "blocked": Block.attempts, "torch_loaded": loaded}))
"""


def run_without_torch(cwd: Path, calls: list[list[str]]) -> tuple[list[dict], list[str]]:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(calls)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["torch_loaded"] == []
    return payload["results"], payload["blocked"]


def one_error_line(result: dict) -> str:
    lines = [line for line in result["stderr"].splitlines() if not line.startswith("[staticprune]")]
    assert result["code"] == 2 and len(lines) == 1, result
    return lines[0]


def copied_layout(root: Path) -> Path:
    """An engine folder copied from the machine that exported and built it (paths recorded there are absolute)."""
    jetson = root / "jetson"
    tiny_graph(jetson / "tome.onnx", plugin=True,
               metadata={"plugins": True, "standard_graph": "/export/machine/reference-graph.onnx"})
    tiny_graph(jetson / "reference-graph.onnx", metadata={"model": "tiny", "raw_input": False,
                                                        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    (jetson / "model.engine").write_bytes(b"serialised plan")
    (jetson / "model.engine.json").write_text(json.dumps({
        "engine": "/export/machine/model.engine", "onnx": "/export/machine/tome.onnx",
        "plugins": ["/opt/staticprune/lib/libstaticprune_plugins.so"]}))
    (jetson / "libplugins.so").write_bytes(b"")
    return jetson


def test_build_and_verify_engine_run_without_torch_and_stop_at_tensorrt(tmp_path):
    tiny_graph(tmp_path / "seg.onnx", metadata={"model": "tiny"})
    tiny_graph(tmp_path / "plugin.onnx", plugin=True, metadata={"plugins": True})
    (tmp_path / "exists.engine").write_bytes(b"")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "seg.engine").write_bytes(b"plan")
    jetson = copied_layout(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.float32))
    lib = str(jetson / "libplugins.so")
    engine = "jetson/model.engine"
    calls = {
        "build: missing graph": (["build", "missing.onnx", "-o", "m.engine"], "ONNX file 'missing.onnx' does not exist"),
        "build: no -o": (["build", "seg.onnx"], "required: -o/--output"),
        "build: output exists": (["build", "seg.onnx", "-o", "exists.engine"], "exists; pass --force"),
        "build: plugin graph, no --plugins": (["build", "plugin.onnx", "-o", "p.engine"], "pass --plugins PATH"),
        "build: missing library": (["build", "seg.onnx", "-o", "m.engine", "--plugins", "nolib.so"],
                                   "plugin library 'nolib.so' does not exist"),
        "build: valid": (["build", "seg.onnx", "-o", "m.engine", "--fp16", "--timing-cache", "orin.cache"],
                         "TensorRT is not installed here"),
        "build: valid, strongly typed": (["build", "seg.onnx", "-o", "m.engine", "--strongly-typed"],
                                         "TensorRT is not installed here"),
        "verify: missing engine": (["verify", "--engine", "missing.engine"], "engine 'missing.engine' does not exist"),
        "verify: no standard graph": (["verify", "--engine", "lonely/seg.engine"],
                                      "looked at: lonely/seg.standard.onnx (missing); lonely/seg.onnx (missing)"),
        "verify: --standard is a plugin graph": (["verify", "--engine", engine, "--plugins", lib, "--standard",
                                                  "jetson/tome.onnx"], "has TensorRT plugin nodes"),
        "verify: recorded plugin library absent": (["verify", "--engine", engine],
                                                   "recorded in jetson/model.engine.json does not exist here"),
        "verify: missing input": (["verify", "--engine", engine, "--plugins", lib, "--input", "nothere.png"],
                                  "input 'nothere.png' does not exist"),
        "verify: negative atol": (["verify", "--engine", engine, "--plugins", lib, "--atol", "-1"],
                                  "--atol must be >= 0"),
        "verify: valid, copied files": (["verify", "--engine", engine, "--plugins", lib],
                                        "TensorRT is not installed here"),
        "verify: valid, .npy input": (["verify", "--engine", engine, "--plugins", lib, "--input", "x.npy"],
                                      "TensorRT is not installed here"),
    }
    results, blocked = run_without_torch(tmp_path, [argv for argv, _ in calls.values()])
    for (label, (_, expected)), result in zip(calls.items(), results):
        assert expected in one_error_line(result), label
    assert not (tmp_path / "m.engine").exists() and not (tmp_path / "m.engine.json").exists()
    # only the four valid calls reached the TensorRT import; nothing tried torch
    assert blocked == ["tensorrt"] * 4


# ---------------------------------------------------------------------------------------------- standard graph


def test_standard_graph_is_found_beside_the_copied_files(tmp_path):
    jetson = copied_layout(tmp_path)
    sidecar = json.loads((jetson / "model.engine.json").read_text())
    engine = str(jetson / "model.engine")
    # sidecar's absolute onnx -> its basename beside the engine (a plugin graph) -> its metadata's standard graph,
    # recorded absolute on the export machine -> that basename beside the engine
    assert trt_engine.find_standard_graph(engine, sidecar=sidecar).path == jetson / "reference-graph.onnx"
    # the same from the plugin graph given on the command line, without a sidecar
    assert trt_engine.find_standard_graph(engine, str(jetson / "tome.onnx")).path == jetson / "reference-graph.onnx"
    # <stem>.standard.onnx beside the given plugin graph is preferred to the recorded name
    tiny_graph(jetson / "tome.standard.onnx")
    assert trt_engine.find_standard_graph(engine, str(jetson / "tome.onnx")).path == jetson / "tome.standard.onnx"
    # sidecars written from now on record paths relative to the engine
    elsewhere = tmp_path / "graphs" / "std.onnx"
    tiny_graph(elsewhere)
    relative = {"onnx": "../graphs/plugin.onnx", "standard_graph": trt_engine.relative_to(elsewhere, jetson)}
    assert relative["standard_graph"] == "../graphs/std.onnx"
    assert trt_engine.find_standard_graph(engine, sidecar=relative).path.resolve() == elsewhere.resolve()
    # nothing found: every place is listed, the recorded absolute paths last
    (jetson / "reference-graph.onnx").unlink()
    (jetson / "tome.standard.onnx").unlink()
    with pytest.raises(trt_engine.StandardGraphNotFound) as err:
        trt_engine.find_standard_graph(engine, sidecar=sidecar)
    looked = str(err.value).split("looked at: ")[1].split("; ")
    assert looked[0] == f"{jetson / 'tome.onnx'} (plugin graph)"
    assert f"{jetson / 'reference-graph.onnx'} (missing)" in looked
    assert f"{jetson / 'model.standard.onnx'} (missing)" in looked
    assert looked[-2:] == ["/export/machine/reference-graph.onnx (missing)", "pass it with --standard PATH"]


# ---------------------------------------------------------------------------------------------- decision-aware


def _outputs(logits: np.ndarray, decision: int, margin: float) -> dict[str, np.ndarray]:
    return {"logits": logits.astype(np.float32), "labels": logits.argmax(1).astype(np.int32),
            "decision_layer1": np.array([[decision]], np.int32), "margin_layer1": np.array([[margin]], np.float32),
            "overflow": np.zeros(1, np.int32)}


def test_near_tie_decision_flip_excuses_only_its_own_input():
    rng = np.random.default_rng(0)
    ref_a, ref_b = (_outputs(rng.normal(size=(1, 4, 6, 6)), 2, m) for m in (3e-4, 0.8))
    # input A: the engine's decision flipped where the reference led by 3e-4; everything after it differs
    got_a = _outputs(ref_a["logits"] + 0.7, 1, 5e-4)
    got_a["labels"] = np.roll(ref_a["labels"], 1, axis=2)
    got_b = {k: v.copy() for k, v in ref_b.items()}
    got_b["logits"] = got_b["logits"] + 4e-3  # FP16-sized error: within atol 1e-2
    report = compare_runs([got_a, got_b], [ref_a, ref_b], atol=1e-2, rtol=1e-2)
    rows = {o.name: o for o in report.outputs}
    assert report.ok and report.margin_eps == 2.0**-10  # FP16's resolution of a decision score of magnitude 1
    assert [o.name for o in report.outputs][:2] == ["decision_layer1", "labels"]  # decisions first, then labels
    decision = rows["decision_layer1"]
    assert decision.mismatches == 1 and decision.breaches == 0 and decision.agreement == 0.5
    assert report.flip_margins["decision_layer1"] == [pytest.approx(3e-4)]
    assert decision.min_margin == pytest.approx(3e-4)
    # features and labels were judged on input B only
    assert not rows["logits"].comparable and rows["logits"].ok
    assert report.compared_inputs["logits"] == 1 and report.compared_inputs["labels"] == 1
    assert rows["logits"].max_abs == pytest.approx(4e-3, abs=1e-6)  # input B's error; A's 0.7 is excused
    assert rows["labels"].agreement == 1.0  # on input B
    text = report.format()
    assert "at reference margins [3.00e-04]" in text and "judged on 1/2 input(s)" in text
    assert text.splitlines()[-1].startswith("PASS")


def test_a_real_error_is_not_hidden_by_a_near_tie_flip_elsewhere():
    rng = np.random.default_rng(1)
    ref_a, ref_b = (_outputs(rng.normal(size=(1, 4, 6, 6)), 2, m) for m in (3e-4, 0.8))
    got_a = _outputs(ref_a["logits"] + 0.7, 1, 5e-4)
    got_b = {k: v.copy() for k, v in ref_b.items()}
    got_b["logits"] = got_b["logits"].copy()
    got_b["logits"][0, 1, 2, 3] += 0.05  # decisions agree on B: this error counts
    report = compare_runs([got_a, got_b], [ref_a, ref_b], atol=1e-2, rtol=1e-2)
    logits = next(o for o in report.outputs if o.name == "logits")
    assert not report.ok and not logits.ok and logits.mismatches == 1  # input A's differences are not counted
    assert logits.max_abs == pytest.approx(0.05, abs=1e-6) and report.compared_inputs["logits"] == 1
    assert report.format().splitlines()[-1].startswith("FAIL")


def test_clear_decision_flip_and_clear_label_flip_fail_with_their_margins():
    logits = np.zeros((1, 3, 2, 2), np.float32)
    logits[0, 0] = [[1.0, 1.0], [1.0, 1.0]]
    logits[0, 1] = [[1.0 + 4e-3, 0.0], [0.0, 0.0]]  # pixel (0, 0): near-tie, margin 4e-3; others lead by 1.0
    ref = _outputs(logits, 0, 0.5)
    got = _outputs(logits, 0, 0.5)
    got["labels"][0, 0, 0] = 0  # near-tie pixel flipped: allowed
    report = compare_runs([got], [ref], atol=1e-2, rtol=1e-2)
    labels = next(o for o in report.outputs if o.name == "labels")
    # label flips are near-ties up to the most two logits within tolerance can close: 2 * (atol + rtol * max |logit|)
    assert report.label_margin_eps == pytest.approx(2 * (1e-2 + 1e-2 * (1.0 + 4e-3)))
    assert report.ok and labels.agreement == 0.75 and labels.breaches == 0
    assert report.flip_margins["labels"] == [pytest.approx(4e-3, rel=1e-3)]
    got["labels"][0, 1, 1] = 2  # margin 1.0 > 0.1: a genuine disagreement
    got["decision_layer1"][0, 0] = 1  # and the decision flipped where the reference led by 0.5
    report = compare_runs([got], [ref], atol=1e-2, rtol=1e-2)
    rows = {o.name: o for o in report.outputs}
    assert rows["decision_layer1"].breaches == 1 and not rows["decision_layer1"].ok
    # a decision flip above margin_eps excuses nothing downstream
    assert rows["labels"].breaches == 1 and not rows["labels"].ok and rows["labels"].comparable
    text = report.format()
    assert "FAIL (1 flips above margin 0.000977)" in text and "FAIL (1 flips above margin 0.0401)" in text
    # the same decision flip is a near-tie for a caller that allows margins up to 0.5
    assert next(o for o in compare_runs([got], [ref], atol=1e-2, rtol=1e-2, margin_eps=0.5).outputs
                if o.name == "decision_layer1").ok


def test_relative_tolerance_and_missing_outputs():
    ref = {"logits": np.array([[100.0, 0.001]], np.float32)}
    got = {"logits": np.array([[100.5, 0.0]], np.float32)}  # |err| 0.5 <= 1e-2 + 1e-2 * 100; 0.001 <= 1e-2
    report = compare_runs([got], [ref], atol=1e-2, rtol=1e-2)
    assert report.ok and report.outputs[0].max_abs == pytest.approx(0.5)
    assert not compare_runs([got], [ref], atol=1e-2, rtol=0.0).ok
    report = compare_runs([{}], [ref], atol=1e-2, rtol=1e-2)
    assert not report.ok and "missing from the engine" in report.format()
    with pytest.raises(ValueError):
        compare_runs([got, got], [ref], atol=1e-2, rtol=1e-2)


def test_onnxruntime_reference_with_an_fp16_stand_in_for_the_engine(tmp_path):
    """Outputs of a real graph (ONNX Runtime) against the same outputs rounded to FP16, as an FP16 engine gives:
    input 0 has a channel-mean near-tie (2e-4) whose decision flips; input 1 has a clear decision."""
    graph = tiny_graph(tmp_path / "tiny.onnx")
    feeds = trt_engine.generated_feeds(SHAPE, 2, seed=3)
    for x, channel, lead in ((feeds[0], 1, 2e-4), (feeds[1], 2, 1.0)):  # input 0: a near-tie; input 1: clear
        means = x[0].mean(axis=(1, 2))
        x[0, channel] += np.delete(means, channel).max() - means[channel] + lead
    refs = trt_engine.run_reference(str(graph), [{"image": x} for x in feeds])
    assert refs[0]["decision_layer1"][0, 0] == 1 and refs[0]["margin_layer1"][0, 0] == pytest.approx(2e-4, abs=2e-5)
    assert refs[1]["decision_layer1"][0, 0] == 2 and refs[1]["margin_layer1"][0, 0] == pytest.approx(1.0, abs=1e-4)
    engine_like = []
    for ref in refs:
        logits16 = ref["logits"].astype(np.float16).astype(np.float32)
        engine_like.append({"logits": logits16, "labels": logits16.argmax(1).astype(np.int32),
                            "decision_layer1": ref["decision_layer1"].copy(), "margin_layer1": ref["margin_layer1"]})
    engine_like[0]["decision_layer1"][0, 0] = 0  # the near-tie resolved the other way
    engine_like[0]["logits"] = engine_like[0]["logits"] + 0.5  # and everything after it changed
    report = compare_runs(engine_like, refs, atol=1e-2, rtol=1e-2)
    rows = {o.name: o for o in report.outputs}
    assert report.ok, report.format()
    assert rows["decision_layer1"].mismatches == 1 and rows["decision_layer1"].breaches == 0
    assert report.compared_inputs["logits"] == 1
    # input 1 alone: FP16 rounding only (half an FP16 ulp at most), labels flipped only at near-ties if at all
    clear = compare_runs(engine_like[1:], refs[1:], atol=1e-2, rtol=1e-2)
    logits = next(o for o in clear.outputs if o.name == "logits")
    assert clear.ok and 0 < logits.max_abs <= float(np.abs(refs[1]["logits"]).max()) * 2.0**-11
    assert all(m <= 2 * logits.max_abs for m in clear.flip_margins.get("labels", []))
    # the same flip on the clear input is a failure
    engine_like[1]["decision_layer1"][0, 0] = 0
    assert not compare_runs(engine_like, refs, atol=1e-2, rtol=1e-2).ok


# ---------------------------------------------------------------------------------------------- inputs


def test_generated_and_file_feeds(tmp_path):
    shape = (2, 3, 128, 96)
    a, b = trt_engine.generated_feeds(shape, 2, seed=7)
    assert a.shape == shape and a.dtype == np.float32 and not np.array_equal(a, b)
    assert np.array_equal(a, trt_engine.generated_feeds(shape, 1, seed=7)[0])
    assert 0.7 < float(a.std()) < 1.4  # an N(0, 1) field (4 x 3 coarse values per channel) plus 0.3 noise
    # smooth plus noise: neighbouring pixels differ by about the noise (0.3 * sqrt(2)), not by the field's spread
    assert 0.35 < float(np.diff(a, axis=-1).std()) < 0.5
    raw = trt_engine.generated_feeds(shape, 1, seed=7, raw_input=True)[0]
    assert raw.min() >= 0.0 and raw.max() <= 255.0 and np.allclose(raw, np.clip(a * 48.0 + 127.5, 0, 255), atol=1e-4)
    # images: the torch-free loader equals the PyTorch one
    from PIL import Image

    from staticprune.imageio import load_input

    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    meta = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    (array,) = trt_engine.file_feeds([str(tmp_path / "img.png")], (2, 3, 8, 8), meta)
    reference = load_input(tmp_path / "img.png", (8, 8), meta["mean"], meta["std"]).numpy()
    assert array.shape == (2, 3, 8, 8) and np.allclose(array[0], reference[0], atol=1e-6)
    assert np.array_equal(array[0], array[1])
    with pytest.raises(ValueError, match="no mean/std"):
        trt_engine.file_feeds([str(tmp_path / "img.png")], (1, 3, 8, 8), {})


# ---------------------------------------------------------------------------------------------- build_engine


class _Recorder:
    def __init__(self):
        self.network_flags, self.builder_flags, self.cache_accepted = None, [], True


def fake_tensorrt(rec: _Recorder) -> types.ModuleType:
    """The few TensorRT 10.3 Python API calls build_engine makes, recording their arguments."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # kSTRONGLY_TYPED = 1 in NvInfer.h
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.init_libnvinfer_plugins = lambda logger, namespace: True

    class Config:
        def set_memory_pool_limit(self, pool, size): pass
        def set_flag(self, flag): rec.builder_flags.append(flag)
        def create_timing_cache(self, data): return types.SimpleNamespace(serialize=lambda: b"cache")
        def set_timing_cache(self, cache, ignore_mismatch): return rec.cache_accepted
        def get_timing_cache(self): return types.SimpleNamespace(serialize=lambda: b"cache")

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags):
            rec.network_flags = flags
            return object()
        def create_builder_config(self): return Config()
        def build_serialized_network(self, network, config): return b"plan"

    trt.Builder = Builder
    trt.OnnxParser = type("OnnxParser", (), {"__init__": lambda self, network, logger: None, "num_errors": 0,
                                             "parse_from_file": lambda self, path: True})
    engine = types.SimpleNamespace(num_io_tensors=0)
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, plan: engine})
    return trt


def test_build_is_strongly_typed_for_mixed_precision_graphs(tmp_path, monkeypatch, capsys):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    mixed = tiny_graph(tmp_path / "graphs" / "mixed.onnx", metadata={"model": "tiny"}, precision_entry="fp16")
    out = tmp_path / "engines" / "mixed.engine"
    assert main(["build", str(mixed), "-o", str(out), "--fp16"]) == 0
    assert rec.network_flags == 1 << 1 and rec.builder_flags == []  # the ONNX types decide, no FP16 flag
    sidecar = json.loads((tmp_path / "engines" / "mixed.engine.json").read_text())
    assert sidecar["strongly_typed"] and not sidecar["fp16"] and sidecar["engine"] == "mixed.engine"
    assert sidecar["onnx"] == "../graphs/mixed.onnx" and sidecar["standard_graph"] == "../graphs/mixed.onnx"
    assert out.read_bytes() == b"plan"
    # a plain graph: weakly typed, FP16 flag only when asked, --strongly-typed forces the flag
    plain = tiny_graph(tmp_path / "plain.onnx", metadata={"model": "tiny", "precision": "fp32"})
    assert main(["build", str(plain), "-o", str(tmp_path / "p.engine"), "--fp16"]) == 0
    assert rec.network_flags == 0 and rec.builder_flags == ["FP16"]
    rec.builder_flags.clear()
    assert main(["build", str(plain), "-o", str(tmp_path / "p.engine"), "--force", "--strongly-typed"]) == 0
    assert rec.network_flags == 2 and rec.builder_flags == []
    # the precision may also come as a field of the staticprune metadata
    field = tiny_graph(tmp_path / "field.onnx", metadata={"model": "tiny", "precision": "fp16"})
    assert main(["build", str(field), "-o", str(tmp_path / "f.engine")]) == 0 and rec.network_flags == 2
    # a rejected timing cache (set_timing_cache returned False) is one clear line, and no engine is written
    rec.cache_accepted = False
    capsys.readouterr()
    assert main(["build", str(plain), "-o", str(tmp_path / "c.engine"), "--timing-cache", str(tmp_path / "x.cache")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[staticprune]")]
    assert len(err) == 1 and "rejected the timing cache" in err[0]
    assert not (tmp_path / "c.engine").exists()
