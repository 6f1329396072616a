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

Host syncs: nothing here reads a tensor on the host except ``keep_mask`` when the
caller does not say whether the batch is padded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algm.reduction import TokenState


def merge_by_index(x: Tensor, size: Tensor, dest: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of tokens that share a destination.

    x: (B, T, D); size: (B, T) patches per token (0 for padding); dest: (B, T) long in
    [0, length] (``length`` = trash slot, dropped). Returns x' (B, length, D) with
    ``x'[b, j] = sum(x * size) / sum(size)`` over the tokens with ``dest == j`` and
    size' (B, length) with the summed sizes. Slots that receive nothing (padding)
    come out as zeros with size 0.
    """
    b, t, d = x.shape
    # real slots b * length + j, one shared trash row behind them: the result is a
    # contiguous view and the division can run in place (one (B, T, D) buffer less)
    trash = b * length
    offset = torch.arange(b, device=dest.device).unsqueeze(1) * length
    flat = torch.where(dest < length, dest + offset, trash).reshape(-1)
    weighted = (x * size.unsqueeze(-1)).reshape(b * t, d)
    acc = weighted.new_zeros(trash + 1, d).index_add_(0, flat, weighted)
    total = size.new_zeros(trash + 1).index_add_(0, flat, size.reshape(-1))[:trash].view(b, length)
    denom = torch.where(total > 0, total, torch.ones_like(total))
    return acc[:trash].view(b, length, d).div_(denom.unsqueeze(-1)).to(x.dtype), total


def compose_source(source: Tensor, dest: Tensor) -> Tensor:
    """New patch -> token map after a merge step.

    source: (B, N) indices among patch tokens (token index - 1); dest: (B, T) token
    map of the step (cls at 0). Returns (B, N) indices among the new patch tokens.
    """
    return dest[:, 1:].gather(1, source) - 1


def apply_token_map(state: TokenState, dest: Tensor, length: int, keep: Tensor | None = None
                    ) -> TokenState:
    """One merge step on a state: x and size merged by :func:`merge_by_index`, source
    composed with ``dest`` (B, T), ``length`` tokens out (cls included), ``keep`` the
    new (B, length) mask or None when nothing is padded."""
    x, size = merge_by_index(state.x, state.size, dest, length)
    return state.replace(x=x, size=size, source=compose_source(state.source, dest), keep=keep)


def keep_mask(lengths: Tensor, length: int, padded: bool | None = None) -> Tensor | None:
    """(B,) real-token counts -> (B, length) bool mask, or None if none is padded.

    padded: whether some image is shorter than ``length``, when the caller already
    knows it (from the host sync that sized ``length``); None reads it off ``lengths``,
    one more host sync.
    """
    if padded is None:
        padded = not bool((lengths == length).all())
    if not padded:
        return None
    return torch.arange(length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def inverse_permutation(order: Tensor) -> Tensor:
    """(B, T) long permutations -> their inverses: ``out[b, order[b, i]] = i``, i.e. the
    rank of every element in the order (one scatter, no sort)."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)
