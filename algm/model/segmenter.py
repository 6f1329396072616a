"""Segmenter: ViT encoder + decoder, with a token-reduction method at fixed hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from algm.config import DecoderConfig, ViTConfig
from algm.model.decoder import LinearDecoder, MaskTransformer
from algm.model.vit import ViTEncoder
from algm.reduction import NoReduction, TokenReduction


@dataclass(frozen=True)
class SegmenterOutput:
    """logits: (B, n_cls, H, W) at input resolution; tokens: (B, depth) tokens alive
    after each encoder block (cls included); token_logits: (B, N, n_cls) per patch."""

    logits: Tensor
    tokens: Tensor
    token_logits: Tensor


class Segmenter(nn.Module):
    """``forward(images) -> logits``; ``run`` also returns token statistics.

    The method is a submodule (``self.method``) so its parameters move with the model;
    swap it with :meth:`with_method` without touching encoder or decoder weights.
    """

    def __init__(self, encoder: ViTEncoder, decoder: nn.Module, method: TokenReduction | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.method = method if method is not None else NoReduction()

    @property
    def n_cls(self) -> int:
        return self.decoder.n_cls

    @property
    def patch_size(self) -> int:
        return self.encoder.cfg.patch_size

    def with_method(self, method: TokenReduction) -> "Segmenter":
        """The same encoder/decoder (shared, not copied) driven by another method."""
        return Segmenter(self.encoder, self.decoder, method)

    def run(self, images: Tensor, labels: Tensor | None = None) -> SegmenterOutput:
        """images: (B, 3, H, W) normalised; labels: optional (B, H, W) for oracle policies."""
        state, tokens = self.encoder(images, self.method, labels)
        keep = None if state.keep is None else state.keep[:, 1:]
        token_out = self.decoder(state.x[:, 1:], keep)
        per_patch = self.method.restore(token_out, state)
        h, w = state.grid
        masks = per_patch.transpose(1, 2).reshape(per_patch.shape[0], -1, h, w)
        logits = F.interpolate(masks, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return SegmenterOutput(logits=logits, tokens=tokens, token_logits=per_patch)

    def forward(self, images: Tensor) -> Tensor:
        return self.run(images).logits


def build_segmenter(backbone: ViTConfig, n_cls: int, decoder: DecoderConfig = DecoderConfig(),
                    method: TokenReduction | None = None) -> Segmenter:
    """A randomly initialised Segmenter; load weights with ``algm.weights``."""
    encoder = ViTEncoder(backbone)
    if decoder.name == "mask":
        dec = MaskTransformer(n_cls, backbone.embed_dim, decoder.n_layers, backbone.norm_eps)
    else:
        dec = LinearDecoder(n_cls, backbone.embed_dim)
    return Segmenter(encoder, dec, method)
