"""Class-agnostic CTS / dCTS policy network: EfficientNet-Lite0 features + one scoring head per window size.

Architecture (the CTS policy network, docs/methods/cts.md): timm ``efficientnet_lite0`` with ``features_only=True`` -- stem conv 3x3 s2,
seven stages of depthwise-separable / inverted-residual blocks, ReLU6, no squeeze-excitation, BatchNorm eps 1e-5,
bias-free convs -- whose stride-32 map (320 channels) feeds ``head``, a 1x1 Conv2d(320, 2): one logit pair per 32x32
pixel cell, i.e. per 2x2 group of 16-px patches. Score = softmax(logits)[:, 1] (= sigmoid(l1 - l0)), "the window
holds one semantic class".

Multi-scale heads for dCTS (the papers leave this open; our choice): a window of s x s patches
covers f x f stride-32 cells (f = s / 2), so ``head{s}`` is a Conv2d(C, 2, kernel f, stride f) on the same feature
map -- a position-aware linear score of the window's cells (the paper's ``sigma(W_p^T W)``). ``head`` is the f = 1 case,
so an official CTS checkpoint loads unchanged and a dCTS policy is a CTS policy plus ``head4``/``head8``/``head16``.
Only complete windows are scored (the strided conv floors): a grid that 16x16 windows cannot tile simply has fewer
(or no) 16x16 candidates.

Checkpoint layouts read by :func:`load_policy_checkpoint`:

``policy``      the official standalone file (a bare state dict ``backbone.*`` + ``head.*``), also what
                :func:`staticprune.policy_train.train_policy` writes (plus ``head4/8/16.*``);
``segmenter``   a Segmenter+CTS checkpoint (``{"model": {encoder.*, decoder.*, policy_net.*}}``): the
                ``policy_net.`` entries are taken, the rest ignored;
``timm``        an ImageNet ``efficientnet_lite0`` (``conv_stem.*``, ``blocks.*``; ``conv_head``/``bn2``/``classifier``
                ignored): backbone only, heads keep their initialisation (a starting point for training).
Errors are one-line :class:`~staticprune.models.checkpoints.CheckpointError` s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.models.checkpoints import CheckpointError, read_state_dict
from staticprune.models.registry import VIT_MEAN, VIT_STD

STRIDE = 32  # pixels per output cell = one 2x2 group of 16-px patches
WINDOW_SIZES = (2, 4, 8, 16)  # window sides in patches that a head can score
BN_EPS = 1e-5
HEAD_INIT_GAIN = 0.5  # untrained heads: logits of order one, scores spread over (0, 1)

# (block kind, kernel, stride, expansion, out channels, repeats) of EfficientNet-Lite0 (timm efficientnet_lite0).
LITE0_STAGES: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("ds", 3, 1, 1, 16, 1),
    ("ir", 3, 2, 6, 24, 2),
    ("ir", 5, 2, 6, 40, 2),
    ("ir", 3, 2, 6, 80, 3),
    ("ir", 5, 1, 6, 112, 3),
    ("ir", 5, 2, 6, 192, 4),
    ("ir", 3, 1, 6, 320, 1),
)
LITE0_STEM = 32

PathOrStateDict = Union[str, os.PathLike, Mapping]


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, never more than 10 % below `value`."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def head_name(size: int) -> str:
    """Parameter prefix of the head scoring `size` x `size`-patch windows (``head`` is the official CTS one)."""
    return "head" if size == 2 else f"head{size}"


@dataclass(frozen=True)
class PolicyConfig:
    """Channel widths (explicit, so a checkpoint of any width can be rebuilt from its shapes) and heads."""

    stem: int = LITE0_STEM
    stage_channels: tuple[int, ...] = tuple(s[4] for s in LITE0_STAGES)
    window_sizes: tuple[int, ...] = (2,)
    mean: tuple[float, float, float] = VIT_MEAN  # input normalisation the policy expects (on [0, 1] RGB)
    std: tuple[float, float, float] = VIT_STD

    @classmethod
    def from_width(cls, width: float = 1.0, window_sizes: tuple[int, ...] = (2,), **kw) -> "PolicyConfig":
        """EfficientNet-Lite0 with every channel count scaled by `width` (1.0 = the official network)."""
        if not 0.0 < width <= 4.0:
            raise ValueError(f"policy width must be in (0, 4] (got {width})")
        stem = make_divisible(LITE0_STEM * width)
        chans = tuple(make_divisible(s[4] * width) for s in LITE0_STAGES)
        return cls(stem=stem, stage_channels=chans, window_sizes=check_window_sizes(window_sizes), **kw)


def check_window_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out = tuple(sorted(set(int(s) for s in sizes)))
    bad = [s for s in out if s not in WINDOW_SIZES]
    if bad or not out:
        raise ValueError(f"window sizes must be among {WINDOW_SIZES} (got {tuple(sizes)})")
    return out


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.1)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Symmetric padding k // 2, as timm's non-TF EfficientNets (not TF "same" padding).
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """blocks.0.0: dw conv, BN, ReLU6, pw conv, BN (no activation, no skip unless shapes allow)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin)
        self.bn1 = _bn(cin)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """MBConv without SE: pw expand, BN, ReLU6, dw, BN, ReLU6, pw linear, BN; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = make_divisible(cin * expand)
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid)
        self.bn2 = _bn(mid)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.skip else y


class EfficientNetLiteFeatures(nn.Module):
    """timm EfficientNetFeatures for efficientnet_lite0 (stem + blocks); returns only the stride-32 map."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, cfg.stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(cfg.stem)
        stages = []
        cin = cfg.stem
        for (kind, k, stride, expand, _, repeats), cout in zip(LITE0_STAGES, cfg.stage_channels):
            blocks = []
            for r in range(repeats):
                s = stride if r == 0 else 1
                blk = DepthwiseSeparable(cin, cout, k, s) if kind == "ds" else InvertedResidual(cin, cout, k, s, expand)
                blocks.append(blk)
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(F.relu6(self.bn1(self.conv_stem(x))))


class PolicyNet(nn.Module):
    """EfficientNet-Lite0 features + per-window-size heads. Input: an image in the policy's normalisation."""

    def __init__(self, cfg: PolicyConfig = PolicyConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = EfficientNetLiteFeatures(cfg)
        c = self.backbone.out_channels
        for s in cfg.window_sizes:
            f = s // 2
            self.add_module(head_name(s), nn.Conv2d(c, 2, kernel_size=f, stride=f))
        self._init_weights()

    @property
    def window_sizes(self) -> tuple[int, ...]:
        return self.cfg.window_sizes

    def _init_weights(self) -> None:
        # timm's EfficientNet init (normal, std sqrt(2 / fan_out)) for the backbone; the heads start small so that
        # an untrained policy gives spread, unsaturated scores (saturated scores would all tie at exactly 1.0).
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith("head"):
                    nn.init.normal_(m.weight, std=HEAD_INIT_GAIN / (m.kernel_size[0] * m.kernel_size[1] * m.in_channels) ** 0.5)
                    nn.init.zeros_(m.bias)
                else:
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, std=(2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def head_for(self, size: int) -> nn.Conv2d:
        return getattr(self, head_name(size))

    def window_logits(self, img: Tensor) -> dict[int, Tensor]:
        """{window size: (B, 2, gh // s, gw // s) logits} for every head whose window fits the input."""
        if img.shape[-2] % STRIDE or img.shape[-1] % STRIDE:
            raise ValueError(f"policy input {img.shape[-2]}x{img.shape[-1]} is not a multiple of {STRIDE} on both sides")
        feats = self.backbone(img)
        out = {}
        for s in self.window_sizes:
            f = s // 2
            if feats.shape[-2] >= f and feats.shape[-1] >= f:
                out[s] = self.head_for(s)(feats)
        return out

    def window_scores(self, img: Tensor) -> dict[int, Tensor]:
        """{window size: (B, gh // s, gw // s) scores in [0, 1]}: softmax channel 1, "one class inside"."""
        return {s: logits.softmax(dim=1)[:, 1] for s, logits in self.window_logits(img).items()}

    def forward(self, img: Tensor) -> tuple[Tensor, ...]:
        """Scores of every fitting head, in increasing window size (the graph outputs of export_policy_onnx)."""
        scores = self.window_scores(img)
        return tuple(scores[s] for s in sorted(scores))


def renormalize(img: Tensor, from_mean, from_std, to_mean, to_std) -> Tensor:
    """Re-express an image normalised with (from_mean, from_std) in (to_mean, to_std); identity if they agree.

    The policy runs on the segmenter's input, which SegViT-B normalises with ImageNet statistics while the CTS
    policy was trained with mean = std = 0.5: one per-channel affine map in the graph bridges the two.
    """
    if tuple(from_mean) == tuple(to_mean) and tuple(from_std) == tuple(to_std):
        return img
    fm, fs, tm, ts = (torch.tensor(v, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
                      for v in (from_mean, from_std, to_mean, to_std))
    scale = fs / ts
    shift = (fm - tm) / ts
    return img * scale + shift


# --------------------------------------------------------------------------------------------- checkpoints


@dataclass
class PolicyLoadReport:
    layout: str
    loaded: int
    ignored: list[str] = field(default_factory=list)
    kept_init: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"loaded {self.loaded} policy tensors ({self.layout} layout), ignored {len(self.ignored)}"
        return text + (f", {len(self.kept_init)} kept their initialisation" if self.kept_init else "")


_TIMM_IGNORED = ("conv_head.", "bn2.", "classifier.")


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def detect_policy_layout(sd: Mapping[str, Tensor]) -> str:
    """'policy', 'segmenter' or 'timm' from the key names."""
    keys = list(sd)
    if any(k.startswith("policy_net.") for k in keys):
        return "segmenter"
    if any(k.startswith("backbone.conv_stem.") for k in keys):
        return "policy"
    if any(k.startswith("conv_stem.") for k in keys):
        return "timm"
    raise CheckpointError(
        f"cannot find a policy network in a checkpoint with keys {_first(keys)}; expected backbone.conv_stem.* "
        "(CTS policy file), policy_net.* (Segmenter+CTS checkpoint) or conv_stem.* (timm efficientnet_lite0)"
    )


def policy_state_dict(sd: Mapping[str, Tensor], layout: str = "auto") -> tuple[dict[str, Tensor], list[str], str]:
    """Convert a checkpoint's state dict to PolicyNet names. Returns (state dict, ignored keys, layout)."""
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if layout == "auto":
        layout = detect_policy_layout(sd)
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    if layout == "policy":
        out = dict(sd)
    elif layout == "segmenter":
        for k, v in sd.items():
            if k.startswith("policy_net."):
                out[k[len("policy_net."):]] = v
            else:
                ignored.append(k)
    elif layout == "timm":
        for k, v in sd.items():
            if k.startswith(_TIMM_IGNORED):
                ignored.append(k)
            else:
                out["backbone." + k] = v
    else:
        raise CheckpointError(f"unknown policy checkpoint layout '{layout}'; use auto, policy, segmenter or timm")
    return out, ignored, layout


def config_from_state_dict(sd: Mapping[str, Tensor], **kw) -> PolicyConfig:
    """The PolicyConfig whose shapes match a converted (PolicyNet-named) state dict, any width."""
    try:
        stem = int(sd["backbone.conv_stem.weight"].shape[0])
        chans = [int(sd["backbone.blocks.0.0.conv_pw.weight"].shape[0])]
        for i in range(1, len(LITE0_STAGES)):
            chans.append(int(sd[f"backbone.blocks.{i}.0.conv_pwl.weight"].shape[0]))
    except KeyError as e:
        raise CheckpointError(f"policy checkpoint lacks {e.args[0]}: not an EfficientNet-Lite0 policy") from None
    sizes = tuple(s for s in WINDOW_SIZES if f"{head_name(s)}.weight" in sd) or (2,)
    return PolicyConfig(stem=stem, stage_channels=tuple(chans), window_sizes=sizes, **kw)


def _read(source: PathOrStateDict) -> tuple[dict[str, Tensor], str]:
    if isinstance(source, (str, os.PathLike)):
        return read_state_dict(source), os.fspath(source)
    inner = source
    for key in ("model", "state_dict"):
        if isinstance(inner.get(key), Mapping):
            inner = inner[key]
    return dict(inner), "<state_dict>"


def read_sidecar(path: PathOrStateDict) -> dict:
    """The JSON written next to a trained policy (normalisation, width, metrics); {} if there is none."""
    if not isinstance(path, (str, os.PathLike)):
        return {}
    side = os.fspath(path) + ".json"
    if not os.path.isfile(side):
        return {}
    try:
        with open(side) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"policy sidecar {side} is not readable JSON; delete or fix it") from None
    return data if isinstance(data, dict) else {}


def load_policy_checkpoint(
    policy: PolicyNet, source: PathOrStateDict, layout: str = "auto", backbone_only: bool = False
) -> PolicyLoadReport:
    """Load policy weights into `policy` (left untouched on error). Extra heads in the file are ignored.

    A head the policy needs but the file lacks is an error (e.g. an official 2x2-only CTS policy used for dCTS),
    unless the layout is 'timm' or backbone_only is set: then the heads keep their initialisation.
    """
    sd, name = _read(source)
    if not sd:
        raise CheckpointError(f"policy checkpoint {name} holds an empty state dict")
    conv, ignored, layout = policy_state_dict(sd, layout)
    own = policy.state_dict()
    heads_optional = backbone_only or layout == "timm"
    for k in [k for k in conv if k.startswith("head") and k not in own]:
        ignored.append(k)  # heads for window sizes this policy does not score
        del conv[k]
    missing = [k for k in own if k not in conv and not (heads_optional and k.startswith("head"))]
    unexpected = [k for k in conv if k not in own]
    mismatched = [k for k in own if k in conv and tuple(conv[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) ({_first(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) ({_first(unexpected)})")
        if mismatched:
            shown = [f"{k}: checkpoint {tuple(conv[k].shape)} vs policy {tuple(own[k].shape)}" for k in mismatched[:3]]
            parts.append(f"shape mismatch {len(mismatched)} ({', '.join(shown)})")
        hint = ""
        missing_heads = [k for k in missing if k.startswith("head") and k.endswith(".weight")]
        if missing_heads and len(missing_heads) * 2 == len(missing):
            hint = ("; the file has no head for "
                    + ", ".join(k.split(".")[0] for k in missing_heads)
                    + " (a 2x2-only CTS policy?): train a multi-scale one with `staticprune train-policy` or use "
                    "window_sizes=2")
        elif mismatched and "backbone.conv_stem.weight" in mismatched:
            hint = "; the file's channel widths differ: build the policy with policy_from_checkpoint()"
        raise CheckpointError(f"policy checkpoint {name} ({layout} layout) does not match the policy network: "
                              + ", ".join(parts) + hint)
    kept = [k for k in own if k not in conv]
    policy.load_state_dict(conv, strict=not kept)
    return PolicyLoadReport(layout=layout, loaded=len(conv), ignored=ignored, kept_init=kept)


def policy_from_checkpoint(source: PathOrStateDict, window_sizes: Optional[tuple[int, ...]] = None) -> PolicyNet:
    """Build a PolicyNet of the checkpoint's width (and normalisation, from its sidecar JSON) and load it."""
    sd, _ = _read(source)
    conv, _, _ = policy_state_dict(sd)
    side = read_sidecar(source)
    norm = {k: tuple(side[k]) for k in ("mean", "std") if k in side}
    cfg = config_from_state_dict(conv, **norm)
    if window_sizes is not None:
        cfg = PolicyConfig(cfg.stem, cfg.stage_channels, check_window_sizes(window_sizes), cfg.mean, cfg.std)
    policy = PolicyNet(cfg)
    load_policy_checkpoint(policy, source)
    return policy.eval()


def build_policy(
    weights: str = "", width: float = 1.0, seed: int = 0, window_sizes: tuple[int, ...] = (2,)
) -> PolicyNet:
    """The policy a method uses: loaded from `weights` if given, else deterministic random weights from `seed`.

    Deterministic so that a static module and the eager reference built from the same options score identically,
    and the caller's RNG state is left alone.
    """
    if weights:
        return policy_from_checkpoint(weights, window_sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PolicyNet(PolicyConfig.from_width(width, window_sizes)).eval()


def export_policy_onnx(
    policy: PolicyNet, size: tuple[int, int], path: Optional[str] = None, batch: int = 1, opset: int = 17
):
    """Export the policy alone (outputs ``scores_{s}x{s}`` per fitting head) and return the checked ONNX model.

    The segmenter graphs of CTS/dCTS embed the same network; this standalone graph is for running the policy as
    its own engine (e.g. on the DLA) or inspecting it.
    """
    from staticprune.export.onnx_export import export_to_proto, save_atomic  # export sits above models

    policy = policy.eval()
    example = torch.zeros(batch, 3, *size)
    names = [f"scores_{s}x{s}" for s in sorted(policy.window_logits(example))]
    result = export_to_proto(policy, example, opset=opset, output_names=names)
    if path:
        save_atomic(result.model, path)
    return result.model


__all__ = [
    "PolicyConfig", "PolicyNet", "PolicyLoadReport", "WINDOW_SIZES", "STRIDE", "build_policy", "check_window_sizes",
    "config_from_state_dict", "detect_policy_layout", "export_policy_onnx", "head_name", "load_policy_checkpoint",
    "policy_from_checkpoint", "policy_state_dict", "read_sidecar", "renormalize",
]
