"""No silent no-ops: an option without effect, an option without a method, a calibration file for another model,
size or method is one error line and exit 2 with nothing written; calibrate records its options, honours the
quantile with the images it has (or takes the largest count and says so) and reports each image."""

import json

import numpy as np
import pytest

from staticprune.calibrate import capacity_rule
from staticprune.cli import main
from staticprune.methods import (
    available_methods, build_static_method, config_from_options, drop_inert_options, effective_options,
    method_config_class,
)
from staticprune.methods.tome import calibrated_options as tome_calibrated_options
from staticprune.models import build_model
from cli_helpers import one_error_line, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TINY = ["--model", "segmenter-vit-t-mask", "--size", "32x32", "--classes", "3"]


# --------------------------------------------------------------------------------------------- options without effect

# (method, options, the option without effect, a word the message must hold): every mode-dependent or overridden
# option of the method configs.
INERT = [
    ("tome", {"mode": "r", "capacity": 0.5}, "capacity", "mode=threshold"),
    ("tome", {"mode": "r", "threshold": 0.8}, "threshold", "mode=threshold"),
    ("tome", {"mode": "r", "inclusive": False}, "inclusive", "mode=threshold"),
    ("tome", {"mode": "r", "capacities": [10, 8]}, "capacities", "mode=threshold"),
    ("tome", {"mode": "threshold", "r": 8}, "r", "mode=r"),
    ("tome", {"mode": "threshold", "capacity": 0.5, "capacities": [9]}, "capacity", "capacities"),
    ("cts", {"preset": "cityscapes-768", "k": 3}, "k", "preset"),
    ("cts", {"k": 3, "tokens": 40}, "tokens", "k here"),
    ("cts", {"tokens": 40, "reduction": 0.2}, "reduction", "tokens here"),
    ("cts", {"policy_weights": "p.pth", "policy_width": 0.5}, "policy_width", "policy_weights"),
    ("dcts", {"preset": "tau-4999", "thresholds": [0.5, 0.5, 0.5, 0.5]}, "thresholds", "preset"),
    ("dcts", {"capacity": 20, "capacity_ratio": 0.5}, "capacity_ratio", "capacity"),
    ("dcts", {"policy_weights": "p.pth", "policy_seed": 3}, "policy_seed", "policy_weights"),
    ("dtop", {"capacity": [30], "capacity_ratio": [0.5]}, "capacity_ratio", "capacity"),
    ("lvtp", {"capacity": [30], "capacity_ratio": [0.5]}, "capacity_ratio", "capacity"),
    ("step", {"preset": "000-vit-b", "exit_layers": [5]}, "exit_layers", "preset"),
    ("step", {"preset": "000-vit-b", "tau": [0.5, 0.5, 0.5, 0.5]}, "tau", "preset"),
    ("step", {"token_capacity": 40, "token_capacity_ratio": 0.5}, "token_capacity_ratio", "token_capacity"),
    ("step", {"capacity": [20], "capacity_ratio": [0.5]}, "capacity_ratio", "capacity"),
    ("step", {"policy_weights": "p.pth", "policy_width": 0.5}, "policy_width", "policy_weights"),
]


@pytest.mark.parametrize("method,options,inert,hint", INERT)
def test_an_option_without_effect_is_one_value_error(method, options, inert, hint):
    cls = method_config_class(method)
    with pytest.raises(ValueError) as info:
        config_from_options(cls, options)
    message = str(info.value)
    assert message.startswith(f"option {inert}=") and "has no effect" in message and hint in message, message
    assert "\n" not in message
    # without it the same options are valid, and nothing else was flagged
    config_from_options(cls, {k: v for k, v in options.items() if k != inert})


def test_valid_combinations_stay_valid():
    for method, options in [("tome", {"mode": "threshold", "threshold": 0.8, "capacity": 0.5, "inclusive": False}),
                            ("tome", {"mode": "r", "r": [4], "layers": [1, 2]}), ("cts", {"preset": "x", "k": -1}),
                            ("dcts", {"capacity_ratio": 0.5}), ("step", {"capacity_ratio": [0.5], "tau": [0.5]})]:
        config_from_options(method_config_class(method), options)


def test_calibrate_k_only_works_in_calibrate():
    model = build_model("segmenter-vit-t-mask", (64, 64), num_classes=3)
    with pytest.raises(ValueError, match="calibrate_k=true has no effect here"):
        build_static_method("cts", {"calibrate_k": True}, model)


def test_cli_export_refuses_an_option_the_mode_ignores(capsys, tmp_path):
    out = tmp_path / "x.onnx"
    code, stdout, err = run_cli(capsys, "export", *TINY, "--method", "tome", "--opt", "mode=r", "--opt", "capacity=0.5",
                             "-o", str(out))
    line = _strict_error_line(err)
    assert code == 2 and "option capacity=0.5 has no effect" in line and "--opt mode=threshold" in line
    assert not out.exists() and stdout == ""


def test_cli_refuses_an_option_without_a_method(capsys, tmp_path):
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(capsys, "export", *TINY, "--opt", "r=8", "-o", str(out))
    line = _strict_error_line(err)
    assert code == 2 and "--opt r=8 has no effect without a method" in line and "--method" in line
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"method_options": {"r": [2]}}))
    code, _, err = run_cli(capsys, "export", *TINY, "--config", str(config), "-o", str(out))
    assert code == 2 and "names no method" in _strict_error_line(err)
    assert not out.exists()


def test_inert_options_recorded_in_an_old_graph_are_dropped_for_rebuilding():
    assert drop_inert_options("tome", {"r": [4], "capacity": 0.5}) == ({"r": [4]}, ["capacity"])
    assert drop_inert_options("tome", {"mode": "threshold", "capacity": 0.5}) == (
        {"mode": "threshold", "capacity": 0.5}, [])


@pytest.mark.parametrize("method", available_methods())
def test_effective_options_read_back_to_the_same_config(method):
    cls = method_config_class(method)
    recorded = effective_options(method, {})
    assert set(recorded) | set(cls().inert_options() if hasattr(cls, "inert_options") else {}) == {
        f for f in cls.__dataclass_fields__}
    assert config_from_options(cls, json.loads(json.dumps(recorded))) == cls()


# --------------------------------------------------------------------------------------------- calibrate


@pytest.fixture(scope="module")
def tome_r_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "tome.json"
    assert main(["calibrate", *TINY, "--method", "tome", "--opt", "mode=r", "--count", "2", "-o", str(path)]) == 0
    return path


def test_calibrate_records_the_options_of_a_static_mode(tome_r_calibration):
    data = json.loads(tome_r_calibration.read_text())
    assert data["method"] == "tome" and data["model"] == "segmenter-vit-t-mask" and data["size"] == [32, 32]
    recorded = data["method_options"]
    assert recorded == effective_options("tome", {"mode": "r"})  # every option, defaults filled in
    assert recorded["mode"] == "r" and {"r", "layers", "prop_attn", "unmerge"} <= set(recorded)
    assert not {"threshold", "capacity", "capacities", "inclusive"} & set(recorded)  # no effect in mode r


@pytest.mark.parametrize("override,expected", [
    (["--size", "64x64"], "was calibrated for 32x32, not 64x64"),
    (["--model", "segmenter-vit-t-linear"], "was calibrated for segmenter-vit-t-mask, not segmenter-vit-t-linear"),
    (["--method", "algm"], "is for method tome, not algm"),
])
def test_a_calibration_for_another_model_size_or_method_is_refused(tome_r_calibration, capsys, tmp_path, override,
                                                                    expected):
    argv = dict(zip(TINY[::2], TINY[1::2]))
    argv.update(dict(zip(override[::2], override[1::2])))
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(capsys, "export", *[a for kv in argv.items() for a in kv], "--config",
                        str(tome_r_calibration), "-o", str(out))
    line = _strict_error_line(err)
    assert code == 2 and expected in line and "calibrate" in line, line
    assert not out.exists()


def test_calibrate_takes_the_largest_count_when_the_quantile_needs_more_images(capsys, tmp_path):
    out = tmp_path / "cal.json"
    code, stdout, err = run_cli(capsys, "calibrate", "--model", "segmenter-vit-t-mask", "--size", "64x64", "--classes",
                             "3", "--method", "tome", "--opt", "mode=threshold", "--opt", "threshold=0.5", "--count",
                             "6", "--quantile", "0.99", "-o", str(out))
    assert code == 0, err
    progress = [line for line in err.splitlines() if line.startswith("[staticprune] image ")]
    assert [line.split()[2] for line in progress] == [f"{i}/6" for i in range(1, 7)]
    assert all("generated #" in line and "of 16 tokens after layer12" in line for line in progress)
    last_counts = [int(line.split(" kept ")[1].split()[0]) for line in progress]
    assert len(set(last_counts)) > 1  # the images differ, so the largest count is a real choice
    assert "hold 6 of 6 image(s)" in stdout and "the largest count seen" in stdout and ">= 100" in stdout, stdout
    data = json.loads(out.read_text())
    largest = [int(data["kept"][f"layer{i}"]["max"]) for i in range(1, 13)]
    assert data["method_options"]["capacities"] == largest and largest[-1] == max(last_counts)
    assert data["method_options"]["mode"] == "threshold" and data["method_options"]["threshold"] == 0.5
    assert data["capacity_rule"] == {"quantile": 0.99, "images": 6, "images_held": 6, "largest_count": True}


def test_capacity_rule_is_the_nearest_rank():
    counts = [50, 10, 40, 20, 60, 30]
    rule = capacity_rule(0.5, len(counts))
    assert (rule.held, rule.is_max) == (3, False)
    assert tome_calibrated_options({"layer1": counts}, rule.quantile, {"mode": "threshold"})["capacities"] == [30]
    rule = capacity_rule(0.99, len(counts))
    assert (rule.held, rule.quantile, rule.is_max) == (6, 1.0, True)
    rule = capacity_rule(0.99, 100)
    assert rule.held == 99 and not rule.is_max
    many = list(range(1, 101))
    assert tome_calibrated_options({"layer1": many}, rule.quantile, {"mode": "threshold"})["capacities"] == [99]
    assert float(np.quantile(np.asarray(counts, float), 0.99)) < 60  # what the old interpolated rule gave
    with pytest.raises(ValueError, match="quantile"):
        capacity_rule(0.0, 6)


def test_calibrate_refuses_count_0_without_images(capsys, tmp_path):
    out = tmp_path / "cal.json"
    code, _, err = run_cli(capsys, "calibrate", *TINY, "--method", "tome", "--count", "0", "-o", str(out))
    assert code == 2 and "--count 0" in _strict_error_line(err) and not out.exists()


def _strict_error_line(err: str) -> str:
    line = one_error_line(err)
    assert line.startswith("staticprune: error: "), line
    return line
