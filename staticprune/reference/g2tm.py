"""Eager, dynamic, paper-faithful G2TM: the oracle for `staticprune.methods.g2tm`. Never exported.

Follows the official code (vbercy/g2tm-segmenter, `graph_merge.py` and the Segmenter patch) in its batch-1
"sparse" form, one image at a time: neighbour cosine similarities as the official `get_mergeable_idxs`
computes them (batched, `F.cosine_similarity(neighbour, token)` on right/bottom index lists), a strict
threshold, connected components by breadth-first search in plain Python (NetworkX's role), each component
with >= 2 members replaced by the plain mean of its members, merged-away tokens removed from the sequence,
and the later blocks and (unmerge "after", the official placement for the Segmenter decoders) the decoder run
on the shorter sequence; the decoder's per-token output is then copied back to every patch of its group.
Plain torch only; no code shared with `staticprune.ops` or `staticprune.methods`.

Canonical choices where the original is arbitrary (docs/methods/g2tm.md): the merged token sits in the
order of its component's lowest patch index (the official slot is the middle of a set-ordered list); the
blocks before the merge run batched, because that part is the unmodified model and the decisions should
see bit-identical inputs to the static graph's (planted exact ties then test tie handling, not BLAS).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from staticprune.reference import ReferenceOutput

POINT = "g2tm"
_STATIC_ONLY = ("capacity", "expose_decisions")  # options of the static graph that do not change the method


@dataclass
class _Options:
    layer: int = 2
    threshold: float = 0.95
    prop_attn: bool = False
    unmerge: str = "auto"


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _options(options: dict[str, Any], decoder_kind: str) -> tuple[_Options, str]:
    """The method's options and where the decoder reads the tokens ("before" / "after" the unmerge)."""
    known = set(_Options.__dataclass_fields__) | set(_STATIC_ONLY)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown G2TM option(s) {', '.join(unknown)}")
    opts = _Options(
        layer=int(options.get("layer", 2)),
        threshold=float(options.get("threshold", 0.95)),
        prop_attn=_as_bool(options.get("prop_attn", False)),
        unmerge=str(options.get("unmerge", "auto")),
    )
    if opts.unmerge not in ("auto", "before", "after"):
        raise ValueError(f"unmerge='{opts.unmerge}' is not auto, before or after")
    if opts.unmerge == "after" and decoder_kind == "atm":
        raise ValueError("unmerge=after is not available for the ATM head")
    placement = opts.unmerge if opts.unmerge != "auto" else ("before" if decoder_kind == "atm" else "after")
    return opts, placement


def edge_masks(patches: Tensor, gh: int, gw: int, threshold: float) -> tuple[Tensor, Tensor]:
    """(B, N) bool: patch i joined to its right neighbour / to the patch below (official index lists)."""
    b, n, _ = patches.shape
    has_right = ((torch.arange(gh)[:, None] * gw) + torch.arange(gw - 1)).reshape(-1)
    has_bottom = torch.arange(n - gw)
    right_sims = F.cosine_similarity(patches[:, has_right + 1], patches[:, has_right], dim=-1)
    bottom_sims = F.cosine_similarity(patches[:, has_bottom + gw], patches[:, has_bottom], dim=-1)
    right = torch.zeros(b, n, dtype=torch.bool)
    bottom = torch.zeros(b, n, dtype=torch.bool)
    right[:, has_right] = right_sims > threshold
    bottom[:, has_bottom] = bottom_sims > threshold
    return right, bottom


def connected_components(right: list[bool], bottom: list[bool], gw: int) -> list[list[int]]:
    """Components of the kept-edge graph by BFS, each sorted, listed by their lowest index."""
    n = len(right)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        if right[i]:
            neighbours[i].append(i + 1)
            neighbours[i + 1].append(i)
        if bottom[i]:
            neighbours[i].append(i + gw)
            neighbours[i + gw].append(i)
    seen = [False] * n
    components = []
    for start in range(n):  # increasing start: each component is found from its lowest index
        if seen[start]:
            continue
        seen[start] = True
        members, queue = [start], deque([start])
        while queue:
            for j in neighbours[queue.popleft()]:
                if not seen[j]:
                    seen[j] = True
                    members.append(j)
                    queue.append(j)
        components.append(sorted(members))
    return components


@dataclass
class _Merged:
    x: Tensor  # (1, prefix + K, D)
    size: Tensor  # (1, prefix + K) float
    group: Tensor  # (N,) int64 group index (0..K-1) of every patch
    labels: Tensor  # (N,) int64 lowest patch index of every patch's component


def merge_image(tokens: Tensor, prefix: int, components: list[list[int]]) -> _Merged:
    """Replace each component by the plain mean of its members (sizes are all 1 at the merge layer)."""
    patches = tokens[prefix:]
    n = patches.shape[0]
    group = torch.empty(n, dtype=torch.int64)
    labels = torch.empty(n, dtype=torch.int64)
    rows = [tokens[:prefix]]
    for g, members in enumerate(components):
        index = torch.tensor(members)
        group[index] = g
        labels[index] = members[0]
        rows.append(patches[index].mean(0, keepdim=True))
    size = torch.tensor([1.0] * prefix + [float(len(m)) for m in components], dtype=tokens.dtype)
    return _Merged(torch.cat(rows, 0).unsqueeze(0), size.unsqueeze(0), group, labels)


def _bias(size: Tensor, proportional: bool) -> Optional[Tensor]:
    """Nothing to mask in the sparse form; proportional attention adds log(size) on the keys."""
    return torch.log(size)[:, None, None, :] if proportional else None


def _masks_on_groups(decoder, slots: Tensor, size: Tensor, proportional: bool) -> Tensor:
    """The Segmenter mask transformer on the K merged tokens of one image: (1, K, classes) masks."""
    k = slots.shape[1]
    x = torch.cat([decoder.proj_dec(slots), decoder.cls_emb], 1)
    size = torch.cat([size, torch.ones(1, decoder.num_classes, dtype=size.dtype)], 1)
    for block in decoder.blocks:
        x = block(x, _bias(size, proportional))
    x = decoder.decoder_norm(x)
    patches = x[:, :k] @ decoder.proj_patch
    classes = x[:, k:] @ decoder.proj_classes
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    return decoder.mask_norm(patches @ classes.transpose(1, 2))


def _decode_after_unmerge(model, slots: Tensor, size: Tensor, group: Tensor, proportional: bool) -> Tensor:
    """Decoder on the merged tokens, per-token output copied back to every patch of its group, upsampled."""
    decoder = model.decoder
    if model.spec.decoder == "mask":
        per_token = _masks_on_groups(decoder, slots, size, proportional)
    else:
        per_token = decoder.head(slots)
    per_patch = per_token[:, group]  # (1, N, classes)
    gh, gw = model.grid
    maps = per_patch.transpose(1, 2).reshape(1, per_patch.shape[2], gh, gw)
    return F.interpolate(maps, size=model.image_size, mode="bilinear", align_corners=False)


def reference_forward(model, img: Tensor, options: dict[str, Any]) -> ReferenceOutput:
    backbone, spec = model.backbone, model.spec
    opts, placement = _options(options, spec.decoder)
    depth = len(backbone.blocks)
    if not 1 <= opts.layer <= depth:
        raise ValueError(f"layer={opts.layer} is outside 1..{depth}")
    at = opts.layer - 1
    gh, gw = model.grid
    prefix = backbone.num_prefix
    out_indices = backbone.cfg.out_indices

    with torch.no_grad():
        # Unmodified model up to the merge point, batched (see module docstring).
        x = backbone.embed(img).x
        early: list[Tensor] = []  # (B, N, D) patch features of out_indices blocks before the merge
        for i in range(at):
            x = backbone.blocks[i](x)
            if i in out_indices:
                early.append(x[:, prefix:])
        block = backbone.blocks[at]
        x = x + block.attn(block.norm1(x))[0]
        right, bottom = edge_masks(x[:, prefix:], gh, gw, opts.threshold)

        logits, kept, labels, owner = [], [], [], []
        for b in range(img.shape[0]):
            components = connected_components(right[b].tolist(), bottom[b].tolist(), gw)
            merged = merge_image(x[b], prefix, components)
            kept.append(len(components))
            labels.append(merged.labels)
            owner.append(merged.group)
            xb, size = merged.x, merged.size
            xb = xb + block.mlp(block.norm2(xb))
            feats = [f[b : b + 1] for f in early]
            if at in out_indices:
                feats.append(xb[:, prefix:][:, merged.group])
            for i in range(at + 1, depth):
                xb = backbone.blocks[i](xb, _bias(size, opts.prop_attn))
                if i in out_indices:
                    feats.append(xb[:, prefix:][:, merged.group])
            if backbone.norm is not None:
                xb = backbone.norm(xb)
            if placement == "after":
                logits.append(_decode_after_unmerge(model, xb[:, prefix:], size[:, prefix:], merged.group,
                                                    opts.prop_attn))
                continue
            if spec.decoder != "atm":
                feats = [xb[:, prefix:][:, merged.group]]
            logits.append(model.decoder(feats, model.grid, model.image_size))

    return ReferenceOutput(
        logits=torch.cat(logits, 0),
        kept={POINT: kept},
        decisions={POINT: torch.stack(labels).to(torch.int32)},
        owner=torch.stack(owner),
    )
