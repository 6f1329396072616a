"""Bipartite merging: ALGM's global stage (GBM) and ToMe's matching, SPEC sections 2, 3.

Follows the authors' ``turbo_matching`` (tue-mps/algm-segmenter,
``algm/algm/global_merge.py``), itself ToMe's ``bipartite_soft_matching`` with an
adaptive r:

* metric = hidden state x, L2-normalised; ``a = x[:, 0::2]`` (cls is a[0], never
  merged), ``b = x[:, 1::2]``; ``node_max, node_idx = (a @ b^T).max(-1)``;
* ``thr = mean_b(mean_j node_max[b, 1:]) + mean_b(std_j node_max[b, 1:]) / g`` (g the
  1-based block index, unbiased std) and ``r = min_b #(node_max >= thr)`` (authors,
  ``pooled``); per image: ``thr_b = mean_j + std_j / g`` and ``r_b`` its own count;
* the r a-tokens with the highest node_max merge into their best b partner (several
  may share one), size-weighted; output ``[unmerged a (original order), all b]``.

ToMe (:mod:`baselines.tome`) reuses :func:`bipartite_scores` (on the mean attention
keys; cls protected), :func:`bipartite_plan` with an int r (exactly r merges in every
image, no padding, no host sync) and :func:`algm.merging.index_map.apply_token_map`
(size-weighted ``merge_by_index``, ``compose_source``); the sizes it returns feed
ToMe's proportional attention. The adaptive threshold, :func:`bipartite_merge` and
:func:`global_merge` are ALGM's only.

Ties at the r-th best node_max go to the lower a-index (a stable descending order),
for ALGM and ToMe alike.

Padded batches (per-image merging): image b holds ``lengths[b]`` real tokens at the
front. Padding never takes part: its b-columns score -inf, its a-rows are never
candidates, and it is excluded from the threshold statistics.

Host syncs: one per ALGM step (:func:`bipartite_merge` reads r's maximum and the
shortest / longest new length at once: whether to merge at all, the size of the
output, whether it is padded); none in a ToMe step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from algm.merging.index_map import apply_token_map, ragged
from algm.reduction import TokenState


def bipartite_scores(metric: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best b partner of every a-token.

    metric: (B, T, D), cls at 0; lengths: (B,) real tokens per image or None (all).
    Returns node_max (B, ceil(T/2)) cosine similarity to the best b-token, -inf for
    cls and for padding rows, and node_idx (B, ceil(T/2)) that b-token's index in
    ``metric[:, 1::2]``.
    """
    with torch.no_grad():  # selection is not differentiable (authors: same)
        metric = F.normalize(metric, dim=-1)
        a, b = metric[:, 0::2], metric[:, 1::2]
        scores = a @ b.transpose(1, 2)  # (B, Ta, Tb)
        ta, tb = a.shape[1], b.shape[1]
        if lengths is not None:
            scores.masked_fill_(~_odd_positions(tb, lengths).unsqueeze(1), float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        candidate = torch.arange(ta, device=metric.device) >= 1  # cls protected
        candidate = candidate.expand(node_max.shape[0], -1)
        if lengths is not None:
            candidate = candidate & _even_positions(ta, lengths)
        return node_max.masked_fill_(~candidate, float("-inf")), node_idx


def _even_positions(ta: int, lengths: Tensor) -> Tensor:
    """(B, ta) bool: a-token i (sequence position 2i) is a real token."""
    return 2 * torch.arange(ta, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def _odd_positions(tb: int, lengths: Tensor) -> Tensor:
    """(B, tb) bool: b-token j (sequence position 2j + 1) is a real token."""
    return 2 * torch.arange(tb, device=lengths.device).unsqueeze(0) + 1 < lengths.unsqueeze(1)


def adaptive_threshold(node_max: Tensor, g: int, pooled: bool = True) -> Tensor:
    """ALGM's threshold from the finite entries of node_max (cls / padding are -inf).

    node_max: (B, Ta); g: 1-based index of the block. Per image: mean and unbiased std
    of the candidates' node_max. pooled (authors): ``mean_b(mean) + mean_b(std) / g``
    for every image; else ``mean_b + std_b / g``. Returns (B,) float64 (computed in
    float64 so that the count does not depend on padding or summation order). An
    image with fewer than 2 candidates has a NaN threshold, i.e. merges nothing.
    """
    valid = torch.isfinite(node_max)
    vals = torch.where(valid, node_max, torch.zeros_like(node_max)).double()
    n = valid.sum(1).double()
    mean = vals.sum(1) / n
    dev = torch.where(valid, vals - mean.unsqueeze(1), torch.zeros_like(vals))
    std = ((dev * dev).sum(1) / (n - 1)).sqrt()
    if pooled:
        return (mean.mean() + std.mean() / g).expand(node_max.shape[0])
    return mean + std / g


def merge_counts(node_max: Tensor, thr: Tensor) -> Tensor:
    """(B,) long: a-tokens with node_max >= thr (cls and padding are -inf, never)."""
    return (node_max >= thr.unsqueeze(1)).sum(1)


def top_r_mask(node_max: Tensor, r: Tensor | int) -> Tensor:
    """(B, Ta) bool: the r (int) or r[b] (Tensor (B,)) a-tokens with the highest node_max.

    An int r must be >= 1; no r may exceed an image's candidates (finite node_max).
    Ties at the r-th value go to the lower index, as in a stable descending sort. An
    int r takes the r-th value from a top-k of r (no sort of all edges); a per-image r
    sorts the values instead, since a top-k of ``max(r)`` would need a host sync to
    size it.
    """
    if isinstance(r, int):
        kth = node_max.topk(r, dim=1, sorted=False).values.amin(1, keepdim=True)
    else:
        r = r.unsqueeze(1)
        ranked = node_max.sort(dim=1, descending=True).values
        kth = ranked.gather(1, (r - 1).clamp(min=0)).masked_fill(r == 0, float("inf"))
    above = node_max > kth
    tied = node_max == kth
    return above | (tied & (tied.cumsum(1) <= r - above.sum(1, keepdim=True)))


def bipartite_plan(node_max: Tensor, node_idx: Tensor, r: Tensor | int, lengths: Tensor | None,
                   t: int) -> tuple[Tensor, Tensor]:
    """Token map of one bipartite merge with r (int) or r[b] (Tensor) merges in image b.

    node_max, node_idx: (B, Ta) from :func:`bipartite_scores`; r: a Tensor (B,) long is
    capped at each image's candidates, an int must not exceed them; lengths: (B,) real
    tokens, or None when nothing is padded; t: T. The best r a-tokens
    (:func:`top_r_mask`) merge into their b partner. Returns ``dest`` (B, T) long (new
    order ``[unmerged a, b]``, padding -> trash slot ``max(new_lengths)``) and
    ``new_lengths`` (B,) = lengths - r.
    """
    ta = node_max.shape[1]
    tb = t // 2
    device = node_max.device
    if not isinstance(r, int):
        r = torch.minimum(r, torch.isfinite(node_max).sum(1))
    src = top_r_mask(node_max, r)
    unm = ~src if lengths is None else _even_positions(ta, lengths) & ~src
    n_unm = unm.sum(1, keepdim=True)
    dest_b = n_unm + torch.arange(tb, device=device)
    dest_a = torch.where(src, dest_b.gather(1, node_idx.clamp(max=max(tb - 1, 0))),
                         unm.long().cumsum(1) - 1)
    if lengths is None:
        new_lengths = (n_unm + tb).squeeze(1)
    else:
        new_lengths = lengths - r
        trash = new_lengths.max()  # a 0-dim tensor: no host sync
        dest_a = torch.where(_even_positions(ta, lengths), dest_a, trash)
        dest_b = torch.where(_odd_positions(tb, lengths), dest_b, trash)
    dest = torch.empty(node_max.shape[0], t, dtype=torch.long, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = dest_b
    return dest, new_lengths


def bipartite_merge(state: TokenState, node_max: Tensor, node_idx: Tensor, r: Tensor) -> TokenState:
    """Merge r[b] tokens of image b (size-weighted); state unchanged if r is all 0.

    Returns the new state: x (B, T', D), size, source composed with the step, keep
    set when the images end with different lengths (front-packed, padding has x 0 and
    size 0).
    """
    t = state.num_tokens
    lengths = None if state.keep is None else state.keep.sum(1)
    dest, new_lengths = bipartite_plan(node_max, node_idx, r, lengths, t)
    longest, keep, most = ragged(new_lengths, r.max())  # the step's one host sync
    if most <= 0:
        return state
    return apply_token_map(state, dest, longest, keep)


def global_merge(state: TokenState, g: int, per_image: bool = False) -> TokenState:
    """ALGM's global stage on state.x at the block with 1-based index g.

    per_image=False: authors (pooled threshold, ``r = min_b count``); True: each image
    its own threshold and count (identical to running the images one at a time).
    """
    bsz, t, _ = state.x.shape
    if (t - 1) // 2 <= 0:  # authors: nothing to match
        return state
    lengths = None if state.keep is None else state.keep.sum(1)
    node_max, node_idx = bipartite_scores(state.x, lengths)
    thr = adaptive_threshold(node_max, g, pooled=not per_image)
    r = merge_counts(node_max, thr)
    if not per_image:
        r = r.min().expand(bsz)
    return bipartite_merge(state, node_max, node_idx, r)
