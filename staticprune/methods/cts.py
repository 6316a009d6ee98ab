"""CTS (Content-aware Token Sharing) as a static graph: the k best-scoring 2x2 patch groups share one token.

Documented in docs/methods/cts.md. Static by construction (k fixed), so no capacity and `overflow` is
always 0. The method replaces the backbone's embedding step (the `embed` hook) and, by default, feeds the decoder
the shared sequence and copies each token's decoder output to the patches it covers (as the official code's
``patches_to_images`` does).

Static pipeline (one graph with the segmenter; the policy network is a submodule):

1. scores g = softmax(policy head)[:, 1] per 2x2 group (B, G = N/4);
2. shared = rank(g) < k, rank by a pairwise comparison that puts the lower group index first on exact ties
   (the official code sorts with an unstable sort, whose tie order is arbitrary);
3. candidates = [N patch tokens, G group tokens]; a group token is the patch conv on the 2x2-average-pooled image
   (= bilinear x0.5, align_corners=False) plus the 2x2 average of its positional vectors;
4. keep = (patch not in a shared group) | (group shared); order-preserving compaction (prefix sum + unique-index
   scatter) gives the official order [CLS, individual patches raster, shared groups raster], T = N - 3k;
5. owner (B, N) = slot of every patch; `rep` (B, T) = the top-left patch of every slot (to read the reduced
   sequence back from full-grid features at the decoder).

Decision encoding (point ``embed``): ``decision_embed`` (B, G) int32, 1 = group shared; ``margin_embed`` (B, G):
score minus the best unshared score (shared groups) or worst shared score minus score (unshared), 0 at a tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.methods import config_from_options, register, quantile_capacity
from staticprune.models.decoders import ATMHead, LinearDecoder, MaskTransformer, tokens_to_map, upsample
from staticprune.models.policy import PolicyNet, build_policy, renormalize
from staticprune.models.token_state import TokenState
from staticprune.models.vit import MASK_NEG, PATCH
from staticprune.ops.windows import (
    descending_rank, gather_rows, inverse_permutation, masked_max, masked_min, patch_window_index, stable_partition,
    tie_order, window_top_left,
)

DECODE_MODES = ("tokens", "grid")
POINT = "embed"

# Named k for the settings of the papers (docs/methods/cts.md): (shared 2x2 groups, patch grid it is defined for).
PRESETS: dict[str, tuple[int, tuple[int, int]]] = {
    "ade20k-512": (103, (32, 32)),  # CTS repo, ViT-S: 612 + 103 tokens (30 %)
    "coco-stuff-512": (103, (32, 32)),  # [STEP] Fig. 3
    "pascal-context-480": (90, (30, 30)),  # CTS repo: 540 + 90 (30 %)
    "cityscapes-768": (336, (48, 48)),  # CTS repo, ViT-S: 960 + 336 (44 %)
    "cityscapes-768-30": (230, (48, 48)),  # [Poreba et al.] "fixed 30 %": round(0.3 * 2304 / 3) = 230
    "cityscapes-1024-30": (410, (64, 64)),  # [Poreba et al.] "fixed 30 %": round(0.3 * 4096 / 3) = 410
}


@dataclass
class CTSConfig:
    """CTS options. k is taken from the first of: preset, k >= 0, tokens > 0, reduction."""

    preset: str = ""  # one of PRESETS (checked against the model's grid)
    k: int = -1  # shared 2x2 groups; -1 = not given
    tokens: int = 0  # target patch-token count N - 3k (k = ceil((N - tokens) / 3)); 0 = not given
    reduction: float = 0.3  # fraction of patch tokens removed, 3k / N ([Poreba et al.]: "a fixed 30 % token merging")
    decode_on: str = "tokens"  # "tokens": decoder on the shared sequence (official); "grid": copy tokens first
    policy_weights: str = ""  # policy checkpoint (CTS policy file, Segmenter+CTS checkpoint, train-policy output)
    policy_width: float = 1.0  # width of a randomly initialised policy (ignored with policy_weights)
    policy_seed: int = 0  # seed of a randomly initialised policy
    expose_decisions: bool = False
    calibrate_k: bool = False  # calibrated_options only: set `tokens` from measured kept counts

    def inert_options(self) -> dict[str, str]:
        """k comes from the first of preset, k, tokens, reduction: the later ones given with an earlier one are
        ignored (giving one is an error, see methods/__init__.py)."""
        out: dict[str, str] = {}
        source = "preset" if self.preset else "k" if self.k >= 0 else "tokens" if self.tokens > 0 else ""
        if source:
            later = ["k", "tokens", "reduction"][["preset", "k", "tokens"].index(source):]
            unset = {"k": self.k < 0, "tokens": self.tokens <= 0, "reduction": False}
            for name in later:
                if not unset[name]:
                    out[name] = (f"the shared-group count comes from the first given of preset, k, tokens, "
                                 f"reduction ({source} here); give only one of them")
        if self.policy_weights:
            why = "policy_weights loads the policy; remove it (it only shapes a randomly initialised policy)"
            out.update(policy_width=why, policy_seed=why)
        return out


def check_grid_for_policy(grid: tuple[int, int], method: str) -> None:
    if grid[0] % 2 or grid[1] % 2:
        raise ValueError(f"{method} needs an even patch grid (input H and W multiples of 32, the policy's stride); "
                         f"got a {grid[0]}x{grid[1]} grid")


def resolve_k(cfg: CTSConfig, grid: tuple[int, int]) -> int:
    """The number of shared groups for a grid, with the reason as a one-line ValueError if it is invalid."""
    n = grid[0] * grid[1]
    groups = n // 4
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"unknown CTS preset '{cfg.preset}'; choose one of: {', '.join(PRESETS)}")
        k, preset_grid = PRESETS[cfg.preset]
        if tuple(preset_grid) != tuple(grid):
            raise ValueError(f"CTS preset '{cfg.preset}' is for a {preset_grid[0]}x{preset_grid[1]} patch grid "
                             f"({preset_grid[0] * PATCH}x{preset_grid[1] * PATCH}); the model's grid is "
                             f"{grid[0]}x{grid[1]}: use k= or reduction= instead")
    elif cfg.k >= 0:
        k = cfg.k
    elif cfg.tokens > 0:
        k = max(0, math.ceil((n - cfg.tokens) / 3))
    else:
        if not 0.0 <= cfg.reduction <= 0.75:
            raise ValueError(f"CTS reduction must be in [0, 0.75] (3k/N, at most every group shared); got {cfg.reduction}")
        k = round(cfg.reduction * n / 3)
    if not 0 <= k <= groups:
        raise ValueError(f"CTS k={k} is outside [0, {groups}] (the {grid[0]}x{grid[1]} grid has {groups} 2x2 groups)")
    return k


def check_decode_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_on must be one of {', '.join(DECODE_MODES)} (got '{mode}')")
    return mode


# --------------------------------------------------------------------------------------------- token state


@dataclass
class SharedTokenState(TokenState):
    """TokenState plus `rep` (B, T - num_prefix): one patch index covered by each patch slot (its top-left patch).

    Sharing happens once, before block 0, so a slot's features at any later layer equal the full-grid features of
    any patch it covers: the decoder reads the reduced sequence of every layer it needs back through `rep`.
    """

    rep: Optional[Tensor] = None


def prefix_tokens(backbone: nn.Module, like: Tensor) -> Optional[Tensor]:
    """(B, 1, D) CLS token with its positional vector, or None for backbones that drop it (SegViT).

    Broadcast against `like` (B, T, D) by arithmetic rather than expand(batch, ...): no shape computed in the graph.
    """
    if not backbone.cfg.use_cls_token:
        return None
    return like[:, :1] * 0.0 + (backbone.cls_token + backbone.pos_embed[:, :1])


def pos_grid(backbone: nn.Module) -> Tensor:
    """(1, D, gh, gw) positional vectors of the patch grid, as an image (CTS pools them like pixels)."""
    gh, gw = backbone.grid
    pos = backbone.pos_embed[:, 1:]
    return pos.transpose(1, 2).reshape(1, pos.shape[-1], gh, gw)


def window_tokens(backbone: nn.Module, img: Tensor, s: int) -> Tensor:
    """(B, n_s, D) embedding of every complete s x s-patch window: the patch conv on the image average-pooled by s
    (each 16s-px window becomes one 16-px patch) plus the mean of the window's positional vectors."""
    pooled = img if s == 1 else F.avg_pool2d(img, s)
    x = backbone.patch_embed(pooled)
    pos = pos_grid(backbone)
    pos = pos if s == 1 else F.avg_pool2d(pos, s)
    return x + pos.flatten(2).transpose(1, 2)


def assemble_state(
    backbone: nn.Module,
    cand: Tensor,
    cand_size: Tensor,
    cand_rep: Tensor,
    keep: Tensor,
    slots: int,
    cand_of_patch: Tensor,
    extras: dict[str, Tensor],
    may_pad: bool = True,
) -> SharedTokenState:
    """Compact the kept candidates into `slots` slots, in candidate order; later slots are padding (size 0).

    cand (B, M, D) candidate tokens; cand_size (M,) patches per candidate; cand_rep (M,) top-left patch of each;
    keep (B, M) bool; cand_of_patch (B, N) the candidate that represents each patch. The caller guarantees that at
    most `slots` candidates are kept, and with may_pad=False that exactly `slots` are (no padding slot: the
    backbone's attention then needs no key mask).
    """
    dest, count = stable_partition(keep)
    src = inverse_permutation(dest)[:, :slots]
    x = gather_rows(cand, src)
    filled = torch.arange(slots, device=cand.device).unsqueeze(0) < count.unsqueeze(1)
    size = torch.where(filled, cand_size[src], torch.zeros_like(cand_size[src]))
    rep = cand_rep[src]
    prefix = prefix_tokens(backbone, x)
    num_prefix = 0 if prefix is None else 1
    owner = torch.gather(dest, 1, cand_of_patch) + num_prefix
    if prefix is not None:
        x = torch.cat([prefix, x], dim=1)
        size = torch.cat([torch.ones_like(size[:, :1]), size], dim=1)
    return SharedTokenState(x=x, size=size, owner=owner, num_prefix=num_prefix, extras=extras, rep=rep,
                            may_pad=may_pad)


# --------------------------------------------------------------------------------------------- decoding


def key_bias(valid: Tensor, extra: Optional[Tensor] = None) -> Tensor:
    """(B, 1, 1, T [+ E]) additive key mask: MASK_NEG on padding slots, 0 elsewhere; `extra` (B, E) appends E
    always-valid keys (its values are not used, only its shape: no shape is computed in the graph)."""
    bias = torch.where(valid, torch.zeros_like(valid, dtype=torch.float32),
                       torch.full_like(valid, MASK_NEG, dtype=torch.float32))
    if extra is not None:
        bias = torch.cat([bias, torch.zeros_like(extra, dtype=torch.float32)], dim=1)
    return bias[:, None, None, :]


def _cross_attention(attn: nn.Module, query: Tensor, memory: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """ATM CrossAttention with a key mask; the returned mask logits are the unmasked ones, as the original."""
    b, nq, d = query.shape
    nk = memory.shape[1]
    hd = d // attn.heads
    q = attn.q(query).reshape(b, nq, attn.heads, hd).transpose(1, 2)
    k = attn.k(memory).reshape(b, nk, attn.heads, hd).transpose(1, 2)
    v = attn.v(memory).reshape(b, nk, attn.heads, hd).transpose(1, 2)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    weights = (logits if bias is None else logits + bias.to(logits.dtype)).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, nq, d)
    return attn.proj(out), logits.mean(dim=1)


def _atm_layer(layer: nn.Module, query: Tensor, memory: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    query = layer.norm1(query + layer.self_attn(query))
    out, attn_logits = _cross_attention(layer.multihead_attn, query, memory, bias)
    query = layer.norm2(query + out)
    query = layer.norm3(query + layer.linear2(F.relu(layer.linear1(query))))
    return query, attn_logits


def decode_tokens(
    decoder: nn.Module,
    tokens: list[Tensor],
    valid: Optional[Tensor],
    owner: Tensor,
    grid: tuple[int, int],
    out_size: tuple[int, int],
) -> Tensor:
    """Run a decoder on a shared sequence and copy every token's per-token output to the patches it covers.

    tokens: decoder inputs (B, T, D), deepest last; valid (B, T) bool or None (no padding); owner (B, N) token of
    every patch. Padding tokens are masked as attention keys. Same maths as the decoders in models/decoders.py,
    which run on the full grid; the copy happens where the official CTS code un-shares (before the x16 upsample).
    """
    if isinstance(decoder, LinearDecoder):
        per_token = decoder.head(tokens[-1])
        return upsample(tokens_to_map(gather_rows(per_token, owner), grid), out_size)
    if isinstance(decoder, MaskTransformer):
        x = decoder.proj_dec(tokens[-1])
        t = x.shape[1]
        x = torch.cat([x, x[:, :1] * 0.0 + decoder.cls_emb], dim=1)  # broadcast over the batch, no Expand
        bias = None if valid is None else key_bias(valid, extra=x[:, t:, 0])
        for block in decoder.blocks:
            x = block(x, bias)
        x = decoder.decoder_norm(x)
        patches = x[:, :t] @ decoder.proj_patch
        classes = x[:, t:] @ decoder.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)  # no epsilon, as the official code
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = decoder.mask_norm(patches @ classes.transpose(1, 2))
        return upsample(tokens_to_map(gather_rows(masks, owner), grid), out_size)
    if isinstance(decoder, ATMHead):
        feats = tokens[-decoder.stages:][::-1]
        bias = None if valid is None else key_bias(valid)
        query = feats[0][:, :1, :1] * 0.0 + decoder.q.weight.unsqueeze(0)  # (B, Q, d) by broadcasting, no Expand
        mask_logits: Optional[Tensor] = None
        for s, feat in enumerate(feats, start=1):
            memory = getattr(decoder, f"proj_norm_{s}")(getattr(decoder, f"input_proj_{s}")(feat))
            attn_logits = None
            for layer in getattr(decoder, f"decoder_{s}").layers:
                query, attn_logits = _atm_layer(layer, query, memory, bias)
            mask_logits = attn_logits if mask_logits is None else mask_logits + attn_logits
        class_prob = decoder.class_embed(query).softmax(-1)[..., : decoder.num_classes]
        per_patch = gather_rows(mask_logits.transpose(1, 2), owner)  # (B, N, Q)
        masks = upsample(tokens_to_map(per_patch, grid), out_size).sigmoid()
        b, q, h, w = masks.shape
        seg = class_prob.transpose(1, 2) @ masks.reshape(b, q, h * w)
        return seg.reshape(b, decoder.num_classes, h, w)
    raise ValueError(f"token-level decoding does not know the decoder {type(decoder).__name__}; use decode_on=grid")


class SharingMethod(nn.Module):
    """What CTS and dCTS share: policy input, no-op block hooks, decoding of the shared sequence."""

    extra_outputs: tuple[str, ...] = ("overflow",)
    step_names = {"embed": "patch embed + policy net + sharing", "decode": "unmerge + decoder"}
    may_pad = True  # whether the sequence can end in padding slots (then the decoder masks them)

    def __init__(self, model: nn.Module, policy: PolicyNet, decode_on: str, expose_decisions: bool):
        super().__init__()
        self.grid = tuple(model.grid)
        self.policy = policy.eval()
        self.image_mean, self.image_std = tuple(model.spec.mean), tuple(model.spec.std)
        self.decode_on = check_decode_mode(decode_on)
        self.expose_decisions = expose_decisions
        if expose_decisions:
            self.extra_outputs = (f"decision_{POINT}", f"margin_{POINT}", "overflow")

    def policy_scores(self, img: Tensor) -> dict[int, Tensor]:
        """Window scores on the segmenter's input, re-normalised to what the policy was trained with."""
        x = renormalize(img, self.image_mean, self.image_std, self.policy.cfg.mean, self.policy.cfg.std)
        return self.policy.window_scores(x)

    def check_input(self, backbone: nn.Module, img: Tensor) -> None:
        grid = (img.shape[-2] // PATCH, img.shape[-1] // PATCH)
        if grid != self.grid or grid != tuple(backbone.grid):
            raise ValueError(f"input grid {grid[0]}x{grid[1]} does not match the model's {self.grid[0]}x{self.grid[1]}")

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        return state

    def after_block(self, layer: int, state: TokenState) -> TokenState:
        return state

    def decode(self, decoder: nn.Module, feats: list[Tensor], state: TokenState, grid: tuple[int, int],
               image_size: tuple[int, int]) -> Tensor:
        rep = getattr(state, "rep", None)
        if self.decode_on == "grid" or rep is None:
            return decoder(feats, grid, image_size)
        tokens = [gather_rows(f, rep) for f in feats]
        valid = state.size[:, state.num_prefix:] > 0 if self.may_pad else None
        owner = state.owner - state.num_prefix
        return decode_tokens(decoder, tokens, valid, owner, grid, image_size)


def top_k_margin(scores: Tensor, selected: Tensor) -> Tensor:
    """Distance of each selection from flipping: selected -> score - best unselected; else worst selected - score."""
    best_out = masked_max(scores, ~selected, -1.0)
    worst_in = masked_min(scores, selected, 2.0)
    return torch.where(selected, scores - best_out, worst_in - scores)


class CTS(SharingMethod):
    """Static CTS: the k best 2x2 groups of the policy share one token each, before block 0."""

    may_pad = False  # exactly N - 3k tokens, every slot filled

    def __init__(self, cfg: CTSConfig, model: nn.Module, policy: Optional[PolicyNet] = None):
        grid = tuple(model.grid)
        check_grid_for_policy(grid, "CTS")
        policy = policy if policy is not None else build_policy(cfg.policy_weights, cfg.policy_width, cfg.policy_seed, (2,))
        super().__init__(model, policy, cfg.decode_on, cfg.expose_decisions)
        self.cfg = cfg
        self.k = resolve_k(cfg, grid)
        n = grid[0] * grid[1]
        self.num_patches, self.num_groups = n, n // 4
        self.tokens = n - 3 * self.k
        group_of_patch = patch_window_index(grid, 2)
        self.register_buffer("group_of_patch", group_of_patch, persistent=False)
        self.register_buffer("cand_size", torch.cat([torch.ones(n), torch.full((n // 4,), 4.0)]), persistent=False)
        self.register_buffer("cand_rep", torch.cat([torch.arange(n), window_top_left(grid, 2)]), persistent=False)
        self.register_buffer("patch_ids", torch.arange(n).unsqueeze(0), persistent=False)
        self.register_buffer("tie_lower", tie_order(n // 4), persistent=False)

    def embed(self, backbone: nn.Module, img: Tensor) -> SharedTokenState:
        self.check_input(backbone, img)
        n = self.num_patches
        scores = self.policy_scores(img)[2].flatten(1)  # (B, G)
        shared = descending_rank(scores, lower=self.tie_lower) < self.k
        cand = torch.cat([window_tokens(backbone, img, 1), window_tokens(backbone, img, 2)], dim=1)
        patch_shared = shared[:, self.group_of_patch]  # (B, N)
        keep = torch.cat([~patch_shared, shared], dim=1)
        cand_of_patch = torch.where(patch_shared, n + self.group_of_patch.unsqueeze(0), self.patch_ids)
        extras = {"overflow": torch.zeros_like(scores[:, 0], dtype=torch.int32)}
        if self.expose_decisions:
            extras[f"decision_{POINT}"] = shared.to(torch.int32)
            extras[f"margin_{POINT}"] = top_k_margin(scores, shared)
        return assemble_state(backbone, cand, self.cand_size, self.cand_rep, keep, self.tokens, cand_of_patch, extras,
                              may_pad=self.may_pad)


# Options that only `staticprune calibrate` reads (it builds the module without them).
CALIBRATE_ONLY_OPTIONS = ("calibrate_k",)


# Options under which the static module never overflows (a fixed number of shared groups: nothing can overflow): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {}


@register("cts")
def build(options: dict[str, Any], model: nn.Module) -> CTS:
    cfg = config_from_options(CTSConfig, options)
    if cfg.calibrate_k:
        raise ValueError("option calibrate_k=true has no effect here: only 'staticprune calibrate' reads it (to set "
                         "tokens from measured counts); remove it")
    return CTS(cfg, model)


def quantile_count(counts: list[int], quantile: float) -> int:
    """The `quantile` (0..1) of per-image token counts, rounded up: staticprune.calibrate's rule, for every method."""
    if not counts:
        raise ValueError("no kept-token counts to calibrate from")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1] (got {quantile})")

    return quantile_capacity(counts, quantile)


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict[str, Any]) -> dict[str, Any]:
    """CTS is static: the options come back unchanged, unless `calibrate_k` asks for a token budget.

    With calibrate_k=true, `tokens` is set to the `quantile` of the measured kept counts at point 'embed' (e.g. a
    dCTS reference run, for CTS at the same token budget) and any explicit k / preset is dropped.
    """
    out = dict(options)
    cfg = config_from_options(CTSConfig, options)
    if not cfg.calibrate_k:
        return out
    if POINT not in kept:
        raise ValueError(f"calibrate_k needs kept counts at point '{POINT}' (got {', '.join(kept) or 'none'})")
    out["tokens"] = quantile_count(kept[POINT], quantile)
    out.pop("k", None)
    out.pop("preset", None)
    out["calibrate_k"] = False
    return out
