"""LVTP, Low-level Visual features guided progressive Token Pruning (docs/methods/lvtp.md), as a static graph.

At each pruning block (default: the middle one, as the paper's best single-layer setting):

1. multi-scale Tsallis entropy of every token's channel distribution, eq. (3), with alpha = ||F||_2 / sqrt(D)
   (eq. 4), min-max normalised over the image's tokens (eq. 5) into a weight that scales the token (eq. 6);
2. first clustering: cosine k-means of the weighted tokens (eqs. 7-8), strided seeds, fixed iterations; the
   `keep_clusters` clusters of highest mean weight are kept, the other tokens are pending;
3. second clustering, guided by Sobel (eqs. 9-10): 1-D k-means of the pending tokens' edge energy (mean of
   Gx^2 + Gy^2 of the grayscale input over the patch); clusters are pruned from the weakest edges up while the
   pruned count stays within `prune_rate` of the pending tokens; the rest is rescued;
4. pruned tokens leave the sequence (keep mask + order-preserving compaction into a capacity); their features at
   this block are frozen and restored into the full grid after the last block, before the final norm and the
   decoder (the dense prediction needs every patch).

The paper leaves most of this open; every choice is an option, docs/methods/lvtp.md lists them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from staticprune.methods import config_from_options, extra_output_names, register, quantile_capacity
from staticprune.methods.dtop import (
    PrunedTokenState,
    as_pruned,
    patch_decision,
    point_layer,
    stage_capacities,
)
from staticprune.models.token_state import TokenState
from staticprune.models.vit import PATCH
from staticprune.ops.clustering import (
    cosine_kmeans,
    kmeans_1d,
    masked_range,
    membership,
    patch_mean,
    rank_descending,
    sobel_energy,
)
from staticprune.ops.compaction import gather_slots
from staticprune.ops.pruning import (
    NO_MARGIN,
    dims,
    prune_sequence,
    restore_with_frozen,
    top2_gap,
)
from staticprune.ops.scan import count_true

RANGE_EPS = 1e-12  # min-max normalisation of a constant vector: everything maps to 0 instead of 0/0

# Decision codes per patch at a pruning point.
PRUNED, KEPT, RESCUED, NOT_CANDIDATE = 0, 1, 2, -1


@dataclass
class LVTPConfig:
    """Options (`--opt key=value`). Layers are 0-based block indices (the hooks' numbering)."""

    prune_layers: tuple[int, ...] = ()  # () = the middle block, depth // 2 - 1 (ViT-B: 5, ViT-L: 11); several = progressive
    q1: float = 2.0  # feature saliency factor, > 1 (paper: value unspecified)
    q2: float = 0.5  # detail sensitivity factor, in (0, 1) (paper: value unspecified)
    temperature: float = 1.0  # p = softmax(token / temperature) over its channels: the entropy's distribution
    clip_alpha: bool = True  # alpha = ||F|| / sqrt(D) clipped to [0, 1] so that beta = 1 - alpha >= 0
    clusters: int = 6  # first clustering K
    keep_clusters: int = 2  # clusters of highest mean entropy weight that are kept outright
    kmeans_iters: int = 5  # assign/update rounds of both k-means (then one final assignment)
    edge_clusters: int = 8  # second clustering K (1-D, on Sobel energy)
    prune_rate: float = 0.5  # share of the pending tokens the second clustering may prune (paper: 50 %); 1 = all
    edge_sqrt: bool = False  # eq. (10) as printed has no square root
    capacity: tuple[int, ...] = ()  # tokens kept after each pruning point (one value = all); overrides the ratio
    # same as a ratio of the N patch tokens; 1 = exact but no saving. Default 0.54: the paper's 46 % cut (SAM ViT-H,
    # one pruning layer) applied to the tokens after the pruning point; `staticprune calibrate` fits it to images
    capacity_ratio: tuple[float, ...] = (0.54,)
    restore: str = "frozen"  # pruned patches in the dense output: "frozen" (features at pruning) or "zero"
    expose_decisions: bool = False  # also output decision_layer<i> / margin_layer<i>

    def inert_options(self) -> dict[str, str]:
        """Options overridden by another (giving one is an error, see methods/__init__.py)."""
        if self.capacity:
            return {"capacity_ratio": "capacity (counts) overrides it; give one of the two"}
        return {}


def validate(cfg: LVTPConfig) -> None:
    checks = [
        (cfg.q1 > 1.0, f"q1 must be > 1 (got {cfg.q1})"),
        (0.0 < cfg.q2 < 1.0, f"q2 must be in (0, 1) (got {cfg.q2})"),
        (cfg.temperature > 0.0, f"temperature must be > 0 (got {cfg.temperature})"),
        (cfg.clusters >= 1, f"clusters must be >= 1 (got {cfg.clusters})"),
        (0 <= cfg.keep_clusters <= cfg.clusters, f"keep_clusters must be in 0..clusters (got {cfg.keep_clusters})"),
        (cfg.kmeans_iters >= 0, f"kmeans_iters must be >= 0 (got {cfg.kmeans_iters})"),
        (cfg.edge_clusters >= 1, f"edge_clusters must be >= 1 (got {cfg.edge_clusters})"),
        (0.0 <= cfg.prune_rate <= 1.0, f"prune_rate must be in [0, 1] (got {cfg.prune_rate})"),
        (cfg.restore in ("frozen", "zero"), f"restore must be 'frozen' or 'zero' (got '{cfg.restore}')"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def resolve_prune_layers(layers: tuple[int, ...], depth: int) -> list[int]:
    chosen = list(layers) if layers else [depth // 2 - 1]
    if any(b <= a for a, b in itertools.pairwise(chosen)) or chosen[0] < 0 or chosen[-1] > depth - 2:
        raise ValueError(f"prune_layers {chosen} must increase strictly within 0..{depth - 2} (0-based blocks; "
                         "pruning after the last block saves nothing)")
    return chosen


# --------------------------------------------------------------------------------------------- selection


def tsallis_weight(tokens: Tensor, q1: float, q2: float, temperature: float, clip_alpha: bool) -> Tensor:
    """(B, T, D) -> (B, T): alpha * S_q1 + beta * S_q2 of p = softmax(token / temperature) (eqs. 2-4)."""
    p = (tokens / temperature).softmax(-1)
    s1 = (1.0 - p.pow(q1).sum(-1)) / (q1 - 1.0)
    s2 = (1.0 - p.pow(q2).sum(-1)) / (q2 - 1.0)
    alpha = tokens.norm(dim=-1) / math.sqrt(dims(tokens)[-1])
    if clip_alpha:
        alpha = alpha.clamp(0.0, 1.0)
    return alpha * s1 + (1.0 - alpha) * s2


def minmax(values: Tensor, valid: Tensor) -> Tensor:
    """Eq. (5) over the valid entries of each image."""
    low, high = masked_range(values, valid)
    return (values - low.unsqueeze(-1)) / (high - low).clamp(min=RANGE_EPS).unsqueeze(-1)


def boundary_gap(scores: Tensor, rank: Tensor, keep: int) -> Tensor:
    """(B,) score of rank keep-1 minus score of rank keep: how close the kept/not-kept cut is to swapping."""
    b, k = dims(scores)
    if keep <= 0 or keep >= k:
        return torch.full((b,), NO_MARGIN, dtype=scores.dtype, device=scores.device)
    above = torch.where(rank == keep - 1, scores, torch.zeros_like(scores)).sum(-1)
    below = torch.where(rank == keep, scores, torch.zeros_like(scores)).sum(-1)
    return above - below


def closest_pair_gap(centres: Tensor, count: Tensor) -> Tensor:
    """(B,) smallest distance between two non-empty 1-D centres: a smaller one could swap their order."""
    b, k = dims(centres)
    if k < 2:
        return torch.full((b,), NO_MARGIN, dtype=centres.dtype, device=centres.device)
    gap = (centres.unsqueeze(-1) - centres.unsqueeze(-2)).abs()
    ids = torch.arange(k, device=centres.device)
    both = (count.unsqueeze(-1) > 0) & (count.unsqueeze(-2) > 0) & (ids.unsqueeze(-1) != ids)  # (no EyeLike: ORT)
    return torch.where(both, gap, torch.full_like(gap, NO_MARGIN)).amin(dim=(-2, -1))


@dataclass
class Selection:
    keep: Tensor  # (B, T) bool
    code: Tensor  # (B, T) int32: KEPT, RESCUED, PRUNED, NOT_CANDIDATE
    margin: Tensor  # (B, T) float


def lvtp_selection(tokens: Tensor, valid: Tensor, edge: Tensor, cfg: LVTPConfig) -> Selection:
    """Which valid tokens (B, T) stay, from their features (B, T, D) and their patches' edge energy (B, T)."""
    weight = minmax(tsallis_weight(tokens, cfg.q1, cfg.q2, cfg.temperature, cfg.clip_alpha), valid)
    weighted = tokens * weight.unsqueeze(-1)
    first = cosine_kmeans(weighted, valid, cfg.clusters, cfg.kmeans_iters)
    onehot = membership(first.assign, valid, cfg.clusters)  # (B, T, K)
    members = first.count.clamp(min=1).to(weight.dtype)  # int32 counts, as float only to divide
    mean_weight = (onehot.transpose(1, 2) @ weight.unsqueeze(-1)).squeeze(-1) / members
    richness = torch.where(first.count > 0, mean_weight, torch.full_like(mean_weight, -1.0))  # empty: never kept
    rank = rank_descending(richness)
    kept = valid & (torch.gather(rank, 1, first.assign) < cfg.keep_clusters)
    pending = valid & ~kept

    second = kmeans_1d(edge, pending, cfg.edge_clusters, cfg.kmeans_iters)
    order = rank_descending(-second.centres)  # 0 = weakest edges; equal centres: lower cluster first
    not_after = order.unsqueeze(-1) >= order.unsqueeze(-2)  # [j, i]: cluster i comes at or before cluster j
    # Counts stay INT32 (exact in any engine precision): pending pruned through cluster j, and the budget
    # floor(prune_rate * pending) looked up in a build-time table computed in float32 as the reference does.
    pruned_upto = count_true(not_after.to(torch.int32) * second.count.unsqueeze(-2))
    budget_of = torch.floor(torch.arange(dims(valid)[1] + 1, dtype=torch.float32) * cfg.prune_rate).to(torch.int32)
    budget = budget_of.to(valid.device)[count_true(pending).to(torch.int64)].unsqueeze(-1)
    pruned = pending & (torch.gather(pruned_upto, 1, second.assign) <= budget)

    code = torch.where(kept, KEPT, torch.where(pruned, PRUNED, RESCUED))
    code = torch.where(valid, code, torch.full_like(code, NOT_CANDIDATE)).to(torch.int32)
    low, high = masked_range(edge, pending)
    scale = (high - low).clamp(min=RANGE_EPS).unsqueeze(-1)
    cut = boundary_gap(richness, rank, cfg.keep_clusters)
    # The best cluster left out is empty (richness -1): no token sits below the cut, none can cross it.
    best_out = torch.where(rank == cfg.keep_clusters, richness, torch.zeros_like(richness)).sum(-1)
    cut = torch.where(best_out < 0, torch.full_like(cut, NO_MARGIN), cut)
    first_margin = torch.minimum(top2_gap(first.score), cut.unsqueeze(-1))
    second_margin = torch.minimum(top2_gap(second.score) / scale, closest_pair_gap(second.centres, second.count).unsqueeze(-1) / scale)
    # The prune budget is floor(prune_rate * pending count): a first-stage near-tie can move that count and with
    # it the second stage's cut, so no pending token is further from flipping than the closest first-stage call.
    closest_first = torch.where(valid, first_margin, torch.full_like(first_margin, NO_MARGIN)).amin(-1, keepdim=True)
    second_margin = torch.minimum(second_margin, closest_first)
    margin = torch.where(pending, torch.minimum(first_margin, second_margin), first_margin)
    margin = torch.where(valid, margin, torch.full_like(margin, NO_MARGIN))
    return Selection(keep=valid & ~pruned, code=code, margin=margin)


# --------------------------------------------------------------------------------------------- the method


class LVTP(nn.Module):
    """The static LVTP module (TokenHook with `embed`): Sobel energy from the input, pruning at the configured
    blocks, restoration of pruned patches after the last block."""

    step_names = {"embed": "patch embed + Sobel energy", "after_block": "prune / restore"}

    def __init__(self, cfg: LVTPConfig, model: nn.Module):
        super().__init__()
        validate(cfg)
        vit = model.spec.vit
        self.cfg = cfg
        self.depth = vit.depth
        self.layers = resolve_prune_layers(cfg.prune_layers, vit.depth)
        self.num_patches = model.grid[0] * model.grid[1]
        self.capacities = stage_capacities(cfg.capacity, cfg.capacity_ratio, len(self.layers), self.num_patches)
        self.points = [f"layer{layer}" for layer in self.layers]

    @property
    def extra_outputs(self) -> tuple[str, ...]:
        return extra_output_names(self.points, self.cfg.expose_decisions)

    def embed(self, backbone: nn.Module, img: Tensor) -> TokenState:
        """The backbone's own tokens, plus each slot's Sobel energy (0 for prefix slots) carried to the pruning."""
        state = backbone.embed(img)
        energy = patch_mean(sobel_energy(img, self.cfg.edge_sqrt), PATCH)  # (B, N0)
        edge = torch.cat([energy.new_zeros(dims(energy)[0], state.num_prefix), energy], dim=1)
        return PrunedTokenState(x=state.x, num_prefix=state.num_prefix, extras=dict(state.extras), carry={"edge": edge})

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        return state

    def after_block(self, layer: int, state: TokenState) -> TokenState:
        if layer in self.layers:
            state = self.prune(self.layers.index(layer), state)
        if layer == self.depth - 1:
            state = restore_all(state)
        return state

    def prune(self, stage: int, state: TokenState) -> PrunedTokenState:
        st = as_pruned(state, self.num_patches)
        p, length = st.num_prefix, dims(st.x)[1]
        valid = st.size[:, p:] > 0
        sel = lvtp_selection(st.x[:, p:], valid, st.carry["edge"][:, p:], self.cfg)
        keep = torch.cat([torch.ones_like(valid[:, :p]), sel.keep], dim=1)
        capacity = p + min(self.capacities[stage], length - p)
        pruned = prune_sequence(st.x, st.size, st.owner, st.frozen, keep, capacity, freeze=self.cfg.restore == "frozen")
        extras = dict(st.extras)
        overflow = extras.get("overflow")
        total = pruned.overflow if overflow is None else overflow + pruned.overflow
        extras["overflow"] = total.reshape(dims(st.x)[0])
        if self.cfg.expose_decisions:
            point = self.points[stage]
            extras[f"decision_{point}"] = patch_decision(sel.code, st.owner, p, NOT_CANDIDATE).to(torch.int32)
            extras[f"margin_{point}"] = patch_decision(sel.margin, st.owner, p, NO_MARGIN)
        carry = {**st.carry, "edge": gather_slots(st.carry["edge"], pruned.compaction)}
        return PrunedTokenState(x=pruned.x, size=pruned.size, owner=pruned.owner, num_prefix=p, extras=extras,
                                frozen=pruned.frozen, carry=carry)


def restore_all(state: TokenState) -> TokenState:
    """The full sequence (prefix + every patch): kept tokens from their slots, pruned ones from their frozen rows."""
    if not isinstance(state, PrunedTokenState) or state.frozen is None or state.owner is None:
        return state
    full = restore_with_frozen(state.x, state.frozen, state.owner)
    x = torch.cat([state.x[:, : state.num_prefix], full], dim=1)
    return TokenState(x=x, num_prefix=state.num_prefix, extras=dict(state.extras))


# Options under which the static module never overflows (room for every token after pruning): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {"capacity_ratio": [1.0]}


@register("lvtp")
def build(options: dict[str, Any], model: nn.Module) -> nn.Module:
    return LVTP(config_from_options(LVTPConfig, options), model)


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict[str, Any]) -> dict[str, Any]:
    """Options with `capacity` = the `quantile` of the kept-token counts the reference measured at each point."""

    points = sorted((p for p in kept if point_layer(p) >= 0), key=point_layer)
    if not points:
        return dict(options)
    return {**options, "capacity": [quantile_capacity(kept[p], quantile) for p in points]}
