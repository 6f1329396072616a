"""Segmenter: ViT encoder + decoder, with a token-reduction method at fixed hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from algm.config import DecoderConfig, ViTConfig
from algm.model.decoder import LinearDecoder, MaskTransformer
from algm.model.vit import Stage, ViTEncoder, run_stage
from algm.reduction import NoReduction, TokenReduction, TokenState


@dataclass(frozen=True)
class SegmenterOutput:
    """logits: (B, n_cls, H, W) at input resolution (channels-last in memory, see
    :func:`upsample_patch_logits`); tokens: (B, depth) tokens alive
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
        """The same encoder/decoder (shared, not copied) driven by another method, in
        this model's train / eval mode."""
        return Segmenter(self.encoder, self.decoder, method).train(self.training)

    def run(self, images: Tensor, labels: Tensor | None = None, stage: Stage = run_stage) -> SegmenterOutput:
        """images: (B, 3, H, W) normalised; labels: optional (B, H, W) for oracle policies.

        ``stage`` runs every piece of the forward (see :data:`algm.model.vit.Stage`)."""
        state, tokens = self.encoder(images, self.method, labels, stage)
        per_patch = self.patch_logits(state, stage)
        logits = stage("upsample", None, upsample_patch_logits, per_patch, state.grid, tuple(images.shape[-2:]))
        return SegmenterOutput(logits=logits, tokens=tokens, token_logits=per_patch)

    def patch_logits(self, state: TokenState, stage: Stage = run_stage) -> Tensor:
        """Final encoder state (x: (B, T, D), prefix tokens first) -> (B, N, n_cls) per
        grid patch: the method's ``before_decoder``, the decoder on the patch tokens
        (their ``keep`` masks padding), then the method's ``restore`` to the patch grid."""
        state = stage("before_decoder", None, self.method.before_decoder, state)
        token_out = stage("decoder", None, self.decoder, state.patches, state.patch_keep)
        return stage("restore", None, self.method.restore, token_out, state)

    def decode(self, state: TokenState, size: tuple[int, int]) -> Tensor:
        """Logits (B, n_cls, *size) from a final encoder state, as :meth:`run` computes them
        (head training decodes cached states with it)."""
        return upsample_patch_logits(self.patch_logits(state), state.grid, size)

    def forward(self, images: Tensor) -> Tensor:
        return self.run(images).logits


def upsample_patch_logits(per_patch: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(B, N, n_cls) per patch of the (h, w) ``grid`` -> (B, n_cls, *size), bilinear.

    The result is channels-last in memory (strides (H W n_cls, 1, W n_cls, n_cls)).
    ``per_patch`` already is: viewed as (B, h, w, n_cls) and permuted, it is a true
    channels-last (B, n_cls, h, w) tensor, and ``F.interpolate`` runs its vectorised
    channels-last kernel without a copy. (``transpose(1, 2).reshape`` gives the same
    strides except a batch stride of n_cls at B = 1, which PyTorch does not take for
    channels-last: measured 7x slower at 150 x 512 x 512; a contiguous NCHW copy is about
    2x slower than channels-last at B = 1 and B = 4.)
    """
    h, w = grid
    masks = per_patch.reshape(per_patch.shape[0], h, w, per_patch.shape[-1]).permute(0, 3, 1, 2)
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)


def build_segmenter(backbone: ViTConfig, n_cls: int, decoder: DecoderConfig = DecoderConfig(),
                    method: TokenReduction | None = None) -> Segmenter:
    """A randomly initialised Segmenter; load weights with ``algm.weights``."""
    encoder = ViTEncoder(backbone)
    if decoder.name == "mask":
        eps = backbone.norm_eps if decoder.norm_eps is None else decoder.norm_eps
        dec = MaskTransformer(n_cls, backbone.embed_dim, decoder.n_layers, eps)
    else:
        dec = LinearDecoder(n_cls, backbone.embed_dim)
    return Segmenter(encoder, dec, method)
