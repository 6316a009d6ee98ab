"""DToP: static module == eager reference (L1), ONNX Runtime == static (L2), lint, capacity/overflow, CLI.

Random weights give uninformative confidences, so every case picks its thresholds from the confidences it
observes (midpoints between two observed values, never an observed value itself) and asserts that tokens exit.
Prune heads get unit-variance weights here (`spread_heads`) so that confidences spread over (0, 1).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
import types

import pytest
import torch

from staticprune.cli import main
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods.dtop import DToPConfig, PrunedTokenState, calibrated_options
from staticprune.methods.dtop import build as build_dtop
from staticprune.models import SegmentationModel, ViTConfig, build_model, get_spec
from staticprune.ops.pruning import NO_MARGIN, group_topk
from staticprune.reference.dtop import parse_options, prune_heads, reference_forward
from staticprune.verify.levels import l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx

DEPTH = 6
EXITS = [1, 3]
POINTS = [f"layer{i}" for i in EXITS]
SIZES = [(64, 64), (96, 128), (128, 96), (80, 144), (112, 112), (144, 64)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@functools.cache
def tiny_segvit(hw: tuple[int, int], classes: int, seed: int = 0) -> SegmentationModel:
    """SegViT layout (no CLS, ATM head) at ViT-T width and 6 blocks: the registry only has ViT-B/L SegViTs.
    Cached: cases differ by their prune heads, images, thresholds and options, not by the backbone."""
    vit = ViTConfig(dim=192, depth=DEPTH, heads=3, ln_eps=1e-6, use_cls_token=False, final_norm=False,
                    out_indices=(1, 3, DEPTH - 1))
    spec = dataclasses.replace(get_spec("segvit-vit-b-atm"), name="segvit-vit-t-atm", size="t", vit=vit, atm_dim=96,
                               atm_heads=3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SegmentationModel(spec, hw, classes).eval()


def spread_heads(method: torch.nn.Module, seed: int, saturate: bool = False) -> None:
    """Unit-variance prune heads (confidences spread over (0, 1)); `saturate` makes the auxiliary heads' class
    presence and mask sigmoid hit 1.0 exactly in float32, so that many tokens share confidence 1.0: planted ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in [*method.aux_heads, method.final_head]:
            for name, p in head.named_parameters():
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


def with_dtop(hw, classes, options, seed=0, saturate=False) -> SegmentationModel:
    """A (shallow) copy of the cached model with its own DToP module; 2-layer heads keep the suite fast. Capacities:
    every patch unless `options` gives counts (the default ratio trades exactness for the paper's cost)."""
    model = copy.copy(tiny_segvit(hw, classes))
    model._modules = dict(model._modules)
    exact = {} if "capacity" in options else {"capacity_ratio": [1.0]}
    model.method = build_dtop({"exit_layers": EXITS, "head_layers": 2, **exact, **options}, model)
    spread_heads(model.method, seed + 100, saturate)
    return model


def ref_options(model, thresholds, keep) -> dict:
    return {"exit_layers": EXITS, "head_layers": 2, "threshold": thresholds, "keep_top_per_class": keep}


def threshold_between(conf: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two distinct observed confidences near the quantile."""
    values = torch.unique(conf.double()).tolist()
    if len(values) < 2:
        return 0.5
    i = min(max(int(quantile * len(values)), 1), len(values) - 1)
    return (values[i - 1] + values[i]) / 2


def pick_thresholds(model, img, rng: random.Random) -> list[float]:
    """One run with thresholds 2 (nothing exits; margin = 2 - confidence), then thresholds between observed
    confidences of each head (the later head's confidences shift once tokens exit, but stay in range)."""
    model.method.thresholds = [2.0, 2.0]
    out = run_static(model, img)
    chosen = []
    for p in POINTS:
        margin = out[f"margin_{p}"]
        chosen.append(threshold_between(2.0 - margin[margin < NO_MARGIN / 2], rng.uniform(0.3, 0.8)))
    model.method.thresholds = list(chosen)
    return chosen


# --------------------------------------------------------------------------------------------- L1


def l1_cases():
    """52 cases: sizes incl. non-square, batch 1 and 2, 3 or 5 classes, keep-top 1-5, exact or tight capacities."""
    rng = random.Random(7)
    for i in range(52):
        yield i, SIZES[i % len(SIZES)], 1 + i % 2, rng.choice([3, 5]), rng.choice([1, 2, 3, 5]), i % 3 == 2


@pytest.fixture(scope="module")
def l1_results():
    rows = []
    for i, hw, batch, classes, keep, tight in l1_cases():
        model = with_dtop(hw, classes, {"keep_top_per_class": keep, "expose_decisions": True}, seed=i)
        img = generated_inputs((batch, 3, *hw), 1, seed=500 + i)[0]
        thresholds = pick_thresholds(model, img, random.Random(i))
        ref = reference_forward(model, img, ref_options(model, thresholds, keep))
        if tight:  # capacity = the largest kept count of the batch: real compaction, padding, no overflow
            model.method.capacities = [max(ref.kept[p]) for p in POINTS]
        static = run_static(model, img)
        rows.append((i, hw, batch, ref, static, l1_compare(static, ref)))
    return rows


def test_l1_decisions_and_logits_equal_the_reference(l1_results):
    failures = [(i, hw, batch, r) for i, hw, batch, _, _, r in l1_results if not r.ok or r.overflow]
    assert not failures, failures
    assert len(l1_results) >= 50
    assert max(r.max_abs for *_, r in l1_results) <= 1e-5
    assert {hw[0] != hw[1] for _, hw, *_ in l1_results} == {True, False}
    assert {batch for _, _, batch, *_ in l1_results} == {1, 2}


def test_l1_cases_actually_halt_at_every_exit(l1_results):
    halted = {p: 0 for p in POINTS}
    for _, _, _, ref, static, _ in l1_results:
        for p in halted:
            halted[p] += int((static[f"decision_{p}"] == 1).any())
            assert torch.equal(static[f"decision_{p}"], ref.decisions[p])
    assert halted[POINTS[0]] >= 45 and halted[POINTS[1]] >= 35, halted


def test_planted_ties_go_to_the_lower_index():
    """Saturated auxiliary heads: many tokens have confidence exactly 1.0 (presence and sigmoid both round to 1),
    so the keep-top-per-class boundary falls inside a run of exact ties; static and reference agree."""
    tied_cases = 0
    for i, (hw, batch) in enumerate([((96, 128), 1), ((128, 96), 2), ((112, 112), 2), ((64, 144), 1)]):
        model = with_dtop(hw, 3, {"keep_top_per_class": 2, "expose_decisions": True, "threshold": [0.5]}, seed=40 + i,
                          saturate=True)
        img = generated_inputs((batch, 3, *hw), 1, seed=40 + i)[0]
        ref = reference_forward(model, img, ref_options(model, [0.5], 2))
        static = run_static(model, img)
        result = l1_compare(static, ref)
        assert result.ok, result
        margin, decision = static[f"margin_{POINTS[0]}"], static[f"decision_{POINTS[0]}"]
        tied = (margin == 0) & (decision >= 0)
        tied_cases += int(((decision == 0) & tied).any() and ((decision == 1) & tied).any())
    assert tied_cases >= 3, "the planted ties did not reach the keep/exit boundary"


def test_group_topk_breaks_ties_by_lowest_index():
    score = torch.tensor([[0.5, 0.9, 0.9, 0.9, 0.2, 0.9, 0.9, 0.7]])
    group = torch.tensor([[0, 1, 1, 1, 0, 1, 0, 0]])
    member = torch.tensor([[True, True, True, True, True, True, True, False]])
    top = group_topk(score, group, member, 2, 2)
    assert top.selected.tolist() == [[True, True, True, False, False, False, True, False]]
    assert top.kth_value.tolist() == [[pytest.approx(0.5), pytest.approx(0.9)]]
    assert top.next_value.tolist() == [[pytest.approx(0.2), pytest.approx(0.9)]]


def test_overflow_is_reported_and_the_first_survivors_in_raster_order_stay():
    for i, (hw, batch) in enumerate([((96, 128), 2), ((128, 96), 1), ((112, 112), 2)]):
        model = with_dtop(hw, 3, {"keep_top_per_class": 2, "expose_decisions": True}, seed=70 + i)
        img = generated_inputs((batch, 3, *hw), 1, seed=70 + i)[0]
        thresholds = pick_thresholds(model, img, random.Random(i))
        ref = reference_forward(model, img, ref_options(model, thresholds, 2))
        capacity = max(1, min(ref.kept[POINTS[0]]) - 3)
        model.method.capacities = [capacity, capacity]
        static = run_static(model, img)
        expected = [max(0, k - capacity) for k in ref.kept[POINTS[0]]]
        assert static["overflow"].tolist() == expected and sum(expected) > 0
        assert torch.equal(static[f"decision_{POINTS[0]}"], ref.decisions[POINTS[0]])  # the rule itself is unchanged
        for b in range(batch):
            survivors = (ref.decisions[POINTS[0]][b] == 0).nonzero().flatten()
            in_sequence = (static[f"decision_{POINTS[1]}"][b] >= 0).nonzero().flatten()
            assert torch.equal(in_sequence, survivors[:capacity])


def test_state_restores_every_patch_and_the_owner_addresses_frozen_rows():
    model = with_dtop((96, 128), 3, {"expose_decisions": True, "capacity": [20, 12]}, seed=3)
    img = generated_inputs((2, 3, 96, 128), 1, seed=3)[0]
    pick_thresholds(model, img, random.Random(3))
    state, outs = model.backbone(img, model.method)
    assert isinstance(state, PrunedTokenState) and state.x.shape[1] == 12
    full = state.patch_tokens()
    assert full.shape == (2, 48, 192)
    gone = state.owner >= state.x.shape[1]
    assert gone.any() and torch.equal(full[gone], state.frozen[gone])
    assert outs[0].patch_tokens().shape == (2, 48, 192)


# --------------------------------------------------------------------------------------------- L2 + lint


def test_l2_onnx_runtime_equals_static_and_lints_clean():
    hw = (128, 160)
    model = with_dtop(hw, 4, {"keep_top_per_class": 2, "expose_decisions": True}, seed=11)
    imgs = generated_inputs((1, 3, *hw), 2, seed=11)
    thresholds = pick_thresholds(model, torch.cat(imgs), random.Random(11))
    ref = reference_forward(model, torch.cat(imgs), ref_options(model, thresholds, 2))
    model.method.capacities = [max(ref.kept[POINTS[0]]), max(ref.kept[POINTS[1]])]
    proto = export_to_proto(model, imgs[0], opset=17, output_names=model.output_names()).model
    report = verify_onnx(proto, model, imgs)
    outputs = {o.name: o for o in report.outputs}
    assert report.ok, report.format()
    assert outputs[f"decision_{POINTS[0]}"].mismatches == 0 and outputs[f"decision_{POINTS[1]}"].mismatches == 0
    assert outputs["logits"].max_abs <= 1e-4 and outputs["overflow"].mismatches == 0
    statics = [run_static(model, x) for x in imgs]
    assert all(any((out[f"decision_{p}"] == 1).any() for out in statics) for p in POINTS)  # tokens exit at both heads
    for target in ("orin-jp6", "orin-jp60"):
        lint = lint_model(proto, target)
        assert lint.ok, lint.format()


# --------------------------------------------------------------------------------------------- options, CLI


def test_reference_defaults_and_heads_match_the_static_module():
    model = tiny_segvit((64, 96), 5)
    static = build_dtop({"exit_layers": EXITS}, model)
    opts = parse_options(model, {"exit_layers": EXITS})
    cfg = DToPConfig()
    assert opts.thresholds == tuple(cfg.threshold) * 2 and opts.keep_top == cfg.keep_top_per_class
    assert opts.head_layers == cfg.head_layers and opts.head_seed == cfg.head_seed
    aux, final = prune_heads(tiny_segvit((64, 96), 5), opts)  # a model without the method: heads rebuilt from seed
    for mine, theirs in zip([*static.aux_heads, static.final_head], [*aux, final]):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    vit_l = types.SimpleNamespace(spec=get_spec("segvit-vit-l-atm"))
    assert parse_options(vit_l, {}).exit_layers == (7, 15) and parse_options(vit_l, {}).head_heads == 8


def test_segmenter_models_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="SegViT"):
        build_dtop({}, build_model("segmenter-vit-t-mask", (32, 32)))
    model = tiny_segvit((64, 64), 3)
    for bad in [{"exit_layers": [4, 2]}, {"exit_layers": [DEPTH - 1]}, {"threshold": [0.9, 0.9, 0.9]},
                {"keep_top_per_class": 0}, {"capacity_ratio": [1.5]}, {"head_heads": 5}, {"nope": 1}]:
        with pytest.raises(ValueError):
            build_dtop({"exit_layers": EXITS, **bad}, model)


def test_calibrated_options_take_the_quantile_per_exit():
    kept = {"layer7": [10, 30, 20], "layer5": [40, 50, 60]}
    out = calibrated_options(kept, 1.0, {"threshold": 0.95})
    assert out == {"threshold": 0.95, "capacity": [60, 30]}


def test_cli_refuses_dtop_on_segmenter(capsys, tmp_path):
    code = main(["export", "--model", "segmenter-vit-t-mask", "--size", "32x32", "--method", "dtop",
                 "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "SegViT" in err and not (tmp_path / "x.onnx").exists()
