"""ToMe (Bolya et al., ICLR 2023) as a static graph: bipartite soft matching between attention and MLP.

Two modes. `r`: a fixed number of tokens merged per layer (ToMe's own schedule), static by nature: every
buffer has exactly the reference's length. `threshold`: every A token whose best edge reaches the threshold
merges; the token count is data-dependent, so each layer writes into a fixed capacity (the capacity contract, docs/method-contract.md) and reports
`overflow` when the rule would keep more.

The merge step (`match_tokens`, `threshold_count`, `apply_bipartite`) and the decoder placement
(`decode_after`) are also ALGM's global stage; `staticprune/methods/algm.py` imports them.
See docs/methods/tome.md for every option and decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from staticprune.methods import config_from_options, extra_output_names, register
from staticprune.models.decoders import tokens_to_map, upsample
from staticprune.models.token_state import TokenState
from staticprune.models.vit import MASK_NEG
from staticprune.ops.bipartite import Edges, best_edges, bipartite_merge
from staticprune.ops.merge import NO_MARGIN, count, descending_rank, selection_margin
from staticprune.ops.plugin_nodes import merge_node, plugins_enabled
from staticprune.ops.tokens import restore_tokens


@dataclass
class ToMeConfig:
    mode: str = "r"  # "r": fixed r per layer; "threshold": merge every edge >= threshold, into a capacity
    r: tuple[float, ...] = (0.04,)  # tokens merged per layer; one value or one per layer; < 1: fraction of N
    layers: tuple[int, ...] = ()  # 1-based blocks that merge; () = every block
    threshold: float = 0.9  # threshold mode: cosine similarity of head-averaged keys
    inclusive: bool = True  # threshold mode: merge at similarity >= threshold (False: >)
    capacity: Optional[float] = None  # threshold mode, patch tokens after each layer: < 1 fraction of N, >= 1 count
    capacities: tuple[float, ...] = ()  # threshold mode: one capacity per merging layer (overrides `capacity`)
    prop_attn: bool = True  # proportional attention: + log(size) on the attention logits
    unmerge: str = "auto"  # "auto" | "before" | "after" the decoder (auto: after for linear/mask, before for ATM)
    expose_decisions: bool = False  # also output decision_layer<l> / margin_layer<l>

    def inert_options(self) -> dict[str, str]:
        """Options the chosen mode ignores (giving one is an error, see methods/__init__.py)."""
        if self.mode == "r":
            why = ("it is a threshold-mode option; add --opt mode=threshold, or remove it "
                   "(mode r merges r tokens per layer)")
            return {k: why for k in ("threshold", "inclusive", "capacity", "capacities")}
        if self.mode == "threshold":
            out = {"r": "mode threshold merges every edge >= threshold; remove r, or use --opt mode=r"}
            if self.capacities:
                out["capacity"] = "capacities (one per merging layer) overrides it; give one of the two"
            return out
        return {}


# ------------------------------------------------------------------------------------------- option helpers


def resolve_count(value: float, n: int, what: str) -> int:
    """A token count from an option value: below 1 a fraction of n (rounded half up), else an integer count."""
    if value < 0:
        raise ValueError(f"{what}={value} is negative")
    if value < 1:
        return math.floor(value * n + 0.5)
    if not float(value).is_integer():
        raise ValueError(f"{what}={value} is neither a fraction below 1 nor a whole token count")
    return int(value)


def resolve_capacity(value: Optional[float], n: int, what: str) -> Optional[int]:
    """Patch slots from a capacity option: None = no compaction; below 1 a fraction of n (rounded up)."""
    if value is None:
        return None
    if value < 0:
        raise ValueError(f"{what}={value} is negative")
    if value < 1:
        return int(math.ceil(value * n))
    return resolve_count(value, n, what)


def fit_capacity(requested: Optional[int], patches_in: int) -> int:
    """Patch slots after a bipartite merge of a buffer holding up to `patches_in` patches.

    Never more than the input (no point), never less than n - floor(n / 2) for a buffer of n patches: the
    fewest slots that hold the result whatever the parity and the padding, so the capacity fallback can always
    meet it. This is the merge plugin's lower clamp (staticprune_bipartite_merge_out_tokens in
    plugins/common/staticprunePluginContract.cpp: T' >= T - floor((T - P) / 2)), so the graph's buffer and the
    plugin's output agree; tests/test_plugin_contract.py checks the two against each other.
    """
    lowest = patches_in - patches_in // 2
    if requested is None:
        return patches_in
    return max(lowest, min(requested, patches_in))


def unmerge_placement(option: str, decoder_kind: str) -> str:
    """Where reduced tokens go back to the full grid: "before" or "after" the decoder.

    "auto" follows ALGM ([ALGM] Sec. 3.3, its decoder.py): after a per-token (linear) or transformer (mask) decoder,
    which then runs on the reduced tokens; before SegViT's ATM head, which reads three intermediate states.
    """
    if option not in ("auto", "before", "after"):
        raise ValueError(f"unmerge={option!r}: choose auto, before or after")
    if option == "auto":
        return "before" if decoder_kind == "atm" else "after"
    if option == "after" and decoder_kind == "atm":
        raise ValueError("unmerge=after is not available for the ATM head (it reads three intermediate states)")
    return option


def calibrated_quantile(counts: list[int], quantile: float) -> int:
    """The quantile of the kept-token counts, rounded up."""
    if not counts:
        raise ValueError("no kept-token counts to calibrate from")
    value = float(np.quantile(np.asarray(counts, dtype=np.float64), quantile))
    return math.ceil(value - 1e-9)  # interpolation noise (e.g. 700.0000000001) must not add a slot


# ------------------------------------------------------------------------------------------- the merge step


def identity_owner(state: TokenState) -> Tensor:
    """(B, N0) owner of an unreduced state: patch j sits in slot num_prefix + j."""
    b, t = state.x.shape[:2]
    return (state.num_prefix + torch.arange(t - state.num_prefix, device=state.x.device)).unsqueeze(0).expand(b, -1)


def match_tokens(state: TokenState, metric: Tensor) -> Edges:
    """Best edge of every A token of the state's buffer (CLS protected, padding excluded).

    With two prefix tokens (DeiT: CLS, then the distillation token = B token 0), the distillation token also
    receives no merge, as ToMe's `scores[..., :, 0] = -inf`: it is excluded as a partner."""
    valid = state.full_size() > 0
    if state.num_prefix == 2:
        receivable = valid & (torch.arange(valid.shape[1], device=valid.device) != 1)
        return best_edges(metric, receivable, 1)
    return best_edges(metric, valid, state.num_prefix)


def distillation_token_second(x: Tensor, size: Tensor, owner: Tensor, kept_a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[CLS, kept A.., dist, other B..] -> [CLS, dist, kept A.., other B..]: ToMe's order with a distillation
    token (`[unm[:1], dst[:1], unm[1:], dst[1:]]`). kept_a (B,): kept A tokens, CLS included, so the distillation
    token sits at slot kept_a. Patches never own slot 0 or the distillation token's slot."""
    n = kept_a.to(torch.int64)[:, None]
    j = torch.arange(x.shape[1], device=x.device)[None, :]
    src = torch.where(j == 1, n, torch.where((j >= 2) & (j <= n), j - 1, j))
    x = x.gather(1, src[..., None].expand(-1, -1, x.shape[2]))
    size = size.gather(1, src)
    owner = torch.where((owner >= 1) & (owner < n), owner + 1, owner)
    return x, size, owner


def rule_count(scores: Tensor, candidate: Tensor, threshold: Tensor, inclusive: bool, coupled: bool = False) -> Tensor:
    """(B,) how many candidates reach the threshold ((B,) tensor); coupled: the batch minimum for every image."""
    thr = threshold.reshape(-1, 1).to(scores.dtype)
    n = count((scores >= thr if inclusive else scores > thr) & candidate)
    # explicit dim: a full reduction exports with an empty `axes` attribute, which onnxslim cannot rewrite
    return n.amin(0, keepdim=True).expand_as(n) if coupled else n


@dataclass
class StepResult:
    state: TokenState
    overflow: Tensor  # (B,) int32: patches the rule keeps beyond the capacity
    decision: Optional[Tensor] = None  # (B, decision_len) int32
    margin: Optional[Tensor] = None  # (B, decision_len) float32


def apply_bipartite(
    state: TokenState,
    edges: Edges,
    n_rule: Tensor,
    out_patches: int,
    threshold: Optional[Tensor] = None,
    decision_len: Optional[int] = None,
) -> StepResult:
    """Merge the `n_rule` best edges (ties: lowest A index), or more when the result would not fit.

    n_rule (B,): merges the method's rule asks for. Capacity fallback: if the kept patches would exceed
    `out_patches`, the next-best edges merge too until they fit; `overflow` counts the excess. `threshold`
    ((B,) or None) is the threshold behind n_rule, used for the decision margins only. With `decision_len`,
    also returns the decisions: per A token, its partner's B index if it merged, else -1 (with a class token,
    kept A tokens stay in index order) or -2 - rank (without one, ToMe orders kept A tokens by score).
    """
    p = state.num_prefix
    size = state.full_size()
    owner = state.owner if state.owner is not None else identity_owner(state)
    rank = descending_rank(edges.score, edges.candidate)
    patches_in = count(size > 0) - p
    n_merge = torch.maximum(n_rule, patches_in - out_patches).minimum(count(edges.candidate))
    merge = edges.candidate & (rank < n_merge[:, None])
    order = rank if p == 0 else None
    kept_a = count((size[:, 0::2] > 0) & ~merge)
    x, size, owner = bipartite_merge(state.x, size, owner, edges, merge, p + out_patches, order)
    if p == 2:
        x, size, owner = distillation_token_second(x, size, owner, kept_a)
    overflow = (patches_in - n_rule - out_patches).clamp(min=0).to(torch.int32)
    result = StepResult(replace(state, x=x, size=size, owner=owner), overflow)
    if decision_len is None:
        return result
    kept_code = torch.full_like(rank, -1) if p else -2 - rank
    decision = torch.where(merge, edges.partner, torch.where(edges.candidate, kept_code, torch.full_like(rank, -1)))
    by_threshold = None if threshold is None else n_merge == n_rule
    ordered = None if p else edges.candidate & ~merge  # without a class token, kept A tokens follow their rank
    margin = selection_margin(edges.score, rank, edges.candidate, n_merge, threshold, by_threshold, ordered)
    margin = torch.where(merge, torch.minimum(margin, edges.score - edges.runner_up), margin)
    result.decision = pad_to(decision.to(torch.int32), decision_len, -1)
    result.margin = pad_to(margin.to(torch.float32), decision_len, NO_MARGIN)
    return result


def pad_to(values: Tensor, length: int, fill: float) -> Tensor:
    """(B, n) -> (B, length) with constant fill: the capacity-independent shape of a decision output.
    A Concat with a constant, because with F.pad the exported outputs lost their static shape."""
    pad = length - values.shape[1]
    if pad == 0:
        return values
    return torch.cat([values, torch.full((values.shape[0], pad), fill, dtype=values.dtype, device=values.device)], 1)


def no_merge(state: TokenState, decision_len: Optional[int]) -> StepResult:
    """The step of a buffer too short to merge anything: unchanged state, no decisions."""
    b = state.x.shape[0]
    zeros = torch.zeros(b, dtype=torch.int32, device=state.x.device)
    if decision_len is None:
        return StepResult(state, zeros)
    return StepResult(state, zeros, torch.full((b, decision_len), -1, dtype=torch.int32),
                      torch.full((b, decision_len), NO_MARGIN, dtype=torch.float32))


def record(step: StepResult, point: str) -> TokenState:
    """Fold a step's overflow (and decisions, if any) into the state's extras."""
    extras = dict(step.state.extras)
    extras["overflow"] = extras["overflow"] + step.overflow
    if step.decision is not None:
        extras[f"decision_{point}"] = step.decision
        extras[f"margin_{point}"] = step.margin
    return replace(step.state, extras=extras)


def start_extras(state: TokenState) -> TokenState:
    """Every forward begins with overflow = 0, so the output exists even when nothing overflows."""
    extras = dict(state.extras)
    extras["overflow"] = torch.zeros(state.x.shape[0], dtype=torch.int32, device=state.x.device)
    return replace(state, extras=extras)


# ------------------------------------------------------------------------------------------- decoding


def decode_after(decoder: nn.Module, state: TokenState, kind: str, grid: tuple[int, int],
                 image_size: tuple[int, int]) -> Tensor:
    """Run a Segmenter decoder on the reduced tokens, then unmerge its per-token output with one owner gather.

    Linear: the head is per token, so this only saves work. Mask transformer: joint attention over the valid
    reduced tokens and the class embeddings (padding masked), as ALGM's decoder does with `source`.
    """
    p = state.num_prefix
    tokens = state.x[:, p:]
    owner = (state.owner if state.owner is not None else identity_owner(state)) - p
    if kind == "linear":
        per_token = decoder.head(tokens)
    else:
        valid = state.full_size()[:, p:] > 0
        y = decoder.proj_dec(tokens)
        n = y.shape[1]
        y = torch.cat([y, decoder.cls_emb.expand(y.shape[0], -1, -1)], dim=1)
        keys_valid = torch.cat([valid, torch.ones_like(valid[:, :1]).expand(-1, decoder.num_classes)], dim=1)
        bias = torch.where(keys_valid, torch.zeros_like(y[..., 0]), torch.full_like(y[..., 0], MASK_NEG))
        for block in decoder.blocks:
            y = block(y, bias[:, None, None, :])
        y = decoder.decoder_norm(y)
        patches = y[:, :n] @ decoder.proj_patch
        classes = y[:, n:] @ decoder.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        per_token = decoder.mask_norm(patches @ classes.transpose(1, 2))
    full = restore_tokens(per_token, owner)
    return upsample(tokens_to_map(full, grid), image_size)


# ------------------------------------------------------------------------------------------- the module


@dataclass(frozen=True)
class MergePoint:
    block: int  # 0-based block index
    name: str  # reduction point name, "layer<l>" with l 1-based
    r: Optional[int]  # fixed merges (mode r), None for the threshold rule
    out_patches: int  # patch slots after the point


def plan_points(cfg: ToMeConfig, depth: int, num_prefix: int, n0: int) -> list[MergePoint]:
    """Static plan: which blocks merge, with which r or capacity, and the buffer length after each."""
    if cfg.mode not in ("r", "threshold"):
        raise ValueError(f"mode={cfg.mode!r}: choose r or threshold")
    layers = sorted(set(cfg.layers)) or list(range(1, depth + 1))
    if layers[0] < 1 or layers[-1] > depth:
        raise ValueError(f"layers {layers} outside 1..{depth} (1-based blocks)")
    points, patches = [], n0
    if cfg.mode == "r":
        if len(cfg.r) not in (1, len(layers)):
            raise ValueError(f"r has {len(cfg.r)} values; give one, or one per merging layer ({len(layers)})")
        rs = list(cfg.r) * len(layers) if len(cfg.r) == 1 else list(cfg.r)
        for layer, value in zip(layers, rs):
            r = min(resolve_count(value, n0, "r"), patches // 2)  # ToMe: r <= (T - protected) // 2
            points.append(MergePoint(layer - 1, f"layer{layer}", r, patches - r))
            patches -= r
        return points
    caps = list(cfg.capacities) if cfg.capacities else [cfg.capacity] * len(layers)
    if len(caps) != len(layers):
        raise ValueError(f"capacities has {len(caps)} values for {len(layers)} merging layers")
    for layer, cap in zip(layers, caps):
        patches = fit_capacity(resolve_capacity(cap, n0, "capacity"), patches)
        points.append(MergePoint(layer - 1, f"layer{layer}", None, patches))
    return points


class MergingHook(nn.Module):
    """What bipartite-merging methods (ToMe, ALGM) share: nothing after the MLP, and unmerge placed by decoder.
    Subclasses set `placement` ("before" / "after") and `decoder_kind`."""

    placement: str
    decoder_kind: str
    # What each hook does, for the benchmark's time breakdown (decode = unmerge + the decoder).
    step_names = {"after_attention": "merge", "decode": "unmerge + decoder"}

    def after_block(self, layer: int, state: TokenState) -> TokenState:
        return state

    def decode(self, decoder: nn.Module, feats: list[Tensor], state: TokenState, grid: tuple[int, int],
               image_size: tuple[int, int]) -> Tensor:
        if self.placement == "after":
            return decode_after(decoder, state, self.decoder_kind, grid, image_size)
        return decoder(feats, grid, image_size)


class ToMe(MergingHook):
    """TokenHook: bipartite soft matching on head-averaged keys after the attention of the planned blocks."""

    def __init__(self, cfg: ToMeConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        backbone = model.backbone
        n0 = model.grid[0] * model.grid[1]
        self.points = {p.block: p for p in plan_points(cfg, backbone.cfg.depth, backbone.num_prefix, n0)}
        self.decision_len = (backbone.num_prefix + n0 + 1) // 2
        self.placement = unmerge_placement(cfg.unmerge, model.spec.decoder)
        self.decoder_kind = model.spec.decoder
        names = [p.name for p in self.points.values()]
        self.extra_outputs = extra_output_names(names, cfg.expose_decisions)
        # merge steps exported as StaticPruneBipartiteMerge nodes in the plugin graph (none with decision outputs)
        merging = [p for p in self.points.values() if p.r is None or p.r > 0]  # r = 0 points are the identity
        # the merge plugin protects one prefix token; with DeiT's two the standard graph is the only one
        self.plugin_merge_points = 0 if cfg.expose_decisions or backbone.num_prefix > 1 else len(merging)
        backbone.proportional_attention = cfg.prop_attn

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        if layer == 0:
            state = start_extras(state)
        point = self.points.get(layer)
        if point is None:
            return state
        if state.x.shape[1] < 2 or (point.r is not None and point.r <= 0):
            # Nothing merges: no B token left, or ToMe's r <= 0, where the official code returns the tokens
            # unchanged and in their order (rebuilding [A kept, B] would split later layers differently).
            return record(no_merge(state, self.decision_len if self.cfg.expose_decisions else None), point.name)
        metric = keys.mean(1)
        decision_len = self.decision_len if self.cfg.expose_decisions else None

        def step_for(metric: Tensor) -> StepResult:
            edges = match_tokens(state, metric)
            threshold = None
            if point.r is not None:
                n_rule = torch.full((state.x.shape[0],), point.r, dtype=torch.int64, device=state.x.device)
            else:
                threshold = torch.full((state.x.shape[0],), self.cfg.threshold, device=state.x.device)
                n_rule = rule_count(edges.score, edges.candidate, threshold, self.cfg.inclusive)
            return apply_bipartite(state, edges, n_rule, point.out_patches, threshold, decision_len)

        if plugins_enabled() and decision_len is None and state.num_prefix < 2:
            return record(self._plugin_step(state, metric, point, step_for), point.name)
        return record(step_for(metric), point.name)

    def _plugin_step(self, state: TokenState, metric: Tensor, point, step_for) -> StepResult:
        """The same step as one StaticPruneBipartiteMerge node (plugins/bipartiteMergePlugin/README.md)."""
        metric = metric / metric.norm(dim=-1, keepdim=True)  # the plugin takes a normalised metric

        def compute():
            step = step_for(metric)
            return step.state.x, step.state.full_size(), step.state.owner, step.overflow

        owner = state.owner if state.owner is not None else identity_owner(state)
        p = state.num_prefix
        x, size, owner, overflow = merge_node(
            state.x, metric, state.full_size(), owner, compute,
            r=point.r if point.r is not None else -1, threshold=self.cfg.threshold, capacity=p + point.out_patches,
            num_prefix=p, inclusive=self.cfg.inclusive, absolute_parity=True, kept_by_score=p == 0)
        return StepResult(replace(state, x=x, size=size, owner=owner), overflow)



# Options under which the static module never overflows (fixed r per layer: the token counts are static, nothing can overflow): parity checks that must
# compare every image against the reference use them, whatever the defaults are.
EXACT_OPTIONS: dict[str, Any] = {"mode": "r"}


@register("tome")
def build(options: dict, model: nn.Module) -> nn.Module:
    return ToMe(config_from_options(ToMeConfig, options), model)


def calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict) -> dict:
    """Threshold mode: one capacity per merging layer, the `quantile` of the reference's kept patch counts
    (rounded up). Mode r is static already: options come back unchanged."""
    cfg = config_from_options(ToMeConfig, options)
    if cfg.mode != "threshold":
        return dict(options)
    names = sorted((k for k in kept if k.startswith("layer")), key=lambda k: int(k[len("layer"):]))
    if cfg.layers and [int(k[len("layer"):]) for k in names] != sorted(set(cfg.layers)):
        raise ValueError(f"kept counts are for {names}, the options merge at layers {sorted(set(cfg.layers))}")
    out = {k: v for k, v in options.items() if k != "capacity"}
    out["capacities"] = [calibrated_quantile(kept[k], quantile) for k in names]
    return out
