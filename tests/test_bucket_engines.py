"""`staticprune build DIR` on a capacity-bucket pipeline, the engine manifest for C++, examples/cpp/segment_buckets.

TensorRT is not installed here: the single-graph build (staticprune.trt.engine.build_engine) is replaced in-process
by a stand-in that writes an engine file and its sidecar as the real one does, and `tensorrt` by an empty module
(only its import is checked before building). The pipeline is a real export (ViT-T 64x96, G2TM, buckets 8, 16, 24).
The manifest is checked by the grammar of docs/buckets.md against the graphs' real tensor names, and by the C++
parser itself (examples/cpp/bucket_manifest.h, compiled with a small driver where g++ exists).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest

from cli_helpers import one_error_line, run_cli
from staticprune.cli import main
from staticprune.runtime.buckets import ENGINE_MANIFEST_FILE, BucketedRunner, stage_graphs
from staticprune.trt import engine as trt_engine

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "examples" / "cpp"
GRAPHS = ["stage0-prefix-g2tm.onnx", "stage1-g2tm-c8.onnx", "stage1-g2tm-c16.onnx", "stage1-g2tm-c24.onnx"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread) -> Path:
    folder = tmp_path_factory.mktemp("bucket-engines") / "g2tm"
    assert main(["export", "--model", "segmenter-vit-t-mask", "--size", "64x96", "--classes", "5", "--method", "g2tm",
                 "--labels", "--buckets", "8,16", "-o", str(folder)]) == 0
    return folder


@pytest.fixture
def pipeline(exported, tmp_path) -> Path:
    """A fresh copy of the exported folder (the tests change it)."""
    return Path(shutil.copytree(exported, tmp_path / "g2tm"))


class FakeBuild:
    """Stands in for build_engine: records each call, writes the engine and its sidecar (or fails at `fail_at`)."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[dict] = []
        self.fail_at = fail_at

    def __call__(self, onnx_path, engine_path, **options):
        self.calls.append({"onnx": onnx_path, "engine": engine_path, **options})
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: stand-in failure")
        Path(engine_path).write_bytes(b"plan of " + Path(onnx_path).name.encode())
        sidecar = {"engine": Path(engine_path).name, "tensorrt": "10.3.0", "build_seconds": 0.5}
        Path(str(engine_path) + ".json").write_text(json.dumps(sidecar))
        return sidecar


@pytest.fixture
def fake_tensorrt(monkeypatch):
    build = FakeBuild()
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(trt_engine, "build_engine", build)
    return build


def test_build_pipeline_builds_each_stage_graph_and_records_the_engines(pipeline, fake_tensorrt, tmp_path, capsys):
    cache = tmp_path / "orin.cache"
    code, out, _ = run_cli(capsys, "build", str(pipeline), "--fp16", "--timing-cache", str(cache),
                           "--workspace", "1024")
    assert code == 0, out
    assert [Path(c["onnx"]).name for c in fake_tensorrt.calls] == GRAPHS  # stage order, each graph once
    expected_engines = [str(pipeline / g.replace(".onnx", ".engine")) for g in GRAPHS]
    assert [c["engine"] for c in fake_tensorrt.calls] == expected_engines
    for call in fake_tensorrt.calls:  # the options of one graph's build, the timing cache shared
        assert (call["fp16"], call["strongly_typed"], call["timing_cache"], call["workspace_mb"]) == \
               (True, False, str(cache), 1024)
        assert call["plugins"] == [] and call["metadata"]["method"] == "g2tm"
        assert call["standard_graph"] == call["onnx"]
    spec = json.loads((pipeline / "pipeline.json").read_text())
    engines = [g.get("engine") for stage in spec["stages"] for g in stage["graphs"]]
    assert engines == [g.replace(".onnx", ".engine") for g in GRAPHS]
    assert (pipeline / ENGINE_MANIFEST_FILE).is_file() and "4 engines" in out
    # the runner now reads engines for every stage (it opens them lazily: no TensorRT needed to list them)
    runner = BucketedRunner(str(pipeline), lazy=True)
    assert [g["engine"] for graphs in runner.stages for g in graphs] == engines
    # a second build refuses to overwrite the engines, before building anything
    fake_tensorrt.calls.clear()
    code, _, err = run_cli(capsys, "build", str(pipeline / "pipeline.json"))
    assert code == 2 and "stage0-prefix-g2tm.engine' exists; pass --force" in one_error_line(err)
    assert fake_tensorrt.calls == []
    code, _, _ = run_cli(capsys, "build", str(pipeline / "pipeline.json"), "--force")
    assert code == 0 and len(fake_tensorrt.calls) == 4


def test_build_pipeline_failure_halfway_leaves_pipeline_json(pipeline, fake_tensorrt, monkeypatch, capsys):
    before = (pipeline / "pipeline.json").read_bytes()
    failing = FakeBuild(fail_at=3)
    monkeypatch.setattr(trt_engine, "build_engine", failing)
    code, _, err = run_cli(capsys, "build", str(pipeline))
    assert code == 1 and len(failing.calls) == 3
    assert "stand-in failure" in err and "pipeline.json was not changed" in err
    assert (pipeline / "pipeline.json").read_bytes() == before
    assert not (pipeline / ENGINE_MANIFEST_FILE).exists()


def test_build_pipeline_bad_input_is_one_line(pipeline, fake_tensorrt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = {
        "folder without pipeline.json": ([str(tmp_path / "empty")], "holds no pipeline.json"),
        "-o with a pipeline": ([str(pipeline), "-o", str(tmp_path / "x.engine")], "drop -o"),
        "single graph without -o": ([str(pipeline / GRAPHS[0])], "required: -o/--output"),
    }
    for label, (argv, expected) in cases.items():
        code, _, err = run_cli(capsys, "build", *argv)
        assert code == 2 and expected in one_error_line(err), label
    (pipeline / GRAPHS[2]).unlink()
    code, _, err = run_cli(capsys, "build", str(pipeline))
    assert code == 2 and f"lacks stage graph '{GRAPHS[2]}'" in one_error_line(err)
    assert fake_tensorrt.calls == []  # nothing was built for a bad folder


def test_build_pipeline_without_tensorrt_says_so_and_imports_no_torch(pipeline):
    from test_engine_tools import one_error_line as subprocess_error_line, run_without_torch

    results, _ = run_without_torch(pipeline.parent, [["build", "g2tm"], ["build", "g2tm/pipeline.json", "--fp16"]])
    for result in results:
        assert "TensorRT is not installed here" in subprocess_error_line(result)
    assert not list(pipeline.glob("*.engine")) and not (pipeline / ENGINE_MANIFEST_FILE).exists()


# ---------------------------------------------------------------------------------------------- the manifest

# docs/buckets.md, "On TensorRT and in C++": one record a line, words separated by single spaces.
NAME = r"[^\s]+"
GRAMMAR = {
    "size": r"size (\d+) (\d+)", "batch": r"batch (\d+)", "mean": r"mean (\S+) (\S+) (\S+)",
    "std": r"std (\S+) (\S+) (\S+)", "raw_input": r"raw_input ([01])", "input": rf"input ({NAME})",
    "state": rf"state ({NAME}(?: {NAME})*)", "suffix": rf"suffix ({NAME})", "count": rf"count ({NAME})",
    "output": rf"output ({NAME}(?: {NAME})*)", "point": rf"point ([1-9]\d*) ({NAME})",
    "stage": rf"stage (\d+) capacity (\d+) engine ({NAME})",
}


def parse_manifest(text: str) -> tuple[dict[str, list[tuple[str, ...]]], list[str]]:
    lines = text.splitlines()
    assert lines[0] == "staticprune-bucket-engines 1"
    records: dict[str, list[tuple[str, ...]]] = {}
    for line in lines[1:]:
        key = line.split(" ", 1)[0]
        match = re.fullmatch(GRAMMAR[key], line)
        assert match, line
        records.setdefault(key, []).append(match.groups())
    return records, lines


def graph_io(path: Path) -> tuple[list[str], list[str]]:
    proto = onnx.load(str(path), load_external_data=False)
    return [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]


@pytest.fixture
def built(pipeline, fake_tensorrt) -> Path:
    assert main(["build", str(pipeline)]) == 0
    return pipeline


def test_manifest_follows_the_grammar_and_names_real_files_and_tensors(built):
    records, _ = parse_manifest((built / ENGINE_MANIFEST_FILE).read_text())
    single = {k: v[0] for k, v in records.items() if k not in ("point", "stage")}
    assert single["size"] == ("64", "96") and single["batch"] == ("1",) and single["raw_input"] == ("0",)
    assert [float(v) for v in single["mean"] + single["std"]] == [0.5] * 6
    suffix, count = single["suffix"][0], single["count"][0]
    state, outputs = single["state"][0].split(" "), single["output"][0].split(" ")
    assert count in state and suffix == "_next" and outputs == ["logits", "labels", "overflow"]
    stages: dict[int, list[tuple[int, Path]]] = {}
    for k, capacity, engine in records["stage"]:
        stages.setdefault(int(k), []).append((int(capacity), built / engine))
    assert {k: [c for c, _ in v] for k, v in stages.items()} == {0: [0], 1: [8, 16, 24]}
    assert records["point"] == [("1", "g2tm")]
    listed = [(k, c or None, str(e.with_suffix(".onnx"))) for k, v in stages.items() for c, e in v]
    assert listed == stage_graphs(str(built))  # every engine is the one built from that graph, beside it
    for k, graphs in stages.items():
        for capacity, engine in graphs:
            assert engine.read_bytes() == b"plan of " + engine.with_suffix(".onnx").name.encode()
            inputs, outs = graph_io(engine.with_suffix(".onnx"))
            if k == 0:
                assert inputs == [single["input"][0]]
            else:  # each state input is the previous stage's output of that name + suffix
                assert inputs == state
                for _, previous in stages[k - 1]:
                    assert set(n + suffix for n in state) <= set(graph_io(previous.with_suffix(".onnx"))[1])
            if k == max(stages):
                assert outs == outputs
            else:
                assert count + suffix in outs


DRIVER = r"""
#include <fstream>
#include <iostream>
#include "bucket_manifest.h"
int main(int argc, char** argv) {
  if (argc != 2) return 2;
  std::ifstream f(argv[1]);
  BucketManifest m;
  std::string problem = parseBucketManifest(f, m);
  if (!problem.empty()) { std::cout << "error " << problem << "\n"; return 1; }
  std::cout << "size " << m.height << " " << m.width << "\nbatch " << m.batch << "\nraw_input " << m.rawInput
            << "\nmean " << m.mean[0] << " " << m.mean[1] << " " << m.mean[2] << "\ninput " << m.input
            << "\nsuffix " << m.suffix << "\ncount " << m.count << "\nstate";
  for (auto& s : m.state) std::cout << " " << s;
  std::cout << "\noutput";
  for (auto& s : m.outputs) std::cout << " " << s;
  std::cout << "\n";
  for (size_t k = 1; k < m.stages.size(); ++k) std::cout << "point " << k << " " << m.points[k - 1] << "\n";
  for (auto& stage : m.stages)
    for (auto& e : stage)
      std::cout << "stage " << e.stage << " capacity " << e.capacity << " engine " << e.engine << "\n";
  for (int count : {0, 8, 9, 24, 30})
    std::cout << "pick " << count << " " << pickBucket(m.stages[1], count).capacity << "\n";
  return 0;
}
"""


def test_cpp_manifest_parser_reads_what_python_writes(built, tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: cannot compile examples/cpp/bucket_manifest.h")
    (tmp_path / "driver.cpp").write_text(DRIVER)
    subprocess.run(["nice", "-n", "5", gxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{CPP}", "-o",
                    str(tmp_path / "driver"), str(tmp_path / "driver.cpp")], check=True, timeout=120)
    manifest = built / ENGINE_MANIFEST_FILE
    proc = subprocess.run([str(tmp_path / "driver"), str(manifest)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout
    stage_lines = [line for line in manifest.read_text().splitlines() if line.startswith(("stage ", "point "))]
    assert proc.stdout.splitlines() == [
        "size 64 96", "batch 1", "raw_input 0", "mean 0.5 0.5 0.5", "input image", "suffix _next", "count count",
        "state tokens sizes owner count carried_overflow", "output logits labels overflow", *stage_lines,
        "pick 0 8", "pick 8 8", "pick 9 16", "pick 24 24", "pick 30 24"]  # as staticprune.runtime.buckets.pick_bucket
    # a broken manifest is one line naming the problem
    text = manifest.read_text()
    for broken, expected in [(text.replace("capacity 16", "capacity 4"), "capacities must increase"),
                             (text.replace("point 1 g2tm\n", ""), "no point record for stage 1"),
                             (text.replace("count count", "count counts"), "not one of the state tensors"),
                             (text.replace("batch 1", "batch one"), "malformed 'batch' record"),
                             ("something else\n" + text, "not a staticprune engine manifest")]:
        (tmp_path / "broken.txt").write_text(broken)
        proc = subprocess.run([str(tmp_path / "driver"), str(tmp_path / "broken.txt")], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 1 and proc.stdout.startswith("error ") and expected in proc.stdout, broken


def test_segment_buckets_compiles_against_tensorrt_headers(tensorrt_include_dir):
    include_dir = str(tensorrt_include_dir)
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cuda_include = Path(cuda_home) / "include"
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no CUDA headers in {cuda_include} (set CUDA_HOME): skipping the syntax check")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    # the TensorRT and CUDA headers as system headers: their own deprecation warnings are not ours
    proc = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-isystem", include_dir,
                           "-isystem", str(cuda_include), f"-I{CPP}", str(CPP / "segment_buckets.cpp")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
