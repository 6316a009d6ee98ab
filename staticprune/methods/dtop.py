"""DToP, Dynamic Token Pruning by early exit (docs/methods/dtop.md), as a static graph.

Auxiliary ATM prune heads sit after configured blocks. At each one every active token gets a confidence
`max_c softmax(class_logits_c)[object] * sigmoid(A_c,i)`; tokens above the threshold exit (except the
`keep_top_per_class` most confident of each class), keep the mask logits of this head, and leave the sequence.
The final prune head writes the tokens still active; the prediction is the final head's class presence times
the sigmoid of that per-patch canvas.

Static rewrite: an exit is a keep mask followed by an order-preserving compaction into a fixed capacity
(`staticprune.ops.pruning`); halted tokens keep their features in per-patch frozen rows, so `patch_tokens()`
still restores the full grid. The heads see only active tokens through an additive key mask, which equals the
official per-image filtering exactly (exp(-1e4) is 0 in float32). docs/methods/dtop.md lists every choice.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.methods import config_from_options, extra_output_names, register, quantile_capacity
from staticprune.models.decoders import (
    ATMDecoder,
    ATMLayer,
    CrossAttention,
    tokens_to_map,
    upsample,
)
from staticprune.models.token_state import TokenState
from staticprune.models.vit import MASK_NEG, LayerNorm
from staticprune.ops.pruning import (
    NO_MARGIN,
    dims,
    gather_to_patches,
    group_topk,
    in_sequence,
    prune_sequence,
    restore_with_frozen,
    top2_gap,
)

# DToP's own placements (0-based block indices, `out_indices` minus the last): ViT-B after blocks 6 and 8,
# ViT-L after 8 and 16 (1-based). [Poreba et al.]'s "after the 8th layer" for ViT-B is exit_layers=7.
DEFAULT_EXITS = {12: (5, 7), 24: (7, 15)}
HEAD_DIM = 64  # DToP's heads: 6 heads of 64 on ViT-B (d = 384), 8 of 64 on ViT-L ADE (d = 512)


# --------------------------------------------------------------------------------------------- token state


@dataclass
class PrunedTokenState(TokenState):
    """A TokenState whose tokens may have left the sequence (pruned or halted).

    frozen: (B, N0, D) features of every patch at the moment its token left; `owner[p] = T + p` points there.
    carry:  method-internal per-image tensors that travel with the state but are no graph outputs (a canvas).
    """

    frozen: Tensor | None = None
    carry: dict[str, Tensor] = field(default_factory=dict)

    def patch_tokens(self) -> Tensor:
        if self.frozen is None or self.owner is None:
            return super().patch_tokens()
        return restore_with_frozen(self.x, self.frozen, self.owner)


def as_pruned(state: TokenState, num_patches: int) -> PrunedTokenState:
    """The same tokens with explicit size and owner, and an (empty) frozen buffer."""
    if isinstance(state, PrunedTokenState) and state.frozen is not None and state.owner is not None:
        return state
    b, _, d = dims(state.x)
    p = state.num_prefix
    owner = state.owner
    if owner is None:
        owner = torch.arange(p, p + num_patches, device=state.x.device).unsqueeze(0).expand(b, -1)
    frozen = torch.zeros(b, num_patches, d, dtype=state.x.dtype, device=state.x.device)
    carry = dict(state.carry) if isinstance(state, PrunedTokenState) else {}
    return PrunedTokenState(x=state.x, size=state.full_size(), owner=owner, num_prefix=p, extras=dict(state.extras),
                            frozen=frozen, carry=carry)


def patch_decision(values: Tensor, owner: Tensor, num_prefix: int, outside: float) -> Tensor:
    """Per-token values (B, T') of the non-prefix slots -> per patch (B, N0); `outside` for patches not in the
    sequence. A capacity-independent encoding: one entry per original patch."""
    b = dims(values)[0]
    pad = torch.full((b, num_prefix), outside, dtype=values.dtype, device=values.device)
    per_slot = torch.cat([pad, values], dim=1)
    length = dims(per_slot)[1]
    out = torch.where(in_sequence(owner, length), gather_to_patches(per_slot, owner, length),
                      torch.full_like(owner, 0, dtype=values.dtype) + outside)
    return out.reshape(dims(owner))  # a graph output: constant shape even where the exporter lost track upstream


# --------------------------------------------------------------------------------------------- prune head


def masked_cross_attention(attn: CrossAttention, query: Tensor, memory: Tensor, key_bias: Tensor) -> tuple[Tensor, Tensor]:
    """ATM cross-attention over the unmasked keys only; returns the output and the head-mean of the pre-softmax
    logits (the mask logits, unbiased: masked entries are never read)."""
    b, nq, d = dims(query)
    nk = dims(memory)[1]
    hd = d // attn.heads
    q = attn.q(query).reshape(b, nq, attn.heads, hd).transpose(1, 2)
    k = attn.k(memory).reshape(b, nk, attn.heads, hd).transpose(1, 2)
    v = attn.v(memory).reshape(b, nk, attn.heads, hd).transpose(1, 2)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    out = ((logits + key_bias).softmax(-1) @ v).transpose(1, 2).reshape(b, nq, d)
    return attn.proj(out), logits.mean(dim=1)


def masked_atm_layer(layer: ATMLayer, query: Tensor, memory: Tensor, key_bias: Tensor) -> tuple[Tensor, Tensor]:
    """ATMLayer.forward with a key mask on the cross-attention (same parameters, same post-norm order)."""
    query = layer.norm1(query + layer.self_attn(query))
    out, mask_logits = masked_cross_attention(layer.multihead_attn, query, memory, key_bias)
    query = layer.norm2(query + out)
    query = layer.norm3(query + layer.linear2(F.relu(layer.linear1(query))))
    return query, mask_logits


def head_parameter_seed(seed: int, tag: str, name: str) -> int:
    """Stable per-parameter seed (crc32, not Python's salted hash): heads are reproducible in any process."""
    return zlib.crc32(f"{seed}:{tag}:{name}".encode())


def init_prune_head_(head: nn.Module, seed: int, tag: str) -> None:
    """DToP's initialisation, each matrix from its own seeded generator so that the eager reference rebuilds
    bit-identical heads from (seed, tag, parameter name) alone: Linear weights N(0, 0.02^2) (DToP's init_weights
    is timm's trunc_normal with std 0.02 cut at +-2, i.e. 100 sigma: the same distribution, without the slow
    inverse-erf sampler), the class queries N(0, 1) (nn.Embedding), the self-attention in_proj xavier-uniform
    (nn.MultiheadAttention); biases 0, LayerNorm weights 1."""
    with torch.no_grad():
        for name, param in head.named_parameters():
            if param.dim() >= 2:
                gen = torch.Generator().manual_seed(head_parameter_seed(seed, tag, name))
                if name == "q.weight":
                    nn.init.normal_(param, std=1.0, generator=gen)
                elif name.endswith("in_proj_weight"):
                    nn.init.xavier_uniform_(param, generator=gen)
                else:
                    nn.init.normal_(param, std=0.02, generator=gen)
            elif name.endswith("weight") and "norm" in name.split(".")[-2]:
                param.fill_(1.0)
            else:
                param.zero_()


class PruneHead(nn.Module):
    """DToP `PruneHead`: Linear D->d, LayerNorm, ATM decoder, one query per class, class_embed d->2.

    Submodule names follow DToP's checkpoints (`input_proj`, `proj_norm`, `decoder.layers.i.*`, `q`,
    `class_embed`), so `auxiliary_head.{i}.*` / `decode_head.*` map by prefix.
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int, heads: int, n_layers: int):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, dim)
        self.proj_norm = LayerNorm(dim, eps=1e-5)
        self.decoder = ATMDecoder(dim, heads, n_layers)
        self.q = nn.Embedding(num_classes, dim)
        self.class_embed = nn.Linear(dim, 2)

    def forward(self, tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, T, D), valid (B, T) -> mask logits A (B, K, T) and class presence (B, K)."""
        key_bias = torch.where(valid, 0.0, MASK_NEG).to(tokens.dtype)[:, None, None, :]
        memory = self.proj_norm(self.input_proj(tokens))
        query = self.q.weight.unsqueeze(0).expand(dims(tokens)[0], -1, -1)
        mask_logits = memory.new_zeros(())
        for layer in self.decoder.layers:
            query, mask_logits = masked_atm_layer(layer, query, memory, key_bias)
        presence = self.class_embed(query).softmax(-1)[..., 0]  # P(object) per class query
        return mask_logits, presence


# --------------------------------------------------------------------------------------------- halting rule


@dataclass
class Halting:
    halt: Tensor  # (B, T) bool: exits at this head
    confidence: Tensor  # (B, T) max_c presence_c * sigmoid(A_c)
    margin: Tensor  # (B, T) how far the decision is from flipping; NO_MARGIN where not a candidate


def halting_rule(mask_logits: Tensor, presence: Tensor, valid: Tensor, threshold: float, keep_top: int) -> Halting:
    """DToP's exit rule at one auxiliary head.

    Candidates: active tokens with confidence > threshold (strict, as the official code). For every class,
    the `keep_top` most confident candidates predicted as that class stay active (ties: lower index stays);
    the other candidates halt. Margin: min of |confidence - threshold|, and for candidates the class top-1/top-2
    gap and the gap to the rank boundary of their class (when the class has more than `keep_top` candidates).
    """
    prob = presence.unsqueeze(-1) * mask_logits.sigmoid()  # (B, K, T)
    confidence, label = prob.max(dim=1)  # first maximum on ties, as torch.max and ONNX ArgMax
    candidate = valid & (confidence > threshold)
    top = group_topk(confidence, label, candidate, dims(prob)[1], keep_top)
    halt = candidate & ~top.selected
    threshold_gap = (confidence - threshold).abs()
    crowded = torch.gather(top.count, 1, label) > keep_top
    rank_gap = torch.where(top.selected, confidence - torch.gather(top.next_value, 1, label),
                           torch.gather(top.kth_value, 1, label) - confidence)
    rank_gap = torch.where(crowded, rank_gap, torch.full_like(rank_gap, NO_MARGIN))
    candidate_margin = torch.minimum(torch.minimum(threshold_gap, top2_gap(prob, dim=1)), rank_gap)
    margin = torch.where(candidate, candidate_margin, threshold_gap)
    margin = torch.where(valid, margin, torch.full_like(margin, NO_MARGIN))
    return Halting(halt, confidence, margin)


def write_canvas(canvas: Tensor, mask_logits: Tensor, owner: Tensor, num_prefix: int) -> Tensor:
    """Per-patch mask logits (B, N0, K): patches whose token is in the sequence take this head's logits; patches
    that exited earlier keep the logits of their exit head."""
    b, k, _ = dims(mask_logits)
    per_slot = torch.cat([mask_logits.new_zeros(b, num_prefix, k), mask_logits.transpose(1, 2)], dim=1)
    length = dims(per_slot)[1]
    return torch.where(in_sequence(owner, length).unsqueeze(-1), gather_to_patches(per_slot, owner, length), canvas)


# --------------------------------------------------------------------------------------------- the method


@dataclass
class DToPConfig:
    """Options (`--opt key=value`). Layers are 0-based block indices, as the hooks and DToP's `out_indices`."""

    exit_layers: tuple[int, ...] = ()  # () = DToP's placement: (5, 7) with 12 blocks, (7, 15) with 24
    threshold: tuple[float, ...] = (0.9,)  # per exit head, one value = every head; exit iff confidence > threshold
    keep_top_per_class: int = 5  # the official rule: the 5 most confident candidates of each class stay active
    capacity: tuple[int, ...] = ()  # active tokens after each exit (one value = every exit); overrides the ratio
    # same, as a ratio of the N patch tokens (rounded up); 1 = exact but no saving. Default 0.7 at every exit: the
    # published average cost (SegViT ViT-B ADE20K 512: 109.9 -> 86.8 GFLOPs, 0.79x); `staticprune calibrate` fits it
    capacity_ratio: tuple[float, ...] = (0.7,)
    head_heads: int = 0  # attention heads of the prune heads; 0 = d // 64 (6 on ViT-B, 8 on ViT-L)
    head_layers: int = 3  # decoder layers per prune head (`layers_per_decoder` in every DToP config)
    head_seed: int = 0  # initialisation of the (random, until loaded) prune heads
    expose_decisions: bool = False  # also output decision_layer<i> / margin_layer<i> per exit

    def inert_options(self) -> dict[str, str]:
        """Options overridden by another (giving one is an error, see methods/__init__.py)."""
        if self.capacity:
            return {"capacity_ratio": "capacity (counts) overrides it; give one of the two"}
        return {}


def per_stage(values: tuple, stages: int, name: str) -> list:
    """One value per stage from a tuple of length 1 (broadcast) or `stages`."""
    if len(values) == 1:
        return list(values) * stages
    if len(values) != stages:
        raise ValueError(f"{name} needs 1 or {stages} values (one per reduction point), got {len(values)}")
    return list(values)


def stage_capacities(capacity: tuple[int, ...], ratio: tuple[float, ...], stages: int, num_patches: int) -> list[int]:
    """Token capacity after each stage: counts if given, else ceil(ratio * N); each within [1, N]."""
    if capacity:
        counts = per_stage(capacity, stages, "capacity")
    else:
        ratios = per_stage(ratio, stages, "capacity_ratio")
        if any(not 0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"capacity_ratio values must be in (0, 1], got {ratios}")
        counts = [math.ceil(r * num_patches) for r in ratios]
    if any(c < 1 for c in counts):
        raise ValueError(f"capacity values must be >= 1, got {counts}")
    return [min(int(c), num_patches) for c in counts]


def resolve_exits(exit_layers: tuple[int, ...], depth: int) -> list[int]:
    exits = list(exit_layers) if exit_layers else list(DEFAULT_EXITS.get(depth, ()))
    if not exits:
        raise ValueError(f"exit_layers is required for a {depth}-block backbone (no DToP default)")
    if any(b <= a for a, b in itertools.pairwise(exits)) or exits[0] < 0 or exits[-1] > depth - 2:
        raise ValueError(f"exit_layers {exits} must increase strictly within 0..{depth - 2} "
                         f"(0-based blocks; the final head follows block {depth - 1})")
    return exits


def require_segvit(model: nn.Module, method: str) -> None:
    spec = model.spec
    if spec.decoder != "atm" or spec.vit.use_cls_token:
        raise ValueError(
            f"{method} needs a SegViT model (segvit-vit-b-atm, segvit-vit-l-atm): its exits are ATM prune heads on a "
            f"backbone without CLS token; '{spec.name}' is a {spec.family} model with a '{spec.decoder}' decoder")


def heads_for(cfg_heads: int, dim: int) -> int:
    heads = cfg_heads or max(1, dim // HEAD_DIM)
    if heads < 1 or dim % heads:
        raise ValueError(f"head_heads={heads} must divide the prune-head width {dim}")
    return heads


class EarlyExits(nn.Module):
    """DToP's exit machinery (STEP reuses it after dCTS): auxiliary heads, halting, compaction, canvas, final
    head. Owns the prune heads as `aux_heads.{i}` and `final_head`."""

    step_names = {"after_block": "halting (aux heads + compaction)", "decode": "final head + canvas",
                  "embed": "patch embed + policy net + sharing"}

    def __init__(self, cfg: DToPConfig, model: nn.Module):
        super().__init__()
        vit = model.spec.vit
        if cfg.keep_top_per_class < 1:
            raise ValueError("keep_top_per_class must be >= 1 (the rule that keeps every image with active tokens)")
        if cfg.head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {cfg.head_layers}")
        self.cfg = cfg
        self.exits = resolve_exits(cfg.exit_layers, vit.depth)
        self.thresholds = [float(t) for t in per_stage(cfg.threshold, len(self.exits), "threshold")]
        self.num_patches = model.grid[0] * model.grid[1]
        self.capacities = stage_capacities(cfg.capacity, cfg.capacity_ratio, len(self.exits), self.num_patches)
        self.num_classes = model.num_classes
        dim = model.spec.atm_dim or vit.dim // 2
        heads = heads_for(cfg.head_heads, dim)
        self.aux_heads = nn.ModuleList(
            PruneHead(vit.dim, model.num_classes, dim, heads, cfg.head_layers) for _ in self.exits)
        self.final_head = PruneHead(vit.dim, model.num_classes, dim, heads, cfg.head_layers)
        for i, head in enumerate(self.aux_heads):
            init_prune_head_(head, cfg.head_seed, f"aux{i}")
        init_prune_head_(self.final_head, cfg.head_seed, "final")
        self.points = [f"layer{layer}" for layer in self.exits]

    @property
    def extra_outputs(self) -> tuple[str, ...]:
        return extra_output_names(self.points, self.cfg.expose_decisions)

    def exit_at(self, stage: int, state: TokenState) -> PrunedTokenState:
        st = as_pruned(state, self.num_patches)
        p, length = st.num_prefix, dims(st.x)[1]
        tokens, valid = st.x[:, p:], st.size[:, p:] > 0
        mask_logits, presence = self.aux_heads[stage](tokens, valid)
        rule = halting_rule(mask_logits, presence, valid, self.thresholds[stage], self.cfg.keep_top_per_class)
        canvas = st.carry.get("canvas")
        if canvas is None:
            canvas = mask_logits.new_zeros(dims(st.x)[0], self.num_patches, self.num_classes)
        canvas = write_canvas(canvas, mask_logits, st.owner, p)
        keep = torch.cat([torch.ones_like(valid[:, :p]), valid & ~rule.halt], dim=1)
        capacity = p + min(self.capacities[stage], length - p)
        pruned = prune_sequence(st.x, st.size, st.owner, st.frozen, keep, capacity)
        extras = dict(st.extras)
        overflow = extras.get("overflow")
        total = pruned.overflow if overflow is None else overflow + pruned.overflow
        extras["overflow"] = total.reshape(dims(st.x)[0])  # constant shape, whatever produced the first count
        if self.cfg.expose_decisions:
            point = self.points[stage]
            code = torch.where(valid, rule.halt.to(torch.int32), torch.full_like(rule.halt, -1, dtype=torch.int32))
            extras[f"decision_{point}"] = patch_decision(code, st.owner, p, -1).to(torch.int32)
            extras[f"margin_{point}"] = patch_decision(rule.margin, st.owner, p, NO_MARGIN)
        return PrunedTokenState(x=pruned.x, size=pruned.size, owner=pruned.owner, num_prefix=p, extras=extras,
                                frozen=pruned.frozen, carry={**st.carry, "canvas": canvas})

    def after_block(self, layer: int, state: TokenState) -> TokenState:
        if layer not in self.exits:
            return state
        return self.exit_at(self.exits.index(layer), state)

    def predict(self, state: TokenState, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        """Final head on the active tokens, then presence(final) * sigmoid(canvas) per patch, upsampled."""
        st = as_pruned(state, self.num_patches)
        p = st.num_prefix
        # The prune heads belong to the method, which computes in FP32 (no-op cast unless the backbone is FP16).
        mask_logits, presence = self.final_head(st.x[:, p:].float(), st.size[:, p:] > 0)
        canvas = st.carry.get("canvas")
        if canvas is None:
            canvas = mask_logits.new_zeros(dims(st.x)[0], self.num_patches, self.num_classes)
        canvas = write_canvas(canvas, mask_logits, st.owner, p)
        prob = presence.unsqueeze(1) * canvas.sigmoid()  # (B, N0, K)
        b = dims(st.x)[0]
        return upsample(tokens_to_map(prob, grid), image_size).reshape(b, self.num_classes, *image_size)


class DToP(EarlyExits):
    """The static DToP module: TokenHook for the backbone plus the model's `decode`.

    The model's own SegViT ATM decoder is not used: DToP's prediction comes from its own final prune head and the
    canvas of all exits (docs/methods/dtop.md). Parameters: `aux_heads.{i}.*` and `final_head.*`.
    """

    def __init__(self, cfg: DToPConfig, model: nn.Module):
        require_segvit(model, "dtop")
        super().__init__(cfg, model)

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        return state

    def decode(self, decoder: nn.Module, feats: list[Tensor], state: TokenState, grid: tuple[int, int],
               image_size: tuple[int, int]) -> Tensor:
        return self.predict(state, grid, image_size)


# Options under which the static module never overflows (every exit keeps room for every token): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {"capacity_ratio": [1.0]}


@register("dtop")
def build(options: dict[str, Any], model: nn.Module) -> nn.Module:
    return DToP(config_from_options(DToPConfig, options), model)


def point_layer(point: str) -> int:
    match = re.fullmatch(r"layer(\d+)", point)
    return int(match.group(1)) if match else -1


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict[str, Any]) -> dict[str, Any]:
    """Options with `capacity` = the `quantile` of the active-token counts the reference measured after each exit."""

    points = sorted((p for p in kept if point_layer(p) >= 0), key=point_layer)
    if not points:
        return dict(options)
    return {**options, "capacity": [quantile_capacity(kept[p], quantile) for p in points]}
