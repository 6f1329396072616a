"""PiToMe: Spectrum-preserving token merging (Tran et al., NeurIPS 2024), SPEC section 10.

Training-free. Two variants (``variant``):

**classic** (the paper's rule, as in its classification code): in every merging block,
between the attention residual and the MLP, on the T patch tokens (the prefix, i.e. the
cls token, never takes part):

* metric: the block's attention keys averaged over heads, L2-normalised (as the authors'
  timm/DeiT patches and the Apache port Westlake-AI/OpenToMe ``opentome/timm/pitome.py``
  do); ``s_ij`` their cosine similarities;
* energy ``E_i = 1/T sum_j f(s_ij)`` over all j, i itself included (as the code does),
  with the ELU-style ``f(s) = elu(s - m)``, i.e. ``s - m`` above the margin and
  ``exp(s - m) - 1`` below it (the code's form; ``energy=paper`` takes the paper's
  ``f(s) = s`` above the margin instead). The margin shrinks with depth:
  ``m_l = margin * (1 - l / L)`` (l the 0-based block, L the depth; ``margin`` 0.9 as in
  the paper, SPEC and the authors' CLIP / BLIP patches; their DeiT / MAE patches and the
  OpenToMe port use 0.75);
* ``r = floor(T * (1 - ratio))`` (the code's rule; at most T // 2): the tokens sorted by
  energy (descending, ties to the lower index), the 2r most energetic split alternately
  into A (ranks 0, 2, ...) and B (ranks 1, 3, ...); every A token merges into its most
  similar B token (ties to the more energetic B), size-weighted (sizes add); the other
  T - 2r tokens are protected and pass untouched;
* output order, as the authors' code: ``[cls, protected tokens (descending energy),
  B tokens (descending energy, merged ones updated)]``.

Differences from the classification code: it runs an energy-ordered ToMe matching (all
tokens candidates, the best r edges) instead of the protected rule in half of the blocks
(the first half for DeiT, the second for MAE); here every merging block uses the paper's
protected rule. Proportional attention (``log(size)`` added to the keys' logits) is off by
default, as in the authors' patches and the port (``proportional_attn`` turns it on).
Every image merges the same r, so a classic step needs no padding and no host sync.

**algm** (the authors' segmentation variant, hchautran/algm-segmenter
``algm/algm/patch/pitome_segmenter.py``; written from its semantics): ALGM's local stage
(:func:`algm.merging.local.local_merge`, ``tau`` 0.95 as there; 0.985 on CamVid's
DINOv2-style weights, as the suite's ALGM) in block ``layers[0]``,
then in block ``layers[1]`` (1-based, (1, 5) for 12 blocks, (1, 7) for 24) one adaptive
PiToMe step in place of ALGM's global stage:

* metric: the hidden state x (as that code), cosine similarities of the patch tokens;
* energy ``E_i = 1/T sum_{j != i} k(1 - s_ij)`` with the Gaussian kernel
  ``k(d) = exp(-d^2 / (2 sigma^2)) / (sigma sqrt(2 pi))``, sigma 0.005;
* r = the number of tokens with ``E_i > k(1 - margin)`` (margin 0.9), at most T // 2;
  ``batch_policy=batch_min`` (authors): the batch minimum, ``per_image``: each image its
  own count (front-packed, padding masked through ``keep``, never merged, left out of
  every energy); then the protected rule above with that r. No proportional attention
  there (the code passes sizes but never uses them).

  Energies are computed in the log domain (a log-sum-exp), i.e. the formula exactly. The
  authors evaluate it in float32, where ``k(0.1)`` at sigma 0.005 (``exp(-200)``)
  underflows to 0: their threshold is 0, so in effect a token passes when some other token
  is within cos ~0.93 of it, where the formula asks for about cos 0.90; this variant
  therefore merges somewhat more than their code at the same margin.

Restore: each step is an integer map ``dest`` (old token -> new token) applied with
:func:`algm.merging.index_map.apply_token_map`, which composes ``source`` (patch ->
token); the base class's ``restore`` gathers the decoder's per-token outputs through it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.merging.index_map import apply_token_map, ragged
from algm.merging.local import local_merge
from algm.methods import option, register_method
from algm.reduction import AttentionView, TokenReduction, TokenState, padding_bias

VARIANTS = ("classic", "algm")
ENERGIES = ("code", "paper")
POLICIES = ("batch_min", "per_image")

# Classic keep ratio per merging block. 0.95 in every one of 12 blocks leaves 0.95^12 =
# 54 % of the patch tokens after the last block: -31 % GFLOPs on CamVid ViT-S/14 (25.9 ->
# 17.9), the order of ALGM's default cut there (-31 %), inside the ratios the paper runs
# off the shelf (0.9 .. 0.975). A deeper encoder gets ratio^(12 / depth), the same
# fraction after its last block: 0.975 for 24 blocks.
BASE_RATIO = 0.95
MARGIN = 0.9  # paper / SPEC (classic: the margin at block 0); algm variant: the authors' 0.9
# The algm variant's local-stage threshold: the authors' segmentation variant hard-codes
# 0.95 (ADE20K Segmenter). On CamVid's DINOv2-style weights the suite's ALGM uses 0.985
# (their tokens are far more alike inside 2x2 windows, see algm/algm.py); the same value
# here keeps the local stage equal to ALGM's, so the variant differs only in its second step.
TAU = 0.95
TAU_BY_DATA: dict[tuple[str, str], float] = {
    ("camvid", "vit-s14"): 0.985,
    ("camvid", "vit-s16-dinov2"): 0.985,
}
SIGMA = 0.005  # the authors' Gaussian kernel width
# 1-based blocks of the algm variant's two steps per encoder depth (ALGM's layers).
LAYERS: dict[int, tuple[int, int]] = {12: (1, 5), 24: (1, 7)}
# Classic only (variant algm rejects them) and algm only (variant classic rejects them).
CLASSIC_ONLY = ("ratio", "energy", "merge_layers")
ALGM_ONLY = ("tau", "layers", "sigma", "batch_policy")


def default_ratio(depth: int) -> float:
    return BASE_RATIO if depth == 12 else round(BASE_RATIO ** (12 / depth), 3)


def default_layers(depth: int) -> tuple[int, int]:
    """(1, 5) for 12 blocks, (1, 7) for 24; else block 1 and the one at 5/12 of the depth."""
    if depth in LAYERS:
        return LAYERS[depth]
    if depth < 2:
        raise ValueError(f"pitome variant algm needs at least 2 encoder blocks, the encoder has {depth}")
    return (1, min(depth, max(2, round(depth * 5 / 12))))


def parse_block_pair(value) -> tuple[int, int]:
    """``"1,5"``, ``(1, 5)`` or ``[1, 5]`` -> (1, 5): the algm variant's two 1-based blocks."""
    if isinstance(value, str):
        try:
            value = tuple(int(p) for p in value.replace(" ", "").split(",") if p)
        except ValueError:
            raise ValueError(f"layers must be two block numbers like 1,5, got {value!r}") from None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 1 <= value[0] < value[1]):
        raise ValueError(f"layers must be two increasing 1-based block numbers like 1,5, got {value!r}")
    return (value[0], value[1])


def parse_block_range(text: str | None, depth: int) -> tuple[int, int]:
    """'all', 'a-b', 'a-', '-b' or 'a' (1-based, inclusive) -> a 0-based half-open range."""
    if text is None or text == "all":
        return (0, depth)
    parts = str(text).replace(" ", "").split("-")
    try:
        if len(parts) == 1:
            first = last = int(parts[0])
        elif len(parts) == 2:
            first = int(parts[0]) if parts[0] else 1
            last = int(parts[1]) if parts[1] else depth
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"merge_layers must be 'all' or a 1-based block range like '1-{depth}', "
                         f"got {text!r}") from None
    if not 1 <= first <= last <= depth:
        raise ValueError(f"merge_layers {text!r} is not a range inside blocks 1..{depth}")
    return (first - 1, last)


def merge_count(tokens: int, ratio: float) -> int:
    """Classic r for T patch tokens: ``floor(T * (1 - ratio))`` (authors), at most T // 2.
    The 1e-9 keeps float noise (100 * (1 - 0.9) = 9.999...) from dropping a merge."""
    return min(math.floor(tokens * (1.0 - ratio) + 1e-9), tokens // 2)


def layer_margin(margin: float, layer: int, depth: int) -> float:
    """The classic margin of 0-based block ``layer``: ``margin * (1 - layer / depth)``."""
    return margin * (1.0 - layer / depth)


def cosine_similarity(metric: Tensor) -> Tensor:
    """(B, T, C) -> (B, T, T) cosine similarities of the rows (one matmul)."""
    u = F.normalize(metric, dim=-1)
    return u @ u.transpose(-1, -2)


def elu_energy(sim: Tensor, margin: float, paper: bool = False) -> Tensor:
    """Classic energy (B, T): the mean over every j (i included) of f(s_ij), with
    ``f(s) = s - m`` (code; ``paper``: ``s``) above the margin and ``exp(s - m) - 1`` below."""
    energy = F.elu(sim - margin)  # one fused pass over T x T: the step's largest cost after the matmul
    if paper:
        energy = torch.where(sim >= margin, sim, energy)
    return energy.mean(-1)


def gaussian_log_energy(sim: Tensor, sigma: float, keep: Tensor | None = None) -> Tensor:
    """log of the algm variant's energy without the kernel's constant factor (shared by
    :func:`gaussian_log_threshold`): ``log(1/T_b sum_{j != i, j real} exp(-(1 - s_ij)^2 /
    (2 sigma^2)))``. sim: (B, T, T); keep: (B, T) real tokens or None (all). Returns (B, T),
    -inf for padding. A log-sum-exp: the kernel itself underflows far from s = 1."""
    t = sim.shape[-1]
    log_k = -0.5 * ((1 - sim) / sigma) ** 2
    index = torch.arange(t, device=sim.device)
    exclude = (index.unsqueeze(1) == index).expand_as(sim)  # the self term (authors: 0)
    if keep is None:
        count = torch.full(sim.shape[:1], t, dtype=sim.dtype, device=sim.device)
    else:
        exclude = exclude | ~keep.unsqueeze(1)
        count = keep.sum(1).to(sim.dtype)
    log_e = log_k.masked_fill(exclude, float("-inf")).logsumexp(-1) - count.log().unsqueeze(1)
    return log_e if keep is None else log_e.masked_fill(~keep, float("-inf"))


def gaussian_log_threshold(margin: float, sigma: float) -> float:
    """log k(1 - margin) on the scale of :func:`gaussian_log_energy`."""
    return -0.5 * ((1 - margin) / sigma) ** 2


def protected_plan(energy: Tensor, sim: Tensor, r: Tensor, lengths: Tensor, prefix: int
                   ) -> tuple[Tensor, Tensor]:
    """Token map of one PiToMe step with r[b] merges in image b.

    energy: (B, T) over the patch tokens, -inf for padding (which then ranks last); sim:
    (B, T, T); r: (B,) long, at most lengths // 2; lengths: (B,) real patch tokens (front-
    packed). Ranks k by descending energy (stable): A = even k < 2r, B = odd k < 2r, each A
    into its most similar B (ties to the lower rank), the rest protected. Returns ``dest``
    (B, prefix + T) long (new order ``[prefix, protected, B]``, padding -> the trash slot
    ``max(new_lengths)``) and ``new_lengths`` (B,) = prefix + lengths - r.
    """
    b, t = energy.shape
    device = energy.device
    order = energy.argsort(dim=1, descending=True, stable=True)  # rank -> token
    rank = torch.arange(t, device=device).expand(b, t)
    r2, n = (2 * r).unsqueeze(1), lengths.unsqueeze(1)
    is_b = (rank < r2) & (rank % 2 == 1)
    # every token's best B partner, as a rank: sim's columns taken in rank order, non-B
    # columns masked (argmax keeps the first, i.e. the more energetic, of tied maxima)
    by_rank = sim.gather(2, order.unsqueeze(1).expand(b, t, t))
    partner = by_rank.masked_fill(~is_b.unsqueeze(1), float("-inf")).argmax(-1).gather(1, order)
    b_slot = prefix + n - r2 + (rank - 1).div(2, rounding_mode="floor")  # odd ranks only
    slot = torch.where(rank >= r2, prefix + rank - r2, b_slot)
    slot = torch.where(rank < r2, slot.gather(1, torch.where(is_b, rank, partner)), slot)
    new_lengths = prefix + lengths - r
    slot = torch.where(rank < n, slot, new_lengths.max())  # padding: trash (a 0-dim tensor, no sync)
    dest = torch.zeros_like(slot).scatter_(1, order, slot)  # by rank -> by token
    head = torch.arange(prefix, device=device).expand(b, prefix)
    return torch.cat([head, dest], 1), new_lengths


@register_method
class PiToMe(TokenReduction):
    """Energy-protected token merging; build with :meth:`from_config` (module docstring)."""

    name = "pitome"
    label_keys = ("variant", "ratio", "tau", "margin")

    @dataclass(frozen=True)
    class Config:
        variant: str = option("classic", "classic: PiToMe in every block with a keep ratio (paper); "
                                         "algm: ALGM's local stage, then an adaptive Gaussian-energy "
                                         "PiToMe step (the authors' segmentation variant)",
                              choices=VARIANTS)
        ratio: float | None = option(None, "classic: tokens kept per merging block, r = floor(T (1 - ratio)) "
                                           "(0.95 for 12 blocks, 0.975 for 24; 1 merges nothing)", type=float)
        margin: float | None = option(None, f"energy margin in [0, 1] (default {MARGIN}); classic: at "
                                            "block 1, shrinking as margin (1 - l / depth); algm: the kernel "
                                            "threshold (1 merges nothing)", type=float)
        energy: str | None = option(None, "classic: f above the margin, code: s - m (default), "
                                          "paper: s", choices=ENERGIES)
        merge_layers: str | None = option(None, "classic: blocks that merge, 1-based inclusive range "
                                                "(e.g. '1-12'; default: all)")
        proportional_attn: bool = option(False, "add log(size) of each key to the attention logits "
                                                "(off in the authors' code)",
                                         action=argparse.BooleanOptionalAction)
        tau: float | None = option(None, f"algm: local-stage threshold (default {TAU}; CamVid DINOv2 0.985; "
                                         "> 1 merges no window)", type=float)
        layers: str | None = option(None, "algm: 1-based blocks of the local and the PiToMe step, "
                                          "e.g. 1,5 (default 1,5; 24 blocks 1,7)")
        sigma: float | None = option(None, f"algm: width of the Gaussian energy kernel (default {SIGMA})",
                                     type=float)
        batch_policy: str | None = option(None, "algm: batch_min: one r per batch, the minimum over images "
                                                "(authors, default); per_image: every image its own count",
                                          choices=POLICIES)

        def __post_init__(self):
            if self.variant not in VARIANTS:
                raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
            foreign = ALGM_ONLY if self.variant == "classic" else CLASSIC_ONLY
            given = [k for k in foreign if getattr(self, k) is not None]
            if given:
                raise ValueError(f"pitome option(s) {', '.join(given)} do not apply to "
                                 f"variant {self.variant}")
            for key in ("ratio", "margin", "tau", "sigma"):
                value = getattr(self, key)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
                    raise ValueError(f"{key} must be a finite number, got {value!r}")
                object.__setattr__(self, key, float(value))
            if self.ratio is not None and not 0.5 <= self.ratio <= 1:
                raise ValueError(f"ratio must lie in [0.5, 1] (at most half the tokens merge), "
                                 f"got {self.ratio}")
            if self.margin is not None and not 0 <= self.margin <= 1:
                raise ValueError(f"margin must lie in [0, 1], got {self.margin}")
            if self.sigma is not None and self.sigma <= 0:
                raise ValueError(f"sigma must be > 0, got {self.sigma}")
            if self.energy is not None and self.energy not in ENERGIES:
                raise ValueError(f"energy must be one of {ENERGIES}, got {self.energy!r}")
            if self.batch_policy is not None and self.batch_policy not in POLICIES:
                raise ValueError(f"batch_policy must be one of {POLICIES}, got {self.batch_policy!r}")
            if self.layers is not None:
                object.__setattr__(self, "layers", parse_block_pair(self.layers))
            if self.merge_layers is not None:
                parse_block_range(self.merge_layers, 10 ** 6)  # syntax; the depth is checked on build

    def __init__(self, depth: int, variant: str = "classic", ratio: float | None = None,
                 margin: float | None = None, energy: str | None = None, merge_layers: str | None = None,
                 proportional_attn: bool = False, tau: float | None = None,
                 layers: tuple[int, int] | str | None = None, sigma: float | None = None,
                 batch_policy: str | None = None):
        super().__init__()
        self.Config(variant=variant, ratio=ratio, margin=margin, energy=energy, merge_layers=merge_layers,
                    proportional_attn=proportional_attn, tau=tau, layers=layers, sigma=sigma,
                    batch_policy=batch_policy)  # validation
        self.depth = depth
        self.variant = variant
        self.margin = MARGIN if margin is None else float(margin)
        self.proportional_attn = bool(proportional_attn)
        classic = variant == "classic"
        self.ratio = (default_ratio(depth) if ratio is None else float(ratio)) if classic else None
        self.energy = (energy or "code") if classic else None
        self.blocks = parse_block_range(merge_layers, depth) if classic else None
        self.tau = None if classic else (TAU if tau is None else float(tau))
        self.sigma = None if classic else (SIGMA if sigma is None else float(sigma))
        self.batch_policy = None if classic else (batch_policy or "batch_min")
        self.layers = None
        if not classic:
            self.layers = default_layers(depth) if layers is None else parse_block_pair(layers)
            if self.layers[1] > depth:
                raise ValueError(f"layers {self.layers} exceed the encoder depth {depth} "
                                 f"(blocks 1 .. {depth})")

    @classmethod
    def from_config(cls, config: "PiToMe.Config", backbone: ViTConfig, dataset: DatasetSpec) -> "PiToMe":
        tau = config.tau
        if tau is None and config.variant == "algm":
            tau = TAU_BY_DATA.get((dataset.name, backbone.name), TAU)
        return cls(backbone.depth, variant=config.variant, ratio=config.ratio, margin=config.margin,
                   energy=config.energy, merge_layers=config.merge_layers,
                   proportional_attn=config.proportional_attn, tau=tau, layers=config.layers,
                   sigma=config.sigma, batch_policy=config.batch_policy)

    def settings(self) -> dict:
        blocks = None if self.blocks is None else f"{self.blocks[0] + 1}-{self.blocks[1]}"
        layers = None if self.layers is None else ",".join(map(str, self.layers))
        return {"variant": self.variant, "ratio": self.ratio, "margin": self.margin, "energy": self.energy,
                "merge_layers": blocks, "proportional_attn": self.proportional_attn, "tau": self.tau,
                "layers": layers, "sigma": self.sigma, "batch_policy": self.batch_policy}

    def label_settings(self) -> dict:
        shown = super().label_settings()
        if shown.get("variant") == "classic":  # the default: not worth a word
            del shown["variant"]
        if shown.get("margin") == MARGIN:
            del shown["margin"]
        return shown

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items() if v is not None)

    def merges(self, layer: int, tokens: int) -> int:
        """Classic r of 0-based block ``layer`` on ``tokens`` patch tokens."""
        first, last = self.blocks
        return merge_count(tokens, self.ratio) if first <= layer < last else 0

    def attn_bias(self, state: TokenState, layer: int) -> Tensor | None:
        """Padding mask, plus log(size) of every key with proportional attention once a
        merge happened (before it every size is 1: no bias, bit-identical to ``none``)."""
        bias = padding_bias(state.keep, state.x.dtype)
        unmerged = state.keep is None and int(state.num_tokens) == state.prefix + int(state.source.shape[1])
        if not self.proportional_attn or unmerged:
            return bias
        log_size = state.size.log()[:, None, None, :].to(state.x.dtype)
        return log_size if bias is None else log_size + bias

    def mid_block(self, state: TokenState, layer: int, attn: AttentionView) -> TokenState:
        if self.variant == "classic":
            return self.classic_step(state, layer, attn)
        block = layer + 1  # the encoder counts from 0, the layers option from 1
        if block == self.layers[0]:
            return local_merge(state, self.tau, self.batch_policy == "per_image")
        if block == self.layers[1]:
            return self.adaptive_step(state)
        return state

    def classic_step(self, state: TokenState, layer: int, attn: AttentionView) -> TokenState:
        """One classic step: r from the ratio, energies of the mean keys (no host sync)."""
        p = state.prefix
        t = int(state.num_tokens) - p
        r = self.merges(layer, t)
        if r <= 0:
            return state
        if state.keep is not None:
            raise ValueError("pitome variant classic merges equal token counts per image and does not take "
                             "padded states (keep mask); run it without other reduction methods")
        with torch.no_grad():  # selection is not differentiable (authors: same)
            sim = cosine_similarity(attn.keys.mean(1)[:, p:])
            energy = elu_energy(sim, layer_margin(self.margin, layer, self.depth), self.energy == "paper")
            b = sim.shape[0]
            lengths = torch.full((b,), t, dtype=torch.long, device=sim.device)
            dest, _ = protected_plan(energy, sim, lengths.new_full((b,), r), lengths, p)
        return apply_token_map(state, dest, p + t - r)

    def adaptive_step(self, state: TokenState) -> TokenState:
        """The algm variant's PiToMe step on the hidden state: r from the Gaussian energy
        threshold (batch minimum or per image). One host sync."""
        p = state.prefix
        keep = state.patch_keep
        t = int(state.num_tokens) - p
        with torch.no_grad():
            sim = cosine_similarity(state.patches)
            log_e = gaussian_log_energy(sim, self.sigma, keep)
            lengths = (torch.full(sim.shape[:1], t, dtype=torch.long, device=sim.device)
                       if keep is None else keep.sum(1))
            passed = (log_e > gaussian_log_threshold(self.margin, self.sigma)).sum(1)
            r = torch.minimum(passed, lengths // 2)
            if self.batch_policy == "batch_min":
                r = r.min().expand_as(r)
            dest, new_lengths = protected_plan(log_e, sim, r, lengths, p)
            longest, new_keep, most = ragged(new_lengths, r.max())  # the step's one host sync
        if most <= 0:
            return state
        return apply_token_map(state, dest, longest, new_keep)
