"""Segmentation decoders: Segmenter linear, Segmenter mask transformer, SegViT ATM head.

Each decoder maps patch features on the full grid to per-pixel logits (B, K, H, W). Parameter names are the
official ones (rstrudel/segmenter, SegViT in mmseg's layout) so checkpoints load by prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from staticprune.models.vit import Block, LayerNorm


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) row-major tokens -> (B, C, gh, gw)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


class LinearDecoder(nn.Module):
    """Segmenter `DecoderLinear`: one Linear per patch, then x16 bilinear upsampling."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, feats: list[Tensor], grid: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        return upsample(tokens_to_map(self.head(feats[-1]), grid), out_size)


class MaskTransformer(nn.Module):
    """Segmenter mask transformer: joint attention over patches and class embeddings, cosine masks."""

    def __init__(self, dim: int, num_classes: int, n_layers: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(dim, dim)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, dim // 64, 4, ln_eps=1e-5) for _ in range(n_layers))
        self.decoder_norm = LayerNorm(dim, eps=1e-5)
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.mask_norm = LayerNorm(num_classes, eps=1e-5)

    def forward(self, feats: list[Tensor], grid: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        x = self.proj_dec(feats[-1])
        n = x.shape[1]
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = x[:, :n] @ self.proj_patch
        classes = x[:, n:] @ self.proj_classes
        # The official code divides by the norm with no epsilon; so do we, for bit parity.
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return upsample(tokens_to_map(masks, grid), out_size)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj) as explicit matmuls, batch first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        hd = d // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q = q * hd**-0.5  # nn.MultiheadAttention scales q before the product
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class CrossAttention(nn.Module):
    """ATM cross-attention: also returns the head-mean of the scaled pre-softmax logits (the mask)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        b, nq, d = query.shape
        nk = memory.shape[1]
        hd = d // self.heads
        q = self.q(query).reshape(b, nq, self.heads, hd).transpose(1, 2)
        k = self.k(memory).reshape(b, nk, self.heads, hd).transpose(1, 2)
        v = self.v(memory).reshape(b, nk, self.heads, hd).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, d)
        return self.proj(out), logits.mean(dim=1)


class ATMLayer(nn.Module):
    """Post-norm transformer decoder layer with ReLU FFN (nn.TransformerDecoderLayer names)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.multihead_attn = CrossAttention(dim, heads)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.norm3 = LayerNorm(dim, eps=1e-5)

    def forward(self, query: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        query = self.norm1(query + self.self_attn(query))
        out, attn_logits = self.multihead_attn(query, memory)
        query = self.norm2(query + out)
        query = self.norm3(query + self.linear2(F.relu(self.linear1(query))))
        return query, attn_logits


class ATMDecoder(nn.Module):
    def __init__(self, dim: int, heads: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(ATMLayer(dim, heads) for _ in range(n_layers))

    def forward(self, query: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        attn_logits = query.new_zeros(())
        for layer in self.layers:
            query, attn_logits = layer(query, memory)
        return query, attn_logits  # masks of the last layer only, as the official head


class ATMHead(nn.Module):
    """SegViT Attention-to-Mask head: chained class queries over stages fed deepest-first."""

    def __init__(self, in_dim: int, num_classes: int, dim: int, heads: int, stages: int = 3, n_layers: int = 3):
        super().__init__()
        self.stages = stages
        self.num_classes = num_classes
        for s in range(1, stages + 1):
            self.add_module(f"input_proj_{s}", nn.Linear(in_dim, dim))
            self.add_module(f"proj_norm_{s}", LayerNorm(dim, eps=1e-5))
            self.add_module(f"decoder_{s}", ATMDecoder(dim, heads, n_layers))
        self.q = nn.Embedding(num_classes, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)

    def forward(self, feats: list[Tensor], grid: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        feats = feats[-self.stages :][::-1]  # stage 1 reads the deepest features
        query = self.q.weight.unsqueeze(0).expand(feats[0].shape[0], -1, -1)
        mask_logits = None
        for s, feat in enumerate(feats, start=1):
            memory = getattr(self, f"proj_norm_{s}")(getattr(self, f"input_proj_{s}")(feat))
            query, attn_logits = getattr(self, f"decoder_{s}")(query, memory)
            mask_logits = attn_logits if mask_logits is None else mask_logits + attn_logits
        class_prob = self.class_embed(query).softmax(-1)[..., : self.num_classes]  # (B, Q, K)
        masks = upsample(tokens_to_map(mask_logits.transpose(1, 2), grid), out_size).sigmoid()  # (B, Q, H, W)
        b, q, h, w = masks.shape
        seg = class_prob.transpose(1, 2) @ masks.reshape(b, q, h * w)  # sum over queries
        return seg.reshape(b, self.num_classes, h, w)
