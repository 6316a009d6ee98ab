"""ToMe against a direct re-implementation of the official matching rule (`bipartite_soft_matching`):

* r <= 0 is the identity: the layer returns the tokens unchanged and in their order, so a per-layer r list with
  a 0 before a non-zero r splits the later layers into A/B exactly as ToMe does (rebuilding [CLS, A, B] at the
  0 layer would pair different tokens later);
* a DeiT distillation token (position 1) is protected like the class token: it receives no merge and stays second.

The static module, the eager reference and the re-implementation below must agree on logits and owner maps.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

import staticprune.reference.tome as ref_tome
from staticprune.methods import build_static_method
from staticprune.models import TokenState, build_model
from staticprune.verify.parity import generated_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def official_matching(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool) -> Callable:
    """ToMe's rule on (1, T, C): clamp r to (T - protected) // 2; r <= 0 -> identity; else split A (even) / B (odd),
    best edge per A token (CLS row and distillation column at -inf), the r best edges merge (stable order: the
    canonical lowest-index tie rule), kept A tokens back in index order when a class token exists, output
    [kept A, B] or, with a distillation token, [kept A[0], B[0], kept A[1:], B[1:]]."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return lambda x, mode="sum": x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edges = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[..., None]
    kept, merged = edges[:, r:], edges[:, :r]
    partners = node_idx[..., None].gather(1, merged)
    if class_token:
        kept = kept.sort(dim=1).values

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        a, b = x[:, 0::2], x[:, 1::2]
        c = x.shape[-1]
        unmerged = a.gather(1, kept.expand(-1, -1, c))
        b = b.scatter_reduce(1, partners.expand(-1, -1, c), a.gather(1, merged.expand(-1, -1, c)), reduce=mode)
        if distill_token:
            return torch.cat([unmerged[:, :1], b[:, :1], unmerged[:, 1:], b[:, 1:]], dim=1)
        return torch.cat([unmerged, b], dim=1)

    return merge


def official_forward(model, img: torch.Tensor, schedule: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's patched ViT per image (proportional attention, merge_wavg, merge_source), unmerged before the
    decoder. schedule: 0-based block -> r. Returns logits and the owner map (patch -> patch-token index)."""
    backbone = model.backbone
    p = backbone.num_prefix
    logits, owners = [], []
    for i in range(img.shape[0]):
        x = backbone.embed(img[i : i + 1]).x
        t = x.shape[1]
        size, source = torch.ones(1, t, 1), torch.eye(t)[None]
        for layer, block in enumerate(backbone.blocks):
            y, keys = block.attn(block.norm1(x), size.log()[..., 0][:, None, None, :])
            x = x + y
            if layer in schedule:
                merge = official_matching(keys.mean(1), schedule[layer], p >= 1, p == 2)
                x = merge(x * size, "sum")
                size = merge(size, "sum")
                x = x / size
                source = merge(source, "amax")
            x = x + block.mlp(block.norm2(x))
        x = backbone.norm(x)
        owner = source[0, p:, p:].argmax(dim=0)  # current patch token holding each original patch
        owners.append(owner)
        full = x[0, p:][owner][None]
        logits.append(model.decoder([full], model.grid, model.image_size))
    return torch.cat(logits), torch.stack(owners)


def run_all(name: str, size: tuple[int, int], options: dict, schedule: dict[int, int], batch: int = 2):
    model = build_model(name, size, num_classes=4, seed=3)
    img = generated_inputs((batch, 3, *size), 1, seed=5)[0]
    with torch.no_grad():
        official_logits, official_owner = official_forward(model, img, schedule)
        reference = ref_tome.reference_forward(model, img, options)
        model.method = build_static_method("tome", options, model)
        static_logits = model(img)[0]
        _, state = model.features(img)
    return model, img, (official_logits, official_owner), reference, (static_logits, state)


def test_r_zero_then_nonzero_splits_later_layers_as_tome():
    options = {"r": [0, 3, 2], "layers": [1, 2, 3], "unmerge": "before"}
    model, img, official, reference, static = run_all("segmenter-vit-t-linear", (64, 80), options, {0: 0, 1: 3, 2: 2})
    (official_logits, official_owner), (static_logits, state) = official, static
    p = model.backbone.num_prefix
    assert torch.equal(reference.owner, official_owner)
    assert torch.equal(state.owner - p, official_owner)
    assert (reference.logits - official_logits).abs().max() <= 1e-5
    assert (static_logits - official_logits).abs().max() <= 1e-5
    assert reference.kept == {"layer1": [20, 20], "layer2": [17, 17], "layer3": [15, 15]}
    # (Rebuilding [CLS, A, B] at the r = 0 layer, the old behaviour, gives other owners here and logits 0.63 away.)


def test_r_zero_layer_leaves_the_state_untouched():
    """The static step at an r = 0 point returns the very same tokens: no reorder, no owner map, no padding."""
    model = build_model("segmenter-vit-t-linear", (64, 64), num_classes=4, seed=3)
    method = build_static_method("tome", {"r": [0, 2], "layers": [1, 2], "expose_decisions": True}, model)
    x = torch.randn(2, 17, 192, generator=torch.Generator().manual_seed(0))
    keys = torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(1))
    out = method.after_attention(0, TokenState(x=x, num_prefix=1), keys)
    assert out.x is x and out.owner is None and out.size is None
    assert (out.extras["decision_layer1"] == -1).all()
    assert method.plugin_merge_points == 0  # decisions exposed; without them only the r > 0 point is a plugin
    assert build_static_method("tome", {"r": [0, 2], "layers": [1, 2]}, model).plugin_merge_points == 1


def test_distillation_token_is_protected_and_stays_second():
    options = {"r": [3, 2], "layers": [1, 4], "unmerge": "before"}
    model, img, official, reference, static = run_all("segmenter-deit-t-linear", (64, 64), options, {0: 3, 3: 2})
    (official_logits, official_owner), (static_logits, state) = official, static
    assert model.backbone.num_prefix == 2
    assert torch.equal(reference.owner, official_owner)
    assert torch.equal(state.owner - 2, official_owner)
    assert (reference.logits - official_logits).abs().max() <= 1e-5
    assert (static_logits - official_logits).abs().max() <= 1e-5
    assert reference.kept == {"layer1": [13, 13], "layer4": [11, 11]}
    # no merge into the distillation token (B token 0): partner index 0 never appears in the decisions
    model.method = build_static_method("tome", {**options, "expose_decisions": True}, model)
    with torch.no_grad():
        outputs = dict(zip(model.output_names(), model(img)))
    assert ((outputs["decision_layer1"] >= 1) | (outputs["decision_layer1"] == -1)).all()
    assert (outputs["decision_layer1"] >= 1).sum(1).tolist() == [3, 3]
