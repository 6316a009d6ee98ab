"""Eager LVTP with the configuration choices of docs/methods/lvtp.md: the oracle for the static module.

Per image, with Python control flow and data-dependent token counts: the blocks run on the surviving tokens only;
at each pruning block the paper's equations are applied literally (Tsallis entropies, min-max weights, cosine
k-means with per-cluster means, Sobel energy by shifted differences, 1-D k-means, clusters pruned from the
weakest edges up within the pruning rate); pruned tokens are removed with boolean indexing and their features at
that block are put back into the full grid after the last block. No convergence loop: LVTP gives no criterion,
so both versions run the configured number of iterations. Plain torch: shares no code with `staticprune.ops` or
`staticprune.methods`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.reference import ReferenceOutput

PATCH = 16


@dataclass
class Options:
    prune_layers: tuple[int, ...]
    q1: float
    q2: float
    temperature: float
    clip_alpha: bool
    clusters: int
    keep_clusters: int
    iters: int
    edge_clusters: int
    prune_rate: float
    edge_sqrt: bool
    restore: str


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def parse_options(model: nn.Module, options: dict[str, Any]) -> Options:
    """The options this reference reads (capacities and expose_decisions concern the static graph only)."""
    layers = options.get("prune_layers", ())
    if not isinstance(layers, (list, tuple)):
        layers = [v for v in str(layers).split(",") if v != ""]
    layers = tuple(int(v) for v in layers) or (model.spec.vit.depth // 2 - 1,)
    return Options(
        prune_layers=layers, q1=float(options.get("q1", 2.0)), q2=float(options.get("q2", 0.5)),
        temperature=float(options.get("temperature", 1.0)), clip_alpha=_flag(options.get("clip_alpha", True)),
        clusters=int(options.get("clusters", 6)), keep_clusters=int(options.get("keep_clusters", 2)),
        iters=int(options.get("kmeans_iters", 5)), edge_clusters=int(options.get("edge_clusters", 8)),
        prune_rate=float(options.get("prune_rate", 0.5)), edge_sqrt=_flag(options.get("edge_sqrt", False)),
        restore=str(options.get("restore", "frozen")),
    )


# --------------------------------------------------------------------------------------------- equations


def sobel_patch_energy(image: Tensor, sqrt: bool) -> Tensor:
    """(3, H, W) -> (gh * gw,) mean over each 16x16 patch of Gx^2 + Gy^2 (eqs. 9-10) of the BT.601 grayscale,
    borders replicated; written with shifted differences rather than a convolution."""
    gray = 0.299 * image[0:1] + 0.587 * image[1:2] + 0.114 * image[2:3]
    g = F.pad(gray.unsqueeze(0), (1, 1, 1, 1), mode="replicate")[0, 0]
    h, w = gray.shape[-2:]

    def at(dy: int, dx: int) -> Tensor:
        return g[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) - at(-1, -1)) + 2.0 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    gy = (at(1, -1) - at(-1, -1)) + 2.0 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    energy = gx * gx + gy * gy
    if sqrt:
        energy = energy.sqrt()
    return energy.reshape(h // PATCH, PATCH, w // PATCH, PATCH).mean(dim=(1, 3)).flatten()


def entropy_weights(tokens: Tensor, opts: Options) -> Tensor:
    """(n, D) -> (n,) normalised multi-scale Tsallis weights (eqs. 3-5)."""
    p = torch.softmax(tokens / opts.temperature, dim=-1)
    s1 = (1.0 - (p**opts.q1).sum(-1)) / (opts.q1 - 1.0)
    s2 = (1.0 - (p**opts.q2).sum(-1)) / (opts.q2 - 1.0)
    alpha = torch.linalg.vector_norm(tokens, dim=-1) / math.sqrt(tokens.shape[-1])
    if opts.clip_alpha:
        alpha = alpha.clamp(0.0, 1.0)
    w = alpha * s1 + (1.0 - alpha) * s2
    return (w - w.min()) / (w.max() - w.min()).clamp(min=1e-12)


def cosine_assign(v: Tensor, centres: Tensor) -> Tensor:
    """Eq. (7): nearest centre by cosine distance (first one on ties)."""
    return torch.argmax(F.normalize(v, dim=-1) @ F.normalize(centres, dim=-1).T, dim=1)


def cosine_kmeans(v: Tensor, k: int, iters: int) -> Tensor:
    n = v.shape[0]
    centres = v[[j * n // k for j in range(k)]].clone()  # strided seeds
    for _ in range(iters):
        assign = cosine_assign(v, centres)
        for j in range(k):
            members = v[assign == j]
            if len(members):
                centres[j] = members.mean(0)  # eq. (8)
    return cosine_assign(v, centres)


def kmeans_1d(e: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """(assign, centres) of scalars, centres starting evenly inside [min, max]."""
    steps = torch.tensor([(j + 0.5) / k for j in range(k)], dtype=e.dtype)
    centres = e.min() + steps * (e.max() - e.min())
    for _ in range(iters):
        assign = torch.argmin((e[:, None] - centres[None, :]).abs(), dim=1)
        for j in range(k):
            if (assign == j).any():
                centres[j] = e[assign == j].mean()
    return torch.argmin((e[:, None] - centres[None, :]).abs(), dim=1), centres


def select(tokens: Tensor, edge: Tensor, opts: Options) -> Tensor:
    """(n,) int32 code per token: 1 kept by the first clustering, 2 rescued by the edges, 0 pruned."""
    weight = entropy_weights(tokens, opts)
    assign = cosine_kmeans(tokens * weight[:, None], opts.clusters, opts.iters)
    richness = [float(weight[assign == j].mean()) if (assign == j).any() else -1.0 for j in range(opts.clusters)]
    rich = sorted(range(opts.clusters), key=lambda j: (-richness[j], j))[: opts.keep_clusters]
    kept = torch.tensor([int(a) in rich for a in assign.tolist()], dtype=torch.bool)
    code = torch.where(kept, 1, 2).to(torch.int32)
    pending = (~kept).nonzero().flatten()
    if len(pending) == 0:
        return code
    assign2, centres = kmeans_1d(edge[pending], opts.edge_clusters, opts.iters)
    counts = [int((assign2 == j).sum()) for j in range(opts.edge_clusters)]
    budget = float(torch.tensor(float(len(pending)), dtype=torch.float32) * opts.prune_rate)
    pruned_clusters, total = set(), 0
    for j in sorted(range(opts.edge_clusters), key=lambda j: (float(centres[j]), j)):  # weakest edges first
        total += counts[j]
        if total <= budget:
            pruned_clusters.add(j)
    for i, a in zip(pending.tolist(), assign2.tolist()):
        if a in pruned_clusters:
            code[i] = 0
    return code


# --------------------------------------------------------------------------------------------- forward


@torch.no_grad()
def reference_forward(model: nn.Module, img: Tensor, options: dict[str, Any]) -> ReferenceOutput:
    opts = parse_options(model, options)
    backbone = model.backbone
    prefix, depth = backbone.num_prefix, len(backbone.blocks)
    n0 = model.grid[0] * model.grid[1]
    points = [f"layer{i}" for i in opts.prune_layers]
    kept: dict[str, list[int]] = {p: [] for p in points}
    decisions = {p: torch.full((img.shape[0], n0), -1, dtype=torch.int32) for p in points}
    labels = torch.ones(img.shape[0], n0, dtype=torch.int64)
    logits = []
    for b in range(img.shape[0]):
        x = backbone.embed(img[b : b + 1]).x
        edge = sobel_patch_energy(img[b], opts.edge_sqrt)
        alive = torch.arange(n0)
        frozen = torch.zeros(n0, x.shape[-1])
        feats = []
        for i, block in enumerate(backbone.blocks):
            x = block(x)
            if i in opts.prune_layers:
                point = points[opts.prune_layers.index(i)]
                tokens = x[0, prefix:]
                code = select(tokens, edge[alive], opts)
                decisions[point][b, alive] = code
                labels[b, alive] = code.to(torch.int64)
                gone = code == 0
                if opts.restore == "frozen":
                    frozen[alive[gone]] = tokens[gone]
                x = torch.cat([x[:, :prefix], tokens[~gone].unsqueeze(0)], dim=1)
                alive = alive[~gone]
                kept[point].append(int(alive.numel()))
            if i == depth - 1 or i in backbone.cfg.out_indices:
                full = frozen.clone()
                full[alive] = x[0, prefix:]
                restored = torch.cat([x[:, :prefix], full.unsqueeze(0)], dim=1)
                if i == depth - 1:
                    x = restored  # the dense prediction needs every patch: back to the full grid
                if i in backbone.cfg.out_indices:
                    feats.append(restored[:, prefix:])
        if backbone.norm is not None:
            x = backbone.norm(x)
        if model.spec.decoder != "atm":
            feats = [x[:, prefix:]]
        logits.append(model.decoder(feats, model.grid, model.image_size))
    owner = torch.arange(n0).expand(img.shape[0], -1).clone()
    return ReferenceOutput(logits=torch.cat(logits), kept=kept, decisions=decisions, owner=owner, token_labels=labels)
