"""ToMe: static graph vs eager reference (L1), ONNX Runtime vs static (L2), lint, CLI.

Random-weight ViTs give near-uniform similarities, so thresholds are picked per case from the similarities the
reference actually sees (midpoints between neighbouring observed values, so no decision sits on a knife edge),
and every case asserts that merges happened.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from dataclasses import fields

import pytest
import torch

import staticprune.reference.tome as ref_tome
from staticprune.cli import main as cli_main
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method
from staticprune.methods.tome import ToMeConfig, calibrated_options, decode_after
from staticprune.models import build_model
from staticprune.ops.bipartite import best_edges
from staticprune.ops.merge import descending_rank
from staticprune.pipeline import ModelConfig, build
from staticprune.verify.levels import condition_mask_decoder, l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx

L1_TOL, L2_TOL = 1e-5, 1e-4
SIZES = [(64, 64), (48, 80), (96, 64), (80, 48)]
_MODELS: dict[tuple, torch.nn.Module] = {}


# ------------------------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def well_conditioned(model):
    return condition_mask_decoder(model, seed=7)


def plant_key_ties(model):
    """Make block 1's head-averaged keys exactly one of three one-hot directions, chosen by the patch content.

    Each patch token becomes e_2c - e_2c+1 (c = the channel lit in its top-left pixel; position embedding 0),
    its LayerNorm is then exactly +-rstd on those two coordinates and 0 elsewhere, and every head's key takes
    coordinate 2c alone. Cosine similarities are exactly 0 or 1 in any summation order, so ties are exact on
    every backend and only the lowest-index rule decides.
    """
    bb = model.backbone
    d = bb.cfg.dim
    hd = d // bb.cfg.heads
    with torch.no_grad():
        bb.pos_embed.zero_()
        w = bb.patch_embed.proj.weight
        w.zero_()
        bb.patch_embed.proj.bias.zero_()
        for c in range(3):
            w[2 * c, c, 0, 0], w[2 * c + 1, c, 0, 0] = 1.0, -1.0
        qkv = bb.blocks[0].attn.qkv
        qkv.weight[d : 2 * d].zero_()
        qkv.bias[d : 2 * d].zero_()
        for h in range(bb.cfg.heads):
            for c in range(3):
                qkv.weight[d + h * hd + c, 2 * c] = 1.0
    return model


def planted_image(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Random pixels, except each patch's top-left pixel: one-hot over RGB, three patch classes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, *size, generator=g)
    gh, gw = size[0] // 16, size[1] // 16
    cls = torch.randint(0, 3, (batch, gh, gw), generator=g)
    corner = torch.nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).float()
    img[:, :, ::16, ::16] = corner
    return img


def get_model(name: str, size: tuple[int, int], planted: bool = False):
    key = (name, size, planted)
    if key not in _MODELS:
        model = well_conditioned(build_model(name, size, seed=len(_MODELS)))
        _MODELS[key] = plant_key_ties(model) if planted else model
    return _MODELS[key]


@contextmanager
def captured_edges(module):
    """Record the mergeable edge scores the reference computes (module.best_edges is wrapped)."""
    seen: list[torch.Tensor] = []
    original = module.best_edges

    def spy(metric, protected, *distill):
        e = original(metric, protected, *distill)
        seen.append(ref_tome.mergeable(e))
        return e

    module.best_edges = spy
    try:
        yield seen
    finally:
        module.best_edges = original


def midpoint_threshold(values: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two neighbouring observed values near the quantile."""
    v = torch.unique(values.flatten())
    if len(v) < 2:
        return float(v[0]) - 1e-3
    k = min(max(int(quantile * (len(v) - 1)), 0), len(v) - 2)
    return float((v[k] + v[k + 1]) / 2)


def attach(model, options: dict):
    model.method = build_static_method("tome", options, model)
    return model


def l1_case(i: int) -> dict:
    """Case i of the randomized L1 sweep: model, size, batch, mode, schedule, options; every 4th has ties."""
    rng = random.Random(1000 + i)
    planted = i % 4 == 3
    name = "segvit-vit-b-atm" if i % 19 == 4 else rng.choice(  # ViT-B is slow on 2 cores: 3 cases
        ["segmenter-vit-t-linear", "segmenter-vit-t-mask", "segmenter-vit-t-mask", "segmenter-vit-s-linear",
         "segmenter-vit-s-mask"])
    sizes = SIZES if "vit-t" in name else SIZES[:1] if "segvit" in name else SIZES[:2]
    mode = "threshold" if i % 2 else "r"
    layers = (1,) if planted else rng.choice([(), (1,), (1, 2, 3), (2, 5, 9), (1, 4, 7, 10), (3, 4)])
    opts = {"mode": mode, "layers": list(layers), "prop_attn": rng.random() < 0.7}
    if mode == "r":
        n_layers = len(layers) or 12
        opts["r"] = rng.choice([[1], [2], [3], [0.1], [rng.randint(0, 3) for _ in range(n_layers)]])
    if name != "segvit-vit-b-atm" and rng.random() < 0.3:
        opts["unmerge"] = "before"
    return dict(name=name, size=rng.choice(sizes), batch=rng.choice([1, 2]), planted=planted,
                opts=opts, tight=mode == "threshold" and rng.random() < 0.7, quantile=rng.uniform(0.2, 0.7),
                seed=i)


def run_l1(case: dict):
    model = get_model(case["name"], case["size"], case["planted"])
    shape = (case["batch"], 3, *case["size"])
    img = planted_image(case["batch"], case["size"], case["seed"]) if case["planted"] else generated_inputs(
        shape, 1, seed=case["seed"])[0]
    opts = dict(case["opts"])
    if opts["mode"] == "threshold":
        if case["planted"]:
            opts["threshold"] = 0.5  # similarities are exactly 0 or 1
        else:  # the first merging layer's similarities, seen through a run that merges nothing
            with captured_edges(ref_tome) as seen:
                ref_tome.reference_forward(model, img, {**opts, "threshold": 2.0})
            # the lowest per-image choice, so that every image of the batch merges
            opts["threshold"] = min(midpoint_threshold(v, case["quantile"]) for v in seen[: case["batch"]])
        if case["tight"]:  # capacities = the largest kept count per layer: padding, and exactly full buffers
            opts = calibrated_options(ref_tome.reference_forward(model, img, opts).kept, 1.0, opts)
    attach(model, {**opts, "expose_decisions": True})
    static = run_static(model, img)
    ref = ref_tome.reference_forward(model, img, opts)
    return model, img, opts, static, ref


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
    last = max(ref.kept, key=lambda k: int(k[len("layer"):]))
    assert max(ref.kept[last]) < n0, f"{case}: an image merged nothing"
    if i % 3 == 0:  # the owner map the decoder unmerges with
        _, state = model.features(img)
        assert torch.equal(state.owner - state.num_prefix, ref.owner)


def test_l1_planted_ties_resolve_to_lowest_index():
    """With exactly tied keys, merged A tokens go to the lowest-index B token of their class and the r
    merges are the lowest-index tied A tokens, in both implementations."""
    model = get_model("segmenter-vit-t-linear", (64, 64), planted=True)
    img = planted_image(2, (64, 64), seed=3)
    opts = {"r": [4], "layers": [1]}
    attach(model, {**opts, "expose_decisions": True})
    static, ref = run_static(model, img), ref_tome.reference_forward(model, img, opts)
    assert l1_compare(static, ref).decisions_equal
    dec = static["decision_layer1"]
    cls = img[:, :, ::16, ::16].argmax(1).flatten(1)  # patch classes; token t = patch t - 1 (CLS first)
    for b in range(2):
        a_class = {k: int(cls[b, 2 * k - 1]) for k in range(1, 9)}  # A token k = sequence position 2k
        b_class = [int(cls[b, 2 * j]) for j in range(8)]  # B token j = position 2j + 1
        tied = [k for k in range(1, 9) if a_class[k] in b_class]  # score exactly 1, the rest exactly 0
        expected = sorted(sorted(range(1, 9), key=lambda k: (k not in tied, k))[:4])
        assert [k for k in range(9) if dec[b, k] >= 0] == expected
        for k in expected:  # first maximum: the lowest-index B token of the same class (all 0: B token 0)
            assert int(dec[b, k]) == (b_class.index(a_class[k]) if k in tied else 0)


def test_rank_and_edges_break_ties_by_lowest_index():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (3, 40), generator=g).float()
    cand = torch.rand(3, 40, generator=g) < 0.8
    rank = descending_rank(score, cand)
    keyed = torch.where(cand, score, torch.full_like(score, -math.inf))
    expected = torch.empty_like(rank)
    expected.scatter_(1, torch.sort(keyed, dim=1, descending=True, stable=True).indices,
                      torch.arange(40).expand(3, 40))
    assert torch.equal(rank, expected)
    metric = torch.zeros(1, 7, 4)
    metric[0, :, 0] = 1.0  # all tokens identical: every edge ties
    edges = best_edges(metric, torch.ones(1, 7, dtype=torch.bool), 1)
    assert edges.partner.tolist() == [[0, 0, 0, 0]] and edges.candidate.tolist() == [[False, True, True, True]]


# ------------------------------------------------------------------------------------------- capacity


def test_overflow_fallback_is_deterministic_and_reported():
    model = get_model("segmenter-vit-t-mask", (96, 64))
    img = generated_inputs((2, 3, 96, 64), 1, seed=5)[0]
    opts = {"mode": "threshold", "layers": [1, 2, 3]}
    with captured_edges(ref_tome) as seen:
        ref_tome.reference_forward(model, img, {**opts, "threshold": 2.0})
    opts["threshold"] = min(midpoint_threshold(v, 0.5) for v in seen[:2])
    ref = ref_tome.reference_forward(model, img, opts)
    cap = min(ref.kept["layer1"]) - 3
    assert cap >= 12  # above the floor a bipartite merge can reach (13 tokens -> 12 patches), so no clamping
    attach(model, {**opts, "capacities": [cap, 24, 24], "expose_decisions": True})
    a, b = run_static(model, img), run_static(model, img)
    assert all(torch.equal(a[k], b[k]) for k in a)
    excess = torch.tensor(ref.kept["layer1"]) - cap
    assert (a["overflow"] >= excess).all() and (a["overflow"] > 0).all()
    assert torch.isfinite(a["logits"]).all()
    # Fallback at layer 1: the reference's merges, plus the next-best edges, until exactly `cap` patches remain.
    mine, theirs = a["decision_layer1"], ref.decisions["layer1"]
    assert ((theirs < 0) | (mine == theirs)).all()
    n0 = 24
    assert ((mine >= 0).sum(1) == n0 - cap).all()


def test_mode_r_never_overflows_and_capacities_come_from_the_quantile():
    assert calibrated_options({"layer1": [10, 12]}, 0.99, {"r": [2]}) == {"r": [2]}
    out = calibrated_options({"layer1": list(range(100)), "layer3": [5] * 100}, 0.99,
                             {"mode": "threshold", "layers": [1, 3], "capacity": 0.5})
    assert out == {"mode": "threshold", "layers": [1, 3], "capacities": [99, 5]}
    model = attach(get_model("segmenter-vit-t-linear", (64, 64)), {"r": [3]})
    assert run_static(model, generated_inputs((2, 3, 64, 64), 1)[0])["overflow"].tolist() == [0, 0]


# ------------------------------------------------------------------------------------------- options


def test_reference_defaults_match_the_static_config():
    static = {f.name: f.default for f in fields(ToMeConfig)}
    for key, (_, default) in ref_tome.TOME_OPTIONS.items():
        assert static[key] == default, key
    assert set(static) - set(ref_tome.TOME_OPTIONS) == {"capacity", "capacities", "expose_decisions"}


@pytest.mark.parametrize("options", [{"bogus": 1}, {"mode": "fast"}, {"r": [1, 2]}, {"layers": [13]},
                                     {"mode": "threshold", "capacities": [5, 5]}, {"r": [2.5]},
                                     {"unmerge": "sideways"}])
def test_bad_options_are_one_value_error(options):
    with pytest.raises(ValueError):
        build(ModelConfig(model="segmenter-vit-t-linear", size=(64, 64), method="tome", method_options=options))


def test_decoding_after_equals_the_decoder_on_an_unreduced_state():
    """decode_after re-implements the Segmenter decoders on reduced tokens: without reduction it must be them."""
    for name in ("segmenter-vit-t-linear", "segmenter-vit-t-mask"):
        model = build_model(name, (48, 80))
        img = generated_inputs((2, 3, 48, 80), 1)[0]
        with torch.no_grad():
            feats, state = model.features(img)
            kind = model.spec.decoder
            mine = decode_after(model.decoder, state, kind, model.grid, model.image_size)
            assert (mine - model.decoder(feats, model.grid, model.image_size)).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------- L2, lint, CLI


def _export_verify(model, shape, seed=1, inputs=None):
    example = generated_inputs(shape, 1, seed=0)[0]
    result = export_to_proto(model, example, opset=17, output_names=model.output_names())
    report = verify_onnx(result.model, model, inputs or generated_inputs(shape, 1, seed=seed), tol=L2_TOL,
                         output_names=result.output_names)
    return result, report


def _assert_l2(result, report):
    assert all(lint_model(result.model, t).ok for t in ("orin-jp6", "orin-jp60"))
    ops = {n.op_type for n in result.model.graph.node}
    assert "TopK" not in ops
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
    """The one full-size check: threshold mode with capacities (padding, compaction, fallback in the graph)."""
    opts = {"mode": "threshold", "threshold": 0.9, "layers": [1, 2, 3, 4, 5, 6], "capacity": 0.75,
            "expose_decisions": True}
    model = build(ModelConfig(model="segmenter-vit-s-mask", size=(512, 512), method="tome", method_options=opts))
    result, report = _export_verify(model, (1, 3, 512, 512))
    _assert_l2(result, report)


@pytest.mark.parametrize("name,options,planted", [
    ("segmenter-vit-t-mask", {"r": [3], "layers": [1]}, True),  # exact ties through ONNX Runtime
    ("segmenter-vit-t-linear", {"mode": "threshold", "threshold": 0.3, "capacity": 10, "layers": [1, 2, 3]}, False),
    # no class token; merges in blocks 0, 5, 6 (0-based): the states after blocks 5, 7, 11 that the ATM head
    # reads each carry a different owner map
    ("segvit-vit-b-atm", {"mode": "threshold", "threshold": 0.3, "capacity": 0.8, "layers": [1, 6, 7]}, False),
])
def test_l2_small(name, options, planted):
    model = attach(get_model(name, (64, 64), planted), {**options, "expose_decisions": True})
    inputs = [planted_image(1, (64, 64), seed=11)] if planted else None
    _assert_l2(*_export_verify(model, (1, 3, 64, 64), inputs=inputs))


def test_cli_export_with_options_and_config(tmp_path, capsys):
    out = tmp_path / "tome.onnx"
    args = ["export", "--model", "segmenter-vit-t-mask", "--size", "64x64", "--method", "tome", "-o", str(out)]
    assert cli_main(args + ["--opt", "mode=threshold", "--opt", "capacity=0.5", "--opt", "layers=1,2,3",
                            "--target", "orin-jp60"]) == 0
    assert "lint (orin-jp60): clean" in capsys.readouterr().out
    config = tmp_path / "tome.json"
    config.write_text(json.dumps({"method": "tome", "method_options": {"r": [2], "prop_attn": False}}))
    args_cfg = ["export", "--model", "segmenter-vit-t-linear", "--size", "48x80", "--config", str(config),
                "-o", str(tmp_path / "cfg.onnx")]
    assert cli_main(args_cfg) == 0
    assert cli_main(args + ["--force", "--opt", "bogus=1"]) == 2
