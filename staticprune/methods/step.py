"""STEP, SuperToken and Early-Pruning (docs/methods/step.md): dCTS supertokens, then DToP early exits, as one static graph.

The dCTS module (`staticprune.methods.dcts`) builds the initial sequence in `embed`: superpatch windows of 2x2 to
16x16 patches chosen by the policy's per-size thresholds, compacted into a token capacity. The DToP exit machinery
(`staticprune.methods.dtop.EarlyExits`) then halts confident tokens at the configured blocks: a halted supertoken
halts every patch it covers (the token *is* the supertoken) and keeps the mask logits of its exit head for all of
them. The final prediction is the final prune head's class presence times the sigmoid of the per-patch canvas: each
patch reads the logits of its (super)token, i.e. un-sharing by replication, then bilinear upsampling.

Parameters: `dcts.policy.*` (the policy network), `aux_heads.{i}.*` and `final_head.*` (the prune heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from staticprune.methods import config_from_options, register, quantile_capacity
from staticprune.methods.dcts import DCTS, DCTSConfig
from staticprune.methods.dtop import DToPConfig, EarlyExits, point_layer, require_segvit
from staticprune.models.token_state import TokenState

# The STEP settings of the papers (docs/references.md): exit blocks (0-based) and dCTS thresholds for (2x2, 4x4, 8x8, 16x16).
# [Poreba et al.]: ViT-B SegViT on Cityscapes, DToP after the 8th block, tau (0.6, 0.8, 0.9, 0.9), theta 0.9.
# [STEP]: ViT-L SegViT, heads at [8, 16] (3 stages) or [18] (2 stages), tau-6899 or tau-4999; theta is the
# `threshold` option (0.95 COCO-Stuff-10k, 0.9 ADE20K).
PRESETS: dict[str, tuple[tuple[int, ...], tuple[float, float, float, float]]] = {
    "000-vit-b": ((7,), (0.6, 0.8, 0.9, 0.9)),
    "001-vit-l-8-16-tau6899": ((7, 15), (0.6, 0.8, 0.9, 0.9)),
    "001-vit-l-8-16-tau4999": ((7, 15), (0.4, 0.9, 0.9, 0.9)),
    "001-vit-l-18-tau6899": ((17,), (0.6, 0.8, 0.9, 0.9)),
    "001-vit-l-18-tau4999": ((17,), (0.4, 0.9, 0.9, 0.9)),
}
DEFAULT_EXITS = {12: (7,), 24: (7, 15)}  # no preset: [Poreba et al.]'s ViT-B setting, [STEP]'s [8, 16] for ViT-L


@dataclass
class STEPConfig:
    """Options (`--opt key=value`). Exit layers are 0-based blocks; tau are dCTS thresholds (2x2..16x16)."""

    preset: str = ""  # one of PRESETS; sets exit_layers and tau (theta stays `threshold`)
    # dCTS supertokens
    tau: tuple[float, ...] = (0.6, 0.8, 0.9, 0.9)
    window_sizes: tuple[int, ...] = (2, 4, 8, 16)
    nesting: str = "top_down"  # top_down | bottom_up (see dCTS)
    token_capacity: int = 0  # dCTS token slots; 0 = token_capacity_ratio x N
    token_capacity_ratio: float = 0.59  # dCTS's default (its published average cost)
    policy_weights: str = ""
    policy_width: float = 1.0
    policy_seed: int = 0
    # DToP early exits
    exit_layers: tuple[int, ...] = ()  # () = (7,) with 12 blocks, (7, 15) with 24
    threshold: tuple[float, ...] = (0.9,)
    keep_top_per_class: int = 5
    capacity: tuple[int, ...] = ()  # active tokens after each exit (count); overrides capacity_ratio
    # ratio of the N patches, clipped to the dCTS token capacity. Defaults 0.59 / 0.45: the published average cost
    # (SegViT ViT-B Cityscapes 768: 301 -> 149 GFLOPs, 0.49x); `staticprune calibrate` fits both to images
    capacity_ratio: tuple[float, ...] = (0.45,)
    head_heads: int = 0
    head_layers: int = 3
    head_seed: int = 0
    expose_decisions: bool = False  # decision_embed (dCTS windows) and decision_layer<i> (exits), with margins

    def inert_options(self) -> dict[str, str]:
        """Options overridden by another (giving one is an error, see methods/__init__.py)."""
        out: dict[str, str] = {}
        if self.preset:
            out.update(exit_layers="preset sets the exit layers; give one of the two",
                       tau="preset sets tau; give one of the two")
        if self.token_capacity > 0:
            out["token_capacity_ratio"] = "token_capacity (a count) overrides it; give one of the two"
        if self.capacity:
            out["capacity_ratio"] = "capacity (counts) overrides it; give one of the two"
        if self.policy_weights:
            why = "policy_weights loads the policy; remove it (it only shapes a randomly initialised policy)"
            out.update(policy_width=why, policy_seed=why)
        return out


def split_config(cfg: STEPConfig, depth: int) -> tuple[DCTSConfig, DToPConfig]:
    """The dCTS and DToP configurations a STEP configuration stands for."""
    exits, tau = tuple(cfg.exit_layers) or DEFAULT_EXITS.get(depth, ()), tuple(cfg.tau)
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"unknown STEP preset '{cfg.preset}'; choose one of: {', '.join(PRESETS)}")
        exits, tau = PRESETS[cfg.preset]
    dcts = DCTSConfig(thresholds=tau, window_sizes=tuple(cfg.window_sizes), nesting=cfg.nesting,
                      capacity=cfg.token_capacity, capacity_ratio=cfg.token_capacity_ratio,
                      policy_weights=cfg.policy_weights, policy_width=cfg.policy_width, policy_seed=cfg.policy_seed,
                      expose_decisions=cfg.expose_decisions)
    dtop = DToPConfig(exit_layers=exits, threshold=tuple(cfg.threshold), keep_top_per_class=cfg.keep_top_per_class,
                      capacity=tuple(cfg.capacity), capacity_ratio=tuple(cfg.capacity_ratio), head_heads=cfg.head_heads,
                      head_layers=cfg.head_layers, head_seed=cfg.head_seed, expose_decisions=cfg.expose_decisions)
    return dcts, dtop


class STEP(EarlyExits):
    """dCTS `embed` + DToP exits and prediction (TokenHook + `decode`)."""

    def __init__(self, cfg: STEPConfig, model: nn.Module):
        require_segvit(model, "step")
        dcts_cfg, dtop_cfg = split_config(cfg, model.spec.vit.depth)
        super().__init__(dtop_cfg, model)
        self.step_cfg = cfg
        self.dcts = DCTS(dcts_cfg, model)

    @property
    def policy(self) -> nn.Module:
        """The dCTS policy network (the eager references read its weights from here)."""
        return self.dcts.policy

    @property
    def extra_outputs(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.dcts.extra_outputs) | set(super().extra_outputs)))

    def embed(self, backbone: nn.Module, img: Tensor) -> TokenState:
        return self.dcts.embed(backbone, img)

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        return state

    def decode(self, decoder: nn.Module, feats: list[Tensor], state: TokenState, grid: tuple[int, int],
               image_size: tuple[int, int]) -> Tensor:
        return self.predict(state, grid, image_size)


# Options under which the static module never overflows (dCTS and every exit hold every token): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {"token_capacity_ratio": 1.0, "capacity_ratio": [1.0]}


@register("step")
def build(options: dict[str, Any], model: nn.Module) -> nn.Module:
    return STEP(config_from_options(STEPConfig, options), model)


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict[str, Any]) -> dict[str, Any]:
    """`token_capacity` from the dCTS token counts (point 'embed') and `capacity` from the active counts after each
    exit, both at the `quantile` of what the reference measured. The dCTS capacity is kept >= N/4 by its builder."""

    config_from_options(STEPConfig, options)  # unknown or ill-typed options fail before any work
    out = dict(options)
    if "embed" in kept:
        out["token_capacity"] = quantile_capacity(kept["embed"], quantile)
        out.pop("token_capacity_ratio", None)
    points = sorted((p for p in kept if point_layer(p) >= 0), key=point_layer)
    if points:
        out["capacity"] = [quantile_capacity(kept[p], quantile) for p in points]
    return out
