"""Eager CTS, written the way the official code runs it (tue-mps/cts-segmenter; docs/methods/cts.md).

Per image, in Python: sort the 2x2 group scores (descending; a stable sort, so equal scores keep the lower group
index first -- the official unstable sort leaves that order arbitrary, staticprune fixes it), mark the top k,
build the token list [CLS, individual patches in raster order, shared groups in raster order] with a per-token
code (scale, row, col), run the blocks on that variable-length sequence, run the decoder on the tokens and copy
each token's output to the cells its code covers (``patches_to_images``), then upsample.

A shared group's pixels are the image downscaled by 0.5 with bilinear interpolation (align_corners=False), its
positional vector the same downscale of the position grid -- exactly as the official code, not average pooling.
Plain torch only: nothing from staticprune.ops or staticprune.methods.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.models.decoders import ATMHead, LinearDecoder, MaskTransformer
from staticprune.models.policy import PolicyNet, build_policy, renormalize
from staticprune.reference import ReferenceOutput

PATCH = 16
POINT = "embed"
# Same named settings as the static module; tests check the two tables agree.
PRESETS = {
    "ade20k-512": (103, (32, 32)),
    "coco-stuff-512": (103, (32, 32)),
    "pascal-context-480": (90, (30, 30)),
    "cityscapes-768": (336, (48, 48)),
    "cityscapes-768-30": (230, (48, 48)),
    "cityscapes-1024-30": (410, (64, 64)),
}

Code = tuple[int, int, int]  # (side in patches, top row, left column) of the cells a token covers


def shared_group_count(options: dict[str, Any], grid: tuple[int, int]) -> int:
    """k from the options: preset, else k >= 0, else tokens > 0, else reduction (default 0.3)."""
    n = grid[0] * grid[1]
    if options.get("preset"):
        return PRESETS[options["preset"]][0]
    if int(options.get("k", -1)) >= 0:
        return int(options["k"])
    if int(options.get("tokens", 0)) > 0:
        return max(0, math.ceil((n - int(options["tokens"])) / 3))
    return round(float(options.get("reduction", 0.3)) * n / 3)


def policy_of(model: nn.Module, options: dict[str, Any], window_sizes: tuple[int, ...]) -> PolicyNet:
    """The policy the model's method carries, else one built from the options (same weights as the static)."""
    policy = getattr(getattr(model, "method", None), "policy", None)
    if policy is not None:
        return policy
    return build_policy(str(options.get("policy_weights", "")), float(options.get("policy_width", 1.0)),
                        int(options.get("policy_seed", 0)), window_sizes)


def policy_scores(model: nn.Module, policy: nn.Module, img: Tensor) -> dict[int, Tensor]:
    """Scores for the whole batch at once (the official code also runs the policy batched, then loops)."""
    with torch.no_grad():
        x = renormalize(img, model.spec.mean, model.spec.std, policy.cfg.mean, policy.cfg.std)
        return policy.window_scores(x)


def run_encoder(model: nn.Module, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
    """Plain blocks on one image's (1, T, D) sequence (CLS already in front if the backbone uses it).

    Returns the patch-token features the decoder reads (SegViT: the out_indices blocks; Segmenter: the final
    normed state), CLS dropped, and the number of prefix tokens dropped.
    """
    backbone = model.backbone
    x, outs = tokens, []
    for i, block in enumerate(backbone.blocks):
        x = block(x)
        if i in backbone.cfg.out_indices:
            outs.append(x)
    if backbone.norm is not None:
        x = backbone.norm(x)
    prefix = 1 if backbone.cfg.use_cls_token else 0
    feats = [o[:, prefix:] for o in outs] if model.spec.decoder == "atm" else [x[:, prefix:]]
    return feats, prefix


def place(values: Tensor, codes: list[Code], grid: tuple[int, int]) -> Tensor:
    """(T, C) per-token values -> (1, C, gh, gw): every token's vector copied to each cell its code covers."""
    out = values.new_zeros(values.shape[1], grid[0], grid[1])
    for (s, r, c), v in zip(codes, values):
        out[:, r : r + s, c : c + s] = v[:, None, None]
    return out.unsqueeze(0)


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def decode_shared(model: nn.Module, feats: list[Tensor], codes: list[Code], mode: str) -> Tensor:
    """One image's logits (1, K, H, W) from its shared-token features (each (1, T, D))."""
    decoder, grid, size = model.decoder, model.grid, model.image_size
    if mode == "grid":  # copy tokens to the grid first, then the unmodified decoder
        full = [place(f[0], codes, grid).flatten(2).transpose(1, 2) for f in feats]
        return decoder(full, grid, size)
    if isinstance(decoder, LinearDecoder):
        return _upsample(place(decoder.head(feats[-1])[0], codes, grid), size)
    if isinstance(decoder, MaskTransformer):
        x = decoder.proj_dec(feats[-1])
        t = x.shape[1]
        x = torch.cat([x, decoder.cls_emb], dim=1)
        for block in decoder.blocks:
            x = block(x)
        x = decoder.decoder_norm(x)
        patches = x[:, :t] @ decoder.proj_patch
        classes = x[:, t:] @ decoder.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = decoder.mask_norm(patches @ classes.transpose(1, 2))
        return _upsample(place(masks[0], codes, grid), size)
    if isinstance(decoder, ATMHead):
        stages = feats[-decoder.stages:][::-1]
        query = decoder.q.weight.unsqueeze(0)
        mask_logits: Optional[Tensor] = None
        for s, feat in enumerate(stages, start=1):
            memory = getattr(decoder, f"proj_norm_{s}")(getattr(decoder, f"input_proj_{s}")(feat))
            query, attn = getattr(decoder, f"decoder_{s}")(query, memory)
            mask_logits = attn if mask_logits is None else mask_logits + attn
        class_prob = decoder.class_embed(query).softmax(-1)[..., : decoder.num_classes]
        masks = _upsample(place(mask_logits[0].transpose(0, 1), codes, grid), size).sigmoid()
        _, q, h, w = masks.shape
        return (class_prob.transpose(1, 2) @ masks.reshape(1, q, h * w)).reshape(1, decoder.num_classes, h, w)
    raise ValueError(f"no token-level decoding for {type(decoder).__name__}")


def with_prefix(model: nn.Module, tokens: Tensor) -> Tensor:
    """(T, D) patch tokens -> (1, T [+1], D) with the CLS token (plus its positional vector) in front."""
    backbone = model.backbone
    x = tokens.unsqueeze(0)
    if backbone.cfg.use_cls_token:
        x = torch.cat([backbone.cls_token + backbone.pos_embed[:, :1], x], dim=1)
    return x


def owner_map(codes: list[Code], grid: tuple[int, int]) -> Tensor:
    """(N,) token index of every patch (CLS not counted)."""
    owner = torch.empty(grid[0], grid[1], dtype=torch.long)
    for t, (s, r, c) in enumerate(codes):
        owner[r : r + s, c : c + s] = t
    return owner.flatten()


def reference_forward(model: nn.Module, img: Tensor, options: dict[str, Any]) -> ReferenceOutput:
    gh, gw = model.grid
    n, hg, wg = gh * gw, gh // 2, gw // 2
    k = shared_group_count(options, (gh, gw))
    mode = str(options.get("decode_on", "tokens"))
    backbone = model.backbone
    policy = policy_of(model, options, (2,))
    scores = policy_scores(model, policy, img)[2]
    logits, kept, decisions, owners = [], [], [], []
    with torch.no_grad():
        pos = backbone.pos_embed[0, 1:].reshape(gh, gw, -1)
        pos_half = F.interpolate(pos.permute(2, 0, 1)[None], scale_factor=0.5, mode="bilinear",
                                 align_corners=False)[0].permute(1, 2, 0)
        for b in range(img.shape[0]):
            order = torch.sort(scores[b].flatten(), descending=True, stable=True).indices
            shared = torch.zeros(hg * wg, dtype=torch.bool)
            shared[order[:k]] = True
            shared = shared.view(hg, wg)
            im = img[b : b + 1]
            patches = backbone.patch_embed(im)[0].reshape(gh, gw, -1)
            half = F.interpolate(im, scale_factor=0.5, mode="bilinear", align_corners=False)
            groups = backbone.patch_embed(half)[0].reshape(hg, wg, -1)
            toks, codes = [], []
            for r in range(gh):
                for c in range(gw):
                    if not shared[r // 2, c // 2]:
                        toks.append(patches[r, c] + pos[r, c])
                        codes.append((1, r, c))
            for i in range(hg):
                for j in range(wg):
                    if shared[i, j]:
                        toks.append(groups[i, j] + pos_half[i, j])
                        codes.append((2, 2 * i, 2 * j))
            feats, _ = run_encoder(model, with_prefix(model, torch.stack(toks)))
            logits.append(decode_shared(model, feats, codes, mode))
            kept.append(len(codes))
            decisions.append(shared.flatten().to(torch.int32))
            owners.append(owner_map(codes, (gh, gw)))
    assert all(t == n - 3 * k for t in kept)  # CTS keeps a fixed count: the eager run proves it per image
    return ReferenceOutput(logits=torch.cat(logits), kept={POINT: kept}, decisions={POINT: torch.stack(decisions)},
                           owner=torch.stack(owners))
