"""Bad input: one line on stderr, exit code 2, nothing written; and files written with the umask's mode.

One small graph (segmenter-vit-t-linear 32x32, 3 classes) is exported once per module and reused.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from staticprune.cli import main
from staticprune.fileio import write_bytes_atomic
from staticprune.imageio import load_input_array

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ["--model", "segmenter-vit-t-linear", "--size", "32x32"]


def bad_input(capsys, argv: list[str], expect: str) -> str:
    """Run the CLI, expect exit 2 with exactly one stderr line containing `expect`; return that line."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[staticprune]")]
    assert len(err) == 1, err
    assert expect in err[0], err[0]
    assert "Traceback" not in err[0]
    return err[0]


def bomb_png(path: Path) -> Path:
    """A 70-byte PNG whose header claims 40000 x 40000 pixels: Pillow refuses it as a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 40000, 40000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "seg.onnx"
    assert main(["export", *MODEL, "--classes", "3", "-o", str(path)]) == 0
    return path


def test_files_honour_the_umask(tmp_path, graph):
    before = os.umask(0o022)
    try:
        json_path = write_bytes_atomic(b"{}", tmp_path / "a.json")
        assert stat.S_IMODE(json_path.stat().st_mode) == 0o644
        os.umask(0o077)
        private = write_bytes_atomic(b"{}", tmp_path / "b.json")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(before)
    assert stat.S_IMODE(graph.stat().st_mode) == 0o666 & ~before  # the ONNX written by export (save_atomic)


def test_png_and_bench_json_honour_the_umask(tmp_path, capsys):
    before = os.umask(0o022)
    try:
        png, bench = tmp_path / "tokens.png", tmp_path / "bench.json"
        image = tmp_path / "in.png"
        Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
        assert main(["show-tokens", str(image), *MODEL, "--method", "tome", "-o", str(png)]) == 0
        assert main(["bench", *MODEL, "--backends", "none", "--json", str(bench)]) == 0
        for path in (png, bench):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    finally:
        os.umask(before)


def test_decompression_bomb_is_bad_input(tmp_path, capsys, graph):
    bomb = bomb_png(tmp_path / "bomb.png")
    expect = "is too large to decode safely (1600000000 pixels, over Pillow's decompression-bomb limit"
    bad_input(capsys, ["verify", str(graph), "--input", str(bomb), "--json", str(tmp_path / "v.json")], expect)
    bad_input(capsys, ["show-tokens", str(bomb), *MODEL, "--method", "tome", "-o", str(tmp_path / "t.png")], expect)
    images = tmp_path / "images"
    images.mkdir()
    bomb_png(images / "a.png")
    bad_input(capsys, ["calibrate", *MODEL, "--method", "tome", "--images", str(images), "-o",
                       str(tmp_path / "c.json")], expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png", "images"]


def test_unwritable_output_fails_before_the_build(tmp_path, capsys):
    line = bad_input(capsys, ["export", *MODEL, "-o", "/proc/seg.onnx"], "cannot write output '/proc/seg.onnx'")
    assert "building" not in capsys.readouterr().err and "/proc" in line
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder should be
    bad_input(capsys, ["export", *MODEL, "-o", str(blocker / "seg.onnx")], "is not a directory")
    bad_input(capsys, ["export", *MODEL, "-o", str(tmp_path / "a.onnx"), "--json", str(tmp_path)], "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("argv,expect", [
    (["export", *MODEL, "--verify-inputs", "0", "-o", "{tmp}/a.onnx"], "--verify-inputs must be >= 1 (got 0)"),
    (["bench", *MODEL, "--repeats", "0"], "--repeats must be >= 1 (got 0)"),
    (["calibrate", *MODEL, "--method", "tome", "--count", "-1", "-o", "{tmp}/c.json"], "--count must be >= 0 (got -1)"),
    (["export", *MODEL, "--classes", "0", "-o", "{tmp}/a.onnx"], "--classes must be >= 1 (got 0)"),
    (["export", *MODEL, "--backbone-only", "-o", "{tmp}/a.onnx"], "--backbone-only needs --weights"),
])
def test_counts_out_of_range(tmp_path, capsys, argv, expect):
    bad_input(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], expect)
    assert list(tmp_path.iterdir()) == []


def test_verify_inputs_zero(tmp_path, capsys, graph):
    bad_input(capsys, ["verify", str(graph), "--inputs", "0", "--json", str(tmp_path / "v.json")],
              "--inputs must be >= 1 (got 0)")
    assert list(tmp_path.iterdir()) == []


def test_config_that_is_not_a_json_object(tmp_path, capsys):
    config = tmp_path / "list.json"
    config.write_text(json.dumps(["tome", {"r": 2}]))
    bad_input(capsys, ["export", *MODEL, "--config", str(config), "-o", str(tmp_path / "a.onnx")],
              f"config '{config}' is not a method config: expected a JSON object")
    config.write_text(json.dumps({"method": "tome", "method_options": [1, 2]}))
    bad_input(capsys, ["export", *MODEL, "--config", str(config), "-o", str(tmp_path / "a.onnx")],
              "is not a method config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.json"]


def test_empty_or_foreign_bytes_are_not_onnx(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    bad_input(capsys, ["lint", str(empty)], f"'{empty}' is empty, not an ONNX model")
    text = tmp_path / "text.onnx"
    text.write_bytes(b"\n\x00")  # protobuf parses this as an empty message
    bad_input(capsys, ["lint", str(text)], "is not an ONNX model (no opset or no graph nodes)")


def test_verify_of_a_foreign_graph_names_the_mismatch(tmp_path, capsys, graph):
    foreign = onnx.load(str(graph))
    del foreign.metadata_props[:]  # a graph from elsewhere: 3 output channels, no staticprune metadata
    path = tmp_path / "foreign.onnx"
    onnx.save(foreign, str(path))
    line = bad_input(capsys, ["verify", str(path), *MODEL, "--json", str(tmp_path / "v.json")],
                     "outputs 'logits' 1x3x32x32, the rebuilt model (segmenter-vit-t-linear 32x32, 150 classes")
    assert line.endswith("logits 1x150x32x32: pass --classes 3")
    bad_input(capsys, ["verify", str(path), "--model", "segmenter-vit-t-linear", "--size", "32x48"],
              "takes input 1x3x32x32, the rebuilt model (segmenter-vit-t-linear 32x48")
    assert main(["verify", str(path), *MODEL, "--classes", "3", "--inputs", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.onnx"]


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray(np.round(ramp / 257.0).astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    sixteen = load_input_array(tmp_path / "g16.png", (32, 32), (0, 0, 0), (1, 1, 1), raw=True)
    eight = load_input_array(tmp_path / "g8.png", (32, 32), (0, 0, 0), (1, 1, 1), raw=True)
    assert np.array_equal(sixteen, eight)
    assert sixteen.min() == 0.0 and sixteen.max() == 255.0 and abs(float(sixteen.mean()) - 127.4) < 0.5


def test_policy_weights_resolve_from_another_directory(tmp_path, monkeypatch, capsys):
    """A dCTS graph exported with a relative --opt policy_weights verifies from any directory."""
    from staticprune.models.policy import build_policy

    torch.save(build_policy("", 0.25, 3, (2, 4, 8, 16)).state_dict(), tmp_path / "policy.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["export", *MODEL, "--classes", "3", "--method", "dcts", "--opt", "policy_weights=policy.pth", "-o", "out/d.onnx"]) == 0
    recorded = json.loads(next(p.value for p in onnx.load("out/d.onnx").metadata_props if p.key == "staticprune"))
    assert recorded["method_options"]["policy_weights"] == str(tmp_path / "policy.pth")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["verify", "../out/d.onnx", "--inputs", "1"]) == 0


def test_version_and_command_line_in_the_graph(capsys, graph):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    from staticprune import __version__

    assert capsys.readouterr().out.strip() == f"staticprune {__version__}"
    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    assert meta["staticprune.version"] == __version__
    assert meta["staticprune.command"] == (f"staticprune export --model segmenter-vit-t-linear --size 32x32 "
                                           f"--classes 3 -o {graph}")
