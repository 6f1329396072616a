"""Index-map bookkeeping shared by the token-reduction methods (the shared token kernels).

A merging step is described by one integer map instead of a dense matrix::

    dest: (B, T) long, for every current token (cls at 0) the index of the token it
          becomes, in 0 .. length-1, or ``length`` (a "trash" slot) for padding
          tokens that carry no patch. ``dest[:, 0] == 0`` (cls stays first).

Several tokens with the same ``dest`` are merged (size-weighted mean); a token alone
in its slot is carried over. Composing maps is one gather (``compose_source``), so a
whole chain of merges restores the patch grid in O(N) memory.

Padding (per-image counts): images of a batch may keep different numbers of tokens.
Image b then holds ``lengths[b]`` real tokens at the front of the sequence and padding
behind them; ``ragged(lengths)`` gives the padded length and the mask that marks the
real ones (None when nothing is padded, so the unpadded path stays mask-free and
bit-identical). ``pack_tokens`` drops tokens that way (pruning, keep-top-k methods).

Host syncs: nothing here reads a tensor on the host except ``ragged`` (one read of the
counts' range) and ``keep_mask`` when the caller does not say whether the batch is padded.
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


def compose_source(source: Tensor, dest: Tensor, prefix: int = 1) -> Tensor:
    """New patch -> token map after a merge step.

    source: (B, N) indices among patch tokens (token index - prefix); dest: (B, T) token
    map of the step (the ``prefix`` tokens map to themselves). Returns (B, N) indices
    among the new patch tokens.
    """
    return dest[:, prefix:].gather(1, source) - prefix


def apply_token_map(state: TokenState, dest: Tensor, length: int, keep: Tensor | None = None
                    ) -> TokenState:
    """One merge step on a state: x and size merged by :func:`merge_by_index`, source
    composed with ``dest`` (B, T), ``length`` tokens out (prefix included), ``keep`` the
    new (B, length) mask or None when nothing is padded."""
    x, size = merge_by_index(state.x, state.size, dest, length)
    return state.replace(x=x, size=size, source=compose_source(state.source, dest, state.prefix), keep=keep)


def ragged(lengths: Tensor, *also: Tensor) -> tuple:
    """Per-image token counts -> the padded length and the keep mask.

    lengths: (B,) long, real tokens of every image (prefix included). Returns the batch
    maximum and :func:`keep_mask` at it (None when every image has that many), then the
    values of ``also``, 0-dim long tensors the step needs on the host too (e.g. whether
    anything merges), read in the same transfer: the one host sync of a step whose
    counts differ per image."""
    shortest, longest, *rest = torch.stack([lengths.min(), lengths.max(), *also]).tolist()
    return (longest, keep_mask(lengths, longest, shortest < longest), *rest)


def pack_tokens(state: TokenState, survive: Tensor, span: tuple[int, int] | None = None
                ) -> tuple[TokenState, Tensor]:
    """Drop tokens: every image keeps its surviving patch tokens, in their order, at the
    front of the patch part; shorter images are padded behind (``keep`` False, size 0).

    survive: (B, T - prefix) bool over the patch tokens (padding must be False). The
    prefix tokens always stay. span: (fewest, most) surviving patch tokens per image when
    the caller has read them already (no second host sync). Returns the new state (``source`` points at the kept
    tokens; patches whose token was dropped get the placeholder 0, so a caller that
    drops tokens holding patches must say where their output comes from, e.g. in
    ``aux``) and ``dropped`` (B, N) bool, the patches whose token was dropped here.
    """
    p, b = state.prefix, state.x.shape[0]
    counts = survive.sum(1)
    if span is None:
        m, keep = ragged(counts + p)
        m -= p
    else:
        m = span[1]
        keep = keep_mask(counts + p, m + p, span[0] < span[1])
    order = torch.sort((~survive).to(torch.uint8), dim=1, stable=True).indices
    idx = order[:, :m]
    d = state.x.shape[-1]
    x = torch.cat([state.x[:, :p], state.patches.gather(1, idx.unsqueeze(-1).expand(b, m, d))], 1)
    real = torch.arange(m, device=survive.device).expand(b, m) < counts.unsqueeze(1)
    size = torch.cat([state.size[:, :p], state.size[:, p:].gather(1, idx) * real.to(state.size.dtype)], 1)
    dropped = ~survive.gather(1, state.source)
    source = torch.where(dropped, torch.zeros_like(state.source),
                         inverse_permutation(order).gather(1, state.source))
    return state.replace(x=x, size=size, source=source, keep=keep), dropped


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
