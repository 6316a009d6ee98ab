"""dCTS: static module vs eager reference (L1, incl. overflow), ONNX Runtime vs static (L2), lint, CLI, options."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from staticprune.cli import main as cli_main
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method
from staticprune.methods.dcts import (
    DCTS, THRESHOLD_PRESETS, DCTSConfig, bottom_up, calibrated_options, resolve_capacity, resolve_thresholds, top_down,
    window_links,
)
from staticprune.models.policy import PolicyConfig, PolicyNet
from staticprune.ops.windows import window_grid
from staticprune.reference import dcts as ref_dcts
from staticprune.verify.levels import l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx
from test_cts import DECODERS, TiedPolicy, attach, tiny_model

SIZES = [(64, 96), (128, 128), (96, 160), (256, 288), (288, 256), (256, 320), (320, 256)]
WINDOW_SETS = [(2, 4, 8, 16), (2, 4, 8, 16), (2,), (2, 4), (2, 8)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small graphs run as fast on one thread, and on a shared 2-core machine two OpenMP workers that get
    preempted spin-wait on each other (measured 5x slower here); restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------- options


def test_presets_capacity_and_errors():
    assert resolve_thresholds(DCTSConfig(preset="tau-4999"))[2] == 0.4
    assert resolve_thresholds(DCTSConfig())[16] == 0.9 and THRESHOLD_PRESETS["tau-6899"] == (0.6, 0.8, 0.9, 0.9)
    assert ref_dcts.TAU_PRESETS == THRESHOLD_PRESETS
    assert resolve_capacity(DCTSConfig(capacity_ratio=0.5), 4096) == 2048
    assert resolve_capacity(DCTSConfig(capacity=1024), 4096) == 1024
    assert resolve_capacity(DCTSConfig(capacity=798), 4096) == 1024  # raised to the fallback's floor N/4
    assert resolve_capacity(DCTSConfig(capacity_ratio=0.1), 4096) == 1024
    model = tiny_model("linear", (128, 128))
    assert build_static_method("dcts", {"capacity": 10}, model).capacity == 16
    for options, match in [({"capacity": 65}, r"above the 64 patches"), ({"window_sizes": "4,8"}, "must include 2"),
                           ({"nesting": "sideways"}, "nesting must be"), ({"thresholds": "0.5,0.5"}, "need 4 values"),
                           ({"preset": "tau-1"}, "unknown dCTS preset"), ({"window_sizes": "2,3"}, "window sizes must")]:
        with pytest.raises(ValueError, match=match):
            build_static_method("dcts", options, model)


def test_policy_without_multiscale_heads_is_refused():
    model = tiny_model("linear", (128, 128))
    cts_only = PolicyNet(PolicyConfig.from_width(0.25, (2,)))
    with pytest.raises(ValueError, match="no head for 4x4, 8x8 windows"):
        DCTS(DCTSConfig(), model, policy=cts_only)
    DCTS(DCTSConfig(window_sizes=(2,)), model, policy=cts_only)  # the 2x2-only sweep needs no more


def test_calibrated_options():
    out = calibrated_options({"embed": [100, 130, 120, 90]}, 0.75, {"capacity_ratio": 0.5, "nesting": "bottom_up"})
    assert out == {"capacity": 123, "nesting": "bottom_up"}  # staticprune.calibrate: ceil(np.quantile) = ceil(122.5)
    with pytest.raises(ValueError, match="point 'embed'"):
        calibrated_options({}, 0.9, {})


# --------------------------------------------------------------------------------------------- margins


def _chain_decision(t: dict, chain: list) -> bool:
    """top_down decision of chain[0] given pass flags of the window and its ancestors chain[1:]."""
    return bool(t[chain[0]]) and not any(t[a] for a in chain[1:])


@pytest.mark.parametrize("seed", range(6))
def test_top_down_margin_is_the_exact_flip_distance(seed):
    """Brute force over every subset of (window, ancestors) thresholds that a perturbation could flip."""
    g = torch.Generator().manual_seed(seed)
    grid, sizes = (10, 12), (2, 4, 8)  # 8x8 windows do not tile 10x12: remainder windows have no ancestor
    grids = [window_grid(grid, s) for s in sizes]
    scores = [torch.rand((1, *gr), generator=g) for gr in grids]
    taus = [0.5, 0.6, 0.7]
    scores[0][0, 0, 0] = taus[0]  # a planted tie: S == tau passes, margin 0
    t = [s >= tau for s, tau in zip(scores, taus)]
    m = [(s - tau).abs() for s, tau in zip(scores, taus)]
    flat = top_down([x.flatten(1) for x in t], [x.flatten(1) for x in m], window_links(grid, sizes))
    dec = type(flat)([x.view(1, *gr) for x, gr in zip(flat.tokens, grids)],
                     [x.view(1, *gr) for x, gr in zip(flat.margins, grids)])
    for l, (h, w) in enumerate(grids):
        for i, j in itertools.product(range(h), range(w)):
            chain, ii, jj = [(l, i, j)], i, j
            for up in range(l + 1, len(sizes)):
                f = sizes[up] // sizes[up - 1]
                ii, jj = ii // f, jj // f
                if ii >= grids[up][0] or jj >= grids[up][1]:
                    break
                chain.append((up, ii, jj))
            flags = {c: bool(t[c[0]][0, c[1], c[2]]) for c in chain}
            margins = {c: float(m[c[0]][0, c[1], c[2]]) for c in chain}
            base = _chain_decision(flags, chain)
            best = math.inf
            for r in range(1, len(chain) + 1):
                for subset in itertools.combinations(chain, r):
                    flipped = {c: (not v) if c in subset else v for c, v in flags.items()}
                    if _chain_decision(flipped, chain) != base:
                        best = min(best, max(margins[c] for c in subset))
            assert bool(dec.tokens[l][0, i, j]) == base
            assert abs(float(dec.margins[l][0, i, j]) - best) < 1e-7, (l, i, j)


def test_bottom_up_margin_is_a_lower_bound_and_children_gate_parents():
    grid, sizes = (8, 8), (2, 4, 8)
    grids = [window_grid(grid, s) for s in sizes]
    t = [torch.ones((1, gr[0] * gr[1]), dtype=torch.bool) for gr in grids]
    t[0][0, 0] = False  # one failing 2x2 child blocks its 4x4 parent and the 8x8 root
    m = [torch.full((1, gr[0] * gr[1]), 0.3) for gr in grids]
    m[0][0, 0] = 0.01
    dec = bottom_up(t, m, window_links(grid, sizes))
    assert dec.tokens[2].sum() == 0 and dec.tokens[1].flatten().tolist() == [False, True, True, True]
    assert dec.tokens[0].view(4, 4)[:2, :2].flatten().tolist() == [False, True, True, True]
    assert float(dec.margins[2][0, 0]) == pytest.approx(0.01)  # its decision hangs on that child


# --------------------------------------------------------------------------------------------- L1


def _case(seed: int) -> dict:
    rng = random.Random(1000 + seed)
    return dict(
        decoder=DECODERS[seed % 3],
        size=SIZES[seed % len(SIZES)],
        batch=1 + (seed // 3) % 2,
        nesting="bottom_up" if seed % 4 == 3 else "top_down",
        window_sizes=WINDOW_SETS[seed % len(WINDOW_SETS)],
        decode_on="grid" if seed % 6 == 5 else "tokens",
        width=1.0 if seed % 10 == 0 else 0.25,
        tie=seed % 3 == 2,
        capacity=["exact", "exact", "at", "overflow"][seed % 4] if seed % 7 else "overflow",
        quantiles=[rng.uniform(0.2, 0.9) for _ in range(4)],
    )


def _thresholds(scores: dict, quantiles: list[float], tie: bool) -> list[float]:
    """Per-size thresholds at score quantiles, so that decisions are mixed; with ties, tau equals a score exactly."""
    taus = []
    for s, q in zip((2, 4, 8, 16), quantiles):
        if s not in scores:
            taus.append(0.5)
            continue
        flat = torch.sort(scores[s].flatten()).values
        taus.append(float(flat[min(len(flat) - 1, int(q * len(flat)))]) if tie else float(torch.quantile(flat, q)))
    return taus


def _slots_used(model, img) -> torch.Tensor:
    with torch.no_grad():
        state = model.method.embed(model.backbone, img)
    return (state.size[:, state.num_prefix:] > 0).sum(1)


@pytest.mark.parametrize("seed", range(50))
def test_l1_static_equals_reference(seed):
    c = _case(seed)
    model = tiny_model(c["decoder"], c["size"], seed=seed)
    gh, gw = model.grid
    n = gh * gw
    base = DCTS(DCTSConfig(window_sizes=c["window_sizes"], policy_width=c["width"], policy_seed=seed), model)
    policy = TiedPolicy(base.policy) if c["tie"] else base.policy
    img = generated_inputs((c["batch"], 3, *c["size"]), 1, seed=seed)[0]
    with torch.no_grad():
        scores = DCTS(DCTSConfig(window_sizes=c["window_sizes"]), model, policy=policy).policy_scores(img)
    options = dict(thresholds=_thresholds(scores, c["quantiles"], c["tie"]), window_sizes=c["window_sizes"],
                   nesting=c["nesting"], decode_on=c["decode_on"], expose_decisions=True)
    attach(model, DCTS(DCTSConfig(**options), model, policy=policy))
    ref = ref_dcts.reference_forward(model, img, options)
    kept = ref.kept["embed"]
    low = math.ceil(n / 4)
    if c["capacity"] == "at":
        options["capacity"] = max(max(kept), low)
    elif c["capacity"] == "overflow":
        options["capacity"] = max(low, min(kept) - 1 - seed % 5)
    else:  # "exact": a slot for every patch (the default ratio trades exactness for the paper's cost)
        options["capacity_ratio"] = 1.0
    attach(model, DCTS(DCTSConfig(**options), model, policy=policy))
    cap = model.method.capacity
    static = run_static(model, img)
    over = [max(k - cap, 0) for k in kept]
    assert static["overflow"].tolist() == over, c
    if not any(over):
        result = l1_compare(static, ref, tol=1e-5)
        assert result.decisions_equal, f"case {c}: decisions differ"
        assert result.max_abs <= 1e-5, f"case {c}: logits differ by {result.max_abs:.2e}"
        with torch.no_grad():
            state = model.method.embed(model.backbone, img)
        assert torch.equal(state.owner - state.num_prefix, ref.owner)
        assert _slots_used(model, img).tolist() == kept
        return
    # Overflow: threshold decisions still equal the reference's; the fallback merges exactly the needed number of
    # the best eligible 2x2 groups (lowest index on ties); images within capacity keep exact logits.
    assert c["capacity"] == "overflow", c
    dec = static["decision_embed"]
    assert torch.equal(torch.where(dec == 2, torch.zeros_like(dec), dec), ref.decisions["embed"].to(dec.dtype))
    g2 = window_grid((gh, gw), 2)
    n2 = g2[0] * g2[1]
    used = _slots_used(model, img)
    for b, k in enumerate(kept):
        forced = (dec[b, :n2] == 2).nonzero().flatten().tolist()
        owner = ref.owner[b].view(gh, gw)
        eligible = [i for i in range(n2) if all(
            (ref.owner[b] == owner[r, q]).sum() == 1 for r in (2 * (i // g2[1]), 2 * (i // g2[1]) + 1)
            for q in (2 * (i % g2[1]), 2 * (i % g2[1]) + 1))]
        s2 = scores[2][b].flatten()
        want = sorted(eligible, key=lambda i: (-float(s2[i]), i))[: min(len(eligible), math.ceil(over[b] / 3))]
        assert forced == sorted(want), (c, b)
        assert int(used[b]) == k - 3 * len(forced) <= cap
        if over[b] == 0:
            assert (static["logits"][b] - ref.logits[b]).abs().max() <= 1e-5
    assert torch.isfinite(static["logits"]).all()


# --------------------------------------------------------------------------------------------- L2 and lint


@pytest.mark.parametrize("decoder,size,batch,nesting,tie", [
    ("atm", (256, 288), 2, "top_down", True),
    ("mask", (128, 96), 1, "bottom_up", False),
    ("linear", (288, 256), 1, "top_down", False),
])
def test_l2_onnxruntime_equals_static_and_lints_clean(decoder, size, batch, nesting, tie):
    model = tiny_model(decoder, size)
    base = DCTS(DCTSConfig(policy_width=0.25), model)
    policy = TiedPolicy(base.policy) if tie else base.policy
    img = generated_inputs((batch, 3, *size), 1, seed=2)[0]
    with torch.no_grad():
        scores = base.policy_scores(img) if not tie else DCTS(DCTSConfig(), model, policy=policy).policy_scores(img)
    taus = _thresholds(scores, [0.4, 0.5, 0.5, 0.3], tie)
    n = model.grid[0] * model.grid[1]
    attach(model, DCTS(DCTSConfig(thresholds=taus, nesting=nesting, capacity=math.ceil(0.45 * n),
                                  expose_decisions=True), model, policy=policy))
    result = export_to_proto(model, img, opset=17, output_names=model.output_names())
    for target in ("orin-jp6", "orin-jp60"):
        report = lint_model(result.model, target)
        assert report.ok, report.format()
    inputs = [img] + generated_inputs((batch, 3, *size), 2, seed=21)
    verify = verify_onnx(result.model, model, inputs, output_names=result.output_names)
    diffs = {d.name: d for d in verify.outputs}
    assert diffs["decision_embed"].mismatches == 0 and diffs["overflow"].mismatches == 0, verify.format()
    assert diffs["logits"].max_abs <= 1e-4 and diffs["margin_embed"].max_abs <= 1e-4, verify.format()
    assert verify.ok


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "dcts.onnx"
    code = cli_main(["export", "--model", "segmenter-vit-t-mask", "--size", "256x288", "--classes", "4", "--method", "dcts",
                     "--opt", "policy_width=0.25", "--opt", "capacity_ratio=0.5", "--opt", "thresholds=0.4,0.5,0.5,0.5",
                     "-o", str(out), "--target", "orin-jp60"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file(), text
    assert "lint (orin-jp60): clean" in text and "PASS" in text
