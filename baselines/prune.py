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
  any more; ``aux.exited`` says so).
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
frozen encoder's features with :func:`train_aux_heads` (a linear probe: cheap on CPU,
no encoder fine-tuning). Differences from the authors' code, for the record: their
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algm.cache import cache_dir
from algm.config import DatasetSpec, ViTConfig
from algm.methods import option
from algm.reduction import EncoderContext, TokenReduction, TokenState, gather_tokens

HEADS_FORMAT = "algm-bench/prune-heads/v1"
FEATURES_FORMAT = "algm-bench/prune-features/v1"
TRAIN_COMMAND = "train-prune-heads"

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


def class_rank(conf: Tensor, pred: Tensor, alive: Tensor, n_cls: int) -> Tensor:
    """Rank (0 = most confident) of every token among the live tokens of its class.

    conf: (B, T) confidence; pred: (B, T) long class; alive: (B, T) bool.
    Dead tokens get rank T. Ties keep token order (stable sorts). Vectorised over B.
    """
    b, t = conf.shape
    cls = torch.where(alive, pred, torch.full_like(pred, n_cls))  # dead tokens: bucket n_cls
    by_conf = torch.sort(conf, dim=1, descending=True, stable=True).indices
    cls_sorted = cls.gather(1, by_conf)
    by_cls = torch.sort(cls_sorted, dim=1, stable=True).indices
    order = by_conf.gather(1, by_cls)  # tokens grouped by class, most confident first
    cls_order = cls.gather(1, order)
    counts = torch.zeros(b, n_cls + 1, dtype=torch.long, device=conf.device)
    counts.scatter_add_(1, cls, torch.ones_like(cls))
    starts = counts.cumsum(1) - counts
    pos = torch.arange(t, device=conf.device).expand(b, t)
    rank_sorted = pos - starts.gather(1, cls_order)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    return torch.where(alive, rank, torch.full_like(rank, t))


class TokenPruning(TokenReduction):
    """DToP-style early exit; see the module docstring."""

    name = "prune"

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
        self.heads = nn.ModuleList(AuxHead(embed_dim, n_cls, norm_eps) for _ in self.exit_layers)
        self._head_at = {layer - 1: i for i, layer in enumerate(self.exit_layers)}  # 0-based block -> head

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: "TokenPruning.Config", backbone: ViTConfig,
                    dataset: DatasetSpec) -> "TokenPruning":
        layers = config.exit_layers
        if isinstance(layers, str):
            layers = parse_layers(layers)
        source = "random" if config.random_heads else "trained"
        method = cls(backbone.embed_dim, dataset.n_cls, backbone.depth, p0=config.p0,
                     exit_layers=layers, context_k=config.context_k,
                     norm_eps=backbone.norm_eps, heads_source=source)
        if not config.random_heads:
            path = Path(config.heads_file) if config.heads_file else heads_path(
                backbone.name, dataset.name, method.exit_layers)
            method.load_heads(path, backbone, dataset)
        return method

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
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
        if not isinstance(blob, dict) or blob.get("format") != HEADS_FORMAT:
            raise ValueError(f"{path} is not a prune heads file (format {HEADS_FORMAT})")
        want = {"backbone": backbone.name, "embed_dim": backbone.embed_dim, "n_cls": dataset.n_cls,
                "exit_layers": list(self.exit_layers)}
        got = {k: (list(meta.get(k)) if k == "exit_layers" else meta.get(k)) for k in want}
        if got != want:
            raise ValueError(f"{path} holds heads for {got}, this model needs {want}")
        self.heads.load_state_dict(blob["state_dict"], strict=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]  # retrained heads = new rows
        self.heads_source = f"trained:{meta.get('backbone')}/{meta.get('dataset')}:{digest}"

    def settings(self) -> dict:
        return {"p0": self.p0, "exit_layers": ",".join(map(str, self.exit_layers)),
                "context_k": self.context_k, "heads": self.heads_source}

    def extra_repr(self) -> str:
        return f"p0={self.p0}, exit_layers={self.exit_layers}, context_k={self.context_k}"

    # ------------------------------------------------------------------ hooks
    def begin(self, patches: Tensor, ctx: EncoderContext) -> TokenState:
        return TokenState.identity(patches, ctx.grid)

    def after_block(self, state: TokenState, layer: int) -> TokenState:
        head = self._head_at.get(layer)
        if head is None or self.p0 >= 1.0:
            return state  # nothing can exit: leave every op and tensor untouched
        return self.prune(state, self.heads[head], layer + 1)

    def prune(self, state: TokenState, head: nn.Module, block: int) -> TokenState:
        """One exit step after 1-based ``block``; returns ``state`` itself if nothing exits."""
        x = state.x[:, 1:]
        b, t, d = x.shape
        alive = state.keep[:, 1:] if state.keep is not None else torch.ones(
            b, t, dtype=torch.bool, device=x.device)
        logp = head(x).float().log_softmax(-1)  # (B, T', C)
        top, pred = logp.max(-1)
        conf = top.exp()
        context = class_rank(conf, pred, alive, self.n_cls) < self.context_k
        exit_ = (conf > self.p0) & alive & ~context
        if not bool(exit_.any()):
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

        # Survivors first (original order), then padding; sized to the batch maximum.
        survive = alive & ~exit_
        counts = survive.sum(1)
        m = int(counts.max())
        order = torch.sort((~survive).to(torch.uint8), dim=1, stable=True).indices
        idx = order[:, :m]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(t, device=x.device).expand(b, t))
        source = torch.where(aux.exited, torch.zeros_like(src), rank.gather(1, src))
        keep = torch.arange(m, device=x.device).expand(b, m) < counts.unsqueeze(1)
        new_x = torch.cat([state.x[:, :1], x.gather(1, idx.unsqueeze(-1).expand(b, m, d))], 1)
        size = state.size[:, 1:].gather(1, idx) * keep.to(state.size.dtype)  # padding stands for 0 patches
        new_size = torch.cat([state.size[:, :1], size], 1)
        new_keep = None
        if not bool(keep.all()):
            new_keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), keep], 1)
        return state.replace(x=new_x, size=new_size, source=source, keep=new_keep, aux=aux)

    def restore(self, token_out: Tensor, state: TokenState) -> Tensor:
        """Decoder logits of live tokens via ``source``; exit-stage log-probs for exited patches."""
        out = gather_tokens(token_out, state.source)
        aux = state.aux
        if isinstance(aux, PruneAux):
            out = torch.where(aux.exited.unsqueeze(-1), aux.logits.to(out.dtype), out)
        return out

    @staticmethod
    def exit_fraction(state: TokenState) -> Tensor:
        """(B,) fraction of original patches that exited early (0 if none did)."""
        if isinstance(state.aux, PruneAux):
            return state.aux.exited.float().mean(1)
        return torch.zeros(state.x.shape[0], device=state.x.device)


# ====================================================================== heads training
def _key(backbone: str, dataset: str, layers: Sequence[int]) -> str:
    return f"{backbone}-{dataset}-L{'-'.join(map(str, layers))}"


def heads_path(backbone: str, dataset: str, layers: Sequence[int]) -> Path:
    """Where :func:`train_aux_heads` writes (and ``from_config`` looks for) trained heads."""
    return cache_dir("prune") / f"heads-{_key(backbone, dataset, layers)}.pt"


def features_dir(backbone: str, dataset: str, split: str, layers: Sequence[int],
                 window: tuple[int, int], limit: int | None = None) -> Path:
    tag = f"{_key(backbone, dataset, layers)}-{split}-{window[0]}x{window[1]}"
    if limit is not None:
        tag += f"-n{limit}"
    return cache_dir("prune", "features", tag)


class _Captured(Exception):
    """Raised by the tap after the last needed block to stop the encoder early."""


class _FeatureTap(TokenReduction):
    """Records the patch tokens after the given 0-based blocks (exactly what the pruning
    hook sees when nothing has exited yet) and stops the encoder after the last one."""

    def __init__(self, blocks: Sequence[int]):
        super().__init__()
        self.blocks = tuple(blocks)
        self.features: list[Tensor] = []

    def after_block(self, state: TokenState, layer: int) -> TokenState:
        if layer in self.blocks:
            self.features.append(state.x[:, 1:])
            if layer == self.blocks[-1]:
                raise _Captured
        return state


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: Tensor, layers: Sequence[int]) -> Tensor:
    """(B, len(layers), N, D) patch tokens after the 1-based ``layers`` of ``encoder``."""
    tap = _FeatureTap([l - 1 for l in layers])
    try:
        encoder(images, tap)
    except _Captured:
        pass
    return torch.stack(tap.features, 1)


def patch_labels(label: Tensor, grid: tuple[int, int], n_cls: int, ignore_index: int) -> Tensor:
    """(H, W) pixel labels -> (h*w,) per-patch labels by majority vote.

    The label is resized (nearest) to a multiple of the grid; a patch takes its most
    frequent class, or ``ignore_index`` when ignored pixels outnumber every class.
    """
    h, w = grid
    ph = max(1, -(-label.shape[0] // h))
    pw = max(1, -(-label.shape[1] // w))
    lab = label.long()
    if tuple(lab.shape) != (h * ph, w * pw):
        lab = F.interpolate(lab[None, None].float(), size=(h * ph, w * pw), mode="nearest")[0, 0].long()
    lab = torch.where((lab >= 0) & (lab < n_cls), lab, torch.full_like(lab, n_cls))  # ignore -> bucket n_cls
    cells = lab.reshape(h, ph, w, pw).permute(0, 2, 1, 3).reshape(h * w, ph * pw)
    hist = torch.zeros(h * w, n_cls + 1, dtype=torch.long).scatter_add_(1, cells, torch.ones_like(cells))
    best = hist.argmax(1)
    return torch.where(best == n_cls, torch.full_like(best, ignore_index), best)


def prepare_image(image: Tensor, window: tuple[int, int], mean, std) -> Tensor:
    """uint8 (3, H, W) -> normalised (1, 3, *window): the test-time transform
    (short side to the window's, bilinear) when it yields the window (CamVid), else a
    plain resize to the window."""
    from algm.data.transforms import preprocess

    x = preprocess(image, min(window), mean, std)
    if tuple(x.shape[-2:]) != tuple(window):
        x = image.unsqueeze(0).float().div(255)
        x = F.interpolate(x, size=tuple(window), mode="bilinear", align_corners=False)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x


def extract_features(encoder: nn.Module, samples: Sequence, layers: Sequence[int],
                     window: tuple[int, int], n_cls: int, ignore_index: int, out_dir: Path,
                     chunk: int = 32, batch_size: int = 4, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Frozen features at ``layers`` for every sample, cached in ``out_dir`` in chunks.

    samples: indexable, items with ``.image`` (3, H, W) uint8 and ``.label`` (H, W).
    Chunks already on disk are reused (an interrupted extraction resumes).
    Returns features (S, L, N, D) float16 and per-patch labels (S, N) long.
    """
    from tqdm import tqdm

    cfg = encoder.cfg
    grid = (window[0] // cfg.patch_size, window[1] // cfg.patch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    feats, labels = [], []
    encoder.eval()
    with tqdm(total=n, desc="features", unit="img", disable=not progress) as bar:
        for start in range(0, n, chunk):
            path = out_dir / f"chunk-{start // chunk:05d}.pt"
            stop = min(n, start + chunk)
            if path.is_file():
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob.get("format") == FEATURES_FORMAT and blob["range"] == [start, stop]:
                    feats.append(blob["features"])
                    labels.append(blob["labels"])
                    bar.update(stop - start)
                    continue
            f_chunk, l_chunk = [], []
            for s in range(start, stop, batch_size):
                items = [samples[i] for i in range(s, min(stop, s + batch_size))]
                images = torch.cat([prepare_image(it.image, window, cfg.mean, cfg.std) for it in items])
                f_chunk.append(encoder_features(encoder, images, layers).half())
                l_chunk.extend(patch_labels(it.label, grid, n_cls, ignore_index) for it in items)
                bar.update(len(items))
            blob = {"format": FEATURES_FORMAT, "range": [start, stop],
                    "features": torch.cat(f_chunk), "labels": torch.stack(l_chunk)}
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.replace(path)
            feats.append(blob["features"])
            labels.append(blob["labels"])
    return torch.cat(feats), torch.cat(labels)


@dataclass(frozen=True)
class TrainResult:
    path: Path
    epochs: int
    train_loss: list[float]
    train_acc: list[float]
    seconds: float
    extract_seconds: float


def fit_heads(heads: nn.ModuleList, features: Tensor, labels: Tensor, ignore_index: int,
              epochs: int, lr: float = 1e-3, weight_decay: float = 1e-4, batch_tokens: int = 4096,
              seed: int = 0, checkpoint: Path | None = None, progress: bool = True,
              ) -> tuple[list[float], list[float]]:
    """Train each head on its layer's features with cross-entropy (AdamW, cosine LR).

    features: (S, L, N, D) (any float dtype), labels: (S, N); tokens labelled
    ``ignore_index`` are dropped up front. Shuffling uses a generator seeded with
    ``seed + epoch``, so a run resumed from ``checkpoint`` (saved after every epoch)
    continues exactly as the uninterrupted one. Returns per-epoch mean loss and token
    accuracy (averaged over heads).
    """
    from tqdm import tqdm

    s, nl, n, d = features.shape
    if nl != len(heads):
        raise ValueError(f"features hold {nl} layers but there are {len(heads)} heads")
    flat = features.permute(0, 2, 1, 3).reshape(s * n, nl, d)
    y = labels.reshape(-1)
    valid = y != ignore_index
    flat, y = flat[valid], y[valid]
    total = y.numel()
    if total == 0:
        raise ValueError("no labelled tokens to train the heads on")
    steps = -(-total // batch_tokens)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    losses: list[float] = []
    accs: list[float] = []
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
        heads.load_state_dict(blob["heads"])
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        first, losses, accs = blob["epoch"], list(blob["loss"]), list(blob["acc"])
    heads.train()
    for epoch in range(first, epochs):
        gen = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(total, generator=gen)
        run_loss = run_acc = 0.0
        with tqdm(range(steps), desc=f"heads epoch {epoch + 1}/{epochs}", unit="step",
                  disable=not progress, leave=False) as bar:
            for step in bar:
                sel = perm[step * batch_tokens:(step + 1) * batch_tokens]
                xb, yb = flat[sel].float(), y[sel]
                loss = 0.0
                acc = 0.0
                for i, head in enumerate(heads):
                    out = head(xb[:, i])
                    loss = loss + F.cross_entropy(out, yb)
                    acc += (out.argmax(-1) == yb).float().mean().item() / nl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                run_loss += loss.item() / nl * len(sel)
                run_acc += acc * len(sel)
                bar.set_postfix(loss=f"{loss.item() / nl:.3f}")
        losses.append(run_loss / total)
        accs.append(run_acc / total)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}, token acc {accs[-1]:.3f}")
        if checkpoint is not None:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"epoch": epoch + 1, "heads": heads.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "loss": losses, "acc": accs}, tmp)
            tmp.replace(checkpoint)
    heads.eval()
    return losses, accs


def train_aux_heads(backbone: str = "vit-s14", dataset: str = "camvid", epochs: int = 10, *,
                    exit_layers: Sequence[int] | None = None, window: tuple[int, int] | None = None,
                    split: str = "train", data_root: str | None = None, limit: int | None = None,
                    lr: float = 1e-3, weight_decay: float = 1e-4, batch_tokens: int = 4096,
                    seed: int = 0, restart: bool = False, out: str | Path | None = None,
                    progress: bool = True) -> TrainResult:
    """Train the pruning heads on the real frozen encoder; write them where ``from_config`` looks.

    1. Features at the head layers are extracted once (``algm.cache.cache_dir("prune")``,
       keyed by backbone / dataset / split / layers / window; resumable in chunks).
    2. Heads (``LayerNorm -> Linear``) train with cross-entropy on labels reduced to the
       patch grid by majority vote (the dataset's ignore index is skipped); a checkpoint
       after every epoch lets an interrupted run resume (``restart=True`` starts over).
    3. The heads file (with its metadata) goes to :func:`heads_path` or ``out``.
    """
    from algm.build import make_setup
    from algm.data.datasets import build_dataset

    start_time = time.perf_counter()
    torch.manual_seed(seed)
    setup = make_setup(backbone, dataset, "none", window=window, pretrained=True)
    cfg, spec, window = setup.backbone, setup.dataset, setup.window
    layers = check_layers(exit_layers if exit_layers is not None else default_layers(cfg.depth), cfg.depth)
    data = build_dataset(dataset, split, root=data_root, limit=limit)
    fdir = features_dir(cfg.name, spec.name, split, layers, window, limit)
    features, labels = extract_features(setup.model.encoder, data, layers, window, spec.n_cls,
                                        spec.ignore_index, fdir, progress=progress)
    extract_seconds = time.perf_counter() - start_time

    torch.manual_seed(seed)
    method = TokenPruning(cfg.embed_dim, spec.n_cls, cfg.depth, p0=2.0, exit_layers=layers,
                          norm_eps=cfg.norm_eps)
    path = Path(out) if out is not None else heads_path(cfg.name, spec.name, layers)
    ckpt = fdir / f"train-e{epochs}-s{seed}-lr{lr:g}-wd{weight_decay:g}-b{batch_tokens}.ckpt"
    if restart and ckpt.exists():
        ckpt.unlink()
    losses, accs = fit_heads(method.heads, features, labels, spec.ignore_index, epochs, lr=lr,
                             weight_decay=weight_decay, batch_tokens=batch_tokens, seed=seed,
                             checkpoint=ckpt, progress=progress)
    meta = {"backbone": cfg.name, "weights": cfg.weights, "dataset": spec.name, "split": split,
            "exit_layers": list(layers), "embed_dim": cfg.embed_dim, "n_cls": spec.n_cls,
            "window": list(window), "epochs": epochs, "seed": seed, "lr": lr,
            "images": int(features.shape[0]), "train_loss": losses, "train_acc": accs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": HEADS_FORMAT, "meta": meta, "state_dict": method.heads.state_dict()}, tmp)
    tmp.replace(path)
    return TrainResult(path, epochs, losses, accs, time.perf_counter() - start_time, extract_seconds)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-prune-heads`` (``args.func(args)`` runs it and returns 0)."""
    from algm.config import BACKBONES, DATASETS, parse_crop

    p = subparsers.add_parser(
        TRAIN_COMMAND, help="train the token-pruning (DToP) auxiliary heads on frozen features",
        description="Train the auxiliary heads of the `prune` method (LayerNorm + linear per "
                    "token) on features of the real frozen encoder. Features are extracted once "
                    "and cached under $ALGM_BENCH_CACHE/prune; training checkpoints every epoch "
                    "and resumes when rerun. The heads land where `--method prune` finds them. "
                    "CamVid train with vit-s14 takes a few minutes on 2 CPU cores.")
    p.add_argument("--backbone", default="vit-s14", choices=[n for n, c in BACKBONES.items() if c.weights],
                   help="encoder with real weights (default: vit-s14)")
    p.add_argument("--dataset", default="camvid", choices=list(DATASETS), help="dataset (default: camvid)")
    p.add_argument("--split", default="train", help="split to train on (default: train)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT; CamVid: ../shared/data/camvid)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--crop", default=None, help="window N or HxW (default: the dataset's)")
    p.add_argument("--exit-layers", type=parse_layers, default=None,
                   help="1-based blocks with a head, e.g. 6,8 (default: 6,8 for 12 layers, 8,16 for 24)")
    p.add_argument("--epochs", type=int, default=10, help="epochs over the cached features (default: 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (default: 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and shuffling (default: 0)")
    p.add_argument("--restart", action="store_true", help="ignore a training checkpoint and start over")
    p.add_argument("--out", default=None, help="heads file (default: the cache entry `--method prune` reads)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        window = parse_crop(args.crop) if args.crop else None
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        res = train_aux_heads(args.backbone, args.dataset, args.epochs, exit_layers=args.exit_layers,
                              window=window, split=args.split, data_root=args.data_root,
                              limit=args.limit, lr=args.lr, weight_decay=args.weight_decay,
                              batch_tokens=args.batch_tokens, seed=args.seed, restart=args.restart,
                              out=args.out, progress=not args.quiet)
        print(f"heads written to {res.path} ({res.epochs} epochs, final loss {res.train_loss[-1]:.4f}, "
              f"token acc {res.train_acc[-1]:.3f}; {res.seconds:.0f} s, of which features "
              f"{res.extract_seconds:.0f} s)")
        return 0

    p.set_defaults(func=run)
    return p
