"""CTS: static module vs eager reference (L1), ONNX Runtime vs static (L2), lint, CLI, options; window primitives."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from staticprune.cli import main as cli_main
from staticprune.export.lint import lint_model
from staticprune.export.onnx_export import export_to_proto
from staticprune.methods import build_static_method, method_module
from staticprune.methods.cts import CTS, PRESETS, CTSConfig, calibrated_options, resolve_k
from staticprune.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from staticprune.models.segmentation import SegmentationModel
from staticprune.models.vit import ViTConfig
from staticprune.ops.windows import (
    children_index, descending_rank, expand_to_children, inverse_permutation, parent_index, patch_window_index,
    reduce_over_children, stable_partition, tie_order,
)
from staticprune.reference import cts as ref_cts
from staticprune.verify.levels import l1_compare, run_static
from staticprune.verify.parity import generated_inputs, verify_onnx

DECODERS = ("linear", "mask", "atm")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small graphs run as fast on one thread, and on a shared 2-core machine two OpenMP workers that get
    preempted spin-wait on each other (measured 5x slower here); restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------- fixtures


def tiny_spec(decoder: str) -> ModelSpec:
    """3-block ViT (width 64) with each decoder kind; SegViT-like (no CLS, ImageNet normalisation) for ATM."""
    if decoder == "atm":
        vit = ViTConfig(dim=64, depth=3, heads=2, ln_eps=1e-6, use_cls_token=False, final_norm=False,
                        out_indices=(0, 1, 2))
        return ModelSpec("tiny-atm", "segvit", "t", "atm", vit, 32, 2, IMAGENET_MEAN, IMAGENET_STD)
    vit = ViTConfig(dim=64, depth=3, heads=2, ln_eps=1e-5)
    return ModelSpec(f"tiny-{decoder}", "segmenter", "t", decoder, vit)


def tiny_model(decoder: str, size: tuple[int, int], classes: int = 19, seed: int = 0) -> SegmentationModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SegmentationModel(tiny_spec(decoder), size, classes).eval()
        if decoder == "mask":
            # Spread class embeddings, as in a trained model: with the random init's near-identical classes the
            # mask_norm LayerNorm divides by a ~0 spread and amplifies float noise ~10x (1e-7 in -> 1e-5 out).
            with torch.no_grad():
                model.decoder.cls_emb.normal_(0.0, 1.0)
    return model


class TiedPolicy(nn.Module):
    """Wraps a policy and rounds its scores to multiples of `quantum`: plants exact ties (same in torch and ORT)."""

    def __init__(self, inner: nn.Module, quantum: float = 0.125):
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg
        self.quantum = quantum

    @property
    def window_sizes(self):
        return self.inner.window_sizes

    def window_scores(self, img):
        return {s: torch.round(v / self.quantum) * self.quantum for s, v in self.inner.window_scores(img).items()}


def attach(model: SegmentationModel, method: nn.Module) -> SegmentationModel:
    model.method = method
    return model.eval()


# --------------------------------------------------------------------------------------------- primitives


def test_descending_rank_breaks_ties_by_lowest_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9, 0.5]])
    assert descending_rank(scores).tolist() == [[2.0, 0.0, 3.0, 5.0, 1.0, 4.0]]
    eligible = torch.tensor([[True, False, True, True, True, False]])
    rank = descending_rank(scores, eligible)
    assert rank[0, [0, 2, 3, 4]].tolist() == [1.0, 2.0, 3.0, 0.0]


def test_stable_partition_and_inverse_are_a_permutation():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 37, generator=g) < 0.4
    dest, count = stable_partition(keep)
    for b in range(3):
        assert sorted(dest[b].tolist()) == list(range(37))
        kept = keep[b].nonzero().flatten().tolist()
        assert dest[b, kept].tolist() == list(range(len(kept))) and count[b] == len(kept)
    src = inverse_permutation(dest)
    assert torch.equal(torch.gather(dest, 1, src), torch.arange(37).expand(3, 37))


def test_window_maps_on_a_grid_16_cannot_tile():
    idx = patch_window_index((5, 6), 4).view(5, 6)
    assert idx[:4, :4].unique().tolist() == [0] and (idx[4] == -1).all() and (idx[:, 4:] == -1).all()
    # 3x5 fine windows under a 1x2 coarse grid (factor 2): the last row and column have no parent
    parents, inside = parent_index((3, 5), (1, 2), 2)
    assert inside.view(3, 5).tolist() == [[True] * 4 + [False]] * 2 + [[False] * 5]
    assert parents[inside].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    fine = expand_to_children(torch.tensor([[1.0, 2.0]]), parents, inside, fill=-1.0)
    assert fine.view(3, 5).tolist() == [[1, 1, 2, 2, -1], [1, 1, 2, 2, -1], [-1, -1, -1, -1, -1]]
    children = children_index((1, 2), 2, (3, 5))
    assert children.tolist() == [[0, 1, 5, 6], [2, 3, 7, 8]]
    assert reduce_over_children(fine, children, "min").tolist() == [[1.0, 2.0]]
    assert torch.equal(descending_rank(torch.tensor([[0.5, 0.5, 0.7]]), lower=tie_order(3)),
                       torch.tensor([[1, 2, 0]], dtype=torch.int32))


# --------------------------------------------------------------------------------------------- options


def test_presets_and_k_resolution():
    assert resolve_k(CTSConfig(preset="cityscapes-1024-30"), (64, 64)) == 410
    assert resolve_k(CTSConfig(preset="cityscapes-768-30"), (48, 48)) == 230
    assert resolve_k(CTSConfig(preset="cityscapes-768"), (48, 48)) == 336
    assert resolve_k(CTSConfig(), (64, 64)) == 410  # default: 30 % of the tokens, as [Poreba et al.] ran CTS
    assert resolve_k(CTSConfig(k=7), (8, 8)) == 7
    assert resolve_k(CTSConfig(tokens=40), (8, 8)) == 8  # ceil((64 - 40) / 3)
    with pytest.raises(ValueError, match="is for a 64x64 patch grid"):
        resolve_k(CTSConfig(preset="cityscapes-1024-30"), (32, 32))
    with pytest.raises(ValueError, match=r"outside \[0, 16\]"):
        resolve_k(CTSConfig(k=17), (8, 8))
    assert ref_cts.PRESETS == PRESETS  # the reference's own table must not drift from the static one
    for name, (k, grid) in PRESETS.items():
        assert ref_cts.shared_group_count({"preset": name}, grid) == k


def test_bad_options_are_one_line_value_errors():
    model = tiny_model("linear", (64, 64))
    for options, match in [({"k": "many"}, "not a valid int"), ({"nope": 1}, "unknown option"),
                           ({"decode_on": "pixels"}, "decode_on must be"), ({"reduction": 0.9}, "reduction must be")]:
        with pytest.raises(ValueError, match=match):
            build_static_method("cts", options, model)
    with pytest.raises(ValueError, match="multiples of 32"):
        build_static_method("cts", {}, tiny_model("linear", (48, 64)))


def test_calibrated_options():
    opts = {"k": 5, "policy_width": 0.5}
    assert calibrated_options({"embed": [40, 50]}, 0.9, opts) == opts
    out = calibrated_options({"embed": [40, 50, 44]}, 0.5, {**opts, "calibrate_k": True})
    assert out == {"policy_width": 0.5, "tokens": 44, "calibrate_k": False}
    assert method_module("cts").calibrated_options is calibrated_options


# --------------------------------------------------------------------------------------------- L1


def _case(seed: int) -> dict:
    rng = random.Random(seed)
    return dict(
        decoder=DECODERS[seed % 3],
        size=(rng.choice([64, 96, 128, 160]), rng.choice([64, 96, 128, 192])),
        batch=1 + seed % 2,
        decode_on="grid" if seed % 5 == 4 else "tokens",
        width=1.0 if seed % 10 == 0 else rng.choice([0.25, 0.5]),
        tie=seed % 3 == 1,
        k_frac=rng.random(),
    )


def _tie_boundary_k(scores: torch.Tensor) -> int | None:
    """A k whose boundary splits a group of exactly equal scores in every image (None if there is none)."""
    for k in range(1, scores.shape[1]):
        tops = torch.sort(scores, dim=1, descending=True).values
        if bool((tops[:, k - 1] == tops[:, k]).all()):
            return k
    return None


@pytest.mark.parametrize("seed", range(50))
def test_l1_static_equals_reference(seed):
    c = _case(seed)
    model = tiny_model(c["decoder"], c["size"], seed=seed)
    gh, gw = model.grid
    groups = gh * gw // 4
    base = CTS(CTSConfig(k=0, policy_width=c["width"], policy_seed=seed), model)
    policy = TiedPolicy(base.policy) if c["tie"] else base.policy
    img = generated_inputs((c["batch"], 3, *c["size"]), 1, seed=seed)[0]
    k = round(c["k_frac"] * groups)
    tie_k = None
    if c["tie"]:
        with torch.no_grad():
            scores = CTS(CTSConfig(k=0), model, policy=policy).policy_scores(img)[2].flatten(1)
        tie_k = _tie_boundary_k(scores)
        k = tie_k if tie_k is not None else k
    options = dict(k=k, decode_on=c["decode_on"], expose_decisions=True, policy_width=c["width"], policy_seed=seed)
    attach(model, CTS(CTSConfig(**options), model, policy=policy))
    static = run_static(model, img)
    ref = ref_cts.reference_forward(model, img, options)
    result = l1_compare(static, ref, tol=1e-5)
    assert result.decisions_equal, f"case {c}: decisions differ"
    assert result.max_abs <= 1e-5, f"case {c}: logits differ by {result.max_abs:.2e}"
    assert ref.kept["embed"] == [gh * gw - 3 * k] * c["batch"]
    assert int(static["decision_embed"].sum()) == k * c["batch"]
    assert (static["overflow"] == 0).all()
    if tie_k is not None:  # the planted tie sits on the k boundary: margin exactly 0 there
        assert float(static["margin_embed"].min()) == 0.0


def test_owner_map_equals_reference_and_ties_pick_lowest_index():
    model = tiny_model("linear", (64, 128))
    base = CTS(CTSConfig(k=0, policy_width=0.25), model)
    tied = TiedPolicy(base.policy, quantum=1.0)  # every score rounds to 0 or 1: massive ties
    img = generated_inputs((2, 3, 64, 128), 1, seed=3)[0]
    attach(model, CTS(CTSConfig(k=3, expose_decisions=True), model, policy=tied))
    with torch.no_grad():
        scores = model.method.policy_scores(img)[2].flatten(1)
        state = model.method.embed(model.backbone, img)
    ref = ref_cts.reference_forward(model, img, {"k": 3})
    assert torch.equal(state.owner - state.num_prefix, ref.owner)
    for b in range(2):  # among equal scores the lowest group indices win
        chosen = state.extras["decision_embed"][b].nonzero().flatten().tolist()
        expected = sorted(range(scores.shape[1]), key=lambda i: (-float(scores[b, i]), i))[:3]
        assert chosen == sorted(expected)


def test_policy_sees_its_own_normalisation():
    """SegViT-B's input is ImageNet-normalised; the policy (trained on mean=std=0.5) gets the same raw pixels."""
    model = tiny_model("atm", (64, 64))
    method = CTS(CTSConfig(k=2, policy_width=0.25), model)
    raw = torch.rand(1, 3, 64, 64)
    imagenet = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = method.policy_scores(imagenet)[2]
        want = method.policy.window_scores((raw - 0.5) / 0.5)[2]
    assert torch.allclose(got, want, atol=1e-6)


# --------------------------------------------------------------------------------------------- L2 and lint


@pytest.mark.parametrize("decoder,size,batch,tie", [("mask", (64, 96), 2, True), ("atm", (96, 64), 1, False),
                                                    ("linear", (128, 128), 1, False)])
def test_l2_onnxruntime_equals_static_and_lints_clean(decoder, size, batch, tie):
    model = tiny_model(decoder, size)
    base = CTS(CTSConfig(policy_width=0.5), model)
    policy = TiedPolicy(base.policy) if tie else base.policy
    attach(model, CTS(CTSConfig(reduction=0.45, expose_decisions=True), model, policy=policy))
    example = generated_inputs((batch, 3, *size), 1)[0]
    result = export_to_proto(model, example, opset=17, output_names=model.output_names())
    assert result.output_names == ["logits", "decision_embed", "margin_embed", "overflow"]
    for target in ("orin-jp6", "orin-jp60"):
        report = lint_model(result.model, target)
        assert report.ok, report.format()
    verify = verify_onnx(result.model, model, generated_inputs((batch, 3, *size), 3, seed=11),
                         output_names=result.output_names)
    diffs = {d.name: d for d in verify.outputs}
    assert diffs["decision_embed"].mismatches == 0, verify.format()
    assert diffs["logits"].max_abs <= 1e-4 and diffs["margin_embed"].max_abs <= 1e-4, verify.format()
    assert verify.ok


def test_cli_export_and_bad_option(tmp_path, capsys):
    out = tmp_path / "cts.onnx"
    code = cli_main(["export", "--model", "segmenter-vit-t-linear", "--size", "64x96", "--classes", "5",
                     "--method", "cts", "--opt", "policy_width=0.25", "--opt", "expose_decisions=true",
                     "-o", str(out), "--target", "orin-jp60"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file(), text
    assert "lint (orin-jp60): clean" in text and "PASS" in text
    code = cli_main(["export", "--model", "segmenter-vit-t-linear", "--size", "64x96", "--method", "cts",
                     "--opt", "preset=cityscapes-1024-30", "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("staticprune: error")]
    assert code == 2 and len(errors) == 1 and "is for a 64x64 patch grid" in errors[0]
