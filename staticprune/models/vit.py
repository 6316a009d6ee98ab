"""Plain ViT backbone (timm layout) whose blocks pass a TokenState and expose hook points.

Parameter names follow timm (`patch_embed.proj`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
`norm`), so timm and Segmenter checkpoints map by prefix alone. The backbone knows no method: a method plugs
in through a `TokenHook` that the blocks call between attention and MLP and after each block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.models.token_state import TokenState

PATCH = 16
MASK_NEG = -1e4  # additive key mask for padding slots; finite so that FP16 engines never see -inf


@dataclass(frozen=True)
class ViTConfig:
    dim: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    ln_eps: float = 1e-6
    use_cls_token: bool = True  # False: the CLS parameter exists (checkpoints carry it) but is dropped before block 0
    final_norm: bool = True
    out_indices: tuple[int, ...] = ()  # blocks whose outputs the decoder also needs (SegViT)
    distilled: bool = False  # DeiT-distilled: a second prefix token, `dist_token`, right after the CLS token


VIT_SIZES: dict[str, dict[str, int]] = {
    "t": dict(dim=192, depth=12, heads=3),
    "s": dict(dim=384, depth=12, heads=6),
    "b": dict(dim=768, depth=12, heads=12),
    "l": dict(dim=1024, depth=24, heads=16),
}


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that can export as primitive ops, for TensorRT 8.5 which has no LayerNormalization."""

    decompose: bool = False

    def forward(self, x: Tensor) -> Tensor:
        # In a mixed-precision model the norms keep FP32 weights and normalise FP16 activations in FP32: the
        # variance of a ViT's large-norm tokens overflows FP16 (TensorRT warns about exactly this).
        dtype = x.dtype
        x = x.to(self.weight.dtype)
        if not self.decompose:
            return super().forward(x).to(dtype)
        mean = x.mean(-1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(-1, keepdim=True)
        return (centered / torch.sqrt(var + self.eps) * self.weight + self.bias).to(dtype)


class TokenHook(Protocol):
    """What a token-reduction method implements to plug into the backbone.

    A hook may also define `embed(backbone, img) -> TokenState` to build the initial tokens itself
    (patch-level sharing such as CTS replaces the patch embedding of shared groups).
    """

    def after_attention(self, layer: int, state: TokenState, keys: Tensor) -> TokenState: ...

    def after_block(self, layer: int, state: TokenState) -> TokenState: ...


def attention_bias(size: Optional[Tensor], proportional: bool, dtype: torch.dtype = torch.float32,
                   may_pad: bool = True) -> Optional[Tensor]:
    """(B, 1, 1, T) additive key bias: MASK_NEG on padding slots, log(size) if proportional attention; None when
    there is nothing to add (no sizes, or a sequence without padding slots and without proportional attention).

    Computed from the FP32 sizes, then cast to the attention's dtype (MASK_NEG and log(4096) fit FP16)."""
    if size is None or not (may_pad or proportional):
        return None
    if may_pad:
        bias = torch.where(size > 0, torch.zeros_like(size), torch.full_like(size, MASK_NEG))
        if proportional:
            bias = bias + torch.log(size.clamp(min=1.0))
    else:
        bias = torch.log(size.clamp(min=1.0))
    return bias[:, None, None, :].to(dtype)


# How a (B, 1, 1, T) key bias reaches the attention logits (`Attention.key_bias`, ModelConfig.key_bias):
# "add":     scale * q @ k^T + bias, an elementwise Add over the (B, heads, T, T) logits. TensorRT fuses the pattern
#            MatMul -> scale -> Add -> Softmax -> MatMul into its MHA kernel (head size 64), so the Add is free there.
# "channel": the bias rides in one extra channel: [q * scale, 1] @ [k, bias]^T. Same logits (exact algebra), no
#            (B, heads, T, T) elementwise pass; ONNX Runtime's CPU kernels run the Add as a separate pass over
#            the logits that costs about as much as the Softmax. Head size 65 is not fused by TensorRT's MHA
#            kernels (head size % 8 == 0), so this form is for ONNX Runtime graphs.
KEY_BIAS_FORMS = ("add", "channel")


def check_key_bias_form(form: str) -> str:
    if form not in KEY_BIAS_FORMS:
        raise ValueError(f"key bias form {form!r} is not one of {', '.join(KEY_BIAS_FORMS)}")
    return form


def key_channel_logits(q: Tensor, k: Tensor, bias: Tensor, scale: float) -> Tensor:
    """scale * q @ k^T + bias as one matmul: q (B, H, T, hd), k (B, H, S, hd), bias (B, 1, 1, S) -> (B, H, T, S).

    q is scaled before the product (exact for the head sizes here: scale = 1/8 is a power of two), so that the
    bias column stays in FP16 range (MASK_NEG = -1e4) in a mixed-precision graph."""
    b, h, t, _ = (int(d) for d in q.shape)
    s = int(k.shape[2])
    column = bias.to(k.dtype).reshape(b, 1, s, 1).expand(b, h, s, 1)
    ones = torch.ones_like(q[..., :1])
    return torch.cat([q * scale, ones], -1) @ torch.cat([k, column], -1).transpose(-2, -1)


def set_key_bias_form(model: nn.Module, form: str) -> None:
    """Use `form` ("add" or "channel") in every self-attention of `model` (backbone and decoder blocks)."""
    check_key_bias_form(form)
    for m in model.modules():
        if isinstance(m, Attention):
            m.key_bias = form


def call_hook(step, layer: int, state: TokenState, *tensors: Tensor) -> TokenState:
    """Run a method's step in FP32 and hand its tokens back in the backbone's dtype.

    Token-reduction decisions (similarities, thresholds, ranks, counts, slots) are computed in FP32 even when
    the backbone runs in FP16, through explicit casts: a strongly typed TensorRT network keeps them there. In an
    FP32 model the casts are no-ops and emit nothing.
    """
    dtype = state.x.dtype
    out = step(layer, state.with_x(state.x.float()), *(t.float() for t in tensors))
    return out.with_x(out.x.to(dtype))


class Attention(nn.Module):
    """Multi-head self-attention as explicit matmuls (the pattern TensorRT fuses, and what fvcore counts)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.key_bias = "add"  # how a key bias reaches the logits: KEY_BIAS_FORMS (set_key_bias_form)

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Returns the attention output (B, T, D) and the keys (B, heads, T, head_dim)."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if bias is not None and self.key_bias == "channel":
            logits = key_channel_logits(q, k, bias, self.scale)
        else:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            if bias is not None:
                logits = logits + bias.to(logits.dtype)  # no-op cast unless FP32 biases meet FP16 attention
        out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d)), k


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form, as every ViT checkpoint here was trained with
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with a hook point between attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, ln_eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, heads)
        self.norm2 = LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """Plain block on a tensor (decoders use this)."""
        x = x + self.attn(self.norm1(x), bias)[0]
        return x + self.mlp(self.norm2(x))

    def forward_state(
        self, layer: int, state: TokenState, hook: Optional[TokenHook], proportional: bool
    ) -> TokenState:
        bias = attention_bias(state.size, proportional, state.x.dtype, state.may_pad)
        y, keys = self.attn(self.norm1(state.x), bias)
        state = state.with_x(state.x + y)
        if hook is not None:
            state = call_hook(hook.after_attention, layer, state, keys)
        x = state.x
        return state.with_x(x + self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, img: Tensor) -> Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)  # (B, gh*gw, D), row-major


class VisionTransformer(nn.Module):
    """ViT/16 built for one token grid; the positional table is resized at load time, never in the graph."""

    def __init__(self, cfg: ViTConfig, grid: tuple[int, int]):
        super().__init__()
        self.cfg = cfg
        self.grid = grid
        self.proportional_attention = False  # set by methods that use log(size) attention (ToMe, ALGM)
        d = cfg.dim
        self.patch_embed = PatchEmbed(d)
        if cfg.distilled and not cfg.use_cls_token:
            raise ValueError("a DeiT-distilled backbone keeps its CLS token (use_cls_token=True)")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # DeiT: the distillation token and its positional row follow the CLS token's (timm and Segmenter layout)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.table_prefix + grid[0] * grid[1], d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth))
        self.norm = LayerNorm(d, eps=cfg.ln_eps) if cfg.final_norm else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:  # only here, so ViT models draw the same random weights as before
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def table_prefix(self) -> int:
        """Rows of `pos_embed` before the patch grid: CLS (always stored, also when dropped) and DeiT's dist."""
        return 2 if self.cfg.distilled else 1

    @property
    def num_prefix(self) -> int:
        """Prefix tokens in the sequence, never reduced: CLS (and DeiT's distillation token), or none (SegViT)."""
        return self.table_prefix if self.cfg.use_cls_token else 0

    def embed(self, img: Tensor) -> TokenState:
        gh, gw = img.shape[-2] // PATCH, img.shape[-1] // PATCH
        if (gh, gw) != self.grid:
            raise ValueError(f"input grid {gh}x{gw} does not match the model's {self.grid[0]}x{self.grid[1]}")
        x = self.patch_embed(img) + self.pos_embed[:, self.table_prefix :]
        if self.cfg.use_cls_token:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            prefix = [cls]
            if self.dist_token is not None:
                prefix.append((self.dist_token + self.pos_embed[:, 1:2]).expand(x.shape[0], -1, -1))
            x = torch.cat([*prefix, x], dim=1)
        return TokenState(x=x, num_prefix=self.num_prefix)

    def forward(
        self, img: Tensor, hook: Optional[TokenHook] = None
    ) -> tuple[TokenState, list[TokenState]]:
        """Returns the final state (after `norm` if configured) and the states after `out_indices` blocks."""
        custom_embed = getattr(hook, "embed", None) if hook is not None else None
        # The embedding (patch conv, positions, a method's patch-level sharing) runs in the dtype of the patch
        # conv, FP32 in every model; the blocks then run in theirs (FP16 in a mixed-precision model).
        img = img.to(self.patch_embed.proj.weight.dtype)
        state = custom_embed(self, img) if custom_embed is not None else self.embed(img)
        state = state.with_x(state.x.to(self.blocks[0].attn.qkv.weight.dtype))
        outs: list[TokenState] = []
        for i, block in enumerate(self.blocks):
            state = block.forward_state(i, state, hook, self.proportional_attention)
            if hook is not None:
                state = call_hook(hook.after_block, i, state)
            if i in self.cfg.out_indices:
                outs.append(state)
        if self.norm is not None:
            state = state.with_x(self.norm(state.x))
        return state, outs


def resize_pos_embed(
    pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str = "bilinear", num_prefix: int = 1
) -> Tensor:
    """Resize a (1, prefix + h*w, D) table to another grid; prefix rows kept apart (align_corners=False)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def infer_square_grid(rows: int) -> tuple[int, int]:
    side = int(math.isqrt(rows))
    if side * side != rows:
        raise ValueError(f"positional table with {rows} grid rows is not square; give the checkpoint's grid")
    return side, side
