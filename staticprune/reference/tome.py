"""Eager ToMe: bipartite soft matching (Bolya et al., ICLR 2023) run the way the official code runs it.

One image at a time, Python control flow, data-dependent token counts, ToMe's dense `source` matrix for
unmerging (merged with amax, owner = argmax). Plain torch, no code shared with staticprune.ops or
staticprune.methods: this is the oracle the static graph is checked against.

Canonical rules where the official code is arbitrary (docs/methods/tome.md): ties resolve to the
lowest index (stable sort, first maximum). The eager runner and decoder helpers here are also used by
reference/algm.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from staticprune.models.decoders import tokens_to_map, upsample
from staticprune.reference import ReferenceOutput

# Option name -> (type, default). Same names and defaults as methods/tome.py's ToMeConfig, written out again
# on purpose: the oracle shares nothing with the code it checks (tests compare the defaults).
TOME_OPTIONS: dict[str, tuple[type, Any]] = dict(
    mode=(str, "r"), r=(tuple, (0.04,)), layers=(tuple, ()), threshold=(float, 0.9), inclusive=(bool, True),
    prop_attn=(bool, True), unmerge=(str, "auto"),
)


# ------------------------------------------------------------------------------------------- options


def read_options(options: dict, spec: dict[str, tuple[type, Any]]) -> dict[str, Any]:
    """The options the eager method needs, with its defaults. Keys only the static graph uses (capacities,
    expose_decisions) are ignored. Accepts what --opt produces: scalars, lists, "1,5", "true", "none"."""
    out = {key: default for key, (_, default) in spec.items()}
    for key, (kind, _) in spec.items():
        if key not in options:
            continue
        value = options[key]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            out[key] = None
        elif kind is tuple:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
            out[key] = tuple(float(v) for v in items)
        elif kind is bool:
            out[key] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        else:
            out[key] = kind(value)
    return out


def token_count(value: float, n: int) -> int:
    """Below 1: a fraction of n, rounded half up; otherwise a whole count."""
    return math.floor(value * n + 0.5) if value < 1 else int(value)


def placement(option: str, decoder_kind: str) -> str:
    if option == "auto":
        return "before" if decoder_kind == "atm" else "after"
    return option


# ------------------------------------------------------------------------------------------- eager runner


@dataclass
class Image:
    """One image's eager state: the reduced sequence and ToMe's source matrix."""

    x: Tensor  # (T, D) tokens, prefix first
    size: Tensor  # (T,) patches per token
    source: Tensor  # (T, T0) 1 where token i contains original token j
    num_prefix: int
    feats: list[Tensor] = field(default_factory=list)  # full-grid patch features of the decoder's blocks

    def owner(self) -> Tensor:
        """(N0,) index, among the current patch tokens, of the token holding each original patch."""
        p = self.num_prefix
        return self.source[p:, p:].argmax(dim=0)

    def full_grid(self) -> Tensor:
        """(N0, D) unmerged patch features."""
        return self.x[self.num_prefix :][self.owner()]


def run_backbone(
    model, img: Tensor, prop_attn: bool, reduce: Callable[[int, list[Image], list[Tensor]], None]
) -> list[Image]:
    """Run the backbone eagerly on every image, calling `reduce(block, images, keys)` between attention and MLP.

    All images advance block by block together because ALGM's original code couples them at its reduction
    points; `keys` are each image's (heads, T, head_dim) keys.
    """
    backbone = model.backbone
    images = []
    for b in range(img.shape[0]):
        x = backbone.embed(img[b : b + 1]).x[0]
        t = x.shape[0]
        images.append(Image(x, torch.ones(t), torch.eye(t), backbone.num_prefix))
    for i, block in enumerate(backbone.blocks):
        keys = []
        for im in images:
            bias = im.size.log()[None, None, None, :] if prop_attn else None
            y, k = block.attn(block.norm1(im.x[None]), bias)
            im.x = im.x + y[0]
            keys.append(k[0])
        reduce(i, images, keys)
        for im in images:
            im.x = im.x + block.mlp(block.norm2(im.x[None]))[0]
            if i in backbone.cfg.out_indices:
                im.feats.append(im.full_grid())
    if backbone.norm is not None:
        for im in images:
            im.x = backbone.norm(im.x)
    return images


def decode(model, images: list[Image], where: str) -> Tensor:
    """Logits (B, K, H, W): unmerge before the decoder, or run it on the reduced tokens and unmerge after."""
    out = []
    for im in images:
        if where == "before":
            feats = im.feats if model.spec.decoder == "atm" else [im.full_grid()]
            out.append(model.decoder([f[None] for f in feats], model.grid, model.image_size))
        else:
            out.append(decode_reduced(model, im))
    return torch.cat(out)


def decode_reduced(model, im: Image) -> Tensor:
    """ALGM's Segmenter decoder with `source`: per-token output on the reduced tokens, then masks[owner]."""
    dec, tokens = model.decoder, im.x[im.num_prefix :]
    if model.spec.decoder == "linear":
        per_token = dec.head(tokens)
    else:
        y = dec.proj_dec(tokens)
        n = y.shape[0]
        y = torch.cat([y, dec.cls_emb[0]])[None]
        for block in dec.blocks:
            y = block(y)
        y = dec.decoder_norm(y)[0]
        patches, classes = y[:n] @ dec.proj_patch, y[n:] @ dec.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        per_token = dec.mask_norm(patches @ classes.T)
    full = per_token[im.owner()]
    return upsample(tokens_to_map(full[None], model.grid), model.image_size)


# ------------------------------------------------------------------------------------------- ToMe


@dataclass
class EdgeSet:
    """ToMe's edges on one image: one per A token (even positions) to its most similar B token (odd)."""

    node_max: Tensor  # (nA,) best similarity, -inf for the protected class token
    node_idx: Tensor  # (nA,) partner B index, first maximum
    order: Tensor  # A indices by node_max, descending, stable (ties: lowest index first)
    has_edges: bool  # False when there is no B token
    protected: bool
    distill: bool = False  # a DeiT distillation token at position 1 (B token 0): never a partner, output second


@dataclass
class Matching:
    src: Tensor  # A indices that merge, best edge first
    dst: Tensor  # their B partners
    unm: Tensor  # A indices that stay, in output order
    distill: bool = False  # the output puts B token 0 (the distillation token) second


def best_edges(metric: Tensor, protected: bool, distill: bool = False) -> EdgeSet:
    """`protected`: a class token at position 0 (A token 0) never merges; `distill`: a distillation token at
    position 1 (B token 0) receives no merge, as ToMe's `scores[..., :, 0] = -inf`."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[0::2], metric[1::2]
    if b.shape[0] - int(distill) <= 0:
        node_max, node_idx = torch.full((a.shape[0],), -math.inf), torch.zeros(a.shape[0], dtype=torch.long)
    else:
        scores = a @ b.T
        if protected:
            scores[0, :] = -math.inf
        if distill:
            scores[:, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # first maximum
    order = torch.sort(node_max, descending=True, stable=True).indices
    return EdgeSet(node_max, node_idx, order, b.shape[0] - int(distill) > 0, protected, distill)


def mergeable(e: EdgeSet) -> Tensor:
    """Edge scores of the A tokens that may merge (the class token row excluded)."""
    if not e.has_edges:
        return e.node_max[:0]
    return e.node_max[1:] if e.protected else e.node_max


def count_at_least(e: EdgeSet, threshold: float, inclusive: bool) -> int:
    v = mergeable(e)
    return int((v >= threshold).sum() if inclusive else (v > threshold).sum())


def take(e: EdgeSet, n: int) -> Matching:
    """The n best edges merge; kept A tokens in index order with a class token (ToMe), by score without."""
    n = n if e.has_edges else 0
    src, unm = e.order[:n], e.order[n:]
    if e.protected:
        unm = unm.sort().values
    return Matching(src, e.node_idx[src], unm, e.distill)


def merge_wavg(im: Image, m: Matching) -> None:
    """ToMe's merge_wavg + merge_source: size-weighted average into B, sizes summed, source by amax."""

    def merge(y: Tensor, reduce: str) -> Tensor:
        ya, yb = y[0::2], y[1::2]
        index = m.dst.reshape(-1, *([1] * (y.dim() - 1))).expand(-1, *y.shape[1:])
        yb = yb.scatter_reduce(0, index, ya[m.src], reduce=reduce, include_self=True)
        unm = ya[m.unm]
        if m.distill:  # ToMe keeps [CLS, distillation token] in front: [unm[0], dst[0], unm[1:], dst[1:]]
            return torch.cat([unm[:1], yb[:1], unm[1:], yb[1:]])
        return torch.cat([unm, yb])

    x = merge(im.x * im.size[:, None], "sum")
    size = merge(im.size, "sum")
    im.x, im.size = x / size[:, None], size
    im.source = merge(im.source, "amax")


def tome_decision(e: EdgeSet, m: Matching, length: int) -> Tensor:
    """Per A token: partner B index if merged; else -1 with a class token, -2 - rank without one."""
    dec = torch.full((length,), -1, dtype=torch.int64)
    n_a = e.node_max.shape[0]
    if not e.protected and e.has_edges:  # kept A tokens are ordered by score: their rank is a decision too
        rank = torch.empty(n_a, dtype=torch.int64)
        rank[e.order] = torch.arange(n_a)
        dec[:n_a] = -2 - rank
    dec[m.src] = m.dst
    return dec


def reference_forward(model, img: Tensor, options: dict) -> ReferenceOutput:
    opts = read_options(options, TOME_OPTIONS)
    backbone = model.backbone
    p, depth = backbone.num_prefix, backbone.cfg.depth
    n0 = model.grid[0] * model.grid[1]
    layers = sorted({int(v) for v in opts["layers"]}) or list(range(1, depth + 1))
    if opts["mode"] not in ("r", "threshold"):
        raise ValueError(f"mode={opts['mode']!r}: choose r or threshold")
    rs = list(opts["r"]) * len(layers) if len(opts["r"]) == 1 else list(opts["r"])
    plan = {layer - 1: (f"layer{layer}", token_count(r, n0)) for layer, r in zip(layers, rs)}
    length = (p + n0 + 1) // 2
    kept: dict[str, list[int]] = {name: [] for name, _ in plan.values()}
    decisions: dict[str, list[Tensor]] = {name: [] for name, _ in plan.values()}

    def reduce(block: int, images: list[Image], keys: list[Tensor]) -> None:
        if block not in plan:
            return
        name, r = plan[block]
        for im, k in zip(images, keys):
            if opts["mode"] == "r":
                n = min(r, (im.x.shape[0] - p) // 2)  # ToMe: r <= (T - protected) // 2
                if n <= 0:  # ToMe returns do_nothing: same tokens, same order (no A/B rebuild)
                    decisions[name].append(torch.full((length,), -1, dtype=torch.int64))
                    kept[name].append(im.x.shape[0] - p)
                    continue
            e = best_edges(k.mean(0), p >= 1, p == 2)  # CLS protected; DeiT's distillation token too
            if opts["mode"] != "r":
                n = count_at_least(e, opts["threshold"], opts["inclusive"])
            m = take(e, n)
            decisions[name].append(tome_decision(e, m, length))
            merge_wavg(im, m)
            kept[name].append(im.x.shape[0] - p)

    with torch.no_grad():
        images = run_backbone(model, img, opts["prop_attn"], reduce)
        logits = decode(model, images, placement(opts["unmerge"], model.spec.decoder))
    return ReferenceOutput(
        logits=logits, kept=kept, decisions={k: torch.stack(v) for k, v in decisions.items()},
        owner=torch.stack([im.owner() for im in images]),
    )
