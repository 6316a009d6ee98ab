"""ALGM: static graph vs eager reference (L1), ONNX Runtime vs static (L2), lint, CLI.

Random-weight ViTs give near-uniform similarities, so the CLAP threshold (and a fixed GBM threshold where a case
uses one) is picked per case from the scores the reference actually sees: halfway between neighbouring
observed values, so no decision sits on a knife edge. Every case asserts that merges happened.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import fields

import pytest
import torch

import staticprune.reference.algm as ref_algm
from staticprune.cli import main as cli_main
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method
from staticprune.methods.algm import ALGMConfig, calibrated_options
from staticprune.models import build_model
from staticprune.ops.window_pool import window_members, window_of_patch
from staticprune.pipeline import ModelConfig, build
from staticprune.reference.tome import mergeable
from staticprune.verify.levels import condition_mask_decoder, l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx

L1_TOL, L2_TOL = 1e-5, 1e-4
SIZES = [(64, 64), (48, 80), (96, 64), (80, 48)]
_MODELS: dict[tuple, torch.nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ------------------------------------------------------------------------------------------- helpers


def well_conditioned(model):
    return condition_mask_decoder(model, seed=7)


def plant_ties(model, gbm_layer: int):
    """Exact ties at both points.

    CLAP: each patch token is exactly one-hot (the channel lit in its top-left pixel; position embedding 0) and
    block 1's attention adds exactly 0, so window scores are multiples of 1/12 in any summation order and equal
    windows tie exactly. GBM (with gbm_metric=keys): every key is exactly e_0, so every edge scores exactly 1.
    """
    bb = model.backbone
    d, hd = bb.cfg.dim, bb.cfg.dim // bb.cfg.heads
    with torch.no_grad():
        bb.pos_embed.zero_()
        w = bb.patch_embed.proj.weight
        w.zero_()
        bb.patch_embed.proj.bias.zero_()
        for c in range(3):
            w[c, c, 0, 0] = 1.0
        bb.blocks[0].attn.proj.weight.zero_()
        bb.blocks[0].attn.proj.bias.zero_()
        qkv = bb.blocks[gbm_layer - 1].attn.qkv
        qkv.weight[d : 2 * d].zero_()
        qkv.bias[d : 2 * d].zero_()
        qkv.bias[d : 2 * d : hd] = 1.0
    return model


def planted_image(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Random pixels, except each patch's top-left pixel: one-hot over RGB, three patch classes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, *size, generator=g)
    cls = torch.randint(0, 3, (batch, size[0] // 16, size[1] // 16), generator=g)
    img[:, :, ::16, ::16] = torch.nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).float()
    return img


def get_model(name: str, size: tuple[int, int], planted: bool = False):
    key = (name, size, planted)
    if key not in _MODELS:
        model = well_conditioned(build_model(name, size, seed=len(_MODELS)))
        _MODELS[key] = plant_ties(model, 5) if planted else model
    return _MODELS[key]


@contextmanager
def captured_scores():
    """Record the CLAP window scores and the GBM edge scores the reference computes."""
    seen: dict[str, list[torch.Tensor]] = {"clap": [], "gbm": []}
    window_scores, best_edges = ref_algm.window_scores, ref_algm.best_edges

    def clap_spy(patches, wins):
        s = window_scores(patches, wins)
        seen["clap"].append(s)
        return s

    def gbm_spy(metric, protected):
        e = best_edges(metric, protected)
        seen["gbm"].append(mergeable(e))
        return e

    ref_algm.window_scores, ref_algm.best_edges = clap_spy, gbm_spy
    try:
        yield seen
    finally:
        ref_algm.window_scores, ref_algm.best_edges = window_scores, best_edges


def midpoint_threshold(values: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two neighbouring observed values near the quantile."""
    v = torch.unique(values.flatten())
    if len(v) < 2:
        return float(v[0]) - 1e-3
    k = min(max(int(quantile * (len(v) - 1)), 0), len(v) - 2)
    return float((v[k] + v[k + 1]) / 2)


def attach(model, options: dict):
    model.method = build_static_method("algm", options, model)
    return model


def l1_case(i: int) -> dict:
    """Case i of the randomized L1 sweep; every 4th case has exact ties at both reduction points."""
    rng = random.Random(2000 + i)
    planted = i % 4 == 3
    name = "segvit-vit-b-atm" if i % 19 == 4 else rng.choice(
        ["segmenter-vit-t-linear", "segmenter-vit-t-mask", "segmenter-vit-t-mask", "segmenter-vit-s-linear",
         "segmenter-vit-s-mask"])
    sizes = SIZES if "vit-t" in name else SIZES[:1] if "segvit" in name else SIZES[:2]
    batch = rng.choice([1, 2])
    opts: dict = {"window": list(rng.choice([(2, 2), (2, 2), (2, 2), (1, 2), (2, 1), (2, 3)]))}
    if planted:
        opts.update(gbm_metric="keys", window=[2, 2])
    else:
        if rng.random() < 0.3:
            opts["gbm_layer"] = rng.choice([2, 3, 4, 6])
        if rng.random() < 0.15:
            opts["gbm_metric"] = "keys"
    opts["inclusive"] = rng.random() > 0.15
    opts["prop_attn"] = rng.random() < 0.2
    if batch == 2 and rng.random() < 0.3:
        opts["batch_coupling"] = True
    if name != "segvit-vit-b-atm" and rng.random() < 0.2:
        opts["unmerge"] = "before"
    gbm_fixed = not planted and rng.random() < 0.25
    return dict(name=name, size=rng.choice(sizes), batch=batch, planted=planted, opts=opts, gbm_fixed=gbm_fixed,
                tight=rng.random() < 0.6, quantile=rng.uniform(0.2, 0.7), seed=i)


def run_l1(case: dict):
    model = get_model(case["name"], case["size"], case["planted"])
    b = case["batch"]
    img = planted_image(b, case["size"], case["seed"]) if case["planted"] else generated_inputs(
        (b, 3, *case["size"]), 1, seed=case["seed"])[0]
    opts = dict(case["opts"])
    with captured_scores() as seen:  # a run that merges nothing at CLAP shows the window scores
        ref_algm.reference_forward(model, img, {**opts, "clap_threshold": 2.0})
    # the lowest per-image choice, so that every image pools some windows
    opts["clap_threshold"] = min(midpoint_threshold(s, case["quantile"]) for s in seen["clap"][:b])
    if case["gbm_fixed"]:
        with captured_scores() as seen:
            ref_algm.reference_forward(model, img, {**opts, "gbm_threshold": 2.0})
        opts["gbm_threshold"] = min(midpoint_threshold(s, case["quantile"]) for s in seen["gbm"][:b])
    if case["tight"]:  # capacities = the largest kept counts: padding, and exactly full buffers
        opts = calibrated_options(ref_algm.reference_forward(model, img, opts).kept, 1.0, opts)
    else:  # the whole sequence: exact for every image (the defaults trade exactness for the paper's cost)
        opts = {**opts, "clap_capacity": None, "gbm_capacity": None}
    attach(model, {**opts, "expose_decisions": True})
    return model, img, opts, run_static(model, img), ref_algm.reference_forward(model, img, opts)


# ------------------------------------------------------------------------------------------- L1


@pytest.mark.parametrize("i", range(56))
def test_l1_static_equals_reference(i):
    case = l1_case(i)
    model, img, _, static, ref = run_l1(case)
    result = l1_compare(static, ref, tol=L1_TOL)
    assert result.decisions_equal, f"{case}: decisions differ at {result.mismatched_points}"
    assert result.max_abs <= L1_TOL, f"{case}: logits differ by {result.max_abs:.2e}"
    assert result.overflow == 0
    n0 = model.grid[0] * model.grid[1]
    assert max(ref.kept["gbm"]) < n0, f"{case}: an image merged nothing"
    if i % 3 == 0:  # the owner map the decoder unmerges with
        _, state = model.features(img)
        assert torch.equal(state.owner - state.num_prefix, ref.owner)


def test_l1_cases_pool_windows():
    """The sweep is not all GBM: CLAP pools windows in (nearly) every case."""
    pooled = 0
    for i in range(0, 56, 7):
        _, _, _, static, _ = run_l1(l1_case(i))
        pooled += int((static["decision_clap"] >= 0).any(1).all())
    assert pooled >= 7


def test_planted_ties_resolve_to_lowest_index():
    """Windows with equal scores pool in window order; with every GBM edge exactly 1, every A token merges into
    B token 0 (the first maximum)."""
    model = attach(get_model("segmenter-vit-t-linear", (64, 64), planted=True),
                   {"gbm_metric": "keys", "clap_threshold": -1.0, "clap_capacity": 16, "expose_decisions": True})
    img = planted_image(2, (64, 64), seed=3)
    static = run_static(model, img)
    ref = ref_algm.reference_forward(model, img, {"gbm_metric": "keys", "clap_threshold": -1.0})
    assert l1_compare(static, ref).decisions_equal
    cls = img[:, :, ::16, ::16].argmax(1).flatten(1)
    members = window_members((4, 4), (2, 2))
    for b in range(2):
        # score of a window: 2 * (same-class ordered pairs) / 12; order by score, ties by window index
        counts = [torch.bincount(cls[b, members[w]], minlength=3) for w in range(4)]
        score = [int((c * (c - 1)).sum()) for c in counts]
        order = sorted(range(4), key=lambda w: (-score[w], w))
        assert static["decision_clap"][b].tolist() == [order.index(w) for w in range(4)]
        gbm = static["decision_gbm"][b]
        n_a = (1 + 4 + 1) // 2  # CLS + 4 pooled windows -> 5 tokens, A = positions 0, 2, 4
        assert gbm[1:n_a].tolist() == [0] * (n_a - 1) and gbm[0] == -1


def test_window_layout_non_divisible_grid():
    """A 3x5 grid holds two complete 2x2 windows; the remainder strip belongs to none."""
    assert window_members((3, 5), (2, 2)).tolist() == [[0, 1, 5, 6], [2, 3, 7, 8]]
    owner = window_of_patch((3, 5), (2, 2))
    assert owner.tolist() == [0, 0, 1, 1, 2, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]


# ------------------------------------------------------------------------------------------- capacity


def test_overflow_fallback_is_deterministic_and_reported():
    model = get_model("segmenter-vit-t-mask", (96, 64))
    img = generated_inputs((2, 3, 96, 64), 1, seed=5)[0]
    opts = {"clap_threshold": 0.0}
    with captured_scores() as seen:
        ref_algm.reference_forward(model, img, {"clap_threshold": 2.0})
    opts["clap_threshold"] = min(midpoint_threshold(s, 0.7) for s in seen["clap"][:2])
    ref = ref_algm.reference_forward(model, img, opts)
    n0 = 24
    cap = min(ref.kept["clap"]) - 4  # at least two more windows must pool
    attach(model, {**opts, "clap_capacity": cap, "gbm_capacity": 8, "expose_decisions": True})
    a, b = run_static(model, img), run_static(model, img)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (a["overflow"] >= torch.tensor(ref.kept["clap"]) - cap).all()
    assert torch.isfinite(a["logits"]).all()
    # Fallback at CLAP: the reference's windows (same order), then the next-best, until the patches fit.
    mine, theirs = a["decision_clap"], ref.decisions["clap"]
    assert ((theirs < 0) | (mine == theirs)).all()
    need = -(-(n0 - cap) // 3)
    assert ((mine >= 0).sum(1) == need).all()
    _, state = model.features(img)
    assert ((state.size[:, 1:] > 0).sum(1) <= 8).all()


def test_calibrated_options_take_the_quantile_rounded_up():
    out = calibrated_options({"clap": list(range(100)), "gbm": [7] * 9 + [9]}, 0.99, {"clap_threshold": 0.9})
    assert out == {"clap_threshold": 0.9, "clap_capacity": 99, "gbm_capacity": 9}
    with pytest.raises(ValueError):
        calibrated_options({"clap": [3]}, 0.99, {})


# ------------------------------------------------------------------------------------------- options


def test_reference_defaults_match_the_static_config():
    static = {f.name: f.default for f in fields(ALGMConfig)}
    for key, (_, default) in ref_algm.ALGM_OPTIONS.items():
        want = tuple(float(v) for v in default) if isinstance(default, tuple) else default
        got = tuple(float(v) for v in static[key]) if isinstance(static[key], tuple) else static[key]
        assert got == want, key
    assert set(static) - set(ref_algm.ALGM_OPTIONS) == {"clap_capacity", "gbm_capacity", "expose_decisions"}


def test_defaults_follow_the_backbone():
    """GBM in layer 5 for ViT-T/S/B, 7 for ViT-L; CLAP thresholds from the official ADE20K settings."""
    for name, layer, tau in [("segmenter-vit-t-linear", 5, 0.90), ("segmenter-vit-s-mask", 5, 0.88)]:
        model = build(ModelConfig(model=name, size=(64, 64), method="algm"))
        assert model.method.gbm_layer == layer and model.method.clap_threshold == tau


@pytest.mark.parametrize("options,model", [
    ({"bogus": 1}, "segmenter-vit-t-linear"), ({"clap_layer": 5}, "segmenter-vit-t-linear"),
    ({"window": [1, 1]}, "segmenter-vit-t-linear"), ({"window": [5, 5]}, "segmenter-vit-t-linear"),
    ({"gbm_metric": "queries"}, "segmenter-vit-t-linear"), ({"unmerge": "after"}, "segvit-vit-b-atm"),
    ({"gbm_layer": 13}, "segmenter-vit-t-linear"), ({"clap_capacity": -2}, "segmenter-vit-t-linear"),
])
def test_bad_options_are_one_value_error(options, model):
    with pytest.raises(ValueError):
        build(ModelConfig(model=model, size=(64, 64), method="algm", method_options=options))


# ------------------------------------------------------------------------------------------- L2, lint, CLI


def _export_verify(model, shape, inputs=None):
    result = export_to_proto(model, generated_inputs(shape, 1, seed=0)[0], opset=17,
                             output_names=model.output_names())
    report = verify_onnx(result.model, model, inputs or generated_inputs(shape, 1, seed=1), tol=L2_TOL,
                         output_names=result.output_names)
    return result, report


def _assert_l2(result, report):
    assert all(lint_model(result.model, t).ok for t in ("orin-jp6", "orin-jp60"))
    assert "TopK" not in {n.op_type for n in result.model.graph.node}
    for node in result.model.graph.node:
        if node.op_type == "ScatterElements":
            assert all(a.name != "reduction" or a.s in (b"", b"none") for a in node.attribute)
    outputs = {o.name: o for o in report.outputs}
    for name, o in outputs.items():
        if name.startswith("decision_"):
            assert o.mismatches == 0, f"{name}: {o.mismatches} decisions differ"
    assert outputs["logits"].comparable and outputs["logits"].max_abs <= L2_TOL
    assert report.ok


def test_l2_segmenter_vit_s_mask_512():
    """The one full-size check, within capacity: CLAP keeps ~800 of 1024 patches here, GBM ~600."""
    opts = {"clap_threshold": 0.7, "clap_capacity": 0.85, "gbm_capacity": 0.65, "expose_decisions": True}
    model = build(ModelConfig(model="segmenter-vit-s-mask", size=(512, 512), method="algm", method_options=opts))
    result, report = _export_verify(model, (1, 3, 512, 512))
    _assert_l2(result, report)
    assert {o.name: o for o in report.outputs}["overflow"].mismatches == 0


@pytest.mark.parametrize("name,options,planted,batch", [
    ("segmenter-vit-t-mask", {"gbm_metric": "keys", "clap_threshold": 0.2, "clap_capacity": 12}, True, 1),
    ("segmenter-vit-t-linear", {"clap_threshold": 0.1, "clap_capacity": 10, "gbm_capacity": 6,
                                "batch_coupling": True}, False, 2),
    ("segvit-vit-b-atm", {"clap_threshold": 0.3, "gbm_layer": 6, "gbm_capacity": 0.5}, False, 1),
])
def test_l2_small(name, options, planted, batch):
    model = attach(get_model(name, (64, 64), planted), {**options, "expose_decisions": True})
    inputs = [planted_image(batch, (64, 64), seed=11)] if planted else generated_inputs((batch, 3, 64, 64), 1, 1)
    _assert_l2(*_export_verify(model, (batch, 3, 64, 64), inputs=inputs))


def test_cli_export_with_options_and_config(tmp_path, capsys):
    out = tmp_path / "algm.onnx"
    args = ["export", "--model", "segmenter-vit-t-mask", "--size", "64x80", "--method", "algm", "-o", str(out)]
    assert cli_main(args + ["--opt", "clap_capacity=0.75", "--opt", "window=2,2", "--opt", "gbm_layer=4",
                            "--target", "orin-jp60"]) == 0
    assert "lint (orin-jp60): clean" in capsys.readouterr().out
    config = tmp_path / "algm.json"
    config.write_text(json.dumps({"method": "algm", "method_options": {"clap_threshold": 0.5, "gbm_capacity": 9}}))
    args_cfg = ["export", "--model", "segmenter-vit-t-linear", "--size", "48x80", "--config", str(config),
                "-o", str(tmp_path / "cfg.onnx")]
    assert cli_main(args_cfg) == 0
    assert cli_main(args + ["--force", "--opt", "clap_layer=9"]) == 2
