"""Checkpoint import and export: timm, Segmenter, mmseg (SegViT) and native state dicts.

Our model's naming ("native", what ``model.state_dict()`` returns):

* backbone, timm names under ``backbone.``: ``backbone.cls_token`` (1, 1, D), ``backbone.pos_embed``
  (1, 1 + gh*gw, D) -- it always has the CLS row, also for SegViT, which drops the token before block 0 --,
  for DeiT-distilled encoders (``segmenter-deit-*`` models) also ``backbone.dist_token`` (1, 1, D) and a second
  prefix row in ``backbone.pos_embed`` (1, 2 + gh*gw, D),
  ``backbone.patch_embed.proj.{weight,bias}``,
  ``backbone.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}`` and
  ``backbone.norm.{weight,bias}`` (Segmenter only; SegViT has no final norm);
* decoder, the official names under ``decoder.``: Segmenter linear ``decoder.head.*``; Segmenter mask transformer
  ``decoder.{proj_dec,cls_emb,blocks.{0,1}.*,decoder_norm,proj_patch,proj_classes,mask_norm}``; SegViT ATM head
  ``decoder.{input_proj_s,proj_norm_s,decoder_s.layers.l.*,q,class_embed}`` (mmseg's ``decode_head.*`` names);
* method parameters under ``method.``: DToP's and STEP's prune heads ``method.aux_heads.{i}.*`` and
  ``method.final_head.*`` (DToP's ``PruneHead`` names: ``input_proj``, ``proj_norm``, ``decoder.layers.l.*``, ``q``,
  ``class_embed``), STEP's policy network ``method.dcts.policy.*``. They load when the model is built with that
  method (the CLI builds the method before it loads the weights); parts of a method that a checkpoint does not carry
  keep their initialisation (DToP's seeded heads, a policy from ``--opt policy_weights``).

Layouts that :func:`load_checkpoint` reads (``layout="auto"`` picks one with :func:`detect_layout`):

``native``
    The names above, e.g. a file written by ``torch.save(model.state_dict(), path)``.
``timm``
    A bare timm ViT state dict: ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*``.
    The ImageNet classifier (``head.*``), ``pre_logits.*``, ``fc_norm.*`` and ``head_dist.*`` are ignored; a
    ``dist_token`` (DeiT) loads into a DeiT-distilled model and is otherwise ignored with its positional row. It
    carries no decoder: give the decoder alongside under ``decoder.*`` (our names), or pass ``--backbone-only``
    (``backbone_only=True``) to keep the decoder's initialisation.
``segmenter``
    rstrudel/segmenter ``checkpoint.pth``: ``{"model": {...}, "n_cls": K, ...}`` with ``encoder.<timm name>`` and
    ``decoder.<official name>``. ``encoder.head.*`` and ``encoder.head_dist.*`` (the unused 1000-class
    classifiers) are ignored. DeiT-distilled encoders (``encoder.dist_token``, two prefix rows in
    ``encoder.pos_embed``) load into the ``segmenter-deit-*`` models, and only there.
``mmseg``
    mmcv checkpoint of SegViT: ``{"state_dict": {...}, "meta": ...}`` with ``backbone.cls_token``,
    ``backbone.pos_embed``, ``backbone.patch_embed.projection.*``,
    ``backbone.layers.{i}.{ln1,ln2,attn.attn.in_proj_weight,attn.attn.in_proj_bias,attn.attn.out_proj,
    ffn.layers.0.0,ffn.layers.1}.*``, ``backbone.ln1.*`` (only with final_norm) and ``decode_head.<ATM name>``.
    ``*.loss_decode.*`` (training-loss buffers) are ignored. A DToP checkpoint (three ``PruneHead`` modules:
    ``auxiliary_head.{i}.{input_proj,proj_norm,decoder.layers.l,q,class_embed}.*`` and ``decode_head.*`` with the
    same names) maps ``auxiliary_head.{i}.`` to ``method.aux_heads.{i}.`` and ``decode_head.`` to
    ``method.final_head.``: it loads into a model built with ``--method dtop`` or ``--method step`` (whose exits
    must match its auxiliary heads), whose SegViT decoder it does not use. Other ``auxiliary_head.*`` keys
    (training-only heads) are ignored. A bare converted backbone (the same names without ``backbone.``, as
    SegViT's pretrain files) is read too.

Files are read with ``torch.load(weights_only=True)``: a file that pickles Python objects other than tensors and
plain containers is refused, never unpickled. Wrappers are unwrapped: ``model`` (Segmenter), ``state_dict`` (mmcv)
and the ``module.`` prefix of DistributedDataParallel.

Positional embeddings are resized here, at load time, when the checkpoint's token grid differs from the model's
(never in the exported graph), with the CLS row kept apart and align_corners=False, as the original code does:
bilinear for Segmenter checkpoints (Segmenter's own ``resize_pos_embed``), bicubic for mmseg checkpoints (mmseg's
``interpolate_mode``). timm and native checkpoints follow the target model: bilinear for Segmenter models (timm
0.4.12, which Segmenter used, resizes bilinearly), bicubic for SegViT models (mmseg resizes its timm pretrain
bicubically). Modern timm (>= 0.9) resamples bicubic *with antialias*; we do not, so a table resized by modern timm
differs from ours. The checkpoint's grid is inferred as square from the row count, unless ``pos_grid=(h, w)``
(``--weights-grid HxW``) gives it (non-square training crops); a table with as many rows as the model's is taken
to be for the model's grid unless ``pos_grid`` says otherwise.

Error messages name the command-line flags (``--classes``, ``--backbone-only``, ``--weights-layout``,
``--weights-grid``, ``--model``, ``--method``); the Python keywords are ``num_classes`` of ``build_model`` and
``backbone_only``, ``layout``, ``pos_grid`` of :func:`load_checkpoint`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from staticprune.models.vit import VIT_SIZES, infer_square_grid, resize_pos_embed

LAYOUTS = ("native", "timm", "segmenter", "mmseg")
IMAGENET_CLASSES = 1000  # size of the unused classifier kept in timm and Segmenter files
EMPTY_WEIGHT_NO_OBJECT = 0.1  # SegViT's loss weight of the "no object" class (the last entry of empty_weight)
_SHOW = 3  # keys listed per kind in an error message

PathOrStateDict = Union[str, os.PathLike, Mapping]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. str() is one line a user can act on."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


@dataclass
class LoadReport:
    layout: str
    loaded: int  # number of model tensors set from the checkpoint
    ignored: list[str] = field(default_factory=list)  # checkpoint keys deliberately not loaded
    resized_pos_embed: bool = False
    pos_grid_from: Optional[tuple[int, int]] = None  # checkpoint grid, when resized
    pos_grid_to: Optional[tuple[int, int]] = None
    pos_mode: Optional[str] = None  # interpolation used for the resize
    kept_init: list[str] = field(default_factory=list)  # model keys left at their initialisation (backbone_only)

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors ({self.layout} layout), ignored {len(self.ignored)}"
        if self.kept_init:
            text += f", {len(self.kept_init)} kept their initialisation"
        if self.resized_pos_embed:
            (a, b), (c, d) = self.pos_grid_from, self.pos_grid_to
            text += f", pos_embed resized {a}x{b} -> {c}x{d} ({self.pos_mode})"
        return text


# ----------------------------------------------------------------------------------------------- reading


def _describe(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<state_dict>"


def _unwrap(obj: Any, name: str) -> dict[str, Tensor]:
    """Find the state dict in a loaded checkpoint object and strip DDP's `module.` prefix."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"checkpoint {name} holds a {type(obj).__name__}, not a dict of tensors")
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(
            f"checkpoint {name} holds no state_dict: {len(bad)} entries are not tensors ({_first(bad)}); "
            "expected a state dict, or a dict with it under 'model' or 'state_dict'"
        )
    if not obj:
        raise CheckpointError(f"checkpoint {name} holds an empty state dict")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """Load a checkpoint file safely (weights_only) and return its state dict (unwrapped, `module.` stripped)."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise CheckpointError(f"checkpoint {name} not found")
    if os.path.isdir(name):
        raise CheckpointError(f"checkpoint {name} is a directory; give the .pth/.pt file inside it")
    try:
        obj = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.findall(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"checkpoint {name} pickles Python objects ({', '.join(unsafe)}) that a weights-only load refuses; "
                "if you trust the file, re-save just its weights: "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth') "
                "(or ['model'] for Segmenter files)"
            ) from None
        raise CheckpointError(f"checkpoint {name} is not a readable PyTorch checkpoint (corrupt or another format)") from None
    except Exception as e:  # a corrupt file can raise almost anything from the unpickler (IndexError, ...)
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        if isinstance(e, EOFError):
            reason = "file is empty or truncated"
        raise CheckpointError(f"checkpoint {name} is not a readable PyTorch checkpoint: {reason}") from None
    return _unwrap(obj, name)


# ----------------------------------------------------------------------------------------------- layouts


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """'native', 'timm', 'segmenter' or 'mmseg', from the key names."""
    keys = [k[len("module.") :] if k.startswith("module.") else k for k in state_dict]

    def any_prefix(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any_prefix("backbone.layers.", "backbone.patch_embed.projection.", "decode_head.", "layers.",
                  "patch_embed.projection."):
        return "mmseg"
    if any_prefix("backbone."):
        return "native"
    if any_prefix("encoder."):
        return "segmenter"
    if any_prefix("blocks.", "patch_embed.proj."):
        return "timm"
    raise CheckpointError(
        f"cannot tell the layout of a checkpoint with keys {_first(keys)}; "
        f"pass --weights-layout one of {', '.join(LAYOUTS)} (key names: staticprune/models/checkpoints.py)"
    )


# mmseg backbone name -> timm name (without the `backbone.` prefix); the inverse is derived below.
_MMSEG_TO_TIMM = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^layers\.(\d+)\.attn\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^ln1\.", "norm."),
]
_TIMM_TO_MMSEG = [
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
    (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.ln2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"layers.\1.attn.attn.in_proj_weight"),
    (r"^blocks\.(\d+)\.attn\.qkv\.bias$", r"layers.\1.attn.attn.in_proj_bias"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attn.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
    (r"^norm\.", "ln1."),
]
_MMSEG_BACKBONE_ROOTS = ("cls_token", "pos_embed", "patch_embed.", "layers.", "ln1.")
_TIMM_IGNORED = ("head.", "head_dist.", "fc_norm.", "pre_logits.")
_PRUNE_HEAD_KEY = re.compile(r"^(?:auxiliary_head\.\d+|decode_head)\.input_proj\.weight$")  # DToP PruneHead
_AUX_HEAD = re.compile(r"^auxiliary_head\.(\d+)\.(.*)$")


def has_prune_heads(sd: Mapping[str, Tensor]) -> bool:
    """Whether an mmseg state dict holds DToP prune heads (one `input_proj`, not SegViT's `input_proj_{s}`)."""
    return any(_PRUNE_HEAD_KEY.match(k) for k in sd)


def _backbone(model: nn.Module) -> Optional[nn.Module]:
    return getattr(model, "backbone", None)


def _is_distilled(model: nn.Module) -> bool:
    return getattr(_backbone(model), "dist_token", None) is not None


def _table_prefix(model: nn.Module) -> int:
    """Rows before the patch grid in the model's positional table (CLS, and DeiT's distillation token)."""
    return int(getattr(_backbone(model), "table_prefix", 1))


def _model_name(model: nn.Module) -> str:
    return getattr(getattr(model, "spec", None), "name", type(model).__name__)


def _twin_name(model: nn.Module, distilled: bool) -> str:
    """The registry name of the same Segmenter model with (or without) a DeiT distillation token."""
    name = _model_name(model)
    if distilled:
        return name.replace("segmenter-vit-", "segmenter-deit-") if name.startswith("segmenter-vit-") else "segmenter-deit-<size>-<decoder>"
    return name.replace("segmenter-deit-", "segmenter-vit-") if name.startswith("segmenter-deit-") else name


def _has_prune_head_method(model: nn.Module) -> bool:
    method = getattr(model, "method", None)
    return method is not None and hasattr(method, "aux_heads") and hasattr(method, "final_head")


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


@dataclass
class _Converted:
    state_dict: dict[str, Tensor]
    ignored: list[str]
    resize: Optional[tuple[tuple[int, int], tuple[int, int], str]] = None


def _convert(
    sd: Mapping[str, Tensor],
    layout: str,
    model: nn.Module,
    backbone_only: bool,
    pos_grid: Optional[tuple[int, int]],
    name: str,
) -> _Converted:
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    if layout == "auto":
        layout = detect_layout(sd)
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint layout '{layout}'; use auto, {', '.join(LAYOUTS)}")
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    extra_prefix_rows = 0  # positional rows of tokens we drop (timm DeiT dist token, for a model without one)
    ckpt_prefix_rows = 1  # rows before the grid in the checkpoint's positional table (after that drop)
    distilled_model = _is_distilled(model)

    if layout == "native":
        out = dict(sd)
    elif layout == "timm":
        for k, v in sd.items():
            if k.startswith("decoder."):
                out[k] = v
            elif k.startswith(_TIMM_IGNORED) or (k == "dist_token" and not distilled_model):
                ignored.append(k)
            else:
                out["backbone." + k] = v
        if "dist_token" in sd:
            if distilled_model:
                ckpt_prefix_rows = 2
            else:
                extra_prefix_rows = 1
        if not backbone_only and not any(k.startswith("decoder.") for k in out):
            raise CheckpointError(
                f"checkpoint {name} is in the timm layout, which carries only the backbone (no decoder.* keys); "
                "pass --backbone-only to load the backbone and keep the decoder's initialisation, "
                "or add the decoder's weights under decoder.*"
            )
    elif layout == "segmenter":
        if "encoder.dist_token" in sd and not distilled_model:
            raise CheckpointError(
                f"checkpoint {name} has a DeiT-distilled encoder (encoder.dist_token, two prefix tokens), "
                f"'{_model_name(model)}' has none: use --model {_twin_name(model, True)}"
            )
        ckpt_prefix_rows = 2 if "encoder.dist_token" in sd else 1
        for k, v in sd.items():
            if k.startswith(("encoder.head.", "encoder.head_dist.", "policy_net.")):
                ignored.append(k)  # the classifier is unused; a CTS policy loads with --opt policy_weights=FILE
            elif k.startswith("encoder."):
                out["backbone." + k[len("encoder.") :]] = v
            else:
                out[k] = v  # decoder.* keeps its name; anything else shows up as unexpected
    else:  # mmseg
        prune_heads = has_prune_heads(sd)
        if prune_heads and not backbone_only and not _has_prune_head_method(model):
            raise CheckpointError(
                f"checkpoint {name} holds DToP prune heads (auxiliary_head.<i>.*, decode_head.input_proj), not a "
                f"SegViT ATM decoder: export it with --method dtop (or --method step), or pass --backbone-only"
            )
        for k, v in sd.items():
            aux = _AUX_HEAD.match(k)
            if ".loss_decode." in k:
                ignored.append(k)
            elif prune_heads and aux:
                out[f"method.aux_heads.{aux.group(1)}.{aux.group(2)}"] = v
            elif k.startswith("auxiliary_head."):
                ignored.append(k)  # training-only heads (e.g. mmseg's FCN auxiliary head)
            elif k.startswith("decode_head."):
                out[("method.final_head." if prune_heads else "decoder.") + k[len("decode_head.") :]] = v
            elif k.startswith("backbone."):
                out["backbone." + _rename(k[len("backbone.") :], _MMSEG_TO_TIMM)] = v
            elif k.startswith(_MMSEG_BACKBONE_ROOTS):  # a bare converted backbone (SegViT pretrain file)
                out["backbone." + _rename(k, _MMSEG_TO_TIMM)] = v
            else:
                out[k] = v

    if backbone_only:
        for k in [k for k in out if not k.startswith("backbone.")]:
            ignored.append(k)
            del out[k]

    resize = _fit_pos_embed(out, layout, model, pos_grid, extra_prefix_rows, ckpt_prefix_rows, name)
    return _Converted(out, ignored, resize)


def _resize_mode(layout: str, model: nn.Module) -> str:
    if layout == "mmseg":
        return "bicubic"
    if layout == "segmenter":
        return "bilinear"
    spec = getattr(model, "spec", None)
    return "bicubic" if getattr(spec, "family", "") == "segvit" else "bilinear"


def _fit_pos_embed(
    out: dict[str, Tensor],
    layout: str,
    model: nn.Module,
    pos_grid: Optional[tuple[int, int]],
    extra_prefix_rows: int,
    ckpt_prefix_rows: int,
    name: str,
) -> Optional[tuple[tuple[int, int], tuple[int, int], str]]:
    """Resize `backbone.pos_embed` in place to the model's grid; returns (old grid, new grid, mode) if it did."""
    key = "backbone.pos_embed"
    backbone = getattr(model, "backbone", None)
    if key not in out or backbone is None or not hasattr(backbone, "pos_embed"):
        return None
    pos = out[key]
    if extra_prefix_rows:  # drop the rows of ignored extra tokens (kept apart right after the CLS row)
        pos = torch.cat([pos[:, :1], pos[:, 1 + extra_prefix_rows :]], dim=1)
        out[key] = pos
    target = backbone.pos_embed
    new_grid = tuple(backbone.grid)
    prefix = _table_prefix(model)
    if layout == "native":
        ckpt_prefix_rows = 2 if "backbone.dist_token" in out else 1
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != target.shape[2] or ckpt_prefix_rows != prefix:
        return None  # width, rank or prefix tokens differ: reported as a mismatch, nothing to resize
    rows = pos.shape[1] - prefix
    if pos_grid is not None:
        old_grid = (int(pos_grid[0]), int(pos_grid[1]))
        if old_grid[0] * old_grid[1] != rows:
            raise CheckpointError(
                f"--weights-grid {old_grid[0]}x{old_grid[1]} gives {old_grid[0] * old_grid[1]} positions but "
                f"checkpoint {name} has {rows} (pos_embed {_shape(pos)} with {prefix} prefix row(s)); give the grid "
                "of its training crop / 16"
            )
    elif pos.shape[1] == target.shape[1]:
        return None  # same number of rows: taken to be the model's grid
    else:
        try:
            old_grid = infer_square_grid(rows)
        except ValueError:
            raise CheckpointError(
                f"checkpoint {name} has a positional table for {rows} positions, which is not a square grid; "
                f"pass --weights-grid HxW, its training crop / 16, to resize it to the model's "
                f"{new_grid[0]}x{new_grid[1]}"
            ) from None
    if old_grid == new_grid:
        return None
    mode = _resize_mode(layout, model)
    out[key] = resize_pos_embed(pos, old_grid, new_grid, mode=mode, num_prefix=prefix)
    return old_grid, new_grid, mode


def convert_state_dict(
    sd: Mapping[str, Tensor],
    layout: str,
    model: nn.Module,
    *,
    backbone_only: bool = False,
    pos_grid: Optional[tuple[int, int]] = None,
) -> dict[str, Tensor]:
    """Map a state dict in `layout` ('auto' detects it) to our naming, resizing pos_embed to `model`'s grid.

    Ignored keys (classifier heads, loss buffers, decoder keys when backbone_only) are left out. Nothing is
    checked against the model beyond the positional grid: :func:`load_checkpoint` does that.
    """
    return _convert(sd, layout, model, backbone_only, pos_grid, "<state_dict>").state_dict


# ----------------------------------------------------------------------------------------------- loading


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def _first(keys: list[str], n: int = _SHOW) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _model_label(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    label = getattr(spec, "name", type(model).__name__)
    size = getattr(model, "image_size", None)
    k = getattr(model, "num_classes", None)
    if size is not None and k is not None:
        label += f" ({size[0]}x{size[1]}, {k} classes)"
    return label


_CLASS_KEYS = (("decoder.head.weight", 0), ("decoder.cls_emb", 1), ("decoder.q.weight", 0),
               ("method.final_head.q.weight", 0), ("method.aux_heads.0.q.weight", 0))


def _num_classes(sd: Mapping[str, Tensor]) -> Optional[int]:
    """The class count of a state dict in our naming (linear head rows, mask-transformer or ATM/DToP queries)."""
    for key, axis in _CLASS_KEYS:
        if key in sd and sd[key].dim() > axis:
            return int(sd[key].shape[axis])
    return None


def _read_with_layout(path_or_state_dict: PathOrStateDict, layout: str, name: str) -> tuple[dict, str]:
    """The checkpoint's flat state dict and its layout (detected when `layout` is "auto")."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd = read_state_dict(path_or_state_dict)
    else:
        sd = _unwrap(path_or_state_dict, name)
    return sd, detect_layout(sd) if layout == "auto" else layout


def checkpoint_num_classes(
    path_or_state_dict: PathOrStateDict, layout: str = "auto", name: Optional[str] = None
) -> int:
    """The number of classes a checkpoint's decoder (or DToP head) predicts, from its tensor shapes.

    Raises CheckpointError when it carries no decoder (a timm or other backbone-only file)."""
    name = name or _describe(path_or_state_dict)
    sd, layout = _read_with_layout(path_or_state_dict, layout, name)
    renamed: dict[str, Tensor] = {}
    for k, v in sd.items():
        if layout == "segmenter" and k.startswith("decoder."):
            renamed[k] = v
        elif layout == "mmseg" and k.startswith("decode_head."):
            prefix = "method.final_head." if has_prune_heads(sd) else "decoder."
            renamed[prefix + k[len("decode_head.") :]] = v
        elif layout in ("native", "timm"):
            renamed[k] = v
    k = _num_classes(renamed)
    if k is None:
        raise CheckpointError(
            f"checkpoint {name} ({layout} layout) carries no decoder to read the class count from: "
            "pass --classes K (and --backbone-only to keep the decoder's initialisation)"
        )
    return k


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _decoder_kind(sd: Mapping[str, Tensor]) -> Optional[str]:
    for key, kind in (("decoder.head.weight", "linear"), ("decoder.cls_emb", "mask"), ("decoder.q.weight", "atm")):
        if key in sd:
            return kind
    return None


def _mismatch_hint(
    ckpt: Mapping[str, Tensor], own: Mapping[str, Tensor], model: nn.Module, missing: list[str], backbone_only: bool
) -> str:
    """The most likely cause of a mismatch, phrased as what to do."""
    key = "backbone.cls_token"
    if key in ckpt and key in own and ckpt[key].shape[-1] != own[key].shape[-1]:
        sizes = {v["dim"]: s.upper() for s, v in VIT_SIZES.items()}
        d_ckpt, d_model = int(ckpt[key].shape[-1]), int(own[key].shape[-1])
        return (f"the checkpoint's encoder is {d_ckpt} wide (ViT-{sizes.get(d_ckpt, '?')}), the model's {d_model} "
                f"(ViT-{sizes.get(d_model, '?')}): build the model of the checkpoint's size")
    depth_ckpt, depth_model = _depth(ckpt), _depth(own)
    if depth_ckpt and depth_ckpt != depth_model:
        return f"the checkpoint's encoder has {depth_ckpt} blocks, the model's {depth_model}"
    kind_ckpt, kind_model = _decoder_kind(ckpt), _decoder_kind(own)
    if "backbone.dist_token" in own and "backbone.dist_token" not in ckpt:
        return (f"the checkpoint's encoder has no distillation token (not DeiT-distilled): use --model "
                f"{_twin_name(model, False)}")
    if "backbone.dist_token" in ckpt and "backbone.dist_token" not in own:
        return f"the checkpoint's encoder is DeiT-distilled: use --model {_twin_name(model, True)}"
    if not backbone_only and kind_ckpt and kind_model and kind_ckpt != kind_model:
        return (f"the checkpoint has a {kind_ckpt} decoder, the model a {kind_model} decoder: use the "
                f"{kind_ckpt} model (--model ...-{kind_ckpt}), or pass --backbone-only to keep only the backbone")
    k_ckpt, k_model = _num_classes(ckpt), getattr(model, "num_classes", None)
    if k_ckpt is not None and k_model is not None and k_ckpt != k_model:
        return (f"the checkpoint is for {k_ckpt} classes: pass --classes {k_ckpt} (or leave --classes out to read "
                "it from the checkpoint), or --backbone-only to keep only the backbone")
    heads_ckpt = {k.split(".")[2] for k in ckpt if k.startswith("method.aux_heads.")}
    heads_model = {k.split(".")[2] for k in own if k.startswith("method.aux_heads.")}
    if heads_ckpt and heads_ckpt != heads_model:
        return (f"the checkpoint has {len(heads_ckpt)} auxiliary prune head(s), the method {len(heads_model)} "
                f"exit(s): give one exit per head with --opt exit_layers=... ({len(heads_ckpt)} 0-based blocks)")
    foreign_method = [k for k in ckpt if k.startswith("method.") and k not in own]
    if foreign_method and not any(k.startswith("method.") for k in own):
        return (f"the checkpoint carries method parameters ({_first(foreign_method)}): build the model with the "
                "--method they belong to")
    if missing and all(k.startswith("decoder.") for k in missing) and not any(k.startswith("decoder.") for k in ckpt):
        return "the checkpoint has no decoder weights: pass --backbone-only to keep the decoder's initialisation"
    foreign = [k for k in ckpt if not k.startswith(("backbone.", "decoder."))]
    if foreign:
        return f"keys outside backbone./decoder. ({_first(foreign)}): is the layout right?"
    return ""


def _depth(sd: Mapping[str, Tensor]) -> int:
    return len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})


def _method_part(key: str) -> str:
    """`method.aux_heads.0.q.weight` -> `method.aux_heads`: one part of a method (heads, a policy network)."""
    return ".".join(key.split(".")[:2])


def _required(key: str, layout: str, backbone_only: bool, ckpt: Mapping[str, Tensor]) -> bool:
    if key.startswith("method."):
        # A part of the method the checkpoint carries must load whole (no half-trained set of heads); the parts
        # it does not carry keep their initialisation (seeded DToP heads, a policy from --opt policy_weights).
        part = _method_part(key) + "."
        return not backbone_only and any(k.startswith(part) for k in ckpt)
    if backbone_only and key.startswith("decoder."):
        return False
    if key.startswith("decoder.") and any(k.startswith("method.final_head.") for k in ckpt) and not any(
        k.startswith("decoder.") for k in ckpt
    ):
        return False  # a DToP checkpoint: its final prune head replaces the SegViT decoder, which stays unused
    if layout != "native" and not key.startswith(("backbone.", "decoder.")):
        return False
    return True


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: PathOrStateDict,
    layout: str = "auto",
    backbone_only: bool = False,
    pos_grid: Optional[tuple[int, int]] = None,
    name: Optional[str] = None,
) -> LoadReport:
    """Load a checkpoint file (or an in-memory checkpoint dict) into `model`, converting its layout.

    Raises one CheckpointError listing missing, unexpected and shape-mismatched keys if the checkpoint does not fit;
    the model is left untouched in that case. With backbone_only, the decoder (and any method parameters) keep their
    initialisation and the checkpoint's other keys are ignored. `name` labels an in-memory dict in messages.
    """
    name = name or _describe(path_or_state_dict)
    sd, layout = _read_with_layout(path_or_state_dict, layout, name)
    conv = _convert(sd, layout, model, backbone_only, pos_grid, name)
    ckpt = conv.state_dict

    own = model.state_dict()
    missing = [k for k in own if k not in ckpt and _required(k, layout, backbone_only, ckpt)]
    unexpected = [k for k in ckpt if k not in own]
    mismatched = [k for k in own if k in ckpt and tuple(ckpt[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {_count(missing, 'key')} ({_first(missing)})")
        if unexpected:
            parts.append(f"unexpected {_count(unexpected, 'key')} ({_first(unexpected)})")
        if mismatched:
            shown = [f"{k}: checkpoint {_shape(ckpt[k])} vs model {_shape(own[k])}" for k in mismatched[:_SHOW]]
            parts.append(f"shape mismatch {len(mismatched)} ({', '.join(shown)}{', ...' if len(mismatched) > _SHOW else ''})")
        msg = f"checkpoint {name} ({layout} layout) does not match {_model_label(model)}: " + ", ".join(parts)
        hint = _mismatch_hint(ckpt, own, model, missing, backbone_only)
        raise CheckpointError(msg + (f"; {hint}" if hint else ""))

    kept_init = [k for k in own if k not in ckpt]
    model.load_state_dict(ckpt, strict=not kept_init)
    report = LoadReport(layout=layout, loaded=len(ckpt), ignored=conv.ignored, kept_init=kept_init)
    if conv.resize is not None:
        report.resized_pos_embed = True
        report.pos_grid_from, report.pos_grid_to, report.pos_mode = conv.resize
    return report


# ----------------------------------------------------------------------------------------------- writing


def to_layout(model: nn.Module, layout: str) -> dict[str, Any]:
    """`model`'s weights as a checkpoint dict in `layout`, ready for torch.save (the inverse of load_checkpoint).

    native -> the state dict; timm -> bare timm backbone keys (with a zero 1000-class ``head``) plus ``decoder.*``;
    segmenter -> ``{"model": {encoder.*, encoder.head.* (zeros), decoder.*}, "n_cls": K}``;
    mmseg -> ``{"state_dict": {backbone.* (mmseg names), decode_head.*, loss buffer for ATM heads}, "meta": {}}``.
    Parameters outside ``backbone.``/``decoder.`` (method modules) are written for native only.
    """
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if layout == "native":
        return own
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint layout '{layout}'; use one of {', '.join(LAYOUTS)}")
    backbone = {k[len("backbone.") :]: v for k, v in own.items() if k.startswith("backbone.")}
    decoder = {k[len("decoder.") :]: v for k, v in own.items() if k.startswith("decoder.")}
    dim = backbone["cls_token"].shape[-1]
    dtype = backbone["cls_token"].dtype
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        num_classes = _num_classes(own)

    classifiers = ("head", "head_dist") if "dist_token" in backbone else ("head",)  # DeiT: a second classifier
    if layout == "timm":
        sd = dict(backbone)
        for head in classifiers:
            sd[f"{head}.weight"] = torch.zeros(IMAGENET_CLASSES, dim, dtype=dtype)
            sd[f"{head}.bias"] = torch.zeros(IMAGENET_CLASSES, dtype=dtype)
        sd.update({"decoder." + k: v for k, v in decoder.items()})
        return sd
    if layout == "segmenter":
        sd = {"encoder." + k: v for k, v in backbone.items()}
        for head in classifiers:
            sd[f"encoder.{head}.weight"] = torch.zeros(IMAGENET_CLASSES, dim, dtype=dtype)
            sd[f"encoder.{head}.bias"] = torch.zeros(IMAGENET_CLASSES, dtype=dtype)
        sd.update({"decoder." + k: v for k, v in decoder.items()})
        return {"model": sd, "n_cls": num_classes}
    sd = {"backbone." + _rename(k, _TIMM_TO_MMSEG): v for k, v in backbone.items()}
    sd.update({"decode_head." + k: v for k, v in decoder.items()})
    if "class_embed.weight" in decoder:  # ATM head: SegViT files carry the loss's class weights as a buffer
        empty_weight = torch.ones(decoder["class_embed.weight"].shape[0], dtype=dtype)
        empty_weight[-1] = EMPTY_WEIGHT_NO_OBJECT
        sd["decode_head.loss_decode.criterion.empty_weight"] = empty_weight
    return {"state_dict": sd, "meta": {}}


__all__ = [
    "LAYOUTS", "CheckpointError", "LoadReport", "detect_layout", "read_state_dict", "convert_state_dict",
    "load_checkpoint", "to_layout", "checkpoint_num_classes", "has_prune_heads",
]
