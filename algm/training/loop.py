"""The one training loop: seeded shuffle, optimiser, schedule, resume, atomic checkpoint.

It serves every part the suite trains (decoder heads, fine-tuning, a method's trained
parts). The caller owns the model and the data; :func:`fit` owns the loop:

* epoch ``e`` visits the items in ``torch.randperm(n_items)`` order drawn from a
  generator seeded with ``seed * 1_000_003 + e`` (:func:`epoch_generator`); a step may
  draw more randomness (e.g. flips) from the same generator, so everything an epoch does
  follows from ``(seed, e)``;
* the learning rate of every optimiser group is ``lr_at(step) * group["lr_mult"]``
  (linear warm-up, then cosine or poly decay, stepped per iteration);
* after every epoch the model, optimiser and history go to ``checkpoint`` atomically,
  tagged with ``key``; a later call with the same key resumes after the last finished
  epoch, so a killed run continues bit-identically to an uninterrupted one (a checkpoint
  of another key, or one that does not load, is a cache miss: training starts over).

A step function gets the batch's item indices and the epoch generator and returns a
:class:`StepResult` (the loss to minimise, its weight, e.g. labelled pixels, and stats
to average) or None to skip the batch (nothing labelled).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from algm import atomic

CHECKPOINT_FORMAT = "algm-bench/training-checkpoint/v1"
SCHEDULES = ("cosine", "poly")


@dataclass(frozen=True)
class Schedule:
    """Per-iteration learning rate: ``warmup`` steps (a fraction of all steps if < 1,
    else a count) of linear warm-up to ``lr``, then ``cosine`` or ``poly`` (power 0.9)
    decay towards ``min_lr`` (mmseg's PolyLR: ``(lr - min_lr) (1 - progress)^0.9 + min_lr``)."""

    lr: float
    kind: str = "cosine"
    warmup: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be 'cosine' or 'poly', got {self.kind!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be between 0 and lr ({self.lr:g}), got {self.min_lr:g}")

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of 0-based optimiser ``step`` of ``total``."""
        warm = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        warm = min(warm, total - 1) if total > 1 else 0
        if step < warm:
            return self.lr * (step + 1) / (warm + 1)
        progress = (step - warm) / max(total - warm, 1)
        span = self.lr - self.min_lr
        if self.kind == "poly":
            return self.min_lr + span * (1 - progress) ** 0.9
        return self.min_lr + span * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    loss: Tensor
    weight: float = 1.0
    stats: dict[str, float] = field(default_factory=dict)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[Tensor, torch.Generator], StepResult | None],
        *, n_items: int, batch_size: int, epochs: int, schedule: Schedule, seed: int = 0,
        checkpoint: Path | None = None, key: str = "", progress: bool = True, desc: str = "train",
        on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``model`` for ``epochs``; returns the per-epoch history.

    Each history entry holds ``epoch`` (1-based), ``loss`` and every stat of the step
    results averaged with their weights, ``seconds`` and ``cpu_seconds``, plus what
    ``on_epoch(epoch, entry)`` adds to the entry (validation metrics, say) before the
    checkpoint is written.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if n_items < 1:
        raise ValueError("nothing to train on: no training items")
    steps_per_epoch = math.ceil(n_items / batch_size)
    total = steps_per_epoch * epochs
    history, first = _resume(model, optimizer, checkpoint, key)
    model.train()
    for epoch in range(first, epochs):
        start, cpu = time.perf_counter(), time.process_time()
        gen = epoch_generator(seed, epoch)
        order = torch.randperm(n_items, generator=gen)
        sums: dict[str, float] = {"loss": 0.0}  # 0 if every batch was skipped
        weight = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="step",
                   disable=not progress, leave=False)
        for s in bar:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(epoch * steps_per_epoch + s, total) * group.get("lr_mult", 1.0)
            result = step(order[s * batch_size:(s + 1) * batch_size], gen)
            if result is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            loss = result.loss.item()
            for name, value in {"loss": loss, **result.stats}.items():
                sums[name] = sums.get(name, 0.0) + value * result.weight
            weight += result.weight
            bar.set_postfix(loss=f"{loss:.3f}")
        entry = {"epoch": epoch + 1, **{k: v / max(weight, 1e-12) for k, v in sums.items()},
                 "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
        if on_epoch is not None:
            on_epoch(epoch + 1, entry)
            model.train()
        history.append(entry)
        if checkpoint is not None:
            atomic.save_torch({"format": CHECKPOINT_FORMAT, "key": key, "epoch": epoch + 1,
                               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "history": history}, checkpoint)
    model.eval()
    return history


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path | None,
            key: str) -> tuple[list[dict], int]:
    """(history, first epoch) from a checkpoint of the same training, else ([], 0)."""
    if checkpoint is None or not checkpoint.is_file():
        return [], 0
    try:
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged checkpoint is a cache miss, never a crash
        print(f"ignoring unreadable training checkpoint {checkpoint}: {err}")
        return [], 0
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or blob.get("key") != key:
        print(f"starting over: {checkpoint} was written by another training run")
        return [], 0
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    return list(blob["history"]), int(blob["epoch"])
