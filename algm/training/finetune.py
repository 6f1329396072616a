"""Fine-tuning the whole segmenter with a token-reduction method active (SPEC section 9).

The paper trains ALGM's models with the method in the forward pass; :func:`finetune`
does that from a start model (an official checkpoint, or the offline encoder with its
off-the-shelf head): encoder blocks after the first ``freeze_blocks`` and the decoder
train, with the method's hooks active, on random training views
(:func:`algm.data.windows.random_view`: rescale 0.5-2.0, crop, flip) of the training
split. The recipe is Segmenter's: SGD with momentum 0.9, no weight decay, polynomial
decay (power 0.9) from ``lr`` to ``min_lr``, stepped per iteration, cross-entropy with
the dataset's ignore index. Not applied: photometric distortion, drop path and decoder
dropout (the model has no stochastic layers).

Two ways to run, chosen by ``freeze_blocks``:

* ``0``: every parameter trains, and every step draws fresh views through the whole
  network (the paper's protocol; a GPU's job at the paper's budgets);
* ``K > 0`` (the CPU protocol): blocks ``1..K`` (1-based; patch embedding and position
  embedding too) are frozen. Frozen blocks without dropout are deterministic and the
  method's merging decisions up to block K are then fixed per view, so their output is
  computed once for ``views`` random views per frame and cached
  (:func:`algm.training.features.extract_features` with ``blocks``); an epoch runs only
  blocks ``K+1..depth`` and the decoder. Views of different token counts are padded
  and masked (:func:`algm.training.features.collate`), i.e. merging is per image.

The loop is :func:`algm.training.loop.fit` (seeded shuffling, a checkpoint every
epoch, resume after a kill). The result is an official-format ``checkpoint.pth`` +
``variant.yml`` (:func:`algm.weights.checkpoint.save_checkpoint`) that ``--checkpoint``
and the suites' ``DIR/<dataset>/<backbone>/<method>/`` layout read back; its
``algm_bench`` entry records the method, the budget and the wall time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algm.build import Setup
from algm.data.windows import random_view
from algm.precision import autocast_context, native_bf16
from algm.safe_yaml import brief
from algm.training.defaults import (FINETUNE_BATCH_SIZE, FINETUNE_EPOCHS, FINETUNE_FREEZE_BLOCKS, FINETUNE_LR,
                                    FINETUNE_MIN_LR, FINETUNE_PRECISION, FINETUNE_SEED, FINETUNE_VIEWS,
                                    TRAIN_PRECISIONS)
from algm.training.features import collate, extract_features, frame_names, open_split
from algm.training.keys import cache_folder, cache_label, digest, weights_fingerprint
from algm.training.loop import Schedule, StepResult, fit
from algm.weights.checkpoint import read_variant, save_checkpoint, strict_load, variant_of
from algm.weights.torch_file import check_state_dict, load_torch_file

FINETUNE_FORMAT = "algm-bench/finetune/v1"


@dataclass(frozen=True)
class FinetuneConfig:
    """Budget and recipe of one fine-tuning run (all of it is part of the result's key).

    ``epochs``: passes over the training items (frames, or with frozen blocks the
    ``views`` cached views of every frame); ``freeze_blocks``: leading encoder blocks
    kept frozen (0: train everything); ``lr`` / ``min_lr``: the poly schedule's ends;
    ``precision``: ``fp32``, ``bf16`` autocast of the forward, or ``auto`` (bf16 where
    the CPU computes it natively, always on CUDA)."""

    epochs: int = FINETUNE_EPOCHS
    freeze_blocks: int = FINETUNE_FREEZE_BLOCKS
    views: int = FINETUNE_VIEWS
    batch_size: int = FINETUNE_BATCH_SIZE
    lr: float = FINETUNE_LR
    min_lr: float = FINETUNE_MIN_LR
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = FINETUNE_SEED
    precision: str = FINETUNE_PRECISION

    def __post_init__(self):
        for name in ("epochs", "views", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"finetune {name} must be a whole number >= 1, got {brief(getattr(self, name))}")
        if not isinstance(self.freeze_blocks, int) or self.freeze_blocks < 0:
            raise ValueError(f"freeze_blocks must be a whole number >= 0, got {brief(self.freeze_blocks)}")
        for name in ("lr", "min_lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"finetune {name} must be a number, got {brief(value)}")
            if not math.isfinite(value):  # NaN or inf trains NaN weights
                raise ValueError(f"finetune {name} must be finite, got {value}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {brief(self.precision)}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        self.schedule()  # checks lr and min_lr

    def schedule(self) -> Schedule:
        return Schedule(self.lr, "poly", 0.0, self.min_lr)

    def check_depth(self, depth: int, backbone: str, name: str = "freeze_blocks") -> None:
        """``name`` is how the caller spells the option (``--freeze-blocks``)."""
        if self.freeze_blocks > depth:
            raise ValueError(f"{name} {self.freeze_blocks}: {backbone} has {depth} blocks")

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if device.type == "cuda" or native_bf16() else "fp32"


@dataclass(frozen=True)
class FinetuneResult:
    """``checkpoint``: the written ``checkpoint.pth``; ``record``: its ``algm_bench``
    entry (method, settings, budget, history, wall time)."""

    checkpoint: Path
    record: dict


def trainable(model: nn.Module, freeze_blocks: int) -> list[nn.Parameter]:
    """Freeze the encoder's first ``freeze_blocks`` blocks (with patch and position
    embeddings when any is frozen) and the method's own parameters; returns the rest."""
    encoder = model.encoder
    frozen: list[nn.Module | nn.Parameter] = [model.method]
    if freeze_blocks:
        frozen += [encoder.patch_embed, encoder.cls_token, encoder.pos_embed, *encoder.blocks[:freeze_blocks]]
    for part in frozen:
        for p in ([part] if isinstance(part, nn.Parameter) else part.parameters()):
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def finetune_identity(setup: Setup, config: FinetuneConfig, split: str, names: list[str]) -> dict:
    """Everything a fine-tuned model depends on (its ``key`` is the digest of this)."""
    method = setup.model.method
    return {"format": FINETUNE_FORMAT, "start": weights_fingerprint(setup.model.encoder, setup.model.decoder),
            "backbone": asdict(setup.backbone), "dataset": setup.dataset.name, "split": split,
            "frames": digest(names), "window": list(setup.window), "method": method.identity(),
            "config": asdict(config)}


def items_per_epoch(n_frames: int, config: FinetuneConfig) -> int:
    """Training items of one epoch: the frames, or with frozen blocks their cached views."""
    return n_frames * (config.views if config.freeze_blocks else 1)


def finished_key(folder: Path) -> str | None:
    """The key recorded in ``folder/variant.yml`` by an earlier fine-tune, if any."""
    try:
        return (read_variant(folder / "variant.yml").get("algm_bench") or {}).get("key")
    except (OSError, ValueError):
        return None


def finetune(setup: Setup, config: FinetuneConfig, out: str | Path, *, split: str = "train",
             dataset=None, root: str | Path | None = None, limit: int | None = None,
             device: str = "cpu", cache: str | Path | None = None, progress: bool = True,
             overwrite: bool = False) -> FinetuneResult:
    """Fine-tune ``setup.model`` (in place) with its method active and write it to
    ``out/checkpoint.pth`` + ``out/variant.yml``.

    Idempotent: a finished run of the same key in ``out`` is returned as is; an
    interrupted one resumes after its last finished epoch (its checkpoints live in
    ``cache_dir("finetune", ...)``). ``out`` holding another model is an error unless
    ``overwrite``. The start model is ``setup.model`` as loaded (its decoder trained).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder (the output is a folder for "
                                 f"checkpoint.pth and variant.yml)")
    model = setup.model
    config.check_depth(model.encoder.depth, setup.backbone.name)
    data = open_split(setup, split, dataset, root, limit)
    identity = finetune_identity(setup, config, split, frame_names(data))
    key = digest(identity)
    done = out / "checkpoint.pth"
    own = _own_checkpoint(done, key)  # this run's weights (a kill may have come before its variant)
    if own is not None and finished_key(out) == key:
        weights = check_state_dict(own["model"], done)
        strict_load(nn.ModuleDict({"encoder": model.encoder, "decoder": model.decoder}), weights,
                    f"checkpoint {done}")
        return FinetuneResult(done, read_variant(out / "variant.yml")["algm_bench"])
    if done.exists() and own is None and not overwrite:
        raise ValueError(f"{done} holds another model; pass another --out or --overwrite")
    work = cache_folder(cache, "finetune", f"{cache_label(setup, split)}-{key}")
    dev = torch.device(device)
    step, n_items, prefix_seconds = _step_function(setup, config, data, split, dev, cache, progress)
    params = trainable(model, config.freeze_blocks)
    model.to(dev)
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    history = fit(model, optimizer, step, n_items=n_items, batch_size=config.batch_size, epochs=config.epochs,
                  schedule=config.schedule(), seed=config.seed, checkpoint=work / "last.pt", key=key,
                  progress=progress, desc=f"finetune {model.method.name}")
    model.to("cpu").eval()
    for p in model.parameters():
        p.requires_grad_(True)
    train_seconds = sum(h["seconds"] for h in history)  # every epoch's, across resumed calls
    record = {"key": key, "method": model.method.name, "settings": model.method.settings(),
              "budget": {**asdict(config), "iterations": math.ceil(n_items / config.batch_size) * config.epochs,
                         "items": n_items, "frames": len(data),
                         "precision": config.resolved_precision(dev)},
              "wall_seconds": round(prefix_seconds + train_seconds, 1), "prefix_seconds": round(prefix_seconds, 1),
              "train_seconds": round(train_seconds, 1),
              "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in history]}
    variant = variant_of(model, setup.dataset.name, setup.window, setup.stride,
                         extra={"algm_bench": json.loads(json.dumps(record))})
    path = save_checkpoint(model, out, variant, {"format": FINETUNE_FORMAT, "key": key})
    return FinetuneResult(path, record)


def _own_checkpoint(path: Path, key: str) -> dict | None:
    """The contents of ``path`` if it is the checkpoint this fine-tune (``key``) wrote."""
    if not path.is_file():
        return None
    blob = load_torch_file(path)
    ours = isinstance(blob, dict) and (blob.get("algm_bench") or {}).get("key") == key
    return blob if ours else None


def _step_function(setup: Setup, config: FinetuneConfig, data, split: str, device: torch.device,
                   cache, progress: bool):
    """(step, number of training items, seconds spent caching the frozen prefix)."""
    model, ignore = setup.model, setup.dataset.ignore_index
    precision = config.resolved_precision(device)
    k = config.freeze_blocks

    def loss(logits: Tensor, labels: Tensor) -> StepResult | None:
        valid = int((labels != ignore).sum())
        if not valid:  # nothing labelled: the mean loss would be NaN
            return None
        return StepResult(F.cross_entropy(logits.float(), labels, ignore_index=ignore), weight=valid)

    if k == 0:
        mean, std = setup.backbone.mean, setup.backbone.std

        def step(batch: Tensor, generator: torch.Generator) -> StepResult | None:
            views = [random_view(data[j].image, data[j].label, setup.window, mean, std, generator, ignore)
                     for j in batch.tolist()]
            images = torch.cat([v[0] for v in views]).to(device)
            labels = torch.cat([v[1] for v in views]).to(device)
            with autocast_context(device, precision):
                logits = model.run(images, labels).logits
            return loss(logits, labels)

        return step, len(data), 0.0

    model.to(device)
    cached = extract_features(setup, split, dataset=data, cache=cache, progress=progress,
                              blocks=k, views=config.views, seed=config.seed)
    encoder, method = model.encoder, model.method

    def step(batch: Tensor, _generator: torch.Generator) -> StepResult | None:
        state, labels = collate([cached.items[j] for j in batch.tolist()], device)
        with autocast_context(device, precision):
            state, _ = encoder.run_blocks(state, method, range(k, encoder.depth))
            logits = model.decode(encoder.finish(state), tuple(labels.shape[-2:]))
        return loss(logits, labels)

    # the first extraction's time (index.json), also when this call found the cache complete
    return step, len(cached.items), float(cached.index["extract_seconds"])
