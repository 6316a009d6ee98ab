"""Eager STEP (docs/methods/step.md): the eager dCTS supertokens, then the eager DToP exits on them, per image.

dCTS part: the rules of `staticprune.reference.dcts` (per-size thresholds, nesting, window embeddings, sequence
[individual patches raster, 2x2 windows raster, 4x4, 8x8, 16x16]). DToP part: `staticprune.reference.dtop.run_image`
on that variable-length sequence, with the owner map of the supertokens: a halted supertoken halts all its patches
and each patch reads the mask logits of its token (un-sharing by replication). Plain torch, other references only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from staticprune.reference import ReferenceOutput
from staticprune.reference import dcts as dcts_ref
from staticprune.reference import dtop as dtop_ref
from staticprune.reference.cts import owner_map, policy_of, policy_scores

PRESETS = {
    "000-vit-b": ((7,), (0.6, 0.8, 0.9, 0.9)),
    "001-vit-l-8-16-tau6899": ((7, 15), (0.6, 0.8, 0.9, 0.9)),
    "001-vit-l-8-16-tau4999": ((7, 15), (0.4, 0.9, 0.9, 0.9)),
    "001-vit-l-18-tau6899": ((17,), (0.6, 0.8, 0.9, 0.9)),
    "001-vit-l-18-tau4999": ((17,), (0.4, 0.9, 0.9, 0.9)),
}
EXITS = {12: (7,), 24: (7, 15)}


def split_options(model: nn.Module, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dCTS reference options, DToP reference options) of a STEP option dict."""
    exits = options.get("exit_layers") or EXITS[model.spec.vit.depth]
    tau = options.get("tau", (0.6, 0.8, 0.9, 0.9))
    if options.get("preset"):
        exits, tau = PRESETS[options["preset"]]
    dcts = {"thresholds": tau, "window_sizes": options.get("window_sizes", (2, 4, 8, 16)),
            "nesting": options.get("nesting", "top_down")}
    dcts.update({k: options[k] for k in ("policy_weights", "policy_width", "policy_seed") if k in options})
    dtop = {"exit_layers": exits}
    dtop.update({k: options[k] for k in ("threshold", "keep_top_per_class", "head_heads", "head_layers", "head_seed")
                 if k in options})
    return dcts, dtop


@torch.no_grad()
def reference_forward(model: nn.Module, img: Tensor, options: dict[str, Any]) -> ReferenceOutput:
    dtop_ref.require_segvit(model, "step")
    dcts_options, dtop_options = split_options(model, options)
    sizes = dcts_ref.window_sizes(dcts_options, model.grid)
    taus = dcts_ref.thresholds(dcts_options)
    scores = policy_scores(model, policy_of(model, dcts_options, tuple(sizes)), img)
    opts = dtop_ref.parse_options(model, dtop_options)
    aux, final = dtop_ref.prune_heads(model, opts)
    points = [f"layer{i}" for i in opts.exit_layers]
    runs, counts, windows, owners = [], [], [], []
    for b in range(img.shape[0]):
        x, codes, decided = dcts_ref.supertokens(model, img[b : b + 1], {s: scores[s][b] for s in sizes}, sizes, taus,
                                        str(dcts_options["nesting"]))
        owner = owner_map(codes, model.grid)
        runs.append(dtop_ref.run_image(model, x, owner, aux, final, opts))
        counts.append(len(codes))
        windows.append(decided)
        owners.append(owner)
    kept = {"embed": counts, **{p: [r.kept[m] for r in runs] for m, p in enumerate(points)}}
    decisions = {"embed": torch.stack(windows),
                 **{p: torch.stack([r.decisions[m] for r in runs]) for m, p in enumerate(points)}}
    return ReferenceOutput(logits=torch.cat([r.logits for r in runs]), kept=kept, decisions=decisions,
                           owner=torch.stack(owners), token_labels=torch.stack([r.stage for r in runs]))
