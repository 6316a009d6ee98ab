"""Capacity buckets: a token-reduction segmenter as a chain of static stage graphs (docs/buckets.md).

A static graph runs at its capacity, which must cover the worst image. For methods whose token count is decided
at one or a few points (G2TM: one merge; ALGM: CLAP, then GBM), the network is cut right after each decision:

* the prefix graph runs image -> the first reduction point at capacity = every patch (it cannot overflow) and
  outputs the token state (`tokens_next`, `sizes_next`, `owner_next`, `overflow_next`) plus `count_next`, the
  valid patch slots, which occupy the first `count` patch slots (the methods compact order-preservingly);
  a method with `decide_merge`/`apply_merge` (G2TM) hands over its tokens unmerged with the slot map instead;
* a bucket graph for capacity c keeps the first num_prefix + c slots with a static Slice (or merges the unmerged
  tokens into c slots) and runs on, up to the next reduction point (state + count again, padded back to the full
  width so that every bucket of the next stage takes one input shape) or to the end (logits, labels, overflow,
  decisions).

The runtime (staticprune.runtime.buckets.BucketedRunner) picks the smallest bucket holding the largest count of
the batch; the graphs hold no data-dependent control flow. A bucket graph fed a count above its capacity still
runs (owners clamped into the buffer) and reports the excess in `overflow`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from staticprune.models.token_state import TokenState
from staticprune.ops.scan import count_true

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "staticprune-buckets"
PIPELINE_VERSION = 1
# inputs of a bucket graph; the overflow so far is not named "overflow", which the last stage outputs
STATE_NAMES = ("tokens", "sizes", "owner", "count", "carried_overflow")
NEXT = "_next"  # suffix of the state a stage hands to the next one (ONNX names are defined once per graph)


class BucketError(ValueError):
    """Bad bucket request (the CLI turns it into one line, exit 2)."""


# --------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ReductionPoint:
    name: str  # the reference's kept[] key and the decision_<name> output
    block: int  # 0-based block whose after_attention hook decides the count
    lowest: int = 1  # the fewest patch tokens the point can keep: smaller buckets cannot be built


@dataclass(frozen=True)
class MethodPlan:
    method: str
    points: tuple[ReductionPoint, ...]
    capacity_options: tuple[str, ...]  # options that set the buffer after each point (all set to the bucket)


BUCKETED_METHODS = ("g2tm", "algm")


def method_plan(method: str, module: nn.Module, model: nn.Module) -> MethodPlan:
    """Where `method` decides its token counts, read from its built static module."""
    if getattr(model.backbone.cfg, "out_indices", ()):
        raise BucketError(f"{model.spec.name} reads intermediate states in its decoder; capacity buckets support "
                          "the Segmenter models (segmenter-*) for now")
    if method == "g2tm":
        return MethodPlan("g2tm", (ReductionPoint("g2tm", module.cfg.layer - 1),), ("capacity",))
    if method == "algm":
        n0 = module.grid[0] * module.grid[1]
        windows = (module.grid[0] // module.window[0]) * (module.grid[1] // module.window[1])
        lowest = n0 - windows * (module.window[0] * module.window[1] - 1)  # every CLAP window pooled
        return MethodPlan("algm", (ReductionPoint("clap", module.cfg.clap_layer - 1, lowest),
                                   ReductionPoint("gbm", module.gbm_layer - 1)),
                          ("clap_capacity", "gbm_capacity"))
    if method == "cts":
        raise BucketError("CTS shares a fixed k groups (N - 3k tokens, known at export): one graph is already fit "
                          "to every image; export it without --buckets")
    raise BucketError(f"capacity buckets are not available for method '{method}'; they support "
                      f"{', '.join(BUCKETED_METHODS)} (methods whose token count is decided at one or two points)")


def check_buckets(plan: MethodPlan, buckets: dict[str, list[int]], num_patches: int) -> tuple[dict[str, list[int]],
                                                                                                list[str]]:
    """Validated bucket lists per point (strictly increasing, within lowest..N), with N appended where missing so
    that no image can overflow. Returns the lists and notes about what was added."""
    names = [p.name for p in plan.points]
    unknown = sorted(set(buckets) - set(names) - {"*"})
    if unknown:
        raise BucketError(f"bucket list for unknown reduction point(s) {', '.join(unknown)}; {plan.method} decides "
                          f"at {', '.join(names)}")
    out, notes = {}, []
    for point in plan.points:
        values = buckets.get(point.name, buckets.get("*"))
        if not values:
            raise BucketError(f"no bucket list for reduction point '{point.name}' of {plan.method}: give "
                              f"--buckets {point.name}=C1,C2,... (or one list for every point)")
        values = [int(v) for v in values]
        if any(b <= a for a, b in zip(values, values[1:])):
            raise BucketError(f"buckets for '{point.name}' must be strictly increasing (got {values})")
        if values[-1] > num_patches:
            raise BucketError(f"bucket {values[-1]} for '{point.name}' exceeds the {num_patches} patch tokens of "
                              "this size; the largest useful bucket is that count")
        if values[0] < point.lowest:
            raise BucketError(f"bucket {values[0]} for '{point.name}' is below the {point.lowest} patch tokens the "
                              f"point always keeps; start the list at >= {point.lowest}")
        if values[-1] != num_patches:
            values.append(num_patches)
            notes.append(f"{point.name}: added bucket {num_patches} (every patch), so that no image overflows")
        out[point.name] = values
    return out, notes


def parse_bucket_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BucketError(f"bucket list '{text}' is not comma-separated token counts (e.g. 512,1024,2304)") from None
    if not values or min(values) < 1:
        raise BucketError(f"bucket list '{text}' must hold token counts >= 1")
    return values


def _sorted_counts(counts: Sequence[int], multiple: int) -> list[int]:
    if multiple < 1:
        raise BucketError(f"--bucket-multiple must be >= 1 (got {multiple})")
    ordered = sorted(int(c) for c in counts)
    if not ordered:
        raise BucketError("no kept-token counts to choose buckets from")
    return ordered


def _round_up(value: float, multiple: int, num_patches: int) -> int:
    """The smallest multiple of `multiple` >= value (at least one multiple), capped at N."""
    return min(num_patches, max(multiple, -(-math.ceil(value - 1e-9) // multiple) * multiple))


def bucket_capacities(counts: Sequence[int], buckets: int, multiple: int, num_patches: int) -> list[int]:
    """Calibrated buckets: for i = 1..K-2 the nearest-rank i/(K-1) quantile of the counts rounded up to a multiple
    of `multiple` (capped at N), then the largest count itself (not rounded: see `geometric_buckets`), then N;
    duplicates merged, and a rounded bucket at or above the largest count dropped. K = 1 gives [N]."""
    if buckets < 1:
        raise BucketError(f"--buckets must be >= 1 (got {buckets})")
    ordered = _sorted_counts(counts, multiple)
    out = []
    for i in range(1, buckets - 1):
        rank = max(1, math.ceil(i / (buckets - 1) * len(ordered) - 1e-9))
        out.append(_round_up(ordered[rank - 1], multiple, num_patches))
    if buckets > 1:
        top = min(ordered[-1], num_patches)
        out = [b for b in out if b < top] + [top]
    out.append(num_patches)
    return sorted(set(out))


def geometric_buckets(counts: Sequence[int], growth: float, multiple: int, num_patches: int) -> list[int]:
    """Buckets that bound the slack, built down from the largest count: the largest count itself, then each bucket
    the smallest multiple of `multiple` >= the one above / `growth`, down to the smallest count; then N. Any image
    whose count falls in the calibrated range, also between the calibration images' counts, runs at fewer than
    `growth` x its count + `multiple` tokens.

    The largest count is not rounded up: it is the capacity a single calibrated graph is built at, and rounding it
    would make the pipeline slower than that graph on the images that set it."""
    if not growth > 1.0:
        raise BucketError(f"--bucket-growth must be > 1 (got {growth})")
    ordered = _sorted_counts(counts, multiple)
    lowest = min(_round_up(ordered[0], multiple, num_patches), ordered[-1])
    out = [min(ordered[-1], num_patches)]
    while out[-1] > lowest:
        below = _round_up(out[-1] / growth, multiple, num_patches)
        if below >= out[-1]:  # the multiple is coarser than the growth here: one multiple down
            below = (out[-1] - 1) // multiple * multiple
        out.append(max(below, lowest))
    out.append(num_patches)
    return sorted(set(out))


# --------------------------------------------------------------------------------------------- stage modules


class _StopAfterAttention(Exception):
    """Raised by _CaptureHook once the hook decided: the stage ends between attention and MLP."""


def defers_merge(method: nn.Module) -> bool:
    """Whether `method` splits its reduction into `decide_merge` (state with the slot map, tokens unmerged) and
    `apply_merge(state, capacity)`: its prefix graph then hands over unmerged tokens, and each bucket graph merges
    into its own capacity (a merge whose cost grows with the capacity is not paid at N in the prefix)."""
    return hasattr(method, "decide_merge") and hasattr(method, "apply_merge")


class _CaptureHook:
    def __init__(self, hook: nn.Module):
        self.hook = hook
        self.state: Optional[TokenState] = None

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState:
        decide = self.hook.decide_merge if defers_merge(self.hook) else self.hook.after_attention
        self.state = decide(layer, state, keys)
        raise _StopAfterAttention

    def after_block(self, layer: int, state: TokenState) -> TokenState:  # never reached
        return state


def _pad_slots(values: Tensor, length: int) -> Tensor:
    """(B, T, ...) -> (B, length, ...) with zeros appended (zero size = padding slot); a Concat with a constant."""
    extra = length - values.shape[1]
    if extra <= 0:
        return values
    filler = torch.zeros((values.shape[0], extra, *values.shape[2:]), dtype=values.dtype, device=values.device)
    return torch.cat([values, filler], 1)


class StageModule(nn.Module):
    """One stage graph: from the image (start None) or from a reduction point at capacity `capacity`, to the next
    reduction point `end` (exclusive of its MLP) or to the logits (end None)."""

    def __init__(self, model: nn.Module, method: nn.Module, start: Optional[ReductionPoint], capacity: Optional[int],
                 end: Optional[ReductionPoint], earlier_points: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.method = method
        self.start, self.capacity, self.end = start, capacity, end
        self.earlier_points = set(earlier_points)  # points decided by earlier stages: their decisions are not ours
        self.num_patches = model.grid[0] * model.grid[1]
        self.num_prefix = model.backbone.num_prefix

    def input_names(self) -> list[str]:
        return ["image"] if self.start is None else list(STATE_NAMES)

    def output_names(self) -> list[str]:
        extras = sorted(n for n in getattr(self.method, "extra_outputs", ()) if n != "overflow")
        if self.end is None:
            names = ["logits"] + (["labels"] if self.model.emit_labels else []) + ["overflow"]
            point_names = {self.start.name} if self.start is not None else set()
            return names + [n for n in extras if not _belongs_to(n, point_names | self.earlier_points)]
        own = [n for n in extras if _point_of(n) == self.end.name]
        return [n + NEXT for n in STATE_NAMES] + own

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        backbone = self.model.backbone
        if self.start is None:
            state, first = self._embed(inputs[0]), 0
        else:
            state, first = self._resume(*inputs), self.start.block + 1
        last = backbone.cfg.depth if self.end is None else self.end.block
        for i in range(first, last):
            state = backbone.blocks[i].forward_state(i, state, self.method, backbone.proportional_attention)
            state = _after_block(self.method, i, state)
        if self.end is not None:
            return self._handoff(self._until_decision(state))
        return self._finish(state)

    def _embed(self, img: Tensor) -> TokenState:
        model, backbone = self.model, self.model.backbone
        if model.raw_input:
            img = (img - model.pixel_mean) / model.pixel_std
        custom = getattr(self.method, "embed", None)
        img = img.to(backbone.patch_embed.proj.weight.dtype)
        state = custom(backbone, img) if custom is not None else backbone.embed(img)
        return state.with_x(state.x.to(backbone.blocks[0].attn.qkv.weight.dtype))

    def _resume(self, tokens: Tensor, sizes: Tensor, owner: Tensor, count: Tensor, carried_overflow: Tensor) -> TokenState:
        """Keep the first num_prefix + c slots (a static Slice) and finish the block the previous stage cut."""
        p, keep = self.num_prefix, self.num_prefix + self.capacity
        excess = (count - self.capacity).clamp(min=0).to(torch.int32)
        last_slot = torch.full_like(owner, keep - 1)
        owner = torch.minimum(owner, last_slot).to(torch.int64)  # in bounds even past capacity
        extras = {"overflow": carried_overflow + excess}
        if defers_merge(self.method):  # the tokens arrive unmerged: merge them into this bucket's c slots
            state = self.method.apply_merge(TokenState(x=tokens, size=sizes, owner=owner, num_prefix=p,
                                                       extras=extras), self.capacity)
        else:
            state = TokenState(x=tokens[:, :keep], size=sizes[:, :keep], owner=owner, num_prefix=p, extras=extras)
        block = self.model.backbone.blocks[self.start.block]
        x = state.x
        state = state.with_x(x + block.mlp(block.norm2(x)))
        return _after_block(self.method, self.start.block, state)

    def _until_decision(self, state: TokenState) -> TokenState:
        """Run block `end.block` up to and including the method's after_attention hook, not its MLP."""
        backbone, i = self.model.backbone, self.end.block
        capture = _CaptureHook(self.method)
        try:
            backbone.blocks[i].forward_state(i, state, capture, backbone.proportional_attention)
        except _StopAfterAttention:
            pass
        if capture.state is None:
            raise RuntimeError(f"block {i} never called the method's after_attention hook")
        return capture.state.with_x(capture.state.x.to(state.x.dtype))

    def _handoff(self, state: TokenState) -> tuple[Tensor, ...]:
        p, width = self.num_prefix, self.num_prefix + self.num_patches
        size = state.full_size()
        if defers_merge(self.method):  # unmerged tokens: the method says how many slots the merge fills
            count = state.extras[self.method.merge_count_key].to(torch.int32)
        else:
            count = count_true(size[:, p:] > 0).to(torch.int32)
        outputs = (_pad_slots(state.x, width), _pad_slots(size, width), state.owner.to(torch.int32), count,
                   state.extras["overflow"].to(torch.int32))
        names = self.output_names()[len(STATE_NAMES):]
        return outputs + tuple(state.extras[n] for n in names)

    def _finish(self, state: TokenState) -> tuple[Tensor, ...]:
        model = self.model
        if model.backbone.norm is not None:
            state = state.with_x(model.backbone.norm(state.x))
        feats = [state.patch_tokens()]
        if hasattr(self.method, "decode"):
            logits = self.method.decode(model.decoder, feats, state, model.grid, model.image_size)
        else:
            logits = model.decoder(feats, model.grid, model.image_size)
        logits = logits.float()
        outputs: tuple[Tensor, ...] = (logits,)
        if model.emit_labels:
            outputs += (logits.argmax(dim=1).to(torch.int32),)
        outputs += (state.extras["overflow"].to(torch.int32),)
        names = self.output_names()[len(outputs):]
        return outputs + tuple(state.extras[n] for n in names)


def _after_block(method: nn.Module, layer: int, state: TokenState) -> TokenState:
    from staticprune.models.vit import call_hook

    return call_hook(method.after_block, layer, state)


def _point_of(name: str) -> Optional[str]:
    for prefix in ("decision_", "margin_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def _belongs_to(name: str, points: set[str]) -> bool:
    return _point_of(name) in points


# --------------------------------------------------------------------------------------------- the staged model


@dataclass
class StageSpec:
    index: int  # 0 = prefix
    start: Optional[ReductionPoint]
    end: Optional[ReductionPoint]
    capacities: list[Optional[int]]  # [None] for the prefix


def stage_specs(plan: MethodPlan, buckets: dict[str, list[int]]) -> list[StageSpec]:
    points = list(plan.points)
    specs = [StageSpec(0, None, points[0], [None])]
    for k, point in enumerate(points):
        end = points[k + 1] if k + 1 < len(points) else None
        specs.append(StageSpec(k + 1, point, end, list(buckets[point.name])))
    return specs


def stage_options(plan: MethodPlan, options: dict[str, Any], capacity: Optional[int]) -> dict[str, Any]:
    """The method options of one stage graph: every capacity = the stage's bucket (None in the prefix: all
    patches), so the next reduction point's buffer is the input buffer and never overflows."""
    return {**options, **{key: capacity for key in plan.capacity_options}}


def build_stage(model: nn.Module, cfg_method: str, plan: MethodPlan, options: dict[str, Any], spec: StageSpec,
                capacity: Optional[int]) -> StageModule:
    from staticprune.methods import build_static_method

    method = build_static_method(cfg_method, stage_options(plan, options, capacity), model)
    earlier = [p.name for p in plan.points[: plan.points.index(spec.start)]] if spec.start else []
    return StageModule(model, method, spec.start, capacity, spec.end, earlier).eval()


def graph_file(spec: StageSpec, capacity: Optional[int]) -> str:
    if spec.start is None:
        return f"stage0-prefix-{spec.end.name}.onnx"
    return f"stage{spec.index}-{spec.start.name}-c{capacity}.onnx"


# --------------------------------------------------------------------------------------------- export


@dataclass
class StageGraphReport:
    file: str
    stage: int
    capacity: Optional[int]
    lint_ok: bool
    verify_ok: bool
    max_abs: float
    nodes: int
    seconds: float
    lint_text: str = ""
    verify_text: str = ""


@dataclass
class BucketExportResult:
    directory: Path
    graphs: list[StageGraphReport] = field(default_factory=list)
    pipeline_checks: list[str] = field(default_factory=list)
    pipeline_ok: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.pipeline_ok and all(g.lint_ok and g.verify_ok for g in self.graphs)

    def format(self) -> str:
        rows = [f"{'graph':<34} {'lint':<6} {'verify':<8} {'max abs':>9} {'nodes':>6} {'s':>6}"]
        for g in self.graphs:
            rows.append(f"{g.file:<34} {'clean' if g.lint_ok else 'FAIL':<6} {'ok' if g.verify_ok else 'FAIL':<8} "
                        f"{g.max_abs:>9.2e} {g.nodes:>6} {g.seconds:>6.1f}")
            if not g.lint_ok:
                rows.append(g.lint_text)
            if not g.verify_ok:
                rows.append(g.verify_text)
        rows += self.pipeline_checks
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def _as_numpy(t: Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def export_buckets(cfg, model: nn.Module, buckets: dict[str, list[int]], out_dir: str | os.PathLike, opset: int,
                   target: str, verify_images: Sequence[Tensor], tol: float, slim: bool = True,
                   command: Optional[str] = None, force: bool = False,
                   log: Callable[[str], None] = lambda m: None) -> BucketExportResult:
    """Export, lint and verify every stage graph, check the pipeline end to end, then write `out_dir` atomically
    (the directory appears complete or not at all; a failed check still writes it, the caller reports)."""
    from staticprune.export.lint import lint_model
    from staticprune.export.onnx_export import export_to_proto
    from staticprune.pipeline import attach_config
    from staticprune.runtime.ort import ort_session
    from staticprune.verify.decisions import compare_outputs, merge_diffs

    plan = method_plan(cfg.method, model.method, model)
    n = model.grid[0] * model.grid[1]
    buckets, notes = check_buckets(plan, buckets, n)
    options = dict(cfg.method_options)
    dest = Path(out_dir)
    result = BucketExportResult(dest, notes=notes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent if str(dest.parent) else "."))
    try:
        # PyTorch states at every stage boundary for each verification image, from the full-capacity prefix
        per_image_feeds: list[tuple[Tensor, ...]] = [(img,) for img in verify_images]
        stages_json = []
        for spec in stage_specs(plan, buckets):
            graphs_json, next_feeds = [], None
            for capacity in spec.capacities:
                t0 = time.perf_counter()
                stage = build_stage(model, cfg.method, plan, options, spec, capacity)
                name = graph_file(spec, capacity)
                log(f"[staticprune] exporting {name}")
                exported = export_to_proto(stage, per_image_feeds[0], opset=opset,
                                           input_names=tuple(stage.input_names()),
                                           output_names=stage.output_names(), slim=slim)
                attach_config(exported.model, cfg, {
                    "opset": opset, "target": target, "outputs": exported.output_names,
                    "stage": spec.index, "capacity": capacity, "pipeline": PIPELINE_FILE}, command=command)
                lint = lint_model(exported.model, target)
                session = ort_session(exported.model)
                diffs, torch_outs = [], []
                for feeds in per_image_feeds:
                    with torch.no_grad():
                        ref = dict(zip(stage.output_names(), stage(*feeds)))
                    torch_outs.append(ref)
                    got_list = session.run(None, {k: _as_numpy(v) for k, v in zip(stage.input_names(), feeds)})
                    got = dict(zip([o.name for o in session.get_outputs()], got_list))
                    diffs.append(compare_outputs(got, {k: _as_numpy(v) for k, v in ref.items()}, tol))
                merged = merge_diffs(diffs)
                verify_ok = all(d.ok for d in merged)
                max_abs = max((d.max_abs for d in merged if d.dtype.startswith("float")), default=0.0)
                verify_text = "\n".join(f"  {d.name}: max abs {d.max_abs:.2e}, {d.mismatches} differ"
                                        f"{'' if d.ok else ' FAIL'}" for d in merged)
                (staging / name).write_bytes(exported.model.SerializeToString())
                del session
                result.graphs.append(StageGraphReport(name, spec.index, capacity, lint.ok, verify_ok, max_abs,
                                                      exported.nodes, time.perf_counter() - t0, lint.format(),
                                                      verify_text))
                graphs_json.append({"capacity": capacity, "onnx": name, "inputs": exported.input_names,
                                    "outputs": exported.output_names})
                if spec.end is not None:
                    # the next stage is verified on what the largest bucket hands over (the exact state)
                    next_feeds = [tuple(o[n + NEXT] for n in STATE_NAMES) for o in torch_outs]
            stages_json.append({"index": spec.index,
                                "point_in": None if spec.start is None else spec.start.name,
                                "point_out": None if spec.end is None else spec.end.name,
                                "graphs": graphs_json})
            if next_feeds is not None:
                per_image_feeds = next_feeds
        pipeline = pipeline_json(cfg, model, plan, buckets, stages_json, opset, target, command)
        (staging / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=2) + "\n")
        check_pipeline(staging, model, cfg, plan, options, buckets, verify_images, tol, result)
        _replace_dir(staging, dest, force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result


def pipeline_json(cfg, model: nn.Module, plan: MethodPlan, buckets: dict[str, list[int]], stages: list[dict],
                  opset: int, target: str, command: Optional[str]) -> dict[str, Any]:
    from staticprune import __version__
    from staticprune.models import get_spec

    spec = get_spec(cfg.model)
    final_outputs = stages[-1]["graphs"][0]["outputs"]
    return {
        "format": PIPELINE_FORMAT, "format_version": PIPELINE_VERSION, "version": __version__,
        "command": command, "config": json.loads(cfg.to_json()),
        "size": list(cfg.size), "batch": cfg.batch, "num_classes": model.num_classes,
        "mean": list(spec.mean), "std": list(spec.std), "raw_input": bool(cfg.raw_input),
        "num_patches": model.grid[0] * model.grid[1], "num_prefix": model.backbone.num_prefix,
        "points": [{"name": p.name, "block": p.block, "buckets": buckets[p.name]} for p in plan.points],
        "state_inputs": list(STATE_NAMES), "handoff_suffix": NEXT,
        "outputs": [n for n in final_outputs], "opset": opset, "target": target,
        "stages": stages,
    }


def check_pipeline(directory: Path, model: nn.Module, cfg, plan: MethodPlan, options: dict[str, Any],
                   buckets: dict[str, list[int]], images: Sequence[Tensor], tol: float,
                   result: BucketExportResult) -> None:
    """End to end on the written graphs: the bucketed pipeline (ONNX Runtime) against the single PyTorch module at
    the capacities the runtime picked (decision-aware) and against the eager reference (logits, kept counts)."""
    from staticprune.methods import build_static_method
    from staticprune.reference import reference_module
    from staticprune.runtime.buckets import BucketedRunner
    from staticprune.verify.decisions import compare_outputs

    runner = BucketedRunner(str(directory))
    reference = reference_module(cfg.method)
    saved = model.method
    try:
        for i, img in enumerate(images):
            got = runner.run(img.numpy())
            picked = dict(runner.last_capacities)
            model.method = build_static_method(cfg.method, single_graph_options(plan, options, picked), model)
            with torch.no_grad():
                single = dict(zip(model.output_names(), model(img)))
            diffs = compare_outputs(got, {k: _as_numpy(v) for k, v in single.items()}, tol)
            bad = [d.name for d in diffs if not d.ok]
            # a decision that flipped at a near-tie (exposed decisions only) makes every later output legitimately
            # differ, from the single graph and from the reference alike: its logits are then not compared
            near_tie = any(not d.comparable for d in diffs)
            model.method = saved
            with torch.no_grad():
                ref = reference.reference_forward(model, img, options)
            counts = {p.name: [int(c) for c in got[f"count_{p.name}"]] for p in plan.points}
            kept_ok = all(counts[p.name] == [int(c) for c in ref.kept[p.name]] for p in plan.points)
            l1 = float(np.abs(got["logits"].astype(np.float64) - ref.logits.float().numpy()).max())
            overflow = int(np.asarray(got["overflow"]).max())
            logits_ok = l1 <= tol or near_tie
            ok = not bad and kept_ok and logits_ok and overflow == 0
            result.pipeline_ok = result.pipeline_ok and ok
            where = ", ".join(f"{p.name} {counts[p.name]} -> bucket {picked[p.name]}" for p in plan.points)
            result.pipeline_checks.append(
                f"pipeline input {i + 1}: {where}; = single graph at those capacities: "
                f"{'ok' if not bad else 'FAIL (' + ', '.join(bad) + ')'}"
                f"{' (a decision flipped at a near-tie: later outputs not comparable)' if near_tie else ''}; "
                f"= eager reference: kept "
                f"{'equal' if kept_ok else 'DIFFER ' + str({p.name: list(ref.kept[p.name]) for p in plan.points})}, "
                f"logits max abs {l1:.2e} (tol {tol:g}) {'ok' if l1 <= tol else 'near-tie' if near_tie else 'FAIL'}")
            if bad and not any(n.startswith("decision_") for n in got):
                result.notes.append("these graphs expose no decisions: re-export with --opt expose_decisions=true to "
                                    "see whether a near-tie token decision flipped between ONNX Runtime and PyTorch")
    finally:
        model.method = saved
        runner.close()


def single_graph_options(plan: MethodPlan, options: dict[str, Any], capacities: dict[str, int]) -> dict[str, Any]:
    """Options of the one-graph export whose capacities equal the buckets picked at each point."""
    out = dict(options)
    for point, key in zip(plan.points, plan.capacity_options):
        out[key] = capacities[point.name]
    return out


def _replace_dir(staging: Path, dest: Path, force: bool) -> None:
    """Move the finished staging directory into place; an existing one (with force) is swapped out first."""
    os.chmod(staging, 0o777 & ~_umask())
    if dest.exists():
        if not force:
            raise BucketError(f"output '{dest}' exists; pass --force to overwrite it")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return
    os.replace(staging, dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
