"""Index-map bookkeeping shared by the merging methods (ALGM, ToMe).

A merging step is described by one integer map instead of a dense matrix::

    dest: (B, T) long, for every current token (cls at 0) the index of the token it
          becomes, in 0 .. length-1, or ``length`` (a "trash" slot) for padding
          tokens that carry no patch. ``dest[:, 0] == 0`` (cls stays first).

Several tokens with the same ``dest`` are merged (size-weighted mean); a token alone
in its slot is carried over. Composing maps is one gather (``compose_source``), so a
whole chain of merges restores the patch grid in O(N) memory.

Padding (per-image merging): images of a batch may keep different numbers of tokens.
Image b then holds ``lengths[b]`` real tokens at the front of the sequence and padding
behind them; ``keep_mask(lengths, T)`` marks the real ones (None when nothing is
padded, so the unpadded path stays mask-free and bit-identical).
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_by_index(x: Tensor, size: Tensor, dest: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of tokens that share a destination.

    x: (B, T, D); size: (B, T) patches per token (0 for padding); dest: (B, T) long in
    [0, length] (``length`` = trash slot, dropped). Returns x' (B, length, D) with
    ``x'[b, j] = sum(x * size) / sum(size)`` over the tokens with ``dest == j`` and
    size' (B, length) with the summed sizes. Slots that receive nothing (padding)
    come out as zeros with size 0.
    """
    b, t, d = x.shape
    slots = length + 1
    offset = torch.arange(b, device=dest.device).unsqueeze(1) * slots
    flat = (dest + offset).reshape(-1)
    weighted = (x * size.unsqueeze(-1)).reshape(b * t, d)
    acc = weighted.new_zeros(b * slots, d).index_add_(0, flat, weighted)
    total = size.new_zeros(b * slots).index_add_(0, flat, size.reshape(-1))
    total = total.reshape(b, slots)[:, :length]
    acc = acc.reshape(b, slots, d)[:, :length]
    denom = torch.where(total > 0, total, torch.ones_like(total))
    return (acc / denom.unsqueeze(-1)).to(x.dtype), total


def compose_source(source: Tensor, dest: Tensor) -> Tensor:
    """New patch -> token map after a merge step.

    source: (B, N) indices among patch tokens (token index - 1); dest: (B, T) token
    map of the step (cls at 0). Returns (B, N) indices among the new patch tokens.
    """
    return dest[:, 1:].gather(1, source) - 1


def keep_mask(lengths: Tensor, length: int) -> Tensor | None:
    """(B,) real-token counts -> (B, length) bool mask, or None if none is padded."""
    if bool((lengths == length).all()):
        return None
    return torch.arange(length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def token_lengths(keep: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """(B,) real tokens per image (cls included) from a front-packed keep mask."""
    if keep is None:
        return torch.full((batch,), length, dtype=torch.long, device=device)
    return keep.sum(1)
