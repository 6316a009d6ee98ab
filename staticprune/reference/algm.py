"""Eager ALGM (Norouzi et al., CVPR 2024): CLAP in layer 1, GBM in layer 5 (ViT-L: 7), run as the official code.

CLAP (`conditional_pooling`): per k x k window, the mean cosine similarity of its distinct token pairs after the
layer's attention; windows at/above the threshold become their mean, stored [CLS, merged windows by score,
other patches in index order]. GBM (`turbo_matching`): ToMe's bipartite matching on the tokens themselves, every
edge at/above an adaptive threshold mean + std / layer merges. Per image, Python control flow, dense `source`.

Canonical choices where the official code is arbitrary (docs/methods/algm.md): lowest index wins
ties; images are independent unless batch_coupling is set (then, as the original, a batch merges the smallest
count any image asks for and GBM pools its threshold over the batch). Plain torch; shares no code with
staticprune.ops or staticprune.methods.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from staticprune.reference import ReferenceOutput
from staticprune.reference.tome import (
    Image,
    best_edges,
    count_at_least,
    decode,
    merge_wavg,
    mergeable,
    placement,
    read_options,
    run_backbone,
    take,
    tome_decision,
)

# Same names and defaults as methods/algm.py's ALGMConfig, written out again (the oracle shares nothing).
ALGM_OPTIONS: dict[str, tuple[type, Any]] = dict(
    clap_layer=(int, 1), gbm_layer=(int, None), window=(tuple, (2.0, 2.0)), clap_threshold=(float, None),
    gbm_threshold=(float, None), gbm_metric=(str, "tokens"), inclusive=(bool, True),
    batch_coupling=(bool, False), prop_attn=(bool, False), unmerge=(str, "auto"),
)
CLAP_THRESHOLD = {"t": 0.90, "s": 0.88, "b": 0.94, "l": 0.95}  # official ADE20K values per backbone


def windows(grid: tuple[int, int], window: tuple[int, int]) -> list[list[int]]:
    """Complete windows in raster order, each its patch indices in raster order."""
    (gh, gw), (kh, kw) = grid, window
    return [[(wr * kh + i) * gw + wc * kw + j for i in range(kh) for j in range(kw)]
            for wr in range(gh // kh) for wc in range(gw // kw)]


def window_scores(patches: Tensor, wins: list[list[int]]) -> Tensor:
    """(S,) mean cosine similarity of the distinct token pairs of each window (the official masks self-pairs)."""
    t = patches[torch.tensor(wins)]  # (S, M, D)
    m = t.shape[1]
    sims = F.cosine_similarity(t[:, :, None, :], t[:, None, :, :], dim=-1)
    return (sims * (1 - torch.eye(m))).sum((-1, -2)) / (m * (m - 1))


def clap_merge(im: Image, wins: list[list[int]], chosen: Tensor) -> None:
    """Average each chosen window (in the given order) into one token; output [prefix, merged, other patches]."""
    p = im.num_prefix
    members = [wins[int(w)] for w in chosen]
    pooled = {q for mem in members for q in mem}
    rest = [q for q in range(im.x.shape[0] - p) if q not in pooled]
    rows_x, rows_s, rows_src = [im.x[:p]], [im.size[:p]], [im.source[:p]]
    for mem in members:
        idx = torch.tensor(mem) + p
        s = im.size[idx]
        rows_x.append(((im.x[idx] * s[:, None]).sum(0) / s.sum())[None])
        rows_s.append(s.sum()[None])
        rows_src.append(im.source[idx].amax(0)[None])
    idx = torch.tensor(rest, dtype=torch.long) + p
    rows_x.append(im.x[idx])
    rows_s.append(im.size[idx])
    rows_src.append(im.source[idx])
    im.x, im.size, im.source = torch.cat(rows_x), torch.cat(rows_s), torch.cat(rows_src)


def gbm_threshold(values: list[Tensor], layer: int, coupled: bool) -> list[float]:
    """The official adaptive threshold mean + std / layer (unbiased std) over the mergeable edges, per image or
    pooled over the batch (mean of the per-image means and stds). Fewer than 2 edges: nothing merges."""
    if coupled and any(v.numel() < 2 for v in values):
        return [math.inf] * len(values)
    stats = [(float(v.mean()), float(v.std())) if v.numel() >= 2 else (math.inf, 0.0) for v in values]
    if coupled:
        mean = sum(s[0] for s in stats) / len(stats)
        std = sum(s[1] for s in stats) / len(stats)
        return [mean + std / layer] * len(values)
    return [m + s / layer for m, s in stats]


def reference_forward(model, img: Tensor, options: dict) -> ReferenceOutput:
    opts = read_options(options, ALGM_OPTIONS)
    backbone = model.backbone
    p, depth = backbone.num_prefix, backbone.cfg.depth
    n0 = model.grid[0] * model.grid[1]
    clap_layer = opts["clap_layer"]
    gbm_layer = opts["gbm_layer"] or (7 if depth >= 24 else 5)
    window = tuple(int(v) for v in opts["window"])
    tau_clap = opts["clap_threshold"] if opts["clap_threshold"] is not None else CLAP_THRESHOLD[model.spec.size]
    coupled, inclusive = opts["batch_coupling"], opts["inclusive"]
    wins = windows(model.grid, window)
    length = (p + n0 + 1) // 2
    kept: dict[str, list[int]] = {"clap": [], "gbm": []}
    decisions: dict[str, list[Tensor]] = {"clap": [], "gbm": []}

    def couple(counts: list[int]) -> list[int]:
        return [min(counts)] * len(counts) if coupled else counts

    def reduce(block: int, images: list[Image], keys: list[Tensor]) -> None:
        if block == clap_layer - 1:
            scores = [window_scores(im.x[p:], wins) for im in images]
            counts = couple([int((s >= tau_clap).sum() if inclusive else (s > tau_clap).sum()) for s in scores])
            for im, s, n in zip(images, scores, counts):
                chosen = torch.sort(s, descending=True, stable=True).indices[:n]
                dec = torch.full((len(wins),), -1, dtype=torch.int64)
                dec[chosen] = torch.arange(n)
                decisions["clap"].append(dec)
                clap_merge(im, wins, chosen)
                kept["clap"].append(im.x.shape[0] - p)
        if block == gbm_layer - 1:
            metrics = [im.x if opts["gbm_metric"] == "tokens" else k.mean(0) for im, k in zip(images, keys)]
            edges = [best_edges(m, p == 1) for m in metrics]
            if opts["gbm_threshold"] is None:
                taus = gbm_threshold([mergeable(e) for e in edges], gbm_layer, coupled)
            else:
                taus = [opts["gbm_threshold"]] * len(images)
            counts = couple([count_at_least(e, t, inclusive) for e, t in zip(edges, taus)])
            for im, e, n in zip(images, edges, counts):
                m = take(e, n)
                decisions["gbm"].append(tome_decision(e, m, length))
                merge_wavg(im, m)
                kept["gbm"].append(im.x.shape[0] - p)

    with torch.no_grad():
        images = run_backbone(model, img, opts["prop_attn"], reduce)
        logits = decode(model, images, placement(opts["unmerge"], model.spec.decoder))
    return ReferenceOutput(
        logits=logits, kept=kept, decisions={k: torch.stack(v) for k, v in decisions.items()},
        owner=torch.stack([im.owner() for im in images]),
    )
