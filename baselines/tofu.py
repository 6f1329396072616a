"""ToFu: Token Fusion (Kim, Gao, Hsu, Shen, Jin, WACV 2024, arXiv 2312.01026), training-free.

ToFu keeps ToMe's matching and schedule and changes what a match does:

* **matching** (ToMe): in every block, between the attention residual and the MLP, the
  tokens split alternately into ``a = x[:, 0::2]`` (cls is ``a[0]``, never matched) and
  ``b = x[:, 1::2]``; the metric is the attention keys averaged over heads; every a-token
  finds its most similar b-token and the ``r`` best edges are taken (several a-tokens may
  share one b-token), ``r`` capped at half the tokens. Same r in every image, so token
  counts stay equal in a batch: no padding and no host sync in a step.
* **pruning** in the early blocks (before ``switch``): the matched a-tokens are dropped;
  their b partner keeps its own value exactly, takes over their patches (restore) and
  their sizes (proportional attention);
* **MLERP merging** from block ``switch`` on: the matched tokens fuse into the
  size-weighted mean's direction, rescaled to the largest norm among them (``mlerp_norm
  max``, the port's ``amax``), so that averaging does not shrink the features' norms.

Output order of a step, as ToMe: ``[cls, unmatched a (original order), b (original
order)]``. Restore composes the steps' integer maps (old token -> new token) into one
(B, N) map and gathers the decoder's per-token outputs through it.

Follows the Apache-2.0 port (``Westlake-AI/OpenToMe``, ``opentome/timm/tofu.py`` and
``opentome/tome/tome.py``, the paper has no official code): the split ``prune`` in the
0-based blocks ``i <= depth // 2`` and MLERP after them (1-based ``switch = depth // 2 + 2``:
8 of 12 blocks, 14 of 24), MLERP's norm = max of the merged tokens' norms, ToMe's matching.
Differs from the port, on purpose:

* the port rescales the merged mean by ``max_norm / ||old b-token||`` (the b-token's norm
  before the merge), so a fused token's norm is not the max norm its comment intends; here
  the mean is divided by its own norm (the paper's MLERP);
* the port averages without sizes and never updates its sizes, so its proportional
  attention never fires; here sizes are tracked as in ToMe (the mean is size-weighted,
  pruned tokens' sizes go to their partner) and proportional attention adds log(size)
  (``--no-proportional-attn`` gives the port's behaviour);
* ``mlerp_norm mean``: the size-weighted mean of the norms instead of their max (the
  reading in SPEC section 10);
* ties at the r-th best edge go to the lower a-index (ToMe's argsort leaves it open).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.merging.bipartite import bipartite_plan, bipartite_scores, top_r_mask
from algm.merging.index_map import apply_token_map, compose_source, merge_by_index
from algm.methods import option, register_method
from algm.reduction import AttentionView, TokenReduction, TokenState, padding_bias

# ToMe's r in this repository (baselines/tome.py): 16 per block of a 12-block ViT removes
# 192 of CamVid's 768 tokens (25 %) by the last block. A 24-block ViT gets 16 * 12 / 24 = 8
# per block, the same total (ToMe's own ViT-L/16 setting is r = 8 as well).
DEFAULT_R_12 = 16
NORMS = ("max", "mean")


def default_r(depth: int) -> int:
    """r per block that removes as many tokens over ``depth`` blocks as 16 over 12."""
    return max(1, round(DEFAULT_R_12 * 12 / depth))


def default_switch(depth: int) -> int:
    """The port's split: 0-based blocks ``i <= depth // 2`` prune, the later ones merge
    by MLERP; returns the first MLERP block, 1-based (8 of 12, 14 of 24)."""
    return depth // 2 + 2


def r_per_block(depth: int, num_patches: int, r: int | None, reduction: float | None) -> list[int]:
    """Requested matches per block (before the half-of-tokens cap).

    A constant ``r`` (ToMe's constant schedule) or ``reduction`` percent of the
    ``num_patches`` patch tokens spread evenly over the blocks (the rounding remainder,
    fewer than ``depth`` tokens, goes one each to the first blocks).
    """
    if reduction is None:
        return [int(r)] * depth
    total = round(reduction / 100 * int(num_patches))  # a traced shape may be a tensor
    base, extra = divmod(total, depth)
    return [base + (i < extra) for i in range(depth)]


@dataclass(frozen=True)
class Step:
    """One matching on T tokens (cls at 0), batched: every image matches ``r`` a-tokens.

    dest: (B, T) long, the new position (among ``length = T - r``, cls at 0) of every
    old token; matched: (B, T) bool, the r a-tokens per image that go into a b partner.
    """

    dest: Tensor
    matched: Tensor
    length: int


def match(metric: Tensor, r: int) -> Step | None:
    """ToMe's matching on ``metric`` (B, T, C), cls protected; None when nothing matches.

    ``r`` is capped at ``(T - 1) // 2``. The shared :func:`bipartite_scores` and
    :func:`bipartite_plan` build the map; :func:`top_r_mask` (the plan's own selection,
    an int r: a top-k, no host sync) says which a-tokens were matched.
    """
    b, t = metric.shape[:2]
    r = min(int(r), int(t - 1) // 2)  # int(): under a jit trace t is a tensor
    if r <= 0:
        return None
    node_max, node_idx = bipartite_scores(metric)
    dest, _ = bipartite_plan(node_max, node_idx, r, None, t)
    matched = torch.zeros(b, t, dtype=torch.bool, device=metric.device)
    matched[:, 0::2] = top_r_mask(node_max, r)
    return Step(dest, matched, t - r)


def prune(state: TokenState, step: Step) -> TokenState:
    """Drop the matched a-tokens: every new token is its one unmatched old token, value
    unchanged (a gather, bit-exact); sizes add and the dropped tokens' patches map to
    their b partner (``source`` composed with ``dest``). x: (B, T, D) -> (B, T - r, D)."""
    b, t, d = state.x.shape
    length = step.length
    # unmatched tokens fill every new slot once; matched ones go to a spare last column
    slot = torch.where(step.matched, length, step.dest)
    order = torch.arange(t, device=state.x.device).expand(b, t)
    carrier = torch.zeros(b, length + 1, dtype=torch.long, device=state.x.device)
    carrier = carrier.scatter(1, slot, order)[:, :length]
    x = state.x.gather(1, carrier.unsqueeze(-1).expand(b, length, d))
    size = state.size.new_zeros(b, length).scatter_add(1, step.dest, state.size)
    return state.replace(x=x, size=size, source=compose_source(state.source, step.dest, state.prefix))


def mlerp(state: TokenState, step: Step, norm: str = "max") -> TokenState:
    """MLERP merge: the size-weighted mean of the tokens sharing a slot
    (:func:`apply_token_map`: sizes add, source composed), rescaled in the slots that
    fused several tokens to the max (``norm="max"``) or the size-weighted mean
    (``"mean"``) of their norms; single tokens keep the plain merge's value.
    x: (B, T, D) -> (B, T - r, D)."""
    b, length = state.x.shape[0], step.length
    merged = apply_token_map(state, step.dest, length)
    norms = state.x.norm(dim=-1)  # (B, T)
    if norm == "max":
        target = norms.new_zeros(b, length).scatter_reduce(1, step.dest, norms, "amax", include_self=False)
    else:
        target = merge_by_index(norms.unsqueeze(-1), state.size, step.dest, length)[0][..., 0]
    fused = norms.new_zeros(b, length).scatter_add(1, step.dest, step.matched.to(norms.dtype)) > 0
    current = merged.x.norm(dim=-1)
    # a mean of opposite tokens may vanish: no direction to rescale, keep it as it is
    scale = torch.where(fused & (current > 0), target / current.clamp_min(torch.finfo(current.dtype).tiny),
                        torch.ones_like(current))
    return merged.replace(x=merged.x * scale.unsqueeze(-1))


@register_method
class ToFu(TokenReduction):
    """Token Fusion: ToMe matching, pruning before ``switch``, MLERP from it on."""

    name = "tofu"
    label_keys = ("r", "reduction", "switch")

    @dataclass(frozen=True)
    class Config:
        r: int | None = option(None, "tokens matched per block, constant (16 for 12 blocks, 8 for "
                                     "24; or give --reduction)", type=int)
        reduction: float | None = option(None, "percent of the patch tokens to remove over the blocks "
                                               "(resolved on the input grid)", type=float)
        switch: int | None = option(None, "first block (1-based) that merges by MLERP, the blocks "
                                          "before it prune: depth // 2 + 2 as the OpenToMe port (8 of "
                                          "12, 14 of 24); 1 = MLERP only, depth + 1 = pruning only",
                                    type=int)
        mlerp_norm: str = option("max", "norm of a fused token: max of the merged tokens' norms "
                                        "(port) or their size-weighted mean", choices=NORMS)
        proportional_attn: bool = option(True, "proportional attention: add log(size) of each key",
                                         action=argparse.BooleanOptionalAction)

        def __post_init__(self):
            if self.r is not None:
                if isinstance(self.r, bool) or not isinstance(self.r, Integral) or self.r < 0:
                    raise ValueError(f"r must be a non-negative integer, got {self.r!r}")
            if self.reduction is not None:
                if isinstance(self.reduction, bool) or not isinstance(self.reduction, Real) \
                        or not 0 <= self.reduction < 100:
                    raise ValueError(f"reduction is a percentage in [0, 100), got {self.reduction!r}")
            if self.r is not None and self.reduction is not None:
                raise ValueError("give only one of r and reduction")
            if self.switch is not None:
                if isinstance(self.switch, bool) or not isinstance(self.switch, Integral) or self.switch < 1:
                    raise ValueError(f"switch must be a 1-based block number (>= 1), got {self.switch!r}")
            if self.mlerp_norm not in NORMS:
                raise ValueError(f"mlerp_norm must be one of {NORMS}, got {self.mlerp_norm!r}")

    def __init__(self, depth: int, r: int | None = None, reduction: float | None = None,
                 switch: int | None = None, mlerp_norm: str = "max", proportional_attn: bool = True):
        super().__init__()
        self.Config(r=r, reduction=reduction, switch=switch, mlerp_norm=mlerp_norm,
                    proportional_attn=proportional_attn)  # validation
        if switch is not None and switch > depth + 1:
            raise ValueError(f"switch must be at most depth + 1 = {depth + 1} (pruning only), got {switch}")
        self.depth = depth
        self.reduction = None if reduction is None else float(reduction)
        self.r = None if reduction is not None else int(r if r is not None else default_r(depth))
        self.switch = int(switch) if switch is not None else default_switch(depth)
        self.mlerp_norm = mlerp_norm
        self.proportional_attn = bool(proportional_attn)

    @classmethod
    def from_config(cls, config: "ToFu.Config", backbone: ViTConfig, dataset: DatasetSpec) -> "ToFu":
        return cls(backbone.depth, r=config.r, reduction=config.reduction, switch=config.switch,
                   mlerp_norm=config.mlerp_norm, proportional_attn=config.proportional_attn)

    def settings(self) -> dict:
        return {"r": self.r, "reduction": self.reduction, "switch": self.switch,
                "mlerp_norm": self.mlerp_norm, "proportional_attn": self.proportional_attn}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())

    def r_per_block(self, num_patches: int) -> list[int]:
        """Requested matches for every block (before the half-of-tokens cap)."""
        return r_per_block(self.depth, num_patches, self.r, self.reduction)

    def attn_bias(self, state: TokenState, layer: int) -> Tensor | None:
        """log(size) of every key (B, 1, 1, T) with proportional attention, on top of the
        padding mask. Before the first step every size is 1 and no bias is returned, so a
        run without steps is bit-identical to the unreduced model."""
        bias = padding_bias(state.keep, state.x.dtype)
        if not self.proportional_attn or int(state.num_tokens) == int(state.source.shape[1]) + state.prefix:
            return bias
        log_size = state.size.log()[:, None, None, :].to(state.x.dtype)
        return log_size if bias is None else log_size + bias

    def mid_block(self, state: TokenState, layer: int, attn: AttentionView) -> TokenState:
        r = self.r_per_block(state.source.shape[1])[layer]
        if r <= 0:
            return state
        if state.keep is not None:
            raise ValueError("ToFu matches equal token counts per image and does not take padded "
                             "states (keep mask); run it without other reduction methods")
        if state.prefix != 1:  # the shared matching protects exactly one leading token
            raise ValueError(f"ToFu protects one cls token, the state has {state.prefix} prefix tokens")
        step = match(attn.keys.mean(1), r)
        if step is None:
            return state
        if layer + 1 < self.switch:
            return prune(state, step)
        return mlerp(state, step, self.mlerp_norm)
