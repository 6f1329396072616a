"""ToMe: Token Merging (Bolya et al., ICLR 2023) for segmentation (SPEC section 3).

In every selected block, between the attention residual and the MLP, the tokens are
split alternately into two sets ``a = x[:, 0::2]`` (cls is ``a[0]`` and is never merged)
and ``b = x[:, 1::2]``; the metric is the attention keys averaged over heads,
L2-normalised; every a-token finds its most similar b-token and the ``r`` best edges
merge (several a-tokens may land on one b-token). The merge is size-weighted
(``x = sum(x * size) / sum(size)``, sizes add) and, with proportional attention, later
blocks add ``log(size)`` of each key to the attention logits.

Output order of one merge step, as in ToMe's code: ``[cls, unmerged a-tokens (original
order), b-tokens (original order, merged ones updated in place)]``.

The matching and the merge are ALGM's global-stage pieces (:mod:`algm.merging.bipartite`,
:mod:`algm.merging.index_map`): scores on the mean keys, a plan with exactly ``r`` merges
per image, the size-weighted merge by index (whose summed sizes feed proportional
attention).

Segmentation needs the map back to the patch grid: each step yields a (B, T) token map
``dest`` (old token -> new token), and ``source`` is composed as
``new_source = dest_patch.gather(1, old_source)``, so restoring the decoder's per-token
outputs is one gather (:func:`algm.reduction.gather_tokens`) and nothing T x N is built.
Everything is vectorised over the batch: every image merges the same ``r`` tokens (ToMe's
fixed-r design), so token counts stay equal within a batch, no padding is needed and a
step reads nothing back to the host.

Schedules (resolved per input grid, since the token count N depends on it):

* constant ``r`` per block (default 16: on CamVid's 24 x 32 = 768 patches, 12 blocks remove
  192 tokens, i.e. 25 % by the last block, the same order as ALGM's reduction there);
* ``(r, inflection)`` as ToMe's ``parse_r``: -1 decreasing, 0 constant, +1 increasing;
* an explicit per-block list (``schedule="16,16,8"``, missing blocks get 0);
* ``reduction=P``: remove about P % of the patch tokens over the merging blocks
  (``total = round(P/100 * N)`` merges, spread with ``parse_r(..., total=total)``).

In every case ``r`` is capped per block at half of the mergeable tokens, ``(T - 1) // 2``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.merging.bipartite import bipartite_plan, bipartite_scores
from algm.merging.index_map import apply_token_map
from algm.methods import option, register_method
from algm.reduction import AttentionView, TokenReduction, TokenState, padding_bias

DEFAULT_R = 16


def parse_r(num_layers: int, r: int | float | tuple | list, total: int | None = None) -> list[int]:
    """ToMe's ``parse_r``: a per-layer list of merges.

    ``r`` is an int (constant), ``(r, inflection)`` (inflection -1 decreasing, 0 constant,
    +1 increasing) or a list (padded with zeros to ``num_layers``). With ``total`` the
    rounding remainder goes to the first layer (decreasing) or the last one, so that the
    list sums to ``total``.
    """
    if isinstance(r, list):
        values = [int(v) for v in r]
        if len(values) > num_layers:
            raise ValueError(f"the ToMe schedule has {len(values)} entries but only "
                             f"{num_layers} blocks merge")
        return values + [0] * (num_layers - len(values))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    if num_layers <= 0:
        return []
    if num_layers == 1:
        values = [int(r)]
    else:
        min_val = int(r * (1.0 - inflect))
        max_val = 2 * r - min_val
        step = (max_val - min_val) / (num_layers - 1)
        values = [int(min_val + step * i) for i in range(num_layers)]
    if total is not None:
        remainder = total - sum(values)
        if remainder:
            values[0 if inflect < 0 else -1] += remainder
    return values


def _parse_layers(text: str | Sequence[int] | None, depth: int) -> tuple[int, int]:
    """'a-b' (1-based, inclusive), 'a-', '-b', 'a' or (a, b) -> 0-based half-open range."""
    if text is None or text == "all":
        return (0, depth)
    if isinstance(text, str):
        parts = text.split("-")
        try:
            if len(parts) == 1:
                first = last = int(parts[0])
            elif len(parts) == 2:
                first = int(parts[0]) if parts[0].strip() else 1
                last = int(parts[1]) if parts[1].strip() else depth
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"merge_layers must be 'all' or a 1-based block range like '1-{depth}', "
                             f"got {text!r}") from None
    else:
        first, last = (int(v) for v in text)
    if not 1 <= first <= last <= depth:
        raise ValueError(f"merge_layers {text!r} is not a range inside blocks 1..{depth}")
    return (first - 1, last)


@dataclass(frozen=True)
class Matching:
    """One ToMe step on T tokens (cls at 0), batched: every image merges r tokens.

    dest: (B, T) long, new position (among T - r tokens, cls at 0) of every old token;
    r: merges per image.
    """

    dest: Tensor
    r: int


def bipartite_soft_matching(metric: Tensor, r: int) -> Matching | None:
    """ToMe's matching on ``metric`` (B, T, C) with cls protected; None when r <= 0.

    ``r`` is capped at ``(T - 1) // 2``, the a-tokens other than cls. The shared
    :func:`bipartite_scores` and :func:`bipartite_plan` (int r: a top-k of the r best
    edges, no sort, no host sync) do the work; ties at the r-th best edge go to the
    lower a-index, where ToMe's unstable argsort leaves the order undefined.
    """
    t = int(metric.shape[1])
    r = min(int(r), (t - 1) // 2)
    if r <= 0:
        return None
    node_max, node_idx = bipartite_scores(metric)
    dest, _ = bipartite_plan(node_max, node_idx, r, None, t)
    return Matching(dest, r)


def merge_state(state: TokenState, m: Matching) -> TokenState:
    """Apply a matching: size-weighted merge of x, sizes add, source composed."""
    return apply_token_map(state, m.dest, state.num_tokens - m.r)


@register_method
class ToMe(TokenReduction):
    """Token merging in every selected block (see the module docstring)."""

    name = "tome"

    @dataclass(frozen=True)
    class Config:
        r: int | None = option(None, "tokens merged per block (constant schedule; default "
                                     f"{DEFAULT_R} unless --schedule or --reduction is given)", type=int)
        inflection: float = option(0.0, "ToMe schedule trend in [-1, 1]: -1 decreasing, 0 constant, "
                                        "+1 increasing (with --r or --reduction)", type=float)
        schedule: str | None = option(None, "explicit merges per merging block, comma separated "
                                            "(e.g. '32,32,16,16'); missing blocks merge 0")
        reduction: float | None = option(None, "percent of the patch tokens to remove over the merging "
                                               "blocks (resolved on the input grid)", type=float)
        merge_layers: str | None = option(None, "blocks that merge, 1-based inclusive range "
                                                "(e.g. '1-12'; default: all)")
        proportional_attn: bool = option(True, "proportional attention: add log(size) of each key",
                                         action=argparse.BooleanOptionalAction)

    def __init__(self, depth: int, r: int | None = None, inflection: float = 0.0,
                 schedule: Sequence[int] | str | None = None, reduction: float | None = None,
                 merge_layers: str | Sequence[int] | None = None, proportional_attn: bool = True):
        super().__init__()
        given = [n for n, v in (("r", r), ("schedule", schedule), ("reduction", reduction)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"ToMe: give only one of r, schedule, reduction (got {', '.join(given)})")
        if isinstance(schedule, str):
            try:
                schedule = [int(v) for v in schedule.replace(" ", "").split(",") if v]
            except ValueError:
                raise ValueError(f"ToMe schedule must be comma-separated integers, got {schedule!r}") from None
        if r is None and schedule is None and reduction is None:
            r = DEFAULT_R
        if r is not None and (int(r) != r or r < 0):
            raise ValueError(f"ToMe r must be a non-negative integer, got {r}")
        if schedule is not None and any(v < 0 for v in schedule):
            raise ValueError(f"ToMe schedule entries must be >= 0, got {list(schedule)}")
        if reduction is not None and not 0 <= reduction < 100:
            raise ValueError(f"ToMe reduction is a percentage in [0, 100), got {reduction}")
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"ToMe inflection must lie in [-1, 1], got {inflection}")
        if schedule is not None and inflection != 0.0:
            raise ValueError("ToMe inflection does not apply to an explicit schedule")
        self.depth = depth
        self.r = None if r is None else int(r)
        self.inflection = float(inflection)
        self.schedule = None if schedule is None else tuple(int(v) for v in schedule)
        self.reduction = None if reduction is None else float(reduction)
        self.layers = _parse_layers(merge_layers, depth)
        self.proportional_attn = bool(proportional_attn)
        first, last = self.layers
        if self.schedule is not None:
            parse_r(last - first, list(self.schedule))  # length check

    @classmethod
    def from_config(cls, config: "ToMe.Config", backbone: ViTConfig, dataset: DatasetSpec) -> "ToMe":
        return cls(backbone.depth, r=config.r, inflection=config.inflection, schedule=config.schedule,
                   reduction=config.reduction, merge_layers=config.merge_layers,
                   proportional_attn=config.proportional_attn)

    def settings(self) -> dict:
        first, last = self.layers
        return {
            "r": self.r,
            "inflection": self.inflection,
            "schedule": None if self.schedule is None else ",".join(map(str, self.schedule)),
            "reduction": self.reduction,
            "merge_layers": f"{first + 1}-{last}",
            "proportional_attn": self.proportional_attn,
        }

    def r_per_layer(self, num_patches: int) -> list[int]:
        """Requested merges for every block (before the half-of-tokens cap)."""
        num_patches = int(num_patches)  # a traced shape is a tensor under torch.jit.trace
        first, last = self.layers
        n = last - first
        if self.schedule is not None:
            inner = parse_r(n, list(self.schedule))
        elif self.reduction is not None:
            total = round(self.reduction / 100 * num_patches)
            inner = parse_r(n, (total / max(n, 1), self.inflection), total=total)
            inner = [max(v, 0) for v in inner]
        else:
            inner = parse_r(n, (self.r, self.inflection))
        return [0] * first + inner + [0] * (self.depth - last)

    def attn_bias(self, state: TokenState, layer: int) -> Tensor | None:
        """log(size) of every key (B, 1, 1, T) when proportional attention is on.

        Before the first merge every size is 1 and no bias is returned at all, so a run
        without merges is bit-identical to the unreduced model.
        """
        bias = padding_bias(state.keep, state.x.dtype)
        if not self.proportional_attn or int(state.num_tokens) == int(state.source.shape[1]) + 1:
            return bias
        log_size = state.size.log()[:, None, None, :].to(state.x.dtype)
        return log_size if bias is None else log_size + bias

    def mid_block(self, state: TokenState, layer: int, attn: AttentionView) -> TokenState:
        r = self.r_per_layer(state.source.shape[1])[layer]
        if r <= 0:
            return state
        if state.keep is not None:
            raise ValueError("ToMe merges equal token counts per image and does not take padded "
                             "states (keep mask); run it without other reduction methods")
        matching = bipartite_soft_matching(attn.keys.mean(1), r)
        if matching is None:
            return state
        return merge_state(state, matching)
