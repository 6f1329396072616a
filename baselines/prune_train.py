"""Training of the pruning method's exit heads on the frozen encoder (SPEC section 3).

The heads of :mod:`baselines.prune` are linear probes (``LayerNorm -> Linear``) on the
residual stream after their blocks, so the encoder never needs gradients:

1. :func:`extract_features` tiles every training image with the one training geometry
   (:func:`algm.data.windows.tiles`: test scale, padding, stride = window), records the
   patch tokens after the head blocks (:func:`encoder_features`) and reduces the labels
   to the patch grid by majority vote (:func:`patch_labels`). Chunks of images are cached
   on disk, so an interrupted extraction resumes.
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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from algm import atomic
from algm.cache import cache_dir
from algm.config import check_window, get_backbone, get_dataset
from algm.data.windows import tiles
from algm.training.loop import Schedule, StepResult, fit

FEATURES_FORMAT = "algm-bench/prune-features/v2"  # v2: windows from algm.data.windows.tiles


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: Tensor, layers: Sequence[int]) -> Tensor:
    """(B, len(layers), N, D) patch tokens after the 1-based ``layers`` of ``encoder``.

    images: (B, 3, H, W) normalised. Runs the encoder's own embedding and blocks, only up
    to the last layer asked for; the tokens equal what a method's ``after_block`` sees
    while nothing has been reduced (no attention bias, cls first).
    """
    grid = check_window(tuple(images.shape[-2:]), encoder.cfg.patch_size)
    patches = encoder.patch_embed(images) + encoder.patch_pos(grid)
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(images.shape[0], -1, -1)
    x = torch.cat([cls, patches], 1)
    wanted = set(layers)
    features = []
    for block, blk in enumerate(encoder.blocks[:max(layers)], start=1):
        x = blk(x)
        if block in wanted:
            features.append(x[:, 1:])
    return torch.stack(features, 1)


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


def training_windows(item, window: tuple[int, int], mean, std, ignore_index: int
                     ) -> tuple[list[Tensor], list[Tensor]]:
    """An item's training windows: images (1, 3, *window) and labels (*window)."""
    pairs = list(tiles(item.image, window, mean, std, label=item.label, ignore_index=ignore_index))
    return [x for x, _ in pairs], [y[0] for _, y in pairs]


def extract_features(encoder: nn.Module, samples: Sequence, layers: Sequence[int],
                     window: tuple[int, int], n_cls: int, ignore_index: int, out_dir: Path,
                     chunk: int = 32, batch_size: int = 4, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Frozen features at ``layers`` for every training window, cached in ``out_dir``.

    samples: indexable, items with ``.image`` (3, H, W) uint8 and ``.label`` (H, W).
    Images are cached in chunks of ``chunk``; chunks already on disk are reused (an
    interrupted extraction resumes). The windows of ``batch_size`` images go through the
    encoder at once.
    Returns features (W, L, N, D) float16 and per-patch labels (W, N) long, one row per
    window (one per image wherever a window covers the test-scale image, as on CamVid).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    feats, labels = [], []
    encoder.eval()
    with tqdm(total=n, desc="features", unit="img", disable=not progress) as bar:
        for start in range(0, n, chunk):
            path = out_dir / f"chunk-{start // chunk:05d}.pt"
            stop = min(n, start + chunk)
            blob = _cached_chunk(path, start, stop)
            if blob is None:
                blob = _encode_chunk(encoder, samples, start, stop, layers, window, n_cls,
                                     ignore_index, batch_size, bar)
                atomic.save_torch(blob, path)
            else:
                bar.update(stop - start)
            feats.append(blob["features"])
            labels.append(blob["labels"])
    return torch.cat(feats), torch.cat(labels)


def _encode_chunk(encoder: nn.Module, samples: Sequence, start: int, stop: int, layers: Sequence[int],
                  window: tuple[int, int], n_cls: int, ignore_index: int, batch_size: int, bar) -> dict:
    """The cache blob of images ``start:stop``: features and patch labels of their windows."""
    cfg = encoder.cfg
    grid = (window[0] // cfg.patch_size, window[1] // cfg.patch_size)
    features, labels = [], []
    for first in range(start, stop, batch_size):
        last = min(stop, first + batch_size)
        images, targets = [], []
        for i in range(first, last):
            x, y = training_windows(samples[i], window, cfg.mean, cfg.std, ignore_index)
            images += x
            targets += y
        features.append(encoder_features(encoder, torch.cat(images), layers).half())
        labels += [patch_labels(y, grid, n_cls, ignore_index) for y in targets]
        bar.update(last - first)
    return {"format": FEATURES_FORMAT, "range": [start, stop],
            "features": torch.cat(features), "labels": torch.stack(labels)}


def _cached_chunk(path: Path, start: int, stop: int) -> dict | None:
    """The cached chunk of images ``start:stop``, or None if absent, damaged (e.g. by a
    full disk: a cache miss) or of another format."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(blob, dict) and blob.get("format") == FEATURES_FORMAT and blob.get("range") == [start, stop]:
        return blob
    return None


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


def features_dir(backbone: str, dataset: str, split: str, layers: Sequence[int],
                 window: tuple[int, int], limit: int | None = None) -> Path:
    """The feature cache of one backbone / dataset / split / head layers / window."""
    tag = f"{backbone}-{dataset}-L{'-'.join(map(str, layers))}-{split}-{window[0]}x{window[1]}"
    if limit is not None:
        tag += f"-n{limit}"
    return cache_dir("prune", "features", tag)


def train_aux_heads(heads: nn.ModuleList, backbone: str, dataset: str, layers: Sequence[int],
                    out: Path, *, file_format: str, epochs: int = 10,
                    window: tuple[int, int] | None = None, split: str = "train",
                    data_root: str | None = None, limit: int | None = None, lr: float = 1e-3,
                    weight_decay: float = 1e-4, batch_tokens: int = 4096, seed: int = 0,
                    restart: bool = False, progress: bool = True,
                    frozen_encoder: Callable[[str, tuple[int, int]], nn.Module]) -> TrainResult:
    """Train ``heads`` (one per 1-based block of ``layers``) on the real frozen encoder
    of ``backbone`` over ``dataset``'s ``split``; write them to ``out``.

    ``frozen_encoder(backbone, window)`` gives the encoder (the framework's, see
    :class:`~algm.reduction.TrainingContext`). Features come from :func:`extract_features` (cached under
    ``algm.cache.cache_dir("prune", "features")``), training from :func:`fit_heads` with
    a checkpoint beside the features (``restart=True`` discards it). ``out`` receives
    ``{"format": file_format, "meta": ..., "state_dict": heads.state_dict()}``; the meta
    names the backbone, dataset, layers, sizes and the training run.
    """
    from algm.data.datasets import build_dataset

    start_time = time.perf_counter()
    cfg, spec = get_backbone(backbone), get_dataset(dataset)
    window = tuple(window) if window is not None else spec.window(cfg.patch_size)
    data = build_dataset(dataset, split, root=data_root, limit=limit)  # a missing root fails before any model
    encoder = frozen_encoder(cfg.name, window)
    fdir = features_dir(cfg.name, spec.name, split, layers, window, limit)
    features, labels = extract_features(encoder, data, layers, window, spec.n_cls,
                                        spec.ignore_index, fdir, progress=progress)
    extract_seconds = time.perf_counter() - start_time

    ckpt = fdir / f"heads-train-e{epochs}-s{seed}-lr{lr:g}-wd{weight_decay:g}-b{batch_tokens}.ckpt"
    if restart:
        ckpt.unlink(missing_ok=True)
    losses, accs = fit_heads(heads, features, labels, spec.ignore_index, epochs, lr=lr,
                             weight_decay=weight_decay, batch_tokens=batch_tokens, seed=seed,
                             checkpoint=ckpt, progress=progress)
    meta = {"backbone": cfg.name, "weights": cfg.weights, "dataset": spec.name, "split": split,
            "exit_layers": list(layers), "embed_dim": cfg.embed_dim, "n_cls": spec.n_cls,
            "window": list(window), "epochs": epochs, "seed": seed, "lr": lr,
            "images": len(data), "windows": int(features.shape[0]),
            "train_loss": losses, "train_acc": accs}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.save_torch({"format": file_format, "meta": meta, "state_dict": heads.state_dict()}, out)
    return TrainResult(out, epochs, losses, accs, time.perf_counter() - start_time, extract_seconds)
