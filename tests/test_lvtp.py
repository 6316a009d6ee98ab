"""LVTP: static module == eager reference (L1), ONNX Runtime == static (L2), lint, capacity/overflow, CLI.

LVTP needs no thresholds: its clusterings always split the tokens, so random weights prune. Options are drawn per
case over the whole option space (cluster counts, iterations, entropy orders, rate, restore rule, progressive
schedules) so that every branch of the selection meets the reference.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import random

import onnx
import pytest
import torch

from staticprune.cli import main
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods.lvtp import LVTPConfig, calibrated_options
from staticprune.methods.lvtp import build as build_lvtp
from staticprune.models import SegmentationModel, ViTConfig, build_model, get_spec
from staticprune.ops.clustering import patch_mean, sobel_energy
from staticprune.reference.lvtp import (
    parse_options,
    reference_forward,
    sobel_patch_energy,
)
from staticprune.verify.levels import condition_mask_decoder, l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx

SIZES = [(64, 64), (96, 128), (128, 96), (80, 144), (112, 112), (144, 64)]
CLASSES = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@functools.cache
def backbone_model(name: str, hw: tuple[int, int]) -> SegmentationModel:
    if name == "segvit-tiny":  # SegViT layout (no CLS, ATM head on blocks 3/5/11) at ViT-T width
        vit = ViTConfig(dim=192, depth=12, heads=3, ln_eps=1e-6, use_cls_token=False, final_norm=False,
                        out_indices=(3, 5, 11))
        spec = dataclasses.replace(get_spec("segvit-vit-b-atm"), vit=vit, atm_dim=96, atm_heads=3)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return SegmentationModel(spec, hw, CLASSES).eval()
    model = build_model(name, hw, num_classes=CLASSES)
    condition_mask_decoder(model, seed=2)  # class embeddings as distinct as trained ones
    return model


def with_lvtp(name: str, hw: tuple[int, int], options: dict) -> SegmentationModel:
    """Capacities: every patch unless `options` gives counts (the default ratio trades exactness for the paper's
    cost)."""
    model = copy.copy(backbone_model(name, hw))
    model._modules = dict(model._modules)
    exact = {} if "capacity" in options or "capacity_ratio" in options else {"capacity_ratio": [1.0]}
    model.method = build_lvtp({**exact, **options}, model)
    return model


def random_options(rng: random.Random) -> dict:
    clusters = rng.randint(2, 8)
    return {
        "prune_layers": rng.choice([[5], [3], [2, 7], [4, 8]]),
        "q1": rng.choice([1.5, 2.0, 3.0]), "q2": rng.choice([0.3, 0.5, 0.8]),
        "temperature": rng.choice([0.5, 1.0, 2.0]), "clip_alpha": rng.random() < 0.7,
        "clusters": clusters, "keep_clusters": rng.randint(1, clusters - 1), "kmeans_iters": rng.choice([0, 1, 3, 5]),
        "edge_clusters": rng.randint(2, 8), "prune_rate": rng.choice([0.3, 0.5, 0.7, 1.0]),
        "edge_sqrt": rng.random() < 0.3, "restore": rng.choice(["frozen", "frozen", "zero"]),
    }


def l1_cases():
    """56 cases: Segmenter mask (most), linear and a SegViT layout; sizes incl. non-square; batch 1 and 2."""
    rng = random.Random(3)
    names = ["segmenter-vit-t-mask"] * 5 + ["segmenter-vit-t-linear", "segvit-tiny"]
    for i in range(56):
        yield i, names[i % len(names)], SIZES[i % len(SIZES)], 1 + i % 2, random_options(rng), i % 3 == 2


@pytest.fixture(scope="module")
def l1_results():
    rows = []
    for i, name, hw, batch, options, tight in l1_cases():
        img = generated_inputs((batch, 3, *hw), 1, seed=900 + i)[0]
        ref = reference_forward(backbone_model(name, hw), img, options)  # the plain model: LVTP has no parameters
        static_options = {**options, "expose_decisions": True}
        if tight:  # the largest kept count of the batch at each point: padding slots, no overflow
            static_options["capacity"] = [max(counts) for counts in ref.kept.values()]
        static = run_static(with_lvtp(name, hw, static_options), img)
        rows.append((i, name, hw, batch, options, ref, static, l1_compare(static, ref)))
    return rows


def test_l1_decisions_and_logits_equal_the_reference(l1_results):
    failures = [(i, name, hw, r) for i, name, hw, _, _, _, _, r in l1_results if not r.ok or r.overflow]
    assert not failures, failures
    assert len(l1_results) >= 50 and max(r.max_abs for *_, r in l1_results) <= 1e-5
    assert {hw[0] != hw[1] for _, _, hw, *_ in l1_results} == {True, False}
    assert {batch for _, _, _, batch, *_ in l1_results} == {1, 2}
    assert sum(len(opts["prune_layers"]) > 1 for *_, opts, _, _, _ in l1_results) >= 10


def test_l1_cases_prune_keep_and_rescue(l1_results):
    codes = {0: 0, 1: 0, 2: 0}
    pruned_cases = 0
    for *_, ref, static, _ in l1_results:
        for point, decision in ref.decisions.items():
            assert torch.equal(static[f"decision_{point}"], decision)
            for code in codes:
                codes[code] += int((decision == code).sum())
        pruned_cases += int(all((d == 0).any() for d in ref.decisions.values()))
    assert pruned_cases >= 45 and min(codes.values()) > 100, (pruned_cases, codes)


def test_planted_ties_in_edge_energy_and_cluster_seeds():
    """Exact ties on both clusterings, broken by the lowest cluster index on both sides.

    Edge energy: a zero top half gives many patches exactly zero Sobel energy in both implementations; with
    keep_clusters=0 every token is pending, so the 1-D clustering sees the tied values (tied values must also get
    one decision). Seeds: 6 tokens and 8 clusters repeat seeds, so duplicate centres tie for every token."""
    for i, (hw, batch) in enumerate([((96, 128), 2), ((128, 96), 1), ((112, 112), 2)]):
        img = generated_inputs((batch, 3, *hw), 1, seed=60 + i)[0]
        img[:, :, : hw[0] // 2] = 0.0
        options = {"prune_rate": 0.5, "edge_clusters": 4, "keep_clusters": 0}
        ref = reference_forward(backbone_model("segmenter-vit-t-mask", hw), img, options)
        static = run_static(with_lvtp("segmenter-vit-t-mask", hw, {**options, "expose_decisions": True}), img)
        assert l1_compare(static, ref).ok
        flat = patch_mean(sobel_energy(img), 16) == 0
        decision = static["decision_layer5"]
        assert flat.sum() >= batch * 8 and (decision[flat] == 0).all()  # tied weakest edges: one cluster, pruned
    for i in range(4):
        img = generated_inputs((1 + i % 2, 3, 32, 48), 1, seed=90 + i)[0]
        options = {"clusters": 8, "keep_clusters": 3, "edge_clusters": 8, "prune_rate": 0.5}
        ref = reference_forward(backbone_model("segmenter-vit-t-mask", (32, 48)), img, options)
        static = run_static(with_lvtp("segmenter-vit-t-mask", (32, 48), {**options, "expose_decisions": True}), img)
        result = l1_compare(static, ref)
        assert result.ok, result
        assert (static["margin_layer5"] == 0).any()  # the duplicated centres tie exactly


def test_overflow_is_reported_and_the_first_kept_in_raster_order_stay():
    for i, (hw, batch) in enumerate([((96, 128), 2), ((128, 96), 1), ((112, 112), 2)]):
        img = generated_inputs((batch, 3, *hw), 1, seed=80 + i)[0]
        options = {"prune_layers": [3, 7], "prune_rate": 0.5}
        ref = reference_forward(backbone_model("segmenter-vit-t-mask", hw), img, options)
        capacity = max(1, min(ref.kept["layer3"]) - 3)
        static = run_static(with_lvtp("segmenter-vit-t-mask", hw, {**options, "expose_decisions": True,
                                                                   "capacity": [capacity, 10_000]}), img)
        expected = [max(0, k - capacity) for k in ref.kept["layer3"]]
        assert static["overflow"].tolist() == expected and sum(expected) > 0
        assert torch.equal(static["decision_layer3"], ref.decisions["layer3"])  # the rule itself is unchanged
        for b in range(batch):
            kept = (ref.decisions["layer3"][b] > 0).nonzero().flatten()
            in_sequence = (static["decision_layer7"][b] >= 0).nonzero().flatten()
            assert torch.equal(in_sequence, kept[:capacity])


def test_sobel_energy_matches_the_independent_reference():
    img = generated_inputs((2, 3, 48, 80), 1, seed=5)[0]
    for sqrt in (False, True):
        static = patch_mean(sobel_energy(img, sqrt), 16)
        for b in range(2):
            assert torch.allclose(static[b], sobel_patch_energy(img[b], sqrt), rtol=1e-5, atol=1e-5)


def test_restore_rules():
    """frozen: pruned patches reach the decoder with their features at the pruning block; zero: with zeros."""
    hw = (96, 128)
    img = generated_inputs((1, 3, *hw), 1, seed=9)[0]
    for restore in ("frozen", "zero"):
        ref = reference_forward(backbone_model("segmenter-vit-t-mask", hw), img, {"restore": restore})
        capacity = ref.kept["layer5"][0]
        model = with_lvtp("segmenter-vit-t-mask", hw, {"restore": restore, "capacity": [capacity],
                                                       "expose_decisions": True})
        state, _ = model.backbone(img, model.method)
        assert capacity < 48 and state.x.shape[1] == 1 + 48 and state.owner is None  # the full grid again
        assert l1_compare(run_static(model, img), ref).ok


# --------------------------------------------------------------------------------------------- L2 + lint


def test_l2_onnx_runtime_equals_static_and_lints_clean():
    hw = (128, 160)
    imgs = generated_inputs((1, 3, *hw), 2, seed=21)
    options = {"prune_layers": [3, 7], "expose_decisions": True}
    kept = reference_forward(backbone_model("segmenter-vit-t-mask", hw), torch.cat(imgs), options).kept
    model = with_lvtp("segmenter-vit-t-mask", hw, {**options, "capacity": [max(c) for c in kept.values()]})
    proto = export_to_proto(model, imgs[0], opset=17, output_names=model.output_names()).model
    report = verify_onnx(proto, model, imgs)
    outputs = {o.name: o for o in report.outputs}
    assert report.ok, report.format()
    assert outputs["decision_layer3"].mismatches == 0 and outputs["decision_layer7"].mismatches == 0
    assert outputs["logits"].max_abs <= 1e-4 and outputs["overflow"].mismatches == 0
    for target in ("orin-jp6", "orin-jp60"):
        lint = lint_model(proto, target)
        assert lint.ok, lint.format()


# --------------------------------------------------------------------------------------------- options, CLI


def test_reference_defaults_match_the_static_config():
    model = backbone_model("segmenter-vit-t-mask", (64, 64))
    opts, cfg = parse_options(model, {}), LVTPConfig()
    assert opts.prune_layers == (5,) and build_lvtp({}, model).layers == [5]
    assert (opts.q1, opts.q2, opts.temperature, opts.clip_alpha) == (cfg.q1, cfg.q2, cfg.temperature, cfg.clip_alpha)
    assert (opts.clusters, opts.keep_clusters, opts.iters) == (cfg.clusters, cfg.keep_clusters, cfg.kmeans_iters)
    assert (opts.edge_clusters, opts.prune_rate, opts.edge_sqrt, opts.restore) == (
        cfg.edge_clusters, cfg.prune_rate, cfg.edge_sqrt, cfg.restore)


@pytest.mark.parametrize("bad", [
    {"q1": 1.0}, {"q2": 1.0}, {"q2": 0.0}, {"clusters": 0}, {"keep_clusters": 7}, {"prune_rate": 1.5},
    {"restore": "nearest"}, {"prune_layers": [11]}, {"prune_layers": [7, 3]}, {"capacity": [0]}, {"nope": 1},
])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        build_lvtp(bad, backbone_model("segmenter-vit-t-mask", (64, 64)))


def test_calibrated_options_take_the_quantile_per_point():
    out = calibrated_options({"layer7": [10, 30, 20], "layer3": [40, 50, 60]}, 1.0, {"prune_rate": 0.4})
    assert out == {"prune_rate": 0.4, "capacity": [60, 30]}


def test_cli_export_with_a_capacity(tmp_path, capsys):
    path = tmp_path / "lvtp.onnx"
    code = main(["export", "--model", "segmenter-vit-t-mask", "--size", "64x96", "--classes", "3", "--method", "lvtp",
                 "--opt", "capacity_ratio=0.75", "-o", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and "lint (orin-jp6): clean" in out
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["logits", "overflow"]
    meta = json.loads(proto.metadata_props[0].value)
    assert meta["method"] == "lvtp" and meta["method_options"] == {"capacity_ratio": 0.75}
