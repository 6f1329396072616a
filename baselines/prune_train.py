"""Training of the pruning method's exit heads on the frozen encoder (SPEC section 3).

The heads of :mod:`baselines.prune` are linear probes (``LayerNorm -> Linear``) on the
residual stream after their blocks, so the encoder never needs gradients:

1. The framework gives the frozen encoder's patch tokens after the head blocks for every
   training window (:meth:`~algm.reduction.TrainingContext.layer_features`: the one
   training geometry of :func:`algm.data.windows.tiles`, one encoder forward per frame,
   cached and resumable); :func:`patch_labels` reduces each window's labels to the patch
   grid by majority vote.
2. :func:`fit_heads` trains every head on its block's tokens with cross-entropy through
   :func:`algm.training.loop.fit` (AdamW, per-iteration cosine decay, seeded shuffling,
   checkpoint after every epoch).
3. :func:`train_aux_heads` runs both for a real backbone and dataset and writes the
   heads file the method loads.

This module knows nothing of the method itself: the caller (``baselines.prune``) passes
the heads to train, the output path and the file format tag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from algm import atomic
from algm.config import DatasetSpec, ViTConfig
from algm.reduction import TrainingContext
from algm.training.loop import Schedule, StepResult, fit


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


def fit_heads(heads: nn.ModuleList, features: Tensor, labels: Tensor, ignore_index: int,
              epochs: int, lr: float = 1e-3, weight_decay: float = 1e-4, batch_tokens: int = 4096,
              seed: int = 0, checkpoint: Path | None = None, progress: bool = True,
              ) -> tuple[list[float], list[float]]:
    """Train each head on its layer's features with cross-entropy (AdamW, cosine LR).

    features: (S, L, N, D) (any float dtype), labels: (S, N); tokens labelled
    ``ignore_index`` are dropped up front, the rest are the items :func:`fit` shuffles
    (``batch_tokens`` per step; the loss is the sum of the heads' losses). A run resumed
    from ``checkpoint`` (saved after every epoch) continues exactly as the uninterrupted
    one. Returns per-epoch mean loss and token accuracy (both averaged over heads).
    """
    s, n_layers, n, d = features.shape
    if n_layers != len(heads):
        raise ValueError(f"features hold {n_layers} layers but there are {len(heads)} heads")
    tokens = features.permute(0, 2, 1, 3).reshape(s * n, n_layers, d)  # (S*N, L, D)
    targets = labels.reshape(-1)
    valid = targets != ignore_index
    tokens, targets = tokens[valid], targets[valid]
    if targets.numel() == 0:
        raise ValueError("no labelled tokens to train the heads on")

    def step(batch: Tensor, _gen: torch.Generator) -> StepResult:
        x, y = tokens[batch].float(), targets[batch]
        logits = [head(x[:, i]) for i, head in enumerate(heads)]
        loss = sum(F.cross_entropy(out, y) for out in logits)
        acc = sum(float((out.argmax(-1) == y).float().mean()) for out in logits) / n_layers
        return StepResult(loss, weight=len(batch), stats={"acc": acc})

    def report(epoch: int, entry: dict) -> None:
        if progress:
            tqdm.write(f"epoch {epoch}/{epochs}: loss {entry['loss'] / n_layers:.4f}, "
                       f"token acc {entry['acc']:.3f}")

    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    key = f"prune-heads tokens={targets.numel()} e{epochs} s{seed} lr{lr:g} wd{weight_decay:g} b{batch_tokens}"
    history = fit(heads, optimizer, step, n_items=targets.numel(), batch_size=batch_tokens, epochs=epochs,
                  schedule=Schedule(lr, "cosine"), seed=seed, checkpoint=checkpoint, key=key,
                  progress=progress, desc="heads", on_epoch=report)
    return [h["loss"] / n_layers for h in history], [h["acc"] for h in history]


@dataclass(frozen=True)
class TrainResult:
    path: Path
    epochs: int
    train_loss: list[float]
    train_acc: list[float]
    seconds: float
    extract_seconds: float


def train_aux_heads(heads: nn.ModuleList, backbone: ViTConfig, dataset: DatasetSpec, layers: Sequence[int],
                    out: Path, *, file_format: str, context: TrainingContext, epochs: int = 10,
                    split: str = "train", limit: int | None = None, lr: float = 1e-3,
                    weight_decay: float = 1e-4, batch_tokens: int = 4096, seed: int = 0,
                    restart: bool = False) -> TrainResult:
    """Train ``heads`` (one per 1-based block of ``layers``) on the real frozen encoder
    of ``backbone`` over ``dataset``'s ``split``; write them to ``out``.

    The features come from the framework (``context.layer_features``: its encoder, data
    root, window and progress), training from :func:`fit_heads` with a checkpoint in the
    features' cache folder, so it is never resumed on other features (``restart=True``
    discards it). ``out`` receives ``{"format": file_format, "meta": ...,
    "state_dict": heads.state_dict()}``; the meta names the backbone, dataset, layers,
    sizes and the training run.
    """
    start_time = time.perf_counter()
    feats = context.layer_features(backbone, dataset, layers, split=split, limit=limit)
    labels = torch.stack([patch_labels(y, feats.grid, dataset.n_cls, dataset.ignore_index) for y in feats.labels])
    extract_seconds = time.perf_counter() - start_time

    ckpt = feats.path / f"heads-train-e{epochs}-s{seed}-lr{lr:g}-wd{weight_decay:g}-b{batch_tokens}.ckpt"
    if restart:
        ckpt.unlink(missing_ok=True)
    losses, accs = fit_heads(heads, feats.features, labels, dataset.ignore_index, epochs, lr=lr,
                             weight_decay=weight_decay, batch_tokens=batch_tokens, seed=seed,
                             checkpoint=ckpt, progress=context.progress)
    window = [feats.labels.shape[1], feats.labels.shape[2]]
    meta = {"backbone": backbone.name, "weights": backbone.weights, "dataset": dataset.name, "split": split,
            "exit_layers": list(layers), "embed_dim": backbone.embed_dim, "n_cls": dataset.n_cls,
            "window": window, "epochs": epochs, "seed": seed, "lr": lr,
            "images": feats.n_frames, "windows": int(feats.features.shape[0]),
            "train_loss": losses, "train_acc": accs}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.save_torch({"format": file_format, "meta": meta, "state_dict": heads.state_dict()}, out)
    return TrainResult(out, epochs, losses, accs, time.perf_counter() - start_time, extract_seconds)
