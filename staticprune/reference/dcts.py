"""Eager dCTS: per image, Python loops over windows, a variable-length sequence, no capacity (docs/methods/dcts.md).

The rules the papers leave open are the ones documented in docs/methods/dcts.md (and implemented statically in
staticprune/methods/dcts.py): complete grid-aligned windows only; ``S >= tau``; nesting ``top_down`` (coarse to fine,
a window is taken if it passes and its area is still free) or ``bottom_up`` (a window passes if it and all its
children pass; the coarsest passing window of each chain is taken); a window token is the window's pixels resized to
16x16 by area averaging through the patch conv, plus the mean of its positional vectors; sequence
[CLS, individual patches raster, taken 2x2 windows raster, then 4x4, 8x8, 16x16]; decoder outputs copied back.
Plain torch only: nothing from staticprune.ops or staticprune.methods.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.reference import ReferenceOutput
from staticprune.reference.cts import (
    PATCH, POINT, decode_shared, owner_map, policy_of, policy_scores, run_encoder, with_prefix,
)

SIZES = (2, 4, 8, 16)
TAU_PRESETS = {"tau-6899": (0.6, 0.8, 0.9, 0.9), "tau-4999": (0.4, 0.9, 0.9, 0.9)}


def thresholds(options: dict[str, Any]) -> dict[int, float]:
    taus = TAU_PRESETS[options["preset"]] if options.get("preset") else options.get("thresholds", (0.6, 0.8, 0.9, 0.9))
    if isinstance(taus, str):
        taus = [float(t) for t in taus.split(",") if t]
    return dict(zip(SIZES, (float(t) for t in taus)))


def window_sizes(options: dict[str, Any], grid: tuple[int, int]) -> list[int]:
    sizes = options.get("window_sizes", SIZES)
    if isinstance(sizes, str):
        sizes = [int(s) for s in sizes.split(",") if s]
    elif isinstance(sizes, (int, float)):  # `--opt window_sizes=2` arrives as one number
        sizes = [sizes]
    return sorted(s for s in set(int(s) for s in sizes) if grid[0] // s >= 1 and grid[1] // s >= 1)


def choose_top_down(passed: dict[int, Tensor], sizes: list[int], grid: tuple[int, int]) -> dict[int, Tensor]:
    taken = torch.zeros(grid, dtype=torch.bool)
    chosen = {s: torch.zeros_like(passed[s]) for s in sizes}
    for s in reversed(sizes):
        h, w = passed[s].shape
        for i in range(h):
            for j in range(w):
                area = taken[i * s : (i + 1) * s, j * s : (j + 1) * s]
                if bool(passed[s][i, j]) and not bool(area.any()):
                    chosen[s][i, j] = True
                    area[...] = True
    return chosen


def choose_bottom_up(passed: dict[int, Tensor], sizes: list[int]) -> dict[int, Tensor]:
    ok: dict[int, Tensor] = {}
    for idx, s in enumerate(sizes):
        ok[s] = passed[s].clone()
        if idx == 0:
            continue
        f = s // sizes[idx - 1]
        child = ok[sizes[idx - 1]]
        for i in range(ok[s].shape[0]):
            for j in range(ok[s].shape[1]):
                ok[s][i, j] = bool(passed[s][i, j]) and bool(child[i * f : (i + 1) * f, j * f : (j + 1) * f].all())
    chosen = {}
    for idx, s in enumerate(sizes):
        chosen[s] = ok[s].clone()
        if idx + 1 == len(sizes):
            continue
        f = sizes[idx + 1] // s
        parent = ok[sizes[idx + 1]]
        for i in range(chosen[s].shape[0]):
            for j in range(chosen[s].shape[1]):
                pi, pj = i // f, j // f
                if pi < parent.shape[0] and pj < parent.shape[1] and bool(parent[pi, pj]):
                    chosen[s][i, j] = False
    return chosen


def window_embedding(backbone: nn.Module, img: Tensor, pos: Tensor, s: int, cells: list[tuple[int, int]]) -> Tensor:
    """(len(cells), D) tokens of the s x s windows at (row, col) window coordinates: pixels area-resized to 16x16."""
    px = s * PATCH
    crops = torch.cat([img[:, :, i * px : (i + 1) * px, j * px : (j + 1) * px] for i, j in cells])
    small = F.interpolate(crops, size=(PATCH, PATCH), mode="area")
    x = backbone.patch_embed(small)[:, 0]
    p = torch.stack([pos[i * s : (i + 1) * s, j * s : (j + 1) * s].mean(dim=(0, 1)) for i, j in cells])
    return x + p


def reference_forward(model: nn.Module, img: Tensor, options: dict[str, Any]) -> ReferenceOutput:
    gh, gw = model.grid
    sizes = window_sizes(options, (gh, gw))
    taus = thresholds(options)
    nesting = str(options.get("nesting", "top_down"))
    mode = str(options.get("decode_on", "tokens"))
    policy = policy_of(model, options, tuple(sizes))
    scores = policy_scores(model, policy, img)
    logits, kept, decisions, owners = [], [], [], []
    with torch.no_grad():
        for b in range(img.shape[0]):
            seq, codes, decided = supertokens(model, img[b : b + 1], {s: scores[s][b] for s in sizes}, sizes, taus,
                                              nesting)
            feats, _ = run_encoder(model, seq)
            logits.append(decode_shared(model, feats, codes, mode))
            kept.append(len(codes))
            decisions.append(decided)
            owners.append(owner_map(codes, (gh, gw)))
    return ReferenceOutput(logits=torch.cat(logits), kept={POINT: kept}, decisions={POINT: torch.stack(decisions)},
                           owner=torch.stack(owners))


def supertokens(model: nn.Module, image: Tensor, scores: dict[int, Tensor], sizes: list[int], taus: dict[int, float],
                nesting: str) -> tuple[Tensor, list, Tensor]:
    """One image's dCTS sequence (1, T, D), its codes (size, row, col) and its window decisions (W,) int32."""
    backbone = model.backbone
    gh, gw = model.grid
    passed = {s: scores[s] >= taus[s] for s in sizes}
    if nesting == "top_down":
        chosen = choose_top_down(passed, sizes, (gh, gw))
    else:
        chosen = choose_bottom_up(passed, sizes)
    covered = torch.zeros(gh, gw, dtype=torch.bool)
    for s in sizes:
        covered |= _cover(chosen[s], s, (gh, gw))
    pos = backbone.pos_embed[0, 1:].reshape(gh, gw, -1)
    patches = backbone.patch_embed(image)[0].reshape(gh, gw, -1)
    toks, codes = [], []
    for r in range(gh):
        for c in range(gw):
            if not covered[r, c]:
                toks.append(patches[r, c] + pos[r, c])
                codes.append((1, r, c))
    for s in sizes:
        cells = [(i, j) for i in range(chosen[s].shape[0]) for j in range(chosen[s].shape[1]) if chosen[s][i, j]]
        if cells:
            toks.extend(window_embedding(backbone, image, pos, s, cells))
            codes.extend((s, i * s, j * s) for i, j in cells)
    decisions = torch.cat([chosen[s].flatten() for s in sizes]).to(torch.int32)
    return with_prefix(model, torch.stack(toks)), codes, decisions


def _cover(chosen: Tensor, s: int, grid: tuple[int, int]) -> Tensor:
    """(gh, gw) patches covered by the chosen s x s windows."""
    out = torch.zeros(grid, dtype=torch.bool)
    for i in range(chosen.shape[0]):
        for j in range(chosen.shape[1]):
            if chosen[i, j]:
                out[i * s : (i + 1) * s, j * s : (j + 1) * s] = True
    return out
