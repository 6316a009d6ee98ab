"""STEP (dCTS supertokens + DToP exits): static == eager reference (L1), ONNX Runtime == static (L2), lint, overflow.

Random policy scores and random prune heads are uninformative, so every case picks the dCTS thresholds and the exit
thresholds between observed values (never an observed value) and asserts that supertokens form and tokens exit.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
import types

import pytest
import torch

from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods.step import (
    PRESETS,
    STEPConfig,
    calibrated_options,
    split_config,
)
from staticprune.methods.step import build as build_step
from staticprune.models import SegmentationModel, ViTConfig, build_model, get_spec
from staticprune.ops.pruning import NO_MARGIN
from staticprune.reference import step as step_ref
from staticprune.reference.step import reference_forward
from staticprune.verify.levels import l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx

DEPTH = 6
EXITS = [1, 3]
POINTS = [f"layer{i}" for i in EXITS]
SIZES = [(64, 64), (128, 128), (96, 128), (128, 96), (64, 160), (160, 96)]  # even grids (policy stride 32)
BASE = {"exit_layers": EXITS, "head_layers": 2, "policy_width": 0.25}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@functools.cache
def tiny_segvit(hw: tuple[int, int], classes: int) -> SegmentationModel:
    vit = ViTConfig(dim=192, depth=DEPTH, heads=3, ln_eps=1e-6, use_cls_token=False, final_norm=False,
                    out_indices=(1, 3, DEPTH - 1))
    spec = dataclasses.replace(get_spec("segvit-vit-b-atm"), vit=vit, atm_dim=96, atm_heads=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SegmentationModel(spec, hw, classes).eval()


def spread_heads(method: torch.nn.Module, seed: int, saturate: bool = False) -> None:
    """Unit-variance prune heads; `saturate`: auxiliary confidences of exactly 1.0 for many tokens (planted ties)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in [*method.aux_heads, method.final_head]:
            for p in head.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            for layer in head.decoder.layers:
                layer.multihead_attn.k.weight.mul_(3.0)
            head.class_embed.weight.mul_(3.0)
        if saturate:
            for head in method.aux_heads:
                head.decoder.layers[-1].multihead_attn.q.weight.mul_(10.0)
                head.class_embed.weight.zero_()
                head.class_embed.bias.copy_(torch.tensor([60.0, -60.0]))


def with_step(hw, classes, options, seed=0, saturate=False) -> SegmentationModel:
    """Capacities: every patch unless `options` gives counts (the default ratios trade exactness for the paper's
    cost)."""
    model = copy.copy(tiny_segvit(hw, classes))
    model._modules = dict(model._modules)
    exact = {**({} if "token_capacity" in options else {"token_capacity_ratio": 1.0}),
             **({} if "capacity" in options else {"capacity_ratio": [1.0]})}
    model.method = build_step({**BASE, **exact, **options}, model)
    spread_heads(model.method, seed + 100, saturate)
    return model


def between(values: torch.Tensor, quantile: float) -> float:
    """Halfway between two distinct observed values near the quantile (clipped to [0, 1])."""
    distinct = torch.unique(values.double()).tolist()
    if len(distinct) < 2:
        return min(1.0, distinct[0] + 1e-3) if distinct else 0.5
    i = min(max(int(quantile * len(distinct)), 1), len(distinct) - 1)
    return (distinct[i - 1] + distinct[i]) / 2


def pick_taus(model, img, rng: random.Random) -> list[float]:
    """dCTS thresholds: many 2x2 windows, fewer large ones; set on the module, returned for the reference."""
    dcts = model.method.dcts
    scores = dcts.policy_scores(img)
    quantiles = {2: rng.uniform(0.3, 0.7), 4: rng.uniform(0.6, 0.9), 8: rng.uniform(0.85, 0.97), 16: 0.99}
    taus = {s: between(scores[s], quantiles[s]) if s in scores else 0.9 for s in (2, 4, 8, 16)}
    dcts.taus = tuple(taus[s] for s in dcts.sizes)
    return [taus[s] for s in (2, 4, 8, 16)]


def pick_thresholds(model, img, rng: random.Random) -> list[float]:
    """Exit thresholds between observed confidences (a run with thresholds 2: margin = 2 - confidence)."""
    model.method.thresholds = [2.0, 2.0]
    out = run_static(model, img)
    chosen = []
    for p in POINTS:
        margin = out[f"margin_{p}"]
        chosen.append(between(2.0 - margin[margin < NO_MARGIN / 2], rng.uniform(0.3, 0.8)))
    model.method.thresholds = list(chosen)
    return chosen


def configure(model, img, seed: int, keep: int) -> dict:
    rng = random.Random(seed)
    taus = pick_taus(model, img, rng)
    thresholds = pick_thresholds(model, img, rng)
    return {**BASE, "tau": taus, "threshold": thresholds, "keep_top_per_class": keep}


# --------------------------------------------------------------------------------------------- L1


def l1_cases():
    """52 cases: even grids incl. non-square, batch 1 and 2, 3 or 5 classes, keep-top 1-5, both nesting rules,
    exact or tight capacities (dCTS token capacity and exit capacities)."""
    rng = random.Random(11)
    for i in range(52):
        yield (i, SIZES[i % len(SIZES)], 1 + i % 2, rng.choice([3, 5]), rng.choice([1, 2, 3, 5]),
               rng.choice(["top_down", "top_down", "bottom_up"]), i % 3 == 2)


@pytest.fixture(scope="module")
def l1_results():
    rows = []
    for i, hw, batch, classes, keep, nesting, tight in l1_cases():
        model = with_step(hw, classes, {"nesting": nesting, "keep_top_per_class": keep, "expose_decisions": True}, i)
        img = generated_inputs((batch, 3, *hw), 1, seed=700 + i)[0]
        options = {**configure(model, img, i, keep), "nesting": nesting}
        ref = reference_forward(model, img, options)
        if tight:
            n = model.grid[0] * model.grid[1]
            model.method.dcts.capacity = max(math.ceil(n / 4), max(ref.kept["embed"]))
            model.method.capacities = [max(ref.kept[p]) for p in POINTS]
        static = run_static(model, img)
        rows.append((i, hw, batch, ref, static, l1_compare(static, ref)))
    return rows


def test_l1_decisions_and_logits_equal_the_reference(l1_results):
    failures = [(i, hw, batch, r) for i, hw, batch, _, _, r in l1_results if not r.ok or r.overflow]
    assert not failures, failures
    assert len(l1_results) >= 50 and max(r.max_abs for *_, r in l1_results) <= 1e-5
    assert {hw[0] != hw[1] for _, hw, *_ in l1_results} == {True, False}
    assert {batch for _, _, batch, *_ in l1_results} == {1, 2}


def test_l1_cases_form_supertokens_and_halt(l1_results):
    supertokens = halted = 0
    for _, hw, _, ref, static, _ in l1_results:
        for point, decision in ref.decisions.items():
            assert torch.equal(static[f"decision_{point}"], decision)
        n = hw[0] * hw[1] // 256
        supertokens += int(all(k < n for k in ref.kept["embed"]))
        halted += int(all((static[f"decision_{p}"] == 1).any() for p in POINTS))
    assert supertokens >= 45 and halted >= 35, (supertokens, halted)


def test_a_halted_supertoken_halts_all_its_patches(l1_results):
    checked = 0
    for *_, ref, static, _ in l1_results:
        owner = ref.owner
        for p in POINTS:
            decision = static[f"decision_{p}"]
            for b in range(owner.shape[0]):
                for token in owner[b].unique():
                    values = decision[b][owner[b] == token]
                    assert (values == values[0]).all()
                    checked += int(len(values) > 1 and values[0] == 1)
    assert checked > 0


def test_planted_ties_in_exit_confidences():
    tied_cases = 0
    for i, (hw, batch) in enumerate([((128, 128), 1), ((96, 128), 2), ((128, 96), 2)]):
        model = with_step(hw, 3, {"keep_top_per_class": 2, "expose_decisions": True}, 40 + i, saturate=True)
        img = generated_inputs((batch, 3, *hw), 1, seed=40 + i)[0]
        taus = pick_taus(model, img, random.Random(i))
        model.method.thresholds = [0.5, 0.5]
        options = {**BASE, "tau": taus, "threshold": [0.5], "keep_top_per_class": 2}
        static = run_static(model, img)
        result = l1_compare(static, reference_forward(model, img, options))
        assert result.ok, result
        margin, decision = static[f"margin_{POINTS[0]}"], static[f"decision_{POINTS[0]}"]
        tied = (margin == 0) & (decision >= 0)
        tied_cases += int(((decision == 0) & tied).any() and ((decision == 1) & tied).any())
    assert tied_cases >= 2


def test_overflow_at_an_exit_is_reported():
    for i, (hw, batch) in enumerate([((128, 128), 2), ((96, 128), 1)]):
        model = with_step(hw, 3, {"keep_top_per_class": 2, "expose_decisions": True}, 80 + i)
        img = generated_inputs((batch, 3, *hw), 1, seed=80 + i)[0]
        options = configure(model, img, 80 + i, 2)
        ref = reference_forward(model, img, options)
        capacity = max(1, min(ref.kept[POINTS[0]]) - 2)
        model.method.capacities = [capacity, capacity]
        static = run_static(model, img)
        assert static["overflow"].tolist() == [max(0, k - capacity) for k in ref.kept[POINTS[0]]]
        assert static["overflow"].sum() > 0
        assert torch.equal(static["decision_embed"], ref.decisions["embed"])
        assert torch.equal(static[f"decision_{POINTS[0]}"], ref.decisions[POINTS[0]])


# --------------------------------------------------------------------------------------------- L2 + lint


def test_l2_onnx_runtime_equals_static_and_lints_clean():
    hw = (128, 160)
    model = with_step(hw, 4, {"keep_top_per_class": 2, "expose_decisions": True}, 13)
    imgs = generated_inputs((1, 3, *hw), 2, seed=13)
    options = configure(model, torch.cat(imgs), 13, 2)
    ref = reference_forward(model, torch.cat(imgs), options)
    n = model.grid[0] * model.grid[1]
    model.method.dcts.capacity = max(math.ceil(n / 4), max(ref.kept["embed"]))
    model.method.capacities = [max(ref.kept[p]) for p in POINTS]
    proto = export_to_proto(model, imgs[0], opset=17, output_names=model.output_names()).model
    report = verify_onnx(proto, model, imgs)
    outputs = {o.name: o for o in report.outputs}
    assert report.ok, report.format()
    for name in ("decision_embed", *(f"decision_{p}" for p in POINTS)):
        assert outputs[name].mismatches == 0
    assert outputs["logits"].max_abs <= 1e-4 and outputs["overflow"].mismatches == 0
    assert all(k < n for k in ref.kept["embed"]) and all(min(ref.kept[p]) < max(ref.kept["embed"]) for p in POINTS[:1])
    for target in ("orin-jp6", "orin-jp60"):
        lint = lint_model(proto, target)
        assert lint.ok, lint.format()


# --------------------------------------------------------------------------------------------- options


def test_presets_and_defaults_agree_with_the_reference():
    assert PRESETS == step_ref.PRESETS
    vit_b = types.SimpleNamespace(spec=get_spec("segvit-vit-b-atm"))
    vit_l = types.SimpleNamespace(spec=get_spec("segvit-vit-l-atm"))
    assert split_config(STEPConfig(), 12)[1].exit_layers == (7,) == tuple(step_ref.split_options(vit_b, {})[1]["exit_layers"])
    assert split_config(STEPConfig(), 24)[1].exit_layers == (7, 15) == tuple(step_ref.split_options(vit_l, {})[1]["exit_layers"])
    dcts, dtop = split_config(STEPConfig(preset="001-vit-l-18-tau4999", threshold=(0.95,)), 24)
    assert dtop.exit_layers == (17,) and dcts.thresholds == (0.4, 0.9, 0.9, 0.9) and dtop.threshold == (0.95,)
    dcts, dtop = split_config(STEPConfig(preset="000-vit-b"), 12)
    assert dtop.exit_layers == (7,) and dcts.thresholds == (0.6, 0.8, 0.9, 0.9) and dtop.threshold == (0.9,)


def test_segmenter_models_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="SegViT"):
        build_step({}, build_model("segmenter-vit-t-mask", (64, 64)))
    model = tiny_segvit((64, 64), 3)
    for bad in [{"preset": "nope"}, {"exit_layers": [DEPTH - 1]}, {"nesting": "sideways"}, {"tau": [0.5]},
                {"token_capacity": 17}, {"keep_top_per_class": 0}, {"nope": 1}]:
        with pytest.raises(ValueError):
            build_step({**BASE, **bad}, model)
    assert build_step({**BASE, "token_capacity": 1}, model).dcts.capacity == 4  # raised to N/4 of 16 patches


def test_calibrated_options_set_both_capacities():
    kept = {"embed": [40, 50, 60], "layer7": [10, 30, 20]}
    out = calibrated_options(kept, 1.0, {"token_capacity_ratio": 0.5, "threshold": 0.95})
    assert out == {"threshold": 0.95, "token_capacity": 60, "capacity": [30]}
