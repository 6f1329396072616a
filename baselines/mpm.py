"""MPM: Mutual Pair Merging (Ravé, Rasti, Rousseau, CVPR 2026 Findings, arXiv 2604.05718).

Training-free, no learned part, no threshold, no keep rate: the only knob is where the
merging steps sit. At each step, on the patch tokens (prefix / cls aside, padding aside):

* L2-normalise the tokens and take their cosine similarity matrix (one batched matmul);
* every token finds its nearest OTHER token (itself and padding excluded);
* two tokens that are each other's nearest neighbour (a mutual pair) merge into their
  plain mean; the lower index stands for the pair (the merged token takes its place,
  the higher one leaves), every other token stays, the survivors keep their order.

Pairs are disjoint, so at most half the tokens go per step and every step with two or
more tokens merges at least one pair (the globally most similar pair is always mutual).
Each step is an integer map old token -> new token, composed into ``source``; restoring
the decoder's per-token outputs is the base class's one gather through it.

Follows the paper (no public code): steps "before block k" (1-based), by default before
blocks 3 and 6 of a 12-block ViT; plain mean of the pair, not size-weighted. Here
``size`` still adds up (patches per token), so the index map, the token statistics and
the pictures stay exact; nothing reads the sizes back (no proportional attention, the
paper has none). A step before block k runs in ``after_block`` of block k - 1; a step
before block 1 runs in ``begin`` on the embedded patches.

What the paper leaves open, decided here:

* ties: a token whose nearest neighbour is not unique takes the lowest index (torch's
  ``max`` convention), the batch_min ranking breaks ties towards the lower index too;
* the selection runs without gradient (as in ToMe and ALGM); the mean itself keeps it;
* batches (``batch_policy``): the count of mutual pairs differs per image.
  ``per_image`` (default: the rule as stated, image by image; the paper names the
  padding of variable-length batches as its cost) merges every pair of every image,
  shorter images padded behind and masked out of attention through ``keep``; an
  image's output does not depend on its batch neighbours. ``batch_min``
  merges in every image only its r highest-similarity pairs, r the batch minimum (ALGM's
  authors' batching): equal lengths, no padding.

FLOPs: the similarity matrix is a matmul fvcore counts (B * P * P * D multiply-adds);
the rest is elementwise or indexing, free by this suite's convention. (The paper counts
a multiply-add as two FLOPs; this suite counts one.)

Host syncs: one per step (whether to merge at all, the output length, whether padded).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.merging.bipartite import top_r_mask
from algm.merging.index_map import compose_source, merge_by_index, ragged
from algm.methods import option, register_method
from algm.reduction import EncoderContext, TokenReduction, TokenState

POLICIES = ("per_image", "batch_min")

# Paper: steps before blocks 3 and 6 (1-based) of the 12-block ViT-T/S/B, i.e. after 2
# and 5 full-resolution blocks. Deeper encoders keep the same fraction of blocks in front
# of each step: 2/12 and 5/12 of 24 blocks are 4 and 10, so ViT-L steps before 5 and 11.
PAPER_DEPTH = 12
PAPER_STEPS = (3, 6)


def default_steps(depth: int) -> tuple[int, ...]:
    """Steps (1-based "before block" numbers) for an encoder of ``depth`` blocks: the
    paper's (3, 6) with the blocks in front of each step scaled by depth / 12."""
    steps = sorted({min(depth, round((k - 1) * depth / PAPER_DEPTH) + 1) for k in PAPER_STEPS})
    return tuple(steps)


def parse_steps(value) -> tuple[int, ...]:
    """``"3,6"``, ``3``, ``[3, 6]``, the command line's ``[(3,), (6,)]`` or ``"none"`` (no
    step) -> a tuple of ints (unchecked)."""
    if isinstance(value, str):
        text = value.replace(" ", "")
        if text.lower() in ("", "none"):
            return ()
        try:
            return tuple(int(p) for p in text.split(",") if p)
        except ValueError:
            raise ValueError(f"steps must be comma-separated block numbers like 3,6 or 'none', "
                             f"got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Iterable):
        flat = []
        for v in value:
            flat.extend(parse_steps(v) if isinstance(v, (str, tuple, list)) else (v,))
        return tuple(flat)
    raise ValueError(f"steps must be block numbers like 3,6 or 'none', got {value!r}")


def _steps_argument(text: str) -> tuple[int, ...]:
    """argparse type of ``--steps`` (one line on a bad value)."""
    try:
        return parse_steps(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_steps(steps, depth: int | None = None) -> tuple[int, ...]:
    """Validated steps: distinct increasing 1-based block numbers (within ``depth``)."""
    steps = parse_steps(steps)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in steps):
        raise ValueError(f"steps must be integer block numbers (1-based) like 3,6, got {steps!r}")
    if any(k < 1 for k in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must be distinct increasing 1-based block numbers, got {steps!r}")
    if depth is not None and steps and steps[-1] > depth:
        raise ValueError(f"steps {steps!r} exceed the encoder depth {depth} (blocks are 1 .. {depth})")
    return steps


# ------------------------------------------------------------------ one step, piece by piece


def nearest_neighbours(patches: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Every patch token's most similar other real token by cosine similarity.

    patches: (B, P, D); keep: (B, P) bool (False = padding) or None. Returns ``nn``
    (B, P) long, the index of the nearest other token (lowest index on ties), and
    ``best`` (B, P), the cosine similarity to it: -inf for padding and for a token with
    no other real token (its ``nn`` is then meaningless).
    """
    with torch.no_grad():  # a selection, not differentiable (ToMe, ALGM: same)
        u = F.normalize(patches, dim=-1)
        sim = u @ u.transpose(-1, -2)  # (B, P, P), the step's one counted matmul
        p = sim.shape[-1]
        idx = torch.arange(p, device=sim.device)
        excluded = idx.unsqueeze(1) == idx.unsqueeze(0)  # (P, P) self
        if keep is not None:
            excluded = excluded | ~keep.unsqueeze(1)  # padding columns: never a neighbour
        best, nn = sim.masked_fill_(excluded, float("-inf")).max(-1)
        if keep is not None:
            best = best.masked_fill(~keep, float("-inf"))  # padding rows: never merge
        return nn, best


def mutual_leads(nn: Tensor, best: Tensor) -> Tensor:
    """(B, P) bool: the lower member of every mutual nearest-neighbour pair, i.e. token i
    with ``nn[nn[i]] == i`` and ``i < nn[i]`` (it will stand for the pair).

    nn, best: (B, P) from :func:`nearest_neighbours`; -inf ``best`` (padding, a lone
    token) never leads.
    """
    idx = torch.arange(nn.shape[1], device=nn.device)
    return torch.isfinite(best) & (nn.gather(1, nn) == idx) & (nn > idx)


def batch_min_leads(leads: Tensor, best: Tensor) -> Tensor:
    """(B, P) bool: every image's r most similar pairs, r the fewest pairs of any image.

    leads: (B, P) from :func:`mutual_leads`; best: (B, P) a pair's similarity at its lead
    (ties: lower index first). The count stays a tensor: no host sync here.
    """
    score = best.masked_fill(~leads, float("-inf"))
    r = leads.sum(1).min().expand(leads.shape[0])
    return top_r_mask(score, r)


def pair_map(nn: Tensor, leads: Tensor, real: Tensor, prefix: int, length: int) -> Tensor:
    """Token map of one step: the pairs of ``leads`` merge into their lead's slot.

    nn: (B, P); leads: (B, P) bool, the merging pairs' lower members; real: (B, P) bool,
    the non-padding patch tokens; prefix: leading tokens that map to themselves; length:
    the longest image's new token count (prefix included), also the trash slot that
    padding goes to. Returns ``dest`` (B, prefix + P) long: survivors packed at the
    front in their order, the higher member of a pair to its lead's new position.
    """
    idx = torch.arange(nn.shape[1], device=nn.device)
    # j leaves iff its nearest neighbour leads a pair whose partner is j
    removed = leads.gather(1, nn) & (nn.gather(1, nn) == idx)
    survive = real & ~removed
    pos = survive.long().cumsum(1) - 1 + prefix
    dest = torch.where(removed, pos.gather(1, nn), pos)
    dest = torch.where(real, dest, torch.full_like(dest, length))
    head = torch.arange(prefix, device=nn.device).expand(nn.shape[0], prefix)
    return torch.cat([head, dest], 1)


def mutual_pair_merge(state: TokenState, per_image: bool = True) -> TokenState:
    """One MPM step on ``state``'s patch tokens; the state unchanged if no pair merges.

    Returns x (B, T', D) with each pair replaced by its plain mean at the lower member's
    place, size (B, T') the patches per token (pairs add), ``source`` composed with the
    step, ``keep`` set where the images end with different lengths (padding behind).
    """
    p = state.prefix
    real_keep = state.patch_keep
    nn, best = nearest_neighbours(state.patches, real_keep)
    leads = mutual_leads(nn, best)
    if not per_image:
        leads = batch_min_leads(leads, best)
    pairs = leads.sum(1)
    new_lengths = state.alive() - pairs
    longest, keep, most = ragged(new_lengths, pairs.max())  # the step's one host sync
    if most == 0:
        return state
    real = torch.ones_like(leads) if real_keep is None else real_keep
    dest = pair_map(nn, leads, real, p, longest)
    # plain mean (the paper): unit weights into the shared index merge; sizes add apart
    x, _ = merge_by_index(state.x, torch.ones_like(state.size), dest, longest)
    size = state.size.new_zeros(state.size.shape[0], longest + 1).scatter_add_(1, dest, state.size)
    return state.replace(x=x, size=size[:, :longest], source=compose_source(state.source, dest, p),
                         keep=keep)


# ------------------------------------------------------------------ the method


@register_method
class MPM(TokenReduction):
    """Mutual Pair Merging at fixed steps (see the module docstring)."""

    name = "mpm"
    label_keys = ("steps",)

    @dataclass(frozen=True)
    class Config:
        steps: tuple[int, ...] | None = option(
            None, "1-based blocks a merging step runs before: 3 6 or 3,6 (ViT-L 5,11); "
                  "'none' for no step", type=_steps_argument, nargs="+")
        batch_policy: str = option(
            "per_image", "per_image: every image merges all its mutual pairs (padding + mask); "
                         "batch_min: every image its r best pairs, r the batch minimum",
            choices=POLICIES)

        def __post_init__(self):
            if self.steps is not None:
                object.__setattr__(self, "steps", check_steps(self.steps))
            if self.batch_policy not in POLICIES:
                raise ValueError(f"batch_policy must be one of {POLICIES}, got {self.batch_policy!r}")

    def __init__(self, steps=PAPER_STEPS, batch_policy: str = "per_image", depth: int | None = None):
        super().__init__()
        cfg = self.Config(steps=steps, batch_policy=batch_policy)
        self.steps = check_steps(cfg.steps, depth)
        self.batch_policy = cfg.batch_policy

    @classmethod
    def from_config(cls, config: "MPM.Config", backbone: ViTConfig, dataset: DatasetSpec) -> "MPM":
        # the paper's schedule scaled by depth; nothing depends on the dataset
        steps = config.steps if config.steps is not None else default_steps(backbone.depth)
        return cls(steps=steps, batch_policy=config.batch_policy, depth=backbone.depth)

    @property
    def per_image(self) -> bool:
        return self.batch_policy == "per_image"

    def settings(self) -> dict:
        return {"steps": ",".join(map(str, self.steps)) or "none", "batch_policy": self.batch_policy}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())

    def begin(self, patches: Tensor, ctx: EncoderContext) -> TokenState:
        """A step before block 1 merges the embedded patches (before cls is added)."""
        state = super().begin(patches, ctx)
        return mutual_pair_merge(state, self.per_image) if 1 in self.steps else state

    def after_block(self, state: TokenState, layer: int) -> TokenState:
        """After 0-based block ``layer`` comes the step before 1-based block ``layer + 2``."""
        return mutual_pair_merge(state, self.per_image) if layer + 2 in self.steps else state
