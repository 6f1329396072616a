"""ALGM's local stage (CLAP: conditional local average pooling), SPEC section 2.

Follows the authors' ``conditional_pooling`` (tue-mps/algm-segmenter,
``algm/algm/local_merge.py``), vectorised over the batch and device-agnostic:

* the (h, w) patch grid is split into non-overlapping 2x2 windows, windows in raster
  order, the 4 tokens of a window in raster order;
* window score = mean cosine similarity of the hidden state over its 6 token pairs;
* a window merges when score >= tau. ``per_image=False`` is the authors' batching:
  ``r = min_b #(score >= tau)`` and every image merges its r best windows;
  ``per_image=True`` lets each image merge all of its own windows >= tau (the batch is
  then padded to the longest image, see :mod:`algm.merging.index_map`);
* a merged window is the plain mean of its 4 tokens, size 4;
* output order ``[cls, merged windows (descending score), unmerged tokens (raster)]``.

Grids: any h x w. The authors assert a square grid with even sides; here an even
h x w grid of any aspect works, and for an odd side the windows tile the largest even
top-left sub-grid while the last row and/or column stay unmerged tokens (they
appear in raster order among the unmerged tokens). A grid with a side of 1 has no
windows and passes unchanged.

Host syncs: one per step (:func:`local_merge` reads the fewest and most merged windows
at once: whether to merge at all, the size of the output, whether it is padded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from algm.merging.index_map import compose_source, inverse_permutation, keep_mask
from algm.reduction import TokenState

_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def window_index(grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """(W, 4) long: the patch indices (raster over the grid) of each 2x2 window.

    Windows are in raster order over the (h // 2, w // 2) window grid; inside a window
    the order is top-left, top-right, bottom-left, bottom-right. With an odd side the
    last row / column belongs to no window.
    """
    h, w = grid
    hh, ww = h // 2, w // 2
    idx = torch.arange(h * w, device=device).reshape(h, w)[: 2 * hh, : 2 * ww]
    return idx.reshape(hh, 2, ww, 2).permute(0, 2, 1, 3).reshape(hh * ww, 4)


def gather_windows(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, D) raster patches -> (B, W, 4, D) window tokens, ``patches[:, window_index]``.

    Done as a reshape/permute copy (no index gather); odd sides are cropped first.
    """
    b, _, d = patches.shape
    h, w = grid
    hh, ww = h // 2, w // 2
    g = patches.reshape(b, h, w, d)[:, : 2 * hh, : 2 * ww]
    return g.reshape(b, hh, 2, ww, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hh * ww, 4, d)


def window_scores(xw: Tensor) -> Tensor:
    """Mean pairwise cosine similarity inside each window.

    xw: (B, W, 4, D) window tokens (:func:`gather_windows`). Returns (B, W). Uses
    ``sum_{i<j} u_i.u_j = (|sum_i u_i|^2 - sum_i |u_i|^2) / 2`` for the normalised
    tokens u (one pass instead of six pair products).
    """
    with torch.no_grad():  # selection is not differentiable (authors: same)
        u = F.normalize(xw, dim=-1)
        s = u.sum(2)
        pairs = (s * s).sum(-1) - (u * u).sum((-1, -2))
        return pairs / (2 * len(_PAIRS))


def select_windows(scores: Tensor, tau: float, per_image: bool) -> Tensor:
    """(B, W) scores -> (B, W) bool, the windows that merge.

    per_image: every window with score >= tau. Otherwise (authors) each image merges
    its ``r = min_b #(score >= tau)`` highest-scoring windows.
    """
    above = scores >= tau
    if per_image:
        return above
    r = above.sum(1).min()
    rank = _descending_rank(scores)
    return rank < r


def _descending_rank(scores: Tensor) -> Tensor:
    """(B, W) -> (B, W) long, 0 for the highest score (ties: lower index first)."""
    return inverse_permutation(scores.argsort(dim=1, descending=True, stable=True))


def local_plan(merge: Tensor, scores: Tensor, windows: Tensor, n_patches: int, length: int
               ) -> tuple[Tensor, Tensor]:
    """Where every token goes and where every output token comes from.

    merge, scores: (B, W); windows: (W, 4); n_patches: N; length: T', the longest
    image's ``1 + N - 3 k`` (k its merged windows). Returns

    * ``dest``: (B, 1 + N) long, old token -> new token (cls 0, merged windows
      1 .. k in descending score, then unmerged patches in raster order);
    * ``take``: (B, T') long, for each output slot the index into the pool
      ``[old tokens (1 + N) | window means (W)]`` (padding slots point at 0).
    """
    b, nw = merge.shape
    device = merge.device
    k = merge.sum(1)  # (B,)
    # rank among merged windows by descending score; unmerged windows sort last
    key = torch.where(merge, scores, torch.full_like(scores, float("-inf")))
    rank = _descending_rank(key)  # (B, W)

    win_of_patch = torch.full((n_patches,), -1, dtype=torch.long, device=device)
    win_of_patch[windows.reshape(-1)] = torch.arange(nw, device=device).repeat_interleave(4)
    in_window = win_of_patch >= 0
    wid = win_of_patch.clamp(min=0).expand(b, -1)  # (B, N)
    patch_merged = merge.gather(1, wid) & in_window  # (B, N)
    unmerged = ~patch_merged
    pos = unmerged.long().cumsum(1) - 1
    dest_patch = torch.where(unmerged, 1 + k.unsqueeze(1) + pos, 1 + rank.gather(1, wid))
    dest = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=device), dest_patch], 1)

    trash = length
    slots = torch.where(unmerged, dest_patch, torch.full_like(dest_patch, trash))
    win_slots = torch.where(merge, 1 + rank, torch.full_like(rank, trash))
    values = torch.cat([
        torch.arange(1, 1 + n_patches, device=device).expand(b, -1),
        torch.arange(1 + n_patches, 1 + n_patches + nw, device=device).expand(b, -1),
    ], 1)
    take = torch.zeros(b, length + 1, dtype=torch.long, device=device)
    take = take.scatter(1, torch.cat([slots, win_slots], 1), values)[:, :length]
    return dest, take


def local_merge(state: TokenState, tau: float, per_image: bool = False) -> TokenState:
    """Apply the local stage to an unreduced state (cls + N patch tokens).

    Returns the merged state: x (B, T', D), size (B, T') (merged windows 4, padding
    0), source composed with the step, keep set when images are padded. When no
    image merges a window the state is returned unchanged.
    """
    b, t, d = state.x.shape
    h, w = state.grid
    n = h * w
    if t != 1 + n or state.keep is not None:
        raise ValueError(
            "ALGM's local stage needs the full, unpadded patch grid (cls + h*w tokens); "
            f"got {t} tokens for a {h}x{w} grid. Put it in the first selected layer."
        )
    windows = window_index(state.grid, state.x.device)
    if windows.shape[0] == 0:
        return state
    xw = gather_windows(state.patches, state.grid)  # (B, W, 4, D)
    scores = window_scores(xw)
    merge = select_windows(scores, tau, per_image)
    k = merge.sum(1)
    # the step's one host sync: merge at all?, output size, padded?
    fewest, most = torch.stack([k.min(), k.max()]).tolist()
    if most == 0:
        return state
    length = 1 + n - 3 * fewest
    dest, take = local_plan(merge, scores, windows, n, length)
    keep = keep_mask(1 + n - 3 * k, length, fewest < most)
    nw = windows.shape[0]
    # pool = [tokens | window means | a zero row for padding], gathered row-wise
    pool = torch.cat([state.x, xw.mean(2), state.x.new_zeros(b, 1, d)], 1)
    pool_size = torch.cat([state.size, gather_windows(state.size[:, 1:, None], state.grid).sum((2, 3)),
                           state.size.new_zeros(b, 1)], 1)
    if keep is not None:
        take = take.masked_fill(~keep, 1 + n + nw)
    rows = (take + torch.arange(b, device=take.device).unsqueeze(1) * pool.shape[1]).reshape(-1)
    x = pool.reshape(-1, d).index_select(0, rows).reshape(b, length, d)
    size = pool_size.reshape(-1).index_select(0, rows).reshape(b, length)
    return state.replace(x=x, size=size, source=compose_source(state.source, dest), keep=keep)
