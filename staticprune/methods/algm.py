"""ALGM (Norouzi et al., CVPR 2024) as a static graph: CLAP in layer 1, GBM in layer 5 (ViT-L: 7).

CLAP averages the k x k windows whose tokens are similar after layer 1's attention; GBM is ToMe's bipartite
matching on the tokens of layer m with a threshold instead of r. Both counts depend on the image, so each
point writes into a fixed capacity (the capacity contract, docs/method-contract.md): within it, the graph keeps exactly the reference's tokens; beyond
it, the next-best windows / edges merge too and `overflow` says by how much. Unmerge: after the Segmenter
decoders (which then run on the reduced tokens), before SegViT's ATM head, as ALGM places it.
See docs/methods/algm.md for every option and decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from staticprune.methods import config_from_options, extra_output_names, register
from staticprune.methods.tome import (
    StepResult,
    apply_bipartite,
    MergingHook,
    calibrated_quantile,
    fit_capacity,
    identity_owner,
    match_tokens,
    record,
    resolve_capacity,
    rule_count,
    start_extras,
    unmerge_placement,
)
from staticprune.models.token_state import TokenState
from staticprune.ops.bipartite import Edges
from staticprune.ops.merge import count, descending_rank, selection_margin
from staticprune.ops.plugin_nodes import merge_node, plugins_enabled
from staticprune.ops.window_pool import pool_windows, window_members, window_similarity

# Official CLAP thresholds for ADE20K per backbone ([code:ALGM] TRAINING.md); Cityscapes ViT-S uses 0.955.
CLAP_THRESHOLDS = {"t": 0.90, "s": 0.88, "b": 0.94, "l": 0.95}
NEVER = 1e4  # a threshold no cosine similarity reaches


@dataclass
class ALGMConfig:
    clap_layer: int = 1  # 1-based block whose attention output CLAP pools
    gbm_layer: Optional[int] = None  # 1-based GBM block; None: 5 (12-block ViT-T/S/B) or 7 (24-block ViT-L)
    window: tuple[int, int] = (2, 2)  # CLAP window (rows, cols) in patches
    clap_threshold: Optional[float] = None  # None: official ADE20K value for the backbone (T .90 S .88 B .94 L .95)
    gbm_threshold: Optional[float] = None  # None: adaptive mean + std / gbm_layer (official code); else fixed
    gbm_metric: str = "tokens"  # similarity features of GBM: "tokens" (paper, code) or "keys" (ToMe)
    inclusive: bool = True  # merge at score >= threshold (official code); False: > (paper)
    batch_coupling: bool = False  # True: as the official code, a batch merges the smallest count of its images
    # Default capacities: the paper's average cost (Segmenter ViT-S ADE20K 512: CLAP alone 31.9, CLAP + GBM 26.3
    # of 38.6 GFLOPs, Tables 5b and 1); exact only for images whose counts fit (`staticprune calibrate` fits them)
    clap_capacity: Optional[float] = 0.85  # patch tokens after CLAP: < 1 fraction of N, >= 1 count; None = N
    gbm_capacity: Optional[float] = 0.65  # patch tokens after GBM, same units; None = CLAP's buffer
    prop_attn: bool = False  # + log(size) attention; the official flag is a no-op, so off
    unmerge: str = "auto"  # "auto" | "before" | "after" the decoder (auto: after for linear/mask, before for ATM)
    expose_decisions: bool = False  # also output decision_clap/margin_clap, decision_gbm/margin_gbm


def adaptive_threshold(edges: Edges, layer: int, coupled: bool) -> Tensor:
    """(B,) the official GBM threshold: mean + unbiased std / layer of the mergeable edge scores (the code's
    `node_max[:, 1:]` skips the class token row), per image or pooled over the batch. Fewer than two
    mergeable edges: nothing merges."""
    cand = edges.candidate
    n = count(cand).to(edges.score.dtype)
    zero = torch.zeros_like(edges.score)
    mean = torch.where(cand, edges.score, zero).sum(1) / n.clamp(min=1)
    var = torch.where(cand, (edges.score - mean[:, None]) ** 2, zero).sum(1) / (n - 1).clamp(min=1)
    std = var.sqrt()
    enough = n >= 2
    if coupled:
        tau = (mean.mean(0, keepdim=True) + std.mean(0, keepdim=True) / layer).expand_as(mean)
        enough = (count(~enough, 0) == 0).expand_as(enough)
    else:
        tau = mean + std / layer
    return torch.where(enough, tau, torch.full_like(tau, NEVER))


def clap_step(
    state: TokenState, grid: tuple[int, int], window: tuple[int, int], threshold: float, inclusive: bool,
    coupled: bool, out_patches: int, with_decisions: bool,
) -> StepResult:
    """Conditional local average pooling on an unreduced state (CLAP is the first reduction).

    The windows at/above the threshold are pooled; if the result would not fit `out_patches`, the next-best
    windows are pooled too (capacity fallback). Decisions: per window, its position among the pooled windows,
    or -1.
    """
    p = state.num_prefix
    m = window[0] * window[1]
    n0 = state.x.shape[1] - p
    scores = window_similarity(state.x[:, p:], window_members(grid, window))
    candidate = torch.ones_like(scores, dtype=torch.bool)
    rank = descending_rank(scores, candidate)
    tau = torch.full((scores.shape[0],), threshold, dtype=scores.dtype, device=scores.device)
    n_rule = rule_count(scores, candidate, tau, inclusive, coupled)
    need = max(0, math.ceil((n0 - out_patches) / (m - 1)))  # windows that must pool to fit (static)
    n_pool = n_rule.clamp(min=need)
    pool = rank < n_pool[:, None]
    x, size, owner = pool_windows(state.x, p, grid, window, pool, rank, p + out_patches)
    overflow = (n0 - n_rule * (m - 1) - out_patches).clamp(min=0).to(torch.int32)
    result = StepResult(replace(state, x=x, size=size, owner=owner), overflow)
    if with_decisions:
        result.decision = torch.where(pool, rank, torch.full_like(rank, -1)).to(torch.int32)
        margin = selection_margin(scores, rank, candidate, n_pool, tau, n_pool == n_rule, ordered=pool)
        result.margin = margin.to(torch.float32)
    return result


class ALGM(MergingHook):
    """TokenHook: CLAP after the attention of `clap_layer`, GBM after the attention of `gbm_layer`."""

    def __init__(self, cfg: ALGMConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        backbone = model.backbone
        depth, p = backbone.cfg.depth, backbone.num_prefix
        self.grid = model.grid
        n0 = self.grid[0] * self.grid[1]
        self.gbm_layer = cfg.gbm_layer or (7 if depth >= 24 else 5)
        if not 1 <= cfg.clap_layer < self.gbm_layer <= depth:
            raise ValueError(f"need 1 <= clap_layer < gbm_layer <= {depth} (got {cfg.clap_layer}, {self.gbm_layer})")
        self.window = (int(cfg.window[0]), int(cfg.window[1])) if len(cfg.window) == 2 else (0, 0)
        if min(self.window) < 1 or self.window[0] * self.window[1] < 2:
            raise ValueError(f"window={cfg.window}: give rows,cols with at least 2 patches")
        s = (self.grid[0] // self.window[0]) * (self.grid[1] // self.window[1])
        if s == 0:
            raise ValueError(f"window {self.window} does not fit the {self.grid[0]}x{self.grid[1]} patch grid")
        if cfg.gbm_metric not in ("tokens", "keys"):
            raise ValueError(f"gbm_metric={cfg.gbm_metric!r}: choose tokens or keys")
        self.clap_threshold = cfg.clap_threshold if cfg.clap_threshold is not None else CLAP_THRESHOLDS[model.spec.size]
        m = self.window[0] * self.window[1]
        lowest = n0 - s * (m - 1)  # every window pooled
        cap = resolve_capacity(cfg.clap_capacity, n0, "clap_capacity")
        self.clap_patches = n0 if cap is None else max(lowest, min(cap, n0))
        self.gbm_patches = fit_capacity(resolve_capacity(cfg.gbm_capacity, n0, "gbm_capacity"), self.clap_patches)
        self.decision_len = (p + n0 + 1) // 2
        self.placement = unmerge_placement(cfg.unmerge, model.spec.decoder)
        self.decoder_kind = model.spec.decoder
        points = ("clap", "gbm")
        self.extra_outputs = extra_output_names(points, cfg.expose_decisions)
        # GBM exported as a StaticPruneBipartiteMerge node in the plugin graph, except with decision outputs or a
        # batch-coupled count (the plugin merges each image on its own); CLAP stays standard ops
        self.plugin_merge_points = 0 if cfg.expose_decisions or cfg.batch_coupling else 1
        backbone.proportional_attention = cfg.prop_attn

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        cfg = self.cfg
        if layer == 0:
            state = start_extras(state)
        if layer == cfg.clap_layer - 1:
            step = clap_step(state, self.grid, self.window, self.clap_threshold, cfg.inclusive, cfg.batch_coupling,
                             self.clap_patches, cfg.expose_decisions)
            state = record(step, "clap")
        if layer == self.gbm_layer - 1:
            metric = state.x if cfg.gbm_metric == "tokens" else keys.mean(1)
            edges = match_tokens(state, metric)
            if cfg.gbm_threshold is None:
                tau = adaptive_threshold(edges, self.gbm_layer, cfg.batch_coupling)
            else:
                tau = torch.full((state.x.shape[0],), cfg.gbm_threshold, device=state.x.device)
            n_rule = rule_count(edges.score, edges.candidate, tau, cfg.inclusive, cfg.batch_coupling)

            def gbm() -> StepResult:
                return apply_bipartite(state, edges, n_rule, self.gbm_patches, tau,
                                       self.decision_len if cfg.expose_decisions else None)

            use_plugin = plugins_enabled() and self.plugin_merge_points
            step = self._plugin_gbm(state, metric, tau, gbm) if use_plugin else gbm()
            state = record(step, "gbm")
        return state

    def _plugin_gbm(self, state: TokenState, metric: Tensor, tau: Tensor, gbm) -> StepResult:
        """GBM as one StaticPruneBipartiteMerge node (plugins/bipartiteMergePlugin/README.md). The adaptive
        threshold depends on every best-edge score, so the graph computes it (standard ops) and hands it to the
        node as its threshold input, one value per image; the node computes the edges again for the merge."""
        valid = state.full_size() > 0
        unit = torch.where(valid[..., None], metric, torch.ones_like(metric))  # padding rows: no NaN
        unit = unit / unit.norm(dim=-1, keepdim=True)  # the plugin takes a normalised metric
        p = state.num_prefix

        def compute():
            step = gbm()
            return step.state.x, step.state.full_size(), step.state.owner, step.overflow

        owner = state.owner if state.owner is not None else identity_owner(state)
        threshold = tau if self.cfg.gbm_threshold is None else float(self.cfg.gbm_threshold)
        x, size, owner, overflow = merge_node(
            state.x, unit, state.full_size(), owner, compute, r=-1, threshold=threshold,
            capacity=p + self.gbm_patches, num_prefix=p, inclusive=self.cfg.inclusive, absolute_parity=True,
            kept_by_score=p == 0)
        return StepResult(replace(state, x=x, size=size, owner=owner), overflow)



# Options under which the static module never overflows (capacities = the whole sequence): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {"clap_capacity": None, "gbm_capacity": None}


@register("algm")
def build(options: dict, model: nn.Module) -> nn.Module:
    return ALGM(config_from_options(ALGMConfig, options), model)


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict) -> dict:
    """Capacities after CLAP and after GBM: the `quantile` of the reference's kept patch counts, rounded up."""
    config_from_options(ALGMConfig, options)  # reject bad options before calibrating
    missing = {"clap", "gbm"} - set(kept)
    if missing:
        raise ValueError(f"kept counts lack the reduction point(s) {', '.join(sorted(missing))}")
    return {**options, "clap_capacity": calibrated_quantile(kept["clap"], quantile),
            "gbm_capacity": calibrated_quantile(kept["gbm"], quantile)}
