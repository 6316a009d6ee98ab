"""Eager DToP (zbwxp/Dynamic-Token-Pruning inference path, docs/methods/dtop.md): the oracle for the static module.

Per image, as the official `ViT_prune` / `PruneHead`: every block runs on the active tokens only; at each
auxiliary head the active tokens are scored, the confident ones (except the 5 most confident per class) are
removed from the sequence with boolean indexing, and a canvas of mask logits remembers the head at which each
patch exited; the final head's class presence times sigmoid(canvas) is the prediction. Plain torch: shares no code
with `staticprune.ops` or `staticprune.methods`.

Prune heads: taken from `model.method` when the model carries a DToP/STEP module (its parameters only, never its
forward), otherwise rebuilt from `head_seed` with the documented initialisation (bit-identical to the static
module's). Canonical choices where the official code is arbitrary: ties in the keep-top-per-class rule go to the
lower token index (the official `topk` order on ties is unspecified).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.models.decoders import ATMDecoder
from staticprune.models.vit import LayerNorm
from staticprune.reference import ReferenceOutput

EXITS = {12: (5, 7), 24: (7, 15)}


@dataclass
class Options:
    exit_layers: tuple[int, ...]
    thresholds: tuple[float, ...]
    keep_top: int
    head_heads: int
    head_layers: int
    head_seed: int


def _tuple(value: Any, kind: type) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(kind(v) for v in value)
    return tuple(kind(v) for v in str(value).split(",") if v != "")


def parse_options(model: nn.Module, options: dict[str, Any]) -> Options:
    """The options this reference reads (capacities and expose_decisions concern the static graph only)."""
    depth = model.spec.vit.depth
    exits = _tuple(options.get("exit_layers", ()), int) or EXITS[depth]
    thresholds = _tuple(options.get("threshold", (0.9,)), float)
    if len(thresholds) == 1:
        thresholds = thresholds * len(exits)
    dim = model.spec.atm_dim or model.spec.vit.dim // 2
    return Options(exit_layers=tuple(exits), thresholds=thresholds, keep_top=int(options.get("keep_top_per_class", 5)),
                   head_heads=int(options.get("head_heads", 0)) or max(1, dim // 64),
                   head_layers=int(options.get("head_layers", 3)), head_seed=int(options.get("head_seed", 0)))


# --------------------------------------------------------------------------------------------- heads


def _fresh_head(model: nn.Module, opts: Options, tag: str) -> nn.Module:
    """A prune head with DToP's module names and the documented seeded initialisation."""
    dim = model.spec.atm_dim or model.spec.vit.dim // 2
    head = nn.Module()
    head.input_proj = nn.Linear(model.spec.vit.dim, dim)
    head.proj_norm = LayerNorm(dim, eps=1e-5)
    head.decoder = ATMDecoder(dim, opts.head_heads, opts.head_layers)
    head.q = nn.Embedding(model.num_classes, dim)
    head.class_embed = nn.Linear(dim, 2)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if param.dim() < 2:
                is_norm_weight = name.endswith("weight") and ("norm" in name.split(".")[-2])
                param.fill_(1.0 if is_norm_weight else 0.0)
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(f"{opts.head_seed}:{tag}:{name}".encode()))
            if name == "q.weight":
                nn.init.normal_(param, std=1.0, generator=gen)
            elif name.endswith("in_proj_weight"):
                nn.init.xavier_uniform_(param, generator=gen)
            else:
                nn.init.normal_(param, std=0.02, generator=gen)  # = trunc_normal(std 0.02, +-2): 100 sigma
    return head.eval()


def prune_heads(model: nn.Module, opts: Options) -> tuple[list[nn.Module], nn.Module]:
    """(auxiliary heads, final head)."""
    method = getattr(model, "method", None)
    if method is not None and hasattr(method, "aux_heads") and hasattr(method, "final_head"):
        return list(method.aux_heads), method.final_head
    aux = [_fresh_head(model, opts, f"aux{i}") for i in range(len(opts.exit_layers))]
    return aux, _fresh_head(model, opts, "final")


def run_head(head: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PruneHead.per_img_forward on the active tokens (n, D) of one image: (pred (K, n), attn (K, n), presence (K,))."""
    memory = head.proj_norm(head.input_proj(tokens)).unsqueeze(0)
    query, attn = head.decoder(head.q.weight.unsqueeze(0), memory)
    presence = head.class_embed(query).softmax(-1)[0, :, 0]
    return presence[:, None] * attn[0].sigmoid(), attn[0], presence


def exit_tokens(pred: Tensor, threshold: float, keep_top: int) -> Tensor:
    """The official exit rule on one image: (n,) bool, True = the token exits at this head."""
    val, ind = pred.max(dim=0)
    pos = val > threshold
    candidates = pos.nonzero().flatten()
    for cls in ind[pos].unique().tolist():
        members = candidates[ind[candidates] == cls]
        order = torch.sort(val[members], descending=True, stable=True).indices  # stable: lower index first on ties
        pos[members[order[:keep_top]]] = False
    return pos


# --------------------------------------------------------------------------------------------- forward


@dataclass
class ImageRun:
    """One image through the blocks with exits."""

    logits: Tensor  # (1, K, H, W)
    kept: list[int]  # active tokens after each exit
    decisions: list[Tensor]  # per exit (N0,) int32 per patch: 1 exits here, 0 stays active, -1 was not active
    stage: Tensor  # (N0,) index of the exit each patch left at (len(exits) = reached the final head)


def run_image(model: nn.Module, x: Tensor, owner: Tensor, aux: list[nn.Module], final: nn.Module,
              opts: Options) -> ImageRun:
    """DToP on one image's initial sequence x (1, T, D) (no prefix token); owner (N0,) maps every patch to its
    token (the identity for plain patches, a supertoken for STEP). Halted tokens leave the sequence; a per-token
    canvas keeps the mask logits of the head each token exited at; patches read their token's logits."""
    k = model.num_classes
    gh, gw = model.grid
    t0 = x.shape[1]
    alive = torch.arange(t0)  # initial index of every active token
    canvas = torch.zeros(k, t0)
    stage = torch.full((t0,), len(opts.exit_layers), dtype=torch.int64)
    kept, decisions = [], []
    for i, block in enumerate(model.backbone.blocks):
        x = block(x)
        if i not in opts.exit_layers:
            continue
        m = opts.exit_layers.index(i)
        pred, attn, _ = run_head(aux[m], x[0])
        canvas[:, alive] = attn
        leaving = exit_tokens(pred, opts.thresholds[m], opts.keep_top)
        decision = torch.full((t0,), -1, dtype=torch.int32)
        decision[alive] = leaving.to(torch.int32)
        decisions.append(decision[owner])
        stage[alive[leaving]] = m
        x, alive = x[:, ~leaving], alive[~leaving]
        kept.append(int(alive.numel()))
    _, attn, presence = run_head(final, x[0])
    canvas[:, alive] = attn
    pred = (presence[:, None] * canvas[:, owner].sigmoid()).reshape(1, k, gh, gw)
    logits = F.interpolate(pred, size=model.image_size, mode="bilinear", align_corners=False)
    return ImageRun(logits=logits, kept=kept, decisions=decisions, stage=stage[owner])


def require_segvit(model: nn.Module, method: str) -> None:
    if model.spec.decoder != "atm" or model.spec.vit.use_cls_token:
        raise ValueError(f"{method} needs a SegViT model (segvit-vit-b-atm, segvit-vit-l-atm); got '{model.spec.name}'")


@torch.no_grad()
def reference_forward(model: nn.Module, img: Tensor, options: dict[str, Any]) -> ReferenceOutput:
    require_segvit(model, "dtop")
    opts = parse_options(model, options)
    aux, final = prune_heads(model, opts)
    n0 = model.grid[0] * model.grid[1]
    points = [f"layer{i}" for i in opts.exit_layers]
    runs = [run_image(model, model.backbone.embed(img[b : b + 1]).x, torch.arange(n0), aux, final, opts)
            for b in range(img.shape[0])]  # SegViT drops the CLS token before block 0: x is (1, N0, D)
    return ReferenceOutput(
        logits=torch.cat([r.logits for r in runs]),
        kept={p: [r.kept[m] for r in runs] for m, p in enumerate(points)},
        decisions={p: torch.stack([r.decisions[m] for r in runs]) for m, p in enumerate(points)},
        owner=torch.arange(n0).expand(img.shape[0], -1).clone(),  # every patch stays its own token
        token_labels=torch.stack([r.stage for r in runs]),
    )
