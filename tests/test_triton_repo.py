"""`staticprune triton-repo` and examples/triton_client.py, without a Triton server.

Every config.pbtxt written is parsed with Triton's own ModelConfig protobuf (tritonclient's model_config_pb2, loaded
from its file so that only protobuf is needed, not grpc) and compared with the graph: names, dims and data types
(mapped independently, through numpy and tritonclient.utils), the batch branch (fixed batch: max_batch_size 0 and
full dims; dynamic batch: max_batch_size and dynamic_batching, dims without the batch), the instance group, the
label file. The ONNX case is a real export (ViT-T, 64x64, G2TM, labels: it has an overflow output) whose outputs
ONNX Runtime computes with exactly the configured shapes; the engine case is a sidecar as `staticprune build`
writes it, beside a stand-in plan file. The client's request is built offline and run through ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from cli_helpers import one_error_line, run_cli
from staticprune.commands import triton_repo

ROOT = Path(__file__).resolve().parents[1]


def _load_file_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pb2():
    """tritonclient/grpc/model_config_pb2.py loaded directly (importing tritonclient.grpc would need grpc)."""
    locations = importlib.util.find_spec("tritonclient").submodule_search_locations
    return _load_file_module("triton_model_config_pb2", Path(list(locations)[0]) / "grpc" / "model_config_pb2.py")


@pytest.fixture(scope="module")
def client():
    return _load_file_module("triton_client_example", ROOT / "examples" / "triton_client.py")


def parse_config(pb2, model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())


def triton_type(pb2, elem_type: int) -> str:
    """The Triton type of an ONNX element type, through numpy and tritonclient (not the command's table)."""
    from tritonclient.utils import np_to_triton_dtype

    wire = np_to_triton_dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    return "TYPE_" + ("STRING" if wire == "BYTES" else wire)


def graph_io(path: Path) -> tuple[list, list]:
    proto = onnx.load(str(path), load_external_data=False)

    def spec(v):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        return v.name, v.type.tensor_type.elem_type, dims
    return [spec(v) for v in proto.graph.input], [spec(v) for v in proto.graph.output]


def assert_config_matches_graph(pb2, cfg, graph: Path, batched: bool) -> None:
    inputs, outputs = graph_io(graph)
    for configured, tensors in ((cfg.input, inputs), (cfg.output, outputs)):
        for got, (name, elem, dims) in zip(list(configured), tensors, strict=True):
            assert got.name == name
            assert pb2.DataType.Name(got.data_type) == triton_type(pb2, elem)
            expected = dims[1:] if batched else dims
            if expected:
                assert list(got.dims) == expected and not got.HasField("reshape")
            else:  # a batch-only tensor: Triton's form is dims [1] reshaped to []
                assert list(got.dims) == [1] and got.HasField("reshape") and list(got.reshape.shape) == []


# --------------------------------------------------------------------------------------------- an exported graph


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("triton-export") / "seg.onnx"
    from staticprune.cli import main

    code = main(["export", "--model", "segmenter-vit-t-linear", "--size", "64x64", "--classes", "19", "--method",
                 "g2tm", "--labels", "--verify-inputs", "1", "-o", str(path)])
    assert code == 0
    return path


def test_onnx_repository_parses_as_model_config_and_matches_the_graph(pb2, exported, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, out, err = run_cli(capsys, "triton-repo", str(exported), "-o", str(repo), "--device", "cpu",
                             "--instances", "2")
    assert code == 0, err
    model = repo / "seg"
    cfg = parse_config(pb2, model)
    assert cfg.name == "seg" and cfg.backend == "onnxruntime" and cfg.platform == ""
    # torch.onnx.export without dynamic axes: the exported graph has a fixed batch of 1
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert_config_matches_graph(pb2, cfg, exported, batched=False)
    assert [o.name for o in cfg.output] == ["logits", "labels", "overflow"]
    assert [pb2.DataType.Name(o.data_type) for o in cfg.output] == ["TYPE_FP32", "TYPE_INT32", "TYPE_INT32"]
    assert list(cfg.output[0].dims) == [1, 19, 64, 64] and list(cfg.output[1].dims) == [1, 64, 64]
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 2
    assert pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_CPU"
    # ONNX Runtime produces exactly the configured shapes and types
    from staticprune.runtime.ort import ort_session

    session = ort_session(model / "1" / "model.onnx")
    results = session.run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})
    for spec, value in zip(cfg.output, results, strict=True):
        assert list(value.shape) == list(spec.dims)
        assert pb2.DataType.Name(spec.data_type) == "TYPE_" + {"float32": "FP32", "int32": "INT32"}[str(value.dtype)]
    assert (model / "1" / "model.onnx").read_bytes() == exported.read_bytes()
    # labels.txt: the 19 Cityscapes names, referenced from the logits output
    assert cfg.output[0].label_filename == "labels.txt"
    names = (model / "labels.txt").read_text().splitlines()
    assert len(names) == 19 and names[0] == "road" and names[18] == "bicycle"
    readme = (repo / "README.md").read_text()
    assert "nvcr.io/nvidia/tritonserver:24.08-py3 tritonserver --model-repository=/models" in readme
    assert "perf_analyzer -m seg --shape image:1,3,64,64" in readme
    manifest = json.loads((model / "staticprune.json").read_text())
    assert manifest["mean"] == [0.5, 0.5, 0.5] and manifest["size"] == [64, 64] and manifest["num_classes"] == 19


def test_client_request_matches_the_config_and_the_graph(pb2, client, exported, tmp_path, capsys):
    from PIL import Image

    from staticprune.imageio import load_input_array
    from staticprune.runtime.ort import ort_session

    repo = tmp_path / "repo"
    assert run_cli(capsys, "triton-repo", str(exported), "-o", str(repo), "--name", "seg")[0] == 0
    manifest = client.load_manifest(repo / "seg" / "staticprune.json")
    yy, xx = np.mgrid[0:90, 0:120]
    picture = np.stack([xx * 2, yy * 2, (xx + yy) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "street.png")
    image = client.prepare_image(tmp_path / "street.png", manifest)
    # the same preprocessing as `staticprune verify --input` (resize, /255, mean/std)
    expected = load_input_array(tmp_path / "street.png", (64, 64), manifest["mean"], manifest["std"])
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-6)
    tensors = client.request_tensors(image, manifest)
    cfg = parse_config(pb2, repo / "seg")
    assert [(t.name, list(t.shape), "TYPE_" + t.datatype) for t in tensors] == \
        [(i.name, list(i.dims), pb2.DataType.Name(i.data_type)) for i in cfg.input]
    assert tensors[0].data.dtype == np.float32 and tensors[0].data.flags.c_contiguous
    session = ort_session(exported)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {t.name: t.data for t in tensors})))
    labels = client.class_map(outputs)
    np.testing.assert_array_equal(labels, outputs["logits"].argmax(axis=1))
    client.save_class_map(labels, tmp_path / "labels.png", manifest["num_classes"])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels.png")), labels[0])
    assert client.overflow_summary(outputs).startswith("overflow: ")
    assert client.overflow_summary({"overflow": np.array([[0, 3]], np.int32)}).startswith("overflow: image 0: [0, 3]")


# --------------------------------------------------------------------------------------------- batch branches


def hand_graph(path: Path, batch: int | str, out_batch: bool = True) -> Path:
    """image (B, 3, 8, 8) -> logits (B, 5, 8, 8) = Conv 1x1; labels (B, 8, 8) int32; overflow (B,) int32 (or, with
    out_batch False, a (1,) overflow that has no batch dimension)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [5, 3, 1, 1], np.linspace(-1, 1, 15).astype(np.float32))
    nodes = [helper.make_node("Conv", ["image", "w"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["labels64"], axis=1, keepdims=0),
             helper.make_node("Cast", ["labels64"], ["labels"], to=TensorProto.INT32),
             helper.make_node("ReduceMax", ["labels"], ["overflow"], axes=[1, 2] if out_batch else [0, 1, 2],
                              keepdims=0)]
    overflow_shape = [batch] if out_batch else []
    if not out_batch:
        nodes[-1] = helper.make_node("ReduceMax", ["labels"], ["overflow_scalar"], keepdims=0)
        nodes.append(helper.make_node("Reshape", ["overflow_scalar", "one"], ["overflow"]))
        overflow_shape = [1]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5, 8, 8]),
         helper.make_tensor_value_info("labels", TensorProto.INT32, [batch, 8, 8]),
         helper.make_tensor_value_info("overflow", TensorProto.INT32, overflow_shape)],
        [w, helper.make_tensor("one", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "staticprune", json.dumps({"size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_dynamic_batch_graph_gets_dynamic_batching(pb2, client, tmp_path, capsys):
    graph = hand_graph(tmp_path / "dyn.onnx", "batch")
    code, _, err = run_cli(capsys, "triton-repo", str(graph), "-o", str(tmp_path / "repo"), "--max-batch-size", "4")
    assert code == 0, err
    cfg = parse_config(pb2, tmp_path / "repo" / "dyn")
    assert cfg.max_batch_size == 4 and cfg.HasField("dynamic_batching")
    assert_config_matches_graph(pb2, cfg, graph, batched=True)
    assert list(cfg.input[0].dims) == [3, 8, 8] and list(cfg.output[2].dims) == [1]
    assert list(cfg.output[2].reshape.shape) == []
    assert "perf_analyzer -m dyn -b 4 --shape image:3,8,8" in (tmp_path / "repo" / "README.md").read_text()
    # the default maximum, and the client's batch of 1 under dynamic batching
    code, _, err = run_cli(capsys, "triton-repo", str(graph), "-o", str(tmp_path / "repo2"))
    assert code == 0, err
    assert parse_config(pb2, tmp_path / "repo2" / "dyn").max_batch_size == triton_repo.DEFAULT_DYNAMIC_MAX_BATCH
    manifest = client.load_manifest(tmp_path / "repo2" / "dyn" / "staticprune.json")
    tensors = client.request_tensors(np.zeros((1, 3, 8, 8), np.float32), manifest)
    assert tensors[0].shape == (1, 3, 8, 8)
    # 5 classes: generic names
    assert (tmp_path / "repo2" / "dyn" / "labels.txt").read_text().splitlines() == [f"class_{i}" for i in range(5)]


def test_batch_dimension_missing_on_one_output_means_no_batching(pb2, tmp_path, capsys):
    graph = hand_graph(tmp_path / "partial.onnx", "batch", out_batch=False)
    code, _, err = run_cli(capsys, "triton-repo", str(graph), "-o", str(tmp_path / "repo"))
    assert code == 0, err
    cfg = parse_config(pb2, tmp_path / "repo" / "partial")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [-1, 3, 8, 8] and list(cfg.output[2].dims) == [1]


def test_fixed_batch_graph_of_two_keeps_its_batch(pb2, client, tmp_path, capsys):
    graph = hand_graph(tmp_path / "b2.onnx", 2)
    assert run_cli(capsys, "triton-repo", str(graph), "-o", str(tmp_path / "repo"))[0] == 0
    cfg = parse_config(pb2, tmp_path / "repo" / "b2")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [2, 3, 8, 8]
    assert_config_matches_graph(pb2, cfg, graph, batched=False)
    manifest = client.load_manifest(tmp_path / "repo" / "b2" / "staticprune.json")
    assert client.request_tensors(np.ones((1, 3, 8, 8), np.float32), manifest)[0].shape == (2, 3, 8, 8)


# --------------------------------------------------------------------------------------------- engines


def engine_files(folder: Path, batch: int = 1, plugins: list[str] = (), tensorrt: str = "10.3.0.26") -> Path:
    """A stand-in plan and the sidecar `staticprune build` writes beside it (TensorRT dtype strings included)."""
    b = batch
    engine = folder / "seg.engine"
    engine.write_bytes(b"not a real plan: Triton is not run here" * 10)
    sidecar = {"engine": "seg.engine", "onnx": "seg.onnx", "standard_graph": None, "tensorrt": tensorrt,
               "fp16": False, "strongly_typed": True, "plugins": list(plugins), "build_seconds": 12.5,
               "inputs": [{"name": "image", "shape": [b, 3, 64, 64], "dtype": "DataType.FLOAT"}],
               "outputs": [{"name": "logits", "shape": [b, 150, 64, 64], "dtype": "DataType.HALF"},
                           {"name": "labels", "shape": [b, 64, 64], "dtype": "DataType.INT32"},
                           {"name": "overflow", "shape": [b, 12], "dtype": "DataType.INT32"}],
               "config": {"model": "segmenter-vit-t-mask", "size": [64, 64], "classes": 150, "method": "tome",
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "raw_input": True},
               "capacities": {}}
    Path(str(engine) + ".json").write_text(json.dumps(sidecar, indent=2))
    return engine


def test_engine_repository_from_the_sidecar(pb2, tmp_path, capsys):
    lib = tmp_path / "libstaticprune_plugins.so"
    lib.write_bytes(b"\x7fELF stand-in")
    engine = engine_files(tmp_path, plugins=[str(lib)])
    repo = tmp_path / "repo"
    code, _, err = run_cli(capsys, "triton-repo", str(engine), "-o", str(repo), "--name", "seg_tome")
    assert code == 0, err
    model = repo / "seg_tome"
    cfg = parse_config(pb2, model)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
    assert [(i.name, list(i.dims), pb2.DataType.Name(i.data_type)) for i in cfg.input] == \
        [("image", [1, 3, 64, 64], "TYPE_FP32")]
    assert [(o.name, list(o.dims), pb2.DataType.Name(o.data_type)) for o in cfg.output] == \
        [("logits", [1, 150, 64, 64], "TYPE_FP16"), ("labels", [1, 64, 64], "TYPE_INT32"),
         ("overflow", [1, 12], "TYPE_INT32")]
    assert pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"
    assert (model / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert (model / lib.name).read_bytes() == lib.read_bytes()  # the recorded plugin library travels with the model
    names = (model / "labels.txt").read_text().splitlines()
    assert len(names) == 150 and names[:3] == ["wall", "building", "sky"] and names[-1] == "flag"
    readme = (repo / "README.md").read_text()
    assert '--backend-config=tensorrt,plugins="/models/seg_tome/libstaticprune_plugins.so"' in readme
    assert "LD_PRELOAD=/models/seg_tome/libstaticprune_plugins.so tritonserver" in readme
    assert "RGB 0..255 (the graph normalises)" in readme
    # a second model in the same repository: the README describes both
    (tmp_path / "b").mkdir()
    engine_b = engine_files(tmp_path / "b", batch=-1)
    code, _, err = run_cli(capsys, "triton-repo", str(engine_b), "-o", str(repo), "--name", "seg_dyn",
                           "--max-batch-size", "2", "--version", "3")
    assert code == 0, err
    cfg = parse_config(pb2, repo / "seg_dyn")
    assert cfg.max_batch_size == 2 and cfg.HasField("dynamic_batching") and list(cfg.input[0].dims) == [3, 64, 64]
    assert list(cfg.output[2].dims) == [12] and (repo / "seg_dyn" / "3" / "model.plan").is_file()
    readme = (repo / "README.md").read_text()
    assert "## seg_tome" in readme and "## seg_dyn" in readme


def test_engine_of_another_tensorrt_is_not_pointed_at_the_24_08_image(tmp_path, capsys):
    engine = engine_files(tmp_path, tensorrt="10.7.0.23")
    code, _, err = run_cli(capsys, "triton-repo", str(engine), "-o", str(tmp_path / "repo"))
    assert code == 0 and "built with TensorRT 10.7.0.23" in err
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver" in readme and "(here 10.7.0.23)" in readme
    assert "tritonserver:24.08-py3 " not in readme


def test_engine_whose_plugin_library_is_elsewhere_says_where_to_put_it(tmp_path, capsys):
    engine = engine_files(tmp_path, plugins=["/opt/on/the/orin/libstaticprune_plugins.so"])
    code, _, err = run_cli(capsys, "triton-repo", str(engine), "-o", str(tmp_path / "repo"))
    assert code == 0 and "not found here" in err
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "copy libstaticprune_plugins.so, built for the server's TensorRT, into the model folder" in readme
    assert '--backend-config=tensorrt,plugins="/models/seg/libstaticprune_plugins.so"' in readme
    assert not (tmp_path / "repo" / "seg" / "libstaticprune_plugins.so").exists()


def test_engine_without_sidecar_reads_the_graph_beside_it(pb2, tmp_path, capsys):
    hand_graph(tmp_path / "seg.onnx", 1)
    (tmp_path / "seg.plan").write_bytes(b"plan")
    code, _, err = run_cli(capsys, "triton-repo", str(tmp_path / "seg.plan"), "-o", str(tmp_path / "repo"))
    assert code == 0, err
    cfg = parse_config(pb2, tmp_path / "repo" / "seg")
    assert cfg.platform == "tensorrt_plan"
    assert_config_matches_graph(pb2, cfg, tmp_path / "seg.onnx", batched=False)


def test_force_replaces_a_model_folder_whole(pb2, tmp_path, capsys):
    graph = hand_graph(tmp_path / "m.onnx", 1)
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)  # an empty folder is not refused
    assert run_cli(capsys, "triton-repo", str(graph), "-o", str(repo), "--version", "2")[0] == 0
    assert run_cli(capsys, "triton-repo", str(graph), "-o", str(repo), "--force")[0] == 0
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt", "labels.txt", "staticprune.json"]
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "m"]  # no staging or old folders left


def test_link_shares_the_model_file_and_the_command_needs_no_torch(tmp_path):
    import subprocess
    import sys

    graph = hand_graph(tmp_path / "m.onnx", 1)
    script = ("import sys; sys.modules['torch'] = None; sys.modules['tritonclient'] = None\n"
              "from staticprune.cli import main\n"
              f"sys.exit(main(['triton-repo', {str(graph)!r}, '-o', {str(tmp_path / 'repo')!r}, '--link']))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "repo" / "m" / "1" / "model.onnx").stat().st_ino == graph.stat().st_ino


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    graph = hand_graph(tmp_path / "g.onnx", 1)
    plugin_graph = onnx.load(str(graph))
    plugin_graph.graph.node.append(helper.make_node("StaticPruneTokenUnmerge", ["logits"], ["extra"],
                                                    domain="staticprune"))
    onnx.save(plugin_graph, str(tmp_path / "p.onnx"))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "lonely.engine").write_bytes(b"plan")
    (tmp_path / "busy" / "g").mkdir(parents=True)
    (tmp_path / "busy" / "g" / "config.pbtxt").write_text("keep me")
    engine = engine_files(tmp_path)
    cases = {
        ("missing.onnx",): "does not exist",
        ("notes.txt",): "neither an ONNX graph",
        ("empty.onnx",): "is empty",
        ("g.onnx", "--backend", "tensorrt"): "build one with 'staticprune build'",
        ("seg.engine", "--backend", "onnxruntime"): "is a TensorRT engine",
        ("seg.engine", "--device", "cpu"): "GPU only",
        ("g.onnx", "--max-batch-size", "4"): "fixed batch (1)",
        ("g.onnx", "--name", "../up"): "model name",
        ("g.onnx", "--version", "0"): "--version must be >= 1",
        ("g.onnx", "--instances", "0"): "--instances must be >= 1",
        ("p.onnx",): "plugin nodes",
        ("lonely.engine",): "no sidecar",
        ("g.onnx", "--plugin-lib", "lib.so"): "--plugin-lib is for TensorRT engines",
        ("seg.engine", "--plugin-lib", "nowhere.so"): "does not exist",
        ("g.onnx", "--class-names", str(tmp_path / "notes.txt")): "has 1 names; the model has 5 classes",
        ("g.onnx", "--class-names", str(tmp_path / "none.txt")): "is not a readable text file",
    }
    for args, message in cases.items():
        code, _, err = run_cli(capsys, "triton-repo", str(tmp_path / args[0]), *args[1:], "-o", str(tmp_path / "out"))
        assert code == 2, (args, err)
        assert message in one_error_line(err), (args, err)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), args
    code, _, err = run_cli(capsys, "triton-repo", str(graph), "-o", str(tmp_path / "busy"))
    assert code == 2 and "pass --force" in one_error_line(err)
    assert (tmp_path / "busy" / "g" / "config.pbtxt").read_text() == "keep me"
    (tmp_path / "file-repo").write_text("x")
    code, _, err = run_cli(capsys, "triton-repo", str(engine), "-o", str(tmp_path / "file-repo"))
    assert code == 2 and "is not a folder" in one_error_line(err)
