"""dCTS (dynamic, multi-scale CTS) as a static graph with a capacity (the capacity contract, docs/method-contract.md); see docs/methods/dcts.md.

Every grid-aligned window of 2x2, 4x4, 8x8 and 16x16 patches gets a policy score S; a window becomes one
superpatch token iff S >= tau for its size. Decisions the papers leave open, as decided here:

* windows: complete, grid-aligned, non-overlapping (a quadtree); a size whose windows do not tile the grid simply
  has fewer candidates (remainder strips belong to no window of that size), and a size larger than the grid has none
  -- so a 40x40 grid (640 px) works, with 2x2 16x16 windows in its top-left 32x32 patches;
* nesting (option ``nesting``): ``top_down`` (default, the spec's proposal) -- a window is a token iff S >= tau and no
  coarser window containing it passed its threshold; ``bottom_up`` -- a window passes iff S >= tau and all its
  children (next finer enabled size) passed, and it is a token iff it passed and its parent did not;
* embedding: the window average-pooled to 16x16 px through the shared patch conv, plus the mean of its positional
  vectors (CTS's rule, generalised); un-sharing by copying (decoder on tokens, as CTS, or ``decode_on=grid``);
* threshold comparison ``S >= tau`` (the paper's equation).

Capacity: ``capacity`` patch-token slots (or ``capacity_ratio`` x N), at least N/4. Within capacity the sequence is
the reference's [CLS, individual patches raster, 2x2 windows raster, 4x4, 8x8, 16x16] followed by padding slots
(size 0, masked). Beyond it (deterministic fallback): the 2x2 groups whose four patches are still individual are
merged in descending 2x2 score (lowest index on ties) until the sequence fits -- each such merge saves 3 tokens and
merging all of them leaves at most N/4 tokens, hence the minimum capacity -- and ``overflow`` (B,) int32 reports how
many tokens the threshold rule wanted beyond the capacity.

Decision encoding (point ``embed``): ``decision_embed`` (B, W) int32 over all candidate windows (2x2 raster, then 4x4,
8x8, 16x16): 0 = not a token, 1 = a token by the threshold rule, 2 = forced by the overflow fallback.
``margin_embed``: for top_down the exact sup-norm distance of the scores from flipping that decision (own and
ancestor thresholds); for bottom_up a lower bound (min |S - tau| over the window, its ancestors and descendants);
forced windows also count their distance to the fallback's rank boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from staticprune.methods import config_from_options, register
from staticprune.methods.cts import (
    POINT, SharedTokenState, SharingMethod, assemble_state, check_grid_for_policy, quantile_count, window_tokens,
)
from staticprune.models.policy import WINDOW_SIZES, PolicyNet, build_policy, check_window_sizes
from staticprune.ops.scan import count_true
from staticprune.ops.windows import (
    children_index, descending_rank, expand_to_children, parent_index, patch_window_index, reduce_over_children,
    tie_order, window_grid, window_top_left,
)

THRESHOLD_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "tau-6899": (0.6, 0.8, 0.9, 0.9),  # [STEP] configs; [Poreba et al.] dCTS/STEP on Cityscapes
    "tau-4999": (0.4, 0.9, 0.9, 0.9),  # [STEP] configs
}
NESTING_RULES = ("top_down", "bottom_up")
FAR = 2.0  # margin of a decision no threshold can flip (scores and thresholds live in [0, 1])


@dataclass
class DCTSConfig:
    """dCTS options. Thresholds are for 2x2, 4x4, 8x8, 16x16 windows, in that order."""

    preset: str = ""  # tau-6899 or tau-4999; overrides thresholds
    thresholds: tuple[float, ...] = (0.6, 0.8, 0.9, 0.9)  # [Poreba et al.] (= tau-6899)
    window_sizes: tuple[int, ...] = (2, 4, 8, 16)  # enabled sizes; must include 2 (the fallback level)
    nesting: str = "top_down"  # top_down | bottom_up
    capacity: int = 0  # patch-token slots; 0 = capacity_ratio * N
    # 0.59: the published average cost (SegViT ViT-B Cityscapes 768: 301 -> 182 GFLOPs, 0.60x); 1.0 = exact for
    # every image but no saving; `staticprune calibrate` fits the capacity to images
    capacity_ratio: float = 0.59
    decode_on: str = "tokens"  # tokens | grid (see CTS)
    policy_weights: str = ""
    policy_width: float = 1.0
    policy_seed: int = 0
    expose_decisions: bool = False

    def inert_options(self) -> dict[str, str]:
        """Options overridden by another (giving one is an error, see methods/__init__.py)."""
        out: dict[str, str] = {}
        if self.preset:
            out["thresholds"] = "preset sets the thresholds; give one of the two"
        if self.capacity > 0:
            out["capacity_ratio"] = "capacity (a count) overrides it; give one of the two"
        if self.policy_weights:
            why = "policy_weights loads the policy; remove it (it only shapes a randomly initialised policy)"
            out.update(policy_width=why, policy_seed=why)
        return out


def resolve_thresholds(cfg: DCTSConfig) -> dict[int, float]:
    if cfg.preset:
        if cfg.preset not in THRESHOLD_PRESETS:
            raise ValueError(f"unknown dCTS preset '{cfg.preset}'; choose one of: {', '.join(THRESHOLD_PRESETS)}")
        taus = THRESHOLD_PRESETS[cfg.preset]
    else:
        taus = tuple(cfg.thresholds)
    if len(taus) != len(WINDOW_SIZES):
        raise ValueError(f"dCTS thresholds need {len(WINDOW_SIZES)} values (2x2, 4x4, 8x8, 16x16); got {len(taus)}")
    if any(not 0.0 <= t <= 1.0 for t in taus):
        raise ValueError(f"dCTS thresholds must lie in [0, 1] (policy scores are probabilities); got {taus}")
    return dict(zip(WINDOW_SIZES, (float(t) for t in taus)))


def resolve_capacity(cfg: DCTSConfig, n: int) -> int:
    """Slots for patch tokens. Below N/4 the capacity is raised to N/4 (the fallback's floor; more slots never
    overflow), as ToMe and ALGM raise theirs to what their fallback can reach; above N it is an error."""
    low = math.ceil(n / 4)
    if cfg.capacity > 0:
        cap = cfg.capacity
    else:
        if not 0.0 < cfg.capacity_ratio <= 1.0:
            raise ValueError(f"capacity_ratio must be in (0, 1] (got {cfg.capacity_ratio})")
        cap = math.ceil(cfg.capacity_ratio * n)
    if cap > n:
        raise ValueError(f"dCTS capacity {cap} is above the {n} patches: nothing is gained; use capacity={n}")
    return max(cap, low)


def enabled_sizes(cfg: DCTSConfig, grid: tuple[int, int]) -> tuple[int, ...]:
    """Enabled window sizes that fit the grid at least once (sizes larger than the grid have no candidate)."""
    sizes = check_window_sizes(cfg.window_sizes)
    if 2 not in sizes:
        raise ValueError(f"dCTS window_sizes must include 2 (2x2 is also the overflow fallback level); got {sizes}")
    return tuple(s for s in sizes if min(window_grid(grid, s)) >= 1)


@dataclass
class Decisions:
    tokens: list[Tensor]  # per level (B, n_l) bool: window is a token (threshold rule + nesting), raster order
    margins: list[Tensor]  # per level (B, n_l) float


@dataclass
class WindowLinks:
    """Constant index maps between consecutive enabled levels (built once from the grid, gathers in the graph)."""

    parents: list[Tensor]  # parents[l] (n_l,): window of level l + 1 holding each level-l window (0 if none)
    has_parent: list[Tensor]  # has_parent[l] (n_l,) bool
    children: list[Tensor]  # children[l] (n_l, f*f): level l - 1 windows inside each level-l window (children[0] unused)


def window_links(grid: tuple[int, int], sizes: tuple[int, ...]) -> WindowLinks:
    grids = [window_grid(grid, s) for s in sizes]
    parents, has_parent, children = [], [], [torch.zeros(0, dtype=torch.long)]
    for l in range(len(sizes)):
        if l + 1 < len(sizes):
            index, inside = parent_index(grids[l], grids[l + 1], sizes[l + 1] // sizes[l])
            parents.append(index)
            has_parent.append(inside)
        if l > 0:
            children.append(children_index(grids[l], sizes[l] // sizes[l - 1], grids[l - 1]))
    return WindowLinks(parents, has_parent, children)


def _ancestor_stats(t: list[Tensor], m: list[Tensor], links: WindowLinks):
    """Per level, over all strictly coarser windows containing each window: (any passed, max margin among passed,
    min margin). Windows in a remainder strip have no ancestor (False, 0, FAR)."""
    levels = len(t)
    any_, accmax, amin = [None] * levels, [None] * levels, [None] * levels
    top = levels - 1
    any_[top] = torch.zeros_like(t[top])
    accmax[top] = torch.zeros_like(m[top])
    amin[top] = torch.full_like(m[top], FAR)
    for l in range(top - 1, -1, -1):
        p_any = (t[l + 1] | any_[l + 1]).float()
        p_accmax = torch.maximum(torch.where(t[l + 1], m[l + 1], torch.zeros_like(m[l + 1])), accmax[l + 1])
        p_min = torch.minimum(m[l + 1], amin[l + 1])
        up = (links.parents[l], links.has_parent[l])
        any_[l] = expand_to_children(p_any, *up, 0.0) > 0.5
        accmax[l] = expand_to_children(p_accmax, *up, 0.0)
        amin[l] = expand_to_children(p_min, *up, FAR)
    return any_, accmax, amin


def top_down(t: list[Tensor], m: list[Tensor], links: WindowLinks) -> Decisions:
    """A window is a token iff it passed and no coarser window containing it passed; exact flip margins."""
    any_anc, accmax, amin = _ancestor_stats(t, m, links)
    tokens, margins = [], []
    for l in range(len(t)):
        tokens.append(t[l] & ~any_anc[l])
        # not passed: needs own pass and every passed ancestor to fail; passed and uncovered: own fail or any ancestor
        # passing; passed but covered: every passed ancestor must fail.
        margins.append(torch.where(~t[l], torch.maximum(m[l], accmax[l]),
                                   torch.where(~any_anc[l], torch.minimum(m[l], amin[l]), accmax[l])))
    return Decisions(tokens, margins)


def bottom_up(t: list[Tensor], m: list[Tensor], links: WindowLinks) -> Decisions:
    """A window passes iff S >= tau and all its children passed; it is a token iff it passed and its parent did not."""
    levels = len(t)
    passed, desc_min = [t[0]], [torch.full_like(m[0], FAR)]
    for l in range(1, levels):
        children = reduce_over_children(passed[l - 1].float(), links.children[l], "min") > 0.5
        passed.append(t[l] & children)
        desc_min.append(reduce_over_children(torch.minimum(m[l - 1], desc_min[l - 1]), links.children[l], "min"))
    _, _, amin = _ancestor_stats(t, m, links)
    tokens, margins = [], []
    for l in range(levels):
        if l + 1 < levels:
            parent = expand_to_children(passed[l + 1].float(), links.parents[l], links.has_parent[l], 0.0) > 0.5
        else:
            parent = torch.zeros_like(passed[l])
        tokens.append(passed[l] & ~parent)
        margins.append(torch.minimum(torch.minimum(m[l], desc_min[l]), amin[l]))
    return Decisions(tokens, margins)


class DCTS(SharingMethod):
    """Static dCTS: threshold rule per window size, nesting rule, fixed capacity with a 2x2 fallback."""

    def __init__(self, cfg: DCTSConfig, model: nn.Module, policy: Optional[PolicyNet] = None):
        grid = tuple(model.grid)
        check_grid_for_policy(grid, "dCTS")
        if cfg.nesting not in NESTING_RULES:
            raise ValueError(f"dCTS nesting must be one of {', '.join(NESTING_RULES)} (got '{cfg.nesting}')")
        sizes = enabled_sizes(cfg, grid)
        taus = resolve_thresholds(cfg)
        if policy is None:
            policy = build_policy(cfg.policy_weights, cfg.policy_width, cfg.policy_seed, sizes)
        missing = [s for s in sizes if s not in policy.window_sizes]
        if missing:
            raise ValueError(f"the policy network has no head for {', '.join(f'{s}x{s}' for s in missing)} windows; "
                             "use a multi-scale policy (staticprune train-policy) or fewer window_sizes")
        super().__init__(model, policy, cfg.decode_on, cfg.expose_decisions)
        self.cfg = cfg
        n = grid[0] * grid[1]
        self.num_patches = n
        self.sizes = sizes
        self.taus = tuple(taus[s] for s in sizes)
        self.grids = [window_grid(grid, s) for s in sizes]
        self.capacity = resolve_capacity(cfg, n)
        self.nesting = cfg.nesting
        counts = [h * w for h, w in self.grids]
        self.offsets = [n + sum(counts[:l]) for l in range(len(sizes))]
        sizes_t = [torch.ones(n)] + [torch.full((c,), float(s * s)) for s, c in zip(sizes, counts)]
        reps = [torch.arange(n)] + [window_top_left(grid, s) for s in sizes]
        self.register_buffer("cand_size", torch.cat(sizes_t), persistent=False)
        self.register_buffer("cand_rep", torch.cat(reps), persistent=False)
        self.register_buffer("patch_windows", torch.stack([patch_window_index(grid, s) for s in sizes]), persistent=False)
        links = window_links(grid, sizes)
        for l, (idx, inside) in enumerate(zip(links.parents, links.has_parent)):
            self.register_buffer(f"parents_{l}", idx, persistent=False)
            self.register_buffer(f"has_parent_{l}", inside, persistent=False)
        for l, idx in enumerate(links.children):
            self.register_buffer(f"children_{l}", idx, persistent=False)
        self.register_buffer("tie_lower", tie_order(counts[0]), persistent=False)
        self.register_buffer("patch_ids", torch.arange(n).unsqueeze(0), persistent=False)

    def links(self) -> WindowLinks:
        levels = len(self.sizes)
        return WindowLinks([getattr(self, f"parents_{l}") for l in range(levels - 1)],
                           [getattr(self, f"has_parent_{l}") for l in range(levels - 1)],
                           [getattr(self, f"children_{l}") for l in range(levels)])

    def decide(self, scores: dict[int, Tensor]) -> Decisions:
        """Threshold + nesting decisions (no capacity) from the per-size score maps."""
        flat = [scores[s].flatten(1) for s in self.sizes]
        t = [f >= tau for f, tau in zip(flat, self.taus)]
        m = [(f - tau).abs() for f, tau in zip(flat, self.taus)]
        rule = top_down if self.nesting == "top_down" else bottom_up
        return rule(t, m, self.links())

    def fallback(self, dec: Decisions, scores2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Forced 2x2 merges so that the sequence fits the capacity.

        Returns forced (B, G) bool, the overflow count (B,) int32 and the rank margin of every 2x2 group (B, G).
        Token counts are INT32 sums: exact in every engine precision.
        """
        wanted = self.num_patches - sum(
            (s * s - 1) * count_true(tok, dim=1) for s, tok in zip(self.sizes, dec.tokens))
        excess = (wanted - self.capacity).clamp(min=0)
        covered = dec.tokens[-1]
        for l in range(len(self.sizes) - 2, -1, -1):
            up = (getattr(self, f"parents_{l}"), getattr(self, f"has_parent_{l}"))
            covered = dec.tokens[l] | (expand_to_children(covered.float(), *up, 0.0) > 0.5)
        eligible = ~covered
        needed = torch.div(excess + 2, 3, rounding_mode="trunc").unsqueeze(1)  # ceil(excess / 3), excess >= 0
        s2 = scores2.flatten(1)
        forced = eligible & (descending_rank(s2, eligible, self.tie_lower) < needed)
        rank_margin = torch.where(eligible, _rank_margin(s2, forced, eligible), torch.full_like(s2, FAR))
        return forced, excess, rank_margin

    def embed(self, backbone: nn.Module, img: Tensor) -> SharedTokenState:
        self.check_input(backbone, img)
        scores = self.policy_scores(img)
        dec = self.decide(scores)
        forced, excess, rank_margin = self.fallback(dec, scores[2])
        tokens = list(dec.tokens)
        tokens[0] = tokens[0] | forced
        cand_of_patch: Tensor = self.patch_ids  # (1, N), broadcast against (B, N) masks below
        covered: Optional[Tensor] = None
        for l, offset in enumerate(self.offsets):
            widx = self.patch_windows[l]
            inside = (widx >= 0).unsqueeze(0)
            cover = tokens[l][:, widx.clamp(min=0)] & inside  # (B, N): patch inside a token window of level l
            cand_of_patch = torch.where(cover, offset + widx.clamp(min=0).unsqueeze(0), cand_of_patch)
            covered = cover if covered is None else covered | cover
        keep = torch.cat([~covered, *tokens], dim=1)
        cand = torch.cat([window_tokens(backbone, img, 1)] + [window_tokens(backbone, img, s) for s in self.sizes], dim=1)
        extras = {"overflow": excess.to(torch.int32)}
        if self.expose_decisions:
            decision = [tok.to(torch.int32) for tok in tokens]
            decision[0] = decision[0] + forced.to(torch.int32)  # forced -> 2
            margins = list(dec.margins)
            margins[0] = torch.where((excess > 0).unsqueeze(1), torch.minimum(margins[0], rank_margin), margins[0])
            extras[f"decision_{POINT}"] = torch.cat(decision, dim=1)
            extras[f"margin_{POINT}"] = torch.cat(margins, dim=1)
        return assemble_state(backbone, cand, self.cand_size, self.cand_rep, keep, self.capacity, cand_of_patch, extras)


def _rank_margin(scores: Tensor, forced: Tensor, eligible: Tensor) -> Tensor:
    """Among eligible groups: forced -> score minus best unforced eligible score; unforced -> worst forced minus score."""
    best_out = torch.where(eligible & ~forced, scores, torch.full_like(scores, -1.0)).amax(-1, keepdim=True)
    worst_in = torch.where(forced, scores, torch.full_like(scores, FAR)).amin(-1, keepdim=True)
    return torch.where(forced, scores - best_out, worst_in - scores)


# Options under which the static module never overflows (capacity = the whole sequence): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {"capacity_ratio": 1.0}


@register("dcts")
def build(options: dict[str, Any], model: nn.Module) -> DCTS:
    cfg = config_from_options(DCTSConfig, options)
    return DCTS(cfg, model)


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict[str, Any]) -> dict[str, Any]:
    """`capacity` = the `quantile` of the reference's kept patch-token counts at point 'embed' (ratio dropped).
    The builder raises it to N/4 if lower (the effective value is `model.method.capacity`)."""
    if POINT not in kept:
        raise ValueError(f"dCTS calibration needs kept counts at point '{POINT}' (got {', '.join(kept) or 'none'})")
    config_from_options(DCTSConfig, options)  # unknown or ill-typed options fail here, before any work
    out = dict(options)
    out["capacity"] = quantile_count(kept[POINT], quantile)
    out.pop("capacity_ratio", None)
    return out
