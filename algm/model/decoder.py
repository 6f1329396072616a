"""Segmenter decoders: mask transformer and linear (SPEC section 1).

Both map patch tokens (B, T, D) to per-token class scores (B, T, n_cls); the segmenter
restores them to the patch grid. Key names follow Segmenter's checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from algm.model.vit import Block, _init_weights
from algm.reduction import padding_bias


class MaskTransformer(nn.Module):
    """Joint attention over patch tokens and ``n_cls`` learned class embeddings."""

    def __init__(self, n_cls: int, d_encoder: int, n_layers: int = 2, norm_eps: float = 1e-5):
        super().__init__()
        d = d_encoder
        self.n_cls = n_cls
        self.scale = d ** -0.5
        self.proj_dec = nn.Linear(d_encoder, d)
        self.cls_emb = nn.Parameter(torch.zeros(1, n_cls, d))
        self.blocks = nn.ModuleList(Block(d, max(d // 64, 1), 4.0, norm_eps) for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(d, eps=norm_eps)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d, d))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d, d))
        self.mask_norm = nn.LayerNorm(n_cls, eps=norm_eps)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x: (B, T, D) patch tokens; keep: (B, T) bool or None. Returns (B, T, n_cls)."""
        b, t, _ = x.shape
        x = torch.cat([self.proj_dec(x), self.cls_emb.expand(b, -1, -1)], 1)
        if keep is not None:
            keep = torch.cat([keep, keep.new_ones(b, self.n_cls)], 1)
        bias = padding_bias(keep, x.dtype)
        for blk in self.blocks:
            x = blk(x, bias)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :t] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, t:] @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


class LinearDecoder(nn.Module):
    """One linear layer per token."""

    def __init__(self, n_cls: int, d_encoder: int):
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(d_encoder, n_cls)
        self.apply(_init_weights)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, n_cls); ``keep`` is unused (tokens are independent)."""
        return self.head(x)
