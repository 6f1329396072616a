"""Dynamic token pruning by early exit (DToP, Tang et al., ICCV 2023), SPEC section 3.

Auxiliary heads sit after chosen encoder blocks (1-based; ViT-B style 12-layer
encoders: after blocks 6 and 8, ViT-L: 8 and 16). At such a block every live patch
token is classified by its head; a token whose top softmax probability exceeds ``p0``
*exits*: it leaves the token tensor (no attention, no MLP in later blocks, not seen by
the final decoder) and keeps the prediction of the head where it exited. For every
class present among the live tokens' argmax predictions, the ``context_k`` most
confident tokens of that class stay in regardless (context for the later blocks).

How this maps onto the hook interface (:mod:`algm.reduction`):

* ``after_block`` at a head layer runs the head, picks the exits (vectorised over the
  batch: two stable sorts give each token's confidence rank within its predicted
  class) and *physically* removes them: the survivors of every image are gathered,
  in their original order, into a tensor sized to the batch maximum; shorter images are
  padded and marked ``keep=False``, so the default ``attn_bias`` masks them and the
  mask decoder ignores them. No Python loop over images. When every image keeps the
  same number of tokens (always at batch 1) ``keep`` is ``None`` again.
* The exit-stage predictions live in ``state.aux``, a frozen :class:`PruneAux` holding,
  per original patch, the exit-stage log-probabilities (B, N, C), an ``exited`` mask
  and the 1-based block it exited after. ``source`` keeps mapping the other patches to
  their token; an exited patch's ``source`` entry is a placeholder 0 (no token holds it
  any more; ``aux.exited`` says so, and :meth:`TokenPruning.token_map` marks it -1).
* ``restore`` gathers the final decoder's per-token outputs through ``source`` and
  overwrites exited patches with their exit-stage log-probabilities.

Making the two kinds of output comparable. The mask decoder's outputs are LayerNorm'ed
class scores that Segmenter trains with cross-entropy, i.e. logits: unnormalised
log-probabilities. The heads' outputs are logits too; restore stores them as
``log_softmax`` (true log-probabilities) and passes the decoder's logits through
unchanged. The two differ from "both in log-probability space" only by one
class-independent constant per token (the decoder token's log-sum-exp). Bilinear
upsampling is linear, so such constants become a class-independent constant per
*pixel*: the per-pixel argmax and softmax of the upsampled map, and the argmax of
sliding-window averages, are exactly those of the fully normalised version (tested).
Normalising the decoder outputs as well would only cost an op and break the guarantee
below. What the constants cannot fix is a difference in temperature between the heads
and the decoder; at region borders the more confident side dominates the bilinear
blend (a product of experts in probability terms).

Exactness without exits: with ``p0 >= 1`` no head is even evaluated (a softmax
probability never exceeds 1), and at any ``p0`` a head step where no token of the
batch exits returns the state untouched; restore then gathers through the identity
index map. The output is bit-identical to the ``none`` method (tested with
``torch.equal``).

Heads. DToP's auxiliary heads are SegViT ATM heads (3 transformer-decoder layers,
384 channels, class queries cross-attending to the tokens; confidence =
``softmax(class logits) * sigmoid(mask)``), trained jointly with the fine-tuned
backbone. Here a head is ``LayerNorm -> Linear(D, n_cls)`` per token, trained on the
frozen encoder's features (a linear probe: cheap on CPU, no encoder fine-tuning) by
:mod:`baselines.prune_train`; :meth:`TokenPruning.required_training` hands the suites
that job when the heads file is missing. Differences from the authors' code, for the record: their
top-k context is taken among the exit candidates of each class, which selects the same
tokens as top-k among all live tokens of the class (the candidates are the most
confident ones); their final map multiplies the *final* head's class probabilities with
an exited token's exit-stage mask logits, while here an exited token keeps the exit
head's prediction as is; their pruned tokens are handled with a per-image loop.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from algm.cache import cache_dir
from algm.config import DatasetSpec, ViTConfig
from algm.merging.index_map import inverse_permutation, pack_tokens
from algm.methods import option, register_method
from algm.reduction import TokenReduction, TokenState, TrainingContext, TrainingTask, gather_tokens
from algm.weights.torch_file import load_torch_file

HEADS_FORMAT = "algm-bench/prune-heads/v1"
TRAIN_COMMAND = "train --method prune"

# Per-depth defaults (1-based blocks followed by a head; exit threshold).
DEFAULT_LAYERS = {12: (6, 8), 24: (8, 16)}
DEFAULT_P0 = {24: 0.95}  # ViT-L; every other depth (Ti, S, B: 12 layers) uses 0.9
P0_FALLBACK = 0.9


def parse_layers(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"6,8"`` (or a sequence of ints) -> (6, 8)."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"exit layers must be comma-separated 1-based block numbers, got {text!r}") from None
    return tuple(int(v) for v in text)


def default_layers(depth: int) -> tuple[int, ...]:
    """DToP's head positions; other depths: after depth/2 and 2*depth/3 (1-based)."""
    if depth in DEFAULT_LAYERS:
        return DEFAULT_LAYERS[depth]
    return tuple(sorted({max(1, depth // 2), max(1, (2 * depth) // 3)}))


def default_p0(depth: int) -> float:
    return DEFAULT_P0.get(depth, P0_FALLBACK)


def resolve_layers(layers: str | Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """A config's ``exit_layers`` (text, ints or None = the depth's default), validated."""
    return check_layers(parse_layers(layers) if layers is not None else default_layers(depth), depth)


def check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """Validate 1-based head positions: strictly increasing, each in 1..depth-1."""
    layers = tuple(layers)
    if not layers:
        raise ValueError("exit_layers is empty: give at least one 1-based block, e.g. 6,8")
    bad = [l for l in layers if not 1 <= l <= depth - 1]
    if bad:
        raise ValueError(
            f"exit_layers {list(layers)}: {bad} out of range; heads go after blocks "
            f"1..{depth - 1} of this {depth}-block encoder (1-based; a head after the last "
            f"block would prune nothing)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"exit_layers {list(layers)} must be strictly increasing")
    return layers


def check_p0(p0: float) -> float:
    if not isinstance(p0, (int, float)) or isinstance(p0, bool) or not (0 < p0 < math.inf):
        raise ValueError(
            f"p0 must be a number in (0, inf), got {p0!r}: tokens whose top class probability "
            f"exceeds p0 exit (p0 >= 1 disables pruning)")
    return float(p0)


@dataclass(frozen=True)
class PruneAux:
    """Exit-stage predictions per original patch (rows of non-exited patches unused).

    logits: (B, N, C) float32 log-probabilities of the head where the patch exited;
    exited: (B, N) bool; exit_layer: (B, N) long, 1-based block it exited after, 0 if not.
    """

    logits: Tensor
    exited: Tensor
    exit_layer: Tensor

    @staticmethod
    def empty(b: int, n: int, c: int, device: torch.device) -> "PruneAux":
        return PruneAux(
            logits=torch.zeros(b, n, c, device=device),
            exited=torch.zeros(b, n, dtype=torch.bool, device=device),
            exit_layer=torch.zeros(b, n, dtype=torch.long, device=device),
        )


class AuxHead(nn.Module):
    """Per-token ``LayerNorm -> Linear(D, n_cls)`` on the residual stream."""

    def __init__(self, dim: int, n_cls: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.linear = nn.Linear(dim, n_cls)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


def new_heads(dim: int, n_cls: int, count: int, eps: float = 1e-6) -> nn.ModuleList:
    """``count`` freshly initialised :class:`AuxHead` s (draws from the global RNG)."""
    return nn.ModuleList(AuxHead(dim, n_cls, eps) for _ in range(count))


def class_rank(conf: Tensor, pred: Tensor, alive: Tensor, n_cls: int) -> Tensor:
    """Rank (0 = most confident) of every token among the live tokens of its class.

    conf: (B, T) confidence; pred: (B, T) long class; alive: (B, T) bool.
    Dead tokens get rank T. Ties keep token order (stable sorts). Vectorised over B.
    """
    b, t = conf.shape
    cls = torch.where(alive, pred, torch.full_like(pred, n_cls))  # dead tokens: bucket n_cls
    by_conf = torch.sort(conf, dim=1, descending=True, stable=True).indices
    by_cls = torch.sort(cls.gather(1, by_conf), dim=1, stable=True).indices
    order = by_conf.gather(1, by_cls)  # tokens grouped by class, most confident first
    counts = torch.zeros(b, n_cls + 1, dtype=torch.long, device=conf.device)
    counts.scatter_add_(1, cls, torch.ones_like(cls))
    starts = counts.cumsum(1) - counts  # where each class's group begins in ``order``
    rank = inverse_permutation(order) - starts.gather(1, cls)
    return torch.where(alive, rank, torch.full_like(rank, t))


@register_method
class TokenPruning(TokenReduction):
    """DToP-style early exit; see the module docstring."""

    name = "prune"
    label_keys = ("p0", "exit_layers")  # trained heads' file tag would only clutter a label
    untrained_options = {"random_heads": True}

    @dataclass(frozen=True)
    class Config:
        p0: float | None = option(
            None, "exit threshold on an auxiliary head's top softmax probability; >= 1 "
                  "disables pruning (default: 0.9 for 12-layer ViTs, 0.95 for 24-layer)", type=float)
        exit_layers: tuple[int, ...] | None = option(
            None, "1-based blocks followed by an auxiliary head, e.g. 6,8 "
                  "(default: 6,8 for 12 layers, 8,16 for 24)", type=parse_layers)
        context_k: int = option(5, "most confident tokens per present class that never exit", type=int)
        random_heads: bool = option(
            False, "randomly initialised heads instead of trained ones (tests, GFLOPs)",
            action="store_true")
        heads_file: str | None = option(
            None, f"trained heads file (default: the cache entry written by `{TRAIN_COMMAND}`)")

    def __init__(self, embed_dim: int, n_cls: int, depth: int, p0: float | None = None,
                 exit_layers: Sequence[int] | None = None, context_k: int = 5,
                 norm_eps: float = 1e-6, heads_source: str = "random"):
        super().__init__()
        self.exit_layers = check_layers(exit_layers if exit_layers is not None else default_layers(depth), depth)
        self.p0 = check_p0(p0 if p0 is not None else default_p0(depth))
        if isinstance(context_k, bool) or not isinstance(context_k, int) or context_k < 1:
            raise ValueError(f"context_k must be an integer >= 1 (tokens kept per present class), "
                             f"got {context_k!r}")
        self.context_k = context_k
        self.n_cls = n_cls
        self.depth = depth
        self.heads_source = heads_source
        self.heads = new_heads(embed_dim, n_cls, len(self.exit_layers), norm_eps)
        self._head_at = {layer - 1: i for i, layer in enumerate(self.exit_layers)}  # 0-based block -> head
        self.heads_file: Path | None = None  # set by load_heads

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: "TokenPruning.Config", backbone: ViTConfig,
                    dataset: DatasetSpec) -> "TokenPruning":
        layers = resolve_layers(config.exit_layers, backbone.depth)
        source = "random" if config.random_heads else "trained"
        method = cls(backbone.embed_dim, dataset.n_cls, backbone.depth, p0=config.p0,
                     exit_layers=layers, context_k=config.context_k,
                     norm_eps=backbone.norm_eps, heads_source=source)
        if not config.random_heads:
            path = Path(config.heads_file) if config.heads_file else heads_path(
                backbone.name, dataset.name, method.exit_layers)
            method.load_heads(path, backbone, dataset)
        return method

    @classmethod
    def training_tasks(cls, config: "TokenPruning.Config", backbone: ViTConfig,
                       dataset: DatasetSpec) -> list[TrainingTask]:
        """The exit heads in the cache, unless random or given as a file."""
        if config.random_heads or config.heads_file:
            return []
        layers = resolve_layers(config.exit_layers, backbone.depth)
        path = heads_path(backbone.name, dataset.name, layers)

        def run(ctx: TrainingContext):
            return train_heads(backbone, dataset, layers, context=ctx)

        name = f"prune exit heads ({backbone.name}, {dataset.name}, layers {','.join(map(str, layers))})"
        return [TrainingTask(name, path, run)]

    def load_heads(self, path: Path, backbone: ViTConfig, dataset: DatasetSpec) -> None:
        """Load trained heads; fail clearly if missing or made for another setup."""
        layers = ",".join(map(str, self.exit_layers))
        if not path.is_file():
            raise FileNotFoundError(
                f"prune: no trained auxiliary heads for {backbone.name} / {dataset.name} at exit "
                f"layers {layers} (looked for {path}). Train them on the frozen encoder (needs a "
                f"backbone with real weights; CamVid: minutes on CPU) with:\n  algm-bench {TRAIN_COMMAND} --backbone {backbone.name} "
                f"--dataset {dataset.name} --exit-layers {layers}\nor use random heads "
                f"(random_heads=True / --random-heads) for GFLOPs and tests.")
        blob = load_torch_file(path, what="prune heads file")
        meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
        if not isinstance(blob, dict) or blob.get("format") != HEADS_FORMAT:
            raise ValueError(f"{path} is not a prune heads file (format {HEADS_FORMAT})")
        want = {"backbone": backbone.name, "embed_dim": backbone.embed_dim, "n_cls": dataset.n_cls,
                "exit_layers": list(self.exit_layers)}
        got = {k: (list(meta.get(k)) if k == "exit_layers" else meta.get(k)) for k in want}
        if got != want:
            raise ValueError(f"{path} holds heads for {got}, this model needs {want}")
        self.heads.load_state_dict(blob["state_dict"], strict=True)
        self.heads_file = path
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]  # retrained heads = new rows
        self.heads_source = f"trained:{meta.get('backbone')}/{meta.get('dataset')}:{digest}"

    def trained_parts(self) -> dict[str, Path]:
        return {} if self.heads_file is None else {"exit_heads": self.heads_file}

    def settings(self) -> dict:
        return {"p0": self.p0, "exit_layers": ",".join(map(str, self.exit_layers)),
                "context_k": self.context_k, "heads": self.heads_source}

    def label_settings(self) -> dict:
        shown = super().label_settings()
        if self.heads_source == "random":  # a warning: such exits mean nothing
            shown["heads"] = "RANDOM"
        return shown

    def extra_repr(self) -> str:
        return f"p0={self.p0}, exit_layers={self.exit_layers}, context_k={self.context_k}"

    # ------------------------------------------------------------------ hooks
    def after_block(self, state: TokenState, layer: int) -> TokenState:
        head = self._head_at.get(layer)
        if head is None or self.p0 >= 1.0:
            return state  # nothing can exit: leave every op and tensor untouched
        return self.prune(state, self.heads[head], layer + 1)

    def prune(self, state: TokenState, head: nn.Module, block: int) -> TokenState:
        """One exit step after 1-based ``block``; returns ``state`` itself if nothing exits."""
        x = state.patches
        b, t, d = x.shape
        alive = state.patch_keep if state.keep is not None else torch.ones(
            b, t, dtype=torch.bool, device=x.device)
        logp = head(x).float().log_softmax(-1)  # (B, T', C)
        top, pred = logp.max(-1)
        conf = top.exp()
        context = class_rank(conf, pred, alive, self.n_cls) < self.context_k
        exit_ = (conf > self.p0) & alive & ~context
        survive = alive & ~exit_
        counts = survive.sum(1)
        # The one host sync of the step: whether anything exits and the survivors' range.
        any_exit, fewest, most = torch.stack([exit_.any().long(), counts.min(), counts.max()]).tolist()
        if not any_exit:
            return state

        # Exit-stage predictions per original patch (patches exited earlier are left alone:
        # their source is a placeholder).
        src = state.source
        aux = state.aux if isinstance(state.aux, PruneAux) else PruneAux.empty(*src.shape, self.n_cls, x.device)
        now = exit_.gather(1, src) & ~aux.exited
        aux = PruneAux(
            logits=torch.where(now.unsqueeze(-1), gather_tokens(logp, src), aux.logits),
            exited=aux.exited | now,
            exit_layer=torch.where(now, torch.full_like(aux.exit_layer, block), aux.exit_layer),
        )

        # Survivors first (original order), then padding; patches that exited keep the
        # placeholder source 0 (restore takes their exit-stage prediction).
        packed, _ = pack_tokens(state, survive, span=(fewest, most))
        source = torch.where(aux.exited, torch.zeros_like(src), packed.source)
        return packed.replace(source=source, aux=aux)

    def restore(self, token_out: Tensor, state: TokenState) -> Tensor:
        """Decoder logits of live tokens via ``source``; exit-stage log-probs for exited patches."""
        out = gather_tokens(token_out, state.source)
        aux = state.aux
        if isinstance(aux, PruneAux):
            out = torch.where(aux.exited.unsqueeze(-1), aux.logits.to(out.dtype), out)
        return out

    def token_map(self, state: TokenState) -> Tensor:
        """(B, N) long: ``source`` with -1 for the patches that exited (no token holds them)."""
        if isinstance(state.aux, PruneAux):
            return torch.where(state.aux.exited, torch.full_like(state.source, -1), state.source)
        return state.source

    @staticmethod
    def exit_fraction(state: TokenState) -> Tensor:
        """(B,) fraction of original patches that exited early (0 if none did)."""
        if isinstance(state.aux, PruneAux):
            return state.aux.exited.float().mean(1)
        return torch.zeros(state.x.shape[0], device=state.x.device)


# ====================================================================== trained heads
def heads_path(backbone: str, dataset: str, layers: Sequence[int]) -> Path:
    """Where :func:`train_heads` writes (and ``from_config`` looks for) trained heads."""
    return cache_dir("prune") / f"heads-{backbone}-{dataset}-L{'-'.join(map(str, layers))}.pt"


def train_heads(backbone: ViTConfig, dataset: DatasetSpec, layers: Sequence[int], *, context: TrainingContext,
                seed: int = 0, out: str | Path | None = None, **options):
    """Train the exit heads of ``layers`` on the frozen real encoder that ``context``
    gives (with its features, data root, window and progress); write ``out`` (default
    :func:`heads_path`). ``options`` go to :func:`baselines.prune_train.train_aux_heads`
    (split, limit, epochs, lr, weight_decay, batch_tokens, restart). Returns its
    ``TrainResult``."""
    from baselines.prune_train import train_aux_heads  # training code only when training

    layers = check_layers(layers, backbone.depth)
    torch.manual_seed(seed)  # the heads' initialisation follows from the seed
    heads = new_heads(backbone.embed_dim, dataset.n_cls, len(layers), backbone.norm_eps)
    path = Path(out) if out is not None else heads_path(backbone.name, dataset.name, layers)
    return train_aux_heads(heads, backbone, dataset, layers, path, file_format=HEADS_FORMAT, context=context,
                           seed=seed, **options)
