"""EViT: keep the attentive tokens, fuse the rest (Liang et al., ICLR 2022), SPEC section 10.

As Expedit-Segmenter ported it to segmentation (``mmseg/models/backbones/evit.py``,
training-free, ``fuse_token=True``, reconstruction ``k=1``). In every reduction block,
after the attention residual and before the MLP (so that block's MLP already runs on
fewer tokens):

* score every patch token by the cls token's attention to it, the softmax row of the
  cls query over all tokens, averaged over heads;
* the ``ceil(keep_rate * n)`` best-scored of the ``n`` patch tokens stay (``n`` counts the
  fused token of an earlier block: it is a token like any other and may stay or be
  fused again); when none would go the block does nothing;
* the others fuse into ONE token appended behind the kept ones: ``sum_i a_i x_i`` with
  ``a_i`` their scores, exactly as the authors' code (EViT and the port) computes it -
  NOT renormalised by ``sum_i a_i``, so the fused token is shorter than its parts.
  Its size is the number of patches it holds; ``source`` sends those patches to it.

Reconstruction before the decoder (``reconstruct="nearest"``, the port's rule). The port
stores, at every reduction block, the patch features at that point (the hidden state x
after the attention residual) and, from the last block back to the first, gives every
token the final feature of a token that survived that block: a kept token its own, a
fused-away token the final feature of the kept token nearest to it there (squared L2
distance; weights ``exp(-0.005 d^2)`` over the k = 1 nearest, L2-normalised, i.e. 1).
The fused token's own final feature is dropped at that block's step. Every step is an
index map (token -> surviving token), so the composition is one (B, N) map built along
the forward (in ``aux``) and ``before_decoder`` is one gather: the decoder sees all N
patch tokens, as in the port. ``reconstruct="source"`` is the cheaper reading that the
suite's other methods use: the decoder runs on the reduced tokens (fused token
included) and ``restore`` copies each token's output to its patches through ``source``.

Default blocks: the port reduces at blocks 7, 13, 19 (0-based) of ViT-L's 24, i.e. 8, 14,
20 (1-based): a third, 7/12 and 5/6 of the depth. Scaled to 12 blocks that is 4, 7, 10,
which are also EViT's own DeiT blocks (0-based 3, 6, 9). Keep rate 0.8, the port's
(published ViT-L keep rates 0.9 / 0.8 / 0.5; 0.5 loses 13 mIoU there).

Differences from the port, all without effect on the arithmetic except where said:

* batched and vectorised (the port runs at batch 1 only; its reconstruction writes
  ``out[0, idx]``). Every image keeps ``ceil(keep_rate * n)`` of the same n, so token
  counts stay equal across a batch and there is no batch policy to choose; an image's
  output never depends on its neighbours. A padded input (``keep`` given, e.g. by a
  composed method) is handled per image: each image keeps ``ceil(keep_rate * n_b)`` of
  its own live tokens, padding is never scored, kept, fused or a reconstruction target,
  and the output is padded again (``ragged`` counts, one host sync per step; none
  without padding);
* kept tokens keep their original relative order, where the port orders them by
  descending score; the blocks are permutation-equivariant, so only float summation
  order differs. Ties in the score go to the lower index (stable sort; ``topk`` leaves
  them undefined);
* nearest kept token by argmin of the squared distance, where the port takes the top-1
  of ``exp(-0.005 d^2)``: the same token unless that weight underflows to 0 for every
  candidate (d^2 above about 2e4 in float32), where the port's row becomes zeros (and
  ties at exactly equal distance keep several tokens there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.merging.index_map import compose_source, keep_mask, merge_by_index
from algm.methods import option, register_method
from algm.reduction import AttentionView, TokenReduction, TokenState, gather_tokens

KEEP_RATE = 0.8  # the port's ViT-L setting
PORT_BLOCKS = (8, 14, 20)  # 1-based reduction blocks of the port's 24-block ViT-L
PORT_DEPTH = 24
RECONSTRUCT = ("nearest", "source")


def default_layers(depth: int) -> tuple[int, ...]:
    """The port's blocks at the same fractions of ``depth`` (12 -> 4, 7, 10; 24 -> 8, 14, 20)."""
    return tuple(sorted({min(depth, max(1, round(b * depth / PORT_DEPTH))) for b in PORT_BLOCKS}))


def parse_layers(text) -> tuple[int, ...]:
    """``"4,7,10"``, ``4`` or ``[4, 7, 10]`` -> (4, 7, 10) (command-line type of ``--layers``)."""
    if isinstance(text, str):
        try:
            return tuple(int(p) for p in text.replace(" ", "").split(",") if p)
        except ValueError:
            raise ValueError(f"layers must be comma-separated block numbers like 4,7,10, got {text!r}") from None
    if isinstance(text, int) and not isinstance(text, bool):
        return (text,)
    try:
        return tuple(text)
    except TypeError:
        raise ValueError(f"layers must be block numbers like 4,7,10, got {text!r}") from None


def _check_keep_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, Real) or not math.isfinite(float(rate)):
        raise ValueError(f"keep_rate must be a number in (0, 1], got {rate!r}")
    if not 0 < float(rate) <= 1:
        raise ValueError(f"keep_rate must lie in (0, 1] (1 keeps every token), got {rate!r}")
    return float(rate)


def _check_layers(layers, depth: int | None = None) -> tuple[int, ...]:
    layers = parse_layers(layers)
    if not layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise ValueError(f"layers must be one or more integer block numbers (1-based) like 4,7,10, got {layers!r}")
    if layers[0] < 1 or any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be increasing 1-based block numbers, got {layers!r}")
    if depth is not None and layers[-1] > depth:
        raise ValueError(f"layers {layers!r} exceed the encoder depth {depth} (blocks are 1 .. {depth})")
    return layers


@dataclass(frozen=True)
class EViTAux:
    """``recon``: (B, N) long, for every original patch the patch token (index among the
    current patch tokens) whose final feature it takes under the port's reconstruction."""

    recon: Tensor


@dataclass(frozen=True)
class Selection:
    """Which patch tokens of one reduction block stay (B batch, P patch tokens).

    order: (B, P) patch indices by descending score (stable; padding last); kept: (B, P)
    bool; count: (B,) tokens kept; alive: (B, P) bool, real tokens; span: (fewest, most)
    kept over the batch; length: tokens out, prefix included (the batch maximum); keep:
    (B, length) mask of the output or None when nothing is padded.
    """

    order: Tensor
    kept: Tensor
    count: Tensor
    alive: Tensor
    span: tuple[int, int]
    length: int
    keep: Tensor | None


def cls_scores(attn: AttentionView, state: TokenState) -> Tensor:
    """(B, P) head-averaged attention of the cls token to every patch token; -inf on
    padding (whose attention is 0 anyway: the bias masks it)."""
    scores = attn.cls_attention()[:, :, state.prefix:].mean(1)
    alive = state.patch_keep
    return scores if alive is None else scores.masked_fill(~alive, float("-inf"))


def select(scores: Tensor, alive: Tensor | None, keep_rate: float, prefix: int) -> Selection | None:
    """The top ``ceil(keep_rate * n_b)`` of every image's n_b live tokens; None when no
    image drops a token. scores: (B, P) from :func:`cls_scores`; alive: (B, P) or None.

    Without padding the counts are Python ints (no host sync); with padding one read of
    (fewest kept, most kept, shortest, longest output, whether any image fuses)."""
    b, p = scores.shape
    dev = scores.device
    if alive is None:
        k = math.ceil(keep_rate * p)  # the port's rule, in float64 like the tensor path below
        if k >= p:
            return None
        count = torch.full((b,), k, dtype=torch.long, device=dev)
        alive = torch.ones(b, p, dtype=torch.bool, device=dev)
        span, length, keep = (k, k), prefix + k + 1, None
    else:
        live = alive.sum(1)
        count = torch.ceil(live.double() * keep_rate).long()
        lengths = prefix + count + (count < live).long()  # a fused token only where some go
        fewest, most, shortest, longest, fuses = torch.stack(
            [count.min(), count.max(), lengths.min(), lengths.max(), (count < live).any().long()]).tolist()
        if not fuses:
            return None
        span, length = (fewest, most), longest
        keep = keep_mask(lengths, longest, shortest < longest)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    top = order[:, :span[1]]
    kept = torch.zeros(b, p, dtype=torch.bool, device=dev).scatter_(
        1, top, torch.arange(span[1], device=dev) < count.unsqueeze(1))
    return Selection(order, kept, count, alive, span, length, keep)


def token_dest(sel: Selection, prefix: int) -> Tensor:
    """(B, prefix + P) token map of the step: prefix tokens stay, kept patch tokens go to
    ``prefix + rank`` (original order), fused-away ones to the slot behind the kept
    (``prefix + count``), padding to the trash slot ``length``."""
    b = sel.kept.shape[0]
    rank = sel.kept.long().cumsum(1) - 1
    fused = sel.alive & ~sel.kept
    patch = torch.where(sel.kept, rank, torch.where(fused, sel.count.unsqueeze(1), sel.length - prefix))
    head = torch.arange(prefix, device=patch.device).expand(b, prefix)
    return torch.cat([head, patch + prefix], 1)


def fuse(state: TokenState, sel: Selection, scores: Tensor, dest: Tensor) -> TokenState:
    """Kept tokens carried over, the rest summed into one token weighted by their scores.

    ``merge_by_index`` with the scores as weights gives ``sum(a x) / sum(a)`` for the fused
    slot and the token itself for a kept one (weight 1); multiplying back by the summed
    weight leaves kept tokens exact and makes the fused one the authors' plain weighted
    sum. Sizes are added separately (patch counts), ``source`` is composed with ``dest``."""
    p = state.prefix
    fused = sel.alive & ~sel.kept
    patch_w = torch.where(fused, scores, sel.kept.to(scores.dtype))
    weight = torch.cat([torch.ones_like(state.size[:, :p]), patch_w.to(state.size.dtype)], 1)
    x, total = merge_by_index(state.x, weight, dest, sel.length)
    x = x * total.unsqueeze(-1).to(x.dtype)
    size = state.size.new_zeros(dest.shape[0], sel.length + 1).scatter_add_(1, dest, state.size)
    return state.replace(x=x, size=size[:, :sel.length], source=compose_source(state.source, dest, p),
                         keep=sel.keep)


def nearest_kept(patches: Tensor, sel: Selection, dest: Tensor, prefix: int) -> Tensor:
    """(B, P) long: for every patch token of this block the new patch index of the token
    whose final feature it takes: a kept token itself, a fused-away token the kept token
    nearest to it in ``patches`` (B, P, D) (squared L2; padding -> 0, never referenced).

    Only the rows that can be fused away (sorted positions from the fewest kept on) are
    compared with the columns that can be kept (the first ``most`` sorted positions):
    (P - k) x k distances without padding, as in the port, by one matmul."""
    fewest, most = sel.span
    pos = torch.arange(patches.shape[1], device=patches.device)
    cand, rows = sel.order[:, :most], sel.order[:, fewest:]
    cand_ok = pos[:most] < sel.count.unsqueeze(1)
    rows_ok = sel.alive.gather(1, rows) & ~sel.kept.gather(1, rows)
    d = patches.shape[-1]
    xc = patches.gather(1, cand.unsqueeze(-1).expand(-1, -1, d))
    xr = patches.gather(1, rows.unsqueeze(-1).expand(-1, -1, d))
    # argmin_j |xr - xc_j|^2 = argmax_j (2 xr.xc_j - |xc_j|^2): the row's own norm is constant
    affinity = 2 * (xr @ xc.transpose(1, 2)) - xc.square().sum(-1).unsqueeze(1)
    best = affinity.masked_fill(~cand_ok.unsqueeze(1), float("-inf")).argmax(-1)
    new = (dest[:, prefix:] - prefix).masked_fill(~sel.kept, 0)  # new patch index of kept tokens
    target = new.gather(1, cand.gather(1, best))
    return new.scatter(1, rows, torch.where(rows_ok, target, new.gather(1, rows)))


def reconstruct(state: TokenState, recon: Tensor) -> TokenState:
    """One token per original patch: patch n takes the feature of patch token
    ``recon[:, n]`` (B, N); prefix tokens stay, ``source`` becomes the identity."""
    b, n = recon.shape
    x = torch.cat([state.x[:, :state.prefix], gather_tokens(state.patches, recon)], 1)
    size = torch.ones(b, state.prefix + n, dtype=state.size.dtype, device=state.size.device)
    source = torch.arange(n, device=recon.device).expand(b, n)
    return state.replace(x=x, size=size, source=source, keep=None, aux=None)


@register_method
class EViT(TokenReduction):
    """Keep the tokens the cls token attends to, fuse the rest (see the module docstring)."""

    name = "evit"
    label_keys = ("keep_rate", "layers", "reconstruct")

    @dataclass(frozen=True)
    class Config:
        keep_rate: float = option(
            KEEP_RATE, "fraction of the patch tokens kept (ceil) at each reduction block; the "
                       "rest fuse into one token weighted by the cls attention (1 = no reduction)",
            type=float)
        layers: tuple[int, ...] | None = option(
            None, "1-based reduction blocks, e.g. 4,7,10 (per config: the port's 8,14,20 of 24 "
                  "blocks at the same fractions of the depth, 4,7,10 for 12)", type=parse_layers)
        reconstruct: str = option(
            "nearest", "nearest: before the decoder every fused-away token takes the final "
                       "feature of its nearest kept token at the reduction block (the port, k=1); "
                       "source: the decoder runs on the reduced tokens, outputs copied to patches",
            choices=RECONSTRUCT)

        def __post_init__(self):
            object.__setattr__(self, "keep_rate", _check_keep_rate(self.keep_rate))
            if self.layers is not None:
                object.__setattr__(self, "layers", _check_layers(self.layers))
            if self.reconstruct not in RECONSTRUCT:
                raise ValueError(f"reconstruct must be one of {RECONSTRUCT}, got {self.reconstruct!r}")

    def __init__(self, keep_rate: float = KEEP_RATE, layers=(4, 7, 10), reconstruct: str = "nearest",
                 depth: int | None = None):
        super().__init__()
        cfg = self.Config(keep_rate=keep_rate, layers=layers, reconstruct=reconstruct)
        self.keep_rate = cfg.keep_rate
        self.layers = _check_layers(cfg.layers, depth)
        self.reconstruct = cfg.reconstruct
        self._blocks = frozenset(b - 1 for b in self.layers)  # the encoder counts from 0

    @classmethod
    def from_config(cls, config: "EViT.Config", backbone: ViTConfig, dataset: DatasetSpec) -> "EViT":
        layers = config.layers if config.layers is not None else default_layers(backbone.depth)
        return cls(keep_rate=config.keep_rate, layers=layers, reconstruct=config.reconstruct,
                   depth=backbone.depth)

    def settings(self) -> dict:
        return {"keep_rate": self.keep_rate, "layers": ",".join(map(str, self.layers)),
                "reconstruct": self.reconstruct}

    def label_settings(self) -> dict:
        shown = super().label_settings()
        if shown.get("reconstruct") == "nearest":  # the default: not worth a word
            del shown["reconstruct"]
        return shown

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())

    def mid_block(self, state: TokenState, layer: int, attn: AttentionView) -> TokenState:
        if layer not in self._blocks:
            return state
        scores = cls_scores(attn, state)
        with torch.no_grad():  # the selection is not differentiable (authors: same)
            sel = select(scores, state.patch_keep, self.keep_rate, state.prefix)
            if sel is None:
                return state
            dest = token_dest(sel, state.prefix)
        out = fuse(state, sel, scores, dest)
        if self.reconstruct != "nearest":
            return out
        with torch.no_grad():
            near = nearest_kept(state.patches, sel, dest, state.prefix)
        recon = state.aux.recon if isinstance(state.aux, EViTAux) else state.source
        return out.replace(aux=EViTAux(near.gather(1, recon)))

    def before_decoder(self, state: TokenState) -> TokenState:
        """``nearest``: one token per patch, the final feature of the token its reconstruction
        map names; otherwise (or when no block reduced) the state as it is."""
        if self.reconstruct != "nearest" or not isinstance(state.aux, EViTAux):
            return state
        return reconstruct(state, state.aux.recon)
