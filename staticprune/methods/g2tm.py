"""G2TM (Graph-Guided Token Merging) as a static graph. Options and decisions: docs/methods/g2tm.md.

At one layer (default 2, between attention and MLP) the patch tokens on the grid are joined to their right
and bottom neighbours when the cosine similarity of the two tokens exceeds the threshold (strict `>`); every
connected component of that graph becomes one token, the size-weighted mean of its members. CLS is never
merged. The later blocks attend over the merged tokens only (padding slots masked). The Segmenter decoders run
on the merged tokens and their per-token output goes back to the grid through one owner gather, as the official
code does; SegViT's ATM head reads its three intermediate states through the owner gather.

Static form (the capacity contract, docs/method-contract.md):
* components: `ops.components.grid_components`, exact after ceil(log2 H) + ceil(log2 W) steps;
* group order: by lowest patch index (the component's label), through an exclusive prefix sum over the
  "is its own label" mask, so slot order is the same integer computation in every runtime;
* capacity C (a count, or a fraction of N): groups ranked >= C overflow. Fallback: each overflowing group is
  merged into the group of the patch right above its lowest-index patch (left in the first row), followed
  up the chain to the first group that fits; `overflow` reports K - C per image;
* merge: sum and count through a one-hot matmul (no ScatterElements reduction), unmerge: the owner gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.methods import config_from_options, register
from staticprune.models.decoders import MaskTransformer, tokens_to_map, upsample
from staticprune.models.token_state import TokenState
from staticprune.models.vit import attention_bias
from staticprune.ops.components import grid_components
from staticprune.ops.scan import count_true, exclusive_scan
from staticprune.ops.tokens import restore_tokens

POINT = "g2tm"  # the one reduction point: outputs decision_g2tm / margin_g2tm, reference kept["g2tm"]
UNMERGE = ("auto", "before", "after")
NO_MARGIN = 1e4  # margin of a patch that has no neighbour at all (1 x 1 grid): it decides nothing


@dataclass
class G2TMConfig:
    """Every G2TM option. See docs/methods/g2tm.md for the reasons behind each default."""

    layer: int = 2  # 1-based block at which G2TM merges (between its attention and its MLP), as the paper
    threshold: float = 0.95  # edge kept iff cosine(x_i, x_j) > threshold (strict), on x' without LayerNorm
    # patch slots: None = N (exact); < 1 a fraction of N (rounded up); >= 1 a count. Default 0.68: the published
    # average cost (Segmenter ViT-S ADE20K 512: 38.6 -> 26.1 GFLOPs); `staticprune calibrate` fits it to images
    capacity: Optional[float] = 0.68
    prop_attn: bool = False  # + log(size) in later attentions; off = masked attention only (the paper's setting)
    unmerge: str = "auto"  # "auto" | "before" | "after" the decoder (auto: after for linear/mask, before for ATM)
    expose_decisions: bool = False  # also output decision_g2tm (component label) and margin_g2tm


def resolve_capacity(capacity: Optional[float], num_patches: int) -> int:
    """Patch slots: None -> N; a fraction in (0, 1) -> ceil(fraction * N); a count >= 1 -> itself, clamped to N."""
    if capacity is None:
        return num_patches
    if not math.isfinite(capacity) or capacity <= 0:
        raise ValueError(f"capacity must be a fraction in (0, 1) or a token count >= 1 (got {capacity})")
    if capacity < 1:
        return max(1, min(num_patches, math.ceil(capacity * num_patches)))
    if not float(capacity).is_integer():
        raise ValueError(f"capacity {capacity} is neither a fraction below 1 nor a whole token count")
    return min(num_patches, int(capacity))


def unmerge_placement(option: str, decoder_kind: str) -> str:
    """"before": the decoder sees the full grid (owner gather first). "after": it runs on the merged tokens and its
    per-token output is gathered (the official G2TM mask decoder; for the linear head the same numbers,
    cheaper). "auto": after for the Segmenter decoders, before for SegViT's ATM head, which reads three
    intermediate states."""
    if option not in UNMERGE:
        raise ValueError(f"unmerge='{option}' is not one of {', '.join(UNMERGE)}")
    if option == "auto":
        return "before" if decoder_kind == "atm" else "after"
    if option == "after" and decoder_kind == "atm":
        raise ValueError("unmerge=after is not available for the ATM head (it reads three intermediate states)")
    return option


def validate(cfg: G2TMConfig, depth: int) -> None:
    if not 1 <= cfg.layer <= depth:
        raise ValueError(f"layer={cfg.layer} is outside 1..{depth} (1-based block index)")
    if not math.isfinite(cfg.threshold):
        raise ValueError(f"threshold must be finite (got {cfg.threshold})")


# --------------------------------------------------------------------------------------------- graph


def neighbour_similarities(patches: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Cosine similarity of each patch token with its right and bottom neighbour.

    patches (B, N, D) row-major -> right (B, H, W-1), down (B, H-1, W). The operands are gathered with
    constant row-major index lists and compared with `F.cosine_similarity(neighbour, token)`, which is the
    official computation: on the same inputs it gives the same float bits, so a similarity planted exactly at
    the threshold is decided identically here and in the eager reference (a strided-view formulation can
    differ in the last bit, the reduction order depends on the memory layout).
    """
    h, w = grid
    b = int(patches.shape[0])
    has_right = (torch.arange(h)[:, None] * w + torch.arange(w - 1)).reshape(-1).to(patches.device)
    has_bottom = torch.arange(h * w - w, device=patches.device)
    right = F.cosine_similarity(patches[:, has_right + 1], patches[:, has_right], dim=-1)
    down = F.cosine_similarity(patches[:, has_bottom + w], patches[:, has_bottom], dim=-1)
    return right.reshape(b, h, w - 1), down.reshape(b, h - 1, w)


def _to_grid(edge: Tensor, grid: tuple[int, int], fill: float) -> Tensor:
    """Pad a (B, H, W-1) or (B, H-1, W) edge tensor to (B, H, W) with `fill` in the missing column / row."""
    b, h, w = (int(d) for d in edge.shape)
    # The filler is built in float and cast: the tracer cannot record a bool-valued `full`.
    if w < grid[1]:
        filler = torch.full((b, h, grid[1] - w), fill, dtype=torch.float32, device=edge.device)
        edge = torch.cat([edge, filler.to(edge.dtype)], 2)
    if h < grid[0]:
        filler = torch.full((b, grid[0] - h, grid[1]), fill, dtype=torch.float32, device=edge.device)
        edge = torch.cat([edge, filler.to(edge.dtype)], 1)
    return edge


def incident_margins(right_margin: Tensor, down_margin: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, H, W): the smallest |cos - threshold| over the (up to four) edges that touch each patch."""
    r = _to_grid(right_margin, grid, NO_MARGIN)  # edge to the right of (r, c)
    d = _to_grid(down_margin, grid, NO_MARGIN)  # edge below (r, c)
    b = int(r.shape[0])
    far_col = torch.full((b, grid[0], 1), NO_MARGIN, device=r.device)
    far_row = torch.full((b, 1, grid[1]), NO_MARGIN, device=r.device)
    left = torch.cat([far_col, r[:, :, :-1]], 2)  # edge to the left of (r, c) = right edge of (r, c - 1)
    up = torch.cat([far_row, d[:, :-1]], 1)
    return torch.minimum(torch.minimum(r, left), torch.minimum(d, up))


# --------------------------------------------------------------------------------------------- slots


def fallback_parents(grid: tuple[int, int]) -> Tensor:
    """(N,) int64: the patch above each patch (the left one in the first row, itself for patch 0).

    Both have a smaller index, so for the lowest-index patch of a component they lie in another component
    whose label is smaller: following them can only walk towards patch 0, whose group always fits.
    """
    h, w = grid
    idx = torch.arange(h * w)
    return torch.where(idx >= w, idx - w, (idx - 1).clamp(min=0))


def fallback_jumps(grid: tuple[int, int]) -> int:
    """Pointer-jumping rounds that cover the longest fallback chain: every step moves one row up, or one
    column left within the first row, so a chain has at most (H - 1) + (W - 1) steps."""
    longest = grid[0] + grid[1] - 2
    return 0 if longest <= 1 else math.ceil(math.log2(longest))


@dataclass
class Grouping:
    slot: Tensor  # (B, N) int64 slot (0..C-1) of every patch, after the capacity fallback
    count: Tensor  # (B,) int64 components K before capacity
    overflow: Tensor  # (B,) int32 max(K - C, 0)


def assign_slots(labels: Tensor, grid: tuple[int, int], capacity: int) -> Grouping:
    """Components in order of their lowest patch index -> slots; groups beyond capacity fall back upwards."""
    n = labels.shape[1]
    idx = torch.arange(n, device=labels.device)
    is_root = labels == idx
    rank = exclusive_scan(is_root).to(torch.int64)  # at a root: its group's rank among the components
    parent_root = labels.gather(1, fallback_parents(grid).to(labels.device).expand_as(labels))
    target = torch.where(rank < capacity, idx.expand_as(labels), parent_root)  # read only at roots
    for _ in range(fallback_jumps(grid)):
        target = target.gather(1, target)
    group_root = target.gather(1, labels)
    count = count_true(is_root).to(torch.int64)
    overflow = (count - capacity).clamp(min=0).to(torch.int32)
    return Grouping(slot=rank.gather(1, group_root), count=count, overflow=overflow)


def group_merge(x: Tensor, weight: Tensor, slot: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Size-weighted mean of the tokens of each slot.

    x (B, N, D), weight (B, N) sizes, slot (B, N) in [0, capacity) -> features (B, C, D), sizes (B, C)
    (0 for empty slots, whose features are 0). Sum and count come from one one-hot matmul each, which runs
    on tensor cores and needs no ScatterElements reduction.
    """
    slots = torch.arange(capacity, device=x.device)
    onehot = (slot.unsqueeze(1) == slots[None, :, None]).to(x.dtype)  # (B, C, N)
    total = onehot @ (x * weight.unsqueeze(-1))
    size = (onehot @ weight.unsqueeze(-1)).squeeze(-1)
    return total / size.clamp(min=1.0).unsqueeze(-1), size


# --------------------------------------------------------------------------------------------- module


class G2TM(nn.Module):
    """Static G2TM hook: one merge at `layer`, then masked (optionally proportional) attention in later blocks."""

    step_names = {"after_attention": "graph + components + merge", "decode": "unmerge + decoder"}

    def __init__(self, cfg: G2TMConfig, grid: tuple[int, int], depth: int, decoder_kind: str):
        super().__init__()
        validate(cfg, depth)
        self.cfg = cfg
        self.grid = grid
        self.num_patches = grid[0] * grid[1]
        self.capacity = resolve_capacity(cfg.capacity, self.num_patches)
        self.placement = unmerge_placement(cfg.unmerge, decoder_kind)
        self.decoder_kind = decoder_kind
        decisions = (f"decision_{POINT}", f"margin_{POINT}") if cfg.expose_decisions else ()
        self.extra_outputs = ("overflow",) + decisions

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        if layer != self.cfg.layer - 1:
            return state
        return self.merge(state)

    def after_block(self, layer: int, state: TokenState) -> TokenState:
        return state

    def merge(self, state: TokenState) -> TokenState:
        return self.apply_merge(self.decide_merge(self.cfg.layer - 1, state), self.capacity)

    # A capacity-bucket pipeline cuts the network between these two halves (staticprune.export.buckets): the
    # prefix graph decides at capacity N and hands over the unmerged tokens with the slot map, and each bucket graph
    # merges into its own capacity, so the one-hot merge costs C x N there, not N x N in the prefix.
    merge_count_key = "g2tm_groups"  # extras entry of decide_merge: the slots in use, (B,) int

    def decide_merge(self, layer: int, state: TokenState, keys: Optional[Tensor] = None) -> TokenState:
        """The merge decided, not applied: x and size unchanged, owner = the slot of every patch (+ num_prefix),
        extras overflow, the decision outputs and `merge_count_key`."""
        if state.owner is not None:
            raise ValueError("G2TM merges tokens on the patch grid; it cannot follow another reduction")
        p = state.num_prefix
        patches = state.x[:, p:]
        right_sim, down_sim = neighbour_similarities(patches, self.grid)
        tau = self.cfg.threshold
        right = _to_grid(right_sim > tau, self.grid, 0.0)
        down = _to_grid(down_sim > tau, self.grid, 0.0)
        margins = None
        if self.cfg.expose_decisions:
            margins = incident_margins((right_sim - tau).abs(), (down_sim - tau).abs(), self.grid)
        labels, component_margin = grid_components(right, down, margins)
        grouping = assign_slots(labels, self.grid, self.capacity)

        extras = dict(state.extras)
        extras["overflow"] = grouping.overflow
        extras[self.merge_count_key] = grouping.count.clamp(max=self.capacity)
        if component_margin is not None:
            extras[f"decision_{POINT}"] = labels.to(torch.int32)
            extras[f"margin_{POINT}"] = component_margin.to(torch.float32)
        return TokenState(x=state.x, size=state.full_size(), owner=grouping.slot + p, num_prefix=p, extras=extras)

    def apply_merge(self, decided: TokenState, capacity: int) -> TokenState:
        """Merge the patches of `decide_merge`'s state into `capacity` slots (owner slots must be < capacity)."""
        p = decided.num_prefix
        sizes = decided.full_size()
        merged, size = group_merge(decided.x[:, p:], sizes[:, p:], decided.owner - p, capacity)
        extras = {k: v for k, v in decided.extras.items() if k != self.merge_count_key}
        return TokenState(
            x=torch.cat([decided.x[:, :p], merged], 1),
            size=torch.cat([sizes[:, :p], size], 1),
            owner=decided.owner,
            num_prefix=p,
            extras=extras,
        )

    def decode(self, decoder: nn.Module, feats: list[Tensor], state: TokenState, grid, image_size) -> Tensor:
        if self.placement == "before" or state.owner is None:
            return decoder(feats, grid, image_size)
        p = state.num_prefix
        if isinstance(decoder, MaskTransformer):
            per_token = mask_transformer_on_groups(decoder, state, self.cfg.prop_attn)
        else:  # the linear head is per token: applying it before the gather only saves work
            per_token = decoder.head(state.x[:, p:])
        return upsample(tokens_to_map(restore_tokens(per_token, state.owner - p), grid), image_size)


def mask_transformer_on_groups(decoder: MaskTransformer, state: TokenState, proportional: bool) -> Tensor:
    """Segmenter's mask transformer on the merged tokens (official G2TM decoder): (B, C, classes) masks.

    Same computation as MaskTransformer.forward with the padding slots masked (and log(size) added when
    proportional, as the official ProportionalBlock does in the decoder); class embeddings count as size 1.
    """
    p = state.num_prefix
    slots, size = state.x[:, p:], state.full_size()[:, p:]
    b, c = (int(d) for d in slots.shape[:2])
    x = torch.cat([decoder.proj_dec(slots), decoder.cls_emb.expand(b, -1, -1)], 1)
    ones = torch.ones(b, decoder.num_classes, dtype=size.dtype, device=size.device)
    bias = attention_bias(torch.cat([size, ones], 1), proportional)
    for block in decoder.blocks:
        x = block(x, bias)
    x = decoder.decoder_norm(x)
    patches = x[:, :c] @ decoder.proj_patch
    classes = x[:, c:] @ decoder.proj_classes
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    return decoder.mask_norm(patches @ classes.transpose(1, 2))


# Options under which the static module never overflows (capacity = the whole sequence): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {"capacity": None}


@register("g2tm")
def build(options: dict, model: nn.Module) -> G2TM:
    cfg = config_from_options(G2TMConfig, options)
    module = G2TM(cfg, model.grid, model.backbone.cfg.depth, model.spec.decoder)
    if cfg.prop_attn:
        model.backbone.proportional_attention = True
    return module


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict) -> dict:
    """`options` with `capacity` set to the nearest-rank `quantile` of the components the reference kept
    (a token count: the smallest capacity that holds at least that share of the calibration images)."""
    counts = sorted(int(k) for k in kept.get(POINT, []))
    if not counts:
        raise ValueError(f"no kept-token counts for reduction point '{POINT}' to calibrate from")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1] (got {quantile})")
    rank = max(1, math.ceil(quantile * len(counts)))
    return {**options, "capacity": counts[rank - 1]}
