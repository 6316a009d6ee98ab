"""G2TM: the static graph against the eager reference (L1), ONNX Runtime against the static graph (L2), the
capacity fallback, options, lint for orin-jp6 / orin-jp60 and the CLI."""

import copy
import functools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from staticprune.cli import main as cli_main
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method
from staticprune.methods.g2tm import G2TMConfig, calibrated_options, fallback_parents, resolve_capacity
from staticprune.models import build_model
from staticprune.reference.g2tm import reference_forward
from staticprune.verify.levels import condition_mask_decoder, l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx

POINT = "g2tm"
TOL = 1e-5  # fp32 logits, static vs reference


@functools.lru_cache(maxsize=2)  # small: a ViT-B is 0.35 GB; the cases come grouped by model and size
def _model(name: str, size: tuple[int, int], classes: int):
    """A random-weight model. The mask transformer's class embeddings are redrawn at std 1 (as in test_tome):
    at their init std (0.02) the class masks differ by ~0.01 over the classes and mask_norm divides by that, so
    the stock random decoder turns a 2-ulp change of its input into ~1.4e-5 on the logits by itself, below any
    difference between a padded static graph and an unpadded reference."""
    model = build_model(name, size, num_classes=classes, seed=0)
    condition_mask_decoder(model, seed=0)  # class embeddings as distinct as trained ones
    return model


def _attach(model, options: dict):
    model.backbone.proportional_attention = False  # the builder sets it for prop_attn=true
    model.method = build_static_method("g2tm", options, model)
    return model


def merge_point_similarities(model, img: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right / bottom cosine similarities (B, M) the method sees at `layer`, computed as the official code does."""
    bb = model.backbone
    with torch.no_grad():
        x = bb.embed(img).x
        for i in range(layer - 1):
            x = bb.blocks[i](x)
        blk = bb.blocks[layer - 1]
        x = x + blk.attn(blk.norm1(x))[0]
    p = x[:, bb.num_prefix:]
    gh, gw = model.grid
    has_right = ((torch.arange(gh)[:, None] * gw) + torch.arange(gw - 1)).reshape(-1)
    has_bottom = torch.arange(gh * gw - gw)
    right = F.cosine_similarity(p[:, has_right + 1], p[:, has_right], dim=-1)
    down = F.cosine_similarity(p[:, has_bottom + gw], p[:, has_bottom], dim=-1)
    return right, down


def threshold_between(sims: torch.Tensor, q: float) -> float:
    """A float32 threshold strictly between two neighbouring observed similarities near quantile q."""
    values = torch.unique(sims.flatten().float()).tolist()
    start = min(max(int(q * (len(values) - 1)), 0), len(values) - 2)
    for k in list(range(start, len(values) - 1)) + list(range(start - 1, -1, -1)):
        mid = float(np.float32((values[k] + values[k + 1]) / 2))
        if values[k] < mid < values[k + 1]:
            return mid
    raise AssertionError("no gap between observed similarities")


def component_margin_oracle(right_sim, down_sim, labels, grid, tau) -> torch.Tensor:
    """Per patch: min |cos - tau| over every edge that touches its component (brute force)."""
    gh, gw = grid
    n = gh * gw
    incident = torch.full((n,), float("inf"))
    has_right = [r * gw + c for r in range(gh) for c in range(gw - 1)]
    for k, i in enumerate(has_right):
        m = abs(float(right_sim[k]) - tau)
        incident[i], incident[i + 1] = min(incident[i], m), min(incident[i + 1], m)
    for i in range(n - gw):
        m = abs(float(down_sim[i]) - tau)
        incident[i], incident[i + gw] = min(incident[i], m), min(incident[i + gw], m)
    return torch.stack([incident[labels == labels[i]].min() for i in range(n)])


# ---------------------------------------------------------------------------------------------- L1 cases

# (model, cases, sizes): 54 cases; the ViT-B ones (SegViT) cost the most, so they get the fewest.
PLAN = [
    ("segmenter-vit-t-linear", 14, [(64, 64), (48, 80), (80, 48), (32, 96)]),
    ("segmenter-vit-t-mask", 12, [(48, 80), (96, 64), (64, 64)]),
    ("segmenter-vit-s-linear", 8, [(80, 48), (64, 112)]),
    ("segmenter-vit-s-mask", 12, [(32, 96), (64, 64), (80, 48)]),
    ("segvit-vit-b-atm", 8, [(64, 64), (48, 80)]),
]


def _cases() -> list[dict]:
    """Batch 1 and 2 alternate, sizes (non-square included) change every two cases, everything else is drawn
    from a seeded generator. Consecutive cases share a model, so the small model cache is enough."""
    cases = []
    for name, count, sizes in PLAN:
        for j in range(count):
            rng = random.Random(f"{name}-{j}")
            cases.append(dict(
                name=name, size=sizes[(j // 2) % len(sizes)], batch=1 + j % 2, seed=rng.randrange(100),
                classes=19, q=rng.uniform(0.3, 0.9),
                # SegViT reads blocks 5/7/11: layer 7 merges after the first of them
                layer=7 if name.startswith("segvit") and j % 4 == 3 else rng.choice([2, 2, 2, 1, 4, 12]),
                prop_attn=rng.random() < 0.35, capacity=rng.choice(["none", "exact", "spare", "fraction"]),
                unmerge="before" if name.startswith("segvit") else rng.choice(["auto", "auto", "after", "before"]),
            ))
    return cases


CASES = _cases()


def _capacity(mode: str, kept: list[int], n: int):
    """A capacity that holds every image of the case: none (= N), the exact largest count, a few spare slots,
    or the same as a fraction of N."""
    top = max(kept)
    if mode == "none":
        return None
    if mode == "exact":
        return top
    if mode == "spare":
        return min(n, top + 3)
    return (top + 0.5) / n if top < n else None


def _run_case(case: dict):
    model = _model(case["name"], case["size"], case["classes"])
    img = generated_inputs((case["batch"], 3, *case["size"]), 1, seed=case["seed"])[0]
    right, down = merge_point_similarities(_attach(model, {}), img, case["layer"])
    tau = threshold_between(torch.cat([right.flatten(), down.flatten()]), case["q"])
    options = dict(layer=case["layer"], threshold=tau, prop_attn=case["prop_attn"], unmerge=case["unmerge"],
                   expose_decisions=True)
    ref = reference_forward(_attach(model, options), img, options)
    n = model.grid[0] * model.grid[1]
    options["capacity"] = _capacity(case["capacity"], ref.kept[POINT], n)
    static = run_static(_attach(model, options), img)
    return model, static, ref, n


@pytest.mark.parametrize("case", CASES, ids=[f"{c['name'][:14]}-{c['size'][0]}x{c['size'][1]}-b{c['batch']}-{i}"
                                              for i, c in enumerate(CASES)])
def test_l1_static_equals_reference_within_capacity(case):
    model, static, ref, n = _run_case(case)
    kept = ref.kept[POINT]
    assert min(kept) < n, f"threshold merged nothing (kept {kept} of {n})"
    result = l1_compare(static, ref, tol=TOL)
    assert result.decisions_equal, result.mismatched_points
    assert result.overflow == 0
    assert result.max_abs <= result.tol, f"fp32 logits differ by {result.max_abs:.2e}"
    assert static["decision_g2tm"].dtype == torch.int32 and static["margin_g2tm"].dtype == torch.float32
    assert bool((static["margin_g2tm"] > 0).all())  # thresholds sit strictly between observed similarities
    if CASES.index(case) % 3 == 0:  # the owner map too: slots in the reference's group order
        with torch.no_grad():
            _, state = model.features(generated_inputs((case["batch"], 3, *case["size"]), 1, seed=case["seed"])[0])
        assert torch.equal(state.owner - state.num_prefix, ref.owner)


def test_margins_are_the_closest_edge_of_each_component():
    case = CASES[1]
    model = _model(case["name"], case["size"], case["classes"])
    img = generated_inputs((2, 3, *case["size"]), 1, seed=3)[0]
    right, down = merge_point_similarities(_attach(model, {}), img, 2)
    tau = threshold_between(torch.cat([right.flatten(), down.flatten()]), 0.5)
    static = run_static(_attach(model, dict(threshold=tau, expose_decisions=True)), img)
    for b in range(2):
        labels = static["decision_g2tm"][b].long()
        expected = component_margin_oracle(right[b], down[b], labels, model.grid, tau)
        assert torch.allclose(static["margin_g2tm"][b], expected, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------- planted ties


def _tiled_image(size, batch: int, seed: int) -> torch.Tensor:
    """Random image whose left half repeats one 16x16 patch: with the positional table zeroed, those tokens
    are bit-identical at every layer, so their similarities are exactly equal."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    img = torch.randn(batch, 3, h, w, generator=g)
    tile = torch.randn(3, 16, 16, generator=g)
    for r in range(0, h, 16):
        for c in range(0, (w // 32) * 16, 16):
            img[:, :, r:r + 16, c:c + 16] = tile
    return img


@pytest.mark.parametrize("name,batch", [("segmenter-vit-t-linear", 1), ("segmenter-vit-t-mask", 2),
                                        ("segvit-vit-b-atm", 2)])
@pytest.mark.parametrize("side", ["at", "below"])
def test_planted_exact_ties(name, side, batch):
    size = (64, 96)
    model = copy.deepcopy(_model(name, size, 5))
    model.backbone.pos_embed.data.zero_()
    img = _tiled_image(size, batch, seed=4)
    right, down = merge_point_similarities(_attach(model, {}), img, 2)
    sims = torch.cat([right.flatten(), down.flatten()])
    values, counts = torch.unique(sims, return_counts=True)
    tied = float(values[counts.argmax()])
    assert int(counts.max()) >= 4  # many edges share one similarity exactly
    tau = tied if side == "at" else float(np.nextafter(np.float32(tied), np.float32(-2)))
    options = dict(threshold=tau, capacity=None, expose_decisions=True)  # whole sequence: no overflow
    ref = reference_forward(_attach(model, options), img, options)
    static = run_static(_attach(model, options), img)
    result = l1_compare(static, ref, tol=TOL)
    assert result.decisions_equal and result.max_abs <= result.tol, result
    if side == "at":  # strict '>': every edge exactly at the threshold is cut, and its margin reads 0
        assert float(static["margin_g2tm"].min()) == 0.0
        edges_at = int((sims == tau).sum())
        assert edges_at >= 4
    else:
        assert min(ref.kept[POINT]) < model.grid[0] * model.grid[1]


# ---------------------------------------------------------------------------------------------- overflow


def fallback_slots(labels: torch.Tensor, grid, capacity: int) -> torch.Tensor:
    """The documented fallback in plain Python: groups ranked >= C join the group above their first patch."""
    roots = sorted(set(labels.tolist()))
    rank = {r: k for k, r in enumerate(roots)}
    parent = fallback_parents(grid)
    target = {}
    for r in roots:
        g = r
        while rank[g] >= capacity:
            g = int(labels[parent[g]])
        target[r] = rank[g]
    return torch.tensor([target[int(label)] for label in labels])


@pytest.mark.parametrize("name,size,capacity,batch", [
    ("segmenter-vit-t-linear", (64, 64), 0.25, 1),
    ("segmenter-vit-t-mask", (48, 80), 3, 2),
    ("segmenter-vit-s-mask", (96, 64), 0.3, 2),
    ("segvit-vit-b-atm", (80, 48), 2, 1),
    ("segmenter-vit-t-linear", (32, 96), 0.1, 2),
    ("segmenter-vit-t-mask", (64, 112), 0.4, 1),
])
def test_overflow_falls_back_deterministically(name, size, capacity, batch):
    model = _model(name, size, 19)
    img = generated_inputs((batch, 3, *size), 1, seed=11)[0]
    right, down = merge_point_similarities(_attach(model, {}), img, 2)
    tau = threshold_between(torch.cat([right.flatten(), down.flatten()]), 0.7)
    options = dict(threshold=tau, capacity=capacity, expose_decisions=True)
    ref = reference_forward(_attach(model, options), img, options)
    _attach(model, options)
    c = resolve_capacity(float(capacity), model.grid[0] * model.grid[1])
    first, second = run_static(model, img), run_static(model, img)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert bool(torch.isfinite(first["logits"]).all())
    assert first["overflow"].dtype == torch.int32
    assert first["overflow"].tolist() == [max(k - c, 0) for k in ref.kept[POINT]]
    assert int(first["overflow"].max()) > 0
    assert torch.equal(first["decision_g2tm"], ref.decisions[POINT])  # decisions do not depend on capacity
    with torch.no_grad():
        _, state = model.features(img)
    slots = state.owner - state.num_prefix
    for b in range(batch):
        assert torch.equal(slots[b], fallback_slots(ref.decisions[POINT][b].long(), model.grid, c))
    p = state.num_prefix
    assert state.x.shape[1] == p + c
    assert torch.equal(state.size[:, p:].sum(-1), torch.full((batch,), float(slots.shape[1])))  # every patch once


# ---------------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("name,unmerge", [("segmenter-vit-t-linear", "after"), ("segmenter-vit-t-mask", "after"),
                                          ("segmenter-vit-t-mask", "before"), ("segvit-vit-b-atm", "auto")])
def test_no_merge_equals_the_unreduced_model(name, unmerge):
    model = _model(name, (48, 80), 19)
    img = generated_inputs((2, 3, 48, 80), 1, seed=2)[0]
    model.method = None
    model.backbone.proportional_attention = False
    base = run_static(model, img)["logits"]
    static = run_static(_attach(model, dict(threshold=1.5, unmerge=unmerge, capacity=None)), img)
    # Not bit-equal for SegViT: its unreduced features keep the transposed patch-embedding layout, the owner
    # gather makes them contiguous, and the ATM head's Linear rounds differently on the two layouts.
    assert float((static["logits"] - base).abs().max()) <= 1e-6
    assert static["overflow"].tolist() == [0, 0]


def test_merged_tokens_are_plain_means_of_their_components():
    model = _model("segmenter-vit-t-linear", (64, 96), 5)
    img = generated_inputs((1, 3, 64, 96), 1, seed=5)[0]
    right, down = merge_point_similarities(_attach(model, {}), img, 2)
    tau = threshold_between(torch.cat([right.flatten(), down.flatten()]), 0.5)
    method = _attach(model, dict(threshold=tau, expose_decisions=True)).method
    captured = {}
    original = method.merge

    def spy(state):
        captured["before"], captured["after"] = state, original(state)
        return captured["after"]

    method.merge = spy
    run_static(model, img)
    before, after = captured["before"], captured["after"]
    labels = after.extras["decision_g2tm"][0].long()
    patches = before.x[0, 1:]
    for root in labels.unique():
        members = (labels == root).nonzero().flatten()
        slot = int(after.owner[0, members[0]])
        assert bool((after.owner[0, members] == slot).all())
        assert torch.allclose(after.x[0, slot], patches[members].mean(0), atol=1e-6)
        assert float(after.size[0, slot]) == len(members)
    k = labels.unique().numel()
    assert bool((after.size[0, 1 + k:] == 0).all())  # padding slots after the K groups


# ---------------------------------------------------------------------------------------------- options


def test_capacity_is_a_fraction_or_a_count():
    assert resolve_capacity(None, 1024) == 1024
    assert resolve_capacity(0.5, 1024) == 512
    assert resolve_capacity(0.3, 10) == 3
    assert resolve_capacity(0.001, 10) == 1
    assert resolve_capacity(1, 1024) == 1
    assert resolve_capacity(600, 1024) == 600
    assert resolve_capacity(5000, 4096) == 4096
    for bad in (0, -1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="capacity"):
            resolve_capacity(bad, 100)


@pytest.mark.parametrize("options,match", [
    ({"thresold": 0.9}, "unknown option"),
    ({"layer": 0}, "layer"),
    ({"layer": 13}, "layer"),
    ({"unmerge": "sideways"}, "unmerge"),
    ({"prop_attn": "maybe"}, "prop_attn"),
    ({"capacity": 2.5}, "capacity"),
    ({"threshold": "high"}, "threshold"),
])
def test_bad_options_are_one_clear_error(options, match):
    model = _model("segmenter-vit-t-linear", (32, 32), 5)
    with pytest.raises(ValueError, match=match):
        build_static_method("g2tm", options, model)


def test_defaults_are_the_paper_setting():
    """Layer, threshold and attention as the paper; the capacity at the published average cost (docs/methods/defaults.md)."""
    cfg = G2TMConfig()
    assert (cfg.layer, cfg.threshold, cfg.prop_attn, cfg.capacity, cfg.unmerge) == (2, 0.95, False, 0.68, "auto")


def test_unmerge_after_is_refused_for_the_atm_head():
    model = _model("segvit-vit-b-atm", (48, 80), 19)
    with pytest.raises(ValueError, match="ATM"):
        build_static_method("g2tm", {"unmerge": "after"}, model)


def test_calibrated_capacity_is_the_nearest_rank_quantile():
    kept = {POINT: [700, 512, 600, 650, 800, 610, 640, 630, 620, 900]}
    assert calibrated_options(kept, 0.9, {"threshold": 0.9}) == {"threshold": 0.9, "capacity": 800}
    assert calibrated_options(kept, 1.0, {})["capacity"] == 900
    assert calibrated_options(kept, 0.05, {})["capacity"] == 512
    assert calibrated_options({POINT: [1, 1]}, 0.5, {})["capacity"] == 1
    with pytest.raises(ValueError):
        calibrated_options({"other": [3]}, 0.9, {})


# ---------------------------------------------------------------------------------------------- L2, lint, CLI


def test_l2_onnxruntime_equals_static_segmenter_s_mask_512():
    size = (512, 512)
    model = build_model("segmenter-vit-s-mask", size, num_classes=150, seed=0)
    inputs = generated_inputs((1, 3, *size), 2, seed=1)
    right, down = merge_point_similarities(_attach(model, {}), inputs[0], 2)
    tau = threshold_between(torch.cat([right.flatten(), down.flatten()]), 0.6)
    static = run_static(_attach(model, dict(threshold=tau, expose_decisions=True)), inputs[0])
    n = size[0] * size[1] // 256
    k = int((static["decision_g2tm"][0].long() == torch.arange(n)).sum())
    assert k < n
    _attach(model, dict(threshold=tau, capacity=min(n, k + 64), expose_decisions=True))
    result = export_to_proto(model, inputs[0], output_names=model.output_names())
    assert result.output_names == ["logits", "decision_g2tm", "margin_g2tm", "overflow"]
    ops = {node.op_type for node in result.model.graph.node}
    assert not ops & {"Loop", "If", "Scan", "NonZero", "TopK", "ScatterElements", "ScatterND"}
    for target in ("orin-jp6", "orin-jp60"):
        report = lint_model(result.model, target)
        assert report.ok, report.format()
    report = verify_onnx(result.model, model, inputs, tol=1e-4)
    diffs = {d.name: d for d in report.outputs}
    assert diffs["decision_g2tm"].mismatches == 0, report.format()
    assert diffs["overflow"].mismatches == 0
    assert diffs["logits"].comparable and diffs["logits"].max_abs <= 1e-4, report.format()
    assert report.ok, report.format()


def test_cli_export_with_options(tmp_path, capsys):
    out = tmp_path / "g2tm.onnx"
    code = cli_main(["export", "--model", "segmenter-vit-t-mask", "--size", "48x80", "--classes", "5",
                     "--method", "g2tm", "--opt", "threshold=0.6", "--opt", "capacity=0.5", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.is_file() and "lint (orin-jp6): clean" in text and "PASS" in text
    assert cli_main(["lint", str(out), "--target", "orin-jp60"]) == 0
    bad = cli_main(["export", "--model", "segmenter-vit-t-mask", "--size", "48x80", "--method", "g2tm",
                    "--opt", "capacity=1.5", "-o", str(tmp_path / "bad.onnx")])
    assert bad == 2
