"""The attainable speed-up: what the same GFLOPs cut gains when it costs nothing.

A method's speed-up / GFLOPs ratio falls short of 1 for three reasons: the fixed stages
(:func:`~algm.measure.breakdown.speedup_bound`), the method's own steps, and the
hardware running fewer tokens less efficiently per FLOP (on CPU, smaller GEMMs and the
fused attention kernel's smaller query blocks below 768 tokens). The third is not the
method's doing. To measure it, :class:`ZeroCostReduction` keeps ``k`` evenly spread
patch tokens from the first block on, with no merging step, and
:func:`matched_tokens` picks the ``k`` whose GFLOPs match the method's: timed beside
the method and the baseline, its speed-up is what a cut to those GFLOPs attains on
that machine when it costs nothing, with the same fixed stages (patch embed, restore,
upsample). A method near it wastes nothing. (A method keeps more tokens in its first
blocks than in its last, so it may land slightly above or below it.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from algm.measure.flops import count_flops
from algm.model.segmenter import Segmenter
from algm.reduction import EncoderContext, TokenReduction, TokenState


class ZeroCostReduction(TokenReduction):
    """Keeps ``k`` of the N patch tokens, evenly spread in raster order, from the first
    block on; every patch is restored from the kept token at or before it. Only for
    timing: it has no method's cost and no method's accuracy (and no registry entry)."""

    name = "zero-cost"

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"ZeroCostReduction keeps at least 1 token, got {k}")
        self.k = k

    def settings(self) -> dict:
        return {"k": self.k}

    def begin(self, patches: Tensor, ctx: EncoderContext) -> TokenState:
        """patches: (B, N, D) -> state of (B, k, D) tokens (k capped at N)."""
        b, n, _ = patches.shape
        k = min(self.k, n)
        kept = torch.div(torch.arange(k, device=patches.device) * n, k, rounding_mode="floor")
        source = torch.searchsorted(kept, torch.arange(n, device=patches.device), right=True) - 1
        size = torch.bincount(source, minlength=k).to(patches.dtype)
        return TokenState(x=patches[:, kept], size=size.expand(b, k), source=source.expand(b, n), grid=ctx.grid,
                          prefix=0)


def matched_tokens(model: Segmenter, images: Tensor, gflops: float) -> int:
    """The largest ``k`` whose :class:`ZeroCostReduction` costs at most ``gflops`` per
    image of ``images`` (B, 3, H, W) on ``model``'s encoder and decoder (at least 1).
    Counted on the batch itself, as the method's figure is: work done once per forward
    (a position-embedding resize) is shared by its images. The count does not depend on
    the images' content. fvcore, bisected: about log2(N) counts."""
    n = images.shape[-2] * images.shape[-1] // model.patch_size ** 2
    limit = gflops * (1 + 1e-9)  # the same count, divided by B, may round either way
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_flops(model.with_method(ZeroCostReduction(mid)), images) / images.shape[0] <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo
